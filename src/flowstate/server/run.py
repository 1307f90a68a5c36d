"""Running the server: settings from arguments and the environment, the HTTP stack (HTTP/1.1 by
uvicorn's httptools protocol, h2c by hypercorn, on one port), signals, and a background server
for tests and embedding."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.types import ASGIApp

from flowstate.drivers.base import Driver
from flowstate.engine import Engine
from flowstate.errors import ValidationError
from flowstate.flow import FlowRegistry
from flowstate.server.app import DEFAULT_MAX_BODY, create_app
from flowstate.urls import open_driver

log = logging.getLogger("flowstate.server")

DEFAULT_STORE = "sqlite:///flowstate.db"
DEFAULT_ADDR = "127.0.0.1:8080"
#: Seconds in-flight requests get to finish on shutdown (as the Go app).
GRACE = 30.0


@dataclass(slots=True)
class Settings:
    """Where the server listens, what it stores into and how it guards access."""

    store: str = DEFAULT_STORE
    addr: str = DEFAULT_ADDR
    token: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body: int = DEFAULT_MAX_BODY
    http_host: str = ""
    demo: bool = False
    #: Whether this server's engine runs a recoverer and a delayer (off: a pure store, for
    #: clients that run their own; docs/serving.md).
    recoverer: bool = True
    delayer: bool = True


def settings(
    store: str = DEFAULT_STORE,
    addr: str = DEFAULT_ADDR,
    *,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    demo: bool = False,
    recoverer: bool | None = None,
    delayer: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Arguments completed by the environment (wire.md §10, plus ours).

    An argument left at its default gives way to its variable: ``FLOWSTATE_DRIVER`` (with
    ``FLOWSTATE_PGDRIVER_CONN_STRING``, ``FLOWSTATE_BADGERDRIVER_PATH`` and
    ``FLOWSTATE_BADGERDRIVER_IN_MEMORY``) for the store, ``FLOWSTATE_ADDR``, and ours:
    ``FLOWSTATE_STORE``, ``FLOWSTATE_TOKEN``, ``FLOWSTATE_CORS_ORIGINS`` (comma-separated),
    ``FLOWSTATE_MAX_BODY``, ``FLOWSTATE_NO_RECOVERER`` and ``FLOWSTATE_NO_DELAYER`` (``1`` or
    ``true`` turns the role off when ``recoverer``/``delayer`` is None). ``FLOWSTATE_HTTP_HOST``
    is the address advertised for remote flows (default: derived from the listen address).
    """
    env = os.environ if env is None else env
    if store == DEFAULT_STORE:
        store = env.get("FLOWSTATE_STORE") or _store_from_go_env(env) or store
    if addr == DEFAULT_ADDR and env.get("FLOWSTATE_ADDR"):
        addr = env["FLOWSTATE_ADDR"]
    if token is None:
        token = env.get("FLOWSTATE_TOKEN") or None
    if not cors_origins and env.get("FLOWSTATE_CORS_ORIGINS"):
        cors_origins = [o.strip() for o in env["FLOWSTATE_CORS_ORIGINS"].split(",") if o.strip()]
    if max_body == DEFAULT_MAX_BODY and env.get("FLOWSTATE_MAX_BODY"):
        raw = env["FLOWSTATE_MAX_BODY"]
        if not raw.isdigit() or int(raw) <= 0:
            raise ValidationError("FLOWSTATE_MAX_BODY", f"{raw!r} is not a positive integer")
        max_body = int(raw)
    if recoverer is None:
        recoverer = not _switch(env, "FLOWSTATE_NO_RECOVERER")
    if delayer is None:
        delayer = not _switch(env, "FLOWSTATE_NO_DELAYER")
    host, port = parse_addr(addr)
    http_host = env.get("FLOWSTATE_HTTP_HOST") or _advertised(host, port)
    return Settings(
        store, addr, token, tuple(cors_origins), max_body, http_host, demo, recoverer, delayer
    )


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _switch(env: Mapping[str, str], name: str) -> bool:
    """An on/off variable: unset, empty, 0, false, no, off mean off; 1, true, yes, on mean on.
    Anything else is refused rather than guessed (a typo must not start a role)."""
    raw = env.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValidationError(name, f"{env[name]!r}: expected 1/true/yes/on or 0/false/no/off")


