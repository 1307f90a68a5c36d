"""The peer: a DBOS durable workflow of 3 steps, same N and concurrency as our 3-step flow.

DBOS is a process-wide singleton, so each store runs in its own child process. On PostgreSQL it
keeps its system tables in a dedicated schema of the same database (``dbos_system_schema``),
dropped afterwards; on SQLite it uses a fresh file (DBOS sets no journal mode or synchronous
pragma there, so that is SQLite's default rollback journal with synchronous=FULL).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import tempfile
import time
from typing import Any

from benchmarks.common import PG_DSN, pg_drop_schema


def available() -> str | None:
    """None when ``dbos`` is importable, else the reason it is skipped."""
    if importlib.util.find_spec("dbos") is None:
        return "dbos not installed (pip install 'flowstate-engine[bench]')"
    return None


async def dbos_flows(params: dict[str, Any]) -> dict[str, Any]:
    from dbos import DBOS, DBOSConfig

    store, n = params["store"], params["n"]
    schema = f"{params['schema_prefix']}dbos"
    with tempfile.TemporaryDirectory(prefix="fs-bench-dbos-") as tmpdir:
        if store == "postgres":
            await pg_drop_schema(schema)
            url = PG_DSN
        else:
            url = "sqlite:///" + os.path.join(tmpdir, "dbos.sqlite")
        config: DBOSConfig = {
            "name": "flowstate-bench",
            "system_database_url": url,
            "log_level": "WARNING",
            "dbos_system_schema": schema,
        }
        DBOS(config=config)

        @DBOS.step()
        async def step(i: int) -> int:
            return i + 1

        @DBOS.workflow()
        async def three_steps(i: int) -> int:
            i = await step(i)
            i = await step(i)
            return await step(i)

        out: dict[str, Any] = {"by_conc": {}, "n": n, "version": _version()}
        DBOS.launch()
        logging.getLogger("dbos").setLevel(logging.WARNING)
        try:
            for conc in params["concs"]:

                async def run(base: int, count: int, conc: int = conc) -> float:
                    ids = iter(range(base, base + count))
                    results: list[int] = []

                    async def worker() -> None:
                        for i in ids:
                            results.append(await three_steps(i))

                    t0 = time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(conc)))
                    dt = time.perf_counter() - t0
                    if len(results) != count:
                        raise RuntimeError("dbos: not every workflow finished")
                    return dt

                await run(10_000_000 * conc, max(conc, n // 20))
                dt = await run(20_000_000 * conc, n)
                out["by_conc"][str(conc)] = {
                    "seconds": dt,
                    "flows_per_s": n / dt,
                    "steps_per_s": 3 * n / dt,
                }
        finally:
            DBOS.destroy()
            if store == "postgres":
                await pg_drop_schema(schema)
    return out


def _version() -> str:
    from importlib.metadata import version

    try:
        return version("dbos")
    except Exception:
        return "?"
