"""Recovery: every committed state that is not parked is eventually executed, or ended.

The :class:`Recoverer` follows the state log. A state committed with a transition ``to`` a flow
that has not been committed again (parked, or moved on) within its *retry after* window is
re-committed to the same flow with the transition annotation ``flowstate.recovery.attempt``
and executed again; after *max attempts* it is ended by force. Per-state settings are state
annotations, set with the functions of this module.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from flowstate.commands import commit, get_state_by_id, get_states, park, transit
from flowstate.errors import NotFoundError, RevMismatchError, ValidationError
from flowstate.gotime import format_duration, parse_duration
from flowstate.roles import ExecutionGate, RoleWorker, in_batches
from flowstate.state import ENDED, STATE_ANNOTATION, State, StateCtx, is_system, parked

if TYPE_CHECKING:
    from flowstate.engine import Engine

META_ID = "flowstate.recovery.meta"
ENABLED = "flowstate.recovery.enabled"
ATTEMPT = "flowstate.recovery.attempt"
MAX_ATTEMPTS = "flowstate.recovery.max_attempts"
RETRY_AFTER = "flowstate.recovery.retry_after"
SINCE_REV = "flowstate.recovery.since_rev"

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_RETRY_AFTER = timedelta(minutes=2)
MIN_RETRY_AFTER = timedelta(minutes=1)
MAX_RETRY_AFTER = timedelta(minutes=5)

log = logging.getLogger("flowstate.recovery")


def disable(ctx: StateCtx) -> None:
    """Never recover this state."""
    ctx.current.annotations[ENABLED] = "false"


def enabled(state: State) -> bool:
    return state.annotations.get(ENABLED) != "false"


def set_max_attempts(ctx: StateCtx, attempts: int) -> None:
    """Retry at most ``attempts`` times before ending the state (<= 0 means the default, 3)."""
    ctx.current.annotations[MAX_ATTEMPTS] = str(attempts if attempts > 0 else DEFAULT_MAX_ATTEMPTS)


def max_attempts(state: State) -> int:
    try:
        value = int(state.annotations.get(MAX_ATTEMPTS, ""))
    except ValueError:
        return DEFAULT_MAX_ATTEMPTS
    return value if value > 0 else DEFAULT_MAX_ATTEMPTS


def set_retry_after(ctx: StateCtx, after: timedelta | float) -> None:
    """Retry when the state was not committed again within ``after`` (clamped to 1..5 min)."""
    if not isinstance(after, timedelta):
        after = timedelta(seconds=after)
    ctx.current.annotations[RETRY_AFTER] = format_duration(_clamp(after))


def retry_after(state: State) -> timedelta:
    raw = state.annotations.get(RETRY_AFTER, "")
    if not raw:
        return DEFAULT_RETRY_AFTER
    try:
        return _clamp(parse_duration(raw))
    except ValueError:
        return MIN_RETRY_AFTER


def _clamp(after: timedelta) -> timedelta:
    return max(MIN_RETRY_AFTER, min(MAX_RETRY_AFTER, after))


def attempt(state: State) -> int:
    """How many times recovery re-committed this state's current transition (0: never)."""
    try:
        return int(state.transition.annotations.get(ATTEMPT, "0"))
    except ValueError:
        return 0


@dataclass(slots=True)
class RecoveryStats:
    """Counters since start. ``added``: un-parked versions tracked (retries included);
    ``completed``: parked versions seen; ``retried``: re-commits; ``dropped``: forced ends;
    ``committed``: meta state commits; ``skipped``: due states that could not be re-committed
    (e.g. stored before a validation rule existed) and were given up; ``tracked``: un-parked
    states being watched; ``unhosted``: flow id → due states left alone at the last tick
    because no process hosts that flow; ``head_time``: the log clock (behaviour.md §3.2)."""

    active: bool
    head_rev: int
    tail_rev: int
    added: int
    completed: int
    retried: int
    dropped: int
    committed: int
    skipped: int = 0
    tracked: int = 0
    unhosted: dict[str, int] = field(default_factory=dict)
    head_time: datetime | None = None


@dataclass(slots=True)
class _Tracked:
    """What retrying needs of a tracked state, and no more (the state itself is re-read when
    due): its rev, when it is due in log time (Unix seconds) and its flow (interned)."""

    rev: int
    retry_at: float
    flow: str


class _Outcome(enum.Enum):
    RETRIED = "retried"
    DROPPED = "dropped"
    MOVED_ON = "moved on"
    SKIPPED = "skipped"
    WAITING = "waiting for a free execution slot"


