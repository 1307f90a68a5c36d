"""Engine-level behaviours the scenario suite does not cover.

Waiting is always on a condition with a generous timeout; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
import flowstate.iterator
from flowstate.data import CHECKSUM

TIMEOUT = 10.0


def make_driver(kind: str, tmp_path: Path) -> fs.Driver:
    if kind == "memory":
        return fs.MemoryDriver()
    return fs.SqliteDriver(tmp_path / "engine.db")


@pytest.fixture(params=["memory", "sqlite"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def registry() -> fs.FlowRegistry:
    return fs.FlowRegistry()


@pytest.fixture
async def engine(kind: str, tmp_path: Path, registry: fs.FlowRegistry) -> AsyncIterator[fs.Engine]:
    async with fs.Engine(
        make_driver(kind, tmp_path), registry, recovery=False, delayer=False
    ) as eng:
        yield eng


@pytest.fixture
def no_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Disable the watcher's periodic re-query: only a real wake-up can deliver in time."""
    monkeypatch.setattr(flowstate.iterator, "WATCH_REFRESH", 3600.0)


def waiting_probe(monkeypatch: pytest.MonkeyPatch, driver: fs.Driver) -> asyncio.Event:
    """An event set whenever a watcher of ``driver`` starts waiting at the head: on a query
    of its own's wake-up, or subscribed to the driver's shared tail (flowstate.tail)."""
    event = asyncio.Event()
    original = driver.wait_for_commit

    async def wait_for_commit(*args: Any, **kwargs: Any) -> None:
        event.set()
        await original(*args, **kwargs)

    monkeypatch.setattr(driver, "wait_for_commit", wait_for_commit)
    pushed = flowstate.iterator.Watcher._wait_pushed

    async def wait_pushed(self: fs.Watcher) -> None:
        if self._driver is driver:
            event.set()
        await pushed(self)

    monkeypatch.setattr(flowstate.iterator.Watcher, "_wait_pushed", wait_pushed)
    return event


def new(state_id: str, **labels: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id, labels=dict(labels)))


async def read_log(engine: fs.Engine) -> list[fs.State]:
    return [s async for s in engine.iter(fs.get_states())]


async def query(engine: fs.Engine, cmd: fs.GetStatesCmd) -> tuple[list[tuple[str, int]], bool]:
    await engine.do(cmd)
    assert cmd.result is not None
    return [(s.id, s.rev) for s in cmd.result.states], cmd.result.more


