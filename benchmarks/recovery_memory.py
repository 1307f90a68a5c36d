"""What the recoverer keeps in memory per tracked (un-parked, not yet finished) state.

    .venv/bin/python -m benchmarks.recovery_memory [--states 50000] [--driver sqlite|memory]

Commits ``--states`` stalled states (a transit to a flow, never executed) to a store,
then lets an active :class:`flowstate.Recoverer` read the log once, and measures with
``tracemalloc`` how much memory the read left allocated: that is what the recoverer holds for
the states it tracks (the driver's own copy was allocated before the measurement). For
comparison it measures the same states kept whole, as the recoverer did before it kept only
the rev, the retry time and the flow (``whole State``).

The states look like a typical workflow's: a 14-character id, two labels, three annotations
of some 40 characters and a transition annotation. Ids and annotations cost the same whatever
keeps them, so bigger states cost more only in the ``whole State`` column. SQLite (the
default) decodes a fresh id string per state read, as every driver but the in-process memory
driver does; the memory driver hands out its own id strings, which the recoverer then shares.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import tempfile
import tracemalloc
from dataclasses import dataclass
from datetime import UTC, datetime

import flowstate as fs
from flowstate import recovery
from flowstate.roles import RoleState


@dataclass(slots=True)
class _Whole:
    """What the recoverer kept per state before: the whole State and its retry time."""

    state: fs.State
    retry_at: datetime


async def _commit_states(engine: fs.Engine, n: int) -> None:
    batch = 500
    for start in range(0, n, batch):
        cmds: list[fs.Command] = []
        for i in range(start, min(start + batch, n)):
            ctx = fs.StateCtx(
                current=fs.State(
                    id=f"order-{i:08d}",
                    labels={"customer": f"c{i % 977}", "kind": "order"},
                    annotations={
                        "note": "x" * 40,
                        "source": "web-checkout-eu-west-1",
                        "request": f"req-{i:032d}",
                    },
                )
            )
            cmds.append(fs.transit(ctx, "fulfil"))
        await engine.do(fs.commit(*cmds))


async def measure(n: int, driver: fs.Driver) -> dict[str, float]:
    engine = fs.Engine(
        driver,
        fs.FlowRegistry(),
        recovery=False,
        delayer=False,
        clock=fs.ManualClock(datetime(2030, 1, 1, tzinfo=UTC)),
    )
    await engine.start()
    try:
        await _commit_states(engine, n)
        rec = recovery.Recoverer(engine)
        rec.role._state = RoleState.ACTIVE  # measure the active role's tracking, no store role
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await rec._read()
        gc.collect()
        tracked = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert rec.stats().tracked == n, rec.stats()

        kept: dict[str, _Whole] = {}
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        async for state in engine.iter(fs.get_states(limit=500)):
            assert state.committed_at is not None
            kept[state.id] = _Whole(state, state.committed_at + recovery.retry_after(state))
        gc.collect()
        whole = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(kept) == n
    finally:
        await engine.shutdown()
    return {"tracked": tracked / n, "whole": whole / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=50_000)
    parser.add_argument("--driver", choices=("sqlite", "memory"), default="sqlite")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.driver == "sqlite":
            from flowstate.drivers.sqlite import SqliteDriver

            driver: fs.Driver = SqliteDriver(f"{tmp}/recovery-memory.db")
        else:
            driver = fs.MemoryDriver()
        result = asyncio.run(measure(args.states, driver))
    print(f"states tracked: {args.states:,} ({args.driver})")
    print(f"recoverer, bytes per tracked state: {result['tracked']:.0f}")
    print(f"whole State,   bytes per tracked state: {result['whole']:.0f}")


if __name__ == "__main__":
    main()
