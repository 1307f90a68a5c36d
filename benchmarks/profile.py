"""Profile the engine's commit path (where the targets of issue 4 are missed).

    .venv/bin/python -m benchmarks.profile memory [--n 50000]
    .venv/bin/python -m benchmarks.profile sqlite-normal|sqlite-full [--conc 1] [--n 5000]
    .venv/bin/python -m benchmarks.profile postgres [--conc 1] [--n 3000]
    .venv/bin/python -m benchmarks.profile flows-memory [--n 5000]

cProfile on the event loop thread (and, for SQLite, a second cProfile inside the writer
thread's batches), sorted by own time, plus a wall-clock split for SQLite: how long a commit
spends on the loop, in the writer's SQL, and waiting in between. ``--pyinstrument`` prints a
pyinstrument call tree instead (if installed).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from typing import Any

import flowstate as fs
from benchmarks.common import PG_DSN, pg_drop_schema


def _stats(prof: cProfile.Profile, title: str, n: int, top: int) -> str:
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    total = st.total_tt  # type: ignore[attr-defined]
    s.write(
        f"\n### {title}: {total:.3f} s profiled for {n} commits = "
        f"{total / n * 1e6:.1f} us/commit (profiler overhead included)\n"
    )
    st.sort_stats("tottime").print_stats(top)
    st.sort_stats("cumulative").print_stats(top)
    return s.getvalue()


async def _commits(eng: fs.Engine, n: int, conc: int, prefix: str = "p") -> float:
    ctxs = []
    for w in range(conc):
        ctx = fs.StateCtx(current=fs.State(id=f"{prefix}{w}"))
        await eng.do(fs.commit(fs.park(ctx)))
        ctxs.append(ctx)
    per = n // conc

    async def worker(ctx: fs.StateCtx) -> None:
        for _ in range(per):
            await eng.do(fs.commit(fs.park(ctx)))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in ctxs))
    return time.perf_counter() - t0


async def _flows(eng: fs.Engine, n: int, prefix: str = "f") -> float:
    t0 = time.perf_counter()
    for i in range(n):
        ctx = fs.StateCtx(current=fs.State(id=f"{prefix}{i}"))
        await eng.do(fs.commit(fs.transit(ctx, "s1")))
        await eng.execute(ctx)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "target", choices=["memory", "sqlite-normal", "sqlite-full", "postgres", "flows-memory"]
    )
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--conc", type=int, default=1)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--pyinstrument", action="store_true")
    ap.add_argument(
        "--split",
        action="store_true",
        help="no profiler: only the wall-clock split (SQLite: time inside batches)",
    )
    args = ap.parse_args()
    from benchmarks.scenarios import _register_flows

    target = args.target
    n = args.n or {"memory": 50_000, "flows-memory": 5_000, "postgres": 3_000}.get(target, 5_000)

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            schema = f"bench_prof_{os.getpid()}"
            writer_prof = cProfile.Profile()
            split = {"sql": 0.0, "batches": 0, "jobs": 0}
            if target == "memory" or target == "flows-memory":
                driver: fs.Driver = fs.MemoryDriver()
            elif target.startswith("sqlite"):
                from flowstate.drivers import sqlite as sq

                sync = "NORMAL" if target == "sqlite-normal" else "FULL"
                driver = sq.SqliteDriver(os.path.join(tmp, "p.db"), synchronous=sync)
                orig = sq.SqliteDriver._run_batch

                def run_batch(self: Any, conn: Any, batch: list[Any]) -> None:
                    t = time.perf_counter()
                    if not args.split:
                        writer_prof.enable()
                    try:
                        orig(self, conn, batch)
                    finally:
                        if not args.split:
                            writer_prof.disable()
                        split["sql"] += time.perf_counter() - t
                        split["batches"] += 1
                        split["jobs"] += len(batch)

                sq.SqliteDriver._run_batch = run_batch  # type: ignore[method-assign]
            else:
                await pg_drop_schema(schema)
                driver = fs.PostgresDriver(PG_DSN, schema=schema, max_size=max(10, args.conc))
            reg = fs.FlowRegistry()
            _register_flows(reg)
            try:
                async with fs.Engine(driver, reg) as eng:
                    # warm up (connections, caches), then profile
                    if target == "flows-memory":
                        await _flows(eng, 200, "warm")
                    else:
                        await _commits(eng, min(n, 500), args.conc, "warm")
                    split.update(sql=0.0, batches=0, jobs=0)
                    writer_prof = cProfile.Profile()
                    if args.split:
                        dt = await _commits(eng, n, args.conc)
                        print(
                            f"{target} conc={args.conc}: {n} commits in {dt:.3f} s = "
                            f"{n / dt:,.0f}/s = {dt / n * 1e6:.1f} us/commit (no profiler)"
                        )
                        if split["batches"]:
                            print(
                                f"writer thread: {split['batches']} batches, "
                                f"{split['jobs'] / split['batches']:.1f} commits/batch, "
                                f"{split['sql'] / n * 1e6:.1f} us/commit inside batches "
                                f"({split['sql'] / dt * 100:.0f}% of wall)"
                            )
                        return
                    if args.pyinstrument:
                        from pyinstrument import Profiler

                        p = Profiler(interval=0.0002, async_mode="disabled")
                        p.start()
                    else:
                        prof = cProfile.Profile()
                        prof.enable()
                    dt = (
                        (await _flows(eng, n))
                        if target == "flows-memory"
                        else (await _commits(eng, n, args.conc))
                    )
                    if args.pyinstrument:
                        p.stop()
                        print(p.output_text(unicode=False, color=False, show_all=False))
                    else:
                        prof.disable()
                        what = "flows" if target == "flows-memory" else "commits"
                        print(
                            f"{target} conc={args.conc}: {n} {what} in {dt:.3f} s under the "
                            f"profiler = {n / dt:,.0f}/s"
                        )
                        print(_stats(prof, "event loop thread", n, args.top))
                        if split["batches"]:
                            print(
                                f"writer thread: {split['batches']} batches, "
                                f"{split['jobs'] / split['batches']:.1f} commits/batch, "
                                f"{split['sql']:.3f} s in batches = "
                                f"{split['sql'] / n * 1e6:.1f} us/commit "
                                f"({split['sql'] / dt * 100:.0f}% of wall)"
                            )
                            print(_stats(writer_prof, "writer thread (_run_batch)", n, args.top))
            finally:
                if target == "postgres":
                    await pg_drop_schema(schema)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
