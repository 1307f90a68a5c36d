"""SqliteDriver: the embedded, durable default store (one file, WAL).

Threads: one writer thread owns the write connection and runs commits in batches: every commit
waiting when the writer becomes free joins one transaction (each in its own savepoint, so one
commit's conflict does not affect the others) and the batch pays for one fsync. Reads run on a
small pool of reader threads. No SQLite call runs on the event loop thread.

Several processes may share one file: writes take SQLite's write lock (``BEGIN IMMEDIATE``), so
the rev check and rev allocation are serialised across processes, and a commit becomes visible
to readers only with all lower revs. Watchers notice other processes' commits by polling the
head rev every ``poll_interval`` seconds (one poller per driver, only while someone waits).
"""

from __future__ import annotations

import asyncio
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from flowstate.clock import Clock, from_millis, from_seconds, to_millis, to_seconds
from flowstate.commands import (
    CommitCmd,
    DelayedState,
    GetDelayedStatesResult,
    GetStatesCmd,
    GetStatesResult,
)
from flowstate.data import Data
from flowstate.drivers.base import CommitOutcome, Driver, process_commit, run_commit
from flowstate.drivers.sqljson import dumps_map, dumps_state, loads_map, loads_state
from flowstate.errors import DataNotFoundError, FlowstateError, NotFoundError
from flowstate.state import State, Transition

Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS flowstate_states (
    rev INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    committed_at INTEGER NOT NULL,
    annotations TEXT NOT NULL,
    labels TEXT NOT NULL,
    transition_to TEXT NOT NULL,
    transition_annotations TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS flowstate_states_by_id ON flowstate_states (id, rev);
CREATE TABLE IF NOT EXISTS flowstate_labels (
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

_STATE_COLUMNS = "rev, id, committed_at, annotations, labels, transition_to, transition_annotations"
_BATCH_MAX = 256


def _row_state(row: tuple[Any, ...]) -> State:
    rev, sid, at, ann, labels, to, tann = row
    transition = Transition(to, loads_map(tann))
    return State(sid, rev, loads_map(ann), loads_map(labels), from_millis(at), transition)


@dataclass(slots=True)
class _Job:
    """One write for the writer thread; ``run`` executes inside the batch transaction."""

    run: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    result: Any = None
    error: BaseException | None = None
    revs: list[int] = field(default_factory=list)


class SqliteDriver(Driver):
    """A durable store in one SQLite file (WAL mode).

    ``synchronous="FULL"`` (the default) makes every returned commit survive a power loss;
    ``"NORMAL"`` survives a crash of the process but may lose the last commits on power loss,
    and is about three times faster.
    """

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
        ready: asyncio.Future[None] = self._loop.create_future()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="flowstate-sqlite-writer", daemon=True
        )
        self._writer.start()
        await ready
        self._pool = ThreadPoolExecutor(self._readers, thread_name_prefix="flowstate-sqlite-read")
        self.notifier.head = await self.head_rev()

    async def _close(self) -> None:
        if self._pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._shutdown_readers)
            self._pool = None
        self._local = threading.local()
        if self._writer is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._writer.join)
            self._writer = None

    def _shutdown_readers(self) -> None:
        assert self._pool is not None
        self._pool.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()

    # the writer thread

    def _writer_main(self, ready: asyncio.Future[None]) -> None:
        loop = ready.get_loop()
        try:
            conn = self._connect()
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            conn.executescript(SCHEMA)  # commits the BEGIN
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve_error, ready, exc)
            return
        loop.call_soon_threadsafe(_resolve, ready, None)
        try:
            while True:
                job = self._queue.get()
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
                loop.call_soon_threadsafe(self._deliver, batch)
                if stop:
                    break
        finally:
            conn.close()

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for job in batch:
                job.error = exc
            return
        single = len(batch) == 1
        for job in batch:
            if not single:
                conn.execute("SAVEPOINT job")
            try:
                job.result = job.run(conn)
                if not single:
                    conn.execute("RELEASE job")
            except BaseException as exc:
                job.error = exc
                if not single:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
        try:
            if single and batch[0].error is not None:
                conn.execute("ROLLBACK")
            else:
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for job in batch:
                if job.error is None:
                    job.error = exc

    def _deliver(self, batch: list[_Job]) -> None:
        head = 0
        for job in batch:
            if job.future.done():
                continue
            if job.error is not None:
                job.future.set_exception(job.error)
            else:
                job.future.set_result(job.result)
                if isinstance(job.result, CommitOutcome):
                    head = max(head, job.result.max_rev)
        if head:
            self.notifier.notify(head)

    async def _write(self, run: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._writer is None or self._loop is None:
            raise FlowstateError("SqliteDriver is not open")
        job = _Job(run, self._loop.create_future())
        self._queue.put(job)
        return await job.future

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
        if self._pool is None or self._loop is None:
            raise FlowstateError("SqliteDriver is not open")
        return await self._loop.run_in_executor(self._pool, lambda: fn(self._reader()))

    # the driver API

    async def commit(self, cmd: CommitCmd) -> None:
        gen = process_commit(cmd, self.clock.now())
        outcome: CommitOutcome = await self._write(lambda conn: run_commit(gen, _SqliteTx(conn)))
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
        await self._write(lambda conn: _SqliteTx(conn).store_data(data))

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
    where, args = _label_filter([dict(labels)] if labels else [])
    sql = f"SELECT {_STATE_COLUMNS} FROM flowstate_states s WHERE {where} ORDER BY rev DESC LIMIT 1"
    row = conn.execute(sql, args).fetchone()
    if row is None:
        raise NotFoundError(f"labels={dict(labels)}")
    return _row_state(row)


def _label_filter(sets: list[dict[str, str]]) -> tuple[str, list[Any]]:
    """SQL condition on ``s.rev``: the labels contain every pair of at least one set."""
    if not sets or any(not s for s in sets):
        return "1", []
    ors: list[str] = []
    args: list[Any] = []
    for labels in sets:
        ands = []
        for key, value in labels.items():
            ands.append(
                "EXISTS (SELECT 1 FROM flowstate_labels l WHERE l.key = ? AND l.value = ? "
                "AND l.rev = s.rev)"
            )
            args += (key, value)
        ors.append("(" + " AND ".join(ands) + ")")
    return "(" + " OR ".join(ors) + ")", args


def _get_states(conn: sqlite3.Connection, cmd: GetStatesCmd) -> GetStatesResult:
    labels_sql, label_args = _label_filter(cmd.labels)
    where = [labels_sql]
    args: list[Any] = list(label_args)
    if cmd.since_time is not None:
        where.append("s.committed_at >= ?")
        args.append(to_millis(cmd.since_time))
    conn.execute("BEGIN")  # one snapshot for the anchor and the page
    try:
        since = cmd.since_rev
        if since < 0:
            sql = f"SELECT max(s.rev) FROM flowstate_states s WHERE {' AND '.join(where)}"
            anchor = conn.execute(sql, args).fetchone()[0]
            if anchor is None:
                return GetStatesResult([], False)
            since = anchor - 1
        where.append("s.rev > ?")
        args.append(since)
        if cmd.latest_only:
            where.append("s.rev = (SELECT max(x.rev) FROM flowstate_states x WHERE x.id = s.id)")
        sql = (
            f"SELECT {_STATE_COLUMNS} FROM flowstate_states s WHERE {' AND '.join(where)} "
            "ORDER BY s.rev LIMIT ?"
        )
        rows = conn.execute(sql, [*args, cmd.limit + 1]).fetchall()
    finally:
        conn.execute("COMMIT")
    states = [_row_state(r) for r in rows[: cmd.limit]]
    return GetStatesResult(states, len(rows) > cmd.limit)


def _insert_delayed(conn: sqlite3.Connection, delayed: DelayedState) -> int:
    cur = conn.execute(
        "INSERT INTO flowstate_delayed (execute_at, state) VALUES (?, ?)",
        (to_seconds(delayed.execute_at), dumps_state(delayed.state)),
    )
    return int(cur.lastrowid or 0)


class _SqliteTx:
    """The CommitTx of one commit, inside the writer's open transaction."""

    __slots__ = ("conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def commit_state(self, state: State, expected_rev: int) -> bool:
        conn = self.conn
        row = conn.execute(
            "SELECT max(rev) FROM flowstate_states WHERE id = ?", (state.id,)
        ).fetchone()
        if (row[0] or 0) != expected_rev:
            return False
        assert state.committed_at is not None
        cur = conn.execute(
            "INSERT INTO flowstate_states (id, committed_at, annotations, labels, transition_to, "
            "transition_annotations) VALUES (?, ?, ?, ?, ?, ?)",
            (
                state.id,
                to_millis(state.committed_at),
                dumps_map(state.annotations),
                dumps_map(state.labels),
                state.transition.to,
                dumps_map(state.transition.annotations),
            ),
        )
        state.rev = rev = int(cur.lastrowid or 0)
        if state.labels:
            conn.executemany(
                "INSERT INTO flowstate_labels (key, value, rev) VALUES (?, ?, ?)",
                [(k, v, rev) for k, v in state.labels.items()],
            )
        return True

    def get_state(self, state_id: str, rev: int) -> State:
        return _get_state(self.conn, state_id, rev)

    def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        return _get_state_by_labels(self.conn, labels)

    def store_data(self, data: Data) -> None:
        cur = self.conn.execute(
            "INSERT INTO flowstate_data (annotations, blob) VALUES (?, ?)",
            (dumps_map(data.annotations), bytes(data.blob)),
        )
        data.rev = int(cur.lastrowid or 0)

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
