"""The web UI's routes: the page and its static files, a JSON API under ``/ui/api``, the live
stream, and the operator's actions.

Only ``/`` and ``/ui/static/*`` are public (the page asks for the token); everything under
``/ui/api`` sits behind the server's bearer token like the rest of the server. Actions accept
only ``application/json`` bodies, so a cross-site form cannot trigger them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from flowstate.commands import commit, execute, get_data, get_state_by_id, park, transit
from flowstate.engine import Engine
from flowstate.errors import (
    DataNotFoundError,
    FlowNotFoundError,
    FlowstateError,
    NotFoundError,
    RevMismatchError,
    StoreUnavailableError,
    ValidationError,
)
from flowstate.perform import MAX_ANNOTATION_KEY_BYTES, MAX_ID_BYTES, check_text
from flowstate.server.ui import detail, graph, query, stream
from flowstate.state import ENDED, STATE_ANNOTATION, StateCtx, ended, parked

log = logging.getLogger("flowstate.server.ui")

STATIC = Path(__file__).resolve().parent.parent / "static"
STATIC_PATH = "/ui/static"
API = "/ui/api"
#: Transition annotation naming the UI action that made a version.
ACTION = "flowstate.ui.action"
#: The largest action body; actions are ``{"id": ..., "rev": ...}``, far smaller.
MAX_ACTION_BODY = 64 * 1024
#: The deepest nesting of arrays and objects an action body may have (checked before parsing,
#: so that a body of 60,000 ``[`` costs a scan, not a parser's recursion).
MAX_ACTION_DEPTH = 16
_MAX_REV = 2**63 - 1


def is_public(path: str) -> bool:
    """Paths served without the token: the page and its static files, nothing else."""
    return path == "/" or path.startswith(STATIC_PATH + "/")


def unhosted_flows(engine: Engine | None) -> dict[str, int]:
    """Flow id -> due states that ``engine``'s recoverer and delayer leave alone because no
    process hosts that flow, summed over both (only an active worker reports any)."""
    counts: dict[str, int] = {}
    for worker in (engine.recoverer, engine.delayer) if engine is not None else ():
        if worker is None:
            continue
        # getattr: stats without the field (an older worker) report nothing
        reported: dict[str, int] = getattr(worker.stats(), "unhosted", None) or {}
        for flow, waiting in reported.items():
            if waiting > 0:
                counts[flow] = counts.get(flow, 0) + waiting
    return dict(sorted(counts.items()))


class Conflict(FlowstateError):
    """An action that does not apply to the state as it is (409)."""


class UI:
    """The UI of one server app. ``engine`` returns the engine to read and act with;
    :meth:`close` ends the live streams (call it when the server stops)."""

    def __init__(self, engine: Callable[[], Awaitable[Engine]]) -> None:
        self._engine = engine
        self.closing = asyncio.Event()
        self.max_streams = stream.max_streams()
        self.streams = 0  # live streams now
        self._reads: asyncio.Semaphore | None = None  # made on the serving loop
        # pending delays shared by every stream: (read at, ids), refreshed every PENDING_FOR
        self._pending: tuple[float, set[str]] | None = None
        self._pending_lock: asyncio.Lock | None = None

    def close(self) -> None:
        self.closing.set()

    def routes(self) -> list[BaseRoute]:
        get = ["GET"]
        return [
            Route("/", self.index, methods=get),
            Mount(STATIC_PATH, app=StaticFiles(directory=STATIC), name="ui-static"),
            Route(API + "/info", self.info, methods=get),
            Route(API + "/states", self.states, methods=get),
            Route(API + "/graph", self.graph, methods=get),
            Route(API + "/state", self.state, methods=get),
            Route(API + "/diff", self.diff, methods=get),
            Route(API + "/data", self.data, methods=get),
            Route(API + "/data/raw", self.data_raw, methods=get),
            Route(API + "/stream", self.stream, methods=get),
            Route(API + "/retry", self.retry, methods=["POST"]),
            Route(API + "/end", self.end, methods=["POST"]),
        ]

    # pages

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(self, request: Request) -> Response:
        async def run(engine: Engine) -> dict[str, Any]:
            return {
                "head_rev": await engine.driver.head_rev(),
                "store": type(engine.driver).__name__,
                "recoverer": engine.recoverer is not None,
                "delayer": engine.delayer is not None,
                "flows": engine.registry.ids(),
                "statuses": list(query.STATUSES),
                "unhosted": unhosted_flows(engine),
                "readers_held": await engine.driver.readers_held(),
            }

        return await self._answer(run)

    async def states(self, request: Request) -> Response:
        params = _params(request)

        async def run(engine: Engine) -> dict[str, Any]:
            flt = query.parse_filter(params)
            limit = query.parse_int(params, "limit", query.DEFAULT_LIMIT, 1, query.MAX_LIMIT)
            before = _before(params)
            head = await engine.driver.head_rev()
            pending = await _pending_ids(engine)
            page = await query.states_page(engine, flt, pending, before or head + 1, limit)
            return {
                "states": [detail.summary(s, pending) for s in page.states],
                "before": page.before,
                "head_rev": head,
                "scanned": page.scanned,
            }

        return await self._answer(run)

    async def graph(self, request: Request) -> Response:
        params = _params(request)

        async def run(engine: Engine) -> dict[str, Any]:
            flt = query.parse_filter(params)
            pending = await _pending_ids(engine)
            return (await graph.flow_graph(engine, flt, pending)).as_json()

        return await self._answer(run)

    async def state(self, request: Request) -> Response:
        params = _params(request)

        async def run(engine: Engine) -> dict[str, Any]:
            state_id = _state_id(params)
            limit = query.parse_int(params, "limit", 100, 1, query.MAX_LIMIT)
            before = _before(params)
            ctx = StateCtx()
            await engine.do(get_state_by_id(ctx, state_id))
            latest = ctx.current
            delays = [d for d in await query.pending_delays(engine) if d.state.id == state_id]
            pending = {state_id} if delays else set()
            page = await detail.timeline(engine, state_id, before or latest.rev + 1, limit)
            return {
                "state": detail.full(latest, pending),
                "revisions": [detail.full(s, pending) for s in page.states],
                "before": page.before,
                "data": detail.data_refs(latest),
                "waiting": detail.waiting(
                    latest, engine.clock.now(), delays, engine.recoverer is not None
                ),
                "actions": {"retry": not parked(latest), "end": not ended(latest)},
            }

        return await self._answer(run)

    async def diff(self, request: Request) -> Response:
        params = _params(request)

        async def run(engine: Engine) -> dict[str, Any]:
            state_id = _state_id(params)
            a = query.parse_int(params, "a", 0, 1, _MAX_REV)
            b = query.parse_int(params, "b", 0, 1, _MAX_REV)
            if not a or not b:
                raise ValidationError("a" if not a else "b", "a rev is required")
            old, new = StateCtx(), StateCtx()
            await engine.do(get_state_by_id(old, state_id, a), get_state_by_id(new, state_id, b))
            return {
                "a": detail.full(old.current),
                "b": detail.full(new.current),
                "changes": [c.as_json() for c in detail.diff(old.current, new.current)],
            }

        return await self._answer(run)

    async def data(self, request: Request) -> Response:
        params = _params(request)

        async def run(engine: Engine) -> dict[str, Any]:
            alias, loaded = await _load_data(engine, params)
            return detail.data_preview(alias, loaded)

        return await self._answer(run)

    async def data_raw(self, request: Request) -> Response:
        params = _params(request)
        try:
            engine = await self._engine()
            alias, loaded = await _load_data(engine, params)
        except Exception as exc:
            return _error(exc)
        binary = detail.is_binary(loaded)
        media = "application/octet-stream" if binary else "text/plain; charset=utf-8"
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in alias) or "data"
        headers = {
            "Content-Disposition": f'attachment; filename="{name}{"" if binary else ".txt"}"'
        }
        return Response(loaded.blob, media_type=media, headers=headers)

    async def stream(self, request: Request) -> Response:
        params = _params(request)
        try:
            flt = query.parse_filter(params)
            since = query.parse_int(params, "since", 0, 0, _MAX_REV)
            engine = await self._engine()
        except Exception as exc:
            return _error(exc)

        if self.streams >= self.max_streams:
            return JSONResponse(
                {"error": f"{self.streams} live streams already (at most {self.max_streams})"},
                503,
                headers={"Retry-After": str(stream.RETRY_AFTER)},
            )
        if self._reads is None:
            self._reads = asyncio.Semaphore(stream.STREAM_READS)

        async def pending() -> Collection[str]:
            return await self._shared_pending(engine)

        events = stream.commits(engine, flt, since, pending, self.closing, self._reads)
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        self.streams += 1
        return _CountedStream(
            events, self._stream_ended, media_type="text/event-stream", headers=headers
        )

    def _stream_ended(self) -> None:
        self.streams -= 1

    async def _shared_pending(self, engine: Engine) -> set[str]:
        """The ids with a pending delay, read at most once per PENDING_FOR for all streams."""
        if self._pending_lock is None:
            self._pending_lock = asyncio.Lock()
        async with self._pending_lock:
            now = asyncio.get_running_loop().time()
            if self._pending is None or now - self._pending[0] > stream.PENDING_FOR:
                self._pending = (now, await _pending_ids(engine))
            return self._pending[1]

    # actions

    async def retry(self, request: Request) -> Response:
        async def run(engine: Engine) -> dict[str, Any]:
            ctx = await _target(request, engine)
            state = ctx.current
            if parked(state):
                raise Conflict(f"state {state.id!r} is parked: there is no flow to retry")
            to = state.transition.to
            engine.registry.get_flow(to)
            lookup = getattr(engine.registry, "lookup", None)
            if lookup is not None:
                await lookup(to)  # a remote flow: somebody must host it
            annotations = dict(state.transition.annotations)
            annotations[ACTION] = "retry"
            await engine.do(commit(transit(ctx, to, annotations)))
            await engine.do(execute(ctx))
            return {"state": detail.full(ctx.current)}

        return await self._answer(run)

    async def end(self, request: Request) -> Response:
        async def run(engine: Engine) -> dict[str, Any]:
            ctx = await _target(request, engine)
            if ended(ctx.current):
                raise Conflict(f"state {ctx.current.id!r} has already ended")
            await engine.do(commit(park(ctx, {STATE_ANNOTATION: ENDED, ACTION: "end"})))
            return {"state": detail.full(ctx.current)}

        return await self._answer(run)

    async def _answer(self, run: Callable[[Engine], Awaitable[dict[str, Any]]]) -> Response:
        try:
            return JSONResponse(await run(await self._engine()))
        except Exception as exc:
            return _error(exc)


class _CountedStream(StreamingResponse):
    """A streaming response that calls ``ended`` once it is over, however it ends (even if
    the client left before the body started)."""

    def __init__(self, content: AsyncIterator[str], ended: Callable[[], None], **kw: Any):
        super().__init__(content, **kw)
        self._ended: Callable[[], None] | None = ended

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            ended, self._ended = self._ended, None
            if ended is not None:
                ended()


def _params(request: Request) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for key, value in request.query_params.multi_items():
        out.setdefault(key, []).append(value)
    return out


def _before(params: dict[str, list[str]]) -> int | None:
    value = query.parse_int(params, "before", 0, 1, _MAX_REV)
    return value or None


def _state_id(params: dict[str, list[str]]) -> str:
    values = params.get("id", [])
    if len(values) != 1 or not values[0]:
        raise ValidationError("id", "one non-empty state id is required")
    check_text(values[0], "id", MAX_ID_BYTES)
    return values[0]


async def _pending_ids(engine: Engine) -> set[str]:
    return {d.state.id for d in await query.pending_delays(engine)}


async def _load_data(engine: Engine, params: dict[str, list[str]]) -> tuple[str, Any]:
    state_id = _state_id(params)
    rev = query.parse_int(params, "rev", 0, 0, _MAX_REV)
    aliases = params.get("alias", [])
    if len(aliases) != 1 or not aliases[0]:
        raise ValidationError("alias", "one non-empty data alias is required")
    check_text(aliases[0], "alias", MAX_ANNOTATION_KEY_BYTES)
    ctx = StateCtx()
    await engine.do(get_state_by_id(ctx, state_id, rev))
    await engine.do(get_data(ctx, aliases[0]))
    return aliases[0], ctx.datas[aliases[0]]


async def _target(request: Request, engine: Engine) -> StateCtx:
    """The version an action is about: ``{"id": ..., "rev": ...}`` as JSON, loaded."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise ValidationError("content-type", "actions take an application/json body")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ACTION_BODY:
            raise ValidationError("body", f"larger than {MAX_ACTION_BODY} bytes")
    doc = parse_action_body(body)
    state_id, rev = doc.get("id"), doc.get("rev")
    if not isinstance(state_id, str) or not state_id:
        raise ValidationError("id", "a non-empty string is required")
    check_text(state_id, "id", MAX_ID_BYTES)
    if isinstance(rev, bool) or not isinstance(rev, int) or not 1 <= rev <= _MAX_REV:
        raise ValidationError("rev", f"the rev the action expects (an integer 1..{_MAX_REV})")
    ctx = StateCtx()
    await engine.do(get_state_by_id(ctx, state_id, rev))
    return ctx


