"""Running the server: settings from arguments and the environment, the HTTP stack (HTTP/1.1 by
uvicorn's httptools protocol, h2c by hypercorn, on one port), signals, and a background server
for tests and embedding."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
#: Seconds a request may send nothing while its head or body is still due: then it is
#: answered 408 and its connection closed (or just closed once its answer has begun).
DEFAULT_BODY_TIMEOUT = 30.0
#: Open connections at most (by default; lowered to half the file-descriptor limit): a new
#: connection beyond it is closed at once.
DEFAULT_MAX_CONNECTIONS = 1000
#: Seconds between two log lines about connections that could not be accepted or were refused.
ACCEPT_LOG_INTERVAL = 10.0


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
    #: Host names besides loopback names and IP addresses that requests may be sent to.
    allowed_hosts: tuple[str, ...] = ()
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    #: None: :func:`default_max_connections`.
    max_connections: int | None = None
    #: Hosts remote flows may be called on (none: FLOWSTATE_REMOTE_HOSTS, else loopback only).
    remote_hosts: tuple[str, ...] = ()


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
    allowed_hosts: Sequence[str] = (),
    body_timeout: float | None = None,
    max_connections: int | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Arguments completed by the environment (wire.md §10, plus ours).

    An argument left at its default gives way to its variable: ``FLOWSTATE_DRIVER`` (with
    ``FLOWSTATE_PGDRIVER_CONN_STRING``, ``FLOWSTATE_BADGERDRIVER_PATH`` and
    ``FLOWSTATE_BADGERDRIVER_IN_MEMORY``) for the store, ``FLOWSTATE_ADDR``, and ours:
    ``FLOWSTATE_STORE``, ``FLOWSTATE_TOKEN``, ``FLOWSTATE_CORS_ORIGINS`` (comma-separated),
    ``FLOWSTATE_MAX_BODY``, ``FLOWSTATE_NO_RECOVERER`` and ``FLOWSTATE_NO_DELAYER`` (``1`` or
    ``true`` turns the role off when ``recoverer``/``delayer`` is None),
    ``FLOWSTATE_ALLOWED_HOSTS`` (comma-separated), ``FLOWSTATE_BODY_TIMEOUT`` (seconds) and
    ``FLOWSTATE_MAX_CONNECTIONS``. ``FLOWSTATE_HTTP_HOST`` is the address advertised for remote
    flows (default: derived from the listen address).
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
    if not allowed_hosts and env.get("FLOWSTATE_ALLOWED_HOSTS"):
        allowed_hosts = [h.strip() for h in env["FLOWSTATE_ALLOWED_HOSTS"].split(",") if h.strip()]
    if body_timeout is None:
        seconds = env.get("FLOWSTATE_BODY_TIMEOUT")
        body_timeout = (
            _positive(seconds, "FLOWSTATE_BODY_TIMEOUT") if seconds else DEFAULT_BODY_TIMEOUT
        )
    elif not body_timeout > 0:
        raise ValidationError("body_timeout", f"{body_timeout!r} is not a positive number")
    if max_connections is None and env.get("FLOWSTATE_MAX_CONNECTIONS"):
        raw = env["FLOWSTATE_MAX_CONNECTIONS"]
        if not raw.isdigit() or int(raw) <= 0:
            raise ValidationError("FLOWSTATE_MAX_CONNECTIONS", f"{raw!r} is not a positive integer")
        max_connections = int(raw)
    elif max_connections is not None and max_connections <= 0:
        raise ValidationError("max_connections", f"{max_connections} is not a positive integer")
    if recoverer is None:
        recoverer = not _switch(env, "FLOWSTATE_NO_RECOVERER")
    if delayer is None:
        delayer = not _switch(env, "FLOWSTATE_NO_DELAYER")
    host, port = parse_addr(addr)
    http_host = env.get("FLOWSTATE_HTTP_HOST") or _advertised(host, port)
    return Settings(
        store,
        addr,
        token,
        tuple(cors_origins),
        max_body,
        http_host,
        demo,
        recoverer,
        delayer,
        allowed_hosts=tuple(allowed_hosts),
        body_timeout=body_timeout,
        max_connections=max_connections,
    )


def _positive(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValidationError(name, f"{raw!r} is not a positive number of seconds")
    return value


def default_max_connections() -> int:
    """DEFAULT_MAX_CONNECTIONS, or half the soft limit on open files if that is lower (the
    other half is left to the store, logs and the listening socket)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return DEFAULT_MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, soft // 2))


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
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int | None = None,
) -> None:
    """Serve ``app`` on the listening ``sock`` until ``stop`` is set.

    A request that sends nothing for ``body_timeout`` seconds while its head or body is due is
    answered 408 (its connection closed); at most ``max_connections`` connections are open at
    once (None: :func:`default_max_connections`; the uvicorn stack only), a new one beyond is
    closed at once. Failing accepts (no file descriptor left) are logged once per
    ACCEPT_LOG_INTERVAL seconds with their count.
    """
    stack = stack or os.environ.get("FLOWSTATE_SERVER_STACK") or DEFAULT_STACK
    if stack not in STACKS:
        raise ValidationError("stack", f"{stack!r}: expected one of {', '.join(STACKS)}")
    if ready is not None and stack != "uvicorn":
        asyncio.get_running_loop().call_soon(ready)

    def close_streams() -> None:
        ui = getattr(getattr(app, "state", None), "ui", None)
        if ui is not None:
            ui.close()  # ends the UI's live streams: the graceful shutdown need not wait for them

    _throttle_accept_errors(asyncio.get_running_loop())
    if stack == "uvicorn":
        cap = max_connections if max_connections is not None else default_max_connections()
        await _serve_split(app, sock, stop, close_streams, ready, body_timeout, cap)
        return
    _fix_hypercorn_h2()
    config = hypercorn_config(sock)

    async def shutdown_trigger() -> None:
        await stop.wait()
        close_streams()

    timed = BodyDeadline(app, body_timeout)
    await hypercorn_serve(timed, config, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]