def _store_from_go_env(env: Mapping[str, str]) -> str | None:
    kind = env.get("FLOWSTATE_DRIVER")
    if not kind:
        return None
    if kind == "memdriver":
        return "memory://"
    if kind == "pgdriver":
        dsn = env.get("FLOWSTATE_PGDRIVER_CONN_STRING", "")
        if not dsn:
            raise ValidationError("FLOWSTATE_PGDRIVER_CONN_STRING", "empty with pgdriver")
        return dsn
    if kind == "badgerdriver":
        # No Badger here: its settings select the embedded store of this implementation.
        if env.get("FLOWSTATE_BADGERDRIVER_IN_MEMORY", "").lower() == "true":
            return "memory://"
        directory = Path(env.get("FLOWSTATE_BADGERDRIVER_PATH") or "badgerdb")
        return "sqlite:///" + str(directory / "flowstate.db")
    raise ValidationError(
        "FLOWSTATE_DRIVER", f"unknown driver {kind!r} (memdriver, badgerdriver or pgdriver)"
    )


def parse_addr(addr: str) -> tuple[str, int]:
    """``host:port`` -> (host, port). An empty host or ``0`` means every interface, as in Go."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValidationError("addr", f"{addr!r}: expected host:port")
    host = host.strip("[]")
    if host in ("", "0"):
        host = "0.0.0.0"
    return host, int(port)


def _advertised(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::"):
        host = "localhost"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by connections
        sock.bind((host, port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def hypercorn_config(sock: socket.socket) -> Config:
    """HTTP/1.1 and cleartext HTTP/2 (upgrade and prior knowledge) on ``sock``."""
    config = hypercorn_settings()
    config.bind = [f"fd://{os.dup(sock.fileno())}"]
    return config


#: The most an h2 client may still send for a stream that was answered before its body was
#: read: it is read and dropped (so that the client can finish sending and read the answer);
#: past this the stream is reset.
DRAIN_LIMIT = 64 * 2**20


class _GoneStream:
    """Stands for a stream hypercorn has forgotten (answered and closed on our side while the
    client still sends its body): what arrives is dropped; past DRAIN_LIMIT the stream is
    reset."""

    __slots__ = ("protocol", "stream_id")

    def __init__(self, protocol: Any, stream_id: int) -> None:
        self.protocol = protocol
        self.stream_id = stream_id

    async def handle(self, event: object) -> None:
        import h2.errors
        import h2.exceptions

        streams: _Streams = self.protocol.streams
        data = getattr(event, "data", None)
        if data is None:  # the end of the body (or of the stream)
            streams.drained.pop(self.stream_id, None)
            return
        drained = streams.drained.get(self.stream_id, 0) + len(data)
        streams.drained[self.stream_id] = drained
        if drained > DRAIN_LIMIT:
            streams.drained.pop(self.stream_id, None)
            with contextlib.suppress(h2.exceptions.H2Error):
                self.protocol.connection.reset_stream(self.stream_id, h2.errors.ErrorCodes.NO_ERROR)


class _Streams(dict[int, Any]):
    def __init__(self, protocol: Any, streams: dict[int, Any]) -> None:
        super().__init__(streams)
        self.protocol = protocol
        self.drained: dict[int, int] = {}

    def __missing__(self, stream_id: int) -> _GoneStream:
        return _GoneStream(self.protocol, stream_id)


def _fix_hypercorn_h2() -> None:
    """Keep an h2 connection when a stream was answered before its body was read.

    hypercorn 0.18 forgets a stream once its response is sent; DATA frames (or the end of
    the stream) the client still sends for it, the rest of a body refused with 401, 404, 405
    or 413, then raise KeyError in ``H2Protocol._handle_events``, which ends the connection
    and every other stream on it (issue 14, item 4). With the streams in a mapping that
    answers a forgotten id with a :class:`_GoneStream`, hypercorn's own code goes on (it
    acknowledges the data on the connection); the stream's own window is opened by
    DRAIN_LIMIT when it closes, so the client can finish sending and read its answer; the
    other streams are untouched. Idempotent.
    """
    from hypercorn.protocol.h2 import H2Protocol

    original = H2Protocol.__init__
    if getattr(original, "_flowstate_fix", False):
        return

    import h2.exceptions
    from h2.stream import StreamState

    def init(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        streams = getattr(self, "streams", None)
        if type(streams) is dict:
            self.streams = _Streams(self, streams)

    original_close = H2Protocol._close_stream

    async def close_stream(self: H2Protocol, stream_id: int) -> None:
        await original_close(self, stream_id)
        # Answered while the client still sends: h2 reopens no window of a stream whose
        # answer is complete, so the client would wait for one forever. Open it wide once.
        stream = self.connection.streams.get(stream_id)
        if stream is not None and stream.state_machine.state == StreamState.HALF_CLOSED_LOCAL:
            with contextlib.suppress(h2.exceptions.H2Error):
                self.connection.increment_flow_control_window(DRAIN_LIMIT, stream_id=stream_id)
                await self._flush()

    init._flowstate_fix = True  # type: ignore[attr-defined]
    H2Protocol.__init__ = init  # type: ignore[method-assign]
    H2Protocol._close_stream = close_stream  # type: ignore[method-assign]


#: The HTTP servers ``serve_app`` can run, and the one it runs unless
#: ``FLOWSTATE_SERVER_STACK`` names another (docs/performance.md, "Server stack"):
#: ``uvicorn`` serves HTTP/1.1 with uvicorn's httptools protocol and hands HTTP/2 connections
#: (prior knowledge or ``Upgrade: h2c``) to hypercorn; ``hypercorn`` serves both itself.
STACKS = ("uvicorn", "hypercorn")
DEFAULT_STACK = "uvicorn"
#: The event loop of ``serve`` (``uvloop`` when installed, else ``asyncio``;
#: ``FLOWSTATE_SERVER_LOOP`` names another).
DEFAULT_LOOP = "uvloop"


async def serve_app(
    app: ASGIApp,
    sock: socket.socket,
    stop: asyncio.Event,
    *,
    ready: Callable[[], None] | None = None,
    stack: str | None = None,
) -> None:
    """Serve ``app`` on the listening ``sock`` until ``stop`` is set."""
    stack = stack or os.environ.get("FLOWSTATE_SERVER_STACK") or DEFAULT_STACK
    if stack not in STACKS:
        raise ValidationError("stack", f"{stack!r}: expected one of {', '.join(STACKS)}")
    if ready is not None and stack != "uvicorn":
        asyncio.get_running_loop().call_soon(ready)

    def close_streams() -> None:
        ui = getattr(getattr(app, "state", None), "ui", None)
        if ui is not None:
            ui.close()  # ends the UI's live streams: the graceful shutdown need not wait for them

    if stack == "uvicorn":
        await _serve_split(app, sock, stop, close_streams, ready)
        return
    _fix_hypercorn_h2()
    config = hypercorn_config(sock)

    async def shutdown_trigger() -> None:
        await stop.wait()
        close_streams()

    await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


#: The client preface that opens an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The most a request head (request line and headers) may take: a longer one is refused with
#: 400 and its connection closed (hypercorn's h11 limit was 16 KiB; httptools has none).
MAX_HEAD = 64 * 1024
_SNIFF_LIMIT = MAX_HEAD
#: Seconds a new connection may take to send enough of its first request to tell HTTP/1.1 from
#: HTTP/2 (as long as an idle keep-alive connection is kept).
FIRST_BYTES_TIMEOUT = 75.0


def first_protocol(buffer: bytes) -> str | None:
    """Which server a connection whose first bytes are ``buffer`` goes to: ``"h2"`` (the
    HTTP/2 preface, or a first HTTP/1.1 request asking ``Upgrade: h2c``), ``"h1"``, or None
    while the bytes cannot tell yet."""
    if buffer[: len(H2_PREFACE)] == H2_PREFACE[: len(buffer)]:
        return "h2" if len(buffer) >= len(H2_PREFACE) else None
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None if len(buffer) < _SNIFF_LIMIT else "h1"
    head = buffer[:end].lower()
    if b"h2c" in head:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"upgrade" and b"h2c" in (v.strip() for v in value.split(b",")):
                return "h2"
    return "h1"


def hypercorn_settings() -> Config:
    """hypercorn's settings for the connections it serves (no sockets of its own)."""
    config = Config()
    config.graceful_timeout = GRACE
    config.keep_alive_timeout = 75.0  # longer than clients keep idle connections (httpx: 5 s)
    config.include_server_header = False
    config.keep_alive_max_requests = 2**62  # never GOAWAY a busy h2 connection mid-flight
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    # hypercorn hands a request's body to the app through a queue of this many chunks, and
    # waits, with the whole h2 connection, while it is full: a stream answered before its
    # body was read (401, 404, 405, 413) would then stall every other stream for good. Our
    # handlers read the body at once and cap it at max_body; what arrives for a stream
    # already answered is dropped (_fix_hypercorn_h2).
    config.max_app_queue_size = 2**30
    return config


