"""The HTTP stack under the server: one h2c connection carries many streams, and a request
answered before its body was read (401, 413, 404, 405, 400) ends only its own stream, never
the connection and the other requests on it (issue 14, item 4)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import flowstate as fs
from flowstate.drivers.net import NetDriver
from flowstate.server import BackgroundServer, create_app
from flowstate.server.run import H2_PREFACE, STACKS, first_protocol
from flowstate.wire import codec

DRIVER = "/flowstate.v1.Driver/"
SMALL = 200  # concurrent small requests beside the refused one


@pytest.fixture(params=STACKS)
def stack(request: pytest.FixtureRequest) -> str:
    """Every stack the server can run: the default and hypercorn alone."""
    return str(request.param)


@pytest.fixture
def serve(stack: str) -> Iterator[object]:
    servers: list[BackgroundServer] = []

    def start(driver: fs.Driver, **options: object) -> BackgroundServer:
        server = BackgroundServer(create_app(driver, **options), stack=stack)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def _commit_body(i: int) -> bytes:
    return codec.encode_command(fs.commit(fs.park(fs.StateCtx(current=fs.State(f"h2-{i}")))))


async def _burst(
    url: str, refused: tuple[str, str, dict[str, str], bytes], auth: dict[str, str]
) -> tuple[list[int], int]:
    """SMALL commits and one refused request, all at once on one h2c connection."""
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(
        base_url=url, http1=False, http2=True, limits=limits, timeout=60.0
    ) as http:
        method, path, headers, body = refused

        async def small(i: int) -> int:
            r = await http.post(DRIVER + "Commit", content=_commit_body(i), headers=auth)
            assert r.http_version == "HTTP/2"
            return r.status_code

        async def bad() -> int:
            await asyncio.sleep(0)
            r = await http.request(method, path, content=body, headers=headers)
            return r.status_code

        results = await asyncio.gather(
            *(small(i) for i in range(SMALL // 2)),
            bad(),
            *(small(i) for i in range(SMALL // 2, SMALL)),
        )
        refused_status = results[SMALL // 2]
        oks = list(results[: SMALL // 2]) + list(results[SMALL // 2 + 1 :])
        # the connection still serves afterwards
        r = await http.post(
            DRIVER + "GetStates", content=codec.encode_command(fs.get_states()), headers=auth
        )
        oks.append(r.status_code)
        return oks, refused_status


# Over the 16 KiB cap below, and within one h2 flow-control window (65,535 bytes): httpcore's h2
# client can stall a body larger than its window when many streams share the connection (it
# also did with bodies the server read in full), which would make these tests flaky for a
# reason of the client's. The server's part for larger bodies (the stream window opened
# again, see run._fix_hypercorn_h2) is in test_a_large_refused_body_does_not_stall_h2.
BIG = b"\x00" * 60_000
CAP = 16 * 1024


@pytest.mark.parametrize(
    ("refused", "status"),
    [
        (("POST", DRIVER + "Commit", {}, BIG), 413),
        (("POST", DRIVER + "Commit", {"content-type": "text/plain"}, BIG[:1000]), 415),
        (("POST", DRIVER + "NoSuchMethod", {}, BIG[:10_000]), 404),
        (("PUT", DRIVER + "Commit", {}, BIG[:10_000]), 405),
        (("POST", "/nothing/here", {}, BIG[:10_000]), 404),
        (("POST", DRIVER + "Commit", {}, b"\xff" * 10_000), 400),
    ],
    ids=["413", "415", "404-method", "405", "404-path", "400"],
)
async def test_an_early_refusal_ends_only_its_own_h2_stream(
    refused: tuple[str, str, dict[str, str], bytes], status: int, serve: Any
) -> None:
    server = serve(fs.MemoryDriver(), max_body=CAP)
    oks, got = await _burst(server.url, refused, {})
    assert got == status
    assert oks == [200] * (SMALL + 1)


async def test_a_refused_token_ends_only_its_own_h2_stream(serve: Any) -> None:
    server = serve(fs.MemoryDriver(), token="t")
    auth = {"authorization": "Bearer t"}
    refused = ("POST", DRIVER + "Commit", {"authorization": "Bearer wrong"}, BIG[:40_000])
    oks, got = await _burst(server.url, refused, auth)
    assert got == 401
    assert oks == [200] * (SMALL + 1)


async def test_net_driver_h2_commits_survive_an_oversize_commit(serve: Any) -> None:
    """The report of issue 14: one oversize commit among many concurrent small ones over
    ``NetDriver(http2=True)`` must fail alone (413), not turn the others into
    CommitUnknownError."""
    server = serve(fs.MemoryDriver(), max_body=CAP)
    net = NetDriver(server.url, http2=True)
    async with fs.Engine(net, recovery=False, delayer=False) as engine:

        async def small(i: int) -> None:
            await engine.do(fs.commit(fs.park(fs.StateCtx(current=fs.State(f"s{i}")))))

        async def big() -> None:
            ctx = fs.StateCtx(current=fs.State("big", annotations={"blob": "x" * 40_000}))
            await engine.do(fs.commit(fs.park(ctx)))

        results = await asyncio.gather(
            *(small(i) for i in range(150)),
            big(),
            *(small(i) for i in range(150, 300)),
            return_exceptions=True,
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1, failed[:3]
    assert not isinstance(failed[0], fs.CommitUnknownError), failed[0]


# ---------------------------------------------------------------------------------------------
# One port, two protocols


def test_first_bytes_choose_the_protocol() -> None:
    assert first_protocol(H2_PREFACE + b"\x00\x00") == "h2"
    assert first_protocol(H2_PREFACE) == "h2"
    for cut in (1, 3, 10, len(H2_PREFACE) - 1):
        assert first_protocol(H2_PREFACE[:cut]) is None  # not yet known
    assert first_protocol(b"POST /flowstate.v1.Driver/Commit HTTP/1.1\r\nHost: x\r\n") is None
    assert first_protocol(b"POST / HTTP/1.1\r\nHost: x\r\n\r\nbody") == "h1"
    assert first_protocol(b"PUT / HTTP/1.1\r\n\r\n") == "h1"
    upgrade = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    assert (
        first_protocol(upgrade + b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
        == "h2"
    )
    assert first_protocol(upgrade + b"UPGRADE:  websocket, H2C\r\n\r\n") == "h2"
    assert first_protocol(b"GET /h2c HTTP/1.1\r\nX-Note: h2c\r\n\r\n") == "h1"
    assert first_protocol(b"GET / HTTP/1.1\r\nX: " + b"a" * 70_000) == "h1"  # too long to wait


async def test_http1_and_h2c_clients_share_the_port(serve: Any) -> None:
    server = serve(fs.MemoryDriver())

    async def client(http2: bool, n: int) -> set[str]:
        versions = set()
        async with httpx.AsyncClient(
            base_url=server.url, http1=not http2, http2=http2, timeout=60.0
        ) as http:
            for i in range(n):
                r = await http.post(
                    DRIVER + "Commit", content=_commit_body(i + (1000 if http2 else 0))
                )
                assert r.status_code == 200
                versions.add(r.http_version)
            r = await http.get("/health")
            assert r.status_code == 200 and r.json()["head_rev"] >= n
        return versions

    h1, h2 = await asyncio.gather(client(False, 50), client(True, 50))
    assert (h1, h2) == ({"HTTP/1.1"}, {"HTTP/2"})


class SlowCommits(fs.MemoryDriver):
    """Commits wait until released, so that a shutdown finds them in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    async def commit(self, cmd: fs.CommitCmd) -> None:  # type: ignore[override]
        self.entered.release()
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        await super().commit(cmd)


