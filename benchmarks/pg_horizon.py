"""Issue 12 benchmark: PostgreSQL readers next to foreign transactions, and commit throughput.

    python -m benchmarks.pg_horizon [--dsn DSN] [--json OUT]

1. Cross-process watch latency: a child process commits a state every 20 ms, stamping the wall
   clock in an annotation; a watcher in this process records receive time minus stamp. Run
   twice: without and with write transactions of other applications open (one in another
   schema, one in the ``postgres`` database) for the whole run. Reports p50/p99/max and how
   many of the commits arrived before the run ended.
2. Commits/s of one-statement park commits at 1/4/16 concurrent tasks (pool = concurrency).
3. The read horizon alone: statements/s of the horizon each log read computes, at idle and
   while 16 tasks commit, and the commits/s of those 16 meanwhile. Before issue 12 that is
   ``pg_snapshot_xmin(pg_current_snapshot())``; after, ``flowstate_rev_bound`` (the allocated
   head, then ``pg_locks``). Which one runs is chosen by what the schema offers.

Run it once with the code before the change (``PYTHONPATH=<old src>``) and once after.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

import flowstate as fs
from benchmarks.common import PG_DSN, percentile

CHILD = """
import asyncio, sys, time
import flowstate as fs

async def main(dsn, n):
    async with fs.Engine(fs.PostgresDriver(dsn), recovery=False, delayer=False) as e:
        for i in range(n):
            ctx = fs.StateCtx(current=fs.State(id=f"w{i}", labels={"bench": "watch"}))
            ctx.current.annotations["sent"] = repr(time.time())
            await e.do(fs.commit(fs.park(ctx)))
            await asyncio.sleep(0.02)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _with_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


@contextlib.asynccontextmanager
async def foreign(dsn: str, tag: str) -> AsyncIterator[None]:
    """Write transactions of other applications, open until the block ends."""
    scratch = f"bench_foreign_{tag}"
    other_db = urlunsplit(urlsplit(dsn)._replace(path="/postgres", query=""))
    here = await asyncpg.connect(dsn)
    elsewhere = await asyncpg.connect(other_db)
    try:
        await here.execute(f'CREATE SCHEMA IF NOT EXISTS "{scratch}"')
        await here.execute(f'CREATE TABLE IF NOT EXISTS "{scratch}".t (x int)')
        await here.execute("BEGIN")
        await here.execute(f'INSERT INTO "{scratch}".t VALUES (1)')
        await elsewhere.execute("BEGIN")
        await elsewhere.fetchval("SELECT pg_current_xact_id()")
        yield
    finally:
        for conn in (here, elsewhere):
            with contextlib.suppress(Exception):
                await conn.execute("ROLLBACK")
        with contextlib.suppress(Exception):
            await here.execute(f'DROP SCHEMA IF EXISTS "{scratch}" CASCADE')
        await here.close()
        await elsewhere.close()


async def watch_latency(dsn: str, n: int, with_foreign: bool, tag: str) -> dict[str, Any]:
    store = _with_schema(dsn, f"bench_h_watch_{tag}_{int(with_foreign)}")
    async with fs.Engine(fs.PostgresDriver(store), recovery=False, delayer=False):
        pass  # migrated before anything is timed
    latencies: list[float] = []
    ctx = foreign(dsn, tag) if with_foreign else contextlib.nullcontext()
    async with ctx:
        engine = fs.Engine(fs.PostgresDriver(store), recovery=False, delayer=False)
        async with engine, engine.watch(fs.get_states({"bench": "watch"})) as watcher:

            async def consume() -> None:
                async for state in watcher:
                    latencies.append(time.time() - float(state.annotations["sent"]))
                    if len(latencies) == n:
                        return

            consumer = asyncio.create_task(consume())
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-c", CHILD, store, str(n), stdout=subprocess.DEVNULL
            )
            await child.wait()
            # what has not arrived 2 s after the last commit is counted as not delivered
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(consumer), 2.0)
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    ms = [x * 1000 for x in latencies]
    return {
        "foreign_tx": with_foreign,
        "commits": n,
        "delivered_in_run": len(ms),
        "p50_ms": round(percentile(ms, 50), 2),
        "p99_ms": round(percentile(ms, 99), 2),
        "max_ms": round(max(ms), 2) if ms else None,
    }


