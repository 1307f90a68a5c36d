"""The PostgreSQL driver off the happy path: writes cancelled at every await leak no pooled
connection and land nothing unannounced, ``latest_only`` never hides a visible state, the rev
allocation lock is per schema, and data the server refuses is a ``ValidationError``.

Blocking is made deterministic with a second, raw connection holding a row lock or the rev
allocation lock; the tests wait for conditions seen in ``pg_stat_activity``, never for time.
"""

from __future__ import annotations

import asyncio
import random
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

import flowstate as fs
from flowstate import perform
from flowstate.commands import DelayedState
from flowstate.data import Data
from flowstate.drivers import postgres
from flowstate.drivers.postgres import PostgresDriver
from flowstate.errors import ValidationError
from tests import pgutil

TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    pgutil.require()


@pytest.fixture
async def driver(schema: str) -> AsyncIterator[PostgresDriver]:
    """A driver with a pool of two connections: a leaked connection shows at once."""
    d = PostgresDriver(pgutil.dsn_for(schema), min_size=1, max_size=2, poll_interval=0.05)
    await d.open()
    try:
        yield d
    finally:
        await asyncio.wait_for(d.close(), TIMEOUT)


@pytest.fixture
async def admin() -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pgutil.DSN)
    try:
        yield conn
    finally:
        await conn.close()


