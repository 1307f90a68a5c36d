"""SQLite query latency on a long-lived store (issue 13, item 2).

``measure(revisions)`` builds (or reuses) a store of ``revisions`` revisions through the public
driver API and times the queries a long-lived engine runs, each through ``SqliteDriver``'s
async API (so the thread hop to a reader is included). The store: ``revisions // 4`` ids with 4
versions each, committed in rolling chunks (1,000 transits per commit; a chunk's 4 versions
follow each other, so latest versions are spread over the whole log), labels as the engine
writes them: ``kind`` = ``remote`` on one id in 1,000 (rare) and ``order`` on the others
(often), ``tenant`` (10 values) and a unique ``key``. Every commit advances the store's clock
by one second, so ``since_time`` can point anywhere in the log.

Run ``.venv/bin/python -m benchmarks.sqlite_queries [revisions ...]`` for 10k, 100k and 1M.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import flowstate as fs
from benchmarks.common import percentile

VERSIONS = 4
CHUNK = 1000
RARE_EVERY = 1000
START = datetime(2026, 1, 1, tzinfo=UTC)


class _StepClock:
    """A clock one second further on every commit (``now`` is read once per commit)."""

    def __init__(self, start: datetime) -> None:
        self.t = start

    def now(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _labels(i: int) -> dict[str, str]:
    kind = "remote" if i % RARE_EVERY == 7 else "order"
    return {"kind": kind, "tenant": f"t{i % 10}", "key": f"k{i}"}


async def _build(driver: fs.SqliteDriver, revisions: int) -> None:
    ids = revisions // VERSIONS
    rest = revisions - ids * VERSIONS
    for first in range(0, ids, CHUNK):
        ctxs = [
            fs.StateCtx(current=fs.State(id=f"s{i}", labels=_labels(i)))
            for i in range(first, min(ids, first + CHUNK))
        ]
        for v in range(VERSIONS):
            if v == VERSIONS - 1:
                await driver.commit(fs.commit(*(fs.park(c) for c in ctxs)))
            else:
                await driver.commit(fs.commit(*(fs.transit(c, f"step{v + 1}") for c in ctxs)))
    if rest:
        ctx = fs.StateCtx(current=fs.State(id="extra", labels={"kind": "order"}))
        for _ in range(rest):
            await driver.commit(fs.commit(fs.park(ctx)))


async def _time(
    fn: Callable[[], Awaitable[Any]], n: int, budget: float
) -> tuple[list[float], float]:
    """Milliseconds of up to ``n`` runs of ``fn`` (fewer if ``budget`` seconds run out), and
    the process CPU milliseconds per run (both threads: a steadier figure on a busy machine)."""
    await fn()  # warm the reader's connection and page cache
    out: list[float] = []
    deadline = time.perf_counter() + budget
    cpu0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() > deadline:
            break
    return out, (time.process_time() - cpu0) * 1000 / len(out)


async def _measure(revisions: int, path: str, n: int, budget: float) -> dict[str, float]:
    driver = fs.SqliteDriver(path, synchronous="OFF", clock=_StepClock(START))
    await driver.open()
    try:
        head = await driver.head_rev()
        if head == 0:
            await _build(driver, revisions)
            head = await driver.head_rev()
        elif head != revisions:
            raise ValueError(f"{path} holds {head} revisions, not {revisions}")
        ids = revisions // VERSIONS
        commits = -(-ids // CHUNK) * VERSIONS
        rng = random.Random(1)

        def states(**kw: Any) -> Callable[[], Awaitable[Any]]:
            def run() -> Awaitable[Any]:
                cmd = fs.GetStatesCmd(**kw)
                return driver.get_states(cmd)

            return run

        async def by_key() -> None:
            await driver.get_state_by_labels({"key": f"k{rng.randrange(ids)}"})

        async def by_rare() -> None:
            await driver.get_state_by_labels({"kind": "remote"})

        recent = START + timedelta(seconds=int(commits * 0.9))
        queries: dict[str, Callable[[], Awaitable[Any]]] = {
            # the four of issue 13
            "latest_labels": states(labels=[{"kind": "remote"}], latest_only=True),
            "by_labels": by_key,
            "since_time": states(since_time=recent),
            "labels": states(labels=[{"kind": "remote"}]),
            # variants: a label that matches often or never, two pairs, a rare lookup
            "latest_labels_often": states(labels=[{"kind": "order"}], latest_only=True),
            "latest_labels_none": states(labels=[{"kind": "none"}], latest_only=True),
            "latest_labels_two": states(
                labels=[{"tenant": "t7", "kind": "remote"}], latest_only=True
            ),
            "by_labels_rare": by_rare,
            "since_time_labels": states(since_time=recent, labels=[{"kind": "remote"}]),
        }
        out: dict[str, float] = {"revisions": float(head)}
        for name, fn in queries.items():
            ms, cpu = await _time(fn, n, budget)
            out[f"{name}_median_ms"] = percentile(ms, 50)
            out[f"{name}_p99_ms"] = percentile(ms, 99)
            out[f"{name}_cpu_ms"] = cpu
            out[f"{name}_runs"] = float(len(ms))
        return out
    finally:
        await driver.close()


def measure(revisions: int, path: str | None = None) -> dict[str, float]:
    """Median and p99 milliseconds of each query on a store of ``revisions`` revisions.

    ``path``: a store file to reuse (built there first if it does not exist yet); without it
    the store is built in a temporary directory and deleted afterwards. Keys are
    ``<query>_median_ms``, ``<query>_p99_ms``, ``<query>_cpu_ms`` (process CPU per run) and
    ``<query>_runs`` for ``latest_labels``
    (latest_only + a rare label, limit 50), ``by_labels`` (get_state_by_labels on a unique
    label), ``since_time`` (limit 50, since 90 % into the log), ``labels`` (a rare label, limit
    50) and a few variants, plus ``revisions``.
    """
    n, budget = 200, 5.0
    if path is not None:
        return asyncio.run(_measure(revisions, path, n, budget))
    with tempfile.TemporaryDirectory(prefix="fs-bench-sqlq-") as tmpdir:
        return asyncio.run(_measure(revisions, os.path.join(tmpdir, "q.db"), n, budget))


def main(argv: list[str]) -> None:
    sizes = [int(a) for a in argv] or [10_000, 100_000, 1_000_000]
    cache = os.environ.get("FLOWSTATE_BENCH_SQLITE_CACHE")  # a directory to keep the stores in
    for revisions in sizes:
        path = os.path.join(cache, f"q{revisions}.db") if cache else None
        t0 = time.perf_counter()
        r = measure(revisions, path)
        print(f"{revisions:>9,} revisions ({time.perf_counter() - t0:.0f} s incl. build)")
        names = sorted({k.rsplit("_", 2)[0] for k in r if k.endswith("_median_ms")})
        for name in names:
            med, p99, cpu = r[f"{name}_median_ms"], r[f"{name}_p99_ms"], r[f"{name}_cpu_ms"]
            print(f"  {name:<22} median {med:9.3f} ms   p99 {p99:9.3f} ms   cpu {cpu:9.3f} ms")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
