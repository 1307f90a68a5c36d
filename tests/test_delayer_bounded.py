"""The delayer stays bounded and honest (issue 11, items 7, 8, 12 and 13), on every driver.

* Its progress on ``flowstate.delayer.meta`` stays small whatever the mix of delays, and its
  memory holds a look-ahead window, not every pending delay.
* A restart neither loses nor re-fires; a state delayed into the past is still fired.
* A delayer that stepped down forgets what it held and does not poll the store in a loop.
* A state of a flow this process does not host is left pending, reported, and fired once a
  host appears.
* The meta state carries exactly the annotations the Go delayer reads and writes, and a meta
  state written by Go is resumed from.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import flowstate as fs
from flowstate import delayer
from tests.workers import cluster, history, latest, ticks, until

EPOCH_TEXT = "1970-01-01T00:00:00Z"
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)


def counting_registry(runs: list[str], flow_id: str = "fire") -> fs.FlowRegistry:
    """Flow ``flow_id`` records the state id and does nothing else (no commit)."""
    registry = fs.FlowRegistry()

    @registry.flow(flow_id)
    async def fire(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        runs.append(ctx.current.id)
        return fs.noop()

    return registry


def new_ctx(sid: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=sid))


def uncommitted(clock: fs.ManualClock, sid: str, after: float | timedelta) -> fs.DelayCmd:
    """Delay a new state ``sid`` to ``fire`` by ``after`` (seconds) with ``commit=False``."""
    delta = after if isinstance(after, timedelta) else timedelta(seconds=after)
    return fs.delay_until(new_ctx(sid), "fire", clock.now() + delta, commit=False)


def annotations_size(state: fs.State) -> int:
    """Characters of every annotation key and value of ``state`` (state and transition)."""
    pairs = [*state.annotations.items(), *state.transition.annotations.items()]
    return sum(len(k) + len(v) for k, v in pairs)


async def tick_until(
    clock: fs.ManualClock, d: fs.Delayer, check: Callable[[], bool], what: str
) -> None:
    """Tick until ``check()`` holds (at most 20 ticks)."""
    for _ in range(20):
        if check():
            return
        await ticks(clock, d, 1)
    raise AssertionError(f"20 ticks without {what}")


def the_delayer(engine: fs.Engine) -> fs.Delayer:
    assert engine.delayer is not None
    return engine.delayer


# -- item 7: bounded progress and memory ---------------------------------------------------


async def test_meta_stays_small_while_a_far_future_delay_is_pending(
    store: Callable[[], fs.Driver],
) -> None:
    """A delay a month ahead must not pin the progress: 1,200 firings after it leave the meta
    state's annotations under 4 KiB and nothing of it in memory (today every fired offset
    above the pinned watermark is listed on the meta state, ~5.8 KB here)."""
    runs: list[str] = []
    async with cluster(store) as c:
        engine = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(engine)
        await engine.do(uncommitted(c.clock, "far", timedelta(days=30)))
        per_second, seconds = 100, 12
        for s in range(seconds):
            await engine.do(
                fs.commit(
                    *(uncommitted(c.clock, f"cron-{s}-{i}", 1 + s) for i in range(per_second))
                )
            )
        biggest = 0
        for _ in range(seconds + 2):
            await ticks(c.clock, d, 1)
            biggest = max(biggest, annotations_size(await latest(engine, delayer.META_ID)))
        await until(lambda: len(runs) == per_second * seconds, "every cron firing")
        await ticks(c.clock, d)
        biggest = max(biggest, annotations_size(await latest(engine, delayer.META_ID)))
        assert biggest < 4096, f"meta annotations grew to {biggest} characters"
        assert "far" not in runs
        assert d.stats().pending == 0, "the far-future delay is held in memory"


async def test_a_per_second_cron_does_not_grow_the_meta_state(
    store: Callable[[], fs.Driver],
) -> None:
    """A flow that parks and delays itself by one second, fired 60 times while a delay a
    month ahead is pending: the meta state's annotations do not grow with the firings (today
    each firing adds its offset to the stored list)."""
    fired: list[int] = []
    registry = fs.FlowRegistry()

    @registry.flow("cron")
    async def cron(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        fired.append(ctx.current.rev)
        at = engine.clock.now().replace(microsecond=0) + timedelta(seconds=1)
        await engine.do(fs.commit(fs.park(ctx), fs.delay_until(ctx, "cron", at)))
        return fs.noop()

    async with cluster(store) as c:
        engine = await c.engine(registry, recovery=False)
        d = the_delayer(engine)
        await engine.do(uncommitted(c.clock, "far", timedelta(days=30)))
        ctx = new_ctx("every-second")
        await engine.do(fs.commit(fs.park(ctx), fs.delay(ctx, "cron", 1)))
        sizes: list[int] = []
        for n in range(1, 61):
            # the flow delays itself from the clock it reads, so a firing may need two seconds
            await tick_until(c.clock, d, lambda n=n: len(fired) >= n, f"firing {n}")  # type: ignore[misc]
            sizes.append(annotations_size(await latest(engine, delayer.META_ID)))
        assert max(sizes) < 4096
        # the decimal offset may gain a digit or two; a list of fired offsets would add ~30
        assert max(sizes[30:]) <= max(sizes[:10]) + 8, f"the meta state grew: {sizes}"
        assert d.stats().pending <= 1, "more than the next firing held in memory"


async def test_memory_holds_the_lookahead_window_only(store: Callable[[], fs.Driver]) -> None:
    """300 delays a day ahead are not loaded until they enter the look-ahead window; then they
    all fire, once each."""
    runs: list[str] = []
    async with cluster(store) as c:
        engine = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(engine)
        await engine.do(
            fs.commit(*(uncommitted(c.clock, f"later-{i}", 86_400 + i % 3) for i in range(300)))
        )
        await ticks(c.clock, d, 3)
        assert d.stats().pending == 0, "delays a day ahead were loaded into memory"
        c.clock.advance(86_400 - 30)  # inside the default 60 s look-ahead
        await ticks(c.clock, d)
        assert d.stats().pending == 300, "the window did not load what falls due in it"
        c.clock.advance(60)
        await ticks(c.clock, d)
        await until(lambda: len(runs) == 300, "every firing")
        await ticks(c.clock, d)
        assert sorted(runs) == sorted(f"later-{i}" for i in range(300))
        assert d.stats().pending == 0


async def test_a_backlog_after_an_outage_is_loaded_a_window_at_a_time(
    store: Callable[[], fs.Driver],
) -> None:
    """300 delays fell due while no delayer ran (one a second for five minutes): the delayer
    that starts holds at most about ``max_window`` of them at once, and fires each once."""
    runs: list[str] = []
    async with cluster(store) as c:
        feeder = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        await feeder.do(fs.commit(*(uncommitted(c.clock, f"b{i}", 1 + i) for i in range(300))))
        c.clock.advance(600)
        engine = fs.Engine(c.store(), counting_registry(runs), clock=c.clock, recovery=False)
        c.engines.append(engine)
        d = the_delayer(engine)
        d.max_window = 20
        held: list[int] = []
        fire_due = d._fire_due

        async def watched(now: datetime) -> None:
            held.append(d.stats().pending)  # what the window and the scan loaded
            await fire_due(now)

        d._fire_due = watched  # type: ignore[method-assign]
        await engine.start()
        await until(lambda: len(runs) == 300, "every firing of the backlog")
        await ticks(c.clock, d)
        assert sorted(runs) == sorted(f"b{i}" for i in range(300))
        assert max(held) <= 2 * d.max_window, f"held up to {max(held)} delayed states"


async def test_restart_fires_commit_false_delays_exactly_once(
    store: Callable[[], fs.Driver],
) -> None:
    """With a far-future delay pinned, uncommitted delays fired before a clean restart are not
    executed again by the next process, and the ones still pending fire once after it."""
    runs: list[str] = []
    async with cluster(store) as c:
        first = await c.engine(counting_registry(runs), recovery=False)
        await first.do(uncommitted(c.clock, "far", timedelta(days=30)))
        await first.do(*(uncommitted(c.clock, f"a{i}", 2 + i) for i in range(5)))
        await first.do(*(uncommitted(c.clock, f"b{i}", 30 + i) for i in range(5)))
        for _ in range(8):
            await ticks(c.clock, the_delayer(first), 1)
        await until(lambda: len(runs) == 5, "the first five firings")
        await first.shutdown()

        second = await c.engine(counting_registry(runs), recovery=False)
        await ticks(c.clock, the_delayer(second), 3)
        assert sorted(runs) == [f"a{i}" for i in range(5)], "fired again after the restart"
        c.clock.advance(40)
        await ticks(c.clock, the_delayer(second))
        await until(lambda: len(runs) == 10, "the pending five")
        await ticks(c.clock, the_delayer(second))
        assert sorted(runs) == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]


async def test_a_state_delayed_into_the_past_is_fired(store: Callable[[], fs.Driver]) -> None:
    """After the delayer's progress moved past a time, a state delayed to before that time (a
    late arrival) is still fired."""
    runs: list[str] = []
    async with cluster(store) as c:
        engine = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(engine)
        await engine.do(uncommitted(c.clock, "first", 5))
        c.clock.advance(600)
        await ticks(c.clock, d)
        await until(lambda: runs == ["first"], "the first firing")
        past = c.clock.now() - timedelta(seconds=300)
        await engine.do(fs.delay_until(new_ctx("late"), "fire", past, commit=False))
        await ticks(c.clock, d)
        await until(lambda: runs == ["first", "late"], "the late arrival")
        await ticks(c.clock, d)
        assert runs == ["first", "late"]


# -- item 8: no spin after stepping down ----------------------------------------------------


class ReadCounter:
    """Counts a driver's reads of states and delayed states."""

    def __init__(self, driver: fs.Driver) -> None:
        self.reads = 0
        for name in ("get_state", "get_delayed_states", "get_states", "read_states"):
            original = getattr(driver, name)
            setattr(driver, name, self._counted(original))

    def _counted(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return await fn(*args, **kwargs)

        return wrapper


async def test_a_delayer_that_stepped_down_forgets_and_does_not_spin(
    store: Callable[[], fs.Driver],
) -> None:
    """Another process claims the role while a due delay sits in the active one's memory: the
    one that stepped down clears its pending entries and reads the store about once per
    ``interval`` of clock time (today it polls in a loop: the stale entry is past due)."""
    runs: list[str] = []
    async with cluster(store) as c:
        a = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(a)
        await a.do(uncommitted(c.clock, "due", 5))
        await tick_until(c.clock, d, lambda: d.stats().pending == 1, "the delay to load")

        other = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        meta = fs.StateCtx()
        await other.do(fs.get_state_by_id(meta, delayer.META_ID))
        await other.do(fs.commit(fs.park(meta, {"state": "active"})))
        await ticks(c.clock, d)
        assert not d.stats().active
        assert d.stats().pending == 0, "stale pending entries kept after stepping down"

        counter = ReadCounter(a.driver)
        steps = 10
        c.clock.advance(10)  # the stale entry, if kept, is now past due
        for _ in range(steps):
            await ticks(c.clock, d, 1)
        # with the clock standing still a standby has no reason to tick: one that spins does
        quiet = asyncio.ensure_future(d.wait_tick())
        done, _ = await asyncio.wait({quiet}, timeout=1.0)
        quiet.cancel()
        assert not done, "the delayer ticked while its clock stood still"
        assert counter.reads <= 4 * (steps + 2), f"{counter.reads} reads in {steps} intervals"
        assert runs == []


# -- item 12: a flow this process does not host ---------------------------------------------


async def test_a_due_state_of_an_unhosted_flow_is_left_and_fired_once_hosted(
    store: Callable[[], fs.Driver], caplog: pytest.LogCaptureFixture
) -> None:
    """The delayer holds the role but no process hosts ``fire``: the due state is not
    committed nor executed, it is counted in ``stats().unhosted``, one warning says so, and it
    fires once a host appears."""
    runs: list[str] = []
    registry = fs.FlowRegistry()

    @registry.flow("other")
    async def other(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.noop()

    async with cluster(store) as c:
        engine = await c.engine(registry, recovery=False)
        d = the_delayer(engine)
        ctx = new_ctx("orphan")
        await engine.do(fs.commit(fs.park(ctx)))
        await engine.do(fs.delay(ctx, "fire", 5))
        with caplog.at_level(logging.WARNING, logger="flowstate"):
            c.clock.advance(5)
            for _ in range(5):
                await ticks(c.clock, d, 1)
        assert [v.transition.to for v in await history(engine, "orphan")] == [""]
        assert d.stats().unhosted == {"fire": 1}
        warnings = [
            r for r in caplog.records if r.levelno == logging.WARNING and "fire" in r.getMessage()
        ]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]

        @registry.flow("fire")
        async def fire(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            runs.append(ctx.current.id)
            return fs.commit(fs.park(ctx))

        await ticks(c.clock, d)
        await until(lambda: runs == ["orphan"], "the firing once hosted")
        await ticks(c.clock, d)
        assert runs == ["orphan"]
        assert d.stats().unhosted == {}
        assert [v.transition.to for v in await history(engine, "orphan")][:2] == ["", "fire"]


async def test_many_due_states_of_an_unhosted_flow_keep_the_meta_small(
    store: Callable[[], fs.Driver],
) -> None:
    """More owed entries than the meta state may list (100 due states of a flow nobody hosts):
    the annotations stay under 4 KiB, nothing is lost across a restart — the owed ones fire
    once a host appears — and what fired meanwhile may fire again after it, which the rev
    check makes harmless with ``commit`` (each hosted state runs exactly once)."""
    runs: list[str] = []

    def registry(hosts_gone: bool) -> fs.FlowRegistry:
        reg = fs.FlowRegistry()
        for flow_id in ("fire", "gone") if hosts_gone else ("fire",):

            @reg.flow(flow_id)
            async def record(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
                runs.append(ctx.current.id)
                return fs.commit(fs.park(ctx))

        return reg

    async with cluster(store) as c:
        first = await c.engine(registry(hosts_gone=False), recovery=False)
        d = the_delayer(first)
        at = c.clock.now()
        await first.do(
            fs.commit(
                *(
                    fs.delay_until(new_ctx(f"gone-{i}"), "gone", at + timedelta(seconds=5))
                    for i in range(100)
                )
            )
        )
        await first.do(
            fs.commit(
                *(
                    fs.delay_until(new_ctx(f"fire-{i}"), "fire", at + timedelta(seconds=6))
                    for i in range(30)
                )
            )
        )
        c.clock.advance(10)
        await ticks(c.clock, d, 3)
        await until(lambda: len(runs) == 30, "the hosted firings")
        assert d.stats().unhosted == {"gone": 100}
        size = annotations_size(await latest(first, delayer.META_ID))
        assert size < 4096, f"meta annotations grew to {size} characters"
        await first.shutdown()
        reader = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        size = annotations_size(await latest(reader, delayer.META_ID))
        assert size < 4096, f"meta annotations grew to {size} characters on release"

        second = await c.engine(registry(hosts_gone=True), recovery=False)
        await ticks(c.clock, the_delayer(second), 3)
        await until(lambda: len(runs) == 130, "the owed firings")
        await ticks(c.clock, the_delayer(second))
        assert sorted(runs) == sorted(
            [f"gone-{i}" for i in range(100)] + [f"fire-{i}" for i in range(30)]
        )


# -- item 13: the meta state as Go reads and writes it ---------------------------------------


async def test_a_fresh_meta_state_has_exactly_gos_annotations(
    store: Callable[[], fs.Driver],
) -> None:
    async with cluster(store) as c:
        engine = await c.engine(fs.FlowRegistry(), recovery=False, delayer=True)
        meta = await latest(engine, delayer.META_ID)
        assert meta.annotations == {
            "flowstate.delayer.offset": "0",
            "flowstate.delayer.since": EPOCH_TEXT,
            "flowstate.recovery.enabled": "false",
        }
        assert meta.transition.annotations == {"state": "active"}
        assert fs.parked(meta)


async def test_progress_is_written_the_way_go_reads_it(store: Callable[[], fs.Driver]) -> None:
    """After firing, ``since`` is RFC 3339 in Go's seconds layout and ``offset`` a decimal."""
    runs: list[str] = []
    async with cluster(store) as c:
        engine = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(engine)
        await engine.do(uncommitted(c.clock, "one", 5))
        c.clock.advance(10)
        await ticks(c.clock, d)
        await until(lambda: runs == ["one"], "the firing")
        await engine.shutdown()
        reader = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        meta = await latest(reader, delayer.META_ID)
        since = meta.annotations.pop("flowstate.delayer.since")
        assert meta.annotations == {
            "flowstate.delayer.offset": str(await first_offset(reader)),
            "flowstate.recovery.enabled": "false",
        }
        # Go's time.RFC3339 layout in UTC, at or after the firing, not after the clock
        assert re.fullmatch(r"2030-01-01T00:00:[0-9]{2}Z", since), since
        assert "2030-01-01T00:00:05Z" <= since <= "2030-01-01T00:00:12Z"
        assert meta.transition.annotations == {"state": "inactive"}


async def first_offset(engine: fs.Engine) -> int:
    """The offset of the first delayed state in the store (offsets are not 1, 2, 3 on every
    driver: PostgreSQL draws them from the rev sequence)."""
    query = fs.get_delayed_states(until=FOREVER, limit=1)
    await engine.do(query)
    assert query.result is not None
    return query.result.delayed_states[0].offset


async def go_meta(c: Any, annotations: dict[str, str]) -> None:
    """Write ``flowstate.delayer.meta`` as the Go delayer creates it: parked, no transition
    annotations, only the given state annotations."""
    writer = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
    ctx = fs.StateCtx(current=fs.State(id=delayer.META_ID, annotations=dict(annotations)))
    await writer.do(fs.commit(fs.park(ctx)))


async def test_resumes_from_a_fresh_go_meta_state(store: Callable[[], fs.Driver]) -> None:
    runs: list[str] = []
    async with cluster(store) as c:
        await go_meta(c, {"flowstate.delayer.offset": "0", "flowstate.delayer.since": EPOCH_TEXT})
        engine = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(engine)
        assert d.stats().active
        await engine.do(uncommitted(c.clock, "one", 5))
        c.clock.advance(5)
        await ticks(c.clock, d)
        await until(lambda: runs == ["one"], "the firing")


async def test_resumes_from_go_progress_with_nanoseconds_and_an_offset(
    store: Callable[[], fs.Driver],
) -> None:
    """Go progress: ``offset`` = the first delay's offset, ``since`` = 5.25 s after the start,
    in +02:00 with nanoseconds. The first delay (due at +5 s) is done; the second (due at
    +5 s too, but above the offset) and the third (due at +100 s) fire once each."""
    runs: list[str] = []
    async with cluster(store) as c:
        feeder = await c.engine(fs.FlowRegistry(), recovery=False, delayer=False)
        await feeder.do(uncommitted(c.clock, "done", 5))
        await feeder.do(uncommitted(c.clock, "owed", 5))
        await feeder.do(uncommitted(c.clock, "later", 100))
        await go_meta(
            c,
            {
                "flowstate.delayer.offset": str(await first_offset(feeder)),
                "flowstate.delayer.since": "2030-01-01T02:00:05.250000001+02:00",
            },
        )
        c.clock.advance(6)
        engine = await c.engine(counting_registry(runs), recovery=False)
        d = the_delayer(engine)
        await ticks(c.clock, d)
        await until(lambda: runs == ["owed"], "the firing above the Go offset")
        c.clock.advance(100)
        await ticks(c.clock, d)
        await until(lambda: runs == ["owed", "later"], "the later firing")
        await ticks(c.clock, d)
        assert runs == ["owed", "later"]