async def test_shutdown_lets_requests_in_flight_finish(serve: Any) -> None:
    """Graceful shutdown (docs/server.md): a commit in flight on HTTP/1.1 and one on h2c both
    get their answer; idle keep-alive connections do not hold the shutdown up; afterwards the
    port refuses."""
    store = SlowCommits()
    server = serve(store)
    loop = asyncio.get_running_loop()
    async with (
        httpx.AsyncClient(base_url=server.url, timeout=60.0) as h1,
        httpx.AsyncClient(base_url=server.url, http1=False, http2=True, timeout=60.0) as h2,
        httpx.AsyncClient(base_url=server.url, timeout=60.0) as idle,
    ):
        assert (await idle.get("/health")).status_code == 200  # an idle keep-alive connection
        calls = [
            asyncio.ensure_future(http.post(DRIVER + "Commit", content=_commit_body(i)))
            for i, http in enumerate((h1, h2))
        ]
        for _ in calls:
            assert await loop.run_in_executor(None, store.entered.acquire, True, 30)
        stopping = loop.run_in_executor(None, server.stop)
        await asyncio.sleep(0.3)  # the server is now shutting down with both commits in flight
        store.release.set()
        answers = await asyncio.gather(*calls)
        assert [(r.status_code, r.http_version) for r in answers] == [
            (200, "HTTP/1.1"),
            (200, "HTTP/2"),
        ]
        await stopping
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/health")


