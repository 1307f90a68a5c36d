"""PostgresDriver: one store shared by many engine processes on many machines.

A commit made only of transit/park sub-commands is one statement, ``flowstate_commit_one``, in
its own implicit transaction; other commits run in a transaction on a pooled asyncpg connection
and store their versions with ``flowstate_store_versions``. The rev check is done by the
database (the latest row of every state written is locked), so it holds across processes. Revs
are allocated in blocks by ``flowstate_alloc_revs``, which marks each block in flight with a
transaction-level advisory lock until its transaction ends. A log read first asks
``flowstate_rev_bound`` for the lowest rev that may still commit (the allocated head, then the
marks in ``pg_locks``) and then, in a later statement, shows only rows below it. A reader
therefore never delivers rev N and later discovers a lower rev, and only this store's own
in-flight commits hold it back: transactions of other applications do not (docs/postgres.md).

Read queries run through ``flowstate_query_states``, which plans each with its label sets and
time in view (schema version 6): ``latest_only`` pages are read from the latest rows and their
indexes, ``since_time`` pages start after the last time mark below their time.

Watchers are woken by LISTEN/NOTIFY. Commits do not notify inside their transaction (a
notifying transaction holds a cluster-wide lock through its WAL flush); after they return, one
task per driver sends the highest new rev. While someone waits, the head is also polled every
``poll_interval`` seconds, so a lost notification delays a delivery but never loses it.

A cancelled write is settled with the server before the cancellation goes on: the running
statement is cancelled there, and its answer tells whether the write landed (a landed commit is
announced like any other) or not; see ``PostgresDriver._guarded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
import asyncpg.exceptions._base
import xxhash

from flowstate.clock import Clock, from_millis, from_seconds, to_millis, to_seconds
from flowstate.commands import (
    CommitCmd,
    DelayedState,
    GetDelayedStatesResult,
    GetStatesCmd,
    GetStatesResult,
    NoopCmd,
    ParkCmd,
    TransitCmd,
)
from flowstate.data import Data
from flowstate.drivers.base import (
    CommitOutcome,
    Driver,
    committable_count,
    label_match,
    process_commit,
    run_commit_async,
)
from flowstate.drivers.sqljson import dumps_map, dumps_state, loads_state
from flowstate.errors import (
    CommitUnknownError,
    DataNotFoundError,
    FlowstateError,
    NotFoundError,
    RevMismatchError,
    StoreFullError,
    StoreUnavailableError,
    StoreWriteError,
    ValidationError,
)
from flowstate.state import State, Transition

log = logging.getLogger("flowstate")
T = TypeVar("T")

_COLUMNS = "rev, id, committed_at, annotations, labels, transition_to, transition_annotations"
_HEAD_SQL = "SELECT flowstate_head()"
#: The read horizon: (bound, allocated); waits up to $2 ms for bound to pass rev $1.
#: A get_states page (schema version 8): a header row (the read horizon, the allocated head,
#: the highest time mark), then the rows of the query ``$4`` below the horizon.
_READ_SQL = "SELECT * FROM flowstate_read_states($1, $2, $3, $4, $5, $6)"
_OFFSET_BOUND_SQL = "SELECT flowstate_offset_bound()"
_IN_FLIGHT_SQL = (
    "SELECT first_value, pid, xact_start, application_name, state, "
    "extract(epoch FROM clock_timestamp() - xact_start)::float8 AS age "
    "FROM flowstate_in_flight() WHERE kind = 'rev' ORDER BY first_value LIMIT 1"
)
#: How long a log read waits for this driver's own latest commit to become visible: only a
#: lower rev still in flight (another flowstate commit of this store) makes it wait.
CATCH_UP_LIMIT = 2.0
#: A rev in flight this long while readers are held below it is logged as a warning.
STUCK_WARN_AFTER = 10.0
#: The shortest time between two NOTIFYs of one driver (revs committed meanwhile are merged
#: into the next): what a watcher in another process may wait longer under a stream of commits.
PUBLISH_INTERVAL = 0.002

log = logging.getLogger(__name__)
_ALLOC_OFFSET_SQL = "SELECT flowstate_alloc_offsets(1)"
_COMMIT_ONE_SQL = "SELECT flowstate_commit_one($1, $2, $3, $4, $5, $6, $7)"
_NOTIFY_SQL = "SELECT pg_notify($1, $2)"
_CONFLICT_SQLSTATE = "FS001"  # raised by flowstate_commit_one
#: A statement that failed with one of these never ran: the connection was known closed before
#: sending (InterfaceError), or the server refused it while shutting the session down.
_NOT_RUN_ERRORS = (
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
)


def _not_run(exc: BaseException) -> bool:
    """Whether a failed statement surely never ran. asyncpg refuses to start an operation with
    "cannot switch to state ..." before sending anything (its protocol already saw the
    server drop the session)."""
    if isinstance(exc, _NOT_RUN_ERRORS):
        return True
    return isinstance(exc, asyncpg.exceptions.InternalClientError) and str(exc).startswith(
        "cannot switch to state"
    )


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InternalClientError,  # a protocol confused by a server-side drop
)

#: Input PostgreSQL (or asyncpg, encoding an argument) refused: reported as ValidationError.
#: asyncpg raises ``exceptions._base.DataError`` (an InterfaceError, so it must be told apart
#: from a broken connection before _CONNECTION_ERRORS is checked) for an argument it cannot
#: encode, e.g. text with a lone surrogate; ``exceptions.DataError`` is SQLSTATE class 22 (NUL in
#: text or jsonb, bad values), ProgramLimitExceededError class 54 (an index row over the btree
#: limit, too many arguments).
_DATA_ERRORS = (
    asyncpg.exceptions._base.DataError,
    asyncpg.exceptions.DataError,
    asyncpg.exceptions.ProgramLimitExceededError,
)
#: The field an index row error is about, by index.
_INDEX_FIELDS = {
    "flowstate_latest_pkey": "current.id",
    "flowstate_states_by_id": "current.id",
    "flowstate_states_by_labels": "current.labels",
}
#: The fields of the arguments of flowstate_store_versions and flowstate_commit_one.
_STORE_FIELDS = (
    "current.id",
    "expected rev",
    "rev",
    "committed_at",
    "current.annotations",
    "current.labels",
    "current.transition.to",
    "current.transition.annotations",
)
_COMMIT_ONE_FIELDS = _STORE_FIELDS[:2] + _STORE_FIELDS[3:]


def _invalid(
    exc: BaseException, fields: Sequence[str] = (), default: str = "input"
) -> ValidationError:
    """The ValidationError for input refused by asyncpg or PostgreSQL; ``fields`` names the
    statement's arguments ($1, $2, ...) so that the field can be named where it is known."""
    text = str(exc).split("\n", 1)[0]
    field = default
    context = f"{text} {getattr(exc, 'context', '') or ''}"
    arg = re.search(r"(?:query argument|portal parameter) \$(\d+)", context)
    index = re.search(r'for index "(\w+)"', text)
    if arg and 0 < int(arg.group(1)) <= len(fields):
        field = fields[int(arg.group(1)) - 1]
    elif index and index.group(1) in _INDEX_FIELDS:
        field = _INDEX_FIELDS[index.group(1)]
    return ValidationError(field, f"refused by PostgreSQL: {text}")


