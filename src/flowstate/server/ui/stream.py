"""Server-Sent Events: new commits matching a filter, as they happen, fed by a watcher.

A stream sends rows (a version's summary), never annotation values, so what a stream holds is
bounded in bytes however large the stored states are: its watcher reads pages of at most
:data:`STREAM_PAGE` versions, at most :data:`STREAM_READS` such reads run at once in the
whole server, and each version read is cut down to what a row needs (annotation values over
:data:`ROW_VALUE` characters dropped) before it waits in the stream's buffer. The UI admits at
most :data:`MAX_STREAMS` streams at once (routes.py answers 503 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

from flowstate.commands import GetStatesCmd
from flowstate.drivers.base import Driver
from flowstate.engine import Engine
from flowstate.errors import ValidationError
from flowstate.iterator import Watcher
from flowstate.server.ui.detail import summary
from flowstate.server.ui.query import Filter
from flowstate.state import State, Transition, is_system

#: Seconds between keep-alive comments on an idle stream.
PING_EVERY = 15.0
#: Seconds a set of pending delays is reused before it is read again.
PENDING_FOR = 5.0
#: Live streams the UI serves at once (``FLOWSTATE_UI_MAX_STREAMS``); more are answered 503
#: with ``Retry-After: RETRY_AFTER``.
DEFAULT_MAX_STREAMS = 200
RETRY_AFTER = 5
#: Versions a stream's watcher reads per query (the engine's watchers read 200).
STREAM_PAGE = 8
#: Stream queries running at once in the server: a page of large states is in memory whole
#: while it is read, so this times STREAM_PAGE bounds how many can be.
STREAM_READS = 2
#: Annotation values longer than this (characters) are dropped from a version a stream holds:
#: rows need only the short engine annotations (attempt, max attempts, ended).
ROW_VALUE = 256


def max_streams(env: dict[str, str] | None = None) -> int:
    """The cap on concurrent streams: ``FLOWSTATE_UI_MAX_STREAMS`` or the default."""
    raw = (os.environ if env is None else env).get("FLOWSTATE_UI_MAX_STREAMS", "").strip()
    if not raw:
        return DEFAULT_MAX_STREAMS
    if not raw.isdigit() or int(raw) < 1:
        raise ValidationError("FLOWSTATE_UI_MAX_STREAMS", f"{raw!r} is not a positive integer")
    return int(raw)


def for_row(state: State) -> State:
    """``state`` without the annotation values a row does not show (the long ones)."""

    def short(values: dict[str, str]) -> dict[str, str]:
        if all(len(v) <= ROW_VALUE for v in values.values()):
            return values
        return {k: v for k, v in values.items() if len(v) <= ROW_VALUE}

    slim_annotations = short(state.annotations)
    moved = state.transition.annotations
    slim_moved = short(moved)
    if slim_annotations is state.annotations and slim_moved is moved:
        return state
    return State(
        state.id,
        state.rev,
        slim_annotations,
        state.labels,
        state.committed_at,
        Transition(state.transition.to, slim_moved),
    )


class StreamWatcher(Watcher):
    """A watcher whose own queries take a turn of ``reads`` (shared by every stream) and keep
    only what rows need of each version read. Versions pushed by the driver's shared tail are
    kept as they are: one copy serves every watcher."""

    def __init__(
        self,
        driver: Driver,
        cmd: GetStatesCmd,
        stop: asyncio.Event | None,
        reads: asyncio.Semaphore,
    ) -> None:
        super().__init__(driver, cmd, stop)
        self._reads = reads

    async def _fetch(self) -> None:
        async with self._reads:
            await super()._fetch()
            # called with an empty buffer: everything in it was just read
            self._buf = deque(map(for_row, self._buf))


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
    reads: asyncio.Semaphore | None = None,
) -> AsyncIterator[str]:
    """Events for every version after rev ``since`` whose labels match ``flt``: ``state``
    with the version's summary and ``match`` (whether it passes the flow and status filters
    too, so that a view can drop a row that stopped matching). Ends when ``closing`` is set,
    the engine stops, or the consumer goes away. ``reads`` is shared by every stream of the
    server (default: one of :data:`STREAM_READS` for this stream alone)."""
    cmd = GetStatesCmd(since, None, flt.label_sets(), False, STREAM_PAGE)
    # the engine's stop event: a stream ends with its engine, as engine.watch() would
    stop: asyncio.Event | None = getattr(engine, "_done", None)
    watcher = StreamWatcher(engine.driver, cmd, stop, reads or asyncio.Semaphore(STREAM_READS))
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
