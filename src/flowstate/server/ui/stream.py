"""Server-Sent Events: new commits matching a filter, as they happen, fed by a watcher."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from flowstate.commands import GetStatesCmd
from flowstate.engine import Engine
from flowstate.server.ui.detail import summary
from flowstate.server.ui.query import Filter
from flowstate.state import State, is_system

#: Seconds between keep-alive comments on an idle stream.
PING_EVERY = 15.0
#: Seconds a set of pending delays is reused before it is read again.
PENDING_FOR = 5.0


def event(name: str, data: Any, event_id: int | None = None) -> str:
    """One SSE event (``data`` as JSON on one line)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


async def commits(
    engine: Engine,
    flt: Filter,
    since: int,
    pending: Callable[[], Awaitable[Collection[str]]],
    closing: asyncio.Event,
) -> AsyncIterator[str]:
    """Events for every version after rev ``since`` whose labels match ``flt``: ``state``
    with the version's summary and ``match`` (whether it passes the flow and status filters
    too, so that a view can drop a row that stopped matching). Ends when ``closing`` is set,
    the engine stops, or the consumer goes away."""
    cmd = GetStatesCmd(since, None, flt.label_sets(), False, 200)
    watcher = engine.watch(cmd)
    loop = asyncio.get_running_loop()
    ids: Collection[str] = await pending()
    read_at = loop.time()

    async def next_state() -> State:
        return await watcher.__anext__()

    closed: asyncio.Future[Any] = asyncio.ensure_future(closing.wait())
    nxt: asyncio.Future[Any] | None = None
    try:
        yield event("hello", {"since": since})
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(next_state())
            done, _ = await asyncio.wait(
                {nxt, closed}, timeout=PING_EVERY, return_when=asyncio.FIRST_COMPLETED
            )
            if closed in done:
                return
            if nxt not in done:
                yield ": ping\n\n"
                continue
            try:
                state = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            if loop.time() - read_at > PENDING_FOR:
                ids, read_at = await pending(), loop.time()
            if not flt.system and is_system(state.id):
                continue
            row = summary(state, ids)
            row["match"] = flt.matches(state, ids)
            yield event("state", row, state.rev)
    finally:
        watcher.close()
        for fut in (nxt, closed):
            if fut is not None:
                fut.cancel()
                with contextlib.suppress(BaseException):
                    await fut
