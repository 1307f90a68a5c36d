"""Issue 13 on PostgreSQL: how far a query looked (``scanned_rev``, item 1), read queries
served by indexes whatever the size of the log (item 2), and fewer NOTIFYs per commit (item 5).

The plan tests look at ``EXPLAIN`` of the exact SQL the driver sends, on a table of 100,000
revisions with statistics on every row: a legitimate non-timing check that nothing walks the
log (no ``Seq Scan``, no walk of the log's primary key filtered row by row). Speed itself is in
``benchmarks/pg_queries.py`` and docs/postgres.md.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator

import asyncpg
import pytest

import flowstate as fs
from flowstate.clock import from_millis
from flowstate.drivers import postgres
from flowstate.drivers.postgres import STATE_BY_LABELS_SQL, PostgresDriver, states_query
from tests import pgutil
from tests.pgutil import park_ctx, raw

_COMMIT_ONE = "SELECT flowstate_commit_one($1, $2, $3, $4, $5, $6, $7)"


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    pgutil.require()


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[fs.Engine]:
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as engine:
        yield engine


async def query(engine: fs.Engine, cmd: fs.GetStatesCmd) -> fs.GetStatesResult:
    await engine.do(cmd)
    assert cmd.result is not None
    return cmd.result


# item 1: scanned_rev


async def test_a_query_matching_nothing_scanned_up_to_the_visible_head(engine: fs.Engine) -> None:
    for i in range(5):
        await engine.do(fs.commit(fs.park(park_ctx(f"s{i}", kind="a"))))
    head = await engine.driver.head_rev()
    assert head == 5
    for cmd in (
        fs.get_states({"kind": "never"}),
        fs.get_states({"kind": "never"}, latest_only=True),
        fs.get_states({"kind": "never"}, since_latest=True),
        fs.get_states(since_rev=3, labels={"kind": "never"}),
    ):
        result = await query(engine, cmd)
        assert (result.states, result.more) == ([], False)
        assert result.scanned_rev == head, cmd


async def test_a_full_page_reports_more_and_no_scanned_rev(engine: fs.Engine) -> None:
    for i in range(5):
        await engine.do(fs.commit(fs.park(park_ctx(f"s{i}", kind="a"))))
    result = await query(engine, fs.get_states({"kind": "a"}).with_limit(2))
    assert [s.rev for s in result.states] == [1, 2]
    assert result.more and result.scanned_rev == 0
    last = await query(engine, fs.get_states(since_rev=2, labels={"kind": "a"}))
    assert [s.rev for s in last.states] == [3, 4, 5]
    assert not last.more and last.scanned_rev == 5


async def test_scanned_rev_never_passes_an_in_flight_commit(dsn: str, schema: str) -> None:
    writer = PostgresDriver(dsn)
    reader = PostgresDriver(dsn)  # another process's driver: no own commit to wait for
    async with fs.Engine(writer, recovery=False, delayer=False) as eng:
        await eng.do(fs.commit(fs.park(park_ctx("before", kind="a"))))
        held = await raw(schema)
        try:
            await held.execute("BEGIN")
            in_flight = int(
                await held.fetchval(
                    _COMMIT_ONE, ["held"], [0], [0], ["{}"], ['{"kind":"a"}'], [""], ["{}"]
                )
            )
            await eng.do(fs.commit(fs.park(park_ctx("after", kind="a"))))
            async with fs.Engine(reader, recovery=False, delayer=False) as other:
                for cmd in (
                    fs.get_states({"kind": "never"}),
                    fs.get_states({"kind": "a"}),
                    fs.get_states({"kind": "a"}, latest_only=True),
                ):
                    result = await query(other, cmd)
                    assert not result.more
                    assert [s.id for s in result.states] in ([], ["before"])
                    assert result.scanned_rev == in_flight - 1, cmd
            await held.execute("COMMIT")
            async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as other:
                result = await query(other, fs.get_states({"kind": "never"}))
                assert result.scanned_rev == in_flight + 1 == await other.driver.head_rev()
        finally:
            await held.close()


# item 2: queries served by indexes

#: The most buffers a query may touch on the 100,000-revision store: a page of 50 and the index
#: pages above it, with room to spare. A walk of the log touches tens of thousands.
BUFFERS_LIMIT = 3_000
REVISIONS = 100_000
#: The same for a since_time page: the time marks leave at most about two blocks of 1,024 revs
#: to walk before the time (version 5 walked 50,000 versions from the middle: 1,177 buffers).
SINCE_BUFFERS_LIMIT = 600


@pytest.fixture
async def big(dsn: str, schema: str) -> AsyncIterator[tuple[asyncpg.Connection, int]]:
    """The benchmark's store of 100,000 revisions (20,000 ids, 5 versions each; labels tenant:
    1,000 values, kind: 7, step: 3 changing per version), statistics on every row; a raw
    connection and the committed_at of rev 0."""
    from benchmarks.pg_queries import build

    base, _ = await build(pgutil.DSN, schema, REVISIONS)
    conn = await raw(schema)
    try:
        await conn.execute(
            "ALTER TABLE flowstate_states ALTER COLUMN labels SET STATISTICS 1000;"
            "ALTER TABLE flowstate_latest ALTER COLUMN labels SET STATISTICS 1000;"
            "ANALYZE flowstate_states; ANALYZE flowstate_latest;"
            "SELECT flowstate_extend_time_marks((SELECT bound FROM flowstate_rev_bound()))"
        )
        yield conn, base
    finally:
        await conn.close()


async def explain(conn: asyncpg.Connection, sql: str, args: list[object]) -> tuple[str, int]:
    """The plan of ``sql`` as it runs (EXPLAIN ANALYZE), and the shared buffers it touched."""
    rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF, TIMING OFF) " + sql, *args)
    plan = "\n".join(r[0] for r in rows)
    top = next(r[0] for r in rows if "Buffers:" in r[0])
    touched = sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", top))
    return plan, touched


@pytest.mark.parametrize(
    "labels",
    [
        {"tenant": "t7"},
        {"kind": "k3"},
        {"kind": "k3", "step": "s1"},
        {"tenant": "t7", "kind": "k0"},
    ],
)
async def test_latest_only_label_pages_walk_no_superseded_versions(
    big: tuple[asyncpg.Connection, int], labels: dict[str, str]
) -> None:
    conn, _ = big
    bound = int(await conn.fetchval("SELECT bound FROM flowstate_rev_bound()"))
    for since in (0, REVISIONS // 2):
        cmd = fs.get_states(labels, since_rev=since, latest_only=True)
        sql, args = states_query(cmd, bound)
        plan, touched = await explain(conn, sql, args)
        assert "Seq Scan" not in plan, plan
        assert "SubPlan" not in plan, plan  # no per-row probe of the latest rev
        # the log itself is only probed by rev (the page's versions) or by id (beyond the
        # horizon): never walked
        for line in plan.splitlines():
            if "on flowstate_states" in line:
                assert "flowstate_states_pkey" in line or "flowstate_states_by_id" in line, plan
        assert touched < BUFFERS_LIMIT, plan


async def test_since_time_pages_start_at_their_time(big: tuple[asyncpg.Connection, int]) -> None:
    conn, base = big
    bound = int(await conn.fetchval("SELECT bound FROM flowstate_rev_bound()"))
    span = REVISIONS * 10  # the store's committed_at rises 10 ms per rev
    for fraction in (0.0, 0.3, 0.5, 0.9, 0.999, 1.5):
        at = from_millis(base + int(span * fraction))
        for cmd in (
            fs.get_states(since_time=at),
            fs.get_states({"kind": "k3"}, since_time=at),
            fs.get_states(since_time=at, latest_only=True),
        ):
            sql, args = states_query(cmd, bound)
            plan, touched = await explain(conn, sql, args)
            assert "Seq Scan" not in plan, plan
            assert touched < SINCE_BUFFERS_LIMIT, (fraction, plan)


async def test_get_state_by_labels_uses_an_index(big: tuple[asyncpg.Connection, int]) -> None:
    conn, _ = big
    for labels in ({"tenant": "t7"}, {"kind": "k3"}, {"tenant": "t7", "kind": "k0"}):
        sql = STATE_BY_LABELS_SQL.replace("($2::jsonb[])[1]", "$1::jsonb")
        plan, touched = await explain(conn, sql, [json.dumps(labels)])
        assert "Seq Scan" not in plan, plan
        assert touched < BUFFERS_LIMIT, plan


async def test_a_schema_of_version_5_is_upgraded_in_place(
    dsn: str, schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store created and written at schema version 5 (by the commit functions of that
    version) is migrated when a driver of this release opens it, and every query reads the
    same results as on a fresh store: latest labels are filled in, time marks written."""
    shipped = postgres.migrations()
    monkeypatch.setattr(postgres, "migrations", lambda: [m for m in shipped if m[0] <= 5])
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as old:
        for i in range(30):  # rev i + 1: state s(i % 10), kind k(i % 3), step s(i)
            ctx = fs.StateCtx(current=fs.State(id=f"s{i % 10}"))
            if i >= 10:
                await old.do(fs.get_state_by_id(ctx, ctx.current.id))
            ctx.current.labels = {"kind": f"k{i % 3}", "step": f"s{i}"}
            await old.do(fs.commit(fs.park(ctx)))
    conn = await raw(schema)
    try:
        assert await conn.fetchval("SELECT max(version) FROM flowstate_migrations") == 5
        assert await conn.fetchval("SELECT to_regclass('flowstate_time_marks')") is None
    finally:
        await conn.close()
    monkeypatch.setattr(postgres, "migrations", lambda: shipped)

    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as new:
        conn = await raw(schema)
        try:
            assert await conn.fetchval("SELECT max(version) FROM flowstate_migrations") == max(
                m[0] for m in shipped
            )
            stale = await conn.fetchval(
                "SELECT count(*) FROM flowstate_latest l JOIN flowstate_states s "
                "ON s.rev = l.rev WHERE l.labels IS DISTINCT FROM s.labels"
            )
            assert stale == 0
            # a write of an earlier definition (the rev without the labels) is refused
            with pytest.raises(asyncpg.CheckViolationError):
                await conn.execute("UPDATE flowstate_latest SET rev = rev + 1000 WHERE id = 's1'")
        finally:
            await conn.close()
        # the latest versions are revs 21..30 (s0..s9), kind k(i % 3) with i = rev - 1
        latest = await query(new, fs.get_states({"kind": "k1"}, latest_only=True))
        assert [s.rev for s in latest.states] == [23, 26, 29]
        everything = await query(new, fs.get_states({"kind": "k1"}))
        assert [s.rev for s in everything.states] == list(range(2, 31, 3))
        ctx = fs.StateCtx()
        await new.do(fs.get_state_by_labels(ctx, {"step": "s4"}))
        assert ctx.current.rev == 5 and ctx.current.id == "s4"
        first = everything.states[0].committed_at
        assert first is not None
        since = await query(new, fs.get_states(since_time=first))
        assert since.states[0].rev <= 2
        # commits after the upgrade keep the latest labels
        moved = fs.StateCtx()
        await new.do(fs.get_state_by_id(moved, "s2"))
        moved.current.labels = {"kind": "k1", "step": "moved"}
        await new.do(fs.commit(fs.park(moved)))
        latest = await query(new, fs.get_states({"kind": "k1"}, latest_only=True))
        assert [s.rev for s in latest.states] == [26, 29, 31]
        superseded = await query(new, fs.get_states({"step": "s22"}, latest_only=True))
        assert superseded.states == []  # rev 23, no longer s2's latest


