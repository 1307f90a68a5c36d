"""The quick-start demo: two flows on the embedded SQLite store, then the state log.

The state ``aTID`` goes to flow ``first``, which moves it on to ``second``, which stores a
small result payload and ends it. Every move is committed, so the store ends up holding one
revision per step, and the demo prints them.

Run it with ``python examples/demo.py [STORE_URL]``. The default store is the file
``flowstate-demo.db`` in the current directory; the demo deletes and recreates that file at
start so every run begins from an empty log. Any other URL (``memory://``,
``sqlite:////abs/path.db``) is used as given and must not hold ``aTID`` yet.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import flowstate as fs

DEMO_FILE = "flowstate-demo.db"

registry = fs.FlowRegistry()


@registry.flow("first")
async def first(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    print(f"  flow first : {ctx.current.id} (rev {ctx.current.rev}) moves on to second")
    # Committing the transit (rather than returning a bare transit) records the step in
    # the log: if the process died right after, the state would say it is owed `second`.
    return fs.commit(fs.transit(ctx, "second"))


@registry.flow("second")
async def second(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    print(f"  flow second: {ctx.current.id} (rev {ctx.current.rev}) stores its result and ends")
    # Payloads live beside the state, not in it: store_data writes the blob and leaves only
    # a reference (`flowstate.data.result`) on the state, which the commit below makes durable.
    ctx.datas["result"] = fs.Data(blob=b"hello from flow second")
    await engine.do(fs.store_data(ctx, "result"))
    return fs.commit(fs.end(ctx))


def default_store() -> str:
    """``flowstate-demo.db`` in the current directory, emptied so reruns start clean."""
    path = Path.cwd() / DEMO_FILE
    # WAL mode may leave the -wal/-shm companions behind after a crash; they belong to the
    # old log and would resurrect it.
    for leftover in (path, path.with_name(DEMO_FILE + "-wal"), path.with_name(DEMO_FILE + "-shm")):
        leftover.unlink(missing_ok=True)
    # four slashes: an absolute path (sqlite:///x.db would be relative to the cwd)
    return "sqlite:///" + path.as_posix()


def where(state: fs.State) -> str:
    """Where a stored revision was heading: a flow id, or the end."""
    if fs.ended(state):
        return "ended"
    return state.transition.to or "parked"


def describe(state: fs.State) -> str:
    prefix = "flowstate.data."
    data = "".join(
        f"  data {key.removeprefix(prefix)}=rev {rev}"
        for key, rev in state.annotations.items()
        if key.startswith(prefix)
    )
    step = "ended" if fs.ended(state) else f"-> {where(state)}"
    return f"  rev {state.rev:<3} {state.id}  {step:<10}{data}".rstrip()


async def main(store_url: str | None = None) -> list[fs.State]:
    """Run the demo; return the state log (every committed revision, in commit order)."""
    url = store_url or default_store()
    print(f"flowstate demo, store: {url}")
    async with fs.Engine(fs.open_driver(url), registry) as engine:
        ctx = fs.StateCtx(current=fs.State(id="aTID"))
        # The first commit is the promise: from here on the store knows aTID is owed `first`.
        await engine.do(fs.commit(fs.transit(ctx, "first")))
        # execute runs flows until one ends the state; it returns when the work is done.
        await engine.execute(ctx)

        print("state log (every committed revision, in commit order):")
        log = [s async for s in engine.iter(fs.get_states()) if not fs.is_system(s.id)]
        for state in log:
            print(describe(state))

        # Anyone can pick the finished state up later, by id, with its payload.
        done = fs.StateCtx()
        await engine.do(fs.get_state_by_id(done, "aTID"), fs.get_data(done, "result"))
        print(f"result: {done.datas['result'].blob.decode()!r}")

    steps = " -> ".join(where(s) for s in log)
    print(f"what happened: aTID was committed {len(log)} times ({steps}); the log is in {url}")
    return log


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
