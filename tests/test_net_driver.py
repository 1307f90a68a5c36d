"""NetDriver specifics: error mapping, connection reuse, results copied back, watchers across
clients, an unreachable or misbehaving server, the token, and open_driver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.net import NetDriver
from flowstate.server import BackgroundServer, create_app
from tests import netserver


@contextlib.asynccontextmanager
async def engine_on(driver: fs.Driver) -> AsyncIterator[fs.Engine]:
    async with fs.Engine(driver, recovery=False, delayer=False) as engine:
        yield engine


async def test_conflicts_name_every_id_and_change_nothing() -> None:
    async with engine_on(netserver.net_driver(fs.MemoryDriver())) as engine:
        a, b, c = (fs.StateCtx(current=fs.State(i)) for i in ("a", "b", "c"))
        await engine.do(fs.commit(fs.park(a), fs.park(b)))
        stale_a, stale_b = fs.StateCtx(current=fs.State("a")), fs.StateCtx(current=fs.State("b"))
        with pytest.raises(fs.RevMismatchError) as caught:
            await engine.do(fs.commit(fs.park(stale_a), fs.park(c), fs.park(stale_b)))
        assert caught.value.ids == ["a", "b"]
        assert stale_a.committed.rev == 0 and c.committed.rev == 0  # nothing copied back
        with pytest.raises(fs.NotFoundError):
            await engine.do(fs.get_state_by_id(fs.StateCtx(), "c"))


async def test_not_found_errors() -> None:
    async with engine_on(netserver.net_driver(fs.MemoryDriver())) as engine:
        with pytest.raises(fs.NotFoundError, match="state not found; id=nope"):
            await engine.do(fs.get_state_by_id(fs.StateCtx(), "nope"))
        with pytest.raises(fs.NotFoundError):
            await engine.do(fs.get_state_by_labels(fs.StateCtx(), {"no": "such"}))
        ctx = fs.StateCtx(current=fs.State("d", annotations={"flowstate.data.x": "42"}))
        with pytest.raises(fs.DataNotFoundError) as caught:
            await engine.do(fs.get_data(ctx, "x"))
        assert caught.value.rev == 42
        with pytest.raises(fs.ValidationError) as invalid:
            await engine.driver.get_state("", 0)
        assert invalid.value.field == "id"


async def test_commit_results_are_copied_into_the_callers_objects() -> None:
    async with engine_on(netserver.net_driver(fs.MemoryDriver())) as engine:
        carrier = fs.StateCtx(current=fs.State("carrier"))
        stacked = fs.StateCtx(current=fs.State("stacked", labels={"k": "v"}))
        carrier.datas["blob"] = fs.Data(b"\x00\xffbinary", {"binary": "true"})
        delay = fs.delay(carrier, "later", timedelta(hours=1))
        await engine.do(
            fs.commit(
                fs.store_data(carrier, "blob"),
                fs.stack(carrier, stacked, "stacked"),
                fs.transit(carrier, "next"),
                delay,
            )
        )
        assert carrier.committed.rev == 1
        assert carrier.committed == carrier.current
        assert carrier.current.transition.to == "next"
        assert carrier.current.annotations["flowstate.data.blob"] == "1"
        assert carrier.current.annotations["stacked"]  # the serialised ctx
        assert carrier.datas["blob"].rev == 1 and carrier.datas["blob"].blob == b"\x00\xffbinary"
        assert carrier.transitions == []
        assert delay.result is not None
        assert delay.result.state.transition.to == "later"
        assert delay.result.offset == 1
        at = delay.result.execute_at - engine.clock.now()
        assert timedelta(minutes=59) < at <= timedelta(hours=1)

        target = fs.StateCtx()
        await engine.do(fs.commit(fs.unstack(carrier, target, "stacked"), fs.park(carrier)))
        assert target.current == stacked.current
        assert carrier.current.annotations["stacked"] == ""


async def test_one_connection_is_reused() -> None:
    peers: set[Any] = set()
    app = create_app(fs.MemoryDriver())

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            peers.add(tuple(scope["client"]))
        await app(scope, receive, send)

    server = BackgroundServer(recording)
    server.start()
    try:
        async with engine_on(NetDriver(server.url)) as engine:
            ctx = fs.StateCtx(current=fs.State("k"))
            for _ in range(50):
                await engine.do(fs.commit(fs.park(ctx)))
                await engine.do(fs.get_state_by_id(fs.StateCtx(), "k"))
        assert len(peers) == 1
    finally:
        server.stop()


async def test_a_watcher_sees_another_clients_commits() -> None:
    backing = fs.MemoryDriver()
    url = netserver.serve(backing).url
    async with engine_on(NetDriver(url)) as watching, engine_on(NetDriver(url)) as writing:
        async with watching.watch(fs.get_states({"w": "1"})) as watcher:
            ctx = fs.StateCtx(current=fs.State("w1", labels={"w": "1"}))
            for _ in range(3):
                await writing.do(fs.commit(fs.park(ctx)))
            revs = [(await asyncio.wait_for(anext(watcher), 10.0)).rev for _ in range(3)]
        assert revs == [1, 2, 3]


async def test_an_unreachable_server_is_unavailable() -> None:
    server = netserver.serve(fs.MemoryDriver())
    url = server.url
    server.stop()
    driver = NetDriver(url)
    await driver.open()
    try:
        with pytest.raises(fs.StoreUnavailableError):
            await driver.get_state("x", 0)
        with pytest.raises(fs.StoreUnavailableError):  # nothing was sent: not "unknown"
            await driver.commit(fs.commit(fs.park(fs.StateCtx(current=fs.State("x")))))
    finally:
        await driver.close()


async def test_a_connection_lost_mid_commit_is_an_unknown_outcome() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the request arrived; the answer never comes
        writer.close()

    tcp = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    driver = NetDriver(f"http://127.0.0.1:{port}")
    await driver.open()
    try:
        ctx = fs.StateCtx(current=fs.State("x"))
        with pytest.raises(fs.CommitUnknownError):
            await driver.commit(fs.commit(fs.park(ctx)))
        assert ctx.committed.rev == 0
        with pytest.raises(fs.StoreUnavailableError):
            await driver.get_state("x", 0)
    finally:
        await driver.close()
        tcp.close()
        await tcp.wait_closed()


async def test_token() -> None:
    url = netserver.serve(fs.MemoryDriver(), token="t0k").url
    async with engine_on(NetDriver(url, token="t0k")) as engine:
        await engine.do(fs.commit(fs.park(fs.StateCtx(current=fs.State("ok")))))
    async with engine_on(NetDriver(url, token="wrong")) as engine:
        with pytest.raises(fs.FlowstateError, match="unauthenticated: invalid bearer token"):
            await engine.do(fs.get_state_by_id(fs.StateCtx(), "ok"))


async def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWSTATE_TOKEN", "env-token")
    url = netserver.serve(fs.MemoryDriver(), token="env-token").url
    driver = fs.open_driver(url + "/")
    assert isinstance(driver, NetDriver)
    assert driver.url == url
    async with engine_on(driver) as engine:
        await engine.do(fs.commit(fs.park(fs.StateCtx(current=fs.State("env")))))


def test_bad_urls() -> None:
    for url in ("ftp://x", "http://", "localhost:8080"):
        with pytest.raises(fs.ValidationError):
            NetDriver(url)


async def test_a_path_prefix_is_kept() -> None:
    """A server behind a reverse proxy at /flowstate: every path keeps the prefix."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    inner = create_app(fs.MemoryDriver())
    server = BackgroundServer(Starlette(routes=[Mount("/flowstate", app=inner)]))
    server.start()
    try:
        async with engine_on(NetDriver(server.url + "/flowstate/")) as engine:
            ctx = fs.StateCtx(current=fs.State("prefixed"))
            await engine.do(fs.commit(fs.park(ctx)))
            assert ctx.committed.rev == 1
    finally:
        server.stop()