# item 5: per-commit overhead


async def test_a_stream_of_commits_is_announced_by_fewer_notifies_ending_with_the_last(
    dsn: str, schema: str
) -> None:
    """NOTIFYs are at least ``publish_interval`` apart; the revs committed meanwhile are merged
    into the next, so a stream of commits costs fewer NOTIFYs, and the last rev is always
    announced."""
    driver = PostgresDriver(dsn)
    driver.publish_interval = 0.2
    got: list[int] = []
    listener = await asyncpg.connect(pgutil.DSN)
    try:
        await listener.add_listener(f"flowstate_{schema}", lambda *a: got.append(int(a[3])))
        async with fs.Engine(driver, recovery=False, delayer=False) as engine:
            loop = asyncio.get_running_loop()
            started = loop.time()
            ctx = park_ctx("burst")
            for _ in range(50):
                await engine.do(fs.commit(fs.park(ctx)))
            elapsed = loop.time() - started
            deadline = loop.time() + 5
            while (not got or got[-1] < ctx.committed.rev) and loop.time() < deadline:
                await asyncio.sleep(0.05)
        assert got and got[-1] == ctx.committed.rev == 50
        assert got == sorted(got)
        assert len(got) <= 2 + elapsed / 0.2, (len(got), elapsed)
    finally:
        await listener.close()
