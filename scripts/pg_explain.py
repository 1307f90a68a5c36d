"""Print the PostgreSQL plans of flowstate's queries on a table of 1M revisions.

Usage: python scripts/pg_explain.py [DSN]   (default: the local test database)
Builds the schema ``flowstate_explain`` (dropped at the end), fills it with 1,000,000
revisions of 50,000 states with labels ``tenant`` (1,000 values) and ``kind`` (7 values),
and prints EXPLAIN (ANALYZE) of the exact SQL the driver runs. The output is in docs/postgres.md.
"""

from __future__ import annotations

import asyncio
import sys

import asyncpg

import flowstate as fs
from flowstate.drivers.postgres import PostgresDriver, states_query

SCHEMA = "flowstate_explain"
FILL = """
INSERT INTO flowstate_states
    (rev, id, committed_at, annotations, labels, transition_to, transition_annotations)
SELECT g, 'state' || (g % 50000), 1700000000000 + g, '{}',
       jsonb_build_object('tenant', 't' || (g % 1000), 'kind', 'k' || (g % 7)), '', '{}'
FROM generate_series(1, 1000000) g;
INSERT INTO flowstate_latest (id, rev) SELECT id, max(rev) FROM flowstate_states GROUP BY id;
SELECT setval('flowstate_rev_seq', 1000000);
ANALYZE;
"""

QUERIES = [
    ("labels {tenant: t7}, first page", fs.get_states({"tenant": "t7"})),
    ("labels {tenant: t7} since rev 900000", fs.get_states({"tenant": "t7"}, since_rev=900_000)),
    (
        "labels {tenant: t7} OR {kind: k3}",
        fs.get_states({"tenant": "t7"}, or_labels=[{"kind": "k3"}]),
    ),
    ("since rev 999000", fs.get_states(since_rev=999_000)),
    ("since rev 990000, latest only", fs.get_states(since_rev=990_000, latest_only=True)),
    ("labels {tenant: t7}, since latest", fs.get_states({"tenant": "t7"}, since_latest=True)),
]


async def main(dsn: str) -> None:
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    driver = PostgresDriver(dsn, schema=SCHEMA)
    await driver.open()
    await driver.close()
    conn = await asyncpg.connect(dsn, server_settings={"search_path": SCHEMA})
    try:
        await conn.execute(FILL)
        for title, cmd in QUERIES:
            sql, args = states_query(cmd)
            plan = await conn.fetch("EXPLAIN (ANALYZE, COSTS OFF) " + sql, *args)
            print(f"-- {title}\n{sql}\n")
            print("\n".join(r[0] for r in plan) + "\n")
    finally:
        await conn.close()
        await admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "postgresql://postgres@127.0.0.1/test"))