class Recoverer(RoleWorker):
    """Follows the log and retries stalled states. Started by the Engine (``recovery=True``).

    Only the active process (see :mod:`flowstate.roles`) retries; it stores where to resume
    (``flowstate.recovery.since_rev`` on ``flowstate.recovery.meta``) so that a restart, or a
    standby taking over, reads only the part of the log that may hold unfinished states.

    Retry windows run on the log's clock (``head_time``, behaviour.md §3.2), not on this host's:
    the ``committed_at`` of the newest recovery-enabled state read, advanced by the elapsed local
    time when a tick reads nothing new. A host whose clock is ahead therefore does not retry
    early. At most ``max_executions`` retried executions run at once; due states beyond that
    wait (still tracked) for a later tick. A state whose flow no process hosts is left alone
    and reported in :attr:`RecoveryStats.unhosted`.
    """

    name = "recoverer"

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = 10.0,
        takeover_after: float = 360.0,
        meta_every: float = 300.0,
        max_executions: int = 64,
    ) -> None:
        super().__init__(engine, META_ID, interval, takeover_after)
        self.meta_every = meta_every
        self.gate = ExecutionGate(engine, max_executions)
        self._cursor = 0
        self._head = 0
        self._head_time: datetime | None = None
        self._read_at: datetime | None = None  # local clock at the previous read of the log
        self._tracked: dict[str, _Tracked] = {}
        self._stored_since = 0
        self._wrote_at: datetime | None = None  # local clock at our last meta write
        self._unhosted: dict[str, int] = {}
        self._warned: set[str] = set()
        self._slots = 0
        self._starved = False  # the last tick left due states waiting for a free slot
        self._added = self._completed = self._retried = self._dropped = self._committed = 0
        self._skipped = 0

    @property
    def max_executions(self) -> int:
        """How many retried executions may run at once."""
        return self.gate.limit

    @max_executions.setter
    def max_executions(self, limit: int) -> None:
        self.gate.limit = limit

    def stats(self) -> RecoveryStats:
        return RecoveryStats(
            self.role.active,
            self._head,
            self._tail(),
            self._added,
            self._completed,
            self._retried,
            self._dropped,
            self._committed,
            self._skipped,
            len(self._tracked),
            dict(self._unhosted),
            self._head_time,
        )

    async def tick(self) -> None:
        """Read new commits, settle the role, and (if active) retry what is due."""
        await self._read()
        # work waits when the log holds a recovery-enabled state after the stored progress
        stored = _since_rev(self.role.annotations) if not self.role.active else self._stored_since
        if await self.role.check(has_work=self._next_since() > stored):
            await self._read()  # the claim reset us to the stored since_rev
        if not self.role.active:
            return
        await self._retry_due()
        await self._store_progress()

    def _progress(self) -> dict[str, str]:
        return {SINCE_REV: str(self._next_since())}

    def _reset(self) -> None:
        self._stored_since = _since_rev(self.role.annotations)
        self._cursor = self._head = self._stored_since
        # the meta state's stamp is log time too: the clock runs from there even before a
        # state is read
        self._head_time = self.role.meta.current.committed_at
        self._read_at = self.engine.clock.now() if self._head_time is not None else None
        self._tracked.clear()
        self._unhosted.clear()
        # a claim or creation just wrote the meta state: that was the heartbeat
        self._wrote_at = self.engine.clock.now() if self.role.active else None

    async def _read(self) -> None:
        """Follow the log from the cursor and move the log clock (behaviour.md §3.2).

        The log clock is a lower bound of the store's "now" that never reads this host's
        wall time: after each read it is the later of the ``committed_at`` of the newest
        recovery-enabled state read and its previous value advanced by the time elapsed on
        our clock since the previous read (a difference of two readings of one clock:
        skew-free). It starts from the meta state's ``committed_at`` (see :meth:`_reset`).
        """
        now = self.engine.clock.now()
        newest: datetime | None = None
        if not self.role.active:  # what the active process finished need not be read again
            self._cursor = max(self._cursor, _since_rev(self.role.annotations))
        while True:
            page = get_states(since_rev=self._cursor, limit=500)
            await self.engine.do(page)
            assert page.result is not None
            for state in page.result.states:
                self._cursor = state.rev
                if is_system(state.id) or not enabled(state):
                    continue
                self._head = state.rev
                newest = state.committed_at or newest
                if not self.role.active:
                    continue
                if parked(state):
                    self._tracked.pop(state.id, None)
                    self._completed += 1
                else:
                    self._track(state)
                    self._added += 1
            if not page.result.more or not self.role.active:
                break  # a standby reads one page per tick: it only needs to know work waits
        self._advance_head_time(now, newest)

    def _advance_head_time(self, now: datetime, newest: datetime | None) -> None:
        head = self._head_time
        if head is not None and self._read_at is not None:
            head += max(now - self._read_at, timedelta(0))
        if newest is not None and (head is None or newest > head):
            head = newest
        self._head_time = head
        self._read_at = now

    def _track(self, state: State) -> None:
        at = state.committed_at or self._head_time or self.engine.clock.now()
        self._tracked[state.id] = _Tracked(
            state.rev, (at + retry_after(state)).timestamp(), sys.intern(state.transition.to)
        )

    async def _retry_due(self) -> None:
        """Retry (or end) the tracked states due on the log clock, lowest rev first. A state
        that cannot be re-committed is skipped; other failures leave it tracked for the next
        tick and end this tick's retries (the store is likely unwell), never the tick."""
        if self._head_time is None:
            return
        now = self._head_time.timestamp()
        due = sorted((t.rev, sid) for sid, t in self._tracked.items() if t.retry_at <= now)
        hosted: dict[str, bool] = {}
        unhosted: dict[str, int] = {}
        candidates: list[tuple[str, _Tracked]] = []
        unknown: set[str] = set()
        for _, sid in due:
            entry = self._tracked[sid]
            if entry.flow in unknown:
                continue
            if entry.flow not in hosted:
                try:  # once per flow and tick: a network registry may read the store
                    hosted[entry.flow] = await self.engine.registry.hosts(entry.flow)
                except Exception:
                    log.warning("cannot tell who hosts flow %r", entry.flow, exc_info=True)
                    unknown.add(entry.flow)
                    continue
            if hosted[entry.flow]:
                candidates.append((sid, entry))
            else:
                unhosted[entry.flow] = unhosted.get(entry.flow, 0) + 1
        self._report_unhosted(unhosted, hosted)
        self._slots = max(self.gate.limit, 1) - self.gate.running  # as the gate counts
        self._starved = False
        failed = [(sid, e) for (sid, _), e in await in_batches(candidates, self._retry) if e]
        if failed:
            sid, error = failed[0]
            log.warning(
                "retry of %d state(s) failed (first: %r); they stay tracked",
                len(failed),
                sid,
                exc_info=error,
            )

    def _report_unhosted(self, unhosted: dict[str, int], hosted: dict[str, bool]) -> None:
        for flow in unhosted:
            if flow not in self._warned:
                self._warned.add(flow)
                log.warning(
                    "no process hosts flow %r: its due states are left alone until one does",
                    flow,
                )
        self._warned -= {flow for flow, yes in hosted.items() if yes}
        self._unhosted = unhosted

    async def _retry(self, item: tuple[str, _Tracked]) -> _Outcome:
        sid, entry = item
        try:
            outcome = await self._retry_one(sid, entry)
        except ValidationError as exc:
            log.error("state %r rev %d cannot be recovered, skipped: %s", sid, entry.rev, exc)
            outcome = _Outcome.SKIPPED
            self._skipped += 1
        if outcome is not _Outcome.WAITING and self._tracked.get(sid) is entry:
            del self._tracked[sid]
        return outcome

    async def _retry_one(self, sid: str, entry: _Tracked) -> _Outcome:
        if self._slots <= 0:
            self._starved = True
            return _Outcome.WAITING  # the gate is full: keep it for a later tick
        ctx = StateCtx()
        try:
            await self.engine.do(get_state_by_id(ctx, sid, entry.rev))
        except NotFoundError:
            return _Outcome.MOVED_ON
        state = ctx.current
        n = attempt(state) + 1
        annotations = dict(state.transition.annotations)
        annotations[ATTEMPT] = str(n)
        try:
            if n > max_attempts(state):
                annotations = {ATTEMPT: str(n), STATE_ANNOTATION: ENDED}
                await self.engine.do(commit(park(ctx, annotations)))
                self._dropped += 1
                log.warning("state %r ended by recovery after %d attempts", sid, n - 1)
                return _Outcome.DROPPED
            if self._slots <= 0:
                self._starved = True
                return _Outcome.WAITING
            self._slots -= 1
            await self.engine.do(commit(transit(ctx, state.transition.to, annotations)))
        except RevMismatchError:
            return _Outcome.MOVED_ON  # it moved on by itself
        self._retried += 1
        await self.gate.start(ctx)
        return _Outcome.RETRIED

    async def _sleep(self) -> None:
        """Until the next tick: the interval, or less when due states wait for a free slot.

        A tick starts at most as many retries as the gate has free slots, so that a backlog
        (thousands of states due after an outage) never floods the process. Once a slot
        frees, the next tick runs at once instead of an interval later: the backlog drains
        at the rate executions finish (before: ``max_executions`` per interval).
        """
        if not self._starved or not self.role.active:
            await super()._sleep()
            return
        sleep = asyncio.ensure_future(self.engine.clock.sleep(self.interval))
        freed = asyncio.ensure_future(self.gate.wait_freed())
        try:
            await asyncio.wait({sleep, freed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (sleep, freed):
                fut.cancel()
            await asyncio.gather(sleep, freed, return_exceptions=True)

    def _tail(self) -> int:
        if self._tracked:
            return min(t.rev for t in self._tracked.values())
        return self._head

    def _next_since(self) -> int:
        tail = self._tail()
        if self._tracked:
            return max(tail - 1, 0)
        return tail

    async def _store_progress(self) -> None:
        since = self._next_since()
        now = self.engine.clock.now()
        # the age of our last write on our own clock (the store's stamps may be skewed);
        # writing at least every meta_every is also the heartbeat a standby watches
        age = (now - self._wrote_at).total_seconds() if self._wrote_at else self.meta_every
        due = since > self._stored_since + 1000 or age >= self.meta_every
        if due and await self.role.write({SINCE_REV: str(since)}):
            self._stored_since = since
            self._wrote_at = now
            self._committed += 1


def _since_rev(annotations: dict[str, str]) -> int:
    """The stored since_rev; absent or unreadable counts as 0 (as Go's ParseInt failure)."""
    try:
        return max(int(annotations.get(SINCE_REV, "0") or 0), 0)
    except ValueError:
        return 0
