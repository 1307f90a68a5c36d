"""Recovery: every committed state that is not parked is eventually executed, or ended.

The :class:`Recoverer` follows the state log. A state committed with a transition ``to`` a flow
that has not been committed again (parked, or moved on) within its *retry after* window is
re-committed to the same flow with the transition annotation ``flowstate.recovery.attempt``
and executed again; after *max attempts* it is ended by force. Per-state settings are state
annotations, set with the functions of this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from flowstate.commands import commit, execute, get_states, park, transit
from flowstate.errors import RevMismatchError
from flowstate.gotime import format_duration, parse_duration
from flowstate.roles import RoleWorker, in_batches
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
    ``committed``: meta state commits."""

    active: bool
    head_rev: int
    tail_rev: int
    added: int
    completed: int
    retried: int
    dropped: int
    committed: int


@dataclass(slots=True)
class _Tracked:
    state: State
    retry_at: datetime


def _by_rev(tracked: _Tracked) -> int:
    return tracked.state.rev


class Recoverer(RoleWorker):
    """Follows the log and retries stalled states. Started by the Engine (``recovery=True``).

    Only the active process (see :mod:`flowstate.roles`) retries; it stores where to resume
    (``flowstate.recovery.since_rev`` on ``flowstate.recovery.meta``) so that a restart, or a
    standby taking over, reads only the part of the log that may hold unfinished states.
    """

    name = "recoverer"

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = 10.0,
        takeover_after: float = 360.0,
        meta_every: float = 300.0,
    ) -> None:
        super().__init__(engine, META_ID, interval, takeover_after)
        self.meta_every = meta_every
        self._cursor = 0
        self._head = 0
        self._tracked: dict[str, _Tracked] = {}
        self._stored_since = 0
        self._added = self._completed = self._retried = self._dropped = self._committed = 0

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
        )

    async def tick(self) -> None:
        """Read new commits, settle the role, and (if active) retry what is due."""
        await self._read()
        if await self.role.check(has_work=self._next_since() > self._stored_since):
            self._reset()
            await self._read()
        if not self.role.active:
            return
        await self._retry_due()
        await self._store_progress()

    def _progress(self) -> dict[str, str]:
        return {SINCE_REV: str(self._next_since())}

    def _reset(self) -> None:
        self._stored_since = int(self.role.annotations.get(SINCE_REV, "0") or 0)
        self._cursor = self._head = self._stored_since
        self._tracked.clear()

    async def _read(self) -> None:
        while True:
            page = get_states(since_rev=self._cursor, limit=500)
            await self.engine.do(page)
            assert page.result is not None
            for state in page.result.states:
                self._cursor = state.rev
                if is_system(state.id) or not enabled(state):
                    continue
                self._head = state.rev
                if not self.role.active:
                    continue
                if parked(state):
                    self._tracked.pop(state.id, None)
                    self._completed += 1
                else:
                    at = (state.committed_at or self.engine.clock.now()) + retry_after(state)
                    self._tracked[state.id] = _Tracked(state, at)
                    self._added += 1
            if not page.result.more:
                return

    async def _retry_due(self) -> None:
        now = self.engine.clock.now()
        due = sorted((t for t in self._tracked.values() if t.retry_at <= now), key=_by_rev)
        failed: BaseException | None = None
        for item, error in await in_batches(due, lambda t: self._retry(t.state)):
            if error is None:
                self._tracked.pop(item.state.id, None)
            else:
                failed = failed or error  # it stays tracked: retried next tick
        if failed is not None:
            raise failed

    async def _retry(self, state: State) -> None:
        n = attempt(state) + 1
        ctx = state.to_ctx()
        annotations = dict(state.transition.annotations)
        annotations[ATTEMPT] = str(n)
        try:
            if n > max_attempts(state):
                annotations = {ATTEMPT: str(n), STATE_ANNOTATION: ENDED}
                await self.engine.do(commit(park(ctx, annotations)))
                self._dropped += 1
                log.warning("state %r ended by recovery after %d attempts", state.id, n - 1)
                return
            await self.engine.do(commit(transit(ctx, state.transition.to, annotations)))
        except RevMismatchError:
            return  # it moved on by itself
        self._retried += 1
        await self.engine.do(execute(ctx))

    def _tail(self) -> int:
        if self._tracked:
            return min(t.state.rev for t in self._tracked.values())
        return self._head

    def _next_since(self) -> int:
        tail = self._tail()
        if self._tracked:
            return max(tail - 1, 0)
        return tail

    async def _store_progress(self) -> None:
        since = self._next_since()
        at = self.role.meta.current.committed_at
        age = (self.engine.clock.now() - at).total_seconds() if at else self.meta_every
        # writing at least every meta_every is also the heartbeat a standby watches
        due = since > self._stored_since + 1000 or age >= self.meta_every
        if due and await self.role.write({SINCE_REV: str(since)}):
            self._stored_since = since
            self._committed += 1
