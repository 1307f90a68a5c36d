"""SqliteDriver queries: exact results, index-served plans, scanned_rev, the schema upgrade.

Speed itself lives in benchmarks/sqlite_queries.py; here the plans SQLite chooses are checked
(``EXPLAIN QUERY PLAN`` of every statement a query runs: no full scan of a table), which is
what keeps a query from growing with the store.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
from flowstate.clock import ManualClock, to_millis
from flowstate.drivers import sqlite as sqlite_driver
from flowstate.drivers.sqlite import SCHEMA_VERSION, SqliteDriver
from flowstate.drivers.sqljson import dumps_map
from flowstate.errors import FlowstateError, NotFoundError

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[SqliteDriver]:
    d = SqliteDriver(tmp_path / "q.db", synchronous="OFF", clock=ManualClock(T0))
    await d.open()
    try:
        yield d
    finally:
        await d.close()


async def put(d: fs.Driver, ctx: fs.StateCtx, labels: dict[str, str] | None = None) -> int:
    if labels is not None:
        ctx.current.labels = dict(labels)
    await d.commit(fs.commit(fs.park(ctx)))
    return ctx.committed.rev


# --------------------------------------------------------------------------------------------
# scanned_rev


async def test_a_filter_matching_nothing_reports_the_head_as_scanned(
    driver: SqliteDriver,
) -> None:
    for i in range(5):
        await put(driver, fs.StateCtx(current=fs.State(id=f"s{i}")), {"kind": "order"})
    head = await driver.head_rev()
    for cmd in (
        fs.GetStatesCmd(labels=[{"kind": "remote"}]),
        fs.GetStatesCmd(labels=[{"kind": "remote"}], latest_only=True),
        fs.GetStatesCmd(labels=[{"kind": "remote"}], since_rev=-1),
        fs.GetStatesCmd(since_time=T0 + timedelta(days=1)),
        fs.GetStatesCmd(since_rev=head),
    ):
        r = await driver.get_states(cmd)
        assert (r.states, r.more, r.scanned_rev) == ([], False, head), cmd


async def test_scanned_rev_is_the_head_of_a_last_page_and_zero_before(
    driver: SqliteDriver,
) -> None:
    for i in range(5):
        await put(driver, fs.StateCtx(current=fs.State(id=f"s{i}")), {"kind": "order"})
    head = await driver.head_rev()
    page = await driver.get_states(fs.GetStatesCmd(labels=[{"kind": "order"}], limit=3))
    assert page.more and page.scanned_rev == 0  # 0: unknown, resume after the last state
    last = await driver.get_states(
        fs.GetStatesCmd(labels=[{"kind": "order"}], since_rev=page.states[-1].rev, limit=3)
    )
    assert [s.id for s in last.states] == ["s3", "s4"]
    assert not last.more and last.scanned_rev == head


# --------------------------------------------------------------------------------------------
# exact results: every query against a model computed from the whole log


def expected(log: list[fs.State], cmd: fs.GetStatesCmd) -> tuple[list[int], bool]:
    """behaviour.md 2.7 by brute force over every stored version."""
    latest: dict[str, int] = {}
    for s in log:
        latest[s.id] = s.rev
    sets = cmd.labels
    if any(not s for s in sets):
        sets = []

    def labels_match(s: fs.State) -> bool:
        return not sets or any(all(s.labels.get(k) == v for k, v in ls.items()) for ls in sets)

    def time_match(s: fs.State) -> bool:
        assert s.committed_at is not None
        return cmd.since_time is None or to_millis(s.committed_at) >= to_millis(cmd.since_time)

    since = cmd.since_rev
    if since < 0:
        anchors = [s.rev for s in log if labels_match(s) and time_match(s)]
        if not anchors:
            return [], False
        since = max(anchors) - 1
    revs = [
        s.rev
        for s in log
        if s.rev > since
        and labels_match(s)
        and time_match(s)
        and (not cmd.latest_only or latest[s.id] == s.rev)
    ]
    return revs[: cmd.limit], len(revs) > cmd.limit


def random_queries(rng: random.Random, head: int, n: int) -> Iterator[fs.GetStatesCmd]:
    values = {"kind": ["a", "b", "c"], "tenant": ["t0", "t1"], "key": ["k1", "k2", "k3"]}

    def some_set() -> dict[str, str]:
        keys = rng.sample(sorted(values), rng.randint(0 if rng.random() < 0.05 else 1, 2))
        return {k: rng.choice(values[k]) for k in keys}

    for _ in range(n):
        cmd = fs.GetStatesCmd(
            since_rev=rng.choice([0, 0, -1, rng.randint(0, head)]),
            labels=[some_set() for _ in range(rng.choice([0, 1, 1, 1, 2, 3]))],
            latest_only=rng.random() < 0.5,
            limit=rng.choice([1, 3, 10, 1000]),
        )
        if rng.random() < 0.3:
            cmd.since_time = T0 + timedelta(seconds=rng.randint(-5, 80))
        yield cmd


async def fill_randomly(d: fs.Driver, clock: ManualClock, rng: random.Random, n: int) -> None:
    """``n`` commits of 1-3 states on 12 ids, labels that change, appear and disappear, and a
    clock that mostly moves on but sometimes goes back."""
    ctxs = [fs.StateCtx(current=fs.State(id=f"s{i}")) for i in range(12)]
    for _ in range(n):
        clock.set(clock.now() + timedelta(seconds=rng.choice([1, 1, 2, 0, -3])))
        chosen = rng.sample(ctxs, rng.randint(1, 3))
        for ctx in chosen:
            labels: dict[str, str] = {}
            if rng.random() < 0.8:
                labels["kind"] = rng.choice(["a", "b", "c"])
            if rng.random() < 0.5:
                labels["tenant"] = rng.choice(["t0", "t1"])
            if rng.random() < 0.3:
                labels["key"] = rng.choice(["k1", "k2", "k3"])
            ctx.current.labels = labels
        await d.commit(fs.commit(*(fs.park(c) for c in chosen)))


async def all_versions(d: fs.Driver) -> list[fs.State]:
    r = await d.get_states(fs.GetStatesCmd(limit=100_000))
    return r.states


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_queries_match_the_model(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    clock = ManualClock(T0)
    d = SqliteDriver(tmp_path / "q.db", synchronous="OFF", clock=clock)
    await d.open()
    try:
        await fill_randomly(d, clock, rng, 60)
        log = await all_versions(d)
        head = await d.head_rev()
        assert [s.rev for s in log] == list(range(1, head + 1))
        for cmd in random_queries(rng, head, 300):
            r = await d.get_states(cmd.copy())
            want = expected(log, cmd)
            assert ([s.rev for s in r.states], r.more) == want, cmd
            assert r.scanned_rev == (0 if r.more else head)
        for labels in ({"kind": "a"}, {"kind": "b", "tenant": "t1"}, {"key": "k3"}, {}):
            hits = [s for s in log if all(s.labels.get(k) == v for k, v in labels.items())]
            got = await d.get_state_by_labels(labels)
            assert got == hits[-1]
        with pytest.raises(NotFoundError):
            await d.get_state_by_labels({"kind": "zzz"})
        for i in range(12):
            versions = [s for s in log if s.id == f"s{i}"]
            if versions:
                assert await d.get_state(f"s{i}", 0) == versions[-1]
    finally:
        await d.close()


# --------------------------------------------------------------------------------------------
# plans


def traced(conn: sqlite3.Connection, run: Callable[[], Any]) -> list[str]:
    """The statements ``run`` executes on ``conn``, with their values inlined."""
    stmts: list[str] = []
    conn.set_trace_callback(stmts.append)
    try:
        run()
    except NotFoundError:
        pass  # a lookup that finds nothing ran its statements all the same
    finally:
        conn.set_trace_callback(None)
    return [s for s in stmts if s not in ("BEGIN", "COMMIT")]


def full_scans(conn: sqlite3.Connection, sql: str) -> list[str]:
    """The tables ``sql`` reads from end to end (scans of a subquery's rows are not that)."""
    plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql)]
    return [step for step in plan if step.startswith("SCAN ") and "subquery" not in step]