# --- the HTTP/1.1 client, against scripted servers ------------------------------------------

Handler = Any


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[str]:
    """A raw TCP server running ``handler(reader, writer)`` per connection; yields its URL."""
    tcp = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        tcp.close()
        await tcp.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


def state_answer(state_id: str = "x", rev: int = 3) -> bytes:
    from flowstate.commands import GetStateByIdCmd
    from flowstate.wire import codec

    state = fs.State(state_id, rev)
    ctx = fs.StateCtx(current=state, committed=state.copy())
    return codec.encode_command(GetStateByIdCmd(ctx, state_id, 0))


async def test_h1_request_shape_and_keep_alive() -> None:
    seen: list[bytes] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head, _body = await read_request(reader)
                seen.append(head)
                answer = state_answer()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/proto\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer)
                )

    async with scripted(handler) as url:
        driver = NetDriver(url + "/prefix/", token="s3cret")
        await driver.open()
        try:
            for _ in range(3):
                assert (await driver.get_state("x", 0)).rev == 3
        finally:
            await driver.close()
    assert connections == 1
    lines = seen[0].split(b"\r\n")
    assert lines[0] == b"POST /prefix/flowstate.v1.Driver/GetStateByID HTTP/1.1"
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:-2])}
    assert headers[b"host"] == url.removeprefix("http://").encode()
    assert headers[b"content-type"] == b"application/proto"
    assert headers[b"authorization"] == b"Bearer s3cret"


