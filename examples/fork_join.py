"""Fork/join: split a state into parallel parts and continue when all of them are done.

Flow ``fork`` creates three child states (labelled with their parent's id) and moves the
parent to ``join`` in ONE commit, then starts the children in the background. Flow ``join``
watches the children's label and collects their results as each child ends; when all have
ended it stores the total on the parent and ends it.

The join waits on the log, not on in-memory tasks: it reads the children's history from the
fork commit on, so a child that finished before the join started watching is not missed, and
a join re-run after a crash (by the recoverer) finds the same results.

Run it with ``python examples/fork_join.py [STORE_URL]``. Without a URL it uses a fresh SQLite
file in a temporary directory, deleted at the end. A given store must not hold ``order-1`` or
its parts yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import flowstate as fs

PARTS = 3

registry = fs.FlowRegistry()


@registry.flow("fork")
async def fork(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    parent = ctx.current.id
    children = [
        fs.StateCtx(
            current=fs.State(
                id=f"{parent}.part-{n}", labels={"parent": parent}, annotations={"part": str(n)}
            )
        )
        for n in range(1, PARTS + 1)
    ]
    ctx.current.annotations["parts"] = str(PARTS)
    # One commit for parent and children: a crash cannot leave a half-forked parent, and the
    # join's watch can start at the parent's new rev knowing every child comes after it.
    await engine.do(fs.commit(fs.transit(ctx, "join"), *(fs.transit(c, "work") for c in children)))
    print(f"  fork: {parent} split into {', '.join(c.current.id for c in children)}")
    await engine.do(*(fs.execute(c) for c in children))  # in the background, concurrently
    # Returning execute(ctx) continues with the parent, now in `join`, in this execution.
    return fs.execute(ctx)


@registry.flow("work")
async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    part = int(ctx.current.annotations["part"])
    await asyncio.sleep(0.01 * (PARTS - part))  # unequal work, so parts finish out of order
    ctx.current.annotations["result"] = str(part * part)
    print(f"  work: {ctx.current.id} done, result {part * part}")
    return fs.commit(fs.end(ctx))


@registry.flow("join")
async def join(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    parts = int(ctx.current.annotations["parts"])
    results: dict[str, int] = {}
    query = fs.get_states({"parent": ctx.current.id}, since_rev=ctx.committed.rev)
    async with engine.watch(query) as children:
        async for child in children:
            if fs.ended(child):
                results[child.id] = int(child.annotations["result"])
                print(f"  join: {child.id} ended ({len(results)}/{parts})")
            if len(results) == parts:
                break
    if len(results) < parts:
        # The watcher stopped because the engine is shutting down. The parent stays in
        # `join`, committed, so the recoverer will run this flow again later.
        return fs.noop()
    ctx.current.annotations["total"] = str(sum(results.values()))
    print(f"  join: all {parts} parts ended, total {ctx.current.annotations['total']}")
    return fs.commit(fs.end(ctx))


@contextlib.contextmanager
def store(url: str | None) -> Iterator[str]:
    """The given store URL, or a fresh SQLite file in a temporary directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="flowstate-") as tmp:
        yield "sqlite:///" + (Path(tmp) / "fork_join.db").as_posix()


def describe(state: fs.State) -> str:
    step = "ended" if fs.ended(state) else f"-> {state.transition.to}"
    extra = "".join(
        f" {k}={state.annotations[k]}" for k in ("result", "total") if k in state.annotations
    )
    return f"  rev {state.rev:<3} {state.id:<14} {step:<8}{extra}".rstrip()


async def main(store_url: str | None = None) -> fs.State:
    """Fork order-1 into parts, join them; return the parent's final version."""
    with store(store_url) as url:
        print(f"store: {url}")
        async with fs.Engine(fs.open_driver(url), registry) as engine:
            order = fs.StateCtx(current=fs.State(id="order-1"))
            await engine.do(fs.commit(fs.transit(order, "fork")))
            await engine.execute(order)  # returns once join has ended the parent

            print("state log:")
            async for state in engine.iter(fs.get_states()):
                if not fs.is_system(state.id):
                    print(describe(state))

            final = fs.StateCtx()
            await engine.do(fs.get_state_by_id(final, "order-1"))
    return final.current


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