async def _serve_split(
    app: ASGIApp,
    sock: socket.socket,
    stop: asyncio.Event,
    close_streams: Callable[[], None],
    ready: Callable[[], None] | None = None,
) -> None:
    """HTTP/1.1 by uvicorn's httptools protocol, HTTP/2 (prior knowledge or ``Upgrade: h2c``)
    by hypercorn, on one socket: each connection goes to one of them by its first bytes."""
    import httptools
    import uvicorn
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.utils import wrap_app
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class H1(HttpToolsProtocol):
        """uvicorn's protocol with a bound on the request head."""

        _head = 0

        def _count(self, size: int) -> None:
            self._head += size
            if self._head > MAX_HEAD:
                raise httptools.HttpParserError(f"request head over {MAX_HEAD} bytes")

        def on_message_begin(self) -> None:
            self._head = 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            super().on_header(name, value)

    _fix_hypercorn_h2()
    loop = asyncio.get_running_loop()
    h2_config = hypercorn_settings()
    h2_context = WorkerContext(None)
    h2_app = wrap_app(app, h2_config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]
    h2_tasks: set[asyncio.Task[None]] = set()

    async def h2_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict[str, Any]
    ) -> None:
        await TCPServer(h2_app, loop, h2_config, h2_context, state, reader, writer)

    class FirstBytes(asyncio.Protocol):
        """Reads until the first bytes tell the protocol, then hands the connection over."""

        def __init__(
            self,
            config: uvicorn.Config,
            server_state: Any,
            app_state: dict[str, Any],
            _loop: asyncio.AbstractEventLoop | None = None,
        ) -> None:
            self.config, self.server_state, self.app_state = config, server_state, app_state
            self.buffer = b""
            self.transport: asyncio.Transport | None = None
            self.timer: asyncio.TimerHandle

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
            # as idle keep-alive connections: one that never tells its protocol is closed
            self.timer = loop.call_later(FIRST_BYTES_TIMEOUT, transport.close)

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer + data
            kind = first_protocol(buffer)
            transport = self.transport
            if kind is None or transport is None:
                self.buffer = buffer
                return
            self.buffer = b""
            self.timer.cancel()
            if kind == "h1":
                h1 = H1(self.config, self.server_state, self.app_state, loop)
                transport.set_protocol(h1)
                h1.connection_made(transport)
                h1.data_received(buffer)
                return
            reader = asyncio.StreamReader(loop=loop)
            stream = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport.set_protocol(stream)
            stream.connection_made(transport)
            reader.feed_data(buffer)
            writer = asyncio.StreamWriter(transport, stream, reader, loop)
            task = loop.create_task(h2_connection(reader, writer, self.app_state))
            h2_tasks.add(task)
            task.add_done_callback(h2_tasks.discard)

        def eof_received(self) -> bool:
            return False  # closes the transport

        def connection_lost(self, exc: Exception | None) -> None:
            self.transport = None
            self.timer.cancel()

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # signals are ours (_on_signals)

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if ready is not None:
                ready()  # the app's startup is done and the socket is served

        async def _wait_tasks_to_complete(self) -> None:
            await h2_context.terminated.set()
            await asyncio.gather(super()._wait_tasks_to_complete(), *list(h2_tasks))

    config = uvicorn.Config(
        app,
        http=FirstBytes,
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,
        proxy_headers=False,  # X-Forwarded-* mean nothing to this server (as with hypercorn)
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=int(GRACE),
    )
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    server = Server(config)

    async def trigger() -> None:
        await stop.wait()
        close_streams()
        server.should_exit = True

    watcher = asyncio.create_task(trigger())
    try:
        await server.serve(sockets=[sock])
    except SystemExit:  # uvicorn's answer to a failed startup (the cause is logged)
        raise RuntimeError("the app's startup failed") from None
    finally:
        watcher.cancel()