QUERIES: dict[str, Callable[[sqlite3.Connection], Any]] = {
    "latest_only, labels": lambda c: sqlite_driver._get_states(
        c, fs.GetStatesCmd(labels=[{"kind": "remote"}], latest_only=True)
    ),
    "latest_only, two pairs or another set": lambda c: sqlite_driver._get_states(
        c,
        fs.GetStatesCmd(
            labels=[{"kind": "remote", "tenant": "t1"}, {"key": "k"}], latest_only=True
        ),
    ),
    "latest_only, no labels": lambda c: sqlite_driver._get_states(
        c, fs.GetStatesCmd(latest_only=True, since_rev=3)
    ),
    "labels": lambda c: sqlite_driver._get_states(c, fs.GetStatesCmd(labels=[{"kind": "remote"}])),
    "since latest, labels": lambda c: sqlite_driver._get_states(
        c, fs.GetStatesCmd(labels=[{"kind": "order"}], since_rev=-1)
    ),
    "since_time": lambda c: sqlite_driver._get_states(
        c, fs.GetStatesCmd(since_time=T0 + timedelta(seconds=3))
    ),
    "since_time, nothing that recent": lambda c: sqlite_driver._get_states(
        c, fs.GetStatesCmd(since_time=T0 + timedelta(days=1))
    ),
    "since_time, labels, latest_only": lambda c: sqlite_driver._get_states(
        c,
        fs.GetStatesCmd(
            since_time=T0 + timedelta(seconds=3), labels=[{"kind": "remote"}], latest_only=True
        ),
    ),
    "get_state_by_labels": lambda c: sqlite_driver._get_state_by_labels(c, {"key": "k1"}),
    "get_state_by_labels, two pairs": lambda c: sqlite_driver._get_state_by_labels(
        c, {"key": "k1", "kind": "order"}
    ),
    "get_state, latest": lambda c: sqlite_driver._get_state(c, "s1", 0),
}


