"""Bad input over real HTTP (hypothesis): random bytes and JSON, wrong content types, truncated
bodies, the wrong command for a path, missing state references, huge bodies. Every one gets a
4xx whose body names the problem, never a 5xx; a rejected request changes nothing in the store;
the server keeps serving."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.commands import Command
from flowstate.server import BackgroundServer, create_app
from flowstate.server.driver_service import METHODS
from flowstate.wire import codec
from tests.test_wire_fuzz import JSON_VALUES
from tests.wire_support import any_command

MAX_BODY = 64 * 1024
DRIVER = "/flowstate.v1.Driver/"
EXECUTE = "/flowstate.v1.Flow/Execute"
PATHS = [DRIVER + m for m in METHODS] + [EXECUTE]
READS = {DRIVER + m for m in ("GetStateByID", "GetStateByLabels", "GetStates")} | {
    DRIVER + m for m in ("GetDelayedStates", "GetData")
}
METHOD_OF = {cls: DRIVER + name for name, (cls, _) in METHODS.items()}

FUZZ = settings(
    max_examples=int(os.environ.get("FLOWSTATE_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@dataclass
class Served:
    store: fs.MemoryDriver
    http: httpx.Client

    def fingerprint(self) -> tuple[int, int, int, list[tuple[str, int]]]:
        """Everything a request could change (read between requests: the server is idle)."""
        s = self.store
        return (
            len(s._log),
            len(s._datas),
            len(s._delayed),
            sorted((k, v.rev) for k, v in s._latest.items()),
        )

    def post(self, path: str, body: bytes, content_type: str | None) -> httpx.Response:
        headers = {}
        if content_type is not None:
            headers["content-type"] = content_type.encode("latin-1")
        before = self.fingerprint()
        response = self.http.post(path, content=body, headers=headers)
        assert response.status_code < 500, (response.status_code, response.content[:300])
        if response.status_code >= 400:
            assert self.fingerprint() == before, "a rejected request changed the store"
        return response


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    store = fs.MemoryDriver()
    server = BackgroundServer(create_app(store, max_body=MAX_BODY))
    server.start()
    http = httpx.Client(base_url=server.url, timeout=30.0)
    seed = fs.StateCtx(current=fs.State("seeded", labels={"k": "v"}))
    seed.datas["d"] = fs.Data(b"payload", {})
    body = codec.encode_command(fs.commit(fs.store_data(seed, "d"), fs.park(seed)))
    assert http.post(DRIVER + "Commit", content=body).status_code == 200
    try:
        yield Served(store, http)
    finally:
        http.close()
        server.stop()
    assert not server._thread or not server._thread.is_alive()


def rejected(response: httpx.Response, status: int | None = None) -> tuple[str, str]:
    """Assert a 4xx (or exactly ``status``) with a decodable error body; its code, message."""
    if status is None:
        assert 400 <= response.status_code < 500, response.status_code
    else:
        assert response.status_code == status, (response.status_code, response.content[:300])
    as_json = response.headers["content-type"] == "application/json"
    code, message = codec.decode_error(response.content, json=as_json)
    assert code and message.strip(), response.content
    return code, message


def check_alive(served: Served) -> None:
    assert served.http.get("/health").status_code == 200


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    body=st.binary(max_size=512),
    ctype=st.sampled_from([None, "application/proto", "application/x-protobuf"]),
)
def test_random_bytes(served: Served, path: str, body: bytes, ctype: str | None) -> None:
    response = served.post(path, body, ctype)
    if response.status_code != 200 or path not in READS:
        code, _ = rejected(response)
        assert code in ("invalid_argument", "not_found")


@FUZZ
@given(path=st.sampled_from(PATHS), value=JSON_VALUES)
def test_random_json(served: Served, path: str, value: object) -> None:
    body = json.dumps(value).encode()
    response = served.post(path, body, "application/json")
    if response.status_code == 200:
        return  # a well-formed request after all (e.g. a read, or a commit of noops)
    code, _ = rejected(response)
    assert response.headers["content-type"] == "application/json"
    assert code in ("invalid_argument", "not_found", "aborted")


@FUZZ
@given(
    path=st.sampled_from(PATHS),
    ctype=st.text(
        st.characters(min_codepoint=0x20, max_codepoint=0xFF), min_size=1, max_size=30
    ).filter(
        lambda t: (
            t.isprintable()
            and t == t.strip()
            and t.split(";")[0].strip().lower()
            not in (
                "",
                "application/json",
                "application/proto",
                "application/protobuf",
                "application/x-protobuf",
                "application/octet-stream",
            )
        )
    ),
)
def test_wrong_content_type(served: Served, path: str, ctype: str) -> None:
    response = served.post(path, codec.encode_command(fs.get_states()), ctype)
    _, message = rejected(response, 415)
    assert "content type" in message


@FUZZ
@given(cmd=any_command(), as_json=st.booleans(), data=st.data())
def test_truncated_bodies(served: Served, cmd: Command, as_json: bool, data: st.DataObject) -> None:
    body = _encode(cmd, as_json)
    assume(len(body) > 0)
    cut = data.draw(st.integers(0, len(body) - 1))
    path = METHOD_OF.get(type(cmd), DRIVER + "Commit")
    response = served.post(path, body[:cut], "application/json" if as_json else None)
    code, _ = rejected(response, 400)
    assert code == "invalid_argument"


@FUZZ
@given(cmd=any_command(), as_json=st.booleans(), path=st.sampled_from(list(METHODS)))
def test_wrong_command_for_the_path(served: Served, cmd: Command, as_json: bool, path: str) -> None:
    expected, _ = METHODS[path]
    assume(type(cmd) is not expected)
    body = _encode(cmd, as_json)
    response = served.post(DRIVER + path, body, "application/json" if as_json else None)
    _, message = rejected(response, 400)
    assert message.startswith(f"command: {path} expects a ")


@FUZZ
@given(cmd=any_command(), as_json=st.booleans())
def test_missing_state_references(served: Served, cmd: Command, as_json: bool) -> None:
    body = _encode(cmd, as_json)
    if as_json:
        value = json.loads(body)
        assume("stateCtxs" in value)
        del value["stateCtxs"]
        stripped = json.dumps(value).encode()
    else:
        stripped = _strip_state_ctxs(body)
        assume(stripped != body)
    path = METHOD_OF.get(type(cmd), DRIVER + "Commit")
    response = served.post(path, stripped, "application/json" if as_json else None)
    _, message = rejected(response, 400)
    assert "state_ref" in message or "state context" in message or "Ref" in message


@FUZZ
@given(cmd=any_command(), as_json=st.booleans())
def test_any_command_on_its_own_path(served: Served, cmd: Command, as_json: bool) -> None:
    """Well-formed commands with arbitrary contents: performed, or refused as the client's
    fault (4xx, store unchanged); never a server error."""
    path = METHOD_OF.get(type(cmd))
    assume(path is not None)
    response = served.post(path, _encode(cmd, as_json), "application/json" if as_json else None)
    if response.status_code != 200:
        rejected(response)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(extra=st.integers(1, 3 * MAX_BODY), path=st.sampled_from(PATHS), as_json=st.booleans())
def test_huge_bodies(served: Served, extra: int, path: str, as_json: bool) -> None:
    body = b"{" + b" " * (MAX_BODY + extra) + b"}" if as_json else b"\x00" * (MAX_BODY + extra)
    response = served.post(path, body, "application/json" if as_json else None)
    code, message = rejected(response, 413)
    assert code == "resource_exhausted" and str(MAX_BODY) in message
    check_alive(served)


def test_the_server_survived(served: Served) -> None:
    check_alive(served)
    r = served.http.post(
        DRIVER + "GetStateByID",
        content=codec.encode_command(fs.get_state_by_id(fs.StateCtx(), "seeded")),
    )
    assert r.status_code == 200


def _encode(cmd: Command, as_json: bool) -> bytes:
    try:
        return codec.encode_command(cmd, json=as_json)
    except codec.WireError:
        assume(False)
        raise


def _strip_state_ctxs(body: bytes) -> bytes:
    """The Command without its field 1 entries (the state_ctxs list)."""
    from flowstate.wire.binary import read_span, read_tag, skip_field

    out = bytearray()
    pos, end = 0, len(body)
    while pos < end:
        start = pos
        field, wire_type, pos = read_tag(body, pos, end, "cmd")
        pos = (
            read_span(body, pos, end, "cmd")[1]
            if wire_type == 2
            else skip_field(body, pos, end, wire_type, "cmd")
        )
        if field != 1:
            out += body[start:pos]
    return bytes(out)
