"""The engine off the happy path: failed stores, cancelled commits, half-failed starts, and
which processes take the recoverer and delayer roles (issue 11, items 2, 3, 5 and 12).

Cancellation tests block the store with a real lock held by another connection (an SQLite
write transaction, a PostgreSQL row lock), so the cancellation lands while the commit is inside
the store; they wait on conditions, never on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
from flowstate.data import CHECKSUM
from tests.conftest import DRIVERS, DriverFactory

TIMEOUT = 20.0


async def until(cond: Callable[[], Awaitable[bool] | bool], timeout: float = TIMEOUT) -> None:
    """Wait until ``cond()`` holds (checked every few milliseconds), or fail."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def flows() -> fs.FlowRegistry:
    registry = fs.FlowRegistry()

    @registry.flow("f")
    async def f(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.end(ctx)

    return registry


# item 2: a failed store changes nothing the caller holds


async def test_failed_store_data_leaves_the_data_untouched(driver_factory: DriverFactory) -> None:
    async with fs.Engine(driver_factory(), recovery=False, delayer=False) as engine:
        driver = engine.driver
        original = driver.store_data

        async def fails_after_assigning(data: fs.Data) -> None:
            data.rev = 4242  # what a store does before its COMMIT fails
            raise fs.StoreUnavailableError("disk full")

        ctx = fs.StateCtx(current=fs.State("d1"))
        ctx.set_data("a", fs.Data(b"mine"))
        driver.store_data = fails_after_assigning  # type: ignore[method-assign]
        with pytest.raises(fs.StoreUnavailableError):
            await engine.do(fs.store_data(ctx, "a"))
        data = ctx.datas["a"]
        assert data.rev == 0
        assert CHECKSUM not in data.annotations
        assert "flowstate.data.a" not in ctx.current.annotations

        # the natural retry stores the blob and links a rev that reads back our own blob
        driver.store_data = original  # type: ignore[method-assign]
        other = fs.StateCtx(current=fs.State("d2"))
        other.set_data("a", fs.Data(b"someone else's"))
        await engine.do(fs.store_data(other, "a"))
        await engine.do(fs.store_data(ctx, "a"))
        assert data.rev > 0 and data.rev != other.datas["a"].rev
        back = fs.StateCtx(current=ctx.current.copy())
        await engine.do(fs.get_data(back, "a"))
        assert back.datas["a"].blob == b"mine"


# item 3: a cancelled commit either did not land, or landed and the ctx (and watchers) say so


class Blocker:
    """Holds the store's write path with a real lock of another connection."""

    async def hold(self) -> None: ...

    async def blocked(self) -> bool:
        """Whether the engine's commit is now waiting on the lock."""
        raise NotImplementedError

    async def release(self) -> None: ...


class _CountingQueue:
    """The SQLite writer's job queue, counting what is put in it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.queued = 0

    def put(self, item: Any) -> None:
        self.queued += 1
        self.inner.put(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class SqliteBlocker(Blocker):
    def __init__(self, driver: fs.SqliteDriver) -> None:
        self.driver = driver
        self.conn = sqlite3.connect(driver.path, isolation_level=None, check_same_thread=False)

    async def hold(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        self.queue = _CountingQueue(self.driver._queue)
        self.driver._queue = self.queue  # type: ignore[assignment]

    async def blocked(self) -> bool:
        # a job was queued since the lock was taken, and the writer thread took it: it now
        # waits for the write lock
        return self.queue.queued > 0 and self.queue.qsize() == 0

    async def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")
        self.conn.close()


class PostgresBlocker(Blocker):
    def __init__(self, driver: Any, state_id: str) -> None:
        self.driver = driver
        self.state_id = state_id
        self.conn: Any = None
        self.tx: Any = None

    async def hold(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(
            self.driver.dsn, server_settings={"search_path": f'"{self.driver.schema}"'}
        )
        self.tx = self.conn.transaction()
        await self.tx.start()
        await self.conn.execute(
            "SELECT rev FROM flowstate_latest WHERE id = $1 FOR UPDATE", self.state_id
        )

    async def blocked(self) -> bool:
        n = await self.conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND application_name = $1",
            f"flowstate:{self.driver.schema}",
        )
        return bool(n)

    async def release(self) -> None:
        if self.conn is not None and not self.conn.is_closed():
            await self.conn.close()  # rolls the transaction back


_BACKING: dict[int, fs.Driver] = {}

#: The drivers whose commit can be caught inside the store by another connection's lock.
BLOCKABLE = [n for n in ("sqlite", "postgres", "net-over-sqlite") if n in DRIVERS]
blockable_drivers = pytest.mark.parametrize("driver_name", BLOCKABLE, indirect=True)


@pytest.fixture
async def blockable(
    driver_name: str, driver_factory: DriverFactory, tmp_path: Path
) -> AsyncIterator[fs.Engine]:
    """An engine whose store can be blocked: SQLite, PostgreSQL, or a server over SQLite (the
    engine -> NetDriver -> server -> SqliteDriver path; the lock is taken on the server's
    file)."""
    if driver_name == "net-over-sqlite":
        from tests import netserver

        backing = fs.SqliteDriver(tmp_path / "served.db")
        driver: fs.Driver = netserver.net_driver(backing)
    else:
        assert driver_name in ("sqlite", "postgres"), "see BLOCKABLE"
        driver = backing = driver_factory()
    async with fs.Engine(driver, recovery=False, delayer=False) as engine:
        _BACKING[id(engine)] = backing
        try:
            yield engine
        finally:
            # a failed test must not leave its lock (PostgreSQL: an open transaction, which
            # would hold back readers of every store on the server) behind
            for blocker in _BLOCKERS.pop(id(engine), []):
                with contextlib.suppress(Exception):
                    await blocker.release()
            _BACKING.pop(id(engine), None)


_BLOCKERS: dict[int, list[Blocker]] = {}


def blocker_for(engine: fs.Engine, state_id: str) -> Blocker:
    blocker: Blocker
    backing = _BACKING[id(engine)]
    if isinstance(backing, fs.SqliteDriver):
        blocker = SqliteBlocker(backing)
    else:
        blocker = PostgresBlocker(backing, state_id)
    _BLOCKERS.setdefault(id(engine), []).append(blocker)
    return blocker


class _Signal(logging.Handler):
    """Sets an event when the engine reports that it waits for a cancelled commit to settle."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "waiting for the store" in record.getMessage():
            self.event.set()


@pytest.fixture
def settling() -> AsyncIterator[threading.Event]:
    handler = _Signal()
    logger = logging.getLogger("flowstate")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler.event  # type: ignore[misc]
    logger.removeHandler(handler)
    logger.setLevel(old)


async def _landed(engine: fs.Engine, state_id: str) -> int:
    ctx = fs.StateCtx()
    await engine.do(fs.get_state_by_id(ctx, state_id))
    return ctx.current.rev


async def _assert_truthful(engine: fs.Engine, ctx: fs.StateCtx, before: int) -> bool:
    """The cancelled commit (a transit to "f" from rev ``before``) either landed and the ctx
    and the local watchers know it, or did not land and the ctx is unchanged. Whether it
    landed."""
    stored = await _landed(engine, ctx.current.id)
    if stored == before:
        assert ctx.committed.rev == before and ctx.current.transition.to == ""
        return False
    assert ctx.committed.rev == stored  # the ctx tells the truth
    assert ctx.current.transition.to == "f"
    assert engine.driver.notifier.head >= stored  # local watchers were told
    return True


@blockable_drivers
async def test_cancelled_commit_tells_the_truth(blockable: fs.Engine) -> None:
    engine = blockable
    ctx = fs.StateCtx(current=fs.State("c1"))
    await engine.do(fs.commit(fs.park(ctx)))
    first = ctx.committed.rev
    blocker = blocker_for(engine, "c1")
    await blocker.hold()
    task = asyncio.create_task(engine.do(fs.commit(fs.transit(ctx, "f"))))
    await until(lambda: blocker.blocked())
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the waiting commit
    await blocker.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    await _assert_truthful(engine, ctx, first)
    # a retry from this ctx commits on top instead of conflicting with itself
    await engine.do(fs.commit(fs.park(ctx)))
    assert ctx.committed.rev == await _landed(engine, "c1")


@blockable_drivers
async def test_commit_under_wait_for_times_out_truthfully(blockable: fs.Engine) -> None:
    engine = blockable
    ctx = fs.StateCtx(current=fs.State("c2"))
    await engine.do(fs.commit(fs.park(ctx)))
    first = ctx.committed.rev
    blocker = blocker_for(engine, "c2")
    await blocker.hold()
    task = asyncio.create_task(asyncio.wait_for(engine.do(fs.commit(fs.transit(ctx, "f"))), 0.01))
    await until(lambda: blocker.blocked())
    await blocker.release()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task, TIMEOUT)
    await _assert_truthful(engine, ctx, first)