def test_an_oversized_request_head_is_refused(serve: Any) -> None:
    """httptools has no limit of its own on a request head: over 64 KiB is a 400 and the end
    of that connection; the server goes on serving."""
    server = serve(fs.MemoryDriver())
    body = codec.encode_command(fs.get_states())
    with httpx.Client(base_url=server.url, timeout=30.0) as http:
        assert http.post(DRIVER + "GetStates", content=body).status_code == 200
        r = http.post(DRIVER + "GetStates", content=body, headers={"x-big": "a" * 100_000})
        assert r.status_code in (400, 431)  # uvicorn: 400, hypercorn: 431
        many = {f"x-{i}": "b" * 90 for i in range(1000)}
        r = http.post(DRIVER + "GetStates", content=body, headers=many)
        assert r.status_code in (400, 431)  # uvicorn: 400, hypercorn: 431
        assert http.post(DRIVER + "GetStates", content=body).status_code == 200


def test_a_connection_that_never_tells_its_protocol_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection that sends nothing (or too little to tell HTTP/1.1 from HTTP/2) is closed
    after FIRST_BYTES_TIMEOUT, as an idle keep-alive connection would be."""
    from flowstate.server import run

    monkeypatch.setattr(run, "FIRST_BYTES_TIMEOUT", 0.2)
    server = BackgroundServer(create_app(fs.MemoryDriver()), stack="uvicorn")
    server.start()
    try:
        host, port = server.url.removeprefix("http://").split(":")
        for first in (b"", b"GET / HTTP/1.1\r\nHost: x\r\n"):
            with socket.create_connection((host, int(port)), timeout=30) as conn:
                conn.sendall(first)
                assert conn.recv(1024) == b""  # closed by the server, without an answer
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()


def test_a_large_refused_body_does_not_stall_h2(serve: Any) -> None:
    """A 1 MiB body refused with 413 at once, over an h2 client of our own (the h2 library
    directly, sending as the flow-control windows allow): the server keeps giving the refused
    stream window until the client has sent it all, the commit beside it succeeds, and the
    connection serves another request afterwards."""
    import h2.config
    import h2.connection
    import h2.events

    server = serve(fs.MemoryDriver(), max_body=CAP)
    host, port = server.url.removeprefix("http://").split(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    statuses: dict[int, int] = {}
    ended: set[int] = set()

    def headers(length: int) -> list[tuple[str, str]]:
        return [
            (":method", "POST"),
            (":path", DRIVER + "Commit"),
            (":scheme", "http"),
            (":authority", f"{host}:{port}"),
            ("content-length", str(length)),
        ]

    with socket.create_connection((host, int(port)), timeout=30) as sock:

        def pump() -> None:
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            assert data, "the server closed the connection"
            for event in conn.receive_data(data):
                assert not isinstance(event, h2.events.StreamReset | h2.events.ConnectionTerminated)
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)

        conn.initiate_connection()
        big, body, sent = 1, b"\x00" * 2**20, 0
        conn.send_headers(big, headers(len(body)))
        small = 3
        commit = _commit_body(1)
        conn.send_headers(small, headers(len(commit)))
        conn.send_data(small, commit, end_stream=True)
        while sent < len(body) or not {big, small} <= ended:
            while sent < len(body):
                window = min(conn.local_flow_control_window(big), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = body[sent : sent + window]
                sent += len(chunk)
                conn.send_data(big, chunk, end_stream=sent == len(body))
            sock.sendall(conn.data_to_send())
            if sent == len(body) and {big, small} <= ended:
                break
            pump()
        assert statuses == {big: 413, small: 200}

        again = 5
        conn.send_headers(again, headers(len(_commit_body(2))))
        conn.send_data(again, _commit_body(2), end_stream=True)
        while again not in ended:
            pump()
        assert statuses[again] == 200


class _Unopenable(fs.MemoryDriver):
    async def open(self) -> None:
        raise fs.StoreUnavailableError("no store today")


def test_start_returns_once_the_app_has_started() -> None:
    """On the default stack BackgroundServer.start() returns when the app's startup (the store
    opened) is done, and raises, as an exception rather than uvicorn's exit, when that startup
    fails. (hypercorn alone reports ready as soon as it runs, as before.)"""
    stack = "uvicorn"
    opened = threading.Event()

    class Recorded(fs.MemoryDriver):
        async def open(self) -> None:
            await asyncio.sleep(0.2)  # a store that takes a while to open
            await super().open()
            opened.set()

    server = BackgroundServer(create_app(Recorded()), stack=stack)
    server.start()
    try:
        assert opened.is_set()
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.stop()
    failing = BackgroundServer(create_app(_Unopenable()), stack=stack)
    with pytest.raises(RuntimeError, match="startup failed"):
        failing.start()
    failing.stop()
