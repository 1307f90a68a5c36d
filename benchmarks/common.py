"""Helpers shared by the scenarios: timed loops, percentiles, memory, PostgreSQL schemas."""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable
from typing import Any

PG_DSN = os.environ.get("FLOWSTATE_BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")

#: backend name -> human label
BACKENDS = {
    "memory": "memory",
    "sqlite-normal": "SQLite NORMAL",
    "sqlite-full": "SQLite FULL",
    "postgres": "PostgreSQL",
    "net": "network (server on memory)",
}


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_bytes() -> int:
    """Current resident set size (from /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return int(peak_rss_mb() * 1024 * 1024)


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


async def timed_loop(
    ops: list[Callable[[], Awaitable[Any]]], duration: float, warmup: float
) -> dict[str, float]:
    """Run every op in its own task, back to back, for ``warmup`` + ``duration`` seconds.

    Counts the ops that complete inside the measured window (after the warm-up). An op may
    return an int (how many successes it counts, e.g. 0 for a conflict); None counts as 1.
    The deadline is checked by every loop itself: ops that never suspend (the memory driver)
    would otherwise starve a timer task.
    """
    start = time.perf_counter() + warmup
    end = start + duration
    counted = [0] * len(ops)
    attempts = [0] * len(ops)

    async def loop(i: int, op: Callable[[], Awaitable[Any]]) -> None:
        while True:
            if time.perf_counter() >= end:
                return
            r = await op()
            t = time.perf_counter()
            if start <= t < end:
                attempts[i] += 1
                counted[i] += 1 if r is None else int(r)

    await asyncio.gather(*(loop(i, op) for i, op in enumerate(ops)))
    return {
        "ops": float(sum(counted)),
        "attempts": float(sum(attempts)),
        "seconds": duration,
        "per_s": sum(counted) / duration,
        "attempts_per_s": sum(attempts) / duration,
    }


async def pg_drop_schema(schema: str, dsn: str = PG_DSN) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def pg_available(dsn: str = PG_DSN) -> str | None:
    """None when PostgreSQL answers at ``dsn``, else why not."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(dsn, timeout=5)
        await conn.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        return f"PostgreSQL not reachable at {dsn}: {exc!r}"
    return None
