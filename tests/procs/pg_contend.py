"""Child process: contended read-modify-commit loops on PostgreSQL.

Usage: pg_contend.py DSN WORKER SUCCESSES STATES
Prints one line "<id> <rev>" per successful commit, then "done <conflicts>".
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys

import flowstate as fs


async def main(dsn: str, worker: int, successes: int, states: int) -> None:
    rng = random.Random(worker)
    conflicts = 0
    out: list[str] = []
    async with fs.Engine(
        fs.PostgresDriver(dsn, max_size=4), recovery=False, delayer=False
    ) as engine:

        async def loop(lane: int, count: int) -> None:
            nonlocal conflicts
            done = 0
            while done < count:
                sid = f"s{rng.randrange(states)}"
                ctx = fs.StateCtx(current=fs.State(id=sid))
                with contextlib.suppress(fs.NotFoundError):
                    await engine.do(fs.get_state_by_id(ctx, sid))
                ctx.current.annotations["based_on"] = str(ctx.committed.rev)
                ctx.current.annotations["worker"] = f"{worker}.{lane}"
                try:
                    await engine.do(fs.commit(fs.park(ctx)))
                except fs.RevMismatchError:
                    conflicts += 1
                    continue
                out.append(f"{sid} {ctx.committed.rev}")
                done += 1

        lanes = 4
        await asyncio.gather(*(loop(i, successes // lanes) for i in range(lanes)))
    sys.stdout.write("\n".join(out) + f"\ndone {conflicts}\n")


if __name__ == "__main__":
    dsn, worker, successes, states = sys.argv[1], *map(int, sys.argv[2:5])
    asyncio.run(main(dsn, worker, successes, states))