@blockable_drivers
async def test_do_sync_timeout_leaves_a_truthful_ctx(
    blockable: fs.Engine, settling: threading.Event
) -> None:
    engine = blockable
    ctx = fs.StateCtx(current=fs.State("c3"))
    await engine.do(fs.commit(fs.park(ctx)))
    first = ctx.committed.rev
    blocker = blocker_for(engine, "c3")
    await blocker.hold()
    outcome: list[BaseException | None] = []

    def call() -> None:
        try:
            engine.do_sync(fs.commit(fs.transit(ctx, "f")), timeout=1.0)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=call)
    thread.start()

    async def blocked_or_over() -> bool:
        return not thread.is_alive() or await blocker.blocked()

    # Normally the commit waits on the lock long before the timeout; on a machine so busy that
    # the timeout comes first, the commit is cancelled before it reached the store, and the
    # ctx must be just as truthful.
    await until(blocked_or_over)
    if thread.is_alive():
        assert await asyncio.to_thread(settling.wait, TIMEOUT)  # the timeout hit the commit
    await blocker.release()
    await asyncio.to_thread(thread.join, TIMEOUT)
    assert not thread.is_alive()
    assert outcome and isinstance(outcome[0], TimeoutError)
    await _assert_truthful(engine, ctx, first)


