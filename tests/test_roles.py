"""The role state machine (roles.py) on every driver: every change of role resets the worker's
in-memory state, and a standby reads the store a bounded number of times per tick."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import flowstate as fs
from flowstate import recovery
from flowstate.roles import ACTIVE, ROLE, RoleState, RoleWorker
from tests.workers import Cluster, cluster, die, latest, ticks, until

RETRY = recovery.DEFAULT_RETRY_AFTER.total_seconds()


class Probe(RoleWorker):
    """A worker that remembers something while active and records every reset."""

    name = "probe"

    def __init__(self, engine: fs.Engine) -> None:
        super().__init__(engine, "flowstate.test.probe", interval=10.0, takeover_after=60.0)
        self.memory: set[str] = set()
        self.resets: list[RoleState] = []

    async def tick(self) -> None:
        await self.role.check(has_work=True)
        if self.role.active:
            self.memory.add("work in progress")

    def _reset(self) -> None:
        self.resets.append(self.role.state)
        self.memory.clear()

    def _progress(self) -> dict[str, str]:
        return {}


async def probes(c: Cluster, n: int) -> list[Probe]:
    out = []
    for _ in range(n):
        engine = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        probe = Probe(engine)
        await probe.start()
        out.append(probe)
    return out


async def steal(engine: fs.Engine, meta_id: str) -> None:
    """Another process commits the meta state with state=active (as a claim would)."""
    ctx = fs.StateCtx()
    await engine.do(fs.get_state_by_id(ctx, meta_id))
    await engine.do(fs.commit(fs.park(ctx, {ROLE: ACTIVE})))


async def test_losing_the_role_to_another_process_resets_the_worker(
    store: Callable[[], fs.Driver],
) -> None:
    async with cluster(store) as c:
        a, b = await probes(c, 2)
        try:
            assert a.role.state is RoleState.ACTIVE and b.role.state is RoleState.STANDBY
            await ticks(c.clock, a)
            assert a.memory
            resets = len(a.resets)
            await steal(b.engine, a.role.meta_id)
            await ticks(c.clock, a)
            assert a.role.state is RoleState.STANDBY
            assert a.resets[resets:] == [RoleState.STANDBY], "stepped down without a reset"
            assert not a.memory
        finally:
            for p in (a, b):
                await p.shutdown()


async def test_a_conflicting_write_steps_down_and_resets(store: Callable[[], fs.Driver]) -> None:
    async with cluster(store) as c:
        (a,) = await probes(c, 1)
        try:
            die(a)  # no ticks: the write below meets the conflict, not the check
            a.memory.add("x")
            await steal(a.engine, a.role.meta_id)
            assert not await a.role.write({"k": "v"})
            assert a.role.state is RoleState.STANDBY
            assert a.resets[-1] is RoleState.STANDBY and not a.memory
        finally:
            await a.shutdown()


async def test_claiming_a_released_role_resets_the_worker(store: Callable[[], fs.Driver]) -> None:
    async with cluster(store) as c:
        a, b = await probes(c, 2)
        try:
            b.memory.add("stale from a former life")
            await a.shutdown()
            assert a.role.state is RoleState.RELEASED
            await ticks(c.clock, b)
            assert b.role.state is RoleState.ACTIVE
            assert RoleState.ACTIVE in b.resets
            meta = await latest(b.engine, b.role.meta_id)
            assert meta.transition.annotations == {ROLE: ACTIVE}
        finally:
            await b.shutdown()


async def test_a_stepped_down_recoverer_forgets_what_it_tracked(
    store: Callable[[], fs.Driver],
) -> None:
    """The recoverer case of the rule: tracked states of the former role are dropped."""
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        b = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None and b.recoverer is not None
        ctx = fs.StateCtx(current=fs.State(id="pending"))
        await a.do(fs.commit(fs.transit(ctx, "work")))
        await ticks(c.clock, a.recoverer)
        assert a.recoverer.stats().tracked == 1
        die(a.recoverer)
        c.clock.advance(b.recoverer.takeover_after + RETRY)
        await ticks(c.clock, b.recoverer, 3)
        assert b.recoverer.stats().active
        await a.recoverer.tick()  # a wakes up and sees b's claim
        stats = a.recoverer.stats()
        assert not stats.active
        assert stats.tracked == 0, "a standby kept the tracked states of its active past"


class ReadCounter:
    """Counts the store reads an engine issues (whatever its driver)."""

    READS = (fs.GetStateByIdCmd, fs.GetStatesCmd, fs.GetDelayedStatesCmd)

    def __init__(self, engine: fs.Engine) -> None:
        self.reads = 0
        inner = engine.do

        async def do(*cmds: Any) -> None:
            self.reads += sum(1 for cmd in cmds if isinstance(cmd, self.READS))
            await inner(*cmds)

        engine.do = do  # type: ignore[method-assign]


async def test_a_standby_reads_the_store_a_bounded_number_of_times(
    store: Callable[[], fs.Driver],
) -> None:
    """Standby recoverer: one meta read and one page of the log per tick, however much the
    log grew, and nothing while its clock stands still (no spin)."""
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        b = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None and b.recoverer is not None
        assert not b.recoverer.stats().active
        for batch in range(10):  # five pages of log to follow
            ctxs = [fs.StateCtx(current=fs.State(id=f"s{batch}-{i}")) for i in range(250)]
            await a.do(fs.commit(*(fs.park(ctx) for ctx in ctxs)))
        counter = ReadCounter(b)
        n = 12
        for _ in range(n):
            await ticks(c.clock, b.recoverer, 1)
        assert counter.reads <= 2 * (n + 1), f"{counter.reads} reads in {n} ticks"
        before = counter.reads
        await until(lambda: c.clock.sleepers >= 1, "the standby to sleep on the clock")
        for _ in range(200):
            await asyncio.sleep(0)
        assert counter.reads == before, "the standby read the store while its clock stood still"
