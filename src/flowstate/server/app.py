"""The ASGI app: the Driver and Flow services of flowstate.v1 over Connect unary, a health
endpoint, a bearer token, CORS and a request size limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Literal, TypeVar

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flowstate import perform
from flowstate.commands import Command, execute
from flowstate.drivers.base import Driver
from flowstate.engine import Engine
from flowstate.errors import FlowstateError, ValidationError
from flowstate.flow import FlowRegistry
from flowstate.server import connect
from flowstate.server.connect import JSON, PROTO, WireErrorBody
from flowstate.server.driver_service import METHODS, perform_method, state_size
from flowstate.server.guard import FORBIDDEN, HostGuard, SecurityHeaders, bearer_matches
from flowstate.server.ui import UI, is_public
from flowstate.server.ui.routes import unhosted_flows
from flowstate.state import StateCtx
from flowstate.wire import codec
from flowstate.wire.state_cache import EncodedStates

log = logging.getLogger("flowstate.server")

DEFAULT_MAX_BODY = 16 * 2**20

BodyKind = Literal["proto", "json"]
T = TypeVar("T")

#: Content types read as binary protobuf besides none at all (Go: anything but JSON is proto).
_PROTO_TYPES = frozenset(
    {PROTO, "application/protobuf", "application/x-protobuf", "application/octet-stream"}
)


class RequestError(Exception):
    """A request rejected before it reached a service, with its HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error = WireErrorBody(code, message)


def content_kind(header: str | None) -> BodyKind:
    """JSON for ``application/json`` (parameters allowed), protobuf for none or a protobuf
    type; anything else is refused with 415."""
    if header is None or not header.strip():
        return "proto"
    base = header.split(";", 1)[0].strip().lower()
    if base == JSON:
        return "json"
    if base in _PROTO_TYPES:
        return "proto"
    raise RequestError(
        415, "invalid_argument", f"unsupported content type {header!r}: use {PROTO} or {JSON}"
    )


def body_kind(request: Request) -> BodyKind:
    """The body kind of ``request`` (see :func:`content_kind`)."""
    return content_kind(request.headers.get("content-type"))


def reply_kind(request: Request) -> BodyKind:
    """How to encode an error for this request: as it came, JSON if that is unknown."""
    return _reply_kind(request.headers.get("content-type"))


def _reply_kind(header: str | None) -> BodyKind:
    try:
        return content_kind(header)
    except RequestError:
        return "json"


