"""Issue 12: what a PostgreSQL reader may show depends only on this store's own commits.

Every test here keeps write transactions of other applications open for its whole run — one in
another schema of the store's database, one in another database — and shows that they hold
nobody back, while flowstate's own in-flight commits of the same store still do (gap-free
order, behaviour.md §2.7), and only for as long as PostgreSQL keeps them in flight.

In-flight commits are held open deterministically: a raw connection runs flowstate's own
commit function inside an explicit transaction and does not end it, or a row lock stalls a real
driver commit. The tests wait for conditions (a line from a child process, a lock wait seen in
``pg_stat_activity``), never for time. Every transaction is ended in ``finally``: the server is
shared with other test runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import flowstate as fs
from flowstate.drivers import postgres
from flowstate.drivers.postgres import PostgresDriver
from tests import pgutil
from tests.pgutil import park_ctx, raw

PROCS = Path(__file__).parent / "procs"
TIMEOUT = 20.0
#: Issue 12 item 2: a watcher in another process receives a new commit within this, whatever
#: transactions other applications keep open.
WATCH_LIMIT = 1.0
_COMMIT_ONE = "SELECT flowstate_commit_one($1, $2, $3, $4, $5, $6, $7)"


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    pgutil.require()


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[None]:
    """The store's schema, migrated."""
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False):
        pass
    yield


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pgutil.DSN)
    try:
        yield conn
    finally:
        await conn.close()


def other_database_dsn() -> str:
    """The test server's ``postgres`` database: another database of the same cluster."""
    parts = urlsplit(pgutil.DSN)
    return urlunsplit(parts._replace(path="/postgres"))


@contextlib.asynccontextmanager
async def foreign_transactions() -> AsyncIterator[None]:
    """Write transactions of other applications (each has a transaction id), open until the
    block ends: one in a scratch schema of the test database, one in another database."""
    scratch = pgutil.new_schema()
    setup = await asyncpg.connect(pgutil.DSN)
    try:
        await setup.execute(f'CREATE SCHEMA "{scratch}"; CREATE TABLE "{scratch}".t (x int)')
    finally:
        await setup.close()
    here = await asyncpg.connect(pgutil.DSN)
    elsewhere = await asyncpg.connect(other_database_dsn())
    try:
        for conn in (here, elsewhere):
            await conn.execute("BEGIN")
        await here.execute(f'INSERT INTO "{scratch}".t VALUES (1)')
        await elsewhere.fetchval("SELECT pg_current_xact_id()")
        yield
    finally:
        for conn in (here, elsewhere):
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
            await conn.close()


async def hold_commit(conn: asyncpg.Connection, sid: str, **labels: str) -> int:
    """Begin a flowstate commit of ``sid`` on ``conn`` and leave it in flight: flowstate's own
    one-statement commit, run inside an explicit transaction that is not ended. Its rev."""
    await conn.execute("BEGIN")
    rev = await conn.fetchval(
        _COMMIT_ONE, [sid], [0], [0], ["{}"], [json.dumps(labels)], [""], ["{}"]
    )
    return int(rev)


async def collect(watcher: fs.Watcher, n: int) -> list[fs.State]:
    out: list[fs.State] = []
    async for state in watcher:
        out.append(state)
        if len(out) == n:
            break
    return out


async def wait_until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not await cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def ids_revs(driver: PostgresDriver, cmd: fs.GetStatesCmd) -> list[tuple[str, int]]:
    result = await driver.get_states(cmd)
    return [(s.id, s.rev) for s in result.states]


# item 2: foreign transactions hold nobody back


async def test_a_watcher_in_another_process_is_not_held_by_foreign_transactions(
    dsn: str, store: None
) -> None:
    """Three processes: this one keeps foreign write transactions open, a child watches, a
    second child commits. The watcher receives the commit within WATCH_LIMIT of the committer's
    exit. (Before issue 12 it waited for the foreign transactions to end: forever here.)"""
    async with foreign_transactions():
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROCS / "pg_watch.py"),
            dsn,
            "k",
            "x",
            "1",
            stdout=subprocess.PIPE,
        )
        try:
            assert watcher.stdout is not None
            line = await asyncio.wait_for(watcher.stdout.readline(), TIMEOUT)
            assert line == b"ready\n"
            committer = await asyncio.create_subprocess_exec(
                sys.executable,
                str(PROCS / "pg_commit_one.py"),
                dsn,
                "xproc",
                "k",
                "x",
                stdout=subprocess.PIPE,
            )
            out, _ = await asyncio.wait_for(committer.communicate(), TIMEOUT)
            assert committer.returncode == 0
            try:
                got = await asyncio.wait_for(watcher.stdout.readline(), WATCH_LIMIT)
            except TimeoutError:
                pytest.fail("the watcher is held back by transactions of other applications")
            assert got.decode().split() == ["xproc", out.decode().strip()]
        finally:
            with contextlib.suppress(ProcessLookupError):
                watcher.kill()
            await watcher.wait()