def parse_action_body(body: bytes) -> dict[str, Any]:
    """An action body as a JSON object: strict UTF-8, no NaN or Infinity, nesting at most
    :data:`MAX_ACTION_DEPTH` deep; anything else is a :class:`ValidationError` on ``body``."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("body", f"not UTF-8 (byte {exc.start})") from None
    depth = _nesting(text, MAX_ACTION_DEPTH)
    if depth > MAX_ACTION_DEPTH:
        raise ValidationError("body", f"nested more than {MAX_ACTION_DEPTH} levels deep")

    def constant(name: str) -> Any:
        raise ValidationError("body", f"{name} is not JSON")

    try:
        doc = json.loads(text, parse_constant=constant)
    except ValidationError:
        raise
    except (ValueError, RecursionError) as exc:  # ValueError: also ints past 4,300 digits
        raise ValidationError("body", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValidationError("body", "expected a JSON object")
    return doc


def _nesting(text: str, limit: int) -> int:
    """How deep arrays and objects nest in JSON ``text`` (strings skipped); stops counting
    once past ``limit``."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        elif ch in "]}":
            depth -= 1
    return deepest


def _error(exc: Exception) -> Response:
    """The JSON error for ``exc``: 400 bad input, 404 not found, 409 conflicts, 503 store."""
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, ValidationError):
        status = 400
        body.update(field=exc.field, error=f"{exc.field}: {exc.reason}")
    elif isinstance(exc, NotFoundError | DataNotFoundError):
        status = 404
    elif isinstance(exc, RevMismatchError):
        status = 409
        body["ids"] = exc.ids
        body["error"] = f"{exc} (the state changed since you loaded it: reload and retry)"
    elif isinstance(exc, Conflict | FlowNotFoundError):
        status = 409
    elif isinstance(exc, StoreUnavailableError):
        status = 503
    elif isinstance(exc, FlowstateError):
        status = 400
    else:
        log.error("UI request failed", exc_info=exc)
        status, body = 500, {"error": f"internal error: {type(exc).__name__}"}
    return JSONResponse(body, status)
