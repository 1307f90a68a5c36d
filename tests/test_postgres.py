"""PostgreSQL-specific behaviour: migrations, schemas, gap-free reads, cross-process wake-ups,
indexes, large blobs and connection faults. (The scenario suite and the property tests run on
PostgreSQL through tests/conftest.py.)"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import asyncpg
import pytest

import flowstate as fs
from flowstate import iterator
from flowstate.clock import to_millis
from flowstate.drivers.postgres import (
    PostgresDriver,
    _PoolConnection,
    migrations,
    split_dsn,
    states_query,
)
from tests import pgutil
from tests.pgutil import park_ctx, raw

PROCS = Path(__file__).parent / "procs"
TIMEOUT = 20.0


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    pgutil.require()


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[fs.Engine]:
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as engine:
        yield engine


async def collect(watcher: fs.Watcher, n: int) -> list[fs.State]:
    out: list[fs.State] = []
    async for state in watcher:
        out.append(state)
        if len(out) == n:
            break
    return out


def test_split_dsn_takes_the_schema_parameter() -> None:
    dsn, schema = split_dsn("postgresql://u@h:5432/db?sslmode=disable&schema=abc")
    assert schema == "abc"
    assert dsn == "postgresql://u@h:5432/db?sslmode=disable"


async def test_schema_name_is_validated() -> None:
    with pytest.raises(fs.ValidationError) as err:
        PostgresDriver(pgutil.DSN, schema='x"; DROP TABLE y; --')
    assert err.value.field == "schema"


async def test_migrations_apply_once_under_concurrent_starts(dsn: str, schema: str) -> None:
    drivers = [PostgresDriver(dsn) for _ in range(4)]
    await asyncio.gather(*(d.open() for d in drivers))
    await asyncio.gather(*(d.close() for d in drivers))
    again = PostgresDriver(dsn)
    await again.open()
    await again.close()
    conn = await raw(schema)
    try:
        rows = await conn.fetch("SELECT version FROM flowstate_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [r[0] for r in rows] == [v for v, _, _ in migrations()]


async def test_upgrade_from_version_1_keeps_delayed_states(dsn: str, schema: str) -> None:
    """A store created by schema version 1 (offsets from their own sequence) upgrades in
    place: its delayed states survive and new offsets come after them."""
    conn = await raw(schema)
    try:
        await conn.execute(f'CREATE SCHEMA "{schema}"')
        await conn.execute(
            "CREATE TABLE flowstate_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        version, name, sql = migrations()[0]
        await conn.execute(sql)
        await conn.execute("INSERT INTO flowstate_migrations VALUES ($1, $2)", version, name)
        old = {"id": "old", "rev": 0, "annotations": {}, "labels": {}, "committed_at": None}
        old |= {"to": "f", "transition_annotations": {}}
        for _ in range(5):
            await conn.execute(
                "INSERT INTO flowstate_delayed (execute_at, state) VALUES (0, $1)", json.dumps(old)
            )
    finally:
        await conn.close()
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as engine:
        await engine.do(fs.delay(park_ctx("new"), "f", 0))
        q = fs.get_delayed_states(until=engine.clock.now() + timedelta(days=1))
        await engine.do(q)
    assert q.result is not None
    got = [(d.state.id, d.offset) for d in q.result.delayed_states]
    assert got == [("old", 1), ("old", 2), ("old", 3), ("old", 4), ("old", 5), ("new", 6)]


async def test_schemas_keep_stores_apart() -> None:
    a, b = pgutil.new_schema(), pgutil.new_schema()
    async with (
        fs.Engine(PostgresDriver(pgutil.dsn_for(a)), recovery=False, delayer=False) as ea,
        fs.Engine(PostgresDriver(pgutil.DSN, schema=b), recovery=False, delayer=False) as eb,
    ):
        await ea.do(fs.commit(fs.park(park_ctx("only-in-a"))))
        q = fs.get_states()
        await eb.do(q)
        assert q.result is not None and q.result.states == []
        got = fs.StateCtx()
        await ea.do(fs.get_state_by_id(got, "only-in-a"))
        assert got.current.rev == 1


async def test_reader_never_skips_a_lower_rev_committed_later(
    engine: fs.Engine, schema: str
) -> None:
    """Transaction A takes rev r1 and stays open; B takes r2 > r1 and commits first.
    A reader must not hand out r2 before r1: it waits, then delivers r1, r2 in order."""
    slow = await raw(schema)
    try:
        tx = slow.transaction()
        await tx.start()
        r1 = await slow.fetchval("SELECT flowstate_alloc_revs(1)")
        conflicts = await slow.fetchval(
            "SELECT flowstate_commit($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            ["slow"],
            [0],
            [r1],
            [to_millis(engine.clock.now())],
            ["{}"],
            ['{"k":"v"}'],
            [""],
            ["{}"],
            "unused",
        )
        assert conflicts == []

        fast = park_ctx("fast", k="v")
        await engine.do(fs.commit(fs.park(fast)))
        r2 = fast.committed.rev
        assert r2 > r1

        q = fs.get_states({"k": "v"})
        await engine.do(q)
        assert q.result is not None
        assert [s.rev for s in q.result.states] == [], "r2 visible while r1 may still commit"

        async with engine.watch(fs.get_states({"k": "v"})) as watcher:
            got = asyncio.create_task(collect(watcher, 2))
            await asyncio.sleep(0)  # let the watcher reach the head and wait
            await tx.commit()
            states = await asyncio.wait_for(got, TIMEOUT)
        assert [(s.id, s.rev) for s in states] == [("slow", r1), ("fast", r2)]
    finally:
        await slow.close()


async def test_a_reader_sees_its_own_commit_behind_a_short_transaction(
    engine: fs.Engine, schema: str
) -> None:
    """Another client's write transaction, begun before our commit, holds the read horizon
    below it; get_states waits for it to end (briefly) rather than miss our own commit."""
    other = await raw(schema)
    try:
        tx = other.transaction()
        await tx.start()
        await other.fetchval("SELECT pg_current_xact_id()")  # a write transaction, in flight
        mine = park_ctx("mine", k="own")
        await engine.do(fs.commit(fs.park(mine)))

        async def finish_soon() -> None:
            await asyncio.sleep(0.05)
            await tx.commit()

        finisher = asyncio.create_task(finish_soon())
        q = fs.get_states({"k": "own"})
        await engine.do(q)
        await finisher
        assert q.result is not None
        assert [s.id for s in q.result.states] == ["mine"]
    finally:
        await other.close()


async def test_delayed_offsets_never_appear_out_of_order(engine: fs.Engine, schema: str) -> None:
    """A delay that took offset o1 and is still uncommitted hides every later offset, so the
    delayer, which reads by offset, can never move past o1 and lose it."""
    slow = await raw(schema)
    try:
        tx = slow.transaction()
        await tx.start()
        o1 = await slow.fetchval("SELECT flowstate_alloc_offsets(1)")
        await slow.execute(
            'INSERT INTO flowstate_delayed ("offset", execute_at, state) VALUES ($1, 0, $2)',
            o1,
            json.dumps(
                {"id": "slow", "rev": 0, "annotations": {}, "labels": {}}
                | {"committed_at": None, "to": "f", "transition_annotations": {}}
            ),
        )
        fast = park_ctx("fast")
        cmd = fs.delay(fast, "f", 0)
        await engine.do(cmd)
        at = engine.clock.now() + timedelta(days=1)

        q = fs.get_delayed_states(until=at)
        await engine.do(q)
        assert q.result is not None
        assert q.result.delayed_states == [], "a later offset is visible while o1 may commit"

        await tx.commit()
        q = fs.get_delayed_states(until=at)
        await engine.do(q)
        assert q.result is not None
        got = [(d.state.id, d.offset) for d in q.result.delayed_states]
        assert got[0] == ("slow", o1)
        assert got[1][0] == "fast" and got[1][1] > o1
    finally:
        await slow.close()


async def test_notify_wakes_a_watcher_in_another_process(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Polling is disabled (intervals of an hour): only LISTEN/NOTIFY can deliver in time."""
    monkeypatch.setattr(iterator, "WATCH_REFRESH", 3600.0)
    engine = fs.Engine(PostgresDriver(dsn, poll_interval=3600), recovery=False, delayer=False)
    async with engine, engine.watch(fs.get_states({"from": "child"})) as watcher:
        got = asyncio.create_task(collect(watcher, 1))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROCS / "pg_commit_one.py"),
            dsn,
            "childTID",
            "from",
            "child",
            stdout=subprocess.PIPE,
        )
        out, _ = await child.communicate()
        assert child.returncode == 0
        states = await asyncio.wait_for(got, TIMEOUT)
    assert states[0].id == "childTID"
    assert states[0].rev == int(out)