def _too_large(limit: int) -> RequestError:
    return RequestError(
        413, "resource_exhausted", f"request body exceeds the limit of {limit} bytes"
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 as soon as it exceeds ``limit`` bytes."""
    return await receive_body(
        request.receive,
        limit,
        request.headers.get("content-length"),
        request.headers.get("content-encoding"),
    )


async def receive_body(
    receive: Receive, limit: int, length: str | None, encoding: str | None
) -> bytes:
    """The body of the request whose ASGI channel is ``receive``; 413 as soon as it exceeds
    ``limit`` bytes (from ``length``, the Content-Length, or while it streams in), 415 for a
    content ``encoding`` other than identity."""
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    message = await receive()
    body: bytes = message.get("body", b"")
    if message["type"] != "http.request":
        raise RequestError(400, "invalid_argument", "client disconnected mid-body")
    if message.get("more_body", False):
        # the chunks are joined once at the end: growing one buffer chunk by chunk copied a
        # 16 MiB body about ten times over (a third of the event loop's time under large bodies)
        chunks = [body]
        size = len(body)
        while True:
            if size > limit:
                raise _too_large(limit)
            message = await receive()
            if message["type"] != "http.request":
                raise RequestError(400, "invalid_argument", "client disconnected mid-body")
            chunk = message.get("body", b"")
            chunks.append(chunk)
            size += len(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
    if len(body) > limit:
        raise _too_large(limit)
    if encoding is not None:
        encoding = encoding.strip().lower()
        if encoding not in ("", "identity"):
            raise RequestError(
                415, "invalid_argument", f"unsupported content encoding {encoding!r}"
            )
    return body


def error_response(status: int, err: WireErrorBody, kind: BodyKind) -> Response:
    media = JSON if kind == "json" else PROTO
    return Response(connect.encode_error(err, json_body=kind == "json"), status, media_type=media)


class _Runtime:
    """The store driver (opened on first use) and the engine that serves the Flow service."""

    def __init__(self, driver: Driver, flows: FlowRegistry | None, engine: Engine | None) -> None:
        self.driver = driver
        self.flows = flows
        self._engine = engine
        self._own_engine = False
        self._opened = False
        self._lock = asyncio.Lock()

    async def store(self) -> Driver:
        if not self._opened:
            async with self._lock:
                if not self._opened:
                    await self.driver.open()
                    self._opened = True
        return self.driver

    async def engine(self) -> Engine:
        if self._engine is None:
            async with self._lock:
                if self._engine is None:
                    flows = self.flows if self.flows is not None else FlowRegistry()
                    engine = Engine(self.driver, flows, recovery=False, delayer=False)
                    await engine.start()
                    self._engine, self._own_engine = engine, True
        return self._engine

    async def close(self) -> None:
        if self._own_engine and self._engine is not None:
            await self._engine.shutdown()
            self._engine, self._own_engine = None, False
        if self._opened:
            self._opened = False
            await self.driver.close()


class TokenGuard:
    """Requires ``Authorization: Bearer <token>`` (the scheme in any case) on every HTTP
    request but those of the public UI paths."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not is_public(scope["path"]):
            given = b""
            for name, value in scope["headers"]:
                if name == b"authorization":
                    given = value
                    break
            if not bearer_matches(given, self.token):
                kind = reply_kind(Request(scope))
                if not scope["path"].startswith("/flowstate.v1."):
                    kind = "json"
                message = "missing bearer token" if not given else "invalid bearer token"
                response = error_response(401, WireErrorBody("unauthenticated", message), kind)
                response.headers["WWW-Authenticate"] = 'Bearer realm="flowstate"'
                if scope.get("http_version", "1.1").startswith("1"):
                    response.headers["connection"] = "close"  # the body was not read
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    driver: Driver,
    *,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    flows: FlowRegistry | None = None,
    engine: Engine | None = None,
    allowed_hosts: Iterable[str] = (),
) -> ASGIApp:
    """The flowstate.v1 server for ``driver`` as an ASGI app.

    The Driver service runs requests straight against ``driver``; the Flow service hands
    states to ``engine`` (by default an engine over ``driver`` and ``flows``, created on the
    first Flow request, without recoverer and delayer). With ``token`` every request must
    carry it as a bearer token; ``cors_origins`` (``"*"`` for any) turns CORS on; request
    bodies above ``max_body`` bytes are refused with 413. A request whose ``Host`` is not a
    loopback name, an IP address or one of ``allowed_hosts`` (``"*"`` for any) is refused with
    421; one whose ``Origin`` is neither the server's own nor in ``cors_origins`` with 403
    (:mod:`flowstate.server.guard`).
    """
    if max_body <= 0:
        raise ValidationError("max_body", "must be > 0")
    if token is not None and not token:
        raise ValidationError("token", "an empty token would accept anyone; pass None instead")
    runtime = _Runtime(driver, flows, engine)
    ui = UI(runtime.engine)

    rpc = _Rpc(runtime, max_body)

    async def driver_method(request: Request) -> Response:
        method = request.path_params["method"]
        status, media, payload, close = await rpc.call(
            method if method in METHODS else None,
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.headers.get("content-encoding"),
            request.receive,
            http1=request.scope.get("http_version", "1.1").startswith("1"),
            name=method,
        )
        return _response(status, media, payload, close)

    async def flow_execute(request: Request) -> Response:
        status, media, payload, close = await rpc.call(
            "",
            request.headers.get("content-type"),
            request.headers.get("content-length"),
            request.headers.get("content-encoding"),
            request.receive,
            http1=request.scope.get("http_version", "1.1").startswith("1"),
        )
        return _response(status, media, payload, close)

    async def health(request: Request) -> Response:
        try:
            store = await runtime.store()
            reason = store.unavailable()
            if reason is not None:
                return JSONResponse({"status": "unavailable", "error": reason}, 503)
            head = await asyncio.wait_for(store.head_rev(), 5.0)
        except Exception as exc:
            return JSONResponse({"status": "unavailable", "error": str(exc)}, 503)
        body: dict[str, object] = {"status": "ok", "head_rev": head}
        # a commit of this store stuck in flight: readers show nothing past it (status stays
        # ok: the store serves, but an operator should see why the head does not move)
        with contextlib.suppress(Exception):
            held = await asyncio.wait_for(store.readers_held(), 5.0)
            if held is not None:
                body["readers_held"] = held
        # States waiting for a flow no process hosts are not a fault of this server (status
        # stays ok), but an operator should learn of them: they wait until a host appears.
        unhosted = unhosted_flows(runtime._engine)  # never start an engine just for this
        if unhosted:
            body["unhosted_flows"] = unhosted
        return JSONResponse(body)

    async def not_found(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("404 page not found", 404)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await runtime.store()
        try:
            yield
        finally:
            await runtime.close()

    middleware = [Middleware(SecurityHeaders)]
    if cors_origins:
        origins = ["*"] if "*" in cors_origins else list(cors_origins)
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=origins,
                allow_methods=["GET", "POST"],
                allow_headers=["*"],
                max_age=600,
            )
        )
    if token is not None:
        middleware.append(Middleware(TokenGuard, token=token))
    app = Starlette(
        routes=[
            Route("/flowstate.v1.Driver/{method}", driver_method, methods=["POST"]),
            Route(connect.FLOW_EXECUTE, flow_execute, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            *ui.routes(),
        ],
        middleware=middleware,
        exception_handlers={404: not_found},
        lifespan=lifespan,
    )
    app.state.runtime = runtime
    app.state.ui = ui
    guard = HostGuard(allowed_hosts, cors_origins)
    return LeanRoutes(app, rpc, token=token, cors=bool(cors_origins), guard=guard)


_RPC_PATHS: dict[str, str] = {
    **{connect.DRIVER_SERVICE + method: method for method in METHODS},
    connect.FLOW_EXECUTE: "",
}


class LeanRoutes:
    """The server's front door: the ``Host`` and ``Origin`` checks for every request, then the
    nine RPC paths straight to the services, in front of the Starlette app.

    A request whose ``Host`` or ``Origin`` the guard refuses is answered here, before its body
    is read. A ``POST`` to an RPC path that passes the token check (and carries no ``Origin``
    when CORS is on, so that no CORS header is due) is answered here, without Starlette's
    request, routing and middleware layers: the answer is byte for byte what the full stack
    gives. Everything else (other paths and methods, refused tokens, browsers' cross-origin
    calls, the lifespan) goes through the Starlette app unchanged.
    """

    def __init__(
        self,
        app: Starlette,
        rpc: _Rpc,
        *,
        token: str | None,
        cors: bool,
        guard: HostGuard | None = None,
    ) -> None:
        self.app = app
        self.state = app.state
        self.rpc = rpc
        self.token = None if token is None else token.encode()
        self.cors = cors
        self.guard = guard or HostGuard()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctype = length = encoding = None
        auth = host = origin = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                ctype = value.decode("latin-1")
            elif name == b"content-length":
                length = value.decode("latin-1")
            elif name == b"content-encoding":
                encoding = value.decode("latin-1")
            elif name == b"authorization":
                auth = value
            elif name == b"host":
                host = value
            elif name == b"origin":
                origin = value
        http1 = scope.get("http_version", "1.1").startswith("1")
        refused = self.guard.refusal(host, origin)
        if refused is not None:
            await self._refuse(scope, *refused, ctype, http1, send)
            return
        if scope["method"] == "POST":
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):  # mounted below a prefix
                path = path[len(root) :]
            method = _RPC_PATHS.get(path)
            token = self.token
            if (
                method is not None
                and (token is None or bearer_matches(auth, token))
                and not (origin is not None and self.cors)
            ):
                status, media, payload, close = await self.rpc.call(
                    method, ctype, length, encoding, receive, http1=http1
                )
                headers = [
                    (b"content-type", media),
                    (b"content-length", b"%d" % len(payload)),
                ]
                if close:
                    headers.append((b"connection", b"close"))
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": payload})
                return
        await self.app(scope, receive, send)

    async def _refuse(
        self, scope: Scope, status: int, message: str, ctype: str | None, http1: bool, send: Send
    ) -> None:
        """An error answer for a request the guard refused: JSON for a refused origin (only
        browsers send one), for a refused host as the token check answers (in the request's
        encoding on the RPC paths: the Go client reads binary errors); on HTTP/1.1 the
        connection closes (the body was not read)."""
        rpc = status != FORBIDDEN and scope["path"].startswith("/flowstate.v1.")
        kind: BodyKind = _reply_kind(ctype) if rpc else "json"
        payload = _error_body(WireErrorBody("permission_denied", message), kind)
        headers = [(b"content-type", _MEDIA[kind]), (b"content-length", b"%d" % len(payload))]
        if http1:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