async def fill_for_plans(d: SqliteDriver) -> None:
    for i in range(20):
        labels = {"kind": "remote" if i % 7 == 0 else "order", "key": f"k{i}"}
        ctx = fs.StateCtx(current=fs.State(id=f"s{i}"))
        for _ in range(3):
            await put(d, ctx, labels)


@pytest.mark.parametrize("name", list(QUERIES))
async def test_queries_plan_no_full_scan(driver: SqliteDriver, name: str) -> None:
    await fill_for_plans(driver)
    conn = sqlite3.connect(driver.path, isolation_level=None)
    try:
        stmts = traced(conn, lambda: QUERIES[name](conn))
        assert stmts
        for sql in stmts:
            assert full_scans(conn, sql) == [], sql
    finally:
        conn.close()


def vm_steps(conn: sqlite3.Connection, run: Callable[[], Any]) -> int:
    """How many SQLite VM instructions (in tens) ``run`` executes on ``conn``: the work a
    query does, counted rather than timed."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    conn.set_progress_handler(tick, 10)
    try:
        run()
    except NotFoundError:
        pass
    finally:
        conn.set_progress_handler(None, 0)
    return steps


async def grow(d: SqliteDriver, clock: ManualClock, versions: int, first: int) -> None:
    """Add ``versions`` versions the queries of QUERIES must not read: half on new ids whose
    labels do not match, half on 5 ids that keep the rare label (only their latest versions
    may be read by a latest_only query)."""
    half = versions // 2
    for start in range(first, first + half, 500):
        ctxs = [
            fs.StateCtx(current=fs.State(id=f"f{i}", labels={"kind": "order", "key": f"f{i}"}))
            for i in range(start, min(first + half, start + 500))
        ]
        clock.advance(1)
        await d.commit(fs.commit(*(fs.park(c) for c in ctxs)))
    churn = [await d.get_state(f"s{i}", 0) for i in (0, 7, 14)]
    ctxs = [s.to_ctx() for s in churn]
    for _ in range(half // len(ctxs)):
        clock.advance(1)
        await d.commit(fs.commit(*(fs.park(c) for c in ctxs)))


@pytest.mark.parametrize("name", list(QUERIES))
async def test_query_work_does_not_grow_with_the_store(tmp_path: Path, name: str) -> None:
    clock = ManualClock(T0)
    d = SqliteDriver(tmp_path / "grow.db", synchronous="OFF", clock=clock)
    await d.open()
    try:
        await fill_for_plans(d)
        steps = []
        for versions, first in ((300, 0), (3000, 1000)):
            await grow(d, clock, versions, first)
            conn = sqlite3.connect(d.path, isolation_level=None)
            try:
                steps.append(vm_steps(conn, lambda: QUERIES[name](conn)))  # noqa: B023
            finally:
                conn.close()
        small, big = steps
        assert big <= small * 1.3 + 20, f"{name}: {small} -> {big} VM steps for 10x the log"
    finally:
        await d.close()


# --------------------------------------------------------------------------------------------
# the schema upgrade

# The schema of the stores written before versioning (user_version 0), as that driver made it.
UNVERSIONED_SCHEMA = """
CREATE TABLE flowstate_states (
    rev INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    committed_at INTEGER NOT NULL,
    annotations TEXT NOT NULL,
    labels TEXT NOT NULL,
    transition_to TEXT NOT NULL,
    transition_annotations TEXT NOT NULL
);
CREATE INDEX flowstate_states_by_id ON flowstate_states (id, rev);
CREATE TABLE flowstate_labels (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    rev INTEGER NOT NULL,
    PRIMARY KEY (key, value, rev)
) WITHOUT ROWID;
CREATE TABLE flowstate_data (
    rev INTEGER PRIMARY KEY,
    annotations TEXT NOT NULL,
    blob BLOB NOT NULL
);
CREATE TABLE flowstate_delayed (
    offset INTEGER PRIMARY KEY,
    execute_at INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX flowstate_delayed_by_time ON flowstate_delayed (execute_at, offset);
"""


def write_unversioned_store(path: Path, rng: random.Random, n: int) -> None:
    """``n`` versions of 10 ids written as the unversioned driver wrote them (labels that
    change and disappear, a clock that sometimes goes back)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(UNVERSIONED_SCHEMA)
    conn.execute("BEGIN")
    at = to_millis(T0)
    for _ in range(n):
        at += rng.choice([1000, 1000, 0, -3000])
        labels: dict[str, str] = {}
        if rng.random() < 0.8:
            labels["kind"] = rng.choice(["a", "b"])
        if rng.random() < 0.4:
            labels["tenant"] = rng.choice(["t0", "t1"])
        cur = conn.execute(
            "INSERT INTO flowstate_states (id, committed_at, annotations, labels, transition_to, "
            "transition_annotations) VALUES (?, ?, '{}', ?, '', '{}')",
            (f"s{rng.randrange(10)}", at, dumps_map(labels)),
        )
        conn.executemany(
            "INSERT INTO flowstate_labels (key, value, rev) VALUES (?, ?, ?)",
            [(k, v, cur.lastrowid) for k, v in labels.items()],
        )
    conn.execute("COMMIT")
    conn.close()


async def test_an_unversioned_store_is_upgraded_in_place_and_reads_right(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "old.db"
    write_unversioned_store(path, rng, 150)
    clock = ManualClock(T0 + timedelta(seconds=200))
    d = SqliteDriver(path, synchronous="OFF", clock=clock)
    await d.open()
    try:
        log = await all_versions(d)
        assert len(log) == 150
        head = await d.head_rev()
        for cmd in random_queries(rng, head, 300):
            r = await d.get_states(cmd.copy())
            assert ([s.rev for s in r.states], r.more) == expected(log, cmd), cmd
        # the upgraded store takes commits, checked against the latest revs it derived
        for i in range(10):
            latest = await d.get_state(f"s{i}", 0)
            ctx = latest.to_ctx()
            ctx.current.labels = {"kind": "c"} if i % 2 else {}
            await d.commit(fs.commit(fs.park(ctx)))
        stale = fs.StateCtx(current=fs.State(id="s0"), committed=fs.State(id="s0", rev=1))
        with pytest.raises(fs.RevMismatchError):
            await d.commit(fs.commit(fs.park(stale)))
        log = await all_versions(d)
        head = await d.head_rev()
        for cmd in random_queries(rng, head, 300):
            r = await d.get_states(cmd.copy())
            assert ([s.rev for s in r.states], r.more) == expected(log, cmd), cmd
    finally:
        await d.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


async def test_a_fresh_store_gets_the_current_version_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    for _ in range(2):
        d = SqliteDriver(path, synchronous="OFF")
        await d.open()
        await put(d, fs.StateCtx(current=fs.State(id=f"s{await d.head_rev()}")), {"k": "v"})
        await d.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("SELECT count(*) FROM flowstate_latest_labels").fetchone()[0] == 2
    finally:
        conn.close()


async def test_a_store_of_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    d = SqliteDriver(path)
    with pytest.raises(FlowstateError, match="newer flowstate"):
        await d.open()
