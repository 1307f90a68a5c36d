"""Walking the state log: an iterator to the head, then a watcher for what comes next.

Every commit appends versions to one log ordered by rev. The example commits 10 parked
states, walks the whole log with ``engine.iter`` (which pages through the store and stops at
the head), and then shows how to keep going: a watcher started at the iterator's position
delivers the next commit as it happens.

Run it with ``python examples/iterate.py [STORE_URL]``. Without a URL it uses a fresh SQLite
file in a temporary directory, deleted at the end. A given store must not hold the
``item-N`` states yet; on a store with other states the walk shows those too.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import flowstate as fs

ITEMS = 10


@contextlib.contextmanager
def store(url: str | None) -> Iterator[str]:
    """The given store URL, or a fresh SQLite file in a temporary directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="flowstate-") as tmp:
        yield "sqlite:///" + (Path(tmp) / "iterate.db").as_posix()


def describe(state: fs.State) -> str:
    at = state.committed_at.isoformat(timespec="milliseconds") if state.committed_at else "-"
    return f"  rev {state.rev:<3} {state.id:<8} committed {at}"


async def main(store_url: str | None = None) -> list[fs.State]:
    """Return every version seen: the walk to the head, then the one the watcher caught."""
    seen: list[fs.State] = []
    with store(store_url) as url:
        print(f"store: {url}")
        async with fs.Engine(fs.open_driver(url)) as engine:
            for i in range(ITEMS):
                item = fs.StateCtx(current=fs.State(id=f"item-{i}", labels={"kind": "item"}))
                await engine.do(fs.commit(fs.park(item)))
            print(f"committed {ITEMS} parked states")

            # No labels: the whole log. A small page size only shows that paging is the
            # iterator's business; the loop sees one uninterrupted sequence either way.
            print("walking the log to the head:")
            walk = engine.iter(fs.get_states(limit=4))
            async for state in walk:
                if fs.is_system(state.id):  # the engine's own bookkeeping states
                    continue
                print(describe(state))
                seen.append(state)

            # The iterator's cursor is the last rev it returned, so a watcher started there
            # misses nothing and repeats nothing.
            print(f"at the head (rev {walk.since_rev}); watching for the next commit:")
            async with engine.watch(fs.get_states(since_rev=walk.since_rev)) as watcher:
                # Someone else commits while we wait (here: a task of our own).
                late = fs.StateCtx(current=fs.State(id="late", labels={"kind": "item"}))
                writer = asyncio.create_task(engine.do(fs.commit(fs.park(late))))
                async for state in watcher:
                    if fs.is_system(state.id):
                        continue
                    print(describe(state))
                    seen.append(state)
                    break
                await writer
    print(f"saw {len(seen)} versions, revs {seen[0].rev}..{seen[-1].rev}, in commit order")
    return seen


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
