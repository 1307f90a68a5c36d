"""Clocks. The engine, its drivers and (later) the recoverer and delayer read time from one."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Source of the current time (UTC, timezone-aware), and of waiting on it."""

    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> Awaitable[None]:
        """Wait until ``seconds`` have passed on this clock."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def sleep(self, seconds: float) -> Awaitable[None]:
        return asyncio.sleep(seconds)


class ManualClock:
    """A clock that only moves when told to. For tests of time windows.

    :meth:`sleep` returns once :meth:`advance` has moved the clock past the deadline, so
    minutes-long recovery and delay windows pass in a test without waiting.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2000, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[datetime, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> datetime:
        return self._now

    def sleep(self, seconds: float) -> Awaitable[None]:
        # registered at the call, not when the caller first awaits: an advance() in between
        # must wake it
        if seconds <= 0:
            return asyncio.sleep(0)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        deadline = self._now + timedelta(seconds=seconds)
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        return fut

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting for the clock to move."""
        return sum(1 for _, _, f in self._sleepers if not f.done())

    def advance(self, delta: timedelta | float) -> datetime:
        """Move the clock forward by ``delta`` (seconds or a timedelta); wakes due sleepers."""
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        self.set(self._now + delta)
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to ``when`` (wakes the sleepers that are then due)."""
        self._now = when
        while self._sleepers and self._sleepers[0][0] <= when:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)


def to_millis(when: datetime) -> int:
    """Unix milliseconds of an aware datetime (naive ones are taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def from_millis(ms: int) -> datetime:
    """Aware UTC datetime from Unix milliseconds."""
    return _EPOCH + timedelta(milliseconds=ms)


def to_seconds(when: datetime) -> int:
    """Unix seconds of a datetime, sub-second part truncated."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - _EPOCH
    return delta.days * 86_400 + delta.seconds


def from_seconds(sec: int) -> datetime:
    """Aware UTC datetime from Unix seconds."""
    return _EPOCH + timedelta(seconds=sec)


def monotonic() -> float:
    """Monotonic seconds (for timeouts, never for stored times)."""
    return time.monotonic()


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
