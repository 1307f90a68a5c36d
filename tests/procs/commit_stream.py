"""Child process of test_sqlite_durability: commit states to a SQLite file until killed.

Usage: commit_stream.py PATH SYNCHRONOUS WRITERS

WRITERS concurrent tasks share one engine (so the driver groups their commits). Writer ``w`` owns
the ids ``w<w>-0`` .. ``w<w>-2`` and commits a random non-empty subset of them at a time. Every
version carries the annotation ``n`` = the number of versions of its id committed before it.
After each commit returned, one line ``<id> <rev>`` per committed state is printed and flushed.
"""

from __future__ import annotations

import asyncio
import random
import sys

import flowstate as fs

IDS_PER_WRITER = 3


async def writer(engine: fs.Engine, w: int) -> None:
    rng = random.Random(w)
    ctxs = {
        f"w{w}-{i}": fs.StateCtx(current=fs.State(id=f"w{w}-{i}")) for i in range(IDS_PER_WRITER)
    }
    counts = dict.fromkeys(ctxs, 0)
    while True:
        ids = rng.sample(sorted(ctxs), rng.randint(1, IDS_PER_WRITER))
        cmds: list[fs.Command] = []
        for sid in ids:
            ctx = ctxs[sid]
            ctx.current.annotations["n"] = str(counts[sid])
            ctx.current.labels["writer"] = str(w)
            cmds.append(fs.park(ctx) if rng.random() < 0.5 else fs.transit(ctx, "somewhere"))
        await engine.do(fs.commit(*cmds))
        for sid in ids:
            counts[sid] += 1
        sys.stdout.write("".join(f"{sid} {ctxs[sid].committed.rev}\n" for sid in ids))
        sys.stdout.flush()


async def main() -> None:
    path, synchronous, writers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    driver = fs.SqliteDriver(path, synchronous=synchronous)  # type: ignore[arg-type]
    async with fs.Engine(driver, fs.FlowRegistry(), recovery=False, delayer=False) as engine:
        await asyncio.gather(*(writer(engine, w) for w in range(writers)))


if __name__ == "__main__":
    asyncio.run(main())
