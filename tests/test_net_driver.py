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