@pytest.mark.parametrize("framing", ["chunked", "chunked-split", "close", "informational", "split"])
async def test_h1_answer_framings(framing: str) -> None:
    answer = state_answer(rev=7)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await read_request(reader)
                if framing.startswith("chunked"):
                    half = len(answer) // 2
                    data = (
                        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                        b"%x;ext=1\r\n%s\r\n%x\r\n%s\r\n0\r\n%s\r\n"
                        % (
                            half,
                            answer[:half],
                            len(answer) - half,
                            answer[half:],
                            b"x-trailer: 1\r\n" if framing == "chunked-split" else b"",
                        )
                    )
                    step = 3 if framing == "chunked-split" else len(data)
                    for i in range(0, len(data), step):
                        writer.write(data[i : i + step])
                        await writer.drain()
                        await asyncio.sleep(0)
                elif framing == "close":
                    writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + answer)
                    await writer.drain()
                    writer.close()
                    return
                elif framing == "informational":
                    writer.write(
                        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"
                        b"content-length: %d\r\n\r\n%s" % (len(answer), answer)
                    )
                else:  # the answer in small pieces
                    data = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (
                        len(answer),
                        answer,
                    )
                    for i in range(0, len(data), 5):
                        writer.write(data[i : i + 5])
                        await writer.drain()
                        await asyncio.sleep(0)

    async with scripted(handler) as url:
        driver = NetDriver(url)
        await driver.open()
        try:
            for _ in range(2):  # the second call reuses or replaces the connection
                assert (await driver.get_state("x", 0)).rev == 7
        finally:
            await driver.close()


async def test_h1_idle_connection_closed_by_the_server_is_not_reused() -> None:
    """A keep-alive connection the server closed while idle: the next commit opens a new one
    instead of failing with an unknown outcome."""
    from flowstate.commands import CommitCmd, TransitCmd
    from flowstate.wire import codec

    state = fs.State("c", 1, transition=fs.Transition("next"))
    ctx = fs.StateCtx(current=state, committed=state.copy())
    answer = codec.encode_command(CommitCmd([TransitCmd(ctx, "next")]))

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
            await writer.drain()
            writer.close()  # keep-alive promised, then closed while idle

    async with scripted(handler) as url:
        driver = NetDriver(url)
        await driver.open()
        try:
            for _ in range(3):
                mine = fs.StateCtx(current=fs.State("c"))
                await driver.commit(fs.commit(fs.transit(mine, "next")))
                assert mine.committed.rev == 1
                await asyncio.sleep(0.05)  # the close arrives while the connection is idle
        finally:
            await driver.close()