async def test_own_commits_are_read_at_once_behind_foreign_transactions(
    dsn: str, store: None
) -> None:
    """The committing process reads its returned commit at once, and so does a reader in
    another driver (no catch-up of its own to lean on); head_rev (``/health``, the UI) too."""
    async with (
        foreign_transactions(),
        fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as engine,
    ):
        reader = PostgresDriver(dsn, max_size=2)
        await reader.open()
        try:
            mine = park_ctx("mine", k="own")
            await engine.do(fs.commit(fs.park(mine)))
            rev = mine.committed.rev
            q = fs.get_states({"k": "own"})
            await engine.do(q)
            assert q.result is not None
            assert [(s.id, s.rev) for s in q.result.states] == [("mine", rev)]
            assert await engine.driver.head_rev() == rev
            assert await ids_revs(reader, fs.get_states({"k": "own"})) == [("mine", rev)]
            assert await reader.head_rev() == rev
        finally:
            await reader.close()


# items 1 and 3: in-flight flowstate commits of the store hold readers back, while in flight


@pytest.mark.parametrize("end", ["rollback", "backend killed"])
async def test_a_stalled_commit_that_aborts_holds_readers_only_until_it_ends(
    dsn: str, schema: str, store: None, admin: asyncpg.Connection, end: str
) -> None:
    """A flowstate commit takes r1 and stalls; r2 > r1 commits. Readers must not show r2 while
    r1 may still commit (gap-free), and must show it as soon as PostgreSQL ends r1's
    transaction — by a rollback, or because its server process died — although foreign
    transactions are still open."""
    async with foreign_transactions():
        holder = await raw(schema)
        writer = PostgresDriver(dsn, max_size=2)
        reader = PostgresDriver(dsn, max_size=2)
        await writer.open()
        await reader.open()
        try:
            r1 = await hold_commit(holder, "stalled", k="v")
            fast = park_ctx("fast", k="v")
            await writer.commit(fs.commit(fs.park(fast)))
            r2 = fast.committed.rev
            assert r2 > r1
            assert await ids_revs(reader, fs.get_states({"k": "v"})) == []
            assert await reader.head_rev() < r1

            engine = fs.Engine(reader, recovery=False, delayer=False)
            async with engine.watch(fs.get_states({"k": "v"})) as watcher:
                got = asyncio.create_task(collect(watcher, 1))
                if end == "rollback":
                    await holder.execute("ROLLBACK")
                else:
                    pid = holder.get_server_pid()
                    assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                states = await asyncio.wait_for(got, TIMEOUT)
            assert [(s.id, s.rev) for s in states] == [("fast", r2)]
            assert await reader.head_rev() == r2
        finally:
            holder.terminate()
            await writer.close()
            await reader.close()


async def test_a_stalled_commit_that_commits_later_is_delivered_before_later_revs(
    dsn: str, schema: str, store: None
) -> None:
    """r1 stalls, r2 > r1 commits and is read by nobody; then r1 commits. A watcher delivers
    r1 and then r2 — never r2 alone — with foreign transactions open throughout."""
    async with foreign_transactions():
        holder = await raw(schema)
        writer = PostgresDriver(dsn, max_size=2)
        reader = PostgresDriver(dsn, max_size=2)
        await writer.open()
        await reader.open()
        try:
            r1 = await hold_commit(holder, "stalled", k="v")
            fast = park_ctx("fast", k="v")
            await writer.commit(fs.commit(fs.park(fast)))
            r2 = fast.committed.rev
            assert await ids_revs(reader, fs.get_states({"k": "v"})) == []

            engine = fs.Engine(reader, recovery=False, delayer=False)
            async with engine.watch(fs.get_states({"k": "v"})) as watcher:
                got = asyncio.create_task(collect(watcher, 2))
                await holder.execute("COMMIT")
                states = await asyncio.wait_for(got, TIMEOUT)
            assert [(s.id, s.rev) for s in states] == [("stalled", r1), ("fast", r2)]
        finally:
            holder.terminate()
            await writer.close()
            await reader.close()


