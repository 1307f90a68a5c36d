"""Bad input over real HTTP (hypothesis): random bytes and JSON, wrong content types, truncated
bodies, the wrong command for a path, missing state references, huge bodies. Every one gets a
4xx whose body names the problem, never a 5xx; a rejected request changes nothing in the store;
the server keeps serving."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
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
from tests.wire_support import any_command, varint

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


# --- amplifying bodies against a real server process: bounded memory, a responsive loop ------
#
# Bodies made of one cheap item repeated (2 to 10 bytes each, up to the 16 MiB body limit of
# `flowstate serve`), sent to a server of its own process while a prober asks /health: every
# answer is 200 or a 4xx, every /health is answered while they are being processed (within
# HEALTH_WAIT, where a blocked loop took a minute), and the server's peak RSS stays under
# HOSTILE_RSS_MB (7.5 GB before the caps).

SERVE_MAX_BODY = 16 * 2**20
HEALTH_WAIT = 20.0
HOSTILE_RSS_MB = 400


def _msg(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + varint(len(payload)) + payload


def _keys(n: int, tag: int) -> bytes:
    """``n`` map entries with distinct keys under field ``tag`` (labels or annotations)."""
    return b"".join(_msg(tag, _msg(0x0A, b"k%x" % i)) for i in range(n))


def _get_states(payload: bytes) -> bytes:
    """A Command whose get_states field (19: a two-byte tag) holds ``payload``."""
    return b"\x9a\x01" + varint(len(payload)) + payload


#: shape -> (bytes per item, builder of a body of n items, the path it is posted to)
_PROTO_SHAPES: dict[str, tuple[int, Callable[[int], bytes], str]] = {
    "state_ctxs": (2, lambda n: b"\x0a\x00" * n + b"\x52\x00", "Commit"),
    "commands": (4, lambda n: _msg(0x4A, b"\x0a\x02\x52\x00" * n), "Commit"),
    "transitions": (2, lambda n: _msg(0x0A, b"\x1a\x00" * n) + b"\x52\x00", "Commit"),
    "labels": (11, lambda n: _msg(0x0A, _msg(0x12, _keys(n, 0x22))) + b"\x52\x00", "Commit"),
    "annotations": (11, lambda n: _msg(0x0A, _msg(0x12, _keys(n, 0x1A))) + b"\x52\x00", "Commit"),
    "unknown": (3, lambda n: b"\xf8\x01\x00" * n + b"\x52\x00", "Commit"),
    "label_sets": (2, lambda n: _get_states(b"\x1a\x00" * n), "GetStates"),
    "result_states": (2, lambda n: _get_states(_msg(0x32, b"\x0a\x00" * n)), "GetStates"),
}
_JSON_SHAPES: dict[str, tuple[int, Callable[[int], bytes], str]] = {
    "state_ctxs": (
        3,
        lambda n: b'{"stateCtxs":[' + b",".join([b"{}"] * n) + b'],"noop":{}}',
        "Commit",
    ),
    "commands": (
        12,
        lambda n: b'{"commit":{"commands":[' + b",".join([b'{"noop":{}}'] * n) + b"]}}",
        "Commit",
    ),
    "transitions": (
        3,
        lambda n: b'{"stateCtxs":[{"transitions":[' + b",".join([b"{}"] * n) + b']}],"noop":{}}',
        "Commit",
    ),
    "annotations": (
        13,
        lambda n: (
            b'{"stateCtxs":[{"current":{"annotations":{'
            + b",".join(b'"k%x":""' % i for i in range(n))
            + b'}}}],"noop":{}}'
        ),
        "Commit",
    ),
    "unknown": (3, lambda n: b'{"x":[' + b",".join([b"[]"] * n) + b'],"noop":{}}', "Commit"),
}


@dataclass
class Process:
    url: str
    pid: int
    http: httpx.Client


@pytest.fixture(scope="module")
def process() -> Iterator[Process]:
    from tests.test_server_caps import serve_process

    with serve_process() as (url, pid), httpx.Client(base_url=url, timeout=120.0) as http:
        yield Process(url, pid, http)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=st.sampled_from(sorted(_PROTO_SHAPES))
    | st.sampled_from(["json:" + k for k in sorted(_JSON_SHAPES)]),
    fill=st.sampled_from([0.001, 0.05, 0.5, 1.0]),
)
def test_amplifying_bodies_keep_memory_bounded_and_health_answered(
    process: Process, shape: str, fill: float
) -> None:
    as_json = shape.startswith("json:")
    size, build, method = (_JSON_SHAPES if as_json else _PROTO_SHAPES)[shape.removeprefix("json:")]
    body = build(max(1, int((SERVE_MAX_BODY - 64) // size * fill)))
    assume(len(body) <= SERVE_MAX_BODY)
    answer: list[httpx.Response] = []

    def post() -> None:
        headers = {"content-type": "application/json"} if as_json else {}
        with httpx.Client(base_url=process.url, timeout=300.0) as http:
            answer.append(http.post(DRIVER + method, content=body, headers=headers))

    sender = threading.Thread(target=post)
    sender.start()
    # the loop answers /health while the body is read and decoded (a blocked loop took 65 s)
    while sender.is_alive():
        assert process.http.get("/health", timeout=HEALTH_WAIT).status_code == 200
    sender.join()
    assert answer and answer[0].status_code in (200, 400, 413), (shape, answer[0].content[:200])
    from tests.test_server_caps import peak_rss_mb

    assert peak_rss_mb(process.pid) < HOSTILE_RSS_MB, shape