async def test_h1_timeouts() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
            await asyncio.sleep(10)

    async with scripted(silent) as url:
        driver = NetDriver(url, timeout=0.2)
        await driver.open()
        try:
            with pytest.raises(fs.StoreUnavailableError, match="no answer within"):
                await driver.get_state("x", 0)  # retried once, then unavailable
            ctx = fs.StateCtx(current=fs.State("x"))
            with pytest.raises(fs.CommitUnknownError, match="no answer within"):
                await driver.commit(fs.commit(fs.park(ctx)))
            assert ctx.committed.rev == 0
        finally:
            await driver.close()


async def test_h1_malformed_answers_are_lost_connections() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await read_request(reader)
            writer.write(b"SPDY/9 what\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(1)

    async with scripted(garbage) as url:
        driver = NetDriver(url)
        await driver.open()
        try:
            with pytest.raises(fs.StoreUnavailableError, match=r"not an HTTP/1\.1 answer"):
                await driver.get_state("x", 0)
            with pytest.raises(fs.CommitUnknownError):
                await driver.commit(fs.commit(fs.park(fs.StateCtx(current=fs.State("x")))))
        finally:
            await driver.close()


async def test_h1_error_answers_are_mapped() -> None:
    from flowstate.wire import codec

    bodies = [
        (409, "application/proto", codec.encode_error("aborted", "rev mismatch: a, b")),
        (404, "application/json", codec.encode_error("not_found", "state not found", json=True)),
        (502, "text/html", b"<html>bad gateway</html>"),
    ]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            for status, ctype, body in bodies:
                await read_request(reader)
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                    % (status, ctype.encode(), len(body), body)
                )

    async with scripted(handler) as url:
        driver = NetDriver(url)
        await driver.open()
        try:
            with pytest.raises(fs.RevMismatchError) as caught:
                await driver.get_state("x", 0)
            assert caught.value.ids == ["a", "b"]
            with pytest.raises(fs.NotFoundError):
                await driver.get_state("x", 0)
            with pytest.raises(fs.FlowstateError, match="response status code: 502"):
                await driver.get_state("x", 0)
        finally:
            await driver.close()


async def test_h1_cancelled_call_drops_its_connection() -> None:
    answered = asyncio.Event()
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first = connections == 1
        answer = state_answer(rev=5)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await read_request(reader)
                if first:
                    await answered.wait()  # too late: the caller was cancelled
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer)
                )

    async with scripted(handler) as url:
        driver = NetDriver(url)
        await driver.open()
        try:
            call = asyncio.ensure_future(driver.get_state("x", 0))
            await asyncio.sleep(0.1)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            answered.set()
            assert (await driver.get_state("x", 0)).rev == 5  # on a fresh connection
            assert connections == 2
        finally:
            await driver.close()


async def test_h1_concurrent_callers_beyond_the_pool_limit() -> None:
    url = netserver.serve(fs.MemoryDriver()).url
    driver = NetDriver(url)
    async with engine_on(driver) as engine:
        pool = driver._h1()
        pool.limit = 3
        ctxs = [fs.StateCtx(current=fs.State(f"p{i}")) for i in range(12)]
        await asyncio.gather(*(engine.do(fs.commit(fs.park(c))) for c in ctxs))
        assert all(c.committed.rev > 0 for c in ctxs)
        assert pool.open <= 3


async def test_http2_still_works() -> None:
    url = netserver.serve(fs.MemoryDriver()).url
    async with engine_on(NetDriver(url, http2=True)) as engine:
        ctx = fs.StateCtx(current=fs.State("h2"))
        await engine.do(fs.commit(fs.park(ctx)))
        assert ctx.committed.rev == 1
        with pytest.raises(fs.NotFoundError):
            await engine.do(fs.get_state_by_id(fs.StateCtx(), "nope"))
