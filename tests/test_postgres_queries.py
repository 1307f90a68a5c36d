"""Issue 13 (items 1 and 2) on PostgreSQL: how far a query looked (``scanned_rev``), and read
queries served by indexes whatever the size of the log.

The plan tests look at ``EXPLAIN`` of the exact SQL the driver sends, on a table of 100,000
revisions with statistics on every row: a legitimate non-timing check that nothing walks the
log (no ``Seq Scan``, no walk of the log's primary key filtered row by row). Speed itself is in
``benchmarks/pg_queries.py`` and docs/postgres.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

import flowstate as fs
from flowstate.drivers.postgres import PostgresDriver
from tests import pgutil

_COMMIT_ONE = "SELECT flowstate_commit_one($1, $2, $3, $4, $5, $6, $7)"


@pytest.fixture(autouse=True)
def _needs_postgres() -> None:
    pgutil.require()


@pytest.fixture
async def engine(dsn: str) -> AsyncIterator[fs.Engine]:
    async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as engine:
        yield engine


async def raw(schema: str) -> asyncpg.Connection:
    return await asyncpg.connect(pgutil.DSN, server_settings={"search_path": f'"{schema}"'})


def park_ctx(sid: str, **labels: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=sid, labels=dict(labels)))


async def query(engine: fs.Engine, cmd: fs.GetStatesCmd) -> fs.GetStatesResult:
    await engine.do(cmd)
    assert cmd.result is not None
    return cmd.result


# item 1: scanned_rev


async def test_a_query_matching_nothing_scanned_up_to_the_visible_head(engine: fs.Engine) -> None:
    for i in range(5):
        await engine.do(fs.commit(fs.park(park_ctx(f"s{i}", kind="a"))))
    head = await engine.driver.head_rev()
    assert head == 5
    for cmd in (
        fs.get_states({"kind": "never"}),
        fs.get_states({"kind": "never"}, latest_only=True),
        fs.get_states({"kind": "never"}, since_latest=True),
        fs.get_states(since_rev=3, labels={"kind": "never"}),
    ):
        result = await query(engine, cmd)
        assert (result.states, result.more) == ([], False)
        assert result.scanned_rev == head, cmd


async def test_a_full_page_reports_more_and_no_scanned_rev(engine: fs.Engine) -> None:
    for i in range(5):
        await engine.do(fs.commit(fs.park(park_ctx(f"s{i}", kind="a"))))
    result = await query(engine, fs.get_states({"kind": "a"}).with_limit(2))
    assert [s.rev for s in result.states] == [1, 2]
    assert result.more and result.scanned_rev == 0
    last = await query(engine, fs.get_states(since_rev=2, labels={"kind": "a"}))
    assert [s.rev for s in last.states] == [3, 4, 5]
    assert not last.more and last.scanned_rev == 5


async def test_scanned_rev_never_passes_an_in_flight_commit(dsn: str, schema: str) -> None:
    writer = PostgresDriver(dsn)
    reader = PostgresDriver(dsn)  # another process's driver: no own commit to wait for
    async with fs.Engine(writer, recovery=False, delayer=False) as eng:
        await eng.do(fs.commit(fs.park(park_ctx("before", kind="a"))))
        held = await raw(schema)
        try:
            await held.execute("BEGIN")
            in_flight = int(
                await held.fetchval(
                    _COMMIT_ONE, ["held"], [0], [0], ["{}"], ['{"kind":"a"}'], [""], ["{}"]
                )
            )
            await eng.do(fs.commit(fs.park(park_ctx("after", kind="a"))))
            async with fs.Engine(reader, recovery=False, delayer=False) as other:
                for cmd in (
                    fs.get_states({"kind": "never"}),
                    fs.get_states({"kind": "a"}),
                    fs.get_states({"kind": "a"}, latest_only=True),
                ):
                    result = await query(other, cmd)
                    assert not result.more
                    assert [s.id for s in result.states] in ([], ["before"])
                    assert result.scanned_rev == in_flight - 1, cmd
            await held.execute("COMMIT")
            async with fs.Engine(PostgresDriver(dsn), recovery=False, delayer=False) as other:
                result = await query(other, fs.get_states({"kind": "never"}))
                assert result.scanned_rev == in_flight + 1 == await other.driver.head_rev()
        finally:
            await held.close()