async def test_polling_delivers_when_notifications_are_lost(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(iterator, "WATCH_REFRESH", 3600.0)

    async def deaf(self: PostgresDriver) -> None:  # never LISTENs: every notification is lost
        await asyncio.Event().wait()

    monkeypatch.setattr(PostgresDriver, "_listen_forever", deaf)
    engine = fs.Engine(PostgresDriver(dsn, poll_interval=0.05), recovery=False, delayer=False)
    other = fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False)
    async with engine, other, engine.watch(fs.get_states()) as watcher:
        got = asyncio.create_task(collect(watcher, 1))
        ctx = park_ctx("elsewhere")
        await other.do(fs.commit(fs.park(ctx)))
        states = await asyncio.wait_for(got, TIMEOUT)
    assert [(s.id, s.rev) for s in states] == [("elsewhere", ctx.committed.rev)]


async def test_contended_commits_from_four_processes(dsn: str, schema: str) -> None:
    """4 OS processes, 10,000 successful commits over 20 states: none lost, none duplicated,
    every version based on the one before it."""
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False):
        pass  # migrate once up front
    per_process = 2500
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROCS / "pg_contend.py"),
            dsn,
            str(w),
            str(per_process),
            "20",
            stdout=subprocess.PIPE,
        )
        for w in range(4)
    ]
    outputs = [await c.communicate() for c in children]
    assert all(c.returncode == 0 for c in children)
    reported: set[tuple[str, int]] = set()
    conflicts = 0
    for out, _ in outputs:
        lines = out.decode().split("\n")
        for line in lines:
            if line.startswith("done "):
                conflicts += int(line.split()[1])
            elif line:
                sid, rev = line.split()
                reported.add((sid, int(rev)))
    assert len(reported) == 4 * per_process
    assert conflicts > 0, "the test must actually contend"

    conn = await raw(schema)
    try:
        rows = await conn.fetch("SELECT rev, id, annotations FROM flowstate_states ORDER BY rev")
    finally:
        await conn.close()
    assert len(rows) == 4 * per_process
    assert len({r["rev"] for r in rows}) == len(rows)
    assert {(r["id"], r["rev"]) for r in rows} == reported
    last: dict[str, int] = {}
    for r in rows:
        based_on = int(json.loads(r["annotations"])["based_on"])
        assert based_on == last.get(r["id"], 0), f"lost update on {r['id']} at rev {r['rev']}"
        last[r["id"]] = r["rev"]


