"""The SQLite driver off the happy path (issue 11, items 1, 3 and 5): a full disk inside a
group-committed batch, a writer thread that dies, commits racing ``close()``, and callers
cancelled while their write is queued or running.

Each test talks to the driver directly. To put several commits into one batch deterministically,
a test holds the writer thread with a blocking job (:class:`Gate`), queues the commits behind it
and then opens the gate: the writer takes everything queued as its next batch.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.sqlite import SqliteDriver
from tests import mounts

TIMEOUT = 30.0  # generous bound on every await: a hang fails the test instead of stalling it


async def within(aw: Awaitable[Any], timeout: float = TIMEOUT) -> Any:
    return await asyncio.wait_for(aw, timeout)


async def until(cond: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Wait until ``cond()`` holds (checked every millisecond), or fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        await asyncio.sleep(0.001)


async def settled(tasks: list[asyncio.Task[Any]], timeout: float = TIMEOUT) -> None:
    """Wait until every task is done, or fail: one bound for all of them."""
    _done, pending = await asyncio.wait(tasks, timeout=timeout)
    if pending:
        for task in pending:
            task.cancel()
        pytest.fail(f"{len(pending)} of {len(tasks)} calls hung")


def pair(i: int, annotation: str = "") -> tuple[fs.CommitCmd, fs.StateCtx, fs.StateCtx]:
    """One commit that stores two states, ``a{i}`` and ``b{i}``: both land or neither does."""
    a = fs.StateCtx(current=fs.State(id=f"a{i}", annotations={"pad": annotation}))
    b = fs.StateCtx(current=fs.State(id=f"b{i}", annotations={"pad": annotation}))
    return fs.commit(fs.park(a), fs.park(b)), a, b


async def stored(driver: fs.Driver, state_id: str) -> fs.State | None:
    try:
        state: fs.State = await within(driver.get_state(state_id, 0))
    except fs.NotFoundError:
        return None
    return state


def sqlite_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("flowstate-sqlite")]


class Gate:
    """A job that occupies the writer thread until :meth:`open` is called."""

    def __init__(self, driver: SqliteDriver) -> None:
        self.driver = driver
        self.started = threading.Event()
        self.release = threading.Event()
        self.task: asyncio.Task[Any] | None = None

    def _hold(self, _conn: sqlite3.Connection) -> None:
        self.started.set()
        if not self.release.wait(TIMEOUT):
            raise AssertionError("the gate was never opened")

    async def close(self) -> None:
        """Occupy the writer: returns once the writer runs this job."""
        self.task = asyncio.create_task(self.driver._write(self._hold))
        await until(self.started.is_set, "the writer runs the gate job")

    async def open(self) -> None:
        self.release.set()
        assert self.task is not None
        await within(self.task)


async def queued(driver: SqliteDriver, n: int) -> None:
    await until(lambda: driver._queue.qsize() >= n, f"{n} jobs are queued")


@pytest.fixture
async def driver(tmp_path: Path) -> AsyncIterator[SqliteDriver]:
    d = SqliteDriver(tmp_path / "faults.db")
    await d.open()
    try:
        yield d
    finally:
        await within(d.close())


# ---------------------------------------------------------------------------------------------
# a full disk (a real tmpfs): every commit of the failed batch gets an error, the writer lives


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test only."""
    with mounts.tmpfs(tmp_path / "tmpfs", 4) as mnt:
        yield mnt


