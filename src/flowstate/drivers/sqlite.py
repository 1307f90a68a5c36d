"""SqliteDriver: the embedded, durable default store (one file, WAL).

Threads: one writer thread owns the write connection and runs commits in batches: every commit
waiting when the writer becomes free joins one transaction (each in its own savepoint, so one
commit's conflict does not affect the others) and the batch pays for one fsync. Reads run on a
small pool of reader threads. The one SQLite call that may run on the event loop thread is a
commit on NORMAL or OFF when it can neither wait nor sync: the writer is idle, the write lock is
free and the WAL has room, so the COMMIT only appends to the WAL (``_fast_commit``; the hand-off
to the writer costs more than such a commit). Checkpoints always run on the writer thread.

The schema, the upgrade of older files, how each query uses the indexes and what a commit
costs are in docs/sqlite.md.

A write SQLite cannot make (full disk, I/O error) fails with StoreWriteError (StoreFullError
for a full disk) and changes nothing; the writer lives on. See docs/sqlite-faults.md for every
outcome off the happy path.

Several processes may share one file: writes take SQLite's write lock (``BEGIN IMMEDIATE``), so
the rev check and rev allocation are serialised across processes, and a commit becomes visible
to readers only with all lower revs. Watchers notice other processes' commits by polling the
head rev every ``poll_interval`` seconds (one poller per driver, only while someone waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import sqlite3
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from flowstate.clock import Clock, from_millis, from_seconds, to_millis, to_seconds
from flowstate.commands import (
    CommitCmd,
    DelayedState,
    GetDelayedStatesResult,
    GetStatesCmd,
    GetStatesResult,
    ParkCmd,
    TransitCmd,
)
from flowstate.data import Data
from flowstate.drivers.base import CommitOutcome, Driver, process_commit, run_commit
from flowstate.drivers.sqljson import dumps_map, dumps_state, loads_map, loads_state
from flowstate.errors import (
    CommitUnknownError,
    DataNotFoundError,
    FlowstateError,
    NotFoundError,
    StoreFullError,
    StoreUnavailableError,
    StoreWriteError,
)
from flowstate.state import State, Transition

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

#: The schema version this driver writes, kept in ``PRAGMA user_version``. A store written
#: before versioning (user_version 0 with tables) is upgraded in place when it is opened; see
#: docs/sqlite.md.
SCHEMA_VERSION = 1

# flowstate_states.committed_max is the greatest committed_at of all revs up to and including
# this one: monotone in rev, so a binary search over revs finds the first rev that can match a
# since_time filter even when the clock went backwards (no index: no extra page per commit).
# flowstate_latest_labels holds the labels of the latest version of every id only, so a
# latest_only label query reads matching latest versions and nothing else.
SCHEMA = """
CREATE TABLE IF NOT EXISTS flowstate_states (
    rev INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    committed_at INTEGER NOT NULL,
    annotations TEXT NOT NULL,
    labels TEXT NOT NULL,
    transition_to TEXT NOT NULL,
    transition_annotations TEXT NOT NULL,
    committed_max INTEGER
);
CREATE INDEX IF NOT EXISTS flowstate_states_by_id ON flowstate_states (id, rev);
CREATE TABLE IF NOT EXISTS flowstate_labels (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    rev INTEGER NOT NULL,
    PRIMARY KEY (key, value, rev)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flowstate_latest_labels (
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    rev INTEGER NOT NULL,
    PRIMARY KEY (key, value, rev)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flowstate_data (
    rev INTEGER PRIMARY KEY,
    annotations TEXT NOT NULL,
    blob BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS flowstate_delayed (
    offset INTEGER PRIMARY KEY,
    execute_at INTEGER NOT NULL,
    state TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flowstate_delayed_by_time ON flowstate_delayed (execute_at, offset);
"""

# From the unversioned schema (user_version 0) to version 1: the new column, tables and
# indexes filled from the log. Runs in the transaction that creates them.
_MIGRATE_1 = [
    "ALTER TABLE flowstate_states ADD COLUMN committed_max INTEGER",
    "UPDATE flowstate_states SET committed_max = m.hi FROM "
    "(SELECT rev, max(committed_at) OVER (ORDER BY rev) AS hi FROM flowstate_states) m "
    "WHERE flowstate_states.rev = m.rev",
    "INSERT INTO flowstate_latest_labels (key, value, rev) "
    "SELECT l.key, l.value, l.rev FROM flowstate_labels l "
    "WHERE l.rev IN (SELECT max(rev) FROM flowstate_states GROUP BY id)",
]


def _schema_statements() -> list[str]:
    return [st.strip() for st in SCHEMA.split(";") if st.strip()]


def _upgrade(conn: sqlite3.Connection) -> None:
    """Create the schema, or upgrade an older store in place (writer thread, at open)."""
    conn.execute("BEGIN IMMEDIATE")  # one process upgrades; the others then see the version
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FlowstateError(
                f"{SCHEMA_VERSION} is the newest store schema this flowstate knows, "
                f"the file has {version}: use a newer flowstate"
            )
        if version < SCHEMA_VERSION:
            old = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'flowstate_states'"
            ).fetchone()
            statements = _schema_statements()
            if old is not None:  # unversioned: the tables exist without what version 1 adds
                for st in statements:
                    conn.execute(st)
                for st in _MIGRATE_1:
                    conn.execute(st)
                log.info("upgraded the SQLite store schema to version %d", SCHEMA_VERSION)
            for st in statements:
                conn.execute(st)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


_STATE_COLUMNS = "rev, id, committed_at, annotations, labels, transition_to, transition_annotations"
_BATCH_MAX = 256
#: SQLite's default wal_autocheckpoint: the writer thread's connection checkpoints at a commit
#: once the WAL holds this many frames; the inline path leaves such commits to it.
_CHECKPOINT_FRAMES = 1000
#: Inline commits in a row (each 20-30 us) after which the committing task yields to the loop,
#: so a task committing in a loop cannot hold the loop for more than about a quarter ms.
_INLINE_RUN = 8


def _row_state(row: tuple[Any, ...]) -> State:
    rev, sid, at, ann, labels, to, tann = row
    transition = Transition(to, loads_map(tann))
    return State(sid, rev, loads_map(ann), loads_map(labels), from_millis(at), transition)


log = logging.getLogger("flowstate")


@dataclass(slots=True, eq=False)
class _Job:
    """One write for the writer thread.

    ``run`` executes inside a transaction and may run more than once (a batch whose transaction
    SQLite lost is run again job by job), so it must not change anything but its return value.
    Cancellation (the driver keeps the engine's contract itself, ``settles_writes``): when
    the caller is cancelled, under the driver's ``_start_lock``, a job the writer has not
    ``started`` is marked ``abandoned`` and never runs; a started one is waited for on
    ``waiter`` (set by ``_deliver`` on the loop thread, like ``future``) and its outcome is
    applied before the cancellation goes on. A job that ran is announced to the watchers even
    if nobody waits for it any more.
    """

    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None
    abandoned: bool = False
    started: bool = False
    done: bool = False  # result or error is final (the writer's death leaves it alone)
    delivered: bool = False  # _deliver saw it (loop thread)
    waiter: asyncio.Future[None] | None = None


class SqliteDriver(Driver):
    """A durable store in one SQLite file (WAL mode).

    ``synchronous="FULL"`` (the default) makes every returned commit survive a power loss;
    ``"NORMAL"`` survives a crash of the process but may lose the last commits on power loss,
    and is about three times faster.

    A write SQLite cannot make (a full disk, an I/O error, the file locked by another process
    for longer than ``busy_timeout``) fails with :class:`StoreWriteError` (:class:`StoreFullError`
    for a full disk) and changes nothing;
    the writer keeps serving, so writes succeed again once the cause is gone. If the writer
    thread dies all the same, every pending and later call fails at once with
    :class:`StoreUnavailableError` and :meth:`unavailable` says why.
    """

    settles_writes = True  # see _Job: a cancelled write never runs or is applied

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        busy_timeout: float = 60.0,
        poll_interval: float = 0.02,
        readers: int = 2,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise FlowstateError(f"synchronous must be OFF, NORMAL, FULL or EXTRA: {synchronous}")
        self.path = os.fspath(path)
        self.synchronous = synchronous
        self.busy_timeout = busy_timeout
        self.poll_interval: float = poll_interval
        self._readers = readers
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        # Guards _closed and _dead together with every put on _queue: once either is set, no
        # job enters the queue, so the writer's final drain fails every job that is left.
        self._state_lock = threading.Lock()
        self._start_lock = threading.Lock()  # the writer starting a job vs. its caller leaving
        self._closed = True
        self._dead: str | None = None
        # the inline commit path (see _fast_commit): its connection, the WAL-index file it
        # reads to know whether a commit there could sync or checkpoint, and the writer's state
        self._fast: sqlite3.Connection | None = None
        self._fast_lock = threading.Lock()
        self._shm_fd = -1
        self._writer_busy = True
        self._last_committer: asyncio.Task[Any] | None = None  # see commit()
        self._inline_run = 0  # inline commits since the last yield to the loop

    # lifecycle

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    async def _open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue.SimpleQueue()
        self._closed, self._dead = False, None
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="flowstate-sqlite-writer", daemon=True
        )
        self._writer.start()
        try:
            await ready
        except BaseException as exc:
            self._closed = True
            await asyncio.to_thread(self._writer.join)
            self._writer = None
            if isinstance(exc, sqlite3.Error):
                raise StoreUnavailableError(f"cannot open {self.path}: {exc}") from exc
            raise
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="flowstate-sqlite-read")
        self.notifier.head = await self.head_rev()

    async def _close(self) -> None:
        with self._state_lock:
            self._closed = True  # from here on, calls fail at once instead of queueing
            if self._writer is not None:
                self._queue.put(None)  # after every accepted job: those are still served
        if self._pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._shutdown_readers)
            self._pool = None
        self._local = threading.local()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
            self._writer = None

    def _shutdown_readers(self) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    def unavailable(self) -> str | None:
        """Why this driver serves no call (its writer thread died), or None."""
        return self._dead

    def _refuse(self) -> None:
        """Raise if no call may start now: the writer died, or the driver is not open."""
        if self._dead is not None:
            raise StoreUnavailableError(self._dead)
        if self._closed or self._loop is None:
            raise StoreUnavailableError(f"SqliteDriver is closed or not open yet: {self.path}")

    # the writer thread

    def _writer_main(self, ready: asyncio.Future[None]) -> None:
        loop = ready.get_loop()
        try:
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
            _upgrade(conn)
            self._open_fast()
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve_error, ready, exc)
            return
        loop.call_soon_threadsafe(_resolve, ready, None)
        batch: list[_Job] = []
        try:
            while True:
                self._writer_busy = False
                job = self._queue.get()
                self._writer_busy = True
                if job is None:
                    break
                batch = [job]
                stop = False
                while len(batch) < _BATCH_MAX:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                self._run_batch(conn, batch)
                self._writer_busy = False  # before the callers resume: their next commit
                self._post(self._deliver, batch)
                batch = []
                if stop:
                    break
        except BaseException as exc:
            # A bug or a connection SQLite could not roll back: the transaction in hand is
            # dropped with the connection below, so none of these jobs was stored.
            with self._state_lock:
                self._dead = f"the SQLite writer thread died: {exc!r}"
            for job in batch:
                if not job.done:
                    job.result, job.error = None, StoreUnavailableError(self._dead)
            self._post(self._deliver, batch)
        finally:
            self._close_fast()
            conn.close()
            self._fail_queued()

    # the inline commit path

    def _open_fast(self) -> None:
        """Writer thread, at open: the connection of the inline commit path (NORMAL and OFF
        only: a COMMIT there writes the WAL without fsync). No busy timeout: a write lock
        held elsewhere sends the commit to the writer thread instead of waiting. No
        automatic checkpoint: checkpoints (which fsync) run on the writer thread."""
        if self.synchronous not in ("NORMAL", "OFF"):
            return
        fast = self._connect()
        try:
            fast.execute("PRAGMA busy_timeout=0")
            fast.execute("PRAGMA wal_autocheckpoint=0")
            self._shm_fd = os.open(self.path + "-shm", os.O_RDONLY)
        except BaseException:
            fast.close()
            raise
        self._fast = fast

    def _close_fast(self) -> None:
        with self._fast_lock:  # never under an inline commit (the writer may die any time)
            if self._fast is not None:
                self._fast.close()
                self._fast = None
            if self._shm_fd >= 0:
                os.close(self._shm_fd)
                self._shm_fd = -1

    def _wal_room(self) -> bool:
        """Whether a commit now can append to the WAL without syncing: the WAL holds frames
        not yet checkpointed (so the commit cannot restart the WAL, which syncs its header)
        and fewer than the checkpoint threshold (so the writer thread's next commit
        checkpoints in time). Read from the WAL-index header (mxFrame at byte 16, the
        checkpoint's nBackfill at byte 96, native byte order: sqlite.org/walformat.html)."""
        try:
            head = os.pread(self._shm_fd, 100, 0)
        except OSError:
            return False
        if len(head) < 100:
            return False
        frames = int.from_bytes(head[16:20], sys.byteorder)
        backfilled = int.from_bytes(head[96:100], sys.byteorder)
        return backfilled < frames < _CHECKPOINT_FRAMES

    def _fast_commit(self, cmd: CommitCmd, now: datetime) -> CommitOutcome | None:
        """Run ``cmd`` on the event loop thread when that is cheaper than the hand-off to the
        writer thread and cannot block: the writer is idle, the write lock is free (no busy
        wait), and the commit appends to the WAL without sync or checkpoint. None: it did
        not start (nothing happened); the caller queues it for the writer thread."""
        if self._writer_busy or not self._queue.empty() or not self._wal_room():
            return None
        if not self._fast_lock.acquire(blocking=False):
            return None
        try:
            conn = self._fast
            if conn is None:
                return None
            if not _lean(cmd):
                outcome = self._fast_transaction(conn, cmd, now)
            else:
                try:
                    outcome = run_commit(process_commit(cmd, now), _LeanTx(conn))
                except _Busy:
                    return None  # nothing was written; the writer waits for the lock
            if outcome is None:
                return None
        finally:
            self._fast_lock.release()
        self._announce_stored(outcome)
        return outcome

    def _fast_transaction(
        self, conn: sqlite3.Connection, cmd: CommitCmd, now: datetime
    ) -> CommitOutcome | None:
        """An inline commit in a transaction of its own (under _fast_lock)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            return None  # locked (by our writer or another process): the writer waits
        try:
            outcome = run_commit(process_commit(cmd, now), _SqliteTx(conn))
        except BaseException as exc:
            self._fast_rollback(conn)
            error = _store_error(exc, "write")
            if error is exc:
                raise
            raise error from exc
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._fast_rollback(conn)
            raise _commit_error(exc) from exc
        return outcome

    def _fast_rollback(self, conn: sqlite3.Connection) -> None:
        """End a failed inline transaction; if SQLite cannot, retire the inline path (the
        writer thread serves every commit from then on)."""
        try:
            _rollback(conn)
        except sqlite3.Error:
            log.warning("the SQLite inline commit connection failed; commits use the writer")
            self._fast = None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _fail_queued(self) -> None:
        """Fail every job still queued once the writer stops (none, unless it died)."""
        left: list[_Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.error = StoreUnavailableError(self._dead or "SqliteDriver is closed")
                left.append(job)
        if left:
            self._post(self._deliver, left)

    def _post(self, fn: Callable[[list[_Job]], None], batch: list[_Job]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is left to tell
            self._loop.call_soon_threadsafe(fn, batch)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        """Run ``batch`` and set the outcome of each job.

        Several jobs share one transaction, each in its own savepoint, so a job's conflict or
        error rolls back only its own writes. SQLite rolls back the whole transaction on some
        errors (a full disk or an I/O error while it spills pages or commits); nothing of the
        batch is stored then, and every job is run again in a transaction of its own, so only
        the jobs that cannot be stored fail.
        """
        if len(batch) > 1 and self._run_together(conn, batch):
            for job in batch:
                job.done = True
            return
        for job in batch:
            self._run_alone(conn, job)
            job.done = True

    def _run_together(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        """One transaction for the batch; False if it was lost and nothing was stored."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:  # locked by another process past busy_timeout, ...
            for job in batch:
                job.error = _store_error(exc, "write")
            return True
        for job in batch:
            if not self._start(job):
                continue
            try:
                conn.execute("SAVEPOINT job")
                job.result = job.run(conn)
                conn.execute("RELEASE job")
            except BaseException as exc:
                job.result, job.error = None, exc
                if not _undo_savepoint(conn):
                    return self._lost(conn, batch)
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if _code(exc) == _SQLITE_FULL:
                return self._lost(conn, batch)
            _rollback(conn)
            for job in batch:
                job.result, job.error = None, _commit_error(exc)
            return True
        for job in batch:
            if job.error is not None:
                job.error = _store_error(job.error, "write")
        return True

    def _lost(self, conn: sqlite3.Connection, batch: list[_Job]) -> bool:
        _rollback(conn)
        for job in batch:
            job.result = job.error = None
        return False

    def _start(self, job: _Job) -> bool:
        """Writer thread: claim ``job`` for running, unless its caller abandoned it."""
        with self._start_lock:
            if job.abandoned:
                return False
            job.started = True
            return True

    def _run_alone(self, conn: sqlite3.Connection, job: _Job) -> None:
        if not self._start(job):
            return
        job.result = job.error = None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            job.error = _store_error(exc, "write")
            return
        try:
            result = job.run(conn)
        except BaseException as exc:
            _rollback(conn)
            job.error = _store_error(exc, "write")
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback(conn)
            job.error = _commit_error(exc)
            return
        job.result = result

    def _deliver(self, batch: list[_Job]) -> None:
        head = 0
        for job in batch:
            if job.error is None and isinstance(job.result, CommitOutcome):
                # announced even if the caller was cancelled meanwhile: it is in the store
                head = max(head, job.result.max_rev)
                if self._tail is not None and job.result.stored:
                    self._tail.offer(job.result.stored)
            job.delivered = True
            if job.waiter is not None and not job.waiter.done():
                job.waiter.set_result(None)
            if job.future.done():
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(job.result)
        if head:
            self.notifier.notify(head)

    async def _write(
        self,
        run: Callable[[sqlite3.Connection], Any],
        on_landed: Callable[[Any], object] | None = None,
    ) -> Any:
        """Queue ``run`` for the writer thread and await its result.

        Cancelled, the write either never runs (the writer had not started it) or is waited
        for, and ``on_landed(result)`` applies a success, before CancelledError goes on.
        """
        with self._state_lock:
            self._refuse()
            assert self._loop is not None
            job = _Job(run, self._loop.create_future())
            self._queue.put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            with self._start_lock:
                if not job.started:
                    job.abandoned = True  # the writer will skip it: nothing lands
                    raise
            log.debug("a write was cancelled; waiting for the store's answer")
            if not job.delivered:
                job.waiter = self._loop.create_future()
                while not job.waiter.done():
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.shield(job.waiter)
            if job.error is None and on_landed is not None:
                on_landed(job.result)
            raise

    # reads

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=1")
            self._local.conn = conn
            with self._conns_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        self._refuse()
        pool, loop = self._pool, self._loop
        if pool is None or loop is None:
            raise StoreUnavailableError(f"SqliteDriver is closed or not open yet: {self.path}")
        try:
            return await loop.run_in_executor(pool, lambda: fn(self._reader()))
        except RuntimeError as exc:
            if self._closed:  # the pool shuts down: close() began after the check above
                raise StoreUnavailableError(f"SqliteDriver is closed: {self.path}") from exc
            raise
        except sqlite3.Error as exc:
            error = _store_error(exc, "read")
            if error is exc:
                raise
            raise error from exc

    # the driver API

    async def commit(self, cmd: CommitCmd) -> None:
        now = self.clock.now()
        if self._fast is not None:
            # Inline only for a task that commits one after the other alone: commits of
            # several tasks go to the writer thread, whose batches serve them better (one
            # transaction, the loop free for their Python work meanwhile).
            task = asyncio.current_task()
            solo = task is self._last_committer
            self._last_committer = task
            if solo:
                self._refuse()
                done = self._fast_commit(cmd, now)
                if done is not None:
                    done.apply()
                    self._inline_run += 1
                    if self._inline_run >= _INLINE_RUN:  # the loop's other work gets its turn
                        self._inline_run = 0
                        await asyncio.sleep(0)
                    return
        # a fresh generator on every run: the writer may run a job again (see _Job)
        outcome: CommitOutcome = await self._write(
            lambda conn: run_commit(process_commit(cmd, now), _SqliteTx(conn)),
            CommitOutcome.apply,
        )
        outcome.apply()

    async def get_state(self, state_id: str, rev: int) -> State:
        state: State = await self._read(lambda conn: _get_state(conn, state_id, rev))
        return state

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        state: State = await self._read(lambda conn: _get_state_by_labels(conn, labels))
        return state

    async def get_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        result: GetStatesResult = await self._read(lambda conn: _get_states(conn, cmd))
        return result

    async def delay(self, delayed: DelayedState) -> int:
        offset: int = await self._write(lambda conn: _insert_delayed(conn, delayed))
        return offset

    async def get_delayed_states(
        self, since: datetime | None, until: datetime, offset: int, limit: int
    ) -> GetDelayedStatesResult:
        def run(conn: sqlite3.Connection) -> GetDelayedStatesResult:
            sql = "SELECT offset, execute_at, state FROM flowstate_delayed "
            if since is not None:
                # a time window (the delayer's look-ahead): read it through the time index;
                # with LIMIT the planner would walk every offset to avoid sorting the window
                sql += "INDEXED BY flowstate_delayed_by_time "
            sql += "WHERE offset > ? AND execute_at <= ? "
            args: list[Any] = [offset, to_seconds(until)]
            if since is not None:
                sql += "AND execute_at > ? "
                args.append(to_seconds(since))
            sql += "ORDER BY offset LIMIT ?"
            args.append(limit + 1)
            rows = conn.execute(sql, args).fetchall()
            items = [DelayedState(loads_state(s), from_seconds(at), off) for off, at, s in rows]
            return GetDelayedStatesResult(items[:limit], len(items) > limit)

        result: GetDelayedStatesResult = await self._read(run)
        return result

    async def store_data(self, data: Data) -> None:
        # data changes only once it is stored; the writer thread sees a snapshot of it
        annotations, blob = dumps_map(data.annotations), bytes(data.blob)

        def landed(rev: int) -> None:
            data.rev = rev

        rev: int = await self._write(lambda conn: _insert_data(conn, annotations, blob), landed)
        data.rev = rev

    async def get_data(self, data: Data) -> None:
        await self._read(lambda conn: _SqliteTx(conn).get_data(data))

    async def head_rev(self) -> int:
        rev: int = await self._read(_max_rev)
        return rev


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _resolve_error(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


# SQLite's primary result codes that mean the file cannot be read or written now, as opposed to
# a statement or value SQLite refused (https://sqlite.org/rescode.html).
_SQLITE_BUSY = 5
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_STORE_CODES = frozenset(
    {
        5,  # BUSY: locked by another connection for longer than busy_timeout
        6,  # LOCKED
        7,  # NOMEM
        8,  # READONLY
        9,  # INTERRUPT
        _SQLITE_IOERR,
        11,  # CORRUPT
        _SQLITE_FULL,
        14,  # CANTOPEN
        15,  # PROTOCOL
        26,  # NOTADB
    }
)


def _code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def _store_error(exc: BaseException, what: str) -> BaseException:
    """``exc`` as a FlowstateError if SQLite could not read or write the file; otherwise
    ``exc`` itself (a conflict, a refused value or a bug is not the store's condition)."""
    if not isinstance(exc, sqlite3.Error) or _code(exc) not in _STORE_CODES:
        return exc
    error: FlowstateError
    if _code(exc) == _SQLITE_FULL:
        error = _full_error(exc, what)
    elif what == "write":
        error = StoreWriteError(f"SQLite could not write ({exc}); nothing was stored")
    else:
        error = StoreUnavailableError(f"SQLite could not read ({exc})")
    error.__cause__ = exc
    return error


def _full_error(exc: sqlite3.Error, what: str) -> StoreFullError:
    """SQLITE_FULL: the disk (or the ``max_page_count`` of the file) has no room. A read fails
    so when its temporary files do not fit."""
    done = "nothing was stored" if what == "write" else "the read failed"
    return StoreFullError(
        f"the SQLite store's disk is full ({exc}); {done}: free disk space, then retry"
    )


def _commit_error(exc: sqlite3.Error) -> FlowstateError:
    """The error of a failed COMMIT. SQLITE_FULL means the WAL's commit frame, its last write,
    was never written: nothing was stored. After other errors (a failed fsync) the frames may
    be complete in the WAL, and a crash before the next commit overwrites them would recover
    them: the outcome is unknown."""
    error: FlowstateError
    if _code(exc) == _SQLITE_FULL:
        error = _full_error(exc, "write")
    else:
        error = CommitUnknownError(f"SQLite COMMIT failed ({exc}); reload to see if it stored")
    error.__cause__ = exc
    return error


def _undo_savepoint(conn: sqlite3.Connection) -> bool:
    """Roll back the failed job's savepoint; False if SQLite already rolled back (or cannot
    roll back) the whole transaction, which takes every savepoint with it."""
    if not conn.in_transaction:
        return False
    try:
        conn.execute("ROLLBACK TO job")
        conn.execute("RELEASE job")
    except sqlite3.Error:
        return False
    return True


def _rollback(conn: sqlite3.Connection) -> None:
    """End the open transaction, if SQLite has not ended it already. A ROLLBACK that fails
    leaves the connection in an unknown state: the error ends the writer thread."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _max_rev(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(rev) FROM flowstate_states").fetchone()
    return int(row[0] or 0)


def _get_state(conn: sqlite3.Connection, state_id: str, rev: int) -> State:
    if rev == 0:
        sql = f"SELECT {_STATE_COLUMNS} FROM flowstate_states WHERE id = ? "
        sql += "ORDER BY rev DESC LIMIT 1"
        row = conn.execute(sql, (state_id,)).fetchone()
    else:
        sql = f"SELECT {_STATE_COLUMNS} FROM flowstate_states WHERE rev = ? AND id = ?"
        row = conn.execute(sql, (rev, state_id)).fetchone()
    if row is None:
        raise NotFoundError(f"id={state_id} rev={rev}")
    return _row_state(row)


def _get_state_by_labels(conn: sqlite3.Connection, labels: Mapping[str, str]) -> State:
    sets = [dict(labels)] if labels else []
    rows = _select(conn, sets, latest=False, since_ms=None, after=0, limit=1, desc=True)
    if not rows:
        raise NotFoundError(f"labels={dict(labels)}")
    return _row_state(rows[0])


#: How many index entries of each label pair of a set are counted, in rounds, to pick the
#: pair with the fewest to drive the index range (the next round only if every pair has more).
_PROBES = (64, 1024, 16384)


def _by_selectivity(
    conn: sqlite3.Connection, table: str, labels: dict[str, str], after: int
) -> list[tuple[str, str]]:
    """The pairs of one label set, the one with the fewest entries (up to _PROBE) first: it
    drives the index range, the others are probed per candidate."""
    pairs = list(labels.items())
    if len(pairs) < 2:
        return pairs
    sql = (
        f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE key = ? AND value = ? AND rev > ? "
        "LIMIT ?)"
    )
    for cap in _PROBES:  # counts below the cap are exact: stop once the smallest is
        counts = [conn.execute(sql, (k, v, after, cap)).fetchone()[0] for k, v in pairs]
        if min(counts) < cap:
            break
    order = sorted(range(len(pairs)), key=lambda i: counts[i])
    return [pairs[i] for i in order]


def _arm(
    table: str,
    pairs: list[tuple[str, str]],
    since_ms: int | None,
    after: int,
    limit: int,
    desc: bool,
) -> tuple[str, list[Any]]:
    """SQL for the revs after ``after`` (at most ``limit``, in rev order) that ``table`` holds
    with every pair of ``pairs`` (``table``: one of the label tables) and that pass the time
    filter. One index range on ``table``, in rev order; the other pairs, the time and (for
    flowstate_latest_labels) being the latest version are checked per candidate by key."""
    latest = table == "flowstate_latest_labels"
    sql = f"SELECT l.rev FROM {table} l"
    if since_ms is not None or latest:
        sql += " CROSS JOIN flowstate_states s"
    (key, value), rest = pairs[0], pairs[1:]
    where = ["l.key = ?", "l.value = ?", "l.rev > ?"]
    args: list[Any] = [key, value, after]
    for key, value in rest:
        where.append(
            f"EXISTS (SELECT 1 FROM {table} m WHERE m.key = ? AND m.value = ? AND m.rev = l.rev)"
        )
        args += [key, value]
    if since_ms is not None or latest:
        where.append("s.rev = l.rev")
    if since_ms is not None:
        where.append("s.committed_at >= ?")
        args.append(since_ms)
    if latest:  # an entry the single-statement commit left behind is not the latest (_LeanTx)
        where.append("s.rev = (SELECT max(x.rev) FROM flowstate_states x WHERE x.id = s.id)")
    sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY l.rev{' DESC' if desc else ''} LIMIT ?"
    args.append(limit)
    return sql, args


def _select(
    conn: sqlite3.Connection,
    sets: list[dict[str, str]],
    *,
    latest: bool,
    since_ms: int | None,
    after: int,
    limit: int,
    desc: bool = False,
) -> list[tuple[Any, ...]]:
    """The rows of the matching versions with a rev after ``after``, at most ``limit``, in rev
    order (descending with ``desc``). ``sets``: the OR-list of label sets, none empty (no
    set: any labels). Every filter is served by an index range read in rev order, so the
    work is the rows returned plus the candidates the other filters reject (see
    docs/sqlite.md)."""
    order = " DESC" if desc else ""
    if not sets:
        sql = f"SELECT {_STATE_COLUMNS} FROM flowstate_states s WHERE rev > ?"
        args: list[Any] = [after]
        if since_ms is not None:
            sql += " AND committed_at >= ?"
            args.append(since_ms)
        if latest:  # reads the superseded versions on the way (see docs/sqlite.md)
            sql += " AND rev = (SELECT max(x.rev) FROM flowstate_states x WHERE x.id = s.id)"
        sql += f" ORDER BY rev{order} LIMIT ?"
        return conn.execute(sql, [*args, limit]).fetchall()
    table = "flowstate_latest_labels" if latest else "flowstate_labels"
    arms: list[str] = []
    args = []
    for labels in sets:
        pairs = _by_selectivity(conn, table, labels, after)
        arm, arm_args = _arm(table, pairs, since_ms, after, limit, desc)
        arms.append(arm)
        args += arm_args
    inner = " UNION ".join(f"SELECT rev FROM ({arm})" for arm in arms)
    sql = (
        f"SELECT {_STATE_COLUMNS} FROM flowstate_states WHERE rev IN ({inner}) "
        f"ORDER BY rev{order} LIMIT ?"
    )
    return conn.execute(sql, [*args, limit]).fetchall()


def _time_floor(conn: sqlite3.Connection, since_ms: int, head: int) -> int | None:
    """A rev below every version committed at or after ``since_ms`` (None: there is none).

    committed_max is monotone in rev, so a binary search over the revs finds the first rev
    that reaches ``since_ms`` in about log2(head) primary-key lookups, even if the clock went
    backwards at some commit (a version after it with an older time is filtered per row)."""

    def reached(rev: int) -> tuple[int, bool]:
        """The last rev at or below ``rev`` (0: none), and whether it reaches since_ms."""
        row = conn.execute(
            "SELECT rev, committed_max FROM flowstate_states WHERE rev <= ? "
            "ORDER BY rev DESC LIMIT 1",
            (rev,),
        ).fetchone()
        if row is None:
            return 0, False
        return row[0], row[1] is not None and row[1] >= since_ms

    hi, ok = reached(head)
    if not ok:
        return None
    lo = 0  # every rev at or below lo misses since_ms; hi reaches it
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rev, ok = reached(mid)
        if ok:
            hi = rev
        else:
            lo = mid
    return hi - 1


def _get_states(conn: sqlite3.Connection, cmd: GetStatesCmd) -> GetStatesResult:
    sets = [] if any(not s for s in cmd.labels) else cmd.labels  # an empty set matches all
    since_ms = to_millis(cmd.since_time) if cmd.since_time is not None else None
    conn.execute("BEGIN")  # one snapshot for the head, the anchor and the page
    try:
        head = _max_rev(conn)
        floor = 0
        if since_ms is not None:
            time_floor = _time_floor(conn, since_ms, head)
            if time_floor is None:
                return GetStatesResult([], False, head)
            floor = time_floor
        since = cmd.since_rev
        if since < 0:
            anchor = _select(
                conn, sets, latest=False, since_ms=since_ms, after=floor, limit=1, desc=True
            )
            if not anchor:
                return GetStatesResult([], False, head)
            since = anchor[0][0] - 1
        rows = _select(
            conn,
            sets,
            latest=cmd.latest_only,
            since_ms=since_ms,
            after=max(since, floor),
            limit=cmd.limit + 1,
        )
    finally:
        conn.execute("COMMIT")
    states = [_row_state(r) for r in rows[: cmd.limit]]
    more = len(rows) > cmd.limit
    return GetStatesResult(states, more, 0 if more else head)


def _insert_delayed(conn: sqlite3.Connection, delayed: DelayedState) -> int:
    cur = conn.execute(
        "INSERT INTO flowstate_delayed (execute_at, state) VALUES (?, ?)",
        (to_seconds(delayed.execute_at), dumps_state(delayed.state)),
    )
    return int(cur.lastrowid or 0)


def _insert_data(conn: sqlite3.Connection, annotations: str, blob: bytes) -> int:
    cur = conn.execute(
        "INSERT INTO flowstate_data (annotations, blob) VALUES (?, ?)", (annotations, blob)
    )
    return int(cur.lastrowid or 0)


# the rev check, and the labels that leave flowstate_latest_labels with the old latest version
_SELECT_LATEST = "SELECT rev, labels FROM flowstate_states WHERE id = ? ORDER BY rev DESC LIMIT 1"
# committed_max: the greatest committed_at up to this rev (see SCHEMA)
_INSERT_STATE = (
    "INSERT INTO flowstate_states (id, committed_at, annotations, labels, transition_to, "
    "transition_annotations, committed_max) VALUES (?, ?, ?, ?, ?, ?, max(?, ifnull("
    "(SELECT committed_max FROM flowstate_states ORDER BY rev DESC LIMIT 1), 0)))"
)


class _SqliteTx:
    """The CommitTx of one commit, inside the writer's open transaction."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def commit_state(self, state: State, expected_rev: int) -> bool:
        conn = self.conn
        latest = conn.execute(_SELECT_LATEST, (state.id,)).fetchone()
        if (latest[0] if latest else 0) != expected_rev:
            return False
        assert state.committed_at is not None
        at = to_millis(state.committed_at)
        labels = state.labels
        cur = conn.execute(
            _INSERT_STATE,
            (
                state.id,
                at,
                dumps_map(state.annotations),
                dumps_map(labels),
                state.transition.to,
                dumps_map(state.transition.annotations),
                at,
            ),
        )
        state.rev = rev = int(cur.lastrowid or 0)
        if latest is not None and latest[1] != "{}":  # its labels leave the latest index
            conn.executemany(
                "DELETE FROM flowstate_latest_labels WHERE key = ? AND value = ? AND rev = ?",
                [(k, v, latest[0]) for k, v in loads_map(latest[1]).items()],
            )
        if labels:
            pairs = [(k, v, rev) for k, v in labels.items()]
            conn.executemany(
                "INSERT INTO flowstate_labels (key, value, rev) VALUES (?, ?, ?)", pairs
            )
            conn.executemany(
                "INSERT INTO flowstate_latest_labels (key, value, rev) VALUES (?, ?, ?)", pairs
            )
        return True

    def get_state(self, state_id: str, rev: int) -> State:
        return _get_state(self.conn, state_id, rev)

    def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        return _get_state_by_labels(self.conn, labels)

    def store_data(self, data: Data) -> None:
        data.rev = _insert_data(self.conn, dumps_map(data.annotations), bytes(data.blob))

    def get_data(self, data: Data) -> None:
        row = self.conn.execute(
            "SELECT annotations, blob FROM flowstate_data WHERE rev = ?", (data.rev,)
        ).fetchone()
        if row is None:
            raise DataNotFoundError(data.rev)
        data.annotations = loads_map(row[0])
        data.blob = bytes(row[1])

    def delay(self, delayed: DelayedState) -> int:
        return _insert_delayed(self.conn, delayed)


# The rev check and the insert in one statement: run alone (autocommit) it is a transaction.
_INSERT_CHECKED = (
    "INSERT INTO flowstate_states (id, committed_at, annotations, labels, transition_to, "
    "transition_annotations, committed_max) SELECT ?1, ?2, ?3, '{}', ?4, ?5, max(?2, ifnull("
    "(SELECT committed_max FROM flowstate_states ORDER BY rev DESC LIMIT 1), 0)) "
    "WHERE ifnull((SELECT max(rev) FROM flowstate_states WHERE id = ?1), 0) = ?6"
)


class _Busy(Exception):
    """The write lock is held elsewhere: the single-statement commit did not start."""


class _LeanTx(_SqliteTx):
    """The CommitTx of a commit that is one unlabelled park or transit of a state whose
    committed version has no labels either (see :func:`_lean`): its one write is one
    statement, run in autocommit mode, so the commit needs no BEGIN and COMMIT statements.

    The committed labels are the caller's word for the stored latest version's labels (the
    rev check makes it that version). Were they wrong, that version's flowstate_latest_labels
    entries would stay behind; latest_only queries check every candidate against the log, so
    such an entry costs a lookup, never a wrong result."""

    __slots__ = ()

    def commit_state(self, state: State, expected_rev: int) -> bool:
        assert state.committed_at is not None and not state.labels
        at = to_millis(state.committed_at)
        args = (
            state.id,
            at,
            dumps_map(state.annotations),
            state.transition.to,
            dumps_map(state.transition.annotations),
            expected_rev,
        )
        try:
            cur = self.conn.execute(_INSERT_CHECKED, args)
        except sqlite3.Error as exc:
            code = _code(exc)
            if code == _SQLITE_BUSY:
                raise _Busy from exc
            if code == _SQLITE_IOERR:  # the statement was the transaction, its commit included
                raise _commit_error(exc) from exc
            error = _store_error(exc, "write")
            if error is exc:
                raise
            raise error from exc
        if cur.rowcount != 1:
            return False
        state.rev = int(cur.lastrowid or 0)
        return True


def _lean(cmd: CommitCmd) -> bool:
    """Whether ``cmd`` stores one version without labels and touches nothing else."""
    if len(cmd.commands) != 1:
        return False
    sub = cmd.commands[0]
    if type(sub) is not TransitCmd and type(sub) is not ParkCmd:
        return False
    return not sub.ctx.current.labels and not sub.ctx.committed.labels
