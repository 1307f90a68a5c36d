"""Child process: commit one parked state with a label on PostgreSQL, then exit.

Usage: pg_commit_one.py DSN STATE_ID LABEL_KEY LABEL_VALUE
"""

from __future__ import annotations

import asyncio
import sys

import flowstate as fs


async def main(dsn: str, sid: str, key: str, value: str) -> None:
    async with fs.Engine(fs.PostgresDriver(dsn)) as engine:
        ctx = fs.StateCtx(current=fs.State(id=sid, labels={key: value}))
        await engine.do(fs.commit(fs.park(ctx)))
        print(ctx.committed.rev)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