class Throttled:
    """A warning about a recurring event, logged at most once per ``interval`` seconds, with
    how often the event happened since the last line."""

    def __init__(self, what: str, interval: float = ACCEPT_LOG_INTERVAL) -> None:
        self.what = what
        self.interval = interval
        self.count = 0
        self.since = 0.0
        self.last = float("-inf")

    def __call__(self, detail: str) -> None:
        now = time.monotonic()
        self.count += 1
        if now - self.last < self.interval:
            return
        if self.last == float("-inf"):
            log.warning("%s: %s", self.what, detail)
        else:
            log.warning(
                "%s: %s (%d times in the last %.0f s)",
                self.what,
                detail,
                self.count,
                now - self.since,
            )
        self.count, self.since, self.last = 0, now, now


#: errno values of an accept that fails for want of resources (asyncio and uvloop retry).
_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
    if hasattr(errno, name)
)


class _OneFailurePerRound:
    """The listening socket as asyncio's accept loop sees it: after one accept failed for want
    of resources, the rest of the round reads as "nothing to accept".

    CPython's selector loop (3.11) keeps accepting after such a failure, scheduling another
    retry for each of up to ``backlog`` attempts: with the file-descriptor table full that made
    hundreds of thousands of failures (and log lines) in seconds, and at shutdown one error per
    retry still pending. Stopping the round leaves the loop's own retry, one per second.
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.failed = False

    def accept(self) -> Any:
        if self.failed:
            raise BlockingIOError
        try:
            return self.sock.accept()
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRNOS:
                self.failed = True
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def _fix_accept_rounds(loop: asyncio.AbstractEventLoop) -> None:
    """Give an asyncio selector loop's accept callback a :class:`_OneFailurePerRound` socket
    (uvloop accepts on its own: left alone)."""
    original = getattr(loop, "_accept_connection", None)
    if original is None or getattr(original, "_flowstate_fix", False):
        return

    def accept(protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(sock, _OneFailurePerRound):  # a retry scheduled with our wrapper
            sock = sock.sock
        return original(protocol_factory, _OneFailurePerRound(sock), *args, **kwargs)

    accept._flowstate_fix = True  # type: ignore[attr-defined]
    loop._accept_connection = accept  # type: ignore[attr-defined]


def _throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Route the event loop's reports of failing accepts (no file descriptor left) through a
    Throttled warning, and keep asyncio's loop from retrying them in a tight loop."""
    _fix_accept_rounds(loop)
    previous = loop.get_exception_handler()
    report = Throttled("cannot accept connections")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            report(exc.strerror or str(exc))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


class BodyDeadline:
    """A request body that sends nothing for ``timeout`` seconds is answered 408, for servers
    that cannot time it themselves (hypercorn: h2c, and HTTP/1.1 in its stack): the app then
    reads ``http.disconnect`` and whatever it sends is dropped."""

    def __init__(self, app: ASGIApp, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = started = answered = False
        timeout = self.timeout

        async def timed_receive() -> Message:
            nonlocal body_done, answered
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout(timeout):
                    message = await receive()
            except TimeoutError:
                body_done = True
                if not started:
                    answered = True
                    payload = stalled_answer(timeout)
                    await send(
                        {
                            "type": "http.response.start",
                            "status": 408,
                            "headers": [
                                (b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(payload)),
                                (b"connection", b"close"),
                            ],
                        }
                    )
                    await send({"type": "http.response.body", "body": payload})
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, timed_receive, guarded_send)


