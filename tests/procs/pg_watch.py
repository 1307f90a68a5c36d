"""Child process: watch a PostgreSQL store for states with one label and print them.

Usage: pg_watch.py DSN LABEL_KEY LABEL_VALUE COUNT
Prints "ready" once its watcher is open, then "<id> <rev>" per delivered state; exits after
COUNT states.
"""

from __future__ import annotations

import asyncio
import sys

import flowstate as fs


async def main(dsn: str, key: str, value: str, count: int) -> None:
    engine = fs.Engine(fs.PostgresDriver(dsn), recovery=False, delayer=False)
    async with engine, engine.watch(fs.get_states({key: value})) as watcher:
        print("ready", flush=True)
        seen = 0
        async for state in watcher:
            print(state.id, state.rev, flush=True)
            seen += 1
            if seen == count:
                break


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
