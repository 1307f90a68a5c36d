"""The server over real HTTP: Go's bytes, Connect JSON, status codes and error bodies, content
types, token, CORS, body limit, health, h2c, the settings from the environment, and serve()."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import flowstate as fs
from flowstate.server import create_app, run_server, settings
from flowstate.server.run import DEFAULT_STORE, listen, parse_addr
from flowstate.wire import codec
from tests import netserver

ROOT = Path(__file__).resolve().parent.parent
DRIVER = "/flowstate.v1.Driver/"
EXECUTE = "/flowstate.v1.Flow/Execute"

# wire.md §7.3, as the Go encoder writes them.
GO_COMMIT_TRANSIT = bytes.fromhex(
    "0a0e0a0232001208 0a0461544944 3200 4a0f0a0d1a0b0a0208001205 6669727374".replace(" ", "")
)
GO_GET_STATE_BY_ID = bytes.fromhex("0a080a023200120232008a010a0a04615449441a020800")
GO_ABORTED = bytes.fromhex(  # aborted / "rev mismatch: aTID"
    "0a0761626f727465641212726576206d69736d617463683a2061544944"
)
GO_NOOP = bytes.fromhex("5200")


@pytest.fixture
def store() -> fs.MemoryDriver:
    return fs.MemoryDriver()


def client_for(store: fs.Driver, **options: object) -> httpx.Client:
    server = netserver.serve(store, **options)
    return httpx.Client(base_url=server.url, timeout=30.0)


def error_of(response: httpx.Response) -> tuple[str, str]:
    as_json = response.headers["content-type"] == "application/json"
    return codec.decode_error(response.content, json=as_json)


# ---------------------------------------------------------------------------------------------
# The Go client's bytes (no Content-Type at all)


def test_go_client_requests_and_answers(store: fs.MemoryDriver) -> None:
    with client_for(store) as http:
        r = http.post(DRIVER + "Commit", content=GO_COMMIT_TRANSIT)
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/proto"
        answer = codec.decode_command(r.content)
        assert isinstance(answer, fs.CommitCmd)
        transit = answer.commands[0]
        assert isinstance(transit, fs.TransitCmd)
        assert transit.ctx.committed.rev == 1
        assert transit.ctx.current.transition.to == "first"

        r = http.post(DRIVER + "GetStateByID", content=GO_GET_STATE_BY_ID)
        assert r.status_code == 200
        got = codec.decode_command(r.content)
        assert isinstance(got, fs.GetStateByIdCmd)
        assert (got.ctx.current.id, got.ctx.current.rev) == ("aTID", 1)
        assert got.ctx.committed == got.ctx.current

        r = http.post(DRIVER + "Commit", content=GO_COMMIT_TRANSIT)  # rev 0 expected: stale
        assert r.status_code == 409
        assert r.headers["content-type"] == "application/proto"
        assert r.content == GO_ABORTED


def test_flow_execute_answers_noop_and_runs_the_flow(store: fs.MemoryDriver) -> None:
    ran = threading.Event()
    registry = fs.FlowRegistry()

    async def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        ran.set()
        return fs.noop()

    registry.set_flow("remote", flow)
    with client_for(store, flows=registry) as http:
        ctx = fs.StateCtx(current=fs.State("x", transition=fs.Transition("remote")))
        r = http.post(EXECUTE, content=codec.encode_state_ctx(ctx))
        assert (r.status_code, r.content) == (200, GO_NOOP)
        assert ran.wait(30)

        r = http.post(
            EXECUTE,
            content=codec.encode_state_ctx(ctx, json=True),
            headers={"content-type": "application/json"},
        )
        assert (r.status_code, r.json()) == (200, {"noop": {}})

        r = http.post(EXECUTE, content=b"\xff\xff")
        assert r.status_code == 400
        assert error_of(r)[0] == "invalid_argument"

        missing = fs.StateCtx(current=fs.State("x", transition=fs.Transition("nowhere")))
        r = http.post(EXECUTE, content=codec.encode_state_ctx(missing))
        assert r.status_code == 404
        assert error_of(r) == ("not_found", "flow not found: 'nowhere'")

        for bad, field in [
            (fs.State("", transition=fs.Transition("remote")), "current.id"),
            (fs.State("x"), "current.transition.to"),
        ]:
            r = http.post(EXECUTE, content=codec.encode_state_ctx(fs.StateCtx(current=bad)))
            assert r.status_code == 400
            assert error_of(r)[1].startswith(field + ":")


# ---------------------------------------------------------------------------------------------
# Connect JSON, as the web UI sends it


def test_ui_json_requests(store: fs.MemoryDriver) -> None:
    json_headers = {"content-type": "application/json", "connect-protocol-version": "1"}
    with client_for(store) as http:
        ctx = fs.StateCtx(current=fs.State("aTID", labels={"app": "ui"}))
        ctx.datas["note"] = fs.Data(b"hello", {})
        body = codec.encode_command(
            fs.commit(fs.store_data(ctx, "note"), fs.park(ctx)), json=True, dialect="proto3"
        )
        r = http.post(DRIVER + "Commit", content=body, headers=json_headers)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        committed = r.json()["stateCtxs"][0]["committed"]
        assert committed["annotations"]["flowstate.data.note"] == "1"

        r = http.post(
            DRIVER + "GetStates",
            content=b'{"getStates":{"sinceRev":"0","latestOnly":true,"limit":"100"}}',
            headers=json_headers,
        )
        assert r.status_code == 200
        states = r.json()["getStates"]["result"]["states"]
        assert [(s["id"], s["rev"]) for s in states] == [("aTID", "1")]

        ui_get_data = {
            "stateCtxs": [{"committed": states[0], "current": states[0]}],
            "getData": {"alias": "note", "stateRef": {}},
        }
        r = http.post(DRIVER + "GetData", content=json.dumps(ui_get_data), headers=json_headers)
        assert r.status_code == 200, r.text
        assert r.json()["stateCtxs"][0]["datas"]["note"]["blob"] == "hello"

        # JSON with parameters is JSON too (Go would read it as protobuf).
        r = http.post(
            DRIVER + "GetStates",
            content=b'{"getStates":{"limit":"1"}}',
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert len(r.json()["getStates"]["result"]["states"]) == 1


# ---------------------------------------------------------------------------------------------
# Status codes and error bodies


@pytest.mark.parametrize("as_json", [False, True])
def test_error_statuses_and_bodies(store: fs.MemoryDriver, as_json: bool) -> None:
    headers = {"content-type": "application/json" if as_json else "application/proto"}

    def post(method: str, cmd: fs.Command) -> httpx.Response:
        return http.post(
            DRIVER + method, content=codec.encode_command(cmd, json=as_json), headers=headers
        )

    with client_for(store) as http:
        a, b = fs.StateCtx(current=fs.State("aTID")), fs.StateCtx(current=fs.State("bTID"))
        assert post("Commit", fs.commit(fs.park(a), fs.park(b))).status_code == 200

        stale_a, stale_b = (
            fs.StateCtx(current=fs.State("aTID")),
            fs.StateCtx(current=fs.State("bTID")),
        )
        r = post("Commit", fs.commit(fs.park(stale_a), fs.park(stale_b)))
        assert r.status_code == 409
        assert r.headers["content-type"] == headers["content-type"]
        assert error_of(r) == ("aborted", "rev mismatch: aTID, bTID")

        r = post("GetStateByID", fs.get_state_by_id(fs.StateCtx(), "nope"))
        assert r.status_code == 404
        code, message = error_of(r)
        assert code == "not_found" and "state not found" in message

        r = post("GetStateByLabels", fs.get_state_by_labels(fs.StateCtx(), {"no": "such"}))
        assert (r.status_code, error_of(r)[0]) == (404, "not_found")

        r = post("GetStateByID", fs.get_state_by_id(fs.StateCtx(), ""))
        assert (r.status_code, error_of(r)) == (400, ("invalid_argument", "id: id is empty"))

        # Validation inside a commit is the client's fault too (Go answers 500 here).
        r = post("Commit", fs.commit(fs.transit(fs.StateCtx(current=fs.State("c")), "")))
        assert (r.status_code, error_of(r)) == (
            400,
            ("invalid_argument", "commands[0].to: flow id empty"),
        )

        r = post("GetStates", fs.commit(fs.park(a)))
        assert r.status_code == 400
        assert error_of(r)[1] == "command: GetStates expects a get_states command, got commit"

        r = post("GetData", fs.get_data(fs.StateCtx(), "x"))
        assert r.status_code == 400
        assert "flowstate.data.x" in error_of(r)[1]

        r = http.post(DRIVER + "Commit", content=b"", headers=headers)
        assert r.status_code == 400
        assert error_of(r)[0] == "invalid_argument"


def test_unknown_content_type_and_encoding_are_refused(store: fs.MemoryDriver) -> None:
    with client_for(store) as http:
        body = codec.encode_command(fs.get_states())
        r = http.post(DRIVER + "GetStates", content=body, headers={"content-type": "text/plain"})
        assert r.status_code == 415
        assert "unsupported content type 'text/plain'" in r.json()["message"]
        r = http.post(DRIVER + "GetStates", content=body, headers={"content-encoding": "br"})
        assert r.status_code == 415
        for ctype in ("application/proto", "application/x-protobuf", None):
            headers = {"content-type": ctype} if ctype else {}
            r = http.post(DRIVER + "GetStates", content=body, headers=headers)
            assert (r.status_code, r.headers["content-type"]) == (200, "application/proto")


def test_body_limit(store: fs.MemoryDriver) -> None:
    with client_for(store, max_body=1024) as http:
        r = http.post(DRIVER + "GetStates", content=b"\x00" * 1025)
        assert r.status_code == 413
        assert error_of(r) == (
            "resource_exhausted",
            "request body exceeds the limit of 1024 bytes",
        )

        def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
            for _ in range(64):
                yield b"\x00" * 64

        r = http.post(DRIVER + "GetStates", content=chunks())
        assert r.status_code == 413
        r = http.post(DRIVER + "GetStates", content=codec.encode_command(fs.get_states()))
        assert r.status_code == 200


def test_token_is_required_on_every_request(store: fs.MemoryDriver) -> None:
    with client_for(store, token="s3cret") as http:
        body = codec.encode_command(fs.get_states())
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = http.post(DRIVER + "GetStates", content=body, headers=headers)
            assert r.status_code == 401
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert error_of(r)[0] == "unauthenticated"
        assert http.get("/health").status_code == 401
        assert http.get("/").status_code == 200  # the UI page is public: it asks for the token
        assert http.get("/ui/api/info").status_code == 401
        assert http.post(EXECUTE, content=b"").status_code == 401

        auth = {"authorization": "Bearer s3cret"}
        assert http.post(DRIVER + "GetStates", content=body, headers=auth).status_code == 200
        assert http.get("/health", headers=auth).status_code == 200

    with pytest.raises(fs.ValidationError, match="token"):
        create_app(store, token="")


def test_cors_is_off_by_default(store: fs.MemoryDriver) -> None:
    with client_for(store) as http:
        r = http.post(
            DRIVER + "GetStates",
            content=codec.encode_command(fs.get_states()),
            headers={"origin": "http://evil.example"},
        )
        assert r.status_code == 403  # a foreign origin is refused (tests/test_server_guard.py)
        assert "access-control-allow-origin" not in r.headers
        r = http.options(
            DRIVER + "GetStates",
            headers={"origin": "http://evil.example", "access-control-request-method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers


def test_cors_allows_the_configured_origins(store: fs.MemoryDriver) -> None:
    with client_for(store, cors_origins=["http://ui.example"], token="t") as http:
        preflight = {
            "origin": "http://ui.example",
            "access-control-request-method": "POST",
            "access-control-request-headers": "content-type, authorization",
        }
        r = http.options(DRIVER + "GetStates", headers=preflight)  # no token on preflights
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.example"
        assert "POST" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-max-age"] == "600"

        r = http.options(DRIVER + "GetStates", headers={**preflight, "origin": "http://x.example"})
        assert r.headers.get("access-control-allow-origin") != "http://x.example"

        r = http.post(
            DRIVER + "GetStates",
            content=codec.encode_command(fs.get_states()),
            headers={"origin": "http://ui.example", "authorization": "Bearer t"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "http://ui.example"


def test_health_index_and_unknown_paths(store: fs.MemoryDriver) -> None:
    with client_for(store) as http:
        r = http.get("/health")
        assert (r.status_code, r.json()["status"]) == (200, "ok")
        r = http.get("/")
        assert r.status_code == 200 and "flowstate" in r.text
        r = http.get("/nothing/here")
        assert (r.status_code, r.text) == (404, "404 page not found")
        r = http.post(DRIVER + "NoSuchMethod", content=b"")
        assert r.status_code == 404
        assert http.get(DRIVER + "GetStates").status_code == 405


# ---------------------------------------------------------------------------------------------
# HTTP/2 without TLS


def test_h2c_prior_knowledge(store: fs.MemoryDriver) -> None:
    server = netserver.serve(store)
    with httpx.Client(base_url=server.url, http1=False, http2=True) as http:
        for _ in range(3):  # several streams on one connection
            r = http.post(DRIVER + "GetStates", content=codec.encode_command(fs.get_states()))
            assert (r.status_code, r.http_version) == (200, "HTTP/2")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl for an h2c upgrade")
def test_h2c_upgrade(store: fs.MemoryDriver) -> None:
    server = netserver.serve(store)
    out = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "--http2",
            server.url + "/health",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out == "2 200"


async def test_net_driver_over_h2c(store: fs.MemoryDriver) -> None:
    from flowstate.drivers.net import NetDriver

    server = netserver.serve(store)
    async with fs.Engine(NetDriver(server.url, http2=True), recovery=False, delayer=False) as e:
        ctx = fs.StateCtx(current=fs.State("h2"))
        for _ in range(5):
            await e.do(fs.commit(fs.park(ctx)))
        assert ctx.committed.rev == 5


# ---------------------------------------------------------------------------------------------
# Settings and serve()


def test_settings_defaults_are_local_and_durable() -> None:
    s = settings(env={})
    assert (s.store, s.addr, s.token, s.cors_origins) == (DEFAULT_STORE, "127.0.0.1:8080", None, ())
    assert s.http_host == "http://127.0.0.1:8080"


def test_settings_from_the_go_apps_environment(tmp_path: Path) -> None:
    assert settings(env={"FLOWSTATE_DRIVER": "memdriver"}).store == "memory://"
    pg = {"FLOWSTATE_DRIVER": "pgdriver", "FLOWSTATE_PGDRIVER_CONN_STRING": "postgres://u@h/db"}
    assert settings(env=pg).store == "postgres://u@h/db"
    badger = {"FLOWSTATE_DRIVER": "badgerdriver", "FLOWSTATE_BADGERDRIVER_PATH": str(tmp_path)}
    assert settings(env=badger).store == f"sqlite:///{tmp_path}/flowstate.db"
    in_memory = {"FLOWSTATE_DRIVER": "badgerdriver", "FLOWSTATE_BADGERDRIVER_IN_MEMORY": "true"}
    assert settings(env=in_memory).store == "memory://"
    with pytest.raises(fs.ValidationError, match="FLOWSTATE_DRIVER"):
        settings(env={"FLOWSTATE_DRIVER": "boltdriver"})
    with pytest.raises(fs.ValidationError, match="FLOWSTATE_PGDRIVER_CONN_STRING"):
        settings(env={"FLOWSTATE_DRIVER": "pgdriver"})

    s = settings(env={"FLOWSTATE_ADDR": "0:9090", "FLOWSTATE_HTTP_HOST": "http://me:9090"})
    assert (s.addr, s.http_host) == ("0:9090", "http://me:9090")
    assert parse_addr("0:9090") == ("0.0.0.0", 9090)
    assert parse_addr(":9090") == ("0.0.0.0", 9090)
    assert settings(env={"FLOWSTATE_ADDR": ":9091"}).http_host == "http://localhost:9091"

    env = {
        "FLOWSTATE_TOKEN": "tok",
        "FLOWSTATE_CORS_ORIGINS": "http://a, http://b",
        "FLOWSTATE_MAX_BODY": "1000",
        "FLOWSTATE_DRIVER": "memdriver",
        "FLOWSTATE_ADDR": "0:1",
    }
    s = settings(env=env)
    assert (s.token, s.cors_origins, s.max_body) == ("tok", ("http://a", "http://b"), 1000)
    # Explicit arguments win over the environment.
    s = settings("sqlite:///x.db", "127.0.0.1:7000", token="arg", cors_origins=["*"], env=env)
    assert (s.store, s.addr, s.token, s.cors_origins) == (
        "sqlite:///x.db",
        "127.0.0.1:7000",
        "arg",
        ("*",),
    )
    with pytest.raises(fs.ValidationError, match="addr"):
        settings(addr="nowhere", env={})
    with pytest.raises(fs.ValidationError, match="FLOWSTATE_MAX_BODY"):
        settings(env={"FLOWSTATE_MAX_BODY": "lots"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_runs_until_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "FLOWSTATE_ADDR": f"127.0.0.1:{port}",
        "FLOWSTATE_TOKEN": "tok",
    }
    store = f"sqlite:///{tmp_path / 'served.db'}"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from flowstate.server import serve; serve({store!r})"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(url + "/health", headers={"authorization": "Bearer tok"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                assert proc.poll() is None, "the server exited"
                time.sleep(0.05)
        assert r.status_code == 200
        ctx = fs.StateCtx(current=fs.State("served"))
        r = httpx.post(
            url + DRIVER + "Commit",
            content=codec.encode_command(fs.commit(fs.park(ctx))),
            headers={"authorization": "Bearer tok"},
        )
        assert r.status_code == 200
        assert httpx.get(url + "/health").status_code == 401
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    logs = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in logs]
    assert any(m.startswith("serving sqlite:///") and "token required" in m for m in messages)
    assert messages[-1] == "stopped"
    assert (tmp_path / "served.db").exists()


async def test_demo_orders_run_to_the_end() -> None:
    store = fs.MemoryDriver()
    sock = listen("127.0.0.1", 0)
    stop = asyncio.Event()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = asyncio.create_task(run_server(store, sock, http_host=url, demo=True, stop=stop))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not any(
            s.id.startswith("demo-order-") and fs.ended(s) for s in store._latest.values()
        ):
            assert loop.time() < deadline, "no demo order ended"
            assert not server.done(), server
            await asyncio.sleep(0.05)
        order = next(s for s in store._latest.values() if fs.ended(s))
        assert order.labels == {"app": "demo"}
        assert order.annotations.keys() >= {"received", "paid", "shipped"}
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/health")).status_code == 200
    finally:
        stop.set()
        await asyncio.wait_for(server, 60)
        sock.close()
