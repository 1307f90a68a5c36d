"""Durable execute: commit the move to a flow first, then run it.

Committing ``transit(ctx, "example")`` is what makes the work durable: from that moment the
store says "this state is owed flow example", whether or not this process lives to run it.
The example shows both halves of that promise:

1. ``aTID`` is committed and executed right away, the ordinary case;
2. ``bTID`` is committed and then the process "dies" before executing it. A second engine,
   opened on the same store as a restarted process would, finds the owed state in the log
   and runs it. The recoverer does exactly this for you (after ``retry_after``, with an
   attempt limit); here it is spelled out so the example finishes instantly.

Run it with ``python examples/durable_execute.py [STORE_URL]``. Without a URL it uses a fresh
SQLite file in a temporary directory, deleted at the end. A given store must not hold
``aTID``/``bTID`` yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import flowstate as fs

registry = fs.FlowRegistry()


@registry.flow("example")
async def example(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    print(f"  flow example runs for {ctx.current.id} (rev {ctx.current.rev})")
    # Parking in a commit is the receipt: a parked state is owed nothing, so neither the
    # recoverer nor a restarted process will run it again.
    return fs.commit(fs.park(ctx))


@contextlib.contextmanager
def store(url: str | None) -> Iterator[str]:
    """The given store URL, or a fresh SQLite file in a temporary directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="flowstate-") as tmp:
        yield "sqlite:///" + (Path(tmp) / "durable_execute.db").as_posix()


def describe(state: fs.State) -> str:
    step = f"-> {state.transition.to}" if state.transition.to else "parked"
    return f"  rev {state.rev:<3} {state.id}  {step}"


async def main(store_url: str | None = None) -> list[fs.State]:
    """Run both halves; return the state log."""
    with store(store_url) as url:
        print(f"store: {url}")
        driver = fs.open_driver(url)

        print("1. commit, then execute in the same process")
        async with fs.Engine(driver, registry) as engine:
            a = fs.StateCtx(current=fs.State(id="aTID"))
            await engine.do(fs.commit(fs.transit(a, "example")))
            print(f"  committed {a.current.id} at rev {a.current.rev}: the work is now owed")
            await engine.execute(a)

            print("2. commit, then the process stops before executing")
            b = fs.StateCtx(current=fs.State(id="bTID"))
            await engine.do(fs.commit(fs.transit(b, "example")))
            print(f"  committed {b.current.id} at rev {b.current.rev}, then shut down")

        # A restarted process opens the store afresh. A memory:// store lives only as long
        # as its driver object, so in that case the "restart" has to reuse it.
        restarted = driver if url.startswith("memory:") else fs.open_driver(url)
        async with fs.Engine(restarted, registry) as engine:
            # The latest version of each state tells what it is owed; parked means nothing.
            owed = [
                s
                async for s in engine.iter(fs.get_states(latest_only=True))
                if not fs.parked(s) and not fs.is_system(s.id)
            ]
            print(f"  restarted: the log says {', '.join(s.id for s in owed)} still owes work")
            for state in owed:
                await engine.execute(state.to_ctx())

            print("state log:")
            log = [s async for s in engine.iter(fs.get_states()) if not fs.is_system(s.id)]
            for state in log:
                print(describe(state))
    return log


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