async def test_cancelled_before_reaching_the_store_does_not_land(
    driver_factory: DriverFactory,
) -> None:
    async with fs.Engine(driver_factory(), recovery=False, delayer=False) as engine:
        ctx = fs.StateCtx(current=fs.State("c4"))
        task = asyncio.create_task(engine.do(fs.commit(fs.park(ctx))))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert ctx.committed.rev == 0
        with pytest.raises(fs.NotFoundError):
            await _landed(engine, "c4")


# item 5: start is transactional


class _FailingMeta:
    """Wraps a driver's commit so that commits of one meta state fail."""

    def __init__(self, driver: fs.Driver, meta_id: str) -> None:
        self.original = driver.commit
        self.meta_id = meta_id

    async def __call__(self, cmd: Any) -> None:
        for sub in cmd.commands:
            ctx = getattr(sub, "ctx", None)
            if ctx is not None and ctx.current.id == self.meta_id:
                raise fs.StoreUnavailableError("injected: store lost")
        await self.original(cmd)


@pytest.mark.parametrize(
    "driver_name",
    [n for n in DRIVERS if not n.startswith("net-over-")],  # injected into a local driver
    indirect=True,
)
async def test_failed_start_stops_what_it_started(
    store: Callable[[], fs.Driver], driver_name: str
) -> None:
    driver = store()
    engine = fs.Engine(driver, flows(), recovery=True, delayer=True)
    driver.commit = _FailingMeta(driver, "flowstate.delayer.meta")  # type: ignore[method-assign]
    with pytest.raises(fs.StoreUnavailableError):
        await engine.start()
    assert engine.recoverer is not None
    assert engine.recoverer._task is None  # not left ticking
    assert not engine.recoverer.role.active
    del driver.commit  # the instance attribute: back to the real method
    leftovers = [
        t for t in asyncio.all_tasks() if t.get_name().startswith("flowstate-") and not t.done()
    ]
    assert leftovers == []
    # the role was released: another process becomes active at once
    async with fs.Engine(store(), flows(), recovery=True, delayer=False) as other:
        assert other.recoverer is not None and other.recoverer.role.active
        meta = fs.StateCtx()
        await other.do(fs.get_state_by_id(meta, "flowstate.recovery.meta"))
    assert engine.driver._opened == 0  # the failed start closed what it opened


# item 12: a process that registers no flows takes no role unless asked


async def _exists(engine: fs.Engine, state_id: str) -> bool:
    try:
        await _landed(engine, state_id)
    except fs.NotFoundError:
        return False
    return True


async def test_no_flows_no_roles(store: Callable[[], fs.Driver]) -> None:
    async with fs.Engine(store()) as idle:
        assert not await _exists(idle, "flowstate.recovery.meta")
        assert not await _exists(idle, "flowstate.delayer.meta")
    async with fs.Engine(store(), flows()) as host:
        assert await _exists(host, "flowstate.recovery.meta")
        assert await _exists(host, "flowstate.delayer.meta")


async def test_roles_on_request_without_flows(tmp_path: Path) -> None:
    async with fs.Engine(fs.SqliteDriver(tmp_path / "x.db"), recovery=True) as asked:
        assert await _exists(asked, "flowstate.recovery.meta")
        assert not await _exists(asked, "flowstate.delayer.meta")


@pytest.mark.parametrize(
    "driver_name",
    [n for n in BLOCKABLE if n.endswith("sqlite")],  # a data insert waits on SQLite's lock only
    indirect=True,
)
async def test_cancelled_store_data_tells_the_truth(blockable: fs.Engine) -> None:
    engine = blockable
    ctx = fs.StateCtx(current=fs.State("s1"))
    data = fs.Data(b"payload")
    ctx.set_data("a", data)
    blocker = blocker_for(engine, "s1")
    await blocker.hold()
    task = asyncio.create_task(engine.do(fs.store_data(ctx, "a")))
    await until(lambda: blocker.blocked())
    task.cancel()
    await asyncio.sleep(0)
    await blocker.release()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT)
    # the writer had started the insert: it landed, and the Data and the ctx say so
    assert data.rev > 0 and CHECKSUM in data.annotations
    assert ctx.current.annotations["flowstate.data.a"] == str(data.rev)
    back = fs.StateCtx(current=ctx.current.copy())
    await engine.do(fs.get_data(back, "a"))
    assert back.datas["a"].blob == b"payload"
