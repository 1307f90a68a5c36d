"""Child process: flowstate commits that stall in flight for a random while, then commit or
roll back, next to ordinary engine commits.

Usage: pg_stalling_commits.py DSN WORKER COMMITS
Each stalling commit runs flowstate's own commit function inside an explicit transaction
(exactly what the driver's one-statement commit runs), holds it open for 0-30 ms, and commits
(4 in 5) or rolls back. Prints "<rev>" per commit that landed, then "done".
"""

from __future__ import annotations

import asyncio
import json
import random
import sys

import asyncpg

import flowstate as fs
from flowstate.drivers.postgres import split_dsn

_COMMIT = "SELECT flowstate_commit_one($1, $2, $3, $4, $5, $6, $7)"


async def stalling(dsn: str, worker: int, commits: int, out: list[int]) -> None:
    base, schema = split_dsn(dsn)
    rng = random.Random(worker)
    conn = await asyncpg.connect(base, server_settings={"search_path": f'"{schema}"'})
    try:
        for i in range(commits):
            tx = conn.transaction()
            await tx.start()
            try:
                labels = json.dumps({"gap": "test"})
                rev = await conn.fetchval(
                    _COMMIT, [f"w{worker}-{i}"], [0], [0], ["{}"], [labels], [""], ["{}"]
                )
                await asyncio.sleep(rng.random() * 0.03)  # the stall under test
                if rng.random() < 0.8:
                    await tx.commit()
                    out.append(int(rev))
                else:
                    await tx.rollback()
            except BaseException:
                await tx.rollback()
                raise
    finally:
        await conn.close()


async def ordinary(dsn: str, worker: int, commits: int, out: list[int]) -> None:
    async with fs.Engine(fs.PostgresDriver(dsn, max_size=2), recovery=False, delayer=False) as e:
        for i in range(commits):
            ctx = fs.StateCtx(current=fs.State(id=f"e{worker}-{i}", labels={"gap": "test"}))
            await e.do(fs.commit(fs.park(ctx)))
            out.append(ctx.committed.rev)


async def main(dsn: str, worker: int, commits: int) -> None:
    out: list[int] = []
    await asyncio.gather(stalling(dsn, worker, commits, out), ordinary(dsn, worker, commits, out))
    sys.stdout.write("".join(f"{r}\n" for r in out) + "done\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
