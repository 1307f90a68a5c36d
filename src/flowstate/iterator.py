"""Ordered iteration over the state log, and watchers that wait for new commits."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from flowstate import perform
from flowstate.clock import monotonic, to_millis
from flowstate.commands import GetStatesCmd
from flowstate.drivers.base import label_match
from flowstate.errors import FlowstateError, StoreUnavailableError
from flowstate.state import State
from flowstate.tail import tail_of

if TYPE_CHECKING:
    from types import TracebackType

    from flowstate.drivers.base import Driver
    from flowstate.tail import Tail

#: A waiting watcher re-queries at least this often even without a wake-up (a safety net).
WATCH_REFRESH = 5.0
#: How long a watcher keeps retrying a failing store before raising the error to its consumer.
WATCH_RETRY_FOR = 30.0


class StateIterator:
    """Async iterator over the states matching a query, in rev order, ending at the head.

    It works on a private copy of the command; after each state it moves ``since_rev`` to that
    state's rev, so a later query (or :class:`Watcher`) resumes right after it. When the last
    page is exhausted, ``since_rev`` moves on to the rev the store says it scanned up to
    (matching or not), so a filtered reader never re-reads what it already looked at.
    """

    def __init__(self, driver: Driver, cmd: GetStatesCmd) -> None:
        self._driver = driver
        self.cmd = cmd.copy()
        perform.normalize_get_states(self.cmd)
        self._buf: deque[State] = deque()
        self._at_head = False
        self._seen = 0
        # Every matching version with a rev at or below this is delivered or buffered.
        self._scanned = 0

    @property
    def since_rev(self) -> int:
        """The rev after which the next query reads."""
        return self.cmd.since_rev

    def __aiter__(self) -> StateIterator:
        return self

    async def __anext__(self) -> State:
        while not self._buf:
            if self._at_head:
                raise StopAsyncIteration
            await self._fetch()
        return self._next()

    def _next(self) -> State:
        state = self._buf.popleft()
        rev = state.rev
        if not self._buf:
            rev = max(rev, self._scanned_to())
        self.cmd.since_rev = rev
        return state

    def _scanned_to(self) -> int:
        return self._scanned

    async def _fetch(self) -> None:
        """Query the next page; cancel-safe (state changes only after the query returned)."""
        cmd = self.cmd
        self._seen = self._driver.notifier.version
        head = await self._driver.head_rev() if cmd.since_rev < 0 else 0
        result = await self._driver.get_states(cmd)
        states = result.states
        if states:
            scanned = states[-1].rev
            if not result.more:
                scanned = max(scanned, result.scanned_rev)
            self._scanned = max(self._scanned, scanned)
            self._buf.extend(states)
        elif cmd.since_rev < 0:
            # nothing matched up to head: continue from there
            cmd.since_rev = self._scanned = max(head, result.scanned_rev)
        elif result.scanned_rev > cmd.since_rev:
            cmd.since_rev = self._scanned = result.scanned_rev
        self._at_head = not result.more


class Watcher(StateIterator):
    """Delivers every matching version once, in rev order: history first, then live commits.

    Use it as an async iterator, best inside ``async with``. Iteration ends when the watcher
    is closed or its engine shuts down. Transient driver errors are retried with backoff; an
    error that persists is raised to the consumer.
    """

    def __init__(self, driver: Driver, cmd: GetStatesCmd, stop: asyncio.Event | None) -> None:
        super().__init__(driver, cmd)
        self._stop = stop
        self._closed = False
        self.retry_for = WATCH_RETRY_FOR
        # While subscribed to the driver's shared tail (see flowstate.tail), new versions are
        # pushed into the buffer and ``_wakeup`` is resolved; no query of our own runs then.
        self._tail: Tail | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._since_time_ms = (
            to_millis(self.cmd.since_time) if self.cmd.since_time is not None else None
        )

    @property
    def closed(self) -> bool:
        return self._closed or (self._stop is not None and self._stop.is_set())

    @property
    def pending(self) -> int:
        """Versions received but not yet delivered."""
        return len(self._buf)

    def _scanned_to(self) -> int:
        tail = self._tail
        return max(self._scanned, tail.rev) if tail is not None else self._scanned

    def accepts(self, state: State, latest: dict[str, int] | None) -> bool:
        """Whether this watcher's query would return ``state`` (``latest``: the newest rev of
        each id among the versions read together, for latest-only watchers)."""
        cmd = self.cmd
        if self._since_time_ms is not None and (
            state.committed_at is None or to_millis(state.committed_at) < self._since_time_ms
        ):
            return False
        if cmd.labels and not label_match(state.labels, cmd.labels):
            return False
        return not (cmd.latest_only and latest is not None and latest.get(state.id) != state.rev)

    def push(self, state: State) -> None:
        """Called by the tail: a version for this watcher (never one it already had)."""
        self._buf.append(state)

    def wake(self) -> None:
        """Called by the tail: something changed for this watcher (a version, a detach)."""
        fut = self._wakeup
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _wait_pushed(self) -> None:
        """Wait for the tail to push or wake. No timer of its own: the tail wakes every
        subscriber it lets go (leave, stop, a failed read, the sweep of closed watchers after
        an engine shutdown), and a timer armed and cancelled per delivery was a third of the
        cost of a 1,000-watcher fan-out."""
        fut = self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await fut
        finally:
            self._wakeup = None

    def _join_tail(self) -> bool:
        driver = self._driver
        if not driver.shares_tail or self.cmd.since_rev < 0:
            return False
        return tail_of(driver).join(self, self.cmd.since_rev)

    def _leave_tail(self) -> None:
        if self._tail is not None:
            self._tail.leave(self)

    async def __anext__(self) -> State:
        failures = 0
        failing_since = 0.0
        while not self._buf:
            if self.closed:
                self._leave_tail()
                raise StopAsyncIteration
            if self._tail is not None:
                await self._wait_pushed()
                continue
            if self._at_head:
                if self._join_tail():
                    continue
                await self._driver.wait_for_commit(self._seen, WATCH_REFRESH)
                self._at_head = False
                continue
            try:
                await self._fetch()
                failures = 0
            except Exception as exc:
                if isinstance(exc, FlowstateError) and not isinstance(exc, StoreUnavailableError):
                    raise
                failures += 1
                if failures == 1:
                    failing_since = monotonic()
                elif monotonic() - failing_since > self.retry_for:
                    raise
                await asyncio.sleep(min(0.05 * 2**failures, 1.0))
        return self._next()

    def close(self) -> None:
        """Stop delivering; a consumer waiting in ``async for`` finishes its loop."""
        self._closed = True
        self._leave_tail()
        self.wake()
        self._driver.notifier.wake()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