def stalled_answer(timeout: float) -> bytes:
    """The JSON error body of a request that stalled for ``timeout`` seconds."""
    message = f"request timed out: nothing received for {timeout:g} s"
    return json.dumps({"code": "deadline_exceeded", "message": message}).encode()


#: The client preface that opens an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: The most a request head (request line and headers) may take: a longer one is refused with
#: 400 and its connection closed (hypercorn's h11 limit was 16 KiB; httptools has none).
MAX_HEAD = 64 * 1024
_SNIFF_LIMIT = MAX_HEAD
#: Seconds a new connection may take to send enough of its first request to tell HTTP/1.1 from
#: HTTP/2 (as long as an idle keep-alive connection is kept).
FIRST_BYTES_TIMEOUT = 75.0


class CoalescedWrites:
    """A transport whose writes made in one turn of the event loop leave as one.

    uvicorn writes a response's head and its body with two ``write`` calls, each a ``send``
    system call on uvloop; coalesced, an answer costs one (about 5 % of the server's CPU per
    Commit). Everything else is the wrapped transport's; ``close`` sends what is pending
    first, ``abort`` drops it.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] | None = None

    def write(self, data: bytes) -> None:
        pending = self._pending
        if pending is None:
            self._pending = [data]
            self._loop.call_soon(self.flush)
        else:
            pending.append(data)

    def flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


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
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
) -> None:
    """HTTP/1.1 by uvicorn's httptools protocol, HTTP/2 (prior knowledge or ``Upgrade: h2c``)
    by hypercorn, on one socket: each connection goes to one of them by its first bytes.

    Stalls are timed here: on HTTP/1.1 by the protocol (a request whose head or body sends
    nothing for ``body_timeout`` seconds is answered 408 and closed), on h2c per stream by
    :class:`BodyDeadline`. At most ``max_connections`` connections are open: a new one beyond
    is closed at once (logged through a Throttled warning)."""
    import httptools
    import uvicorn
    from hypercorn.asyncio.tcp_server import TCPServer
    from hypercorn.asyncio.worker_context import WorkerContext
    from hypercorn.utils import wrap_app
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    connections = 0
    refused = Throttled("connection refused")

    def release() -> None:
        nonlocal connections
        connections -= 1

    class H1(HttpToolsProtocol):
        """uvicorn's protocol with a bound on the request head and a timeout on stalled
        requests (uvicorn waits for a stalled head or body forever)."""

        _head = 0
        _in_head = False
        _reading = False
        _stall: asyncio.TimerHandle | None = None

        def _count(self, size: int) -> None:
            self._head += size
            if self._head > MAX_HEAD:
                raise httptools.HttpParserError(f"request head over {MAX_HEAD} bytes")

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(CoalescedWrites(transport, loop))  # type: ignore[arg-type]

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def _watch(self) -> None:
            """(Re)start the stall timer while a request is being read, else stop it."""
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            if self._reading and not self.transport.is_closing():
                self._stall = loop.call_later(body_timeout, self._stalled)

        def _stalled(self) -> None:
            self._stall = None
            if self.transport.is_closing():
                return
            if self.flow.read_paused:  # we stopped reading, the app has not taken the body
                self._watch()
                return
            cycle = self.cycle
            if self._in_head or cycle is None or not cycle.response_started:
                if cycle is not None and not self._in_head:
                    # the app reads http.disconnect; whatever it answers is dropped
                    cycle.disconnected = True
                    cycle.message_event.set()
                payload = stalled_answer(body_timeout)
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(payload), payload)
                )
            self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            release()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            self._head = 0
            self._in_head = self._reading = True
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._reading = False
            super().on_message_complete()

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
    h2_app = wrap_app(
        BodyDeadline(app, body_timeout),  # type: ignore[arg-type]
        h2_config.wsgi_max_body_size,
        "asgi",
    )
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
            self.timer: asyncio.TimerHandle | None = None
            self.counted = False  # counts against max_connections until handed over or lost

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            nonlocal connections
            if connections >= max_connections:
                refused(f"{connections} connections open, the most allowed (--max-connections)")
                transport.abort()  # type: ignore[attr-defined]  # a Transport (uvloop's too)
                return
            connections += 1
            self.counted = True
            self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
            # as idle keep-alive connections: one that never tells its protocol is closed
            self.timer = loop.call_later(FIRST_BYTES_TIMEOUT, transport.close)

        def data_received(self, data: bytes) -> None:
            buffer = self.buffer + data
            kind = first_protocol(buffer)
            transport = self.transport
            if self.timer is not None:
                self.timer.cancel()
            if kind is None or transport is None:
                self.buffer = buffer
                if transport is not None:  # a request has begun: it may not stall
                    self.timer = loop.call_later(body_timeout, transport.close)
                return
            self.buffer = b""
            self.counted = False  # the protocol it is handed to releases it
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
            task.add_done_callback(lambda _: release())

        def eof_received(self) -> bool:
            return False  # closes the transport

        def connection_lost(self, exc: Exception | None) -> None:
            self.transport = None
            if self.timer is not None:
                self.timer.cancel()
            if self.counted:
                self.counted = False
                release()

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
    remote_hosts: Sequence[str] = (),
    allowed_hosts: Sequence[str] = (),
    body_timeout: float | None = None,
    max_connections: int | None = None,
) -> None:
    """Run the flowstate server until SIGINT or SIGTERM (a second signal exits at once).

    Serves the Driver service on ``store``, the Flow service with an engine whose flows are
    advertised through the store, HTTP/1.1 and h2c. The engine runs a recoverer and a delayer
    unless ``recoverer``/``delayer`` is False (None: as ``FLOWSTATE_NO_RECOVERER`` and
    ``FLOWSTATE_NO_DELAYER`` say; both off make the server a pure store). ``allowed_hosts``,
    ``body_timeout`` and ``max_connections``: see :func:`run_server`.
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
        allowed_hosts=allowed_hosts,
        body_timeout=body_timeout,
        max_connections=max_connections,
    )
    s.remote_hosts = tuple(remote_hosts)
    _json_logging()
    # The event loop gets the GIL back from a thread decoding a large body (or the SQLite
    # writer) after at most SWITCH_INTERVAL instead of Python's default 5 ms: /health p99 under
    # hostile 16 MiB bodies went from 43 to 32 ms (one sender). The server owns its process,
    # so the process-wide setting is ours to make; an embedded create_app leaves it alone.
    sys.setswitchinterval(SWITCH_INTERVAL)
    if (os.environ.get("FLOWSTATE_SERVER_LOOP") or DEFAULT_LOOP) == "uvloop":
        try:
            import uvloop
        except ImportError:  # not on every platform
            pass
        else:
            uvloop.run(_serve(s))
            return
    asyncio.run(_serve(s))


