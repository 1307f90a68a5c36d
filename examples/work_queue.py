"""A work queue: a label is the queue, a watcher is the consumer.

The producer enqueues 10 jobs: parked states labelled ``queue=example`` (parked because
nothing is owed to any flow until a consumer takes the job). The consumer watches that label
and receives the jobs in commit order, history first and then live as they are committed. It
takes each job by committing a transit to flow ``example`` and then executes it; ``example``
ends the job. The consumer stops after 10 jobs.

Taking a job is a commit against the rev the consumer saw, so with several consumers exactly
one wins each job; the others get ``RevMismatchError`` and move on.

(The file is not called ``queue.py`` on purpose: a script of that name would shadow the
standard library's ``queue`` module, which flowstate itself imports.)

Run it with ``python examples/work_queue.py [STORE_URL]``. Without a URL it uses a fresh
SQLite file in a temporary directory, deleted at the end. A given store must not hold the
``job-N`` states yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import flowstate as fs

QUEUE = {"queue": "example"}
JOBS = 10

registry = fs.FlowRegistry()


@registry.flow("example")
async def example(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    print(f"  consumer: working on {ctx.current.id} ({ctx.current.annotations['payload']})")
    return fs.commit(fs.end(ctx))


async def produce(engine: fs.Engine) -> None:
    for i in range(JOBS):
        job = fs.StateCtx(
            current=fs.State(id=f"job-{i}", labels=dict(QUEUE), annotations={"payload": f"#{i}"})
        )
        await engine.do(fs.commit(fs.park(job)))
        print(f"  producer: enqueued {job.current.id} at rev {job.current.rev}")


async def consume(engine: fs.Engine, count: int) -> list[fs.State]:
    """Process ``count`` jobs in commit order; return the queued versions that were taken."""
    taken: list[fs.State] = []
    # A durable consumer would save watcher.since_rev in a state of its own after each job
    # and resume from it after a restart; this one starts from the beginning of the log.
    async with engine.watch(fs.get_states(QUEUE)) as watcher:
        async for state in watcher:
            # The label stays on every later version of a job, so the watcher also delivers
            # the versions this consumer commits while working; only a parked, unfinished
            # version is a job waiting to be taken.
            if not fs.parked(state) or fs.ended(state):
                continue
            ctx = state.to_ctx()
            try:
                await engine.do(fs.commit(fs.transit(ctx, "example")))
            except fs.RevMismatchError:
                continue  # the job moved on since this version: someone else took it
            # Executing inline keeps the jobs in order. `await engine.do(fs.execute(ctx))`
            # would run them in the background, in parallel.
            await engine.execute(ctx)
            taken.append(state)
            if len(taken) == count:
                break
    return taken


@contextlib.contextmanager
def store(url: str | None) -> Iterator[str]:
    """The given store URL, or a fresh SQLite file in a temporary directory."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="flowstate-") as tmp:
        yield "sqlite:///" + (Path(tmp) / "work_queue.db").as_posix()


async def main(store_url: str | None = None) -> list[fs.State]:
    """Produce and consume concurrently; return the consumed jobs in the order taken."""
    with store(store_url) as url:
        print(f"store: {url}")
        async with fs.Engine(fs.open_driver(url), registry) as engine:
            taken, _ = await asyncio.gather(consume(engine, JOBS), produce(engine))
    order = ", ".join(f"{s.id}@{s.rev}" for s in taken)
    print(f"consumed {len(taken)} jobs in commit order: {order}")
    return taken


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