#: SQLSTATE class 53, insufficient resources, whose errors mean the store has no room for the
#: request: 53100 disk_full, and 53400 configuration_limit_exceeded (e.g. the temporary files a
#: query needs exceed ``temp_file_limit``). Others of the class (53000, 53200 out_of_memory) are
#: passing conditions of the server; 53300 too_many_connections is a connection error.
_NO_ROOM = frozenset({"53100", "53400"})


def _resource_error(
    exc: asyncpg.exceptions.InsufficientResourcesError, what: str
) -> FlowstateError:
    """``exc`` as a FlowstateError if PostgreSQL lacked a resource for the statement (SQLSTATE
    class 53): StoreFullError when it has no room, else StoreWriteError or, for a read,
    StoreUnavailableError. The statement failed, so its transaction stored nothing."""
    text = str(exc).split("\n", 1)[0]
    done = "nothing was stored" if what == "write" else "the read failed"
    error: FlowstateError
    if exc.sqlstate in _NO_ROOM:
        error = StoreFullError(
            f"PostgreSQL has no room for this {what} (SQLSTATE {exc.sqlstate}: {text}); "
            f"{done}: free disk space or raise the limit, then retry"
        )
    elif what == "write":
        error = StoreWriteError(
            f"PostgreSQL could not write (SQLSTATE {exc.sqlstate}: {text}); {done}"
        )
    else:
        error = StoreUnavailableError(
            f"PostgreSQL could not read (SQLSTATE {exc.sqlstate}: {text})"
        )
    error.__cause__ = exc
    return error


def _too_many_arguments(exc: BaseException) -> bool:
    """Whether asyncpg refused a query for its number of arguments (over 32,767), which it
    reports as a bare InterfaceError, before sending anything."""
    return type(exc) is asyncpg.exceptions.InterfaceError and "query arguments" in str(exc)


#: How long a cancelled write waits for the server to settle it (see PostgresDriver._guarded).
CANCEL_SETTLE_LIMIT = 5.0


class _Landed(asyncio.CancelledError):
    """A write that was cancelled but landed regardless, with its result: the committing
    caller makes it visible before the cancellation goes on. Anyone else sees a
    CancelledError."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self.result = result


class _NotRun(Exception):
    """A write that surely did not reach the server (its connection was known broken)."""


class _Phase:
    """How far one guarded write went, shared by the task running it and its guard.

    ``cancelled`` is set by the guard when its caller is cancelled. ``may_land`` is set by the
    work once it sends what commits (COMMIT, or a statement in autocommit): from then on, a
    write the server does not settle is CommitUnknownError. ``interruptible`` is cleared once
    COMMIT is sent: the server is no longer asked to cancel it, so that its answer is the
    outcome. The work checks ``cancelled`` and sets the other two with no await in between,
    so once the guard has set ``cancelled`` and seen ``may_land`` false, no COMMIT is sent.
    """

    __slots__ = ("cancelled", "interruptible", "may_land")

    def __init__(self, *, may_land: bool = False) -> None:
        self.cancelled = False
        self.may_land = may_land
        self.interruptible = True


def _row_state(row: Any) -> State:
    """The state of a row whose first columns are _COLUMNS (a page row has more after them)."""
    rev, sid, at, ann, labels, to, tann = row[0], row[1], row[2], row[3], row[4], row[5], row[6]
    transition = Transition(to, json.loads(tann))
    return State(sid, rev, json.loads(ann), json.loads(labels), from_millis(at), transition)


class _PoolConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection handed back without asyncpg's reset query (a round trip per use).

    Safe because the driver leaves no session state on pooled connections: it never SETs,
    LISTENs (the listener has a connection of its own) or opens cursors there, and asyncpg still
    rolls back an open transaction on release. The one session-level lock, the advisory lock
    ``flowstate_alloc_revs`` takes and releases, can only stay held when a statement fails or is
    cancelled midway; the driver then discards the connection instead of releasing it.
    """

    def get_reset_query(self) -> str:
        return ""


def _discard(conn: asyncpg.Connection) -> None:
    """Close a connection whose protocol state is unknown, so the pool replaces it."""
    with contextlib.suppress(Exception):
        conn.terminate()


def split_dsn(dsn: str) -> tuple[str, str | None]:
    """Remove flowstate's own ``schema`` query parameter from a DSN; return (dsn, schema)."""
    parts = urlsplit(dsn)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schema = next((v for k, v in query if k == "schema"), None)
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    return urlunsplit(parts._replace(query=rest)), schema


def migrations() -> list[tuple[int, str, str]]:
    """The schema migrations shipped with flowstate: (version, name, sql), in order."""
    folder = resources.files("flowstate.drivers") / "sql" / "postgres"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append((version, entry.name, entry.read_text()))
    return sorted(found)


