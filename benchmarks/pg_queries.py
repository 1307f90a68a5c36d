"""Issue 13 item 2: PostgreSQL read queries on a long-lived store.

    python -m benchmarks.pg_queries [--dsn DSN] [--sizes 10000,100000,1000000] [--json OUT]
    python -m benchmarks.pg_queries --explain 1000000     # the plans in docs/postgres.md

``measure(revisions)`` fills a fresh schema with ``revisions`` revisions, written by bulk SQL
that stores exactly what the driver's commit functions store (``flowstate_states`` rows, each
state's latest row in ``flowstate_latest``, the rev sequence), runs ``ANALYZE``, then times
queries through the public driver API (``PostgresDriver.get_states`` / ``get_state_by_labels``:
the read horizon round trip included) and drops the schema.

The store: ``revisions // 5`` state ids with 5 versions each, spread over the log in a
pseudo-random order; labels ``tenant`` (1,000 values: one matches 0.1 % of the states),
``kind`` (7 values: 14 %) and ``step`` (3 values, changing with every version); ``committed_at``
rises 10 ms per rev with up to 50 ms of jitter (several processes' clocks).

Timed queries (each cycles through label values that match rarely and often, or through
times near the start, the middle and the end of the log), in ms:

* ``latest_labels``: ``get_states(labels, latest_only=True, limit=50)`` from rev 0;
* ``state_by_labels``: ``get_state_by_labels(labels)``;
* ``since_time``: ``get_states(since_time=t, limit=50)``;
* ``labels``: ``get_states(labels, limit=50)`` from rev 0.

Each gives ``<name>_p50_ms`` and ``<name>_p99_ms``; ``build_s`` is how long filling took.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import flowstate as fs
from benchmarks.common import PG_DSN, percentile
from flowstate.clock import from_millis
from flowstate.drivers.postgres import PostgresDriver

#: versions per state id
VERSIONS = 5
#: ms between two revs' committed_at
STEP_MS = 10
#: how many times each query runs (after one warm-up round)
ROUNDS = 60

_counter = iter(range(1_000_000))


def _with_schema(dsn: str, schema: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"


async def build(dsn: str, schema: str, revisions: int) -> tuple[int, float]:
    """Create the store (the driver applies its migrations) and fill it; (base ms, seconds)."""
    driver = PostgresDriver(_with_schema(dsn, schema))
    await driver.open()
    await driver.close()
    ids = max(1, revisions // VERSIONS)
    base = int(time.time() * 1000) - revisions * STEP_MS - 60_000
    started = time.perf_counter()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})
    try:
        # state number of rev g: a permutation of the revs (the multiplier is coprime with
        # 2 and 5), folded onto the ids, so each id gets VERSIONS revs spread over the log
        await conn.execute(
            f"""
            INSERT INTO flowstate_states
                (rev, id, committed_at, annotations, labels, transition_to,
                 transition_annotations)
            SELECT g, 'state-' || n, {base} + g * {STEP_MS} + (g * 7919) % 50,
                   jsonb_build_object('flowstate.bench', 'v' || g),
                   jsonb_build_object('tenant', 't' || (n % 1000), 'kind', 'k' || (n % 7),
                                      'step', 's' || (g % 3)),
                   CASE WHEN g % 4 = 0 THEN '' ELSE 'flow-a' END, '{{}}'
            FROM (SELECT g, ((g::numeric * 2654435761) % {revisions})::bigint % {ids} AS n
                  FROM generate_series(1::bigint, {revisions}) AS g) AS t
            """
        )
        has_labels = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = $1 "
            "AND table_name = 'flowstate_latest' AND column_name = 'labels'",
            schema,
        )
        await conn.execute(_LATEST_FILL if has_labels else _LATEST_FILL_5)
        await conn.execute(f"SELECT setval('flowstate_rev_seq', {revisions})")
        # what autovacuum does to a long-lived store: hint bits set, visibility map, statistics
        await conn.execute("VACUUM (ANALYZE) flowstate_states")
        await conn.execute("VACUUM (ANALYZE) flowstate_latest")
    finally:
        await conn.close()
    return base, time.perf_counter() - started


#: each state's latest row, as the commit functions keep it
_LATEST_FILL = """
INSERT INTO flowstate_latest (id, rev, labels, labels_rev)
SELECT DISTINCT ON (id) id, rev, labels, rev FROM flowstate_states ORDER BY id, rev DESC
"""


#: the same before schema version 6 (to measure earlier releases)
_LATEST_FILL_5 = """
INSERT INTO flowstate_latest (id, rev)
SELECT DISTINCT ON (id) id, rev FROM flowstate_states ORDER BY id, rev DESC
"""


async def drop(dsn: str, schema: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def _time(fn: Callable[[int], Awaitable[Any]], rounds: int) -> list[float]:
    for i in range(min(rounds, 10)):  # warm-up: plans cached, pages in memory
        await fn(i)
    out = []
    for i in range(rounds):
        t = time.perf_counter()
        await fn(i)
        out.append((time.perf_counter() - t) * 1000)
    return out


def _labels(i: int) -> dict[str, str]:
    """Rare and frequent label sets in turn: one tenant (0.1 % of the states), one kind (14 %),
    a kind with a changing step, a tenant with a kind."""
    r = i // 4
    return [
        {"tenant": f"t{r * 37 % 1000}"},
        {"kind": f"k{r % 7}"},
        {"kind": f"k{r % 7}", "step": f"s{r % 3}"},
        {"tenant": f"t{r * 37 % 1000}", "kind": f"k{(r * 37 % 1000) % 7}"},
    ][i % 4]


async def queries(
    driver: PostgresDriver, revisions: int, base: int, rounds: int = ROUNDS
) -> dict[str, list[float]]:
    """Time the four queries on an open driver; ms per call."""
    span = revisions * STEP_MS
    fractions = [0.0, 0.5, 0.9, 0.999]

    async def latest_labels(i: int) -> None:
        await driver.get_states(fs.GetStatesCmd(labels=[_labels(i)], latest_only=True))

    async def state_by_labels(i: int) -> None:
        with contextlib.suppress(fs.NotFoundError):
            await driver.get_state_by_labels(_labels(i))

    async def since_time(i: int) -> None:
        at = base + int(span * fractions[i % len(fractions)])
        when = from_millis(at)
        await driver.get_states(fs.GetStatesCmd(since_time=when))

    async def labels(i: int) -> None:
        await driver.get_states(fs.GetStatesCmd(labels=[_labels(i)]))

    out = {}
    for name, fn in (
        ("latest_labels", latest_labels),
        ("state_by_labels", state_by_labels),
        ("since_time", since_time),
        ("labels", labels),
    ):
        out[name] = await _time(fn, rounds)
    return out


def summarize(times: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, ms in times.items():
        out[f"{name}_p50_ms"] = round(statistics.median(ms), 3)
        out[f"{name}_p99_ms"] = round(percentile(sorted(ms), 99), 3)
    return out


async def measure(revisions: int, dsn: str | None = None) -> dict[str, float]:
    """Median and p99 ms of the four queries on a fresh store of ``revisions`` revisions."""
    dsn = dsn or PG_DSN
    schema = f"bench_pgq_{os.getpid()}_{next(_counter)}"
    try:
        base, build_s = await build(dsn, schema, revisions)
        driver = PostgresDriver(_with_schema(dsn, schema), min_size=1, max_size=2)
        await driver.open()
        try:
            out = summarize(await queries(driver, revisions, base))
        finally:
            await driver.close()
    finally:
        await drop(dsn, schema)
    out["revisions"] = float(revisions)
    out["build_s"] = round(build_s, 1)
    return out


async def explain(revisions: int, dsn: str | None = None) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the SQL the driver sends for each timed query (a rare
    and a frequent label set each), on a fresh store of ``revisions`` revisions."""
    from flowstate.drivers import postgres

    dsn = dsn or PG_DSN
    schema = f"bench_pgq_{os.getpid()}_{next(_counter)}"
    out = []
    try:
        base, _ = await build(dsn, schema, revisions)
        driver = PostgresDriver(_with_schema(dsn, schema))
        await driver.open()  # writes the time marks on the first since_time query
        await driver.get_states(fs.GetStatesCmd(since_time=from_millis(base)))
        await driver.close()
        # as flowstate_query_states runs them: no parallel workers
        settings = {"search_path": f'"{schema}"', "max_parallel_workers_per_gather": "0"}
        conn = await asyncpg.connect(dsn, server_settings=settings)
        try:
            bound = await conn.fetchval("SELECT bound FROM flowstate_rev_bound()")
            middle = from_millis(base + revisions * STEP_MS // 2)
            recent = from_millis(base + int(revisions * STEP_MS * 0.999))
            cases: list[tuple[str, str, list[Any]]] = []
            for labels in ({"tenant": "t7"}, {"kind": "k3"}):
                cmd = fs.GetStatesCmd(labels=[labels], latest_only=True)
                cases.append((f"latest_only {labels}", *postgres.states_query(cmd, bound)))
            for labels in ({"tenant": "t7"}, {"kind": "k3", "step": "s1"}):
                sql = postgres.STATE_BY_LABELS_SQL.replace("($2::jsonb[])[1]", "$1::jsonb")
                cases.append((f"get_state_by_labels {labels}", sql, [json.dumps(labels)]))
            for name, at in (("middle", middle), ("recent", recent)):
                cmd = fs.GetStatesCmd(since_time=at)
                cases.append(
                    (f"since_time ({name} of the log)", *postgres.states_query(cmd, bound))
                )
            for labels in ({"tenant": "t7"}, {"kind": "k3"}):
                cmd = fs.GetStatesCmd(labels=[labels])
                cases.append((f"labels {labels}", *postgres.states_query(cmd, bound)))
            for title, sql, args in cases:
                for _ in range(2):  # the second run: pages cached, as in the timed loop
                    rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql, *args)
                out.append(f"-- {title}\n{sql}\n\n" + "\n".join(r[0] for r in rows) + "\n")
        finally:
            await conn.close()
    finally:
        await drop(dsn, schema)
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=PG_DSN)
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--explain", type=int, metavar="N", help="print plans at N revisions")
    args = parser.parse_args()
    if args.explain:
        print(asyncio.run(explain(args.explain, args.dsn)))
        return
    results = []
    names = ("latest_labels", "state_by_labels", "since_time", "labels")
    print(f"{'revisions':>10}  " + "  ".join(f"{n + ' p50/p99 ms':>28}" for n in names))
    for size in (int(s) for s in args.sizes.split(",")):
        r = asyncio.run(measure(size, args.dsn))
        results.append(r)
        cells = [f"{r[n + '_p50_ms']:>12.2f} / {r[n + '_p99_ms']:<12.2f}" for n in names]
        print(f"{size:>10,}  " + "  ".join(f"{c:>28}" for c in cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
