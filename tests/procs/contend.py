"""Child process of test_sqlite_shared: contended read-modify-commit loops on a shared file.

Usage: contend.py PATH NAME --ids a,b,c [--engines 2] [--tasks 2] [--successes 8] [--wait-go]

Each of ENGINES engines (one SqliteDriver each, on the same file) runs TASKS tasks; each task
reads a random subset of the ids, annotates every state with ``based_on`` (the rev it read, 0
for a new state) and ``writer``, and commits them in one commit, retrying on RevMismatchError
until it has SUCCESSES successful commits. With --wait-go the process prints ``ready`` once its
engines are open and waits for a line on stdin before starting. At the end it prints one JSON
line: ``{"versions": [[id, rev, based_on], ...], "conflicts": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys

import flowstate as fs


async def task(
    engine: fs.Engine, name: str, ids: list[str], successes: int, rng: random.Random
) -> tuple[list[list[object]], int]:
    versions: list[list[object]] = []
    conflicts = 0
    done = 0
    while done < successes:
        chosen = rng.sample(ids, rng.randint(1, len(ids)))
        ctxs = []
        for sid in chosen:
            ctx = fs.StateCtx()
            try:
                await engine.do(fs.get_state_by_id(ctx, sid))
            except fs.NotFoundError:
                ctx = fs.StateCtx(current=fs.State(id=sid))
            ctx.current.annotations["based_on"] = str(ctx.committed.rev)
            ctx.current.annotations["writer"] = name
            ctxs.append(ctx)
            if rng.random() < 0.5:
                await asyncio.sleep(0)
        try:
            await engine.do(fs.commit(*(fs.park(c) for c in ctxs)))
        except fs.RevMismatchError as exc:
            assert exc.ids and set(exc.ids) <= set(chosen), exc.ids
            conflicts += 1
            continue
        done += 1
        versions += [
            [c.current.id, c.committed.rev, c.current.annotations["based_on"]] for c in ctxs
        ]
    return versions, conflicts


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("name")
    parser.add_argument("--ids", required=True)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--successes", type=int, default=8)
    parser.add_argument("--wait-go", action="store_true")
    args = parser.parse_args()
    ids = args.ids.split(",")

    engines = [
        fs.Engine(fs.SqliteDriver(args.path), fs.FlowRegistry(), recovery=False, delayer=False)
        for _ in range(args.engines)
    ]
    for engine in engines:
        await engine.start()
    try:
        if args.wait_go:
            print("ready", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        names = [
            (engine, f"{args.name}/{e}/{t}")
            for e, engine in enumerate(engines)
            for t in range(args.tasks)
        ]
        runs = [task(engine, n, ids, args.successes, random.Random(n)) for engine, n in names]
        results = await asyncio.gather(*runs)
    finally:
        for engine in engines:
            await engine.shutdown()
    out = {
        "versions": [v for versions, _ in results for v in versions],
        "conflicts": sum(c for _, c in results),
    }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