_MEDIA = {"json": JSON.encode(), "proto": PROTO.encode()}


#: Request bodies above this many bytes are decoded in a worker thread, so that the event loop
#: keeps serving meanwhile; smaller ones, the common case, stay inline. Low because decoding
#: can cost far more than the bytes suggest: 8 KiB of empty state contexts is 4,096 of them,
#: about 20 ms of decoding.
OFFLOAD_BODY_BYTES = 8 * 1024
#: Answers estimated above this many bytes are encoded in a worker thread (encoding costs
#: about what the bytes suggest: a few ms at this size).
OFFLOAD_ANSWER_BYTES = 64 * 1024
#: The most bytes of large answers (as estimated before encoding) being encoded at once,
#: server-wide; one answer larger than this still goes, alone.
MAX_ANSWER_BYTES_IN_FLIGHT = 64 * 2**20


class _BytesInFlight:
    """A server-wide budget of bytes: ``hold(n)`` waits until ``n`` more fit (or none are held)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, size: int) -> AsyncIterator[None]:
        if self._freed is None:
            self._freed = asyncio.Condition()
        freed = self._freed
        async with freed:
            await freed.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
        try:
            yield
        finally:
            async with freed:
                self.used -= size
                freed.notify_all()


class _Rpc:
    """The Driver and Flow services on raw request parts: (status, content type, body, whether
    the connection must close)."""

    def __init__(self, runtime: _Runtime, max_body: int) -> None:
        self.runtime = runtime
        self.max_body = max_body
        self.in_flight = _BytesInFlight(MAX_ANSWER_BYTES_IN_FLIGHT)
        self._worker: asyncio.Semaphore | None = None
        # this server's store only: encodings of the versions its answers carried
        self.encoded = EncodedStates()

    async def _off_loop(self, work: Callable[..., T], *args: object) -> T:
        """``work(*args)`` in a worker thread, one at a time: Python code cannot run in two
        threads at once anyway (the GIL), and each more thread competing for it delays the
        event loop further."""
        if self._worker is None:
            self._worker = asyncio.Semaphore(1)
        async with self._worker:
            return await asyncio.to_thread(work, *args)

    async def call(
        self,
        method: str | None,
        ctype: str | None,
        length: str | None,
        encoding: str | None,
        receive: Receive,
        *,
        http1: bool,
        name: str = "",
    ) -> tuple[int, bytes, bytes, bool]:
        """``method``: a Driver method, ``""`` for Flow/Execute, None for an unknown Driver
        method ``name``."""
        kind = _reply_kind(ctype)
        as_json = kind == "json"
        where = "Flow/Execute" if method == "" else f"Driver/{method or name}"
        try:
            body = await receive_body(receive, self.max_body, length, encoding)
            content_kind(ctype)
            if method is None:
                raise RequestError(404, "unimplemented", f"no method {name!r} in Driver")
            if method:
                if len(body) > OFFLOAD_BODY_BYTES:
                    cmd = await self._off_loop(_decode, codec.decode_command, body, as_json)
                else:
                    cmd = _decode(codec.decode_command, body, as_json)
                # protobuf answers measure their states by encoding them into the cache, so
                # the encoding below takes them from there (a JSON answer cannot)
                size_of = state_size if as_json else self.encoded.size
                store = await self.runtime.store()
                size = max(len(body), await perform_method(store, method, cmd, size_of))
                del body  # an answer may be large too: do not hold both
                if size > OFFLOAD_ANSWER_BYTES:
                    async with self.in_flight.hold(size):
                        payload = await self._off_loop(_encode, cmd, as_json)
                else:
                    payload = codec.encode_command(cmd, json=as_json, states=self.encoded)
            else:
                if len(body) > OFFLOAD_BODY_BYTES:
                    ctx = await self._off_loop(_decode, codec.decode_state_ctx, body, as_json)
                else:
                    ctx = _decode(codec.decode_state_ctx, body, as_json)
                await self._execute(ctx)
                payload = connect.noop_body(json_body=as_json)
        except RequestError as exc:
            # The rest of a body over the limit was not read: an HTTP/1.1 connection cannot
            # carry another request.
            close = exc.status == 413 and http1
            return exc.status, _MEDIA[kind], _error_body(exc.error, kind), close
        except Exception as exc:
            err = _failure(exc, where)
            return err.status, _MEDIA[kind], _error_body(err, kind), False
        return 200, _MEDIA[kind], payload, False

    async def _execute(self, ctx: StateCtx) -> None:
        if not ctx.current.id:
            raise ValidationError("current.id", "state id empty")
        if not ctx.current.transition.to:
            raise ValidationError("current.transition.to", "flow id empty")
        # The flow commits this state: one no store could keep is refused now with a 400,
        # not failed in the background after a 200.
        perform.check_committable(ctx)
        eng = await self.runtime.engine()
        # a registry shared through the store knows flows hosted elsewhere only on lookup
        lookup = getattr(eng.registry, "lookup", None)
        if lookup is not None:
            await lookup(ctx.current.transition.to)
        else:
            eng.registry.get_flow(ctx.current.transition.to)
        await eng.do(execute(ctx))


def _decode(decode: Callable[..., T], body: bytes, as_json: bool) -> T:
    """Decode a request body; whatever goes wrong is the body's fault (400)."""
    try:
        return decode(body, json=as_json)
    except ValidationError:
        raise
    except Exception as exc:
        log.warning("decoder failed on a request body", exc_info=True)
        raise ValidationError("body", f"malformed request: {type(exc).__name__}: {exc}") from None


