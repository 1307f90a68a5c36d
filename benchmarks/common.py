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


async def capped_loop(
    ops: list[Callable[[], Awaitable[Any]]],
    duration: float,
    warmup: float,
    cap: int | None = None,
) -> dict[str, float]:
    """Like :func:`timed_loop` (every op in its own task, back to back), but the measured
    window ends after ``duration`` seconds or ``cap`` completed ops, whichever comes first
    (warm-up: ``warmup`` seconds or ``cap // 4`` ops). A long-lived store grows with every
    op: the cap keeps it near its nominal size. ``per_s`` is ops / the window's real length.
    """
    t_start = time.perf_counter()
    warm_end = t_start + warmup
    warm_cap = None if cap is None else max(1, cap // 4)
    state = {"warm": 0, "ops": 0, "t0": 0.0, "t1": 0.0, "measuring": False, "done": False}

    async def loop(op: Callable[[], Awaitable[Any]]) -> None:
        while not state["done"]:
            await op()
            t = time.perf_counter()
            if state["done"]:  # another worker closed the window while this op ran
                return
            if not state["measuring"]:
                state["warm"] += 1
                if t >= warm_end or (warm_cap is not None and state["warm"] >= warm_cap):
                    state["measuring"] = True
                    state["t0"] = t
                continue
            state["ops"] += 1
            if t - state["t0"] >= duration or (cap is not None and state["ops"] >= cap):
                state["done"] = True
                state["t1"] = t

    await asyncio.gather(*(loop(op) for op in ops))
    seconds = max(state["t1"] - state["t0"], 1e-9)
    return {"ops": float(state["ops"]), "seconds": seconds, "per_s": state["ops"] / seconds}


def process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process or of ``pid`` (Linux)."""
    if pid is None:
        return time.process_time()
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0