class PostgresDriver(Driver):
    """A store in PostgreSQL, shared by any number of processes.

    ``dsn`` is a libpq URL (``postgresql://user@host:5432/db``); ``?schema=name`` (or the
    ``schema`` argument) keeps the tables in that schema, created if missing. Migrations are
    applied on open, under an advisory lock, so concurrent starts are safe.
    """

    #: Writes keep the engine's cancellation contract themselves (see ``_guarded``).
    settles_writes = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        min_size: int = 1,
        max_size: int = 10,
        poll_interval: float = 1.0,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        self.dsn, dsn_schema = split_dsn(dsn)
        self.schema = schema or dsn_schema or "public"
        if not self.schema.replace("_", "").isalnum():
            raise ValidationError("schema", f"schema name must be alphanumeric: {self.schema!r}")
        self.channel = f"flowstate_{self.schema}"
        self.poll_interval: float = poll_interval
        self.publish_interval: float = PUBLISH_INTERVAL
        self._min_size, self._max_size = min_size, max_size
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._listen_task: asyncio.Task[None] | None = None
        self._closing = False
        self._own_rev = 0  # the highest rev this driver committed
        #: the lowest in-flight rev readers last found below the allocated head, when first
        #: found, and whether it was reported (see _note_bound)
        self._held: tuple[int, float, bool] | None = None
        #: the highest own rev a read waited for in vain (see _bound)
        self._waited_in_vain = 0
        self._published = 0  # the highest rev announced to other processes
        self._published_at = float("-inf")  # when (loop time) it was
        self._marked = -1  # the highest time mark known to exist (see get_states)
        self._marks_refused = False
        self._publisher: asyncio.Task[None] | None = None

    # lifecycle

    async def _open(self) -> None:
        self._closing = False
        settings = self._settings()
        # migrations rewrite whole tables (version 6 rebuilt flowstate_latest): scans are
        # their right plan, so they run without the driver's penalty on them
        migrating = {k: v for k, v in settings.items() if k != "enable_seqscan"}
        conn = await asyncpg.connect(self.dsn, server_settings=migrating)
        try:
            await self._migrate(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=self._min_size,
            max_size=self._max_size,
            server_settings=settings,
            connection_class=_PoolConnection,
            # no idle timer armed and disarmed around every use (a commit's worth of CPU
            # saved each time); idle connections stay open, up to max_size
            max_inactive_connection_lifetime=0,
        )
        self.notifier.head = await self.head_rev()
        self._listen_task = asyncio.create_task(self._listen_forever())

    def _settings(self) -> dict[str, str]:
        # Every statement the driver sends looks rows up by an index. PostgreSQL keeps one
        # generic plan per prepared statement and connection, made from the statistics of the
        # moment: on a store opened empty that was a sequential scan, kept as the store grew
        # until an ANALYZE (a get_state read 8,000 rows at 8,000 states). Penalizing sequential
        # scans keeps the indexes whatever the statistics say (schema version 9 does the same
        # inside the commit functions). JIT goes with it: the penalty lifts the cost of the
        # scans that remain (the reads of the rev and offset sequences, of small catalogs) past
        # jit_above_cost, and compiling them took 15 ms a statement; the driver's statements
        # are all small, where JIT never pays.
        return {
            "search_path": f'"{self.schema}"',
            "application_name": f"flowstate:{self.schema}",
            "enable_seqscan": "off",
            "jit": "off",
        }

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        """Apply missing migrations under an advisory lock. A schema that is already current
        is only read, so a role without DDL rights can start against it."""
        shipped = {version for version, _, _ in migrations()}
        table = await conn.fetchval(
            "SELECT to_regclass(quote_ident($1) || '.flowstate_migrations')", self.schema
        )
        if table is not None:
            done = {r[0] for r in await conn.fetch("SELECT version FROM flowstate_migrations")}
            if shipped <= done:
                return
        key = xxhash.xxh64_intdigest(b"flowstate-migrate:" + self.schema.encode()) >> 1
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", key)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS flowstate_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            applied = {r[0] for r in await conn.fetch("SELECT version FROM flowstate_migrations")}
            for version, name, sql in migrations():
                if version not in applied:
                    await conn.execute(sql)
                    await conn.execute(
                        "INSERT INTO flowstate_migrations (version, name) VALUES ($1, $2)",
                        version,
                        name,
                    )

    async def _close(self) -> None:
        if self._publisher is not None and not self._publisher.done():
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(self._publisher), 1.0)
        self._closing = True
        for task in (self._publisher, self._listen_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._listen_task = self._publisher = None
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close(timeout=2)
            self._listener = None
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except (TimeoutError, *_CONNECTION_ERRORS):
                self._pool.terminate()  # connections the server already dropped
            self._pool = None

    # notifications

    async def _listen_forever(self) -> None:
        """Keep one LISTEN connection; reconnect with backoff when it drops."""
        delay = 0.1
        while not self._closing:
            try:
                # this connection also sends our notifications; they need no durability
                settings = {**self._settings(), "synchronous_commit": "off"}
                conn = await asyncpg.connect(self.dsn, server_settings=settings)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._on_notify)
                self._listener = conn
                delay = 0.1
                self.notifier.wake()  # anything committed while we were away
                self._publish(self._own_rev)  # and what we could not announce meanwhile
                await lost.wait()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                self._listener = None

    def _publish(self, rev: int) -> None:
        """Announce ``rev`` to other processes. At most one NOTIFY is in flight; revs committed
        meanwhile are merged into the next one, which carries the highest."""
        if rev <= self._published or self._closing:
            return
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.create_task(self._publish_pending())

    async def _publish_pending(self) -> None:
        loop = asyncio.get_running_loop()
        while self._own_rev > self._published:
            # at most one NOTIFY per PUBLISH_INTERVAL: under a stream of commits each costs a
            # transaction on the server and a delivery to every listener, this one included
            wait = self._published_at + self.publish_interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            conn = self._listener
            if conn is None:
                return  # the listener republishes when it is back; others poll meanwhile
            rev = self._own_rev
            try:
                await conn.fetchval(_NOTIFY_SQL, self.channel, str(rev))
            except Exception:
                return  # the next commit or reconnection retries; others poll meanwhile
            self._published, self._published_at = rev, loop.time()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self.notifier.notify(int(payload))
        except ValueError:
            self.notifier.wake()

    # plumbing

    def _need_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise FlowstateError("PostgresDriver is not open")
        return self._pool

    async def _read(
        self, fn: Callable[[asyncpg.Connection], Awaitable[T]], field: str = "input"
    ) -> T:
        """Run a read, retrying on a broken connection (reads are idempotent). Input the server
        refuses is a ValidationError about ``field``.

        A cancelled read needs no guard: asyncpg's pool, on release, waits for the server to
        cancel the statement and rolls back, and a read takes no lock that outlives it."""
        pool = self._need_pool()
        for attempt in range(3):
            conn = None
            try:
                conn = await pool.acquire()
                return await fn(conn)
            except _DATA_ERRORS as exc:
                raise _invalid(exc, (), field) from None
            except _CONNECTION_ERRORS as exc:
                if _too_many_arguments(exc):  # a query with more labels than PostgreSQL takes
                    raise _invalid(exc, (), field) from None
                if conn is not None:
                    _discard(conn)  # never hand a broken connection back out
                if attempt == 2:
                    raise StoreUnavailableError(f"postgres unavailable: {exc}") from exc
                await asyncio.sleep(0.1 * 2**attempt)
            except asyncpg.exceptions.InsufficientResourcesError as exc:
                # the connection is sound (the statement failed): no retry, as it would fail
                # the same way while the condition lasts
                raise _resource_error(exc, "read") from None
            finally:
                if conn is not None:
                    await pool.release(conn)
        raise AssertionError("unreachable")

    async def _write(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run ``fn`` in a transaction. A broken connection while committing is reported
        as CommitUnknownError; before that, as StoreUnavailableError (nothing stored). A
        cancelled write has an exact outcome (see :meth:`_guarded`)."""
        pool = self._need_pool()
        for attempt in range(3):
            conn = await _acquire(pool, attempt)
            if conn is None:
                continue
            # no await between acquiring and the try: the connection always goes back
            try:
                phase = _Phase()
                return await self._guarded(conn, phase, _transaction(conn, phase, fn))
            except _NotRun as exc:
                # nothing was sent but BEGIN: safe to retry on a fresh connection
                if attempt == 2:
                    raise StoreUnavailableError(f"postgres unavailable: {exc}") from exc
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def _guarded(
        self, conn: asyncpg.Connection, phase: _Phase, work: Coroutine[Any, Any, T]
    ) -> T:
        """Await ``work``, the statements of one write on ``conn``, giving a cancellation of the
        caller an exact outcome.

        The work runs in a task of its own, so asyncpg never sees the caller's cancellation
        (asyncpg would drop the statement's answer, and closing the connection would leave the
        statement running on the server, where it may still commit). Instead, when the caller
        is cancelled, the work is told to send no COMMIT, the server is asked to cancel the
        running statement (a COMMIT already sent is left to finish: it waits on no lock), and
        the caller waits, at most CANCEL_SETTLE_LIMIT seconds, for the server's answer:

        * the work completed: it landed; :class:`_Landed` carries its result;
        * it failed (cancelled on the server, or any error): nothing landed; CancelledError;
        * no answer in time: the connection is closed; CommitUnknownError if what commits was
          sent (``phase.may_land``), else CancelledError.

        The connection is closed afterwards in every case: a cancel request may still be on its
        way to its server process, and a statement cancelled inside ``flowstate_alloc_revs`` may
        leave the session-level rev lock held.
        """
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            phase.cancelled = True
            log.debug("a write was cancelled; waiting for the store's answer")
            settled = await self._settle(conn, phase, task)
            _discard(conn)
            if not settled:
                task.cancel()
                task.add_done_callback(_retrieve)
                if phase.may_land:
                    raise CommitUnknownError(
                        "cancelled while committing and the server did not answer in "
                        f"{CANCEL_SETTLE_LIMIT} s; the commit may or may not be stored"
                    ) from None
                raise
            if task.cancelled():
                raise
            exc = task.exception()
            if exc is None:
                raise _Landed(task.result()) from None
            if isinstance(exc, CommitUnknownError):
                raise exc from None
            raise  # it failed: nothing landed, the cancellation stands

    async def _settle(
        self, conn: asyncpg.Connection, phase: _Phase, task: asyncio.Future[Any]
    ) -> bool:
        """Wait until ``task`` ends, at most CANCEL_SETTLE_LIMIT seconds, asking the server
        meanwhile to cancel what ``conn`` runs (unless a COMMIT is in flight); whether it
        ended. Further cancellations of the caller are absorbed: the wait is bounded."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_SETTLE_LIMIT
        canceller = None
        if not task.done() and phase.interruptible and not conn.is_closed():
            pid = conn.get_server_pid()
            canceller = asyncio.ensure_future(self._cancel_backend(pid, task, deadline))
            canceller.add_done_callback(_retrieve)
        try:
            while not task.done() and loop.time() < deadline:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task}, timeout=deadline - loop.time())
        finally:
            if canceller is not None:
                canceller.cancel()
        return task.done()

    async def _cancel_backend(self, pid: int, task: asyncio.Future[Any], deadline: float) -> None:
        """Ask the server to cancel the statement server process ``pid`` runs, again every
        0.1 s until ``task`` ends: a request that arrives between two statements is ignored.
        Runs on a connection of its own (the pool may be exhausted by the very writes
        being cancelled)."""
        loop = asyncio.get_running_loop()
        conn = await asyncpg.connect(
            self.dsn,
            timeout=max(0.1, deadline - loop.time()),
            server_settings={"application_name": f"flowstate-cancel:{self.schema}"},
        )
        try:
            while not task.done():
                await conn.fetchval("SELECT pg_cancel_backend($1)", pid)
                await asyncio.wait({task}, timeout=0.1)
        finally:
            conn.terminate()

    def _announce(self, outcome: CommitOutcome) -> None:
        """Make a stored commit visible: to its ctxs, local watchers and other processes."""
        outcome.apply()
        if outcome.max_rev:
            self._own_rev = max(self._own_rev, outcome.max_rev)
            self._announce_stored(outcome)
            self._publish(outcome.max_rev)

    # the driver API

    async def commit(self, cmd: CommitCmd) -> None:
        """Store a commit. Cancelled, it either did not land (CancelledError, the ctxs
        unchanged) or landed and is announced like any commit before CancelledError goes on;
        CommitUnknownError when the server could not tell which (see :meth:`_guarded`)."""
        now = self.clock.now()
        try:
            if _versions_only(cmd):
                outcome = await self._commit_one(cmd, now)
            else:
                outcome = await self._commit_in_transaction(cmd, now)
        except _Landed as landed:
            self._announce(landed.result)
            raise asyncio.CancelledError from None
        self._announce(outcome)

    async def _commit_in_transaction(self, cmd: CommitCmd, now: datetime) -> CommitOutcome:
        # delayed states inside the commit take offsets of their own sequence (_PgTx.delay)
        n = committable_count(cmd)

        async def run(conn: asyncpg.Connection) -> CommitOutcome:
            first = await conn.fetchval("SELECT flowstate_alloc_revs($1)", n) if n else 0
            tx = _PgTx(conn, first)
            outcome = await run_commit_async(process_commit(cmd, now), tx)
            await tx.flush()
            return outcome

        return await self._write(run)

    async def _commit_one(self, cmd: CommitCmd, now: datetime) -> CommitOutcome:
        """A commit of versions only, as one ``flowstate_commit_one`` statement: the versions
        are staged with placeholder revs -1, -2, ... and renumbered from the first rev."""
        staging = _Staging()
        outcome = await run_commit_async(process_commit(cmd, now), staging)
        staged = staging.staged
        if not staged:
            return outcome
        states = [s for s, _ in staged]
        try:
            first = await self._one_statement(
                _COMMIT_ONE_SQL,
                _COMMIT_ONE_FIELDS,
                [s.id for s in states],
                [e for _, e in staged],
                *_version_columns(states),
            )
        except _Landed as landed:
            _renumber(outcome, int(landed.result), len(states))
            raise _Landed(outcome) from None
        _renumber(outcome, first, len(states))
        return outcome

    async def _one_statement(self, sql: str, fields: Sequence[str], *args: Any) -> int:
        """Run a committing statement in autocommit. Retried only while it surely did not run;
        a connection lost while it ran is CommitUnknownError. A cancelled statement has an
        exact outcome (see :meth:`_guarded`): the server's answer to its cancellation."""
        pool = self._need_pool()
        for attempt in range(3):
            conn = await _acquire(pool, attempt)
            if conn is None:
                continue
            # no await between acquiring and the try: the connection always goes back
            try:
                phase = _Phase(may_land=True)  # its implicit transaction commits at its end
                return await self._guarded(conn, phase, _statement(conn, sql, fields, args))
            except _NotRun as exc:
                if attempt == 2:
                    raise StoreUnavailableError(f"postgres unavailable: {exc}") from exc
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def get_state(self, state_id: str, rev: int) -> State:
        return await self._read(lambda conn: _get_state(conn, state_id, rev), "id")

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        return await self._read(lambda conn: _get_state_by_labels(conn, labels), "labels")

    async def get_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        """A page of the log in one round trip: ``flowstate_read_states`` computes the read
        horizon and then, in a later statement, reads the rows below it (schema version 8)."""
        own = self._own_rev
        sql, args = states_query(cmd)  # the server puts the horizon in place of NO_HORIZON
        nums, sets = args[0], args[1] if len(args) > 1 else []

        async def run(conn: asyncpg.Connection) -> GetStatesResult:
            # time marks are extended (by the server, up to the horizon) for since_time queries
            marks = -1
            if cmd.since_time is not None and not self._marks_refused:
                marks = max(self._marked, 0)
            rows = await conn.fetch(_READ_SQL, own, self._wait_ms(own), marks, sql, nums, sets)
            head = rows[0]
            bound, allocated = int(head["bound"]), int(head["allocated"])
            self._waited(own, bound)
            if marks >= 0:
                if head["marked"] == -2:  # a role that may not write: the query walks further
                    self._marks_refused = True
                else:
                    self._marked = max(self._marked, int(head["marked"]))
            await self._note_bound(conn, bound, allocated)
            return _page(cmd, rows[1:], bound)

        return await self._read(run, "labels")

    def _wait_ms(self, own: int) -> int:
        """How long a read may wait for the horizon to pass ``own``, this driver's latest commit.

        Read your own writes: while a lower rev is still in flight (another flowstate commit
        of this store, normally for milliseconds), the server waits on its in-flight mark, up to
        CATCH_UP_LIMIT, for the horizon to pass ``own``; after that, what is safe is shown, and
        later reads do not wait for the same ``own`` again (see :meth:`_waited`): behind a
        stuck commit, reads that each held a pooled connection for CATCH_UP_LIMIT would starve
        this process's commits of connections. Transactions of other applications never
        count."""
        return int(CATCH_UP_LIMIT * 1000) if own > self._waited_in_vain else 0

    def _waited(self, own: int, bound: int) -> None:
        """Note a horizon that did not pass ``own``: later reads do not wait for it again."""
        if bound <= own:
            self._waited_in_vain = max(self._waited_in_vain, own)

    async def _note_bound(self, conn: asyncpg.Connection, bound: int, allocated: int) -> None:
        """Warn (once per rev) when readers have been held below the same in-flight rev for
        STUCK_WARN_AFTER seconds or more, naming the rev, its age and who holds it."""
        if bound > allocated:
            self._held = None
            return
        now = asyncio.get_running_loop().time()
        if self._held is None or self._held[0] != bound:
            self._held = (bound, now, False)
            return
        _, since, reported = self._held
        if reported or now - since < STUCK_WARN_AFTER:
            return
        self._held = (bound, since, True)
        row = await conn.fetchrow(_IN_FLIGHT_SQL)
        if row is None or int(row["first_value"]) != bound:
            return  # it ended meanwhile
        # the transaction's start is visible only to its own role or pg_read_all_stats: else
        # how long this driver has seen it is the age (a lower bound)
        age = row["age"] if row["age"] is not None else now - since
        log.warning(
            "flowstate readers of schema %s are held at rev %d: its commit has been in flight "
            "for %.0f s (server pid %s, application %r, %s); rows from rev %d on stay hidden "
            "until PostgreSQL ends that transaction",
            self.schema,
            bound,
            age,
            row["pid"],
            row["application_name"],
            row["state"],
            bound,
        )

    async def delay(self, delayed: DelayedState) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            offset = int(await conn.fetchval(_ALLOC_OFFSET_SQL))
            await _insert_delayed(conn, delayed, offset)
            return offset

        try:
            return await self._write(run)
        except _Landed:
            raise asyncio.CancelledError from None  # stored: the delayer finds it by offset

    async def get_delayed_states(
        self, since: datetime | None, until: datetime, offset: int, limit: int
    ) -> GetDelayedStatesResult:
        async def run(conn: asyncpg.Connection) -> GetDelayedStatesResult:
            # the horizon first, the rows in a later statement (see flowstate_offset_bound)
            bound = int(await conn.fetchval(_OFFSET_BOUND_SQL))
            sql = 'SELECT "offset", execute_at, state FROM flowstate_delayed WHERE "offset" > $1 '
            sql += 'AND "offset" < $3 '
            sql += "AND execute_at <= $2 "
            args: list[Any] = [offset, to_seconds(until), bound]
            if since is not None:
                sql += "AND execute_at > $4 "
                args.append(to_seconds(since))
            sql += f'ORDER BY "offset" LIMIT {int(limit) + 1}'
            rows = await conn.fetch(sql, *args)
            items = [DelayedState(loads_state(r[2]), from_seconds(r[1]), r[0]) for r in rows]
            return GetDelayedStatesResult(items[:limit], len(items) > limit)

        return await self._read(run)

    async def store_data(self, data: Data) -> None:
        """Store ``data``; ``data.rev`` is set only once the data is stored (also when the call
        was cancelled after it landed)."""
        try:
            rev = await self._write(lambda conn: _store_data(conn, data))
        except _Landed as landed:
            data.rev = landed.result
            raise asyncio.CancelledError from None
        data.rev = rev

    async def get_data(self, data: Data) -> None:
        await self._read(lambda conn: _get_data(conn, data))

    async def head_rev(self) -> int:
        async def run(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval(_HEAD_SQL) or 0)

        return await self._read(run)

    async def readers_held(self) -> dict[str, object] | None:
        """The lowest rev of this store in flight for STUCK_WARN_AFTER seconds or more, if
        any: readers show nothing from it on until PostgreSQL ends its transaction."""

        async def run(conn: asyncpg.Connection) -> dict[str, object] | None:
            row = await conn.fetchrow(_IN_FLIGHT_SQL)
            if row is None or (row["age"] or 0.0) < STUCK_WARN_AFTER:
                return None
            return {
                "rev": int(row["first_value"]),
                "in_flight_s": round(float(row["age"]), 1),
                "pid": row["pid"],
                "application": row["application_name"],
                "state": row["state"],
            }

        return await self._read(run)