async def test_readers_never_skip_a_rev_under_stalling_committers_in_four_processes(
    dsn: str, store: None
) -> None:
    """Four processes commit concurrently; half their commits stall in flight for a random
    while and one in five of those rolls back. A watcher in this process delivers exactly the
    revs that landed, in rev order (a skipped rev is never delivered later: the watcher only
    moves forward), and a polling reader never sees the log go back."""
    per_process = 60
    engine = fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False)
    poller = PostgresDriver(dsn, max_size=2)
    await poller.open()
    children: list[asyncio.subprocess.Process] = []
    try:
        async with engine, engine.watch(fs.get_states({"gap": "test"}, limit=500)) as watcher:
            delivered: list[int] = []

            async def watch() -> None:
                async for state in watcher:
                    delivered.append(state.rev)

            async def poll(stop: asyncio.Event) -> list[int]:
                """Pages from rev 0 each time: every page must extend the previous one."""
                previous: list[int] = []
                while not stop.is_set():
                    revs: list[int] = []
                    more = True
                    while more:
                        since = max(revs, default=0)
                        cmd = fs.get_states({"gap": "test"}, since_rev=since, limit=500)
                        result = await poller.get_states(cmd)
                        revs += [s.rev for s in result.states]
                        more = result.more
                    assert revs[: len(previous)] == previous, "the log went back"
                    previous = revs
                return previous

            watching = asyncio.create_task(watch())
            stop = asyncio.Event()
            polling = asyncio.create_task(poll(stop))
            children = [
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    str(PROCS / "pg_stalling_commits.py"),
                    dsn,
                    str(w),
                    str(per_process),
                    stdout=subprocess.PIPE,
                )
                for w in range(4)
            ]
            outputs = [await asyncio.wait_for(c.communicate(), 120) for c in children]
            assert all(c.returncode == 0 for c in children)
            landed = sorted(int(line) for out, _ in outputs for line in out.decode().split()[:-1])
            assert len(landed) > 4 * per_process  # the ordinary commits and most stalled ones

            async def caught_up() -> bool:
                return bool(delivered) and delivered[-1] >= landed[-1]

            await wait_until(caught_up, "the watcher delivered the last rev")
            stop.set()
            polled = await asyncio.wait_for(polling, TIMEOUT)
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        assert delivered == landed
        assert polled == landed
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
        await poller.close()


# item 4: latest_only, delayed states and the head follow the same rule


async def test_latest_only_follows_in_flight_commits_not_foreign_transactions(
    dsn: str, schema: str, store: None
) -> None:
    """``a`` is at r1; a commit below r2 stalls while ``a`` is committed again at r2:
    latest_only shows ``a`` at r1 (its latest visible version). Once the stalled commit rolls
    back, latest_only shows r2 although foreign transactions are still open."""
    async with foreign_transactions():
        writer = PostgresDriver(dsn, max_size=2)
        reader = PostgresDriver(dsn, max_size=2)
        holder = await raw(schema)
        await writer.open()
        await reader.open()
        try:
            ctx = park_ctx("a", t="latest")
            await writer.commit(fs.commit(fs.park(ctx)))
            await writer.commit(fs.commit(fs.park(ctx, {"v": "1"})))
            r1 = ctx.committed.rev
            held = await hold_commit(holder, "held", t="latest")
            await writer.commit(fs.commit(fs.park(ctx, {"v": "2"})))
            r2 = ctx.committed.rev
            assert r1 < held < r2
            q = fs.get_states({"t": "latest"}, latest_only=True)
            assert await ids_revs(reader, q) == [("a", r1)]
            await holder.execute("ROLLBACK")
            assert await ids_revs(reader, q) == [("a", r2)]
        finally:
            holder.terminate()
            await writer.close()
            await reader.close()


async def lock_waiters(admin: asyncpg.Connection, schema: str) -> int:
    return int(
        await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND wait_event_type = 'Lock'",
            f"flowstate:{schema}",
        )
    )