class SmallCacheDriver(SqliteDriver):
    """A tiny page cache, so a batch of commits spills dirty pages to the WAL before COMMIT:
    a disk-full error then hits in the middle of the batch, where SQLite rolls back the whole
    transaction (the savepoints of the batch included). Records the outcome of every batch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[tuple[int, int]] = []  # (jobs, failed jobs)

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        conn.execute("PRAGMA cache_size=8")
        return conn

    def _run_batch(self, conn: sqlite3.Connection, batch: list[Any]) -> None:
        super()._run_batch(conn, batch)
        self.batches.append((len(batch), sum(1 for j in batch if j.error is not None)))


async def test_disk_full_inside_a_batch_fails_each_commit_and_the_writer_recovers(
    tmpfs: Path,
) -> None:
    driver = SmallCacheDriver(tmpfs / "full.db")
    await within(driver.open())
    try:
        # Leave ~600 KiB free: the second batch of 32 commits (16 KiB each) fills it.
        free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * max(0, free - 600 * 1024))
        pad = "x" * 8000
        ok: dict[int, int] = {}  # commit -> rev of a
        failed: dict[int, BaseException] = {}
        i = 0
        for _round in range(200):
            gate = Gate(driver)
            await gate.close()
            batch = []
            for _ in range(32):
                cmd, a, _b = pair(i, pad)
                batch.append((i, a, asyncio.create_task(driver.commit(cmd))))
                i += 1
            await queued(driver, len(batch))
            await gate.open()
            await settled([task for _n, _a, task in batch])
            for n, a, task in batch:
                if task.exception() is None:
                    ok[n] = a.committed.rev
                else:
                    failed[n] = task.exception()
            # Keep committing to a full disk for a few rounds: the writer must keep serving.
            if sum(1 for size, bad in driver.batches if size >= 2 and bad) >= 3:
                break
        assert failed, "the disk never filled up"
        assert any(size >= 2 and bad for size, bad in driver.batches), driver.batches
        # SQLite lost the whole transaction of the first full batch; retried one by one, the
        # commits that still fit were stored
        assert any(0 < bad < size for size, bad in driver.batches), driver.batches
        for n, exc in failed.items():
            assert isinstance(exc, fs.FlowstateError), f"commit {n}: {exc!r}"
        assert driver.unavailable() is None

        # The store is consistent: each returned commit is readable, no commit is half there.
        for n in range(i):
            a, b = await stored(driver, f"a{n}"), await stored(driver, f"b{n}")
            assert (a is None) == (b is None), f"commit {n} is only partly stored"
            if n in ok:
                assert a is not None and a.rev == ok[n]
            elif isinstance(failed[n], fs.StoreUnavailableError):
                assert a is None, f"commit {n} failed with {failed[n]!r} but is stored"

        # Free the space: the same driver commits again.
        filler.unlink()
        for n in range(i, i + 20):
            cmd, a, b = pair(n, pad)
            await within(driver.commit(cmd))
            assert (await stored(driver, f"a{n}")) is not None
    finally:
        await within(driver.close())
    assert not sqlite_threads()


# ---------------------------------------------------------------------------------------------
# a writer thread that dies anyway: every pending and later call fails at once, health says why


async def test_dead_writer_fails_pending_and_later_calls_and_reports_why(
    driver: SqliteDriver,
) -> None:
    gate = Gate(driver)
    await gate.close()
    pending = [asyncio.create_task(driver.commit(pair(n)[0])) for n in range(5)]
    await queued(driver, len(pending))

    def broken(_conn: sqlite3.Connection, _batch: list[Any]) -> None:
        raise RuntimeError("injected writer fault")

    driver._run_batch = broken  # type: ignore[method-assign]
    await gate.open()
    await settled(pending)
    for task in pending:
        assert isinstance(task.exception(), fs.StoreUnavailableError), task.exception()
    reason = driver.unavailable()
    assert reason is not None and "injected writer fault" in reason
    with pytest.raises(fs.StoreUnavailableError, match="injected writer fault"):
        await within(driver.commit(pair(99)[0]))
    with pytest.raises(fs.StoreUnavailableError):
        await within(driver.get_state("a0", 0))
    with pytest.raises(fs.StoreUnavailableError):
        await within(driver.head_rev())
    await within(driver.close())
    assert not sqlite_threads()


async def test_server_health_reports_a_dead_writer(tmp_path: Path) -> None:
    """Served over HTTP: the client's commit fails with StoreUnavailableError (nothing hangs)
    and /health answers 503 with the reason."""
    import httpx

    from flowstate.drivers.net import NetDriver
    from tests import netserver

    backing = SqliteDriver(tmp_path / "served.db")

    def broken(_conn: sqlite3.Connection, _batch: list[Any]) -> None:
        raise RuntimeError("injected writer fault")

    backing._run_batch = broken  # type: ignore[method-assign]
    server = netserver.serve(backing)
    health = await within(asyncio.to_thread(httpx.get, server.url + "/health", timeout=TIMEOUT))
    assert health.status_code == 200, health.text
    net = NetDriver(server.url)
    await within(net.open())
    try:
        with pytest.raises(fs.StoreUnavailableError, match="injected writer fault"):
            await within(net.commit(pair(0)[0]))
    finally:
        await within(net.close())
    health = await within(asyncio.to_thread(httpx.get, server.url + "/health", timeout=TIMEOUT))
    assert health.status_code == 503
    assert "injected writer fault" in health.json()["error"]


async def test_a_store_that_cannot_be_opened_fails_with_a_flowstate_error(tmp_path: Path) -> None:
    driver = SqliteDriver(tmp_path / "no-such-dir" / "x.db")
    with pytest.raises(fs.StoreUnavailableError, match="no-such-dir"):
        await within(driver.open())
    with pytest.raises(fs.StoreUnavailableError):
        await within(driver.commit(pair(0)[0]))
    assert not sqlite_threads()


# ---------------------------------------------------------------------------------------------
# close races: a call issued while the driver closes fails promptly, nothing is left running


async def test_commits_racing_close_settle_and_leave_no_thread(driver: SqliteDriver) -> None:
    gate = Gate(driver)
    await gate.close()
    accepted = [asyncio.create_task(driver.commit(pair(n)[0])) for n in range(5)]
    await queued(driver, len(accepted))
    closing = asyncio.create_task(driver.close())
    # close() has handed the writer its stop signal (the writer is still held by the gate)
    await queued(driver, len(accepted) + 1)
    late = [asyncio.create_task(driver.commit(pair(n)[0])) for n in range(5, 25)]
    late += [asyncio.create_task(driver.get_state("a0", 0)) for _ in range(5)]
    await settled(late)
    for task in late:
        exc = task.exception()
        assert exc is None or isinstance(exc, fs.FlowstateError), repr(exc)
    await gate.open()
    await settled([closing, *accepted])
    for task in accepted:  # accepted before close(): served before the writer stops
        assert task.exception() is None, repr(task.exception())
    assert not sqlite_threads()


class ShutdownSpy(SqliteDriver):
    """Tells when close() starts shutting the reader threads down."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shutting_down = threading.Event()

    def _shutdown_readers(self) -> None:
        self.shutting_down.set()
        super()._shutdown_readers()