async def _transaction(
    conn: asyncpg.Connection, phase: _Phase, fn: Callable[[asyncpg.Connection], Awaitable[T]]
) -> T:
    """BEGIN, ``fn`` and COMMIT on ``conn``: the work of a guarded transactional write."""
    tx = conn.transaction()
    try:
        await tx.start()
    except _CONNECTION_ERRORS as exc:
        _discard(conn)
        raise _NotRun(str(exc)) from exc
    try:
        result = await fn(conn)
    except FlowstateError:
        # raised between statements (a conflict, a missing state, refused input): the
        # connection is sound and the rev lock released
        with contextlib.suppress(Exception):
            await tx.rollback()
        raise
    except BaseException as exc:
        _discard(conn)  # failed or cancelled inside a statement, maybe holding the rev lock
        if isinstance(exc, _DATA_ERRORS):
            raise _invalid(exc) from None
        if isinstance(exc, _CONNECTION_ERRORS):
            raise StoreUnavailableError(f"postgres unavailable: {exc}") from exc
        if isinstance(exc, asyncpg.exceptions.InsufficientResourcesError):
            raise _resource_error(exc, "write") from None
        raise
    if phase.cancelled:  # the caller was cancelled while fn ran: store nothing
        _discard(conn)  # the server may still receive a cancel request meant for fn
        raise asyncio.CancelledError
    phase.may_land, phase.interruptible = True, False
    try:
        await tx.commit()
    except _CONNECTION_ERRORS as exc:
        _discard(conn)
        raise CommitUnknownError(
            f"connection lost while committing; the commit may or may not be stored: {exc}"
        ) from exc
    except asyncpg.exceptions.InsufficientResourcesError as exc:
        _discard(conn)  # the server refused COMMIT: the transaction was rolled back
        raise _resource_error(exc, "write") from None
    return result


