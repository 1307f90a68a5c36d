"""A demo workflow for ``flowstate serve --demo``: orders that are received, paid, shipped and
ended, one new order every few seconds, so that a fresh server has something to show."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import AsyncIterator

from flowstate.commands import Command, commit, end, execute, transit
from flowstate.engine import Engine
from flowstate.errors import FlowstateError
from flowstate.flow import FlowRegistry
from flowstate.state import State, StateCtx

#: Seconds between two new demo orders.
EVERY = 3.0


async def receive(ctx: StateCtx, engine: Engine) -> Command:
    ctx.current.annotations["received"] = "true"
    return commit(transit(ctx, "demo.pay"))


async def pay(ctx: StateCtx, engine: Engine) -> Command:
    await asyncio.sleep(random.uniform(0.1, 1.0))
    ctx.current.annotations["paid"] = "true"
    return commit(transit(ctx, "demo.ship"))


async def ship(ctx: StateCtx, engine: Engine) -> Command:
    await asyncio.sleep(random.uniform(0.1, 1.0))
    ctx.current.annotations["shipped"] = "true"
    return commit(end(ctx))


def register(registry: FlowRegistry) -> None:
    registry.set_flow("demo.receive", receive)
    registry.set_flow("demo.pay", pay)
    registry.set_flow("demo.ship", ship)


async def _orders(engine: Engine) -> None:
    prefix = f"demo-order-{int(time.time())}-"
    for n in itertools.count(1):
        ctx = StateCtx(current=State(prefix + str(n), labels={"app": "demo"}))
        try:
            await engine.do(commit(transit(ctx, "demo.receive")), execute(ctx))
        except FlowstateError as exc:
            engine.log.warning("demo order not started: %s", exc)
        await asyncio.sleep(EVERY)


@contextlib.asynccontextmanager
async def running(engine: Engine) -> AsyncIterator[None]:
    """Start a new demo order every :data:`EVERY` seconds while the context is open."""
    task = asyncio.create_task(_orders(engine))
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
