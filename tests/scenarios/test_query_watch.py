"""Query and watch scenarios (behaviour.md §7.3), run on every driver.

"States" are counted after dropping system states, so the expectations hold whether or not the
engine keeps states of its own (the delayer's meta state) in the store.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

import flowstate as fs

from .harness import query, watch_collect_states

FOO = {"foo": "fooVal"}


def _ctx(state_id: str, labels: dict[str, str] | None = None) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id, labels=dict(labels or {})))


async def _commit_park_v123(engine: fs.Engine, ctx: fs.StateCtx) -> list[fs.StateCtx]:
    """Commit park with annotation v=1, 2, 3; return a copy of the ctx after each commit."""
    copies = []
    for v in ("1", "2", "3"):
        ctx.current.annotations["v"] = v
        await engine.do(fs.commit(fs.park(ctx)))
        exp = ctx.copy()
        exp.transitions = []
        copies.append(exp)
    return copies


# get one


async def test_get_one_by_id_and_rev(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = _ctx("aTID")
    exp = (await _commit_park_v123(engine, ctx))[0]
    assert exp.current.annotations["v"] == "1"

    found = fs.StateCtx()
    await engine.do(fs.get_state_by_id(found, "aTID", exp.committed.rev))
    assert found == exp
    assert found.current == found.committed
    assert found.transitions == []
    assert found.datas == {}


async def test_get_one_latest_by_id(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = _ctx("aTID")
    exp = (await _commit_park_v123(engine, ctx))[2]
    assert exp.current.annotations["v"] == "3"

    found = fs.StateCtx()
    await engine.do(fs.get_state_by_id(found, "aTID", 0))
    assert found == exp


async def test_get_one_latest_by_label(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = _ctx("aTID", FOO)
    exp = (await _commit_park_v123(engine, ctx))[2]

    found = fs.StateCtx()
    await engine.do(fs.get_state_by_labels(found, FOO))
    assert found == exp


async def test_get_one_not_found(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    with pytest.raises(fs.NotFoundError):
        await engine.do(fs.get_state_by_id(fs.StateCtx(), "notExist", 0))


# get many (and the same data set-ups read through watchers)


async def _setup_labels(engine: fs.Engine) -> None:
    ctx = _ctx("aTID", FOO)
    await engine.do(fs.commit(fs.park(ctx)))
    ctx.current.labels["bar"] = "barVal"
    await engine.do(fs.commit(fs.park(ctx)))
    await engine.do(fs.commit(fs.park(_ctx("anotherTID", {"foo": "barVal"}))))


def _check_labels(states: list[fs.State]) -> None:
    assert len(states) == 2
    first, second = states
    assert first.id == "aTID"
    assert first.labels == FOO
    assert second.id == "aTID"
    assert second.labels == {"foo": "fooVal", "bar": "barVal"}
    assert first.rev > 0
    assert second.rev > first.rev


async def test_get_many_labels(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    await _setup_labels(engine)

    states, more = await query(engine, fs.get_states_by_labels(FOO))
    assert more is False
    _check_labels(states)


async def test_watch_labels(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    await _setup_labels(engine)

    async with engine.watch(fs.get_states_by_labels(FOO)) as watcher:
        _check_labels(await watch_collect_states(watcher, 2))


async def _setup_or_labels(engine: fs.Engine) -> None:
    await engine.do(fs.commit(fs.park(_ctx("aTID", FOO))))
    await engine.do(fs.commit(fs.park(_ctx("anotherTID", {"bar": "barVal"}))))


def _check_or_labels(states: list[fs.State]) -> None:
    assert len(states) == 2
    first, second = states
    assert first.id == "aTID"
    assert first.labels == FOO
    assert "bar" not in first.labels
    assert second.id == "anotherTID"
    assert second.labels == {"bar": "barVal"}
    assert "foo" not in second.labels
    assert 0 < first.rev < second.rev


async def test_get_many_or_labels(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    await _setup_or_labels(engine)

    cmd = fs.get_states_by_labels(FOO).with_or_labels({"bar": "barVal"})
    states, more = await query(engine, cmd)
    assert more is False
    _check_or_labels(states)


async def test_get_many_or_labels_keyword_form(engine_factory):
    """The same query through the keyword constructor ``fs.get_states(..., or_labels=...)``."""
    engine = await engine_factory(fs.FlowRegistry())
    await _setup_or_labels(engine)

    states, more = await query(engine, fs.get_states(FOO, or_labels=[{"bar": "barVal"}]))
    assert more is False
    _check_or_labels(states)


async def test_watch_or_labels(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    await _setup_or_labels(engine)

    cmd = fs.get_states_by_labels(FOO).with_or_labels({"bar": "barVal"})
    async with engine.watch(cmd) as watcher:
        _check_or_labels(await watch_collect_states(watcher, 2))


async def _setup_since_rev(engine: fs.Engine) -> int:
    """Commit park aTID three times; return the rev of the first commit."""
    ctx = _ctx("aTID", FOO)
    await engine.do(fs.commit(fs.park(ctx)))
    r1 = ctx.committed.rev
    await engine.do(fs.commit(fs.park(ctx)))
    await engine.do(fs.commit(fs.park(ctx)))
    return r1


def _check_since_rev(states: list[fs.State], r1: int) -> None:
    assert len(states) == 2
    first, second = states
    assert first.id == second.id == "aTID"
    assert r1 < first.rev < second.rev
    assert first.labels == FOO
    assert second.labels == FOO


async def test_get_many_since_rev(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    r1 = await _setup_since_rev(engine)

    states, _ = await query(engine, fs.get_states_by_labels().with_since_rev(0))
    assert len(states) == 3

    states, more = await query(engine, fs.get_states_by_labels().with_since_rev(r1))
    assert more is False
    _check_since_rev(states, r1)

    states, more = await query(engine, fs.get_states_by_labels().with_since_rev(states[-1].rev))
    assert states == []
    assert more is False


async def test_watch_since_rev(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    r1 = await _setup_since_rev(engine)

    async with engine.watch(fs.get_states_by_labels().with_since_rev(r1)) as watcher:
        _check_since_rev(await watch_collect_states(watcher, 2), r1)


async def _setup_since_latest(engine: fs.Engine) -> fs.StateCtx:
    ctx = _ctx("aTID", FOO)
    for _ in range(3):
        await engine.do(fs.commit(fs.park(ctx)))
    return ctx


def _check_since_latest(states: list[fs.State], ctx: fs.StateCtx) -> None:
    assert len(states) == 1
    (state,) = states
    assert state.id == "aTID"
    assert state.rev > 0
    assert state.rev == ctx.committed.rev
    assert state.labels == FOO


async def test_get_many_since_latest(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = await _setup_since_latest(engine)

    states, more = await query(engine, fs.get_states_by_labels(FOO).with_since_latest())
    assert more is False
    _check_since_latest(states, ctx)


async def test_watch_since_latest(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = await _setup_since_latest(engine)

    async with engine.watch(fs.get_states_by_labels(FOO).with_since_latest()) as watcher:
        _check_since_latest(await watch_collect_states(watcher, 1), ctx)


async def test_get_many_since_time(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = _ctx("aTID", FOO)
    await engine.do(fs.commit(fs.park(ctx)))
    committed_at = ctx.committed.committed_at
    assert committed_at is not None
    assert committed_at.timestamp() > 0
    assert committed_at.microsecond % 1000 == 0  # millisecond precision

    cmd = fs.get_states_by_labels().with_since_time(committed_at + timedelta(seconds=5))
    await engine.do(cmd)
    assert cmd.result is not None
    assert cmd.result.states == []  # nothing at all, system states included
    assert cmd.result.more is False

    cmd = fs.get_states_by_labels().with_since_time(committed_at - timedelta(seconds=1))
    states, _ = await query(engine, cmd)
    assert [s.id for s in states] == ["aTID"]


async def test_watch_since_time(engine_factory):
    # A manual clock lets the sentinel below be committed "after" the future since_time.
    clock = fs.ManualClock(datetime.now(UTC))
    engine = await engine_factory(fs.FlowRegistry(), clock=clock)
    ctx = _ctx("aTID", FOO)
    await engine.do(fs.commit(fs.park(ctx)))
    committed_at = ctx.committed.committed_at
    assert committed_at is not None

    future = fs.get_states_by_labels(FOO).with_since_time(committed_at + timedelta(seconds=5))
    past = fs.get_states_by_labels(FOO).with_since_time(committed_at - timedelta(seconds=1))
    async with engine.watch(future) as future_watcher, engine.watch(past) as past_watcher:
        states = await watch_collect_states(past_watcher, 1)
        assert [s.id for s in states] == ["aTID"]

        # The spec waits 1 s and expects nothing from the future watcher. Instead: commit a
        # matching state after since_time; it must be the first thing that watcher delivers.
        clock.advance(timedelta(seconds=6))
        await engine.do(fs.commit(fs.park(_ctx("sentinelTID", FOO))))
        states = await watch_collect_states(future_watcher, 1)
        assert [s.id for s in states] == ["sentinelTID"]


async def test_get_many_latest_only(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    a, another = _ctx("aTID"), _ctx("anotherTID")
    for _ in range(3):
        await engine.do(fs.commit(fs.park(a)))
        await engine.do(fs.commit(fs.park(another)))
    a_rev, another_rev = a.committed.rev, another.committed.rev

    states, more = await query(engine, fs.get_states_by_labels().with_latest_only())
    assert more is False
    assert [(s.id, s.rev) for s in states] == [("aTID", a_rev), ("anotherTID", another_rev)]
    assert another_rev > a_rev