async def test_reads_racing_close_and_after_close_fail_promptly(tmp_path: Path) -> None:
    driver = ShutdownSpy(tmp_path / "reads.db", readers=1)
    await driver.open()
    await within(driver.commit(pair(0)[0]))
    release = threading.Event()

    def hold(_conn: sqlite3.Connection) -> None:
        release.wait(TIMEOUT)

    busy = asyncio.create_task(driver._read(hold))  # keeps the reader pool from shutting down
    closing = asyncio.create_task(driver.close())
    await until(driver.shutting_down.is_set, "close() shuts the readers down")
    racing = [asyncio.create_task(driver.get_state("a0", 0)) for _ in range(3)]
    racing.append(asyncio.create_task(driver.commit(pair(1)[0])))
    await settled(racing)
    for task in racing:
        exc = task.exception()
        assert exc is None or isinstance(exc, fs.FlowstateError), repr(exc)
    release.set()
    await settled([busy, closing])
    with pytest.raises(fs.FlowstateError):
        await within(driver.get_state("a0", 0))
    with pytest.raises(fs.FlowstateError):
        await within(driver.commit(pair(2)[0]))
    assert not sqlite_threads()


# ---------------------------------------------------------------------------------------------
# cancellation: a cancelled commit either did not land, or landed and was announced


async def landed_and_announced(driver: SqliteDriver, state_id: str) -> bool:
    """Whether ``state_id`` is stored; if it is, wait until the notifier announced its rev."""
    state = await stored(driver, state_id)
    if state is None:
        return False
    await until(lambda: driver.notifier.head >= state.rev, f"rev {state.rev} is announced")
    return True