async def raw(schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(pgutil.DSN, server_settings={"search_path": f'"{schema}"'})


async def wait_until(cond: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll ``cond`` until it holds; fail with ``what`` after TIMEOUT."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not await cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


async def lock_waiters(admin: asyncpg.Connection, schema: str) -> list[int]:
    """Server pids of this store's connections that wait on a lock."""
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
        f"flowstate:{schema}",
    )
    return [r[0] for r in rows]


async def backend_alive(admin: asyncpg.Connection, pid: int) -> bool:
    return bool(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


async def rev_lock_key(admin: asyncpg.Connection, schema: str) -> int:
    """The advisory lock key ``flowstate_alloc_revs`` of ``schema`` takes, read from its code."""
    src = await admin.fetchval(
        "SELECT pg_get_functiondef(p.oid) FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = $1 AND p.proname = 'flowstate_alloc_revs'",
        schema,
    )
    keys = set(re.findall(r"pg_advisory_lock\((-?\d+)\)", src))
    assert len(keys) == 1, src
    return int(keys.pop())


async def advisory_locks_held(admin: asyncpg.Connection, schema: str) -> int:
    """Advisory locks held by this store's connections."""
    return int(
        await admin.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1",
            f"flowstate:{schema}",
        )
    )


def park(sid: str) -> tuple[fs.StateCtx, fs.CommitCmd]:
    ctx = fs.StateCtx(current=fs.State(id=sid, labels={"t": "faults"}))
    return ctx, fs.commit(fs.park(ctx))


@pytest.fixture
def unvalidated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off the engine's validation of stored states, so that edge input reaches the
    server: what is tested is the driver's safety net behind that validation."""
    monkeypatch.setattr(perform, "check_committable", lambda ctx: None)


async def assert_pool_idle(d: PostgresDriver) -> None:
    """Every pooled connection is back in the pool and the pool still serves."""
    pool = d._pool
    assert pool is not None

    async def idle() -> bool:
        return pool.get_idle_size() == pool.get_size()

    await wait_until(idle, "every pooled connection is idle")
    # more round trips than the pool has connections, all of them bounded
    for i in range(5):
        ctx, cmd = park(f"after-{i}")
        await asyncio.wait_for(d.commit(cmd), TIMEOUT)
        assert ctx.committed.rev > 0
        await asyncio.wait_for(d.get_state(f"after-{i}", 0), TIMEOUT)
    await asyncio.wait_for(d.get_states(fs.get_states({"t": "faults"})), TIMEOUT)


async def cancel(task: asyncio.Task[Any]) -> BaseException | None:
    """Cancel ``task`` and wait (bounded) for it to end; return what it raised."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=TIMEOUT)
    assert done, "a cancelled write did not end"
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


# item 4: no leak on cancellation


async def test_writes_cancelled_at_every_point_leak_no_connection(driver: PostgresDriver) -> None:
    """Writes of both kinds (one statement, transaction) and reads, cancelled after 0..N loop
    turns: every await of acquire, BEGIN, the statements and COMMIT is hit by some of them, many
    more times than the pool has connections. Afterwards every connection is idle and the store
    serves; each cancelled commit either did not land or is seen by its ctx and announced."""
    for turns in range(40):
        ctx, cmd = park(f"one-{turns}")
        writes: list[Awaitable[Any]] = [
            driver.commit(cmd),
            driver.delay(DelayedState(fs.State(id=f"d-{turns}"), datetime.now(UTC))),
            driver.store_data(Data(blob=b"x" * 10)),
            driver.get_states(fs.get_states({"t": "faults"})),
            driver.get_state(f"one-{turns}", 0),
        ]
        for write in writes:
            task = asyncio.ensure_future(write)
            for _ in range(turns):
                await asyncio.sleep(0)
            outcome = await cancel(task)
            assert outcome is None or isinstance(
                outcome, asyncio.CancelledError | fs.NotFoundError
            ), outcome
        # the commit either did not land, or it landed, updated the ctx and was announced
        try:
            stored = await asyncio.wait_for(driver.get_state(f"one-{turns}", 0), TIMEOUT)
        except fs.NotFoundError:
            assert ctx.committed.rev == 0, "the ctx shows a commit that did not land"
            continue
        assert ctx.committed.rev == stored.rev, "a cancelled commit landed unseen by its ctx"
        assert driver.notifier.head >= stored.rev, "a cancelled commit landed unannounced"
    await assert_pool_idle(driver)


async def test_commit_cancelled_on_a_row_lock_rolls_back(
    driver: PostgresDriver, schema: str, admin: asyncpg.Connection
) -> None:
    """A commit blocked on the row lock of its state, cancelled (three times, more than the
    pool size, for both commit paths): nothing lands, ever, and no connection is lost."""
    ctx, cmd = park("locked")
    await driver.commit(cmd)
    stored = ctx.committed.rev
    holder = await raw(schema)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT * FROM flowstate_latest WHERE id = 'locked' FOR UPDATE")
        pids = []
        for i in range(3):
            # a versions-only commit (one statement), then one in a transaction (with a delay)
            cmds = [fs.commit(fs.park(ctx, {"try": str(i)}))]
            cmds.append(fs.commit(fs.park(ctx), fs.delay(ctx, "later", timedelta(hours=1))))
            for c in cmds:
                task = asyncio.ensure_future(driver.commit(c))

                async def blocked() -> bool:
                    return len(await lock_waiters(admin, schema)) == 1

                await wait_until(blocked, "the commit waits on the row lock")
                pids += await lock_waiters(admin, schema)
                outcome = await cancel(task)
                assert isinstance(outcome, asyncio.CancelledError), outcome
                assert ctx.committed.rev == stored, "the ctx changed for a cancelled commit"
        await tx.rollback()
    finally:
        await holder.close()

    for pid in pids:  # whatever was cancelled has ended on the server: nothing can land later
        await wait_until(
            lambda pid=pid: _not(backend_alive(admin, pid)), f"backend {pid} has ended"
        )
    state = await driver.get_state("locked", 0)
    assert state.rev == stored, "a cancelled commit landed"
    assert await driver.get_delayed_states(None, datetime.now(UTC) + timedelta(days=1), 0, 10)
    await assert_pool_idle(driver)
    await driver.commit(fs.commit(fs.park(ctx)))  # the ctx still expects the stored rev
    assert ctx.committed.rev > stored


async def test_a_cancelled_commit_that_lands_regardless_is_announced(
    driver: PostgresDriver, schema: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel request that comes too late (here: never) lets the blocked statement finish:
    a one-statement commit then lands, and before CancelledError its ctx shows the new rev and
    local watchers are told; a commit in a transaction sends no COMMIT and stores nothing."""

    async def never_cancel(self: PostgresDriver, pid: int, task: Any, deadline: float) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(PostgresDriver, "_cancel_backend", never_cancel)
    ctx, cmd = park("late")
    await driver.commit(cmd)
    stored = ctx.committed.rev
    holder = await raw(schema)
    try:
        for in_transaction in (True, False):
            tx = holder.transaction()
            await tx.start()
            await holder.execute("SELECT * FROM flowstate_latest WHERE id = 'late' FOR UPDATE")
            subs: list[fs.Command] = [fs.park(ctx)]
            if in_transaction:
                subs.append(fs.delay(ctx, "later", timedelta(hours=1)))
            task = asyncio.ensure_future(driver.commit(fs.commit(*subs)))

            async def blocked() -> bool:
                return len(await lock_waiters(admin, schema)) == 1

            await wait_until(blocked, "the commit waits on the row lock")
            task.cancel()
            await asyncio.sleep(0)  # the cancellation reaches the driver, which waits
            assert not task.done()
            await tx.rollback()  # the statement goes on
            outcome = await cancel(task)
            assert isinstance(outcome, asyncio.CancelledError), outcome
            latest = await driver.get_state("late", 0)
            if in_transaction:
                assert latest.rev == stored, "a transaction committed after its cancellation"
                assert ctx.committed.rev == stored
            else:
                assert latest.rev > stored, "the statement was not left to finish"
                assert ctx.committed.rev == latest.rev, "landed, but the ctx does not show it"
                assert driver.notifier.head >= latest.rev, "landed, but watchers were not told"
    finally:
        await holder.close()
    await assert_pool_idle(driver)


async def test_a_cancelled_commit_the_server_does_not_settle_is_unknown(
    driver: PostgresDriver, schema: str, admin: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the server does not answer the cancellation of a committing statement in time
    (here: the cancel request is never sent), the outcome is unknown: CommitUnknownError, not a
    bare CancelledError that would pass for "not stored"; the connection is not reused."""

    async def never_cancel(self: PostgresDriver, pid: int, task: Any, deadline: float) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(PostgresDriver, "_cancel_backend", never_cancel)
    monkeypatch.setattr(postgres, "CANCEL_SETTLE_LIMIT", 0.2)
    ctx, cmd = park("unsettled")
    await driver.commit(cmd)
    holder = await raw(schema)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT * FROM flowstate_latest WHERE id = 'unsettled' FOR UPDATE")
        task = asyncio.ensure_future(driver.commit(fs.commit(fs.park(ctx))))

        async def blocked() -> bool:
            return len(await lock_waiters(admin, schema)) == 1

        await wait_until(blocked, "the commit waits on the row lock")
        outcome = await cancel(task)
        assert isinstance(outcome, fs.CommitUnknownError), outcome
        await tx.rollback()
    finally:
        await holder.close()
    await assert_pool_idle(driver)


async def _not(value: Awaitable[bool]) -> bool:
    return not await value


async def test_commit_cancelled_waiting_for_the_rev_lock_is_discarded(
    driver: PostgresDriver, schema: str, admin: asyncpg.Connection
) -> None:
    """A commit cancelled inside ``flowstate_alloc_revs``, where the connection may hold the
    session-level rev lock: the connection is closed, never handed back, and nothing lands."""
    key = await rev_lock_key(admin, schema)
    holder = await raw(schema)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", key)
        task = asyncio.ensure_future(driver.commit(park("never")[1]))

        async def blocked() -> bool:
            return len(await lock_waiters(admin, schema)) == 1

        await wait_until(blocked, "the commit waits on the rev lock")
        (pid,) = await lock_waiters(admin, schema)
        outcome = await cancel(task)
        assert isinstance(outcome, asyncio.CancelledError), outcome
        await holder.execute("SELECT pg_advisory_unlock($1)", key)
    finally:
        await holder.close()
    await wait_until(lambda: _not(backend_alive(admin, pid)), "the cancelled connection is gone")
    with pytest.raises(fs.NotFoundError):
        await driver.get_state("never", 0)
    assert await advisory_locks_held(admin, schema) == 0
    await assert_pool_idle(driver)


# item 6: latest_only, the per-schema rev lock, data errors


async def test_latest_only_shows_the_latest_visible_version(
    driver: PostgresDriver, schema: str
) -> None:
    """State ``a`` is stored at r0 and r1; a transaction that took a lower rev than r2 stays
    open while ``a`` is committed again at r2. r2 is beyond the read horizon, so ``latest_only``
    must return ``a`` at r1 (its latest visible version): neither hide it nor show r0."""
    ctx, cmd = park("a")
    await driver.commit(cmd)
    await driver.commit(fs.commit(fs.park(ctx, {"v": "1"})))
    r1 = ctx.committed.rev
    holder = await raw(schema)
    reader = PostgresDriver(pgutil.dsn_for(schema), max_size=2)  # another process: no catch-up
    await reader.open()
    try:
        tx = holder.transaction()
        await tx.start()
        held = await holder.fetchval("SELECT flowstate_alloc_revs(1)")
        await driver.commit(fs.commit(fs.park(ctx, {"v": "2"})))
        r2 = ctx.committed.rev
        assert r1 < held < r2

        q = fs.get_states({"t": "faults"})
        q.latest_only = True
        result = await reader.get_states(q)
        assert [(s.id, s.rev) for s in result.states] == [("a", r1)]

        await tx.rollback()
        result = await reader.get_states(q)
        assert [(s.id, s.rev) for s in result.states] == [("a", r2)]
    finally:
        await holder.close()
        await reader.close()


async def test_rev_lock_is_per_schema(schema: str, admin: asyncpg.Connection) -> None:
    """Holding schema A's rev allocation lock stalls commits in A only: a commit in schema B
    of the same database completes meanwhile."""
    other = pgutil.new_schema()
    a = PostgresDriver(pgutil.dsn_for(schema), max_size=2)
    b = PostgresDriver(pgutil.dsn_for(other), max_size=2)
    await a.open()
    await b.open()
    holder = await asyncpg.connect(pgutil.DSN)
    try:
        key_a = await rev_lock_key(admin, schema)
        await holder.execute("SELECT pg_advisory_lock($1)", key_a)
        in_a = asyncio.ensure_future(a.commit(park("in-a")[1]))
        ctx_b, cmd_b = park("in-b")
        try:
            await asyncio.wait_for(b.commit(cmd_b), TIMEOUT)
        except TimeoutError:
            pytest.fail("a commit in schema B waited for schema A's rev lock")
        assert ctx_b.committed.rev > 0

        async def blocked() -> bool:
            return len(await lock_waiters(admin, schema)) == 1

        await wait_until(blocked, "the commit in schema A waits on its rev lock")
        assert not in_a.done()
        await holder.execute("SELECT pg_advisory_unlock($1)", key_a)
        await asyncio.wait_for(in_a, TIMEOUT)
    finally:
        await holder.close()
        await a.close()
        await b.close()


async def test_id_over_the_index_limit_is_a_validation_error(
    driver: PostgresDriver, unvalidated: None
) -> None:
    """An id of 3,000 characters sent straight to the driver (no engine validation): the btree
    refuses it; the driver reports ValidationError naming the id, and stores nothing."""
    head = await driver.head_rev()
    # random letters: PostgreSQL compresses index entries, so "x" * 3000 would fit
    long_id = "".join(random.Random(11).choices(string.ascii_letters, k=3000))
    ctx, cmd = park(long_id)
    with pytest.raises(ValidationError) as err:
        await driver.commit(cmd)  # one statement
    assert err.value.field == "current.id"
    ctx2 = fs.StateCtx(current=fs.State(id=long_id))
    with pytest.raises(ValidationError) as err:  # in a transaction
        await driver.commit(fs.commit(fs.park(ctx2), fs.delay(ctx2, "f", timedelta(hours=1))))
    assert err.value.field == "current.id"
    assert ctx.committed.rev == 0 and ctx2.committed.rev == 0
    assert await driver.head_rev() == head
    assert (await driver.get_states(fs.get_states())).states == []
    await assert_pool_idle(driver)


@pytest.mark.parametrize(
    ("field", "state", "to"),
    [
        ("id", fs.State(id="lone\ud800"), ""),
        ("labels", fs.State(id="s", labels={"k": "lone\udfff"}), ""),
        ("annotations", fs.State(id="s", annotations={"k": "nul\x00"}), ""),
        ("transition.to", fs.State(id="s"), "nul\x00"),
    ],
)
async def test_text_the_server_refuses_is_a_validation_error(
    driver: PostgresDriver, unvalidated: None, field: str, state: fs.State, to: str
) -> None:
    """Lone surrogates (which UTF-8 cannot encode) and NUL characters (which PostgreSQL text
    and jsonb cannot hold) are refused with ValidationError, not a raw driver error, and not
    mistaken for a broken connection (no retries, no StoreUnavailableError)."""
    ctx = fs.StateCtx(current=state, datas={"d": Data(blob=b"1")})
    sub = fs.transit(ctx, to) if to else fs.park(ctx)
    # one statement; then a transaction (storing data makes it one)
    for cmd in (fs.commit(sub), fs.commit(fs.store_data(ctx, "d"), sub)):
        with pytest.raises(ValidationError) as err:
            await asyncio.wait_for(driver.commit(cmd), TIMEOUT)
        assert field in err.value.field
    assert ctx.committed.rev == 0
    assert await driver.head_rev() == 0
    await assert_pool_idle(driver)


async def test_reads_of_unencodable_text_are_validation_errors(driver: PostgresDriver) -> None:
    with pytest.raises(ValidationError):
        await asyncio.wait_for(driver.get_state("lone\ud800", 0), TIMEOUT)
    with pytest.raises(ValidationError):
        await asyncio.wait_for(driver.get_states(fs.get_states({"k": "\ud800"})), TIMEOUT)
    await assert_pool_idle(driver)


async def test_a_query_with_more_labels_than_postgresql_takes_is_a_validation_error(
    driver: PostgresDriver,
) -> None:
    """40,000 label sets (one query argument each) sent straight to the driver: asyncpg
    refuses more than 32,767 arguments; that is the caller's input, not an unavailable store."""
    q = fs.get_states(or_labels=[{"k": str(i)} for i in range(40_000)])
    with pytest.raises(ValidationError):
        await asyncio.wait_for(driver.get_states(q), TIMEOUT)
    await assert_pool_idle(driver)
