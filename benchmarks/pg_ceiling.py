"""Where PostgreSQL commit time goes, measured on the server side with pgbench (no Python).

    .venv/bin/python -m benchmarks.pg_ceiling [--seconds 3] [--clients 1,4,16]

Creates a flowstate schema with the real driver, then runs, through ``pgbench -M prepared``,
the commit of one state in four shapes:

* ``one-statement``: UPDATE latest + INSERT the log row in one autocommit statement (the raw
  limit of the benchmark table, on flowstate's own tables);
* ``commit-fn``: ``flowstate_commit(...)`` alone, autocommit (rev check, latest, log row,
  NOTIFY), revs from the sequence without the advisory lock;
* ``driver``: what the driver sends: BEGIN; ``flowstate_alloc_revs(1)``;
  ``flowstate_commit(...)``; COMMIT;
* ``driver-no-notify``: the same with a copy of ``flowstate_commit`` that does not NOTIFY.

Needs ``pgbench`` on PATH and the server of ``FLOWSTATE_BENCH_PG_DSN``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import tempfile
from urllib.parse import urlsplit

import asyncpg

import flowstate as fs
from benchmarks.common import PG_DSN, pg_drop_schema

SCHEMA = "bench_pg_ceiling"
IDS = 32

_ARGS = (
    "ARRAY[(SELECT rev FROM flowstate_latest WHERE id = 'c' || :client_id)], "
    "ARRAY[{rev}]::bigint[], ARRAY[1700000000000]::bigint[], ARRAY['{{}}']::jsonb[], "
    "ARRAY['{{}}']::jsonb[], ARRAY['']::text[], ARRAY['{{}}']::jsonb[], 'flowstate_ceiling'"
)
SCRIPTS = {
    "one-statement": (
        "WITH u AS (UPDATE flowstate_latest SET rev = nextval('flowstate_rev_seq') "
        "WHERE id = 'c' || :client_id RETURNING id, rev)\n"
        "INSERT INTO flowstate_states (rev, id, committed_at, annotations, labels, "
        "transition_to, transition_annotations)\n"
        "SELECT u.rev, u.id, 1700000000000, '{}', '{}', '', '{}' FROM u;\n"
    ),
    "commit-fn": "SELECT flowstate_commit(ARRAY['c' || :client_id], "
    + _ARGS.format(rev="nextval('flowstate_rev_seq')")
    + ");\n",
    "driver": "BEGIN;\nSELECT flowstate_alloc_revs(1) AS r \\gset\n"
    "SELECT flowstate_commit(ARRAY['c' || :client_id], " + _ARGS.format(rev=":r") + ");\nCOMMIT;\n",
    "driver-no-notify": "BEGIN;\nSELECT flowstate_alloc_revs(1) AS r \\gset\n"
    "SELECT bench_commit_no_notify(ARRAY['c' || :client_id], "
    + _ARGS.format(rev=":r")
    + ");\nCOMMIT;\n",
}


async def _prepare() -> None:
    await pg_drop_schema(SCHEMA)
    async with fs.Engine(fs.PostgresDriver(PG_DSN, schema=SCHEMA), recovery=False, delayer=False):
        pass  # applies the migrations
    conn = await asyncpg.connect(PG_DSN, server_settings={"search_path": SCHEMA})
    try:
        for i in range(IDS + 1):
            await conn.execute("INSERT INTO flowstate_latest (id, rev) VALUES ($1, 0)", f"c{i}")
        src = await conn.fetchval("SELECT pg_get_functiondef('flowstate_commit'::regproc)")
        copy = re.sub(r"PERFORM pg_notify\([^;]*\);", "", src)
        await conn.execute(copy.replace(f"{SCHEMA}.flowstate_commit", "bench_commit_no_notify"))
    finally:
        await conn.close()


def _pgbench(script: str, clients: int, seconds: float) -> float:
    url = urlsplit(PG_DSN)
    env = dict(os.environ, PGOPTIONS=f"-c search_path={SCHEMA}")
    with tempfile.NamedTemporaryFile("w", suffix=".sql") as f:
        f.write(script)
        f.flush()
        cmd = ["pgbench", "-n", "-M", "prepared", "-f", f.name, "-c", str(clients)]
        cmd += ["-j", str(min(clients, 2)), "-T", str(int(seconds))]
        cmd += ["-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432)]
        cmd += ["-U", url.username or "postgres", (url.path or "/postgres").lstrip("/")]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"tps = ([0-9.]+)", out)
    return float(m.group(1)) if m else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pg_ceiling", description=__doc__)
    ap.add_argument("--seconds", type=float, default=3)
    ap.add_argument("--clients", default="1,4,16")
    args = ap.parse_args()
    if shutil.which("pgbench") is None:
        print("pgbench not found")
        return 1
    clients = [int(c) for c in args.clients.split(",")]
    asyncio.run(_prepare())
    try:
        print(f"{'commit shape':<18}" + "".join(f"{f'c={c}':>10}" for c in clients))
        for name, script in SCRIPTS.items():
            tps = [_pgbench(script, c, args.seconds) for c in clients]
            print(f"{name:<18}" + "".join(f"{t:>10,.0f}" for t in tps), flush=True)
    finally:
        asyncio.run(pg_drop_schema(SCHEMA))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