async def test_commit_cancelled_while_queued_does_not_land(driver: SqliteDriver) -> None:
    gate = Gate(driver)
    await gate.close()
    cancelled = asyncio.create_task(driver.commit(pair(0)[0]))
    await queued(driver, 1)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await within(cancelled)
    after = asyncio.create_task(driver.commit(pair(1)[0]))  # queued behind the cancelled one
    await gate.open()
    await within(after)
    assert await stored(driver, "a0") is None, "a commit cancelled before it ran was stored"
    assert await stored(driver, "a1") is not None


async def test_commit_cancelled_after_it_ran_is_announced(driver: SqliteDriver) -> None:
    driver.poll_interval = None  # type: ignore[assignment]  # only the notifier tells watchers
    gate, inner = Gate(driver), Gate(driver)
    await gate.close()
    ran = asyncio.create_task(driver.commit(pair(0)[0]))
    await queued(driver, 1)
    inner.task = asyncio.create_task(driver._write(inner._hold))  # same batch, after the commit
    await queued(driver, 2)
    gate.release.set()
    await until(inner.started.is_set, "the writer holds the batch after running the commit")
    ran.cancel()
    await asyncio.sleep(0)
    assert not ran.done(), "a cancelled commit that ran must wait for the store's answer"
    await inner.open()
    with pytest.raises(asyncio.CancelledError):
        await within(ran)  # only once the commit's outcome was applied
    await within(gate.task)  # type: ignore[arg-type]
    assert await landed_and_announced(driver, "a0")


@pytest.mark.parametrize("point", ["at-once", "queued", "taken-not-run", "ran"])
async def test_cancelled_commit_has_a_defined_outcome(driver: SqliteDriver, point: str) -> None:
    """At every point of cancellation: not stored, or stored and announced to watchers."""
    gate, inner = Gate(driver), Gate(driver)
    await gate.close()
    cmd = pair(0)[0]
    task: asyncio.Task[None] | None = None
    if point == "taken-not-run":  # the writer took it in a batch, behind a blocking job
        inner.task = asyncio.create_task(driver._write(inner._hold))
        await queued(driver, 1)
    task = asyncio.create_task(driver.commit(cmd))
    if point != "at-once":
        await queued(driver, 2 if point == "taken-not-run" else 1)
    if point == "ran":  # the writer ran it and is held before COMMIT
        inner.task = asyncio.create_task(driver._write(inner._hold))
        await queued(driver, 2)
    if point in ("taken-not-run", "ran"):
        gate.release.set()
        await until(inner.started.is_set, "the writer holds the batch")
    task.cancel()
    await asyncio.sleep(0)
    gate.release.set()
    inner.release.set()
    with pytest.raises(asyncio.CancelledError):
        await within(task)
    await settled([t for t in (gate.task, inner.task) if t is not None])
    landed = await landed_and_announced(driver, "a0")
    assert landed == (point == "ran"), f"cancelled at {point}: landed={landed}"
    # the caller's ctx tells the truth either way (the engine's cancellation contract)
    assert (cmd.commands[0].ctx.committed.rev > 0) == landed  # type: ignore[attr-defined]
    # nothing leaked: the writer and readers still serve, the queue is empty
    await within(driver.commit(pair(1)[0]))
    assert await stored(driver, "a1") is not None
    assert driver._queue.qsize() == 0


async def test_cancelled_reads_and_writes_leak_nothing(tmp_path: Path) -> None:
    driver = SqliteDriver(tmp_path / "leak.db", readers=2)
    await driver.open()
    await within(driver.commit(pair(0)[0]))
    for n in range(1, 60):
        tasks = [
            asyncio.create_task(driver.commit(pair(n)[0])),
            asyncio.create_task(driver.get_state("a0", 0)),
            asyncio.create_task(driver.get_states(fs.get_states())),
            asyncio.create_task(driver.head_rev()),
        ]
        for _ in range(n % 4):  # cancel at different points of their progress
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await settled(tasks)
        # A cancelled caller does not wait for the writer: once a later job is answered, the
        # writer is past the commit, and if the commit landed it was announced.
        await within(driver._write(lambda _conn: None))
        await landed_and_announced(driver, f"b{n}")
    assert (await within(driver.get_state("a0", 0))).id == "a0"
    assert len(driver._reader_conns) <= 2
    await within(driver.close())
    assert not sqlite_threads()