async def commits_per_s(dsn: str, conc: int, seconds: float, tag: str) -> float:
    store = _with_schema(dsn, f"bench_h_commit_{tag}_{conc}")
    driver = fs.PostgresDriver(store, min_size=conc, max_size=conc)
    async with fs.Engine(driver, recovery=False, delayer=False) as engine:
        count = 0
        stop = time.perf_counter() + seconds + 0.5
        start = time.perf_counter() + 0.5  # warm-up

        async def lane(k: int) -> None:
            nonlocal count
            i = 0
            while time.perf_counter() < stop:
                ctx = fs.StateCtx(current=fs.State(id=f"c{k}-{i}", labels={"b": "c"}))
                await engine.do(fs.commit(fs.park(ctx)))
                if time.perf_counter() >= start:
                    count += 1
                i += 1

        await asyncio.gather(*(lane(k) for k in range(conc)))
    return round(count / seconds, 1)


async def horizon_cost(dsn: str, seconds: float, tag: str) -> dict[str, Any]:
    store = _with_schema(dsn, f"bench_h_cost_{tag}")
    driver = fs.PostgresDriver(store, min_size=16, max_size=16)
    async with fs.Engine(driver, recovery=False, delayer=False) as engine:
        conn = await asyncpg.connect(dsn, server_settings={"search_path": f'"bench_h_cost_{tag}"'})
        try:
            has_bound = await conn.fetchval("SELECT to_regproc('flowstate_rev_bound') IS NOT NULL")
            sql = (
                "SELECT flowstate_rev_bound()"
                if has_bound
                else "SELECT pg_snapshot_xmin(pg_current_snapshot())"
            )

            async def reads(until: float) -> float:
                n = 0
                t0 = time.perf_counter()
                while time.perf_counter() < until:
                    await conn.fetchval(sql)
                    n += 1
                return n / (time.perf_counter() - t0)

            idle = await reads(time.perf_counter() + seconds)
            count = 0
            stop = time.perf_counter() + seconds

            async def lane(k: int) -> None:
                nonlocal count
                i = 0
                while time.perf_counter() < stop:
                    ctx = fs.StateCtx(current=fs.State(id=f"h{k}-{i}"))
                    await engine.do(fs.commit(fs.park(ctx)))
                    count += 1
                    i += 1

            lanes = asyncio.gather(*(lane(k) for k in range(16)))
            busy = await reads(stop)
            await lanes
        finally:
            await conn.close()
    return {
        "horizon_sql": sql,
        "reads_per_s_idle": round(idle),
        "reads_per_s_under_16_committers": round(busy),
        "commits_per_s_of_those_16": round(count / seconds, 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", default=PG_DSN)
    parser.add_argument("--json")
    parser.add_argument("--tag", default="run")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--watch-commits", type=int, default=250)
    parser.add_argument("--commits-only", action="store_true", help="only part 2")
    args = parser.parse_args()
    out: dict[str, Any] = {"watch": [], "commits_per_s": {}}
    for with_foreign in () if args.commits_only else (False, True):
        r = await watch_latency(args.dsn, args.watch_commits, with_foreign, args.tag)
        out["watch"].append(r)
        print(json.dumps(r), flush=True)
    for conc in (1, 4, 16):
        out["commits_per_s"][conc] = await commits_per_s(args.dsn, conc, args.seconds, args.tag)
        print(f"commits/s at {conc}: {out['commits_per_s'][conc]}", flush=True)
    if not args.commits_only:
        out["horizon"] = await horizon_cost(args.dsn, args.seconds, args.tag)
        print(json.dumps(out["horizon"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    # the benchmark's schemas are dropped so that repeated runs start empty
    conn = await asyncpg.connect(args.dsn)
    try:
        for (name,) in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", f"bench_h_%_{args.tag}%"
        ):
            await conn.execute(f'DROP SCHEMA "{name}" CASCADE')
    finally:
        await conn.close()


if __name__ == "__main__":
    asyncio.run(main())
