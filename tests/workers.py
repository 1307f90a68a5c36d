"""Helpers for tests of the recoverer and the delayer: engines on one store and one manual
clock, ticks driven by moving the clock, and waiting for conditions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import flowstate as fs

TIMEOUT = 20.0


class Ticking(Protocol):
    interval: float

    async def wait_tick(self) -> None: ...


async def ticks(clock: fs.ManualClock, worker: Ticking | None, n: int = 2) -> None:
    """Move the clock by the worker's interval ``n`` times, each time waiting for a tick that
    began after the move (two moves: at least one whole tick saw the new time)."""
    assert worker is not None
    for _ in range(n):
        waiter = asyncio.ensure_future(worker.wait_tick())
        await asyncio.sleep(0)
        clock.advance(worker.interval)
        await asyncio.wait_for(waiter, TIMEOUT)


async def until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], what: str, timeout: float = TIMEOUT
) -> None:
    """Wait until ``check()`` holds (it may be async), or fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        got = check()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def history(engine: fs.Engine, sid: str) -> list[fs.State]:
    """Every committed version of state ``sid``, oldest first."""
    out = []
    async for state in engine.iter(fs.get_states()):
        if state.id == sid:
            out.append(state)
    return out


async def latest(engine: fs.Engine, sid: str) -> fs.State:
    ctx = fs.StateCtx()
    await engine.do(fs.get_state_by_id(ctx, sid))
    return ctx.current


class Cluster:
    """Engines on one store sharing one :class:`~flowstate.ManualClock`."""

    def __init__(self, store: Callable[[], fs.Driver]) -> None:
        self.store = store
        self.clock = fs.ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
        self.engines: list[fs.Engine] = []

    async def engine(self, registry: fs.FlowRegistry, **kwargs: Any) -> fs.Engine:
        engine = fs.Engine(self.store(), registry, clock=self.clock, **kwargs)
        self.engines.append(engine)
        await engine.start()
        return engine

    async def close(self) -> None:
        for engine in reversed(self.engines):
            await engine.shutdown(timeout=5.0)


@contextlib.asynccontextmanager
async def cluster(store: Callable[[], fs.Driver]) -> AsyncIterator[Cluster]:
    c = Cluster(store)
    try:
        yield c
    finally:
        await c.close()


def die(worker: Any) -> None:
    """Stop a recoverer or delayer the way a killed process stops: no clean release."""
    worker._stopping = True
    if worker._task is not None:
        worker._task.cancel()