def serve(
    store: str = DEFAULT_STORE,
    addr: str = DEFAULT_ADDR,
    *,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    demo: bool = False,
    recoverer: bool | None = None,
    delayer: bool | None = None,
) -> None:
    """Run the flowstate server until SIGINT or SIGTERM (a second signal exits at once).

    Serves the Driver service on ``store``, the Flow service with an engine whose flows are
    advertised through the store, HTTP/1.1 and h2c. The engine runs a recoverer and a delayer
    unless ``recoverer``/``delayer`` is False (None: as ``FLOWSTATE_NO_RECOVERER`` and
    ``FLOWSTATE_NO_DELAYER`` say; both off make the server a pure store).
    """
    s = settings(
        store,
        addr,
        token=token,
        cors_origins=cors_origins,
        max_body=max_body,
        demo=demo,
        recoverer=recoverer,
        delayer=delayer,
    )
    _json_logging()
    if (os.environ.get("FLOWSTATE_SERVER_LOOP") or DEFAULT_LOOP) == "uvloop":
        try:
            import uvloop
        except ImportError:  # not on every platform
            pass
        else:
            uvloop.run(_serve(s))
            return
    asyncio.run(_serve(s))


async def _serve(s: Settings) -> None:
    stop = asyncio.Event()
    _on_signals(stop)
    sock = listen(*parse_addr(s.addr))
    try:
        await run_server(
            _open_store(s.store),
            sock,
            http_host=s.http_host,
            token=s.token,
            cors_origins=s.cors_origins,
            max_body=s.max_body,
            demo=s.demo,
            recoverer=s.recoverer,
            delayer=s.delayer,
            stop=stop,
            store_name=_redact(s.store),
        )
    finally:
        sock.close()