async def test_queries_use_indexes(dsn: str, schema: str) -> None:
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False):
        pass
    conn = await raw(schema)
    try:
        await conn.execute(
            """
            INSERT INTO flowstate_states
                (rev, id, committed_at, annotations, labels, transition_to, transition_annotations)
            SELECT g, 'id' || (g % 5000), 0, '{}',
                   jsonb_build_object('tenant', 't' || (g % 1000), 'kind', 'k' || (g % 7)),
                   '', '{}'
            FROM generate_series(1, 100000) g;
            INSERT INTO flowstate_latest (id, rev, labels, labels_rev)
            SELECT DISTINCT ON (id) id, rev, labels, rev FROM flowstate_states
            ORDER BY id, rev DESC;
            -- sample every row: plans must not depend on which rows ANALYZE happened to pick
            ALTER TABLE flowstate_states ALTER COLUMN labels SET STATISTICS 1000;
            ANALYZE flowstate_states;
            ANALYZE flowstate_latest;
            """
        )

        async def plan(cmd: fs.GetStatesCmd) -> str:
            sql, args = states_query(cmd)
            rows = await conn.fetch("EXPLAIN " + sql, *args)
            return "\n".join(r[0] for r in rows)

        by_label = await plan(fs.get_states({"tenant": "t7"}))
        assert "flowstate_states_by_labels" in by_label, by_label
        since = await plan(fs.get_states(since_rev=99_000))
        assert "flowstate_states_pkey" in since, since
        latest = await plan(fs.get_states(since_rev=99_000, latest_only=True))
        assert "flowstate_latest_by_rev" in latest, latest
        assert "Seq Scan" not in by_label + since + latest
    finally:
        await conn.close()


