"""Remote flows (wire.md §8): advertisement through the store, proxies, and a flow that hops
between two server processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flowstate as fs
from flowstate.drivers.net import NetDriver
from flowstate.netflow import (
    ACTION,
    HTTP_HOST,
    REMOTE,
    TRANSITION_ID,
    TYPE_LABEL,
    NetFlowRegistry,
    RemoteFlow,
    flow_state_id,
)
from tests import netserver

ROOT = Path(__file__).resolve().parent.parent
HOST = ROOT / "tests" / "procs" / "netflow_host.py"
TIMEOUT = 30.0


async def wait_for(condition: Callable[[], object], timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail("condition not met within the timeout")
        await asyncio.sleep(0.02)


async def noop_flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.noop()


# ---------------------------------------------------------------------------------------------
# Advertisement and following, in one process


async def test_set_flow_advertises_in_the_store() -> None:
    driver = fs.MemoryDriver()
    registry = NetFlowRegistry("http://a.example:8080/", driver)
    registry.set_flow("f", noop_flow)
    async with registry:
        state = await driver.get_state(flow_state_id("f"), 0)
    assert state.id == "flowstate.flow.f"
    assert state.labels == {TYPE_LABEL: REMOTE}
    assert state.annotations == {
        TRANSITION_ID: "f",
        HTTP_HOST: "http://a.example:8080",
        ACTION: "set",
    }
    assert fs.parked(state)


async def test_other_registries_follow_advertisements_and_withdrawals() -> None:
    driver = fs.MemoryDriver()
    a = NetFlowRegistry("http://a:1", driver)
    b = NetFlowRegistry("http://b:2", driver, remote_hosts=["a"])  # a is not loopback
    async with a, b:
        a.set_flow("f", noop_flow)
        await wait_for(lambda: b.remote_hosts() == {"f": "http://a:1"})
        proxy = b.get_flow("f")
        assert isinstance(proxy.__self__, RemoteFlow)  # type: ignore[attr-defined]
        assert a.remote_hosts() == {}  # its own flow stays local

        a.unset_flow("f")
        await wait_for(lambda: b.remote_hosts() == {})
        state = await driver.get_state(flow_state_id("f"), 0)
        assert state.annotations[ACTION] == "unset"
        with pytest.raises(fs.FlowNotFoundError):
            await b.lookup("f")

        a.set_flow("f", noop_flow)  # set after unset flips the action back (Go does not)
        await wait_for(lambda: b.remote_hosts() == {"f": "http://a:1"})
        state = await driver.get_state(flow_state_id("f"), 0)
        assert state.annotations[ACTION] == "set"


async def test_lookup_reads_an_advertisement_not_followed_yet() -> None:
    driver = fs.MemoryDriver()
    await driver.open()
    ctx = fs.StateCtx(current=fs.State(flow_state_id("g"), labels={TYPE_LABEL: REMOTE}))
    ctx.current.annotations.update({TRANSITION_ID: "g", HTTP_HOST: "http://c:3", ACTION: "set"})
    await driver.commit(fs.commit(fs.park(ctx)))
    registry = NetFlowRegistry("http://b:2", driver, remote_hosts=["c:3"])
    registry._started = True  # looked up without the follower running
    flow = await registry.lookup("g")
    assert isinstance(flow.__self__, RemoteFlow)  # type: ignore[attr-defined]
    assert registry.remote_hosts() == {"g": "http://c:3"}
    with pytest.raises(fs.FlowNotFoundError):
        await registry.lookup("unknown")


async def test_a_local_flow_wins_over_a_remote_advertisement() -> None:
    driver = fs.MemoryDriver()
    a = NetFlowRegistry("http://a:1", driver)
    b = NetFlowRegistry("http://b:2", driver, remote_hosts=["a"])
    b.set_flow("f", noop_flow)
    async with b, a:
        a.set_flow("f", noop_flow)  # a advertises last: the store names a
        await wait_for(lambda: _host_of(driver, "f") == "http://a:1")
        await asyncio.sleep(0)
        assert b.remote_hosts() == {}
        assert b.get_flow("f") is not None


def _host_of(driver: fs.MemoryDriver, flow_id: str) -> str:
    state = driver._latest.get(flow_state_id(flow_id))
    return state.annotations.get(HTTP_HOST, "") if state is not None else ""


async def test_unset_of_an_unknown_flow_is_a_noop() -> None:
    registry = NetFlowRegistry("http://a:1", fs.MemoryDriver())
    async with registry:
        registry.unset_flow("never-registered")


async def test_remote_flow_hands_the_state_to_the_host() -> None:
    """engine (client) -> proxy -> the host's Flow service -> the host's engine runs the flow."""
    store = fs.MemoryDriver()
    ran = threading.Event()  # set on the server's thread
    seen: list[str] = []

    host_registry = fs.FlowRegistry()

    async def hosted(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        seen.append(ctx.current.id)
        ran.set()
        return fs.commit(fs.end(ctx))

    host_registry.set_flow("hosted", hosted)
    server = netserver.serve(store, flows=host_registry)
    client_store = NetDriver(server.url)
    registry = NetFlowRegistry("http://client:9", client_store)
    async with registry:
        adv = fs.StateCtx(current=fs.State(flow_state_id("hosted"), labels={TYPE_LABEL: REMOTE}))
        adv.current.annotations.update(
            {TRANSITION_ID: "hosted", HTTP_HOST: server.url, ACTION: "set"}
        )
        await client_store.commit(fs.commit(fs.park(adv)))
        async with fs.Engine(client_store, registry, recovery=False, delayer=False) as engine:
            ctx = fs.StateCtx(current=fs.State("job"))
            await engine.do(fs.commit(fs.transit(ctx, "hosted")))
            await engine.execute(ctx)  # ends locally once the host accepted the state
            await wait_for(ran.is_set)
            final = fs.StateCtx()
            for _ in range(int(TIMEOUT / 0.02)):
                await engine.do(fs.get_state_by_id(final, "job"))
                if fs.ended(final.current):
                    break
                await asyncio.sleep(0.02)
            assert fs.ended(final.current)
    assert seen == ["job"]


async def test_remote_flow_reports_the_hosts_error() -> None:
    server = netserver.serve(fs.MemoryDriver())  # hosts no flows
    registry = NetFlowRegistry("http://client:9", fs.MemoryDriver())
    async with registry:
        proxy = registry._proxy(server.url)
        ctx = fs.StateCtx(current=fs.State("x", transition=fs.Transition("missing")))
        with pytest.raises(fs.FlowNotFoundError):
            await proxy.execute(ctx, None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Two server processes


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Callable[[str, str, str, str], str]]:
    procs: list[subprocess.Popen[str]] = []

    def start(store: str, name: str, flow_id: str, next_flow: str) -> str:
        proc = subprocess.Popen(
            [sys.executable, str(HOST), store, name, flow_id, next_flow],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        procs.append(proc)
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://"), f"host {name} did not start"
        return url

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_flow_hops_between_two_server_processes(
    backend: str, tmp_path: Path, hosts: Callable[[str, str, str, str], str]
) -> None:
    if backend == "sqlite":
        store = f"sqlite:///{tmp_path / 'shared.db'}"
    else:
        from tests import pgutil

        pgutil.require()
        store = pgutil.dsn_for(pgutil.new_schema())
    url_a = hosts(store, "A", "hop.a", "hop.b")
    url_b = hosts(store, "B", "hop.b", "hop.a")

    driver = fs.open_driver(store)
    registry = NetFlowRegistry("http://127.0.0.1:1", driver)  # hosts nothing itself
    async with registry, fs.Engine(driver, registry, recovery=False, delayer=False) as engine:
        await wait_for(lambda: set(registry.remote_hosts()) == {"hop.a", "hop.b"})
        assert registry.remote_hosts() == {"hop.a": url_a, "hop.b": url_b}

        ctx = fs.StateCtx(current=fs.State("traveller", annotations={"max_hops": "6"}))
        await engine.do(fs.commit(fs.transit(ctx, "hop.a")), fs.execute(ctx))

        final = fs.StateCtx()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT
        while True:
            await engine.do(fs.get_state_by_id(final, "traveller"))
            if fs.ended(final.current) or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert fs.ended(final.current), final.current
        hops = {k: v for k, v in final.current.annotations.items() if k.startswith("hop.")}
        assert hops == {f"hop.{n}": "AB"[(n - 1) % 2] for n in range(1, 7)}

        history = fs.get_states(labels=None, since_rev=0, limit=1000)
        await engine.do(history)
        assert history.result is not None
        flows = [s.transition.to for s in history.result.states if s.id == "traveller"]
        assert flows == ["hop.a", "hop.b", "hop.a", "hop.b", "hop.a", "hop.b", ""]