async def test_delayed_states_follow_in_flight_delays_not_foreign_transactions(
    dsn: str, schema: str, store: None, admin: asyncpg.Connection
) -> None:
    """A real commit that delays a state stalls in flight (a row lock holds its rev check);
    a later delay lands. get_delayed_states hides the later offset while the lower one may
    still commit, then shows both in offset order once the stalled commit lands — foreign
    transactions open throughout."""
    async with foreign_transactions():
        stalled = PostgresDriver(dsn, max_size=2)
        other = PostgresDriver(dsn, max_size=2)
        await stalled.open()
        await other.open()
        locker = await raw(schema)
        task: asyncio.Task[None] | None = None
        try:
            gate = park_ctx("gate")
            await other.commit(fs.commit(fs.park(gate)))
            await locker.execute("BEGIN")
            await locker.execute("SELECT * FROM flowstate_latest WHERE id = 'gate' FOR UPDATE")
            first = park_ctx("first")
            cmd = fs.commit(fs.delay(first, "f", 0), fs.park(gate))
            task = asyncio.create_task(stalled.commit(cmd))

            async def blocked() -> bool:
                return await lock_waiters(admin, schema) == 1

            await wait_until(blocked, "the delaying commit waits on the row lock")
            engine = fs.Engine(other, recovery=False, delayer=False)
            await engine.do(fs.delay(park_ctx("second"), "f", 0))
            until = engine.clock.now() + timedelta(days=1)
            result = await other.get_delayed_states(None, until, 0, 100)
            assert result.delayed_states == [], "a later offset shown while a lower may land"

            await locker.execute("ROLLBACK")
            await asyncio.wait_for(task, TIMEOUT)
            result = await other.get_delayed_states(None, until, 0, 100)
            got = [(d.state.id, d.offset) for d in result.delayed_states]
            assert [sid for sid, _ in got] == ["first", "second"]
            assert got[0][1] < got[1][1]
        finally:
            with contextlib.suppress(Exception):
                await locker.execute("ROLLBACK")
            locker.terminate()
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            await stalled.close()
            await other.close()


# item 6: what an operator sees when a flowstate commit is stuck


async def test_a_stuck_commit_is_logged_and_reported_with_its_rev(
    dsn: str,
    schema: str,
    store: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the threshold (0 here: the test asserts no time), a reader held at the same
    in-flight rev logs one warning naming it and who holds it, and ``readers_held`` (shown by
    /health and the UI) reports it; once the commit ends, nothing is reported."""
    monkeypatch.setattr(postgres, "STUCK_WARN_AFTER", 0.0)
    holder = await raw(schema)
    reader = PostgresDriver(dsn, max_size=2)
    await reader.open()
    try:
        assert await reader.readers_held() is None
        held = await hold_commit(holder, "stuck", k="v")
        q = fs.get_states({"k": "v"})
        with caplog.at_level(logging.WARNING, logger="flowstate.drivers.postgres"):
            for _ in range(3):
                await reader.get_states(q)
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert f"held at rev {held}" in warnings[0]
        assert f"server pid {holder.get_server_pid()}" in warnings[0]
        report = await reader.readers_held()
        assert report is not None
        assert report["rev"] == held and report["pid"] == holder.get_server_pid()
        # what the server shows: /health and the UI's info carry the same report
        health, info = await _served(reader)
        assert health["status"] == "ok" and health["readers_held"]["rev"] == held
        assert info["readers_held"]["rev"] == held
        await holder.execute("ROLLBACK")
        assert await reader.readers_held() is None
        health, info = await _served(reader)
        assert "readers_held" not in health and info["readers_held"] is None
    finally:
        holder.terminate()
        await reader.close()


async def _served(driver: PostgresDriver) -> tuple[dict[str, Any], dict[str, Any]]:
    """The /health answer and the UI's info of a server over ``driver``."""
    import httpx

    from flowstate.server import create_app

    async with fs.Engine(driver, recovery=False, delayer=False) as engine:
        app = create_app(driver, engine=engine)
        transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
            health = (await http.get("/health")).json()
            info = (await http.get("/ui/api/info")).json()
    return health, info


async def test_revs_and_offsets_beyond_48_bits_are_refused(schema: str, store: None) -> None:
    """The in-flight marks encode 48 bits of a rev or offset: an allocation past 2^48 fails
    (and leaves no lock held) instead of marking another value."""
    conn = await raw(schema)
    try:
        for seq, alloc in (("flowstate_rev_seq", "revs"), ("flowstate_offset_seq", "offsets")):
            await conn.execute(f"SELECT setval('{seq}', {2**48 - 2})")
            assert await conn.fetchval(f"SELECT flowstate_alloc_{alloc}(1)") == 2**48 - 1
            with pytest.raises(asyncpg.RaiseError, match="exhausted"):
                await conn.fetchval(f"SELECT flowstate_alloc_{alloc}(1)")
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1",
            conn.get_server_pid(),
        )
        assert held == 0
    finally:
        await conn.close()
