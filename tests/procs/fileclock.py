"""A clock shared by processes: the wall clock plus an offset that a test moves by writing a
file. Used by the fault tests to pass minutes-long recovery and delay windows in seconds."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path


class FileClock:
    """``now()`` is the wall clock plus the seconds written in ``path`` (0 if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def offset(self) -> float:
        try:
            return float(self.path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0.0

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset())

    async def sleep(self, seconds: float) -> None:
        deadline = self.now() + timedelta(seconds=seconds)
        while (left := (deadline - self.now()).total_seconds()) > 0:
            await asyncio.sleep(min(left, 0.02))

    def advance(self, seconds: float) -> None:
        """Move every process's clock forward (atomically: readers never see a torn file)."""
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(repr(self.offset() + seconds))
        os.replace(tmp, self.path)