async def within(aw: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(aw, TIMEOUT)


# ---------------------------------------------------------------------------------------------
# do / execute / shutdown


async def test_do_without_commands(engine: fs.Engine) -> None:
    with pytest.raises(fs.ValidationError) as info:
        await engine.do()
    assert info.value.field == "cmds"


async def test_execute_on_stopped_engine(
    kind: str, tmp_path: Path, registry: fs.FlowRegistry
) -> None:
    calls: list[str] = []

    async def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append(ctx.current.id)
        return fs.noop()

    registry.set_flow("f", flow)
    engine = fs.Engine(make_driver(kind, tmp_path), registry, recovery=False, delayer=False)
    await engine.start()
    ctx = new("s")
    await engine.do(fs.transit(ctx, "f"))
    await engine.shutdown()
    with pytest.raises(fs.EngineStoppedError):
        await engine.execute(ctx)
    with pytest.raises(fs.EngineStoppedError):
        await engine.do(fs.execute(ctx))
    assert calls == []


@pytest.mark.parametrize("how", ["execute", "background"])
async def test_shutdown_waits_for_running_execution(
    kind: str, tmp_path: Path, registry: fs.FlowRegistry, how: str
) -> None:
    entered = asyncio.Event()
    finished: list[str] = []

    async def waiter(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        entered.set()
        await ctx.wait_done()
        for _ in range(20):  # a few more steps after the signal: shutdown must wait for them
            await asyncio.sleep(0)
        finished.append(ctx.current.id)
        return fs.noop()

    registry.set_flow("wait", waiter)
    engine = fs.Engine(make_driver(kind, tmp_path), registry, recovery=False, delayer=False)
    await engine.start()
    ctx = new("w")
    await engine.do(fs.commit(fs.transit(ctx, "wait")))
    task: asyncio.Task[None] | None = None
    if how == "execute":
        task = asyncio.create_task(engine.execute(ctx))
    else:
        await engine.do(fs.execute(ctx))
    await within(entered.wait())
    assert finished == []
    await within(engine.shutdown())
    assert finished == ["w"]
    if task is not None:
        assert await within(task) is None


async def test_flow_returning_conflicting_commit_ends_quietly(
    engine: fs.Engine, registry: fs.FlowRegistry
) -> None:
    calls: list[str] = []
    other_rev: list[int] = []

    async def first(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append("first")
        other = ctx.copy()  # another actor moves the state on meanwhile
        await engine.do(fs.commit(fs.park(other)))
        other_rev.append(other.committed.rev)
        return fs.commit(fs.transit(ctx, "second"))

    async def second(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append("second")
        return fs.noop()

    registry.set_flow("first", first)
    registry.set_flow("second", second)
    ctx = new("c")
    await engine.do(fs.commit(fs.transit(ctx, "first")))
    assert await within(engine.execute(ctx)) is None
    assert calls == ["first"]
    assert ctx.committed.rev == 1  # the conflicting commit did not touch the ctx
    assert [(s.id, s.rev, s.transition.to) for s in await read_log(engine)] == [
        ("c", 1, "first"),
        ("c", other_rev[0], ""),
    ]


async def test_plain_function_flow_runs_in_worker_thread(
    engine: fs.Engine, registry: fs.FlowRegistry
) -> None:
    threads: list[int] = []

    def plain(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        threads.append(threading.get_ident())
        side = new("side")
        engine.do_sync(fs.commit(fs.park(side)), timeout=TIMEOUT)
        loaded = fs.StateCtx()
        engine.do_sync(fs.get_state_by_id(loaded, "side"), timeout=TIMEOUT)
        assert loaded.committed.rev == side.committed.rev > 0
        return fs.commit(fs.park(ctx))

    registry.set_flow("plain", plain)
    ctx = new("p")
    await engine.do(fs.commit(fs.transit(ctx, "plain")))
    await within(engine.execute(ctx))
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()
    assert [(s.id, s.transition.to) for s in await read_log(engine)] == [
        ("p", "plain"),
        ("side", ""),
        ("p", ""),
    ]
    assert ctx.committed.rev == 3
    with pytest.raises(fs.FlowstateError):
        engine.do_sync(fs.noop())  # on the loop's own thread it would deadlock


async def test_background_execute_works_on_a_deep_copy(
    engine: fs.Engine, registry: fs.FlowRegistry
) -> None:
    mutated = asyncio.Event()
    seen: list[tuple[Any, ...]] = []
    seen_ctx: list[fs.StateCtx] = []
    recorded = asyncio.Event()

    async def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        await mutated.wait()
        d = ctx.datas["d"]
        seen.append(
            (
                dict(ctx.current.annotations),
                dict(ctx.current.labels),
                ctx.current.transition.to,
                dict(ctx.current.transition.annotations),
                d.blob,
                dict(d.annotations),
                sorted(ctx.datas),
            )
        )
        seen_ctx.append(ctx)
        recorded.set()
        return fs.noop()

    registry.set_flow("f", flow)
    ctx = fs.StateCtx(current=fs.State(id="bg", annotations={"x": "orig"}, labels={"l": "orig"}))
    ctx.datas["d"] = fs.Data(b"orig", {"a": "orig"})
    await engine.do(fs.commit(fs.transit(ctx, "f", {"t": "orig"})))
    await engine.do(fs.execute(ctx))

    ctx.current.annotations["x"] = "mut"
    ctx.current.labels["l"] = "mut"
    ctx.current.transition.to = "elsewhere"
    ctx.current.transition.annotations["t"] = "mut"
    ctx.datas["d"].blob = b"mut"
    ctx.datas["d"].annotations["a"] = "mut"
    ctx.datas["e"] = fs.Data(b"new")
    mutated.set()

    await within(recorded.wait())
    assert seen == [
        ({"x": "orig"}, {"l": "orig"}, "f", {"t": "orig"}, b"orig", {"a": "orig"}, ["d"])
    ]
    assert seen_ctx[0] is not ctx


# ---------------------------------------------------------------------------------------------
# iterators and watchers


async def test_iter_stops_at_head(engine: fs.Engine) -> None:
    assert await within(read_log(engine)) == []
    await engine.do(fs.commit(*(fs.park(new(f"s{i}")) for i in range(5))))
    for limit in (1, 2, 5, 50):
        it = engine.iter(fs.get_states(limit=limit))
        got = await within(_collect(it))
        assert [(s.id, s.rev) for s in got] == [(f"s{i}", i + 1) for i in range(5)]
        assert it.since_rev == 5
    it = engine.iter(fs.get_states(since_rev=3))
    assert [s.rev for s in await within(_collect(it))] == [4, 5]


async def _collect(it: AsyncIterator[fs.State]) -> list[fs.State]:
    return [s async for s in it]


async def test_watch_ends_when_engine_shuts_down(
    kind: str, tmp_path: Path, registry: fs.FlowRegistry, no_refresh: None
) -> None:
    engine = fs.Engine(make_driver(kind, tmp_path), registry, recovery=False, delayer=False)
    await engine.start()
    await engine.do(fs.commit(fs.park(new("a"))))
    got: list[str] = []
    first = asyncio.Event()

    async def consume() -> None:
        async with engine.watch(fs.get_states()) as watcher:
            async for state in watcher:
                got.append(state.id)
                first.set()

    task = asyncio.create_task(consume())
    try:
        await within(first.wait())
        await within(engine.shutdown())
        await within(task)
    finally:
        task.cancel()
    assert got == ["a"]


async def test_watch_ends_when_closed(
    engine: fs.Engine, monkeypatch: pytest.MonkeyPatch, no_refresh: None
) -> None:
    watcher = engine.watch(fs.get_states())
    probe = waiting_probe(monkeypatch, engine.driver)
    task = asyncio.create_task(_collect(watcher))
    try:
        await within(probe.wait())
        watcher.close()
        assert await within(task) == []
    finally:
        task.cancel()


async def test_watcher_woken_by_commit_after_head(
    engine: fs.Engine, monkeypatch: pytest.MonkeyPatch, no_refresh: None
) -> None:
    await engine.do(fs.commit(fs.park(new("old"))))
    probe = waiting_probe(monkeypatch, engine.driver)
    async with engine.watch(fs.get_states()) as watcher:
        assert (await within(anext(watcher))).id == "old"
        task = asyncio.ensure_future(anext(watcher))
        try:
            await within(probe.wait())  # the watcher is waiting at the head
            assert not task.done()
            fresh = new("fresh")
            await engine.do(fs.commit(fs.park(fresh)))
            state = await within(task)
        finally:
            task.cancel()
    assert (state.id, state.rev) == ("fresh", fresh.committed.rev)


async def test_since_latest_watcher_without_matches_gets_every_later_match(
    engine: fs.Engine, monkeypatch: pytest.MonkeyPatch, no_refresh: None
) -> None:
    await engine.do(fs.commit(fs.park(new("x1", k="other")), fs.park(new("x2"))))
    probe = waiting_probe(monkeypatch, engine.driver)
    got: list[tuple[str, int]] = []
    two = asyncio.Event()

    async def consume(watcher: fs.Watcher) -> None:
        async for state in watcher:
            got.append((state.id, state.rev))
            if len(got) == 2:
                two.set()

    async with engine.watch(fs.get_states({"k": "v"}, since_latest=True)) as watcher:
        task = asyncio.create_task(consume(watcher))
        try:
            await within(probe.wait())
            m1, n, m2 = new("m1", k="v"), new("n", k="other"), new("m2", k="v")
            await engine.do(fs.commit(fs.park(m1)))
            await engine.do(fs.commit(fs.park(n)))
            await engine.do(fs.commit(fs.park(m2)))
            await within(two.wait())
        finally:
            task.cancel()
    assert got == [("m1", 3), ("m2", 5)]


# ---------------------------------------------------------------------------------------------
# get_states


async def test_get_states_latest_only_and_more_are_exact(engine: fs.Engine) -> None:
    a, b, c, d = new("a", g="1"), new("b", g="1"), new("c"), new("d")
    await engine.do(fs.commit(fs.park(a)))  # 1
    await engine.do(fs.commit(fs.park(b)))  # 2
    await engine.do(fs.commit(fs.transit(a, "x")))  # 3, still g=1
    await engine.do(fs.commit(fs.park(c)))  # 4
    b.current.labels = {}
    await engine.do(fs.commit(fs.transit(b, "y")))  # 5, no longer g=1
    await engine.do(fs.commit(fs.park(d)))  # 6

    latest = [("a", 3), ("c", 4), ("b", 5), ("d", 6)]
    assert await query(engine, fs.get_states(latest_only=True)) == (latest, False)
    assert await query(engine, fs.get_states(latest_only=True, limit=4)) == (latest, False)
    assert await query(engine, fs.get_states(latest_only=True, limit=3)) == (latest[:3], True)
    assert await query(engine, fs.get_states(latest_only=True, limit=1)) == (latest[:1], True)
    assert await query(engine, fs.get_states(latest_only=True, since_rev=3, limit=2)) == (
        latest[1:3],
        True,
    )
    assert await query(engine, fs.get_states(latest_only=True, since_rev=4, limit=2)) == (
        latest[2:],
        False,
    )
    assert await query(engine, fs.get_states({"g": "1"}, latest_only=True, limit=1)) == (
        [("a", 3)],
        False,
    )
    assert await query(engine, fs.get_states({"g": "1"}, limit=2)) == ([("a", 1), ("b", 2)], True)
    assert await query(engine, fs.get_states({"g": "1"}, limit=3)) == (
        [("a", 1), ("b", 2), ("a", 3)],
        False,
    )
    everything = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5), ("d", 6)]
    assert await query(engine, fs.get_states(limit=6)) == (everything, False)
    assert await query(engine, fs.get_states(limit=5)) == (everything[:5], True)
    assert await query(engine, fs.get_states(since_rev=5, limit=1)) == ([("d", 6)], False)
    assert await query(engine, fs.get_states(since_rev=6)) == ([], False)


async def test_get_states_limit_zero_means_50(engine: fs.Engine) -> None:
    await engine.do(fs.commit(*(fs.park(new(f"s{i:02}")) for i in range(60))))
    states, more = await query(engine, fs.get_states(limit=0))
    assert [rev for _, rev in states] == list(range(1, 51))
    assert more is True
    states, more = await query(engine, fs.get_states(since_rev=50, limit=0))
    assert [rev for _, rev in states] == list(range(51, 61))
    assert more is False
    assert len(await within(_collect(engine.iter(fs.get_states(limit=0))))) == 60


async def test_label_query_latest_only_skips_states_that_moved_away(engine: fs.Engine) -> None:
    a = new("a", k="v")
    await engine.do(fs.commit(fs.park(a)))
    a.current.labels["k"] = "w"
    await engine.do(fs.commit(fs.park(a)))
    assert await query(engine, fs.get_states({"k": "v"}, latest_only=True)) == ([], False)
    assert await query(engine, fs.get_states({"k": "v"})) == ([("a", 1)], False)
    assert await query(engine, fs.get_states({"k": "w"}, latest_only=True)) == ([("a", 2)], False)
    assert await query(
        engine, fs.get_states(or_labels=[{"k": "v"}, {"k": "w"}], latest_only=True)
    ) == ([("a", 2)], False)


# ---------------------------------------------------------------------------------------------
# commit and ctxs


async def test_commit_sequential_visibility_then_unstack(engine: fs.Engine) -> None:
    a, b = new("a"), new("b")
    await engine.do(fs.commit(fs.park(a), fs.stack(b, a, "k"), fs.transit(b, "x")))
    assert (a.committed.rev, b.committed.rev) == (1, 2)
    assert b.committed.annotations["k"]  # the stacked a, with its new rev

    loaded = fs.StateCtx()
    await engine.do(fs.get_state_by_id(loaded, "b"))
    target = fs.StateCtx()
    await engine.do(fs.unstack(loaded, target, "k"))
    assert loaded.current.annotations["k"] == ""
    assert target.committed.rev == 1 and target.current.id == "a"
    await engine.do(fs.commit(fs.park(target), fs.park(loaded)))
    assert (target.committed.rev, loaded.committed.rev) == (3, 4)


async def test_commit_updates_ctxs_only_after_success(engine: fs.Engine) -> None:
    stale = new("s")
    await engine.do(fs.commit(fs.park(stale.copy())))  # s exists: stale (rev 0) conflicts
    a, b = new("a"), new("b")
    before = [a.deep_copy(), b.deep_copy(), stale.deep_copy()]
    with pytest.raises(fs.RevMismatchError) as info:
        await engine.do(
            fs.commit(fs.park(a), fs.stack(b, a, "k"), fs.transit(b, "x"), fs.park(stale))
        )
    assert info.value.ids == ["s"]
    assert [a, b, stale] == before
    assert "k" not in b.current.annotations
    assert [(s.id, s.rev) for s in await read_log(engine)] == [("s", 1)]


# ---------------------------------------------------------------------------------------------
# data


async def test_data_round_trips_byte_for_byte(engine: fs.Engine) -> None:
    big = random.Random(7).randbytes(1 << 20)
    text = "héllo wörld\n\u2603 ✓ \x00 end".encode()
    ctx = new("d")
    ctx.datas["bin"] = fs.Data(big)
    ctx.datas["bin"].binary = True
    ctx.datas["txt"] = fs.Data(text, {"note": "text"})
    ctx.datas["empty"] = fs.Data(b"")
    await engine.do(
        fs.commit(
            fs.store_data(ctx, "bin"),
            fs.store_data(ctx, "txt"),
            fs.store_data(ctx, "empty"),
            fs.park(ctx),
        )
    )
    outside = fs.Data(bytes(range(256)) * 3)
    outside.binary = True
    ctx.datas["all"] = outside
    await engine.do(fs.store_data(ctx, "all"), fs.commit(fs.park(ctx)))

    loaded = fs.StateCtx()
    await engine.do(fs.get_state_by_id(loaded, "d"))
    for alias in ("bin", "txt", "empty", "all"):
        await engine.do(fs.get_data(loaded, alias))
    expected = {"bin": big, "txt": text, "empty": b"", "all": bytes(range(256)) * 3}
    for alias, blob in expected.items():
        data = loaded.datas[alias]
        assert type(data.blob) is bytes and data.blob == blob, alias
        assert data.annotations[CHECKSUM] == fs.data.checksum(blob)
        assert data.rev == ctx.datas[alias].rev > 0
    assert loaded.datas["bin"].binary and loaded.datas["all"].binary
    assert not loaded.datas["txt"].binary
    assert loaded.datas["txt"].annotations["note"] == "text"


async def test_data_without_checksum_is_dirty(engine: fs.Engine) -> None:
    ctx = new("d")
    data = fs.Data(b"one")
    ctx.datas["d"] = data
    await engine.do(fs.store_data(ctx, "d"))
    first = data.rev
    assert first > 0 and ctx.current.annotations["flowstate.data.d"] == str(first)

    await engine.do(fs.store_data(ctx, "d"))  # clean: not stored again
    assert data.rev == first

    del data.annotations[CHECKSUM]  # stored, no checksum, same blob: dirty
    await engine.do(fs.store_data(ctx, "d"))
    second = data.rev
    assert second > first
    assert data.annotations[CHECKSUM] == fs.data.checksum(b"one")

    del data.annotations[CHECKSUM]  # stored, no checksum, edited blob: dirty
    data.blob = b"two"
    await engine.do(fs.store_data(ctx, "d"))
    third = data.rev
    assert third > second
    assert ctx.current.annotations["flowstate.data.d"] == str(third)

    data.blob = b"three"  # checksum of another blob: dirty
    data.annotations[CHECKSUM] = "not a number"
    await engine.do(fs.commit(fs.store_data(ctx, "d"), fs.park(ctx)))
    assert data.rev > third

    for rev, blob in [(first, b"one"), (second, b"one"), (third, b"two"), (data.rev, b"three")]:
        probe = new("probe")
        probe.current.annotations["flowstate.data.d"] = str(rev)
        await engine.do(fs.get_data(probe, "d"))
        assert probe.datas["d"].blob == blob


def test_xxhash64_vectors() -> None:
    assert fs.data.checksum(b"foo") == "3728699739546630719"
    assert fs.data.checksum(b"50") == "11329650324634456925"
    assert fs.data.checksum(b"") == "17241709254077376921"
    assert fs.data.checksum(b"aContent") == "339875699959141484"


# ---------------------------------------------------------------------------------------------
# the SQLite driver keeps SQLite off the event loop


class TracingSqliteDriver(fs.SqliteDriver):
    """Records the thread of every connect and every SQL statement."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads: set[int] = set()
        self.statements = 0
        self._lock = threading.Lock()

    def _record(self, _statement: str = "") -> None:
        with self._lock:
            self.threads.add(threading.get_ident())
            self.statements += 1

    def _connect(self) -> Any:
        self._record()
        conn = super()._connect()
        conn.set_trace_callback(self._record)
        return conn


async def test_sqlite_never_runs_sqlite_on_the_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_refresh: None
) -> None:
    loop_thread = threading.get_ident()
    driver = TracingSqliteDriver(tmp_path / "traced.db")
    registry = fs.FlowRegistry()

    async def step(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        ctx.datas["d"] = fs.Data(b"payload")
        await engine.do(fs.store_data(ctx, "d"))
        return fs.commit(fs.transit(ctx, "plain"))

    def plain(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        engine.do_sync(fs.get_data(ctx, "d"))
        return fs.commit(fs.park(ctx))

    registry.set_flow("step", step)
    registry.set_flow("plain", plain)
    async with fs.Engine(driver, registry, recovery=False, delayer=False) as engine:
        probe = waiting_probe(monkeypatch, driver)
        watcher = engine.watch(fs.get_states({"w": "1"}))
        watched = asyncio.ensure_future(anext(watcher))
        for i in range(5):
            ctx = new(f"s{i}", n=str(i))
            await engine.do(fs.commit(fs.transit(ctx, "step")))
            await engine.execute(ctx)
        bg = new("bg")
        await engine.do(fs.commit(fs.transit(bg, "step")), fs.execute(bg))
        loaded = fs.StateCtx()
        await engine.do(
            fs.get_state_by_id(loaded, "s1"), fs.get_state_by_labels(loaded, {"n": "2"})
        )
        await engine.do(fs.get_data(loaded, "d"))
        await engine.do(fs.delay(loaded, "step", timedelta(hours=1)))
        await engine.do(fs.get_delayed_states(until=datetime.now(UTC) + timedelta(days=1)))
        await query(engine, fs.get_states({"n": "3"}, latest_only=True))
        await within(_collect(engine.iter(fs.get_states(limit=3))))
        await within(probe.wait())
        await engine.do(fs.commit(fs.park(new("watched", w="1"))))
        assert (await within(watched)).id == "watched"
        watcher.close()
    assert driver.statements > 50
    assert driver.threads, "nothing was traced"
    assert loop_thread not in driver.threads


class _ClosingProxy:
    """Stands in for a sqlite3 connection and records the thread that closes it."""

    def __init__(self, conn: sqlite3.Connection, closes: list[int]) -> None:
        self._conn = conn
        self._closes = closes

    def close(self) -> None:
        self._closes.append(threading.get_ident())
        self._conn.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


async def test_sqlite_closes_connections_off_the_loop_thread(tmp_path: Path) -> None:
    closes: list[int] = []

    class ClosingDriver(fs.SqliteDriver):
        def _connect(self) -> Any:
            return _ClosingProxy(super()._connect(), closes)

    async with fs.Engine(
        ClosingDriver(tmp_path / "closing.db"), recovery=False, delayer=False
    ) as engine:
        await engine.do(fs.commit(fs.park(new("a"))))
        await engine.do(fs.get_state_by_id(fs.StateCtx(), "a"))
    assert len(closes) >= 2  # the writer and at least one reader
    assert threading.get_ident() not in closes