async def _statement(
    conn: asyncpg.Connection, sql: str, fields: Sequence[str], args: Sequence[Any]
) -> int:
    """A committing statement in autocommit: the work of a guarded one-statement write."""
    try:
        return int(await conn.fetchval(sql, *args))
    except _DATA_ERRORS as exc:
        if isinstance(exc, asyncpg.PostgresError):
            _discard(conn)  # failed on the server, midway: maybe holding the rev lock
        raise _invalid(exc, fields) from None
    except (*_NOT_RUN_ERRORS, *_CONNECTION_ERRORS) as exc:
        _discard(conn)
        if not _not_run(exc):
            raise CommitUnknownError(
                f"connection lost while committing; the commit may or may not be stored: {exc}"
            ) from exc
        raise _NotRun(str(exc)) from exc
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == _CONFLICT_SQLSTATE:
            ids = json.loads(exc.detail or "[]")
            raise RevMismatchError(_in_order(ids, args[0])) from None
        _discard(conn)  # failed midway, maybe holding the rev lock
        if isinstance(exc, asyncpg.exceptions.InsufficientResourcesError):
            raise _resource_error(exc, "write") from None
        raise
    except BaseException:
        _discard(conn)  # cancelled midway, maybe holding the rev lock
        raise


def _renumber(outcome: CommitOutcome, first: int, count: int) -> None:
    """Give the staged versions of a one-statement commit their revs, from ``first``."""
    for _, work in outcome.pairs:
        for state in (work.current, work.committed):
            if state.rev < 0:
                state.rev = first - state.rev - 1
    for state in outcome.stored:
        if state.rev < 0:
            state.rev = first - state.rev - 1
    outcome.max_rev = first + count - 1


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume the outcome of a task nobody awaits, so that asyncio does not log it."""
    if not task.cancelled():
        task.exception()


async def _get_state(conn: asyncpg.Connection, state_id: str, rev: int) -> State:
    if rev == 0:
        sql = f"SELECT {_COLUMNS} FROM flowstate_states WHERE id = $1 ORDER BY rev DESC LIMIT 1"
        row = await conn.fetchrow(sql, state_id)
    else:
        sql = f"SELECT {_COLUMNS} FROM flowstate_states WHERE rev = $2 AND id = $1"
        row = await conn.fetchrow(sql, state_id, rev)
    if row is None:
        raise NotFoundError(f"id={state_id} rev={rev}")
    return _row_state(row)


#: Runs a read query (``q``, below) with its parameters bound when it is planned, so that the
#: planner sees the label sets and the time (schema version 6).
_QUERY_SQL = "SELECT * FROM flowstate_query_states($1, $2, $3)"
#: The parameters of a read query, as ``q`` names them: numbers, then label sets (jsonb).
_HORIZON, _SINCE, _TIME = "($1::bigint[])[1]", "($1::bigint[])[2]", "($1::bigint[])[3]"
#: Label sets one query may name (what asyncpg took as arguments before schema version 6).
MAX_LABEL_SETS = 32_767


def _set(i: int) -> str:
    return f"($2::jsonb[])[{i}]"


#: The latest version, over every version (behaviour.md §2.2), whose labels contain the label
#: set; planned with the set in view: the GIN index for a rare set, a backward walk of the log
#: for a frequent one.
STATE_BY_LABELS_SQL = (
    f"SELECT {_COLUMNS} FROM flowstate_states WHERE labels @> {_set(1)} ORDER BY rev DESC LIMIT 1"
)


async def _get_state_by_labels(conn: asyncpg.Connection, labels: Mapping[str, str]) -> State:
    row = await conn.fetchrow(_QUERY_SQL, STATE_BY_LABELS_SQL, [], [dumps_map(labels)])
    if row is None:
        raise NotFoundError(f"labels={dict(labels)}")
    return _row_state(row)


def _label_filter(column: str, count: int) -> list[str]:
    """The OR of ``count`` label sets contained in ``column``, as a list of 0 or 1 condition."""
    if not count:
        return []
    return ["(" + " OR ".join(f"{column} @> {_set(i + 1)}" for i in range(count)) + ")"]


#: A horizon above every rev, for looking at plans without a store (scripts, tests).
NO_HORIZON = 2**62


def states_query(cmd: GetStatesCmd, bound: int = NO_HORIZON) -> tuple[str, list[Any]]:
    """The SQL and arguments of a get_states page (limit + 1 rows, to know ``more``) showing
    only revs below ``bound``, a read horizon computed before the statement runs. The SQL takes
    two arguments, the numbers and the label sets (only the first when there are no label
    sets); the driver runs it through ``flowstate_query_states`` (it runs as it is too:
    EXPLAIN)."""
    sets = [dumps_map(labels) for labels in cmd.labels] if cmd.labels and all(cmd.labels) else []
    if len(sets) > MAX_LABEL_SETS:
        raise ValidationError("labels", f"at most {MAX_LABEL_SETS} label sets in one query")
    at = to_millis(cmd.since_time) if cmd.since_time is not None else None
    nums = [bound, max(cmd.since_rev, 0), at or 0]

    def filters(alias: str) -> list[str]:
        """The label and time filters on the versions ``alias``."""
        where = _label_filter(f"{alias}.labels", len(sets))
        if at is not None:
            where.append(f"{alias}.committed_at >= {_TIME}")
        return where

    # "+ 0": the horizon is a filter on each row, not a range of an index. It is almost always
    # above every row, so as an index condition it would make the planner walk the log in rev
    # order for a selective label query instead of using the GIN index.
    visible = [f"s.rev + 0 < {_HORIZON}"]
    if cmd.since_rev < 0:  # since latest: from the latest matching version of the whole log
        anchor = " AND ".join([f"a.rev + 0 < {_HORIZON}", *filters("a")])
        floor = f"(SELECT max(a.rev) FROM flowstate_states a WHERE {anchor})"
        since = f">= {floor}"
    elif at is not None:
        # every rev up to the last time mark below since_time is older than it: start after
        mark = (
            "(SELECT m.rev FROM flowstate_time_marks m WHERE m.max_at < "
            f"{_TIME} ORDER BY m.max_at DESC, m.rev DESC LIMIT 1)"
        )
        since = f"> greatest({_SINCE}, {mark})"
        if cmd.latest_only:  # from the first version at or after since_time (in rev order)
            since = (
                f">= (SELECT f.rev FROM flowstate_states f WHERE f.rev {since} "
                f"AND f.committed_at >= {_TIME} AND f.rev + 0 < {_HORIZON} "
                "ORDER BY f.rev LIMIT 1)"
            )
    else:
        since = f"> {_SINCE}"
    limit = int(cmd.limit) + 1
    if not cmd.latest_only:
        where = " AND ".join([f"s.rev {since}", *visible, *filters("s")])
        sql = (
            f"SELECT {_COLUMNS} FROM flowstate_states s WHERE {where} ORDER BY s.rev LIMIT {limit}"
        )
        return sql, [nums, sets] if sets else [nums]
    # latest_only: each state's latest version below the horizon. Its latest rev is in
    # flowstate_latest with its labels: below the horizon (nearly always), that row is the one,
    # found through the latest rows alone (by rev, or by labels); at or beyond it (committed
    # again while a lower rev is in flight), the newest version below the horizon is looked up.
    cols = ", ".join(f"s.{c}" for c in _COLUMNS.split(", "))
    below = " AND ".join(
        [f"l.rev {since}", f"l.rev + 0 < {_HORIZON}", *_label_filter("l.labels", len(sets))]
    )
    if at is None:  # the page of latest rows first, then their versions (one probe each)
        first = (
            f"SELECT {cols} FROM (SELECT l.rev FROM flowstate_latest l WHERE {below} "
            f"ORDER BY l.rev LIMIT {limit}) l JOIN flowstate_states s ON s.rev = l.rev"
        )
    else:  # the time is the version's: filtered after the join ("+ 0": after, not instead)
        first = (
            f"SELECT {cols} FROM flowstate_latest l JOIN flowstate_states s ON s.rev = l.rev "
            f"WHERE {below} AND s.committed_at + 0 >= {_TIME} ORDER BY l.rev LIMIT {limit}"
        )
    beyond = " AND ".join([f"l.rev >= {_HORIZON}", f"s.rev {since}", *filters("s")])
    sql = (
        f"SELECT {_COLUMNS} FROM (({first}) "
        f"UNION ALL (SELECT {cols} FROM flowstate_latest l CROSS JOIN LATERAL ("
        f"SELECT {_COLUMNS} FROM flowstate_states n WHERE n.id = l.id AND n.rev < {_HORIZON} "
        f"ORDER BY n.rev DESC LIMIT 1) s WHERE {beyond})"
        f") s ORDER BY s.rev LIMIT {limit}"
    )
    return sql, [nums, sets] if sets else [nums]


async def _acquire(pool: asyncpg.Pool, attempt: int) -> asyncpg.Connection | None:
    """A pooled connection for attempt ``attempt`` (of 3) of a write, or None after a
    connection failure worth retrying; StoreUnavailableError on the last attempt."""
    try:
        return await pool.acquire()
    except _CONNECTION_ERRORS as exc:
        if attempt == 2:
            raise StoreUnavailableError(f"postgres unavailable: {exc}") from exc
        await asyncio.sleep(0.1 * 2**attempt)
        return None


def _page(cmd: GetStatesCmd, rows: Sequence[Any], bound: int) -> GetStatesResult:
    """The result of a get_states page: ``rows`` (limit + 1 at most) read below ``bound``."""
    states = [_row_state(r) for r in rows[: cmd.limit]]
    if len(rows) > cmd.limit:
        return GetStatesResult(states, True)
    # every rev below the horizon is finished: no version at or below bound - 1 can appear
    # later, so the query looked at every rev up to there
    return GetStatesResult(states, False, bound - 1)


async def _insert_delayed(conn: asyncpg.Connection, delayed: DelayedState, offset: int) -> None:
    sql = 'INSERT INTO flowstate_delayed ("offset", execute_at, state) VALUES ($1, $2, $3::jsonb)'
    try:
        await conn.execute(sql, offset, to_seconds(delayed.execute_at), dumps_state(delayed.state))
    except _DATA_ERRORS as exc:
        raise _invalid(exc, ("offset", "execute_at", "delayed state")) from None


async def _store_data(conn: asyncpg.Connection, data: Data) -> int:
    """Insert ``data``; its new data rev (the caller sets ``data.rev`` once it is stored)."""
    sql = "INSERT INTO flowstate_data (annotations, blob) VALUES ($1::jsonb, $2) RETURNING rev"
    try:
        return int(await conn.fetchval(sql, dumps_map(data.annotations), bytes(data.blob)))
    except _DATA_ERRORS as exc:
        raise _invalid(exc, ("data.annotations", "data.blob")) from None


async def _get_data(conn: asyncpg.Connection, data: Data) -> None:
    row = await conn.fetchrow(
        "SELECT annotations, blob FROM flowstate_data WHERE rev = $1", data.rev
    )
    if row is None:
        raise DataNotFoundError(data.rev)
    data.annotations = json.loads(row[0])
    data.blob = bytes(row[1])


def _version_columns(states: list[State]) -> tuple[list[Any], ...]:
    """The per-version argument arrays the commit functions take after ids, expected revs
    (and revs): committed_at, annotations, labels, transition to, transition annotations."""
    return (
        [to_millis(s.committed_at) if s.committed_at else 0 for s in states],
        [dumps_map(s.annotations) for s in states],
        [dumps_map(s.labels) for s in states],
        [s.transition.to for s in states],
        [dumps_map(s.transition.annotations) for s in states],
    )


def _in_order(conflicts: list[str], ids: list[str]) -> list[str]:
    """The conflicting ids (the database reports them sorted) in commit order."""
    found = set(conflicts)
    return [i for i in dict.fromkeys(ids) if i in found]


def _versions_only(cmd: CommitCmd) -> bool:
    """Whether a commit only writes state versions (transit, park, noop): its storage work is
    then one statement, and nothing it computes depends on a rev before the commit returns."""
    return all(isinstance(c, TransitCmd | ParkCmd | NoopCmd) for c in cmd.commands)


class _Staging:
    """The AsyncCommitTx of a versions-only commit: stages versions with placeholder revs."""

    def __init__(self) -> None:
        self.staged: list[tuple[State, int]] = []

    async def commit_state(self, state: State, expected_rev: int) -> bool:
        state.rev = -(len(self.staged) + 1)
        self.staged.append((state, expected_rev))
        return True

    async def get_state(self, state_id: str, rev: int) -> State:
        raise AssertionError("not part of a versions-only commit")

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        raise AssertionError("not part of a versions-only commit")

    async def store_data(self, data: Data) -> None:
        raise AssertionError("not part of a versions-only commit")

    async def get_data(self, data: Data) -> None:
        raise AssertionError("not part of a versions-only commit")

    async def delay(self, delayed: DelayedState) -> int:
        raise AssertionError("not part of a versions-only commit")


class _PgTx:
    """The AsyncCommitTx of a commit in a transaction. Versions are staged and written (with
    the rev check) by one ``flowstate_store_versions`` call at the end; other operations run in
    the transaction as they come."""

    def __init__(self, conn: asyncpg.Connection, first_rev: int) -> None:
        self.conn = conn
        self.next_rev = first_rev
        self.staged: list[tuple[State, int]] = []

    async def commit_state(self, state: State, expected_rev: int) -> bool:
        state.rev = self.next_rev
        self.next_rev += 1
        self.staged.append((state, expected_rev))
        return True

    async def get_state(self, state_id: str, rev: int) -> State:
        for s, _ in reversed(self.staged):
            if s.id == state_id and (rev == 0 or s.rev == rev):
                return s.copy()
        return await _get_state(self.conn, state_id, rev)

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        for s, _ in reversed(self.staged):
            if label_match(s.labels, [dict(labels)] if labels else []):
                return s.copy()
        return await _get_state_by_labels(self.conn, labels)

    async def store_data(self, data: Data) -> None:
        data.rev = await _store_data(self.conn, data)  # a work copy: applied once committed

    async def get_data(self, data: Data) -> None:
        await _get_data(self.conn, data)

    async def delay(self, delayed: DelayedState) -> int:
        offset = int(await self.conn.fetchval(_ALLOC_OFFSET_SQL))
        await _insert_delayed(self.conn, delayed, offset)
        return offset

    async def flush(self) -> None:
        if not self.staged:
            return
        states = [s for s, _ in self.staged]
        try:
            conflicts = await self.conn.fetchval(
                "SELECT flowstate_store_versions($1, $2, $3, $4, $5, $6, $7, $8)",
                [s.id for s in states],
                [e for _, e in self.staged],
                [s.rev for s in states],
                *_version_columns(states),
            )
        except _DATA_ERRORS as exc:
            raise _invalid(exc, _STORE_FIELDS) from None
        if conflicts:
            raise RevMismatchError(_in_order(conflicts, [s.id for s in states]))