async def test_ten_megabyte_blob_round_trips(engine: fs.Engine) -> None:
    blob = random.Random(7).randbytes(10 * 1024 * 1024)
    ctx = park_ctx("big")
    ctx.datas["payload"] = fs.Data(blob=blob, annotations={"binary": "true"})
    await engine.do(fs.commit(fs.store_data(ctx, "payload"), fs.park(ctx)))
    text = fs.Data(blob="zażółć gęślą jaźń ✓".encode())
    ctx.datas["text"] = text
    await engine.do(fs.store_data(ctx, "text"), fs.commit(fs.park(ctx)))

    loaded = fs.StateCtx()
    await engine.do(
        fs.get_state_by_id(loaded, "big"),
        fs.get_data(loaded, "payload"),
        fs.get_data(loaded, "text"),
    )
    assert loaded.datas["payload"].blob == blob
    assert loaded.datas["payload"].binary
    assert loaded.datas["text"].blob == text.blob


async def _terminate_flowstate_backends(schema: str) -> int:
    conn = await asyncpg.connect(pgutil.DSN)
    try:
        rows = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            f"flowstate:{schema}",
        )
        return len(rows)
    finally:
        await conn.close()


async def test_driver_recovers_when_connections_are_killed(engine: fs.Engine, schema: str) -> None:
    first = park_ctx("before", k="v")
    await engine.do(fs.commit(fs.park(first)))
    async with engine.watch(fs.get_states({"k": "v"})) as watcher:
        assert [s.id for s in await asyncio.wait_for(collect(watcher, 1), TIMEOUT)] == ["before"]
        assert await _terminate_flowstate_backends(schema) > 0

        after = park_ctx("after", k="v")
        await engine.do(fs.commit(fs.park(after)))  # reconnects by itself
        got = fs.StateCtx()
        await engine.do(fs.get_state_by_id(got, "before"))
        assert got.current.rev == first.committed.rev
        resumed = await asyncio.wait_for(collect(watcher, 1), TIMEOUT)
    assert [(s.id, s.rev) for s in resumed] == [("after", after.committed.rev)]