async def run_server(
    driver: Driver,
    sock: socket.socket,
    *,
    http_host: str,
    flows: Callable[[FlowRegistry], None] | None = None,
    token: str | None = None,
    cors_origins: Sequence[str] = (),
    max_body: int = DEFAULT_MAX_BODY,
    demo: bool = False,
    recoverer: bool = True,
    delayer: bool = True,
    stop: asyncio.Event | None = None,
    store_name: str = "",
) -> None:
    """Serve ``driver`` on the listening ``sock`` until ``stop`` is set, as the Go app does:
    store, then a flow registry shared through the store (``http_host`` is this server's
    advertised address; ``flows`` registers the flows hosted here), then an engine with its
    recoverer and delayer (each unless turned off), then HTTP."""
    from flowstate.netflow import NetFlowRegistry
    from flowstate.server import demo as demo_flows

    stop = stop or asyncio.Event()
    registry = NetFlowRegistry(http_host, driver, token=token)
    if flows is not None:
        flows(registry)
    if demo:
        demo_flows.register(registry)
    # Explicit: a server takes the roles it is asked to whether or not it hosts flows itself
    # (the engine's default leaves them to processes that host flows).
    engine = Engine(driver, registry, recovery=recoverer, delayer=delayer)
    await engine.start()
    try:
        await registry.start()
        app = create_app(
            driver, token=token, cors_origins=cors_origins, max_body=max_body, engine=engine
        )
        bound = sock.getsockname()
        off = [name for name, on in (("recoverer", recoverer), ("delayer", delayer)) if not on]
        log.info(
            "serving %s on %s:%d (advertised as %s)%s%s",
            store_name or type(driver).__name__,
            bound[0],
            bound[1],
            http_host,
            ", token required" if token else "",
            f", no {' and no '.join(off)}" if off else "",
        )
        async with contextlib.AsyncExitStack() as stack:
            if demo:
                await stack.enter_async_context(demo_flows.running(engine))
            await serve_app(app, sock, stop)
    finally:
        await registry.close()
        await engine.shutdown()
        log.info("stopped")


def _open_store(store: str) -> Driver:
    if "://" not in store and "=" in store:  # a key=value PostgreSQL DSN
        from flowstate.drivers.postgres import PostgresDriver

        return PostgresDriver(store)
    if store.startswith("sqlite:///"):
        parent = Path(store.removeprefix("sqlite:///")).parent
        parent.mkdir(parents=True, exist_ok=True)
    return open_driver(store)


def _redact(url: str) -> str:
    """A store URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def first() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("shutting down (a second signal exits at once)")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, first)


class _JsonLines(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _json_logging() -> None:
    """Logs as JSON lines on stdout, as the Go app writes them."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


class BackgroundServer:
    """An ASGI app served on a real socket (HTTP/1.1 and h2c, by the stack ``serve_app`` runs
    or the one ``stack`` names), from a thread with its own event loop.

    For tests and for embedding a server into a program that is not asyncio::

        server = BackgroundServer(create_app(MemoryDriver()))
        url = server.start()
        ...
        server.stop()
    """

    def __init__(
        self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0, *, stack: str | None = None
    ) -> None:
        self.app = app
        self.stack = stack
        self._sock = listen(host, port)
        bound = self._sock.getsockname()
        self.url = f"http://{_advertised(host, bound[1]).split('//', 1)[1]}"
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns the base URL (``http://127.0.0.1:PORT``)."""
        self._thread = threading.Thread(target=self._run, name="flowstate-server", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("the server did not start")
        if self._error is not None:
            raise self._error
        return self.url

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve_app(
                self.app, self._sock, self._stop, ready=self._started.set, stack=self.stack
            )

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            log.exception("background server failed")
        finally:
            self._started.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop serving (in-flight requests may finish) and wait for the thread."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
