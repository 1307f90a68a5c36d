"""Ordered iteration over the state log, and watchers that wait for new commits."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from flowstate import perform
from flowstate.clock import monotonic
from flowstate.commands import GetStatesCmd
from flowstate.errors import FlowstateError, StoreUnavailableError
from flowstate.state import State

if TYPE_CHECKING:
    from types import TracebackType

    from flowstate.drivers.base import Driver

#: A waiting watcher re-queries at least this often even without a wake-up (a safety net).
WATCH_REFRESH = 5.0
#: How long a watcher keeps retrying a failing store before raising the error to its consumer.
WATCH_RETRY_FOR = 30.0


class StateIterator:
    """Async iterator over the states matching a query, in rev order, ending at the head.

    It works on a private copy of the command; after each state it moves ``since_rev`` to that
    state's rev, so a later query (or :class:`Watcher`) resumes right after it.
    """

    def __init__(self, driver: Driver, cmd: GetStatesCmd) -> None:
        self._driver = driver
        self.cmd = cmd.copy()
        perform.normalize_get_states(self.cmd)
        self._buf: deque[State] = deque()
        self._at_head = False
        self._seen = 0

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
        self.cmd.since_rev = state.rev
        return state

    async def _fetch(self) -> None:
        """Query the next page; cancel-safe (state changes only after the query returned)."""
        cmd = self.cmd
        self._seen = self._driver.notifier.version
        head = await self._driver.head_rev() if cmd.since_rev < 0 else 0
        result = await self._driver.get_states(cmd)
        if not result.states and cmd.since_rev < 0:
            cmd.since_rev = head  # nothing matched up to head: continue from there
        self._buf.extend(result.states)
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

    @property
    def closed(self) -> bool:
        return self._closed or (self._stop is not None and self._stop.is_set())

    async def __anext__(self) -> State:
        failures = 0
        failing_since = 0.0
        while not self._buf:
            if self.closed:
                raise StopAsyncIteration
            if self._at_head:
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