async def test_lost_connection_during_commit_is_never_a_false_success(
    engine: fs.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_commit = asyncpg.transaction.Transaction.commit

    async def broken_commit(self: asyncpg.transaction.Transaction) -> None:
        self._connection.terminate()
        await real_commit(self)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", broken_commit)
    ctx = park_ctx("unknown")
    ctx.datas["d"] = fs.Data(blob=b"x")  # storing data takes the transaction path
    with pytest.raises(fs.CommitUnknownError):
        await engine.do(fs.commit(fs.store_data(ctx, "d"), fs.park(ctx)))
    assert ctx.committed.rev == 0, "the caller's ctx must not claim a rev"
    monkeypatch.setattr(asyncpg.transaction.Transaction, "commit", real_commit)

    with pytest.raises(fs.NotFoundError):  # the COMMIT never reached the server
        await engine.do(fs.get_state_by_id(fs.StateCtx(), "unknown"))
    await engine.do(fs.commit(fs.park(ctx)))
    assert ctx.committed.rev > 0


async def test_lost_connection_during_a_one_statement_commit_is_never_a_false_success(
    engine: fs.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fetchval = _PoolConnection.fetchval

    async def lost_midway(self: asyncpg.Connection, query: str, *args: object) -> object:
        if "flowstate_commit_one" not in query:
            return await real_fetchval(self, query, *args)
        running = asyncio.ensure_future(real_fetchval(self, query, *args))
        await asyncio.sleep(0)  # the statement is on its way
        self.terminate()
        return await running

    monkeypatch.setattr(_PoolConnection, "fetchval", lost_midway)
    ctx = park_ctx("maybe")
    with pytest.raises(fs.CommitUnknownError):
        await engine.do(fs.commit(fs.park(ctx)))
    assert ctx.committed.rev == 0, "the caller's ctx must not claim a rev"
    monkeypatch.setattr(_PoolConnection, "fetchval", real_fetchval)

    stored = fs.StateCtx()
    try:  # the server may or may not have run it; either way the store is consistent
        await engine.do(fs.get_state_by_id(stored, "maybe"))
    except fs.NotFoundError:
        stored = ctx
    await engine.do(fs.commit(fs.park(stored)))
    assert stored.committed.rev > 0


async def test_a_commit_of_versions_is_one_statement(engine: fs.Engine) -> None:
    """No BEGIN/COMMIT and no reset query on release: one round trip per commit."""
    ctx = park_ctx("one")
    await engine.do(fs.commit(fs.park(ctx)))  # warm: the statement is prepared once
    sent: list[str] = []
    methods = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "prepare")
    originals = {name: getattr(_PoolConnection, name) for name in methods}

    def counting(name: str) -> object:
        async def call(self: asyncpg.Connection, query: str, *args: object, **kw: object) -> object:
            sent.append(query)
            return await originals[name](self, query, *args, **kw)

        return call

    with pytest.MonkeyPatch.context() as mp:
        for name in methods:
            mp.setattr(_PoolConnection, name, counting(name))
        await engine.do(fs.commit(fs.transit(ctx, "next"), fs.park(ctx)))
    assert len(sent) == 1 and "flowstate_commit_one" in sent[0]
    assert ctx.current.rev == ctx.committed.rev > 0
    log = fs.get_states()
    await engine.do(log)
    assert log.result is not None
    transit, park = [s for s in log.result.states if s.id == "one"][1:]
    assert transit.transition.to == "next"
    assert park.rev == transit.rev + 1 == ctx.committed.rev  # the park expected the transit


async def test_one_statement_commits_report_every_conflict(engine: fs.Engine) -> None:
    a, b = park_ctx("a"), park_ctx("b")
    await engine.do(fs.commit(fs.park(a), fs.park(b)))
    stale_a, stale_b = a.copy(), b.copy()
    await engine.do(fs.commit(fs.park(a), fs.park(b)))
    with pytest.raises(fs.RevMismatchError) as err:
        await engine.do(fs.commit(fs.park(stale_b), fs.park(park_ctx("new")), fs.park(stale_a)))
    assert err.value.ids == ["b", "a"]  # in commit order
    with pytest.raises(fs.NotFoundError):  # nothing of the failed commit was stored
        await engine.do(fs.get_state_by_id(fs.StateCtx(), "new"))
    twice = park_ctx("twice")
    again = park_ctx("twice")  # the same id in another ctx: expects no version either
    with pytest.raises(fs.RevMismatchError) as err:
        await engine.do(fs.commit(fs.park(twice), fs.park(again)))
    assert err.value.ids == ["twice"]
    await engine.do(fs.commit(fs.park(twice), fs.park(twice)))
    assert twice.committed.rev > 0


async def test_transaction_commits_report_every_conflict(engine: fs.Engine) -> None:
    """The same checks on the path of commits that also store data (BEGIN ... COMMIT)."""
    a, b = park_ctx("a"), park_ctx("b")
    a.datas["d"] = fs.Data(blob=b"x")
    await engine.do(fs.commit(fs.store_data(a, "d"), fs.transit(a, "t"), fs.park(a), fs.park(b)))
    assert a.committed.rev == a.current.rev > 0  # the park expected the transit's rev
    stale_a, stale_b = a.copy(), b.copy()
    await engine.do(fs.commit(fs.park(a), fs.park(b)))
    stale_b.datas["d"] = fs.Data(blob=b"y")
    with pytest.raises(fs.RevMismatchError) as err:
        await engine.do(fs.commit(fs.store_data(stale_b, "d"), fs.park(stale_b), fs.park(stale_a)))
    assert err.value.ids == ["b", "a"]


def _cluster() -> list[str] | None:
    if shutil.which("pg_ctlcluster") is None or not Path("/etc/postgresql").is_dir():
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    return (
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"] if versions else None
    )


async def test_server_restart(engine: fs.Engine) -> None:
    cluster = _cluster()
    if cluster is None or os.geteuid() != 0:
        pytest.skip("needs a local PostgreSQL cluster this test may restart")
    before = park_ctx("pre-restart", k="r")
    await engine.do(fs.commit(fs.park(before)))
    async with engine.watch(fs.get_states({"k": "r"})) as watcher:
        assert len(await asyncio.wait_for(collect(watcher, 1), TIMEOUT)) == 1
        restart = await asyncio.create_subprocess_exec(*cluster, "restart")
        assert await restart.wait() == 0
        for _ in range(100):
            ready = await asyncio.create_subprocess_exec("pg_isready", "-h", "127.0.0.1", "-q")
            if await ready.wait() == 0:
                break
            await asyncio.sleep(0.1)
        after = park_ctx("post-restart", k="r")
        for _ in range(50):  # the first attempts may find the server still starting
            try:
                await engine.do(fs.commit(fs.park(after)))
                break
            except fs.StoreUnavailableError:
                await asyncio.sleep(0.2)
        assert after.committed.rev > before.committed.rev
        resumed = await asyncio.wait_for(collect(watcher, 1), TIMEOUT)
    assert [s.id for s in resumed] == ["post-restart"]


async def test_a_role_with_only_the_documented_grants_can_run(dsn: str, schema: str) -> None:
    """The grants README's PostgreSQL section lists are enough once the schema is migrated."""
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False):
        pass  # an owner role applies the migrations
    role = f"flowstate_app_{os.getpid()}"
    admin = await asyncpg.connect(pgutil.DSN)
    try:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(
            f"""
            GRANT USAGE ON SCHEMA "{schema}" TO {role};
            GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA "{schema}" TO {role};
            GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA "{schema}" TO {role};
            GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA "{schema}" TO {role};
            """
        )
        user_dsn = pgutil.DSN.replace("postgres@", f"{role}@", 1)
        async with fs.Engine(
            PostgresDriver(user_dsn, schema=schema), recovery=False, delayer=False
        ) as engine:
            ctx = park_ctx("app", k="v")
            ctx.datas["d"] = fs.Data(blob=b"payload")
            await engine.do(fs.commit(fs.store_data(ctx, "d"), fs.park(ctx)))
            await engine.do(fs.delay(ctx, "later", 60))
            q = fs.get_states({"k": "v"}, latest_only=True)
            await engine.do(q)
            assert q.result is not None and [s.id for s in q.result.states] == ["app"]
            with pytest.raises(fs.RevMismatchError):
                await engine.do(fs.commit(fs.park(park_ctx("app"))))
    finally:
        await admin.execute(
            f'REVOKE ALL ON ALL TABLES IN SCHEMA "{schema}" FROM {role};'
            f'REVOKE ALL ON ALL SEQUENCES IN SCHEMA "{schema}" FROM {role};'
            f'REVOKE ALL ON ALL FUNCTIONS IN SCHEMA "{schema}" FROM {role};'
            f'REVOKE ALL ON SCHEMA "{schema}" FROM {role};'
        )
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
