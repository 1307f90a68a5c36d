"""Clocks. The engine, its drivers and (later) the recoverer and delayer read time from one."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """Source of the current time (UTC, timezone-aware)."""

    def now(self) -> datetime: ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        return datetime.now(UTC)


class ManualClock:
    """A clock that only moves when told to. For tests of time windows."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2000, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta | float) -> datetime:
        """Move the clock forward by ``delta`` (seconds or a timedelta); returns the new time."""
        if not isinstance(delta, timedelta):
            delta = timedelta(seconds=delta)
        self._now += delta
        return self._now

    def set(self, when: datetime) -> None:
        """Jump to ``when``."""
        self._now = when


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
