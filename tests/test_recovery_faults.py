"""The recoverer off the happy path, on every driver: a hand-over while a meta write is in
flight, a host clock ahead of the log, a stored state that can no longer be re-committed, an
outage's worth of due states, states of flows this process does not host, and the meta state
exchanged with the Go recoverer (behaviour.md §3.4)."""

from __future__ import annotations

import asyncio
import gc
import logging
import tracemalloc
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

import flowstate as fs
from flowstate import perform, recovery
from flowstate.errors import CommitUnknownError, ValidationError
from flowstate.roles import RoleState
from tests.workers import cluster, history, latest, ticks, until

RETRY = recovery.DEFAULT_RETRY_AFTER.total_seconds()


def parking_registry(runs: list[str], flow: str = "work") -> fs.FlowRegistry:
    registry = fs.FlowRegistry()

    @registry.flow(flow)
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        runs.append(ctx.current.id)
        return fs.commit(fs.park(ctx))

    return registry


async def commit_stalled(engine: fs.Engine, sid: str, flow: str = "work") -> fs.StateCtx:
    ctx = fs.StateCtx(current=fs.State(id=sid))
    await engine.do(fs.commit(fs.transit(ctx, flow)))
    return ctx


def carries_meta(cmd: fs.CommitCmd) -> bool:
    return any(
        isinstance(sub, fs.ParkCmd) and sub.ctx.current.id == recovery.META_ID
        for sub in cmd.commands
    )


# item 9: clean hand-over


async def test_shutdown_during_a_heartbeat_hands_over_at_once(
    store: Callable[[], fs.Driver],
) -> None:
    """The heartbeat lands in the store but its caller is cancelled by shutdown() before it
    learns so; the release must still mark the role inactive, so that the next process is
    active at once instead of after takeover_after."""
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None and a.recoverer.stats().active
        landed, go_on = asyncio.Event(), asyncio.Event()
        armed = True
        inner = a.driver.commit

        async def commit(cmd: fs.CommitCmd) -> None:
            nonlocal armed
            await inner(cmd)
            if armed and carries_meta(cmd):
                armed = False
                landed.set()
                await go_on.wait()  # the answer is slow to come back

        a.driver.commit = commit  # type: ignore[method-assign]
        await ticks(c.clock, a.recoverer, 1)  # returns with a asleep on the clock
        c.clock.advance(a.recoverer.meta_every)  # the next tick writes a heartbeat
        await asyncio.wait_for(landed.wait(), 20)
        task = a.recoverer._task
        assert task is not None
        shutdown = asyncio.ensure_future(a.shutdown())
        await until(lambda: task.cancelling() > 0 or task.done(), "shutdown to cancel the worker")
        go_on.set()
        await asyncio.wait_for(shutdown, 20)

        probe = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        meta = await latest(probe, recovery.META_ID)
        assert meta.transition.annotations == {"state": "inactive"}, "the role was not freed"
        b = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert b.recoverer is not None and b.recoverer.stats().active, "b must not wait"