def _encode(cmd: Command, as_json: bool) -> bytes:
    return codec.encode_command(cmd, json=as_json)


def _error_body(err: WireErrorBody, kind: BodyKind) -> bytes:
    return connect.encode_error(err, json_body=kind == "json")


def _response(status: int, media: bytes, payload: bytes, close: bool) -> Response:
    response = Response(payload, status, media_type=media.decode())
    if close:
        response.headers["connection"] = "close"
    return response


def _failure(exc: Exception, where: str) -> WireErrorBody:
    err = connect.error_of(exc)
    if err.status >= 500:
        _FAILURES.report(exc, where, err.status)
    return err


class _FailureLog:
    """Logs each cause of a 5xx once, not once per request: a cause (where, exception type and
    message) is logged the first time with its traceback (for an unexpected exception), then
    at most once per ``every`` seconds as a count of the repeats since."""

    def __init__(self, every: float = 60.0, causes: int = 1000) -> None:
        self.every = every
        self.causes = causes
        #: cause -> (when last logged, repeats not logged since)
        self.seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def report(self, exc: Exception, where: str, status: int) -> None:
        cause = (where, type(exc).__name__, str(exc)[:500])
        now = time.monotonic()
        last = self.seen.get(cause)
        if last is None:
            if len(self.seen) >= self.causes:  # forget the oldest cause: the map stays bounded
                del self.seen[next(iter(self.seen))]
            self.seen[cause] = (now, 0)
            trace = None if isinstance(exc, FlowstateError) else exc
            log.error("%s failed (%d): %s: %s", where, status, *cause[1:], exc_info=trace)
            return
        logged, repeats = last
        if now - logged < self.every:
            self.seen[cause] = (logged, repeats + 1)
            return
        self.seen[cause] = (now, 0)
        log.error(
            "%s failed (%d) again: %s: %s (%d more times since it was last logged)",
            where,
            status,
            *cause[1:],
            repeats + 1,
        )


_FAILURES = _FailureLog()
