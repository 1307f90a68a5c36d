"""The delayer with many pending delays (issue 11, item 7): memory and tick time.

    .venv/bin/python -m benchmarks.delayer_pending [--backend sqlite|memory] [--pending 500000]

Stores ``--pending`` delayed states due a day ahead (with the delayer off), then starts an
engine whose delayer is on, plus ``--due`` states due within the next seconds, and reports:

* catch-up: wall time until the delayer's scan has passed every stored delayed state, with
  the number and the longest of the ticks it took (a tick reads at most ``scan_pages`` pages);
* steady ticks (after the catch-up, the store unchanged): median and longest;
* RSS growth of the process from before the delayer started to after the steady ticks, and
  the delayed states the delayer holds in memory;
* whether every due state fired (once).

The delayer's ``interval`` is 0.1 s here so that the run is short; no target is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import tempfile
import time
from datetime import timedelta
from typing import Any

import flowstate as fs
from benchmarks.common import current_rss_bytes

_MIB = 1024 * 1024


def _driver(backend: str, path: str) -> fs.Driver:
    if backend == "memory":
        return fs.MemoryDriver()
    from flowstate.drivers.sqlite import SqliteDriver

    return SqliteDriver(path)


async def _fill(engine: fs.Engine, n: int, batch: int = 1000) -> float:
    """Store ``n`` delayed states due a day from now, ``batch`` per commit; returns seconds."""
    t0 = time.perf_counter()
    at = engine.clock.now() + timedelta(days=1)
    for start in range(0, n, batch):
        await engine.do(
            fs.commit(
                *(
                    fs.delay_until(
                        fs.StateCtx(current=fs.State(id=f"p{i}")), "fire", at, commit=False
                    )
                    for i in range(start, min(n, start + batch))
                )
            )
        )
    return time.perf_counter() - t0


async def run(backend: str, pending: int, due: int, steady: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "delayer.db")
        fired: list[str] = []
        registry = fs.FlowRegistry()

        @registry.flow("fire")
        async def fire(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            fired.append(ctx.current.id)
            return fs.noop()

        driver = _driver(backend, path)
        filler = fs.Engine(driver, registry, recovery=False, delayer=False)
        await filler.start()
        fill_s = await _fill(filler, pending)
        if backend != "memory":
            await filler.shutdown()
            driver = _driver(backend, path)

        gc.collect()
        rss0 = current_rss_bytes()
        engine = fs.Engine(driver, registry, recovery=False, delayer=True)
        assert engine.delayer is not None
        d = engine.delayer
        d.interval = 0.1
        durations: list[float] = []
        original = d.tick

        async def timed_tick() -> None:
            t = time.perf_counter()
            await original()
            durations.append(time.perf_counter() - t)

        d.tick = timed_tick  # type: ignore[method-assign]
        t0 = time.perf_counter()
        await engine.start()
        soon = engine.clock.now() + timedelta(seconds=1)
        await engine.do(
            *(
                fs.delay_until(
                    fs.StateCtx(current=fs.State(id=f"due{i}")), "fire", soon, commit=False
                )
                for i in range(due)
            )
        )
        head = pending + due  # offsets on SQLite and memory: 1, 2, ...
        while d.stats().head < head:
            await d.wait_tick()
        catch_up_s = time.perf_counter() - t0
        catch_up_ticks = list(durations)
        deadline = time.perf_counter() + 30
        while len(fired) < due and time.perf_counter() < deadline:
            await d.wait_tick()
        durations.clear()
        for _ in range(steady):
            await d.wait_tick()
        steady_ticks = list(durations)
        gc.collect()
        rss1 = current_rss_bytes()
        stats = d.stats()
        await engine.shutdown()
        return {
            "backend": backend,
            "pending": pending,
            "fill_s": fill_s,
            "catch_up_s": catch_up_s,
            "catch_up_ticks": len(catch_up_ticks),
            "catch_up_tick_p50_ms": statistics.median(catch_up_ticks) * 1000,
            "catch_up_tick_max_ms": max(catch_up_ticks) * 1000,
            "steady_tick_p50_ms": statistics.median(steady_ticks) * 1000,
            "steady_tick_max_ms": max(steady_ticks) * 1000,
            "rss_growth_mib": (rss1 - rss0) / _MIB,
            "held_in_memory": stats.pending,
            "due": due,
            "fired": len(fired),
            "fired_once": len(set(fired)) == len(fired),
        }


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.delayer_pending", description=__doc__)
    ap.add_argument("--backend", choices=("sqlite", "memory"), default="sqlite")
    ap.add_argument("--pending", type=int, default=500_000)
    ap.add_argument("--due", type=int, default=1000)
    ap.add_argument("--steady", type=int, default=20, help="steady ticks to time")
    args = ap.parse_args()
    r = asyncio.run(run(args.backend, args.pending, args.due, args.steady))
    print(f"== Delayer with {r['pending']:,} pending delays a day ahead ({r['backend']}) ==")
    print(f"stored in                 {r['fill_s']:.1f} s (delayer off)")
    print(
        f"catch-up scan             {r['catch_up_s']:.1f} s in {r['catch_up_ticks']} ticks, "
        f"p50 {r['catch_up_tick_p50_ms']:.1f} ms, longest {r['catch_up_tick_max_ms']:.1f} ms"
    )
    print(
        f"steady tick               p50 {r['steady_tick_p50_ms']:.2f} ms, "
        f"max {r['steady_tick_max_ms']:.2f} ms"
    )
    print(f"RSS growth                {r['rss_growth_mib']:.1f} MiB")
    print(f"held in memory            {r['held_in_memory']} delayed states")
    print(f"due within the run        {r['due']} fired {r['fired']}, once each: {r['fired_once']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