#: The interpreter's thread switch interval while `flowstate serve` runs (seconds).
SWITCH_INTERVAL = 0.001


async def _serve(s: Settings) -> None:
    stop = asyncio.Event()
    _on_signals(stop)
    host, port = parse_addr(s.addr)
    sock = listen(host, port)
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
            remote_hosts=s.remote_hosts or None,
            allowed_hosts=(*s.allowed_hosts, host),
            body_timeout=s.body_timeout,
            max_connections=s.max_connections,
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
    remote_hosts: Sequence[str] | None = None,
    allowed_hosts: Sequence[str] = (),
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_connections: int | None = None,
) -> None:
    """Serve ``driver`` on the listening ``sock`` until ``stop`` is set, as the Go app does:
    store, then a flow registry shared through the store (``http_host`` is this server's
    advertised address; ``flows`` registers the flows hosted here), then an engine with its
    recoverer and delayer (each unless turned off), then HTTP. ``remote_hosts``: the hosts the
    registry may call remote flows on (see :class:`~flowstate.netflow.NetFlowRegistry`).

    Requests must name this server in ``Host``: a loopback name, an IP address, the host of
    ``http_host``, this machine's host name when ``sock`` listens on every interface, or one of
    ``allowed_hosts`` (``"*"``: any). ``body_timeout`` and ``max_connections``: see
    :func:`serve_app`."""
    from flowstate.netflow import NetFlowRegistry
    from flowstate.server import demo as demo_flows

    stop = stop or asyncio.Event()
    registry = NetFlowRegistry(http_host, driver, token=token, remote_hosts=remote_hosts)
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
        bound = sock.getsockname()
        app = create_app(
            driver,
            token=token,
            cors_origins=cors_origins,
            max_body=max_body,
            engine=engine,
            allowed_hosts=server_names(bound[0], http_host, allowed_hosts),
        )
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
            await serve_app(
                app, sock, stop, body_timeout=body_timeout, max_connections=max_connections
            )
    finally:
        await registry.close()
        await engine.shutdown()
        log.info("stopped")


def server_names(bound: str, http_host: str, extra: Sequence[str] = ()) -> list[str]:
    """The host names a server listening on ``bound`` and advertised as ``http_host`` answers
    to besides loopback names and IP addresses: those, ``extra``, and this machine's host name
    when it listens on every interface."""
    from urllib.parse import urlsplit

    names = list(extra)
    advertised = urlsplit(http_host).hostname
    if advertised:
        names.append(advertised)
    if bound in ("0.0.0.0", "::", ""):
        names.append(socket.gethostname())
    return names


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
