"""The recoverer (behaviour.md §3) on every driver, driven by a manual clock: retries after the
retry window with the attempt annotation, ends a state by force after max attempts, honours the
per-state settings, resumes from its stored progress and hands over between processes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import flowstate as fs
from flowstate import recovery
from tests.workers import cluster, die, history, latest, ticks, until

RETRY = recovery.DEFAULT_RETRY_AFTER.total_seconds()


def stalled_registry(runs: list[tuple[str, int]], succeed_on: int | None = None) -> fs.FlowRegistry:
    """Flow ``work`` records (id, attempt) and parks on attempt ``succeed_on``; otherwise it
    returns without committing, as if its process had died mid-flow."""
    registry = fs.FlowRegistry()

    @registry.flow("work")
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        n = recovery.attempt(ctx.current)
        runs.append((ctx.current.id, n))
        if succeed_on is not None and n >= succeed_on:
            return fs.commit(fs.park(ctx))
        return fs.noop()

    return registry


async def commit_stalled(
    engine: fs.Engine, sid: str, setup: Callable[[fs.StateCtx], None] | None = None
) -> fs.StateCtx:
    """Commit a transition to ``work`` and never execute it: a crash right after the commit."""
    ctx = fs.StateCtx(current=fs.State(id=sid))
    if setup is not None:
        setup(ctx)
    await engine.do(fs.commit(fs.transit(ctx, "work")))
    return ctx


async def test_a_stalled_state_is_retried_after_the_window(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(stalled_registry(runs, succeed_on=1), delayer=False)
        await commit_stalled(engine, "s1")
        await ticks(c.clock, engine.recoverer)
        assert runs == [], "retried before its retry window"

        c.clock.advance(RETRY)
        await ticks(c.clock, engine.recoverer)
        await until(lambda: runs == [("s1", 1)], "the retry")
        await until(lambda: _parked(engine, "s1"), "the retried flow to park")
        versions = await history(engine, "s1")
        assert [(v.transition.to, recovery.attempt(v)) for v in versions] == [
            ("work", 0),
            ("work", 1),
            ("", 0),
        ]
        await ticks(c.clock, engine.recoverer)
        stats = engine.recoverer.stats() if engine.recoverer else None
        assert stats is not None and stats.active
        assert stats.retried == 1 and stats.dropped == 0
        assert stats.completed >= 1


async def _parked(engine: fs.Engine, sid: str) -> bool:
    return fs.parked(await latest(engine, sid))


async def test_a_state_failing_every_attempt_is_ended_by_force(
    store: Callable[[], fs.Driver],
) -> None:
    runs: list[tuple[str, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(stalled_registry(runs), delayer=False)
        await commit_stalled(engine, "doomed")
        for expected in range(1, recovery.DEFAULT_MAX_ATTEMPTS + 2):
            c.clock.advance(RETRY)
            await ticks(c.clock, engine.recoverer)
            if expected <= recovery.DEFAULT_MAX_ATTEMPTS:
                await until(lambda n=expected: len(runs) == n, f"attempt {expected}")
        await until(lambda: _parked(engine, "doomed"), "the forced end")
        final = await latest(engine, "doomed")
        assert fs.ended(final)
        assert recovery.attempt(final) == recovery.DEFAULT_MAX_ATTEMPTS + 1
        assert runs == [("doomed", n) for n in range(1, recovery.DEFAULT_MAX_ATTEMPTS + 1)]
        assert engine.recoverer is not None
        stats = engine.recoverer.stats()
        assert (stats.retried, stats.dropped) == (recovery.DEFAULT_MAX_ATTEMPTS, 1)
        # ended: never retried again
        c.clock.advance(10 * RETRY)
        await ticks(c.clock, engine.recoverer)
        assert len(runs) == recovery.DEFAULT_MAX_ATTEMPTS


async def test_per_state_max_attempts_and_retry_after(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, int]] = []

    def settings(ctx: fs.StateCtx) -> None:
        recovery.set_max_attempts(ctx, 1)
        recovery.set_retry_after(ctx, timedelta(minutes=4))

    async with cluster(store) as c:
        engine = await c.engine(stalled_registry(runs), delayer=False)
        ctx = await commit_stalled(engine, "custom", settings)
        assert recovery.max_attempts(ctx.current) == 1
        assert recovery.retry_after(ctx.current) == timedelta(minutes=4)
        c.clock.advance(RETRY)  # the default window passed, the state's own did not
        await ticks(c.clock, engine.recoverer)
        assert runs == []
        c.clock.advance(timedelta(minutes=2))
        await ticks(c.clock, engine.recoverer)
        await until(lambda: runs == [("custom", 1)], "the single attempt")
        c.clock.advance(timedelta(minutes=4))
        await ticks(c.clock, engine.recoverer)
        await until(lambda: _parked(engine, "custom"), "the forced end after one attempt")
        final = await latest(engine, "custom")
        assert fs.ended(final) and recovery.attempt(final) == 2


async def test_disabled_and_parked_states_are_left_alone(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(stalled_registry(runs), delayer=False)
        await commit_stalled(engine, "off", recovery.disable)
        done = fs.StateCtx(current=fs.State(id="done"))
        await engine.do(fs.commit(fs.park(done)))
        for _ in range(4):
            c.clock.advance(RETRY)
            await ticks(c.clock, engine.recoverer)
        assert runs == []
        assert not fs.parked(await latest(engine, "off"))
        assert engine.recoverer is not None
        assert engine.recoverer.stats().completed >= 1  # "done" was seen parked


def test_settings_parse_and_clamp() -> None:
    ctx = fs.StateCtx(current=fs.State(id="x"))
    recovery.set_retry_after(ctx, 5)
    assert ctx.current.annotations[recovery.RETRY_AFTER] == "1m0s"
    recovery.set_retry_after(ctx, timedelta(hours=1))
    assert recovery.retry_after(ctx.current) == timedelta(minutes=5)
    ctx.current.annotations[recovery.RETRY_AFTER] = "bogus"
    assert recovery.retry_after(ctx.current) == timedelta(minutes=1)
    recovery.set_max_attempts(ctx, 0)
    assert recovery.max_attempts(ctx.current) == 3
    ctx.current.annotations[recovery.MAX_ATTEMPTS] = "-2"
    assert recovery.max_attempts(ctx.current) == 3
    assert recovery.attempt(ctx.current) == 0
    assert recovery.enabled(ctx.current)
    recovery.disable(ctx)
    assert not recovery.enabled(ctx.current)


async def test_progress_survives_a_restart(store: Callable[[], fs.Driver]) -> None:
    """A restarted recoverer resumes from its stored since_rev (not from the start of the log)
    and still retries what was pending when it stopped."""
    runs: list[tuple[str, int]] = []
    async with cluster(store) as c:
        first = await c.engine(stalled_registry(runs, succeed_on=1), delayer=False)
        for i in range(5):
            done = fs.StateCtx(current=fs.State(id=f"done{i}"))
            await first.do(fs.commit(fs.park(done)))
        pending = await commit_stalled(first, "pending")
        await ticks(c.clock, first.recoverer)
        await first.shutdown()

        meta = await latest(
            await c.engine(fs.FlowRegistry(), recovery=False, delayer=False), recovery.META_ID
        )
        since = int(meta.annotations[recovery.SINCE_REV])
        assert 0 < since < pending.committed.rev, "progress stored below the pending state"
        assert meta.transition.annotations["state"] == "inactive"

        second = await c.engine(stalled_registry(runs, succeed_on=1), delayer=False)
        assert second.recoverer is not None and second.recoverer.stats().active
        c.clock.advance(RETRY)
        await ticks(c.clock, second.recoverer)
        await until(lambda: runs == [("pending", 1)], "the retry after the restart")
        assert second.recoverer.stats().completed <= 2, "re-read the log from the start"


async def test_one_active_recoverer_and_takeover(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, int]] = []
    async with cluster(store) as c:
        a = await c.engine(stalled_registry(runs, succeed_on=1), delayer=False)
        b = await c.engine(stalled_registry(runs, succeed_on=1), delayer=False)
        assert a.recoverer is not None and b.recoverer is not None
        assert a.recoverer.stats().active and not b.recoverer.stats().active

        await commit_stalled(a, "s")
        await ticks(c.clock, a.recoverer)
        die(a.recoverer)  # as if a's process were killed: the role is not released
        c.clock.advance(RETRY)
        await ticks(c.clock, b.recoverer)
        assert runs == [], "a standby retried while the active one was only recently seen"

        c.clock.advance(b.recoverer.role.takeover_after)
        await ticks(c.clock, b.recoverer, 3)
        assert b.recoverer.stats().active
        await until(lambda: runs == [("s", 1)], "the standby's retry")


async def test_clean_shutdown_hands_over_at_once(store: Callable[[], fs.Driver]) -> None:
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        b = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert b.recoverer is not None
        await a.shutdown()
        await ticks(c.clock, b.recoverer)
        assert b.recoverer.stats().active


async def test_an_active_recoverer_steps_down_when_another_took_over(
    store: Callable[[], fs.Driver],
) -> None:
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        b = await c.engine(fs.FlowRegistry(), recovery=True, delayer=False)
        assert a.recoverer is not None and b.recoverer is not None
        die(a.recoverer)
        await commit_stalled(b, "work-to-do")
        c.clock.advance(b.recoverer.role.takeover_after + RETRY)
        await ticks(c.clock, b.recoverer, 3)
        assert b.recoverer.stats().active
        await a.recoverer.tick()  # a wakes up (it was only paused) and sees b's claim
        assert not a.recoverer.stats().active


async def test_stats_report_head_and_tail(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(stalled_registry(runs), delayer=False)
        assert engine.recoverer is not None and engine.recoverer.interval == 10.0
        s1 = await commit_stalled(engine, "t1")
        s2 = await commit_stalled(engine, "t2")
        await ticks(c.clock, engine.recoverer)
        stats = engine.recoverer.stats()
        assert stats.head_rev == s2.committed.rev
        assert stats.tail_rev == s1.committed.rev
        assert stats.added == 2