def slow_answer(engine: fs.Engine) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the engine's next commit of the recovery meta state land in the store, then hold
    its answer back until the second event is set. Returns (landed, go_on)."""
    landed, go_on = asyncio.Event(), asyncio.Event()
    inner = engine.driver.commit

    async def commit(cmd: fs.CommitCmd) -> None:
        await inner(cmd)
        if not landed.is_set() and carries_meta(cmd):
            landed.set()
            await go_on.wait()

    engine.driver.commit = commit  # type: ignore[method-assign]
    return landed, go_on


async def test_shutdown_during_a_claim_hands_over_at_once(
    store: Callable[[], fs.Driver],
) -> None:
    """Likewise for a standby's claim that lands while shutdown() cancels it: the claim made
    the process active, so its release must free the role."""
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        b = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert b.recoverer is not None and not b.recoverer.stats().active
        await ticks(c.clock, b.recoverer, 1)  # returns with b asleep on the clock
        await a.shutdown()
        landed, go_on = slow_answer(b)
        c.clock.advance(b.recoverer.interval)  # b's next tick claims the free role
        await asyncio.wait_for(landed.wait(), 20)
        task = b.recoverer._task
        assert task is not None
        shutdown = asyncio.ensure_future(b.shutdown())
        await until(lambda: task.cancelling() > 0 or task.done(), "shutdown to cancel the worker")
        go_on.set()
        await asyncio.wait_for(shutdown, 20)
        probe = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        meta = await latest(probe, recovery.META_ID)
        assert meta.transition.annotations == {"state": "inactive"}, "the claimed role stuck"


async def test_a_heartbeat_whose_answer_was_lost_still_hands_over(
    store: Callable[[], fs.Driver],
) -> None:
    """The heartbeat lands but the caller gets an error instead of the answer (a connection
    lost after the request was sent). The active process must recognise that version as its
    own: it stays active on the next tick, and its release frees the role."""
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None
        lost = True
        inner = a.driver.commit

        async def commit(cmd: fs.CommitCmd) -> None:
            nonlocal lost
            await inner(cmd)
            if lost and carries_meta(cmd):
                lost = False
                raise CommitUnknownError("the answer was lost")

        a.driver.commit = commit  # type: ignore[method-assign]
        await ticks(c.clock, a.recoverer, 1)  # returns with a asleep on the clock
        c.clock.advance(a.recoverer.meta_every)
        await until(lambda: not lost, "the heartbeat")
        await ticks(c.clock, a.recoverer, 2)
        assert a.recoverer.stats().active, "stepped down from a role it still holds"
        await a.shutdown()
        probe = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        meta = await latest(probe, recovery.META_ID)
        assert meta.transition.annotations == {"state": "inactive"}, "the role was not freed"


# item 10: log time, not host time


class BehindClock:
    """The committing side's clock: ``behind`` of the recoverer's (shared) manual clock."""

    def __init__(self, clock: fs.ManualClock, behind: timedelta) -> None:
        self._clock = clock
        self._behind = behind

    def now(self) -> datetime:
        return self._clock.now() - self._behind

    def sleep(self, seconds: float) -> Awaitable[None]:
        return self._clock.sleep(seconds)


async def test_retry_windows_run_on_log_time_not_on_a_clock_ahead(
    store: Callable[[], fs.Driver],
) -> None:
    """The recoverer's host runs 3 minutes ahead of the clock that stamps committed_at: a state
    committed a moment ago must not look 3 minutes old (retry_after is 2 minutes)."""
    runs: list[str] = []
    async with cluster(store) as c:
        engine = fs.Engine(c.store(), parking_registry(runs), clock=c.clock, delayer=False)
        engine.driver.clock = BehindClock(c.clock, timedelta(minutes=3))  # the store's stamps
        c.engines.append(engine)
        await engine.start()
        assert engine.recoverer is not None and engine.recoverer.stats().active
        ctx = await commit_stalled(engine, "running-elsewhere")
        assert ctx.committed.committed_at is not None
        assert c.clock.now() - ctx.committed.committed_at >= timedelta(minutes=3)
        await ticks(c.clock, engine.recoverer, 3)
        assert runs == [], "retried by host time: the state is 30 s old in log time"
        c.clock.advance(RETRY - 30)
        await ticks(c.clock, engine.recoverer, 2)
        await until(lambda: runs == ["running-elsewhere"], "the retry once log time passed")
        assert engine.recoverer.stats().head_time is not None


# item 11: one bad state cannot stop recovery


@pytest.fixture
def refuse_legacy(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bool]]:
    """Once switched on, commits of states annotated ``legacy`` are refused, as a rule added
    after such states were stored would refuse them."""
    on = [False]
    check = perform.check_committable

    def strict(ctx: fs.StateCtx) -> None:
        if on[0] and "legacy" in ctx.current.annotations:
            raise ValidationError("current.annotations", "legacy annotation no longer allowed")
        check(ctx)

    monkeypatch.setattr(perform, "check_committable", strict)
    yield on


async def test_a_state_that_fails_re_commit_is_skipped(
    store: Callable[[], fs.Driver], refuse_legacy: list[bool], caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[str] = []
    async with cluster(store) as c:
        engine = await c.engine(parking_registry(runs), recovery=True, delayer=False)
        rec = engine.recoverer
        assert rec is not None
        bad = fs.StateCtx(current=fs.State(id="bad", annotations={"legacy": "1"}))
        await engine.do(fs.commit(fs.transit(bad, "work")))
        await commit_stalled(engine, "good")
        refuse_legacy[0] = True
        await ticks(c.clock, rec)  # read: the log clock starts at their commit
        c.clock.advance(RETRY)
        with caplog.at_level(logging.ERROR, "flowstate.recovery"):
            await ticks(c.clock, rec, 2)
        await until(lambda: runs == ["good"], "the good state's retry")
        assert rec.stats().skipped == 1
        assert any("bad" in r.getMessage() for r in caplog.records), "skip not logged"
        # progress and heartbeats move past the bad state
        later = fs.StateCtx(current=fs.State(id="later"))
        await engine.do(fs.commit(fs.park(later)))
        c.clock.advance(rec.meta_every)
        await ticks(c.clock, rec, 2)
        meta = await latest(engine, recovery.META_ID)
        assert int(meta.annotations[recovery.SINCE_REV]) >= bad.committed.rev
        assert meta.committed_at is not None and meta.committed_at >= c.clock.now() - timedelta(
            seconds=rec.meta_every
        )
        assert rec.stats().active


def test_memory_per_tracked_state_is_bounded() -> None:
    """What the recoverer keeps per tracked state (measured: it was ~690 B with the whole
    State; it keeps id, rev, retry time and flow now)."""
    rec = recovery.Recoverer(fs.Engine(fs.MemoryDriver(), recovery=False, delayer=False))
    rec.role._state = RoleState.ACTIVE  # tracking happens only while active
    n = 5000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(n):  # as read from the store: nothing else holds these versions
            rec._track(
                fs.State(
                    id=f"order-{i:08d}",
                    rev=i + 1,
                    labels={"customer": f"c{i}"},
                    annotations={"note": "x" * 40},
                    committed_at=datetime(2030, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
                    transition=fs.Transition("work", {"k": "v"}),
                )
            )
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    per_state = (after - before) / n
    assert rec.stats().tracked == n
    assert per_state < 300, f"{per_state:.0f} B per tracked state"


async def test_after_an_outage_at_most_max_executions_start_at_once(
    store: Callable[[], fs.Driver],
) -> None:
    running: list[str] = []
    finished: list[str] = []
    release = asyncio.Event()
    registry = fs.FlowRegistry()

    @registry.flow("work")
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        running.append(ctx.current.id)
        await release.wait()
        finished.append(ctx.current.id)
        return fs.commit(fs.park(ctx))

    async with cluster(store) as c:
        engine = await c.engine(registry, recovery=True, delayer=False)
        rec = engine.recoverer
        assert rec is not None
        rec.max_executions = 2
        for i in range(5):
            await commit_stalled(engine, f"s{i}")
        await ticks(c.clock, rec)
        c.clock.advance(RETRY)
        await ticks(c.clock, rec, 3)
        await until(lambda: len(running) >= 2, "the first executions")
        await ticks(c.clock, rec, 2)
        assert len(running) == 2, f"{len(running)} executions at once, max_executions is 2"
        assert rec.stats().active
        release.set()
        # the rest start as slots free, without waiting for the clock to move again
        await until(lambda: sorted(finished) == [f"s{i}" for i in range(5)], "all five")


async def test_a_backlog_drains_as_fast_as_executions_finish(
    store: Callable[[], fs.Driver],
) -> None:
    """A tick starts at most max_executions retries; the next tick runs as soon as a slot
    frees, not an interval later (before: 64 retries per interval, 150 s for 10,000 states
    with a one-second interval)."""
    done: list[str] = []
    registry = fs.FlowRegistry()

    @registry.flow("work")
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        done.append(ctx.current.id)
        return fs.commit(fs.park(ctx))

    async with cluster(store) as c:
        engine = await c.engine(registry, recovery=True, delayer=False)
        rec = engine.recoverer
        assert rec is not None
        rec.max_executions = 2
        n = 30
        for i in range(n):
            await commit_stalled(engine, f"s{i}")
        await ticks(c.clock, rec)
        c.clock.advance(RETRY)
        await ticks(c.clock, rec, 2)
        # the clock stands still from here: only freed slots can start the rest
        await until(lambda: len(done) == n, f"all {n} retried without the clock moving")
        assert sorted(done) == sorted(f"s{i}" for i in range(n))


# item 12: not my flow is not a failure


async def test_states_of_flows_nobody_here_hosts_are_left_alone(
    driver_factory: Callable[[], fs.Driver], caplog: pytest.LogCaptureFixture
) -> None:
    runs: list[str] = []
    registry = fs.FlowRegistry()
    async with cluster(driver_factory) as c:
        engine = await c.engine(registry, recovery=True, delayer=False)
        rec = engine.recoverer
        assert rec is not None
        await commit_stalled(engine, "s1", flow="f")
        with caplog.at_level(logging.WARNING, "flowstate.recovery"):
            for _ in range(recovery.DEFAULT_MAX_ATTEMPTS + 2):
                c.clock.advance(RETRY)
                await ticks(c.clock, rec, 2)
        versions = await history(engine, "s1")
        assert len(versions) == 1, "committed a transit it cannot run"
        assert recovery.attempt(versions[0]) == 0 and not fs.parked(versions[0])
        assert rec.stats().unhosted == {"f": 1}
        assert rec.stats().retried == 0 and rec.stats().dropped == 0
        warnings = [r for r in caplog.records if "'f'" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]

        registry.flow("f")(parking_registry(runs, "f").get_flow("f"))
        await ticks(c.clock, rec, 2)
        await until(lambda: runs == ["s1"], "the retry once a host appeared")
        await until(lambda: rec.stats().unhosted == {}, "unhosted to clear")
        versions = await history(engine, "s1")
        assert recovery.attempt(versions[1]) == 1


# item 13: the meta state as the Go recoverer writes and reads it

GO_FRESH_ANNOTATIONS = {recovery.ENABLED: "false", recovery.SINCE_REV: "0"}


async def test_golden_meta_on_a_fresh_store(store: Callable[[], fs.Driver]) -> None:
    """Exactly what Go's recoverer writes: parked, enabled=false and since_rev as state
    annotations, only ``state`` as transition annotation, no labels."""
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None
        done = fs.StateCtx(current=fs.State(id="done"))
        await a.do(fs.commit(fs.park(done)))
        await ticks(c.clock, a.recoverer)
        c.clock.advance(a.recoverer.meta_every)
        await ticks(c.clock, a.recoverer)
        await a.shutdown()
        probe = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        versions = await history(probe, recovery.META_ID)
        assert len(versions) >= 3  # created, a heartbeat, released
        assert versions[0].annotations == GO_FRESH_ANNOTATIONS
        for v in versions:
            assert fs.parked(v) and v.labels == {}
            assert set(v.annotations) == set(GO_FRESH_ANNOTATIONS)
            assert v.transition.annotations in ({"state": "active"}, {"state": "inactive"})
        assert [v.transition.annotations["state"] for v in versions] == ["active"] * (
            len(versions) - 1
        ) + ["inactive"]
        assert versions[-1].annotations[recovery.SINCE_REV] == str(done.committed.rev)


async def go_meta(engine: fs.Engine, annotations: dict[str, str], role: str) -> None:
    ctx = fs.StateCtx(current=fs.State(id=recovery.META_ID, annotations=annotations))
    await engine.do(fs.commit(fs.park(ctx, {"state": role})))


@pytest.mark.parametrize(
    "annotations",
    [{recovery.SINCE_REV: "3"}, {**GO_FRESH_ANNOTATIONS, recovery.SINCE_REV: "3"}],
    ids=["since-only", "with-enabled"],
)
async def test_resumes_from_a_meta_written_by_go(
    store: Callable[[], fs.Driver], annotations: dict[str, str]
) -> None:
    runs: list[str] = []
    async with cluster(store) as c:
        setup = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        old = await commit_stalled(setup, "before")  # rev 1: below since_rev, not re-read
        for i in range(2):
            await setup.do(fs.commit(fs.park(fs.StateCtx(current=fs.State(id=f"p{i}")))))
        assert old.committed.rev <= 3
        await go_meta(setup, annotations, "inactive")
        await commit_stalled(setup, "after")

        a = await c.engine(parking_registry(runs), recovery=True, delayer=False)
        assert a.recoverer is not None and a.recoverer.stats().active
        c.clock.advance(RETRY)
        await ticks(c.clock, a.recoverer, 2)
        await until(lambda: runs == ["after"], "the retry of the state after since_rev")
        await a.shutdown()
        meta = await latest(setup, recovery.META_ID)
        assert set(meta.annotations) == set(annotations), "keys added to Go's meta"
        assert meta.transition.annotations == {"state": "inactive"}


async def test_a_go_process_holding_the_role_keeps_it(store: Callable[[], fs.Driver]) -> None:
    async with cluster(store) as c:
        setup = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        await go_meta(setup, {recovery.SINCE_REV: "0"}, "active")
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None and not a.recoverer.stats().active
        await ticks(c.clock, a.recoverer)
        assert not a.recoverer.stats().active
        await a.shutdown()  # a standby's shutdown does not write the meta
        meta = await latest(setup, recovery.META_ID)
        assert meta.transition.annotations == {"state": "active"}


async def test_an_unreadable_since_rev_counts_as_zero(store: Callable[[], fs.Driver]) -> None:
    """Go's ParseInt failure reads as 0; a bad value must not stop the recoverer."""
    runs: list[str] = []
    async with cluster(store) as c:
        setup = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        await commit_stalled(setup, "s")
        await go_meta(setup, {recovery.SINCE_REV: "not-a-number"}, "inactive")
        a = await c.engine(parking_registry(runs), recovery=True, delayer=False)
        assert a.recoverer is not None and a.recoverer.stats().active
        c.clock.advance(RETRY)
        await ticks(c.clock, a.recoverer, 2)
        await until(lambda: runs == ["s"], "the retry")
