"""PostgreSQL plans that do not go stale as a young store grows (issue 13, the slow fill).

PostgreSQL keeps a generic plan per connection for each prepared statement (the driver's
queries) and each PL/pgSQL statement (the commit functions), made from the statistics of the
moment it was chosen. A driver opened on an empty store used to keep sequential scans of
``flowstate_latest`` and ``flowstate_states`` until an ANALYZE replaced them, so a commit of
1,000 new states read the whole of ``flowstate_latest`` 1,000 times. Not a timing test: the
server's own count of rows read by sequential scans says whether anything walked the tables.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import flowstate as fs
from flowstate.drivers.postgres import PostgresDriver
from tests import pgutil


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    pgutil.require()


def _parks(start: int, end: int) -> fs.CommitCmd:
    return fs.commit(
        *(
            fs.park(fs.StateCtx(current=fs.State(id=f"s-{i}", labels={"g": str(i % 10)})))
            for i in range(start, end)
        )
    )


async def _rows_read_by_scans(schema: str) -> dict[str, int]:
    """``seq_tup_read`` of the store's two tables, once every backend of the schema is gone
    (a backend reports its counters when it exits)."""
    conn = await asyncpg.connect(pgutil.DSN)
    try:
        app = f"flowstate:{schema}"
        for _ in range(600):
            left = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the driver's connections did not end")
        for _ in range(100):
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            rows = await conn.fetch(
                "SELECT relname, seq_tup_read FROM pg_stat_user_tables WHERE schemaname = $1"
                " AND relname IN ('flowstate_latest', 'flowstate_states')",
                schema,
            )
            if len(rows) == 2:
                return {r["relname"]: int(r["seq_tup_read"]) for r in rows}
            await asyncio.sleep(0.05)
        raise AssertionError(f"no statistics for the tables of {schema}")
    finally:
        await conn.close()


async def test_a_store_filled_from_empty_is_never_walked(dsn: str, schema: str) -> None:
    driver = PostgresDriver(dsn)
    await driver.open()
    try:
        # plans are made and kept while the tables are empty: single commits and reads, more
        # than the five custom plans after which PostgreSQL settles on a generic one
        await driver.commit(_parks(0, 1))
        for i in range(1, 12):
            await driver.commit(_parks(i, i + 1))
            await driver.get_state(f"s-{i}", 0)
        for start in range(100, 8100, 1000):  # the store grows to 8,000 states
            await driver.commit(_parks(start, start + 1000))
        for i in range(100, 120):
            await driver.get_state(f"s-{i}", 0)
        await driver.commit(_parks(20_000, 20_001))
    finally:
        await driver.close()
    read = await _rows_read_by_scans(schema)
    # each commit of 1,000 states used to read flowstate_latest 1,000 times (over 10M rows
    # in all here); an index lookup reads none
    assert read["flowstate_latest"] < 1000, read
    assert read["flowstate_states"] < 1000, read


async def test_no_statement_of_the_driver_pays_for_jit(dsn: str, schema: str) -> None:
    """Penalized sequential scans cost 10^10 in the planner's units, far past jit_above_cost:
    the scans that remain (the rev and offset sequences, small catalogs) were JIT-compiled,
    15 ms a statement (a delay took 26 ms instead of 1.8). The driver's sessions turn JIT off,
    and so do the commit functions, for processes of earlier releases that call them."""
    driver = PostgresDriver(dsn)
    await driver.open()
    try:
        pool = driver._need_pool()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW jit") == "off"
            assert await conn.fetchval("SHOW enable_seqscan") == "off"
    finally:
        await driver.close()
    conn = await asyncpg.connect(pgutil.DSN)
    try:
        rows = await conn.fetch(
            "SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_namespace n"
            " ON n.oid = p.pronamespace WHERE n.nspname = $1"
            " AND p.proname IN ('flowstate_commit_one', 'flowstate_store_versions')",
            schema,
        )
    finally:
        await conn.close()
    assert len(rows) == 2
    for row in rows:
        assert {"enable_seqscan=off", "jit=off"} <= set(row["proconfig"] or ()), row
