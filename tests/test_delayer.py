"""The delayer (behaviour.md §4) on every driver, driven by a manual clock: fires on time and
never early, commits (or not) as asked, drops a state that moved on, resumes after a restart
without firing anything twice, and hands over between processes."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import flowstate as fs
from flowstate import delayer
from tests.workers import cluster, die, history, latest, ticks, until


def recording_registry(runs: list[tuple[str, bool, int]]) -> fs.FlowRegistry:
    """Flow ``fire`` records (id, delayed?, rev) and parks."""
    registry = fs.FlowRegistry()

    @registry.flow("fire")
    async def fire(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        runs.append((ctx.current.id, fs.delayed(ctx.current), ctx.current.rev))
        return fs.commit(fs.park(ctx))

    return registry


def new_ctx(sid: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=sid))


async def test_fires_when_due_and_not_before(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, bool, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(recording_registry(runs), recovery=False)
        ctx = new_ctx("d1")
        await engine.do(fs.commit(fs.park(ctx)))
        await engine.do(fs.delay(ctx, "fire", timedelta(seconds=30)))
        c.clock.advance(27)
        await ticks(c.clock, engine.delayer)  # two 1 s ticks: now at +29 s
        assert runs == []
        await ticks(c.clock, engine.delayer, 3)
        await until(lambda: len(runs) == 1, "the firing")
        await until(lambda: _parked_ok(engine, "d1"), "the flow to park")
        sid, was_delayed, rev = runs[0]
        assert (sid, was_delayed) == ("d1", True)
        versions = await history(engine, "d1")
        assert [v.transition.to for v in versions] == ["", "fire", ""]
        assert versions[1].rev == rev and fs.delayed(versions[1])
        assert engine.delayer is not None
        stats = engine.delayer.stats()
        assert (stats.added, stats.completed, stats.dropped, stats.pending) == (1, 1, 0, 0)


async def test_commit_false_executes_without_committing(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, bool, int]] = []
    registry = fs.FlowRegistry()

    @registry.flow("peek")
    async def peek(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        runs.append((ctx.current.id, fs.delayed(ctx.current), ctx.current.rev))
        return fs.noop()

    async with cluster(store) as c:
        engine = await c.engine(registry, recovery=False)
        ctx = new_ctx("nc")
        await engine.do(fs.commit(fs.park(ctx)))
        at = c.clock.now() + timedelta(seconds=5)
        await engine.do(fs.delay_until(ctx, "peek", at, commit=False))
        c.clock.advance(5)
        await ticks(c.clock, engine.delayer)
        await until(lambda: len(runs) == 1, "the execution")
        assert runs[0][1] is True
        assert len(await history(engine, "nc")) == 1, "commit=False committed a version"


async def test_a_state_that_moved_on_is_dropped(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, bool, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(recording_registry(runs), recovery=False)
        ctx = new_ctx("moved")
        await engine.do(fs.commit(fs.park(ctx)))
        await engine.do(fs.delay(ctx, "fire", 5))
        await engine.do(fs.commit(fs.park(ctx, {"moved": "on"})))
        c.clock.advance(5)
        await ticks(c.clock, engine.delayer, 3)
        assert runs == []
        assert engine.delayer is not None
        assert engine.delayer.stats().dropped == 1
        assert len(await history(engine, "moved")) == 2


async def test_a_later_offset_due_first_fires_first(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, bool, int]] = []
    async with cluster(store) as c:
        engine = await c.engine(recording_registry(runs), recovery=False)
        late, early = new_ctx("late"), new_ctx("early")
        await engine.do(fs.delay(late, "fire", 60))
        await engine.do(fs.delay(early, "fire", 10))
        c.clock.advance(10)
        await ticks(c.clock, engine.delayer)
        await until(lambda: [r[0] for r in runs] == ["early"], "the early one")
        c.clock.advance(60)
        await ticks(c.clock, engine.delayer)
        await until(lambda: [r[0] for r in runs] == ["early", "late"], "the late one")


async def test_restart_neither_loses_nor_refires(store: Callable[[], fs.Driver]) -> None:
    """A delay far ahead does not hold the progress back: a restarted delayer fires only what
    had not fired, and it fires that."""
    runs: list[tuple[str, bool, int]] = []
    async with cluster(store) as c:
        first = await c.engine(recording_registry(runs), recovery=False)
        await first.do(fs.delay(new_ctx("later"), "fire", 600))
        await first.do(fs.delay(new_ctx("soon"), "fire", 5))
        c.clock.advance(5)
        await ticks(c.clock, first.delayer)
        await until(lambda: [r[0] for r in runs] == ["soon"], "the first firing")
        await until(lambda: _parked_ok(first, "soon"), "soon to park")
        await first.shutdown()

        reader = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        meta = await latest(reader, delayer.META_ID)
        assert meta.transition.annotations["state"] == "inactive"
        assert meta.annotations[delayer.SINCE] >= "2030-01-01T00:00:05Z", "since did not move"
        assert delayer.FIRED not in meta.annotations, "the fired one is covered by the watermarks"

        second = await c.engine(recording_registry(runs), recovery=False)
        await ticks(c.clock, second.delayer, 3)
        assert [r[0] for r in runs] == ["soon"], "fired again after the restart"
        c.clock.advance(600)
        await ticks(c.clock, second.delayer)
        await until(lambda: [r[0] for r in runs] == ["soon", "later"], "the pending one")
        assert second.delayer is not None
        assert second.delayer.stats().tail >= 2


async def _parked_ok(engine: fs.Engine, sid: str) -> bool:
    try:
        return fs.parked(await latest(engine, sid))
    except fs.NotFoundError:
        return False


async def test_one_active_delayer_and_takeover(store: Callable[[], fs.Driver]) -> None:
    runs: list[tuple[str, bool, int]] = []
    async with cluster(store) as c:
        a = await c.engine(recording_registry(runs), recovery=False)
        b = await c.engine(recording_registry(runs), recovery=False)
        assert a.delayer is not None and b.delayer is not None
        assert a.delayer.stats().active and not b.delayer.stats().active

        die(a.delayer)
        await b.do(fs.delay(new_ctx("orphan"), "fire", 5))
        c.clock.advance(5)
        await ticks(c.clock, b.delayer)
        assert runs == [], "a standby fired while the active one was recently seen"

        c.clock.advance(b.delayer.role.takeover_after)
        await ticks(c.clock, b.delayer, 3)
        assert b.delayer.stats().active
        await until(lambda: [r[0] for r in runs] == ["orphan"], "the standby's firing")


async def test_a_standby_with_nothing_due_does_not_take_over(
    store: Callable[[], fs.Driver],
) -> None:
    async with cluster(store) as c:
        a = await c.engine(fs.FlowRegistry(), recovery=False, delayer=True)
        b = await c.engine(fs.FlowRegistry(), recovery=False, delayer=True)
        assert b.delayer is not None and a.delayer is not None
        die(a.delayer)
        c.clock.advance(b.delayer.role.takeover_after * 2)
        await ticks(c.clock, b.delayer)
        assert not b.delayer.stats().active
