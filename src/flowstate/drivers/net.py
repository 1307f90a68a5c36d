"""NetDriver: a flowstate server (ours or the Go one) as the store, over flowstate.v1.

Each driver call is one Connect unary request carrying binary protobuf; connections are kept
alive and reused. Watchers learn about commits of other clients by polling the head rev, once
per driver and only while someone waits.

HTTP/1.1 goes through a small client of our own (:class:`_Pool`): a keep-alive pool of
asyncio connections that writes our one request shape (``POST``, a fixed set of headers, a
``Content-Length`` body) and parses answers (``Content-Length``, chunked, or delimited by the
close). httpx spent about 0.8 ms of CPU per request, several times the rest of a commit;
this path spends a few tens of µs. HTTP/2 (``http2=True``) still goes through httpx.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx

from flowstate.clock import Clock
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    DelayedState,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetDelayedStatesResult,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    GetStatesResult,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.data import Data, ref_annotation
from flowstate.drivers.base import CommitOutcome, Driver
from flowstate.errors import (
    CommitUnknownError,
    FlowstateError,
    StoreUnavailableError,
    ValidationError,
)
from flowstate.server.connect import DRIVER_SERVICE, JSON, PROTO, decode_error, exception_of
from flowstate.state import DELAY_COMMIT, DELAY_UNTIL, State, StateCtx
from flowstate.wire import codec

_ALIAS = "data"


class NetDriver(Driver):
    """A driver whose store is the flowstate server at ``url`` (``http://host:port``, with an
    optional path prefix).

    ``token`` (default: the ``FLOWSTATE_TOKEN`` environment variable) is sent as a bearer
    token. ``poll_interval`` is how often waiting watchers ask the server for its head rev.
    ``http2`` speaks cleartext HTTP/2 (h2c, prior knowledge) instead of HTTP/1.1.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        poll_interval: float = 0.05,
        timeout: float = 30.0,
        http2: bool = False,
        clock: Clock | None = None,
    ) -> None:
        super().__init__(clock)
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValidationError("url", f"{url!r}: expected http://host:port or https://…")
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get("FLOWSTATE_TOKEN") or None
        self.poll_interval: float = poll_interval
        self.timeout = timeout
        self.http2 = http2
        self._client: httpx.AsyncClient | None = None
        self._pool: _Pool | None = None
        self._host = parsed.host
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._tls = parsed.scheme == "https"
        self._netloc = parsed.netloc.decode("ascii")
        self._prefix = parsed.raw_path.decode("ascii").split("?", 1)[0].rstrip("/")
        self._heads: dict[str, bytes] = {}

    # lifecycle

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = {"content-type": PROTO, "accept": PROTO}
            if self.token:
                headers["authorization"] = f"Bearer {self.token}"
            self._client = httpx.AsyncClient(
                base_url=self.url,
                headers=headers,
                timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
                transport=httpx.AsyncHTTPTransport(
                    retries=1, http1=not self.http2, http2=self.http2
                ),
            )
        return self._client

    def _h1(self) -> _Pool:
        if self._pool is None:
            context = ssl.create_default_context() if self._tls else None
            self._pool = _Pool(self._host, self._port, context, min(self.timeout, 10.0))
        return self._pool

    async def _open(self) -> None:
        if self.http2:
            self._http()
        else:
            self._h1()

    async def _close(self) -> None:
        client, self._client = self._client, None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
        if client is not None:
            await client.aclose()

    # the wire

    def _head(self, method: str) -> bytes:
        """The request head of Driver method ``method``, up to the Content-Length value."""
        head = self._heads.get(method)
        if head is None:
            lines = [
                f"POST {self._prefix}{DRIVER_SERVICE}{method} HTTP/1.1",
                f"host: {self._netloc}",
                f"content-type: {PROTO}",
                f"accept: {PROTO}",
            ]
            if self.token:
                lines.append(f"authorization: Bearer {self.token}")
            head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
            self._heads[method] = head
        return head

    async def _call(self, method: str, cmd: Command, *, writes: bool) -> Command:
        """Send ``cmd`` to Driver method ``method``; the decoded answer (fresh objects)."""
        body = codec.encode_command(cmd)
        if self.http2:
            status, ctype, content = await self._post_httpx(method, body, writes)
        else:
            status, ctype, content = await self._post_h1(method, body, writes)
        if status != 200:
            raise self._error(status, ctype, content)
        try:
            return codec.decode_command(content)
        except ValidationError as exc:
            raise FlowstateError(f"{method}: undecodable answer from {self.url}: {exc}") from exc

    async def _post_h1(self, method: str, body: bytes, writes: bool) -> tuple[int, str, bytes]:
        request = b"%s%d\r\n\r\n%s" % (self._head(method), len(body), body)
        pool = self._h1()
        attempts = 1 if writes else 2
        for attempt in range(attempts):
            try:
                conn = await pool.acquire()
            except (OSError, TimeoutError) as exc:
                raise StoreUnavailableError(f"{self.url}: {exc!r}") from exc
            try:
                response = await conn.exchange(request, self.timeout)
            except _Lost as exc:
                pool.discard(conn)
                if writes:
                    raise CommitUnknownError(
                        f"{method} to {self.url} failed after the request was sent: {exc}"
                    ) from exc
                if attempt + 1 == attempts:
                    raise StoreUnavailableError(f"{self.url}: {exc}") from exc
                continue
            except BaseException:
                pool.discard(conn)  # cancelled mid-exchange: the connection is out of step
                raise
            pool.release(conn, response.keep_alive)
            return response.status, response.headers.get("content-type", ""), response.content
        raise AssertionError("unreachable")  # pragma: no cover

    async def _post_httpx(self, method: str, body: bytes, writes: bool) -> tuple[int, str, bytes]:
        path = DRIVER_SERVICE.removeprefix("/") + method
        client = self._http()
        attempts = 1 if writes else 2
        for attempt in range(attempts):
            try:
                response = await client.post(path, content=body)
                return (
                    response.status_code,
                    response.headers.get("content-type", ""),
                    response.content,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise StoreUnavailableError(f"{self.url}: {exc!r}") from exc
            except httpx.TransportError as exc:
                if writes:
                    raise CommitUnknownError(
                        f"{method} to {self.url} failed after the request was sent: {exc!r}"
                    ) from exc
                if attempt + 1 == attempts:
                    raise StoreUnavailableError(f"{self.url}: {exc!r}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, status: int, content_type: str, content: bytes) -> FlowstateError:
        ctype = content_type.split(";", 1)[0].strip()
        if ctype not in ("", PROTO, JSON):
            text = content[:800].decode("utf-8", "replace")[:200]
            return FlowstateError(f"response status code: {status}; {text!r}")
        try:
            err = decode_error(content, json_body=ctype == JSON)
        except ValidationError as exc:
            return FlowstateError(f"response status code: {status}; unmarshal error: {exc}")
        if not err.code:
            return FlowstateError(f"response status code: {status}; no error code")
        return exception_of(err)

    # Driver

    async def commit(self, cmd: CommitCmd) -> None:
        subs: list[Command] = []
        now = self.clock.now()
        for sub in cmd.commands:
            if isinstance(sub, DelayCmd) and sub.execute_at is None:
                # Only the absolute time travels: resolve "after" on this side's clock.
                at = now + sub.after if sub.after is not None else now
                sub = DelayCmd(sub.ctx, sub.to, at, None, sub.commit, sub.annotations)
            subs.append(sub)
        answer = await self._call("Commit", CommitCmd(subs), writes=True)
        if not isinstance(answer, CommitCmd) or len(answer.commands) != len(cmd.commands):
            raise FlowstateError(f"Commit: the answer does not match the request: {answer!r}")
        outcome = CommitOutcome()
        seen: set[int] = set()
        for mine, theirs in zip(cmd.commands, answer.commands, strict=True):
            if type(mine) is not type(theirs):
                raise FlowstateError(
                    f"Commit: answered {type(theirs).__name__} for {type(mine).__name__}"
                )
            for orig, got in zip(_ctxs(mine), _ctxs(theirs), strict=True):
                if id(orig) not in seen:
                    seen.add(id(orig))
                    outcome.pairs.append((orig, got))
            if isinstance(mine, TransitCmd | ParkCmd):
                outcome.max_rev = max(outcome.max_rev, _ctx_of(theirs).committed.rev)
            if isinstance(mine, DelayCmd) and isinstance(theirs, DelayCmd) and theirs.result:
                outcome.delays.append((mine, theirs.result))
        outcome.apply()
        if outcome.max_rev:
            self.notifier.notify(outcome.max_rev)

    async def get_state(self, state_id: str, rev: int) -> State:
        answer = await self._call(
            "GetStateByID", GetStateByIdCmd(StateCtx(), state_id, rev), writes=False
        )
        return _ctx_of(answer).current

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        cmd = GetStateByLabelsCmd(StateCtx(), dict(labels))
        answer = await self._call("GetStateByLabels", cmd, writes=False)
        return _ctx_of(answer).current

    async def get_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        answer = await self._call("GetStates", cmd.copy(), writes=False)
        result = answer.result if isinstance(answer, GetStatesCmd) else None
        if result is None:
            raise FlowstateError(f"GetStates: no result in the answer from {self.url}")
        return result

    async def delay(self, delayed: DelayedState) -> int:
        state = delayed.state
        annotations = dict(state.transition.annotations)
        annotations.pop(DELAY_UNTIL, None)  # the server sets it again from execute_at
        commit = annotations.get(DELAY_COMMIT) != "false"
        if not commit:
            del annotations[DELAY_COMMIT]
        ctx = StateCtx(current=state.copy())
        cmd = DelayCmd(ctx, state.transition.to, delayed.execute_at, None, commit, annotations)
        answer = await self._call("Delay", cmd, writes=True)
        result = answer.result if isinstance(answer, DelayCmd) else None
        return result.offset if result is not None else 0

    async def get_delayed_states(
        self, since: datetime | None, until: datetime, offset: int, limit: int
    ) -> GetDelayedStatesResult:
        cmd = GetDelayedStatesCmd(since, until, offset, limit)
        answer = await self._call("GetDelayedStates", cmd, writes=False)
        result = answer.result if isinstance(answer, GetDelayedStatesCmd) else None
        if result is None:
            raise FlowstateError(f"GetDelayedStates: no result in the answer from {self.url}")
        return result

    async def store_data(self, data: Data) -> None:
        ctx = StateCtx()
        ctx.datas[_ALIAS] = data
        answer = await self._call("StoreData", StoreDataCmd(ctx, _ALIAS), writes=True)
        stored = _ctx_of(answer).datas.get(_ALIAS)
        if stored is None or stored.rev <= 0:
            raise FlowstateError(f"StoreData: no data rev in the answer from {self.url}")
        data.rev = stored.rev
        data.annotations = stored.annotations

    async def get_data(self, data: Data) -> None:
        ctx = StateCtx()
        ctx.current.annotations[ref_annotation(_ALIAS)] = str(data.rev)
        answer = await self._call("GetData", GetDataCmd(ctx, _ALIAS), writes=False)
        loaded = _ctx_of(answer).datas.get(_ALIAS)
        if loaded is None:
            raise FlowstateError(f"GetData: no data in the answer from {self.url}")
        data.blob, data.annotations = loaded.blob, loaded.annotations

    async def head_rev(self) -> int:
        answer = await self._call("GetStates", GetStatesCmd(since_rev=-1, limit=1), writes=False)
        result = answer.result if isinstance(answer, GetStatesCmd) else None
        head = result.states[-1].rev if result is not None and result.states else 0
        return max(head, self.notifier.head)


def _ctx_of(cmd: Command) -> StateCtx:
    ctx: Any = getattr(cmd, "ctx", None)
    if not isinstance(ctx, StateCtx):
        raise FlowstateError(f"the answer {type(cmd).__name__} carries no state context")
    return ctx


def _ctxs(cmd: Command) -> list[StateCtx]:
    """The ctxs a sub-command of a commit touches, in wire order."""
    if isinstance(cmd, StackCmd):
        return [cmd.carrier, cmd.stacked]
    if isinstance(cmd, UnstackCmd):
        return [cmd.carrier, cmd.target]
    ctx = getattr(cmd, "ctx", None)
    return [ctx] if isinstance(ctx, StateCtx) else []


# --- HTTP/1.1 --------------------------------------------------------------------------------

_MAX_HEAD = 64 * 1024


class _Lost(Exception):
    """The exchange failed after the request may have reached the server: the connection
    closed or broke, the answer was malformed, or it did not come within the timeout."""


class _Response:
    __slots__ = ("content", "headers", "keep_alive", "status")

    def __init__(self, status: int, headers: dict[str, str], content: bytes, keep_alive: bool):
        self.status = status
        self.headers = headers
        self.content = content
        self.keep_alive = keep_alive


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, the answer parsed as bytes arrive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[_Response] | None = None
        self.reading = False  # an exchange waits for its answer
        self.timer: asyncio.TimerHandle | None = None
        self.broken = False
        self.eof = False
        # the answer being read: its head, once parsed
        self.status = 0
        self.headers: dict[str, str] | None = None
        self.body_at = 0
        self.length = -1  # -1: chunked, -2: until the connection closes
        self.chunks: list[bytes] = []  # chunked: the chunks read so far (body_at moves on)
        self.keep_alive = True

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.reading:
            self.broken = True  # bytes nobody asked for: the connection is out of step
            return
        self._parse()

    def eof_received(self) -> bool:
        self.eof = True
        if self.reading:
            self._parse()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.broken = True
        self._fail(f"connection lost: {exc!r}" if exc else "connection closed by the server")

    # the exchange

    def usable(self) -> bool:
        transport = self.transport
        return not (
            self.broken or self.eof or self.buf or transport is None or transport.is_closing()
        )

    async def exchange(self, request: bytes, timeout: float) -> _Response:
        """Send ``request`` and wait for the whole answer (at most ``timeout`` seconds)."""
        assert self.transport is not None and self.waiter is None
        waiter: asyncio.Future[_Response] = self.loop.create_future()
        self.waiter = waiter
        self.reading = True
        self.headers = None
        self.timer = self.loop.call_later(timeout, self._timed_out, timeout)
        try:
            self.transport.write(request)
            return await waiter
        finally:
            self.timer.cancel()
            self.timer = None
            self.waiter = None
            self.reading = False

    def close(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.broken = True
        if self.transport is not None:
            self.transport.abort()

    def _timed_out(self, timeout: float) -> None:
        self._fail(f"no answer within {timeout:g} s")
        self.abort()

    def _fail(self, why: str) -> None:
        self.reading = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(_Lost(why))

    def _parse(self) -> None:
        try:
            response = self._response()
        except _Lost as exc:
            self.broken = True
            self._fail(str(exc))
            return
        if response is None:
            if self.eof:
                self.broken = True
                self._fail("connection closed by the server before the whole answer")
            return
        self.reading = False
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def _response(self) -> _Response | None:
        """The answer if all of it is in the buffer (which it then leaves), else None."""
        buf = self.buf
        if self.headers is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    raise _Lost("answer head too large")
                return None
            self._read_head(bytes(buf[:end]))
            self.body_at = end + 4
            self.chunks = []
            if self.headers is None:  # an informational (1xx) answer: skip it
                del buf[: end + 4]
                return self._response()
        start = self.body_at
        length = self.length
        if length >= 0:
            stop = start + length
            if len(buf) < stop:
                return None
            content = bytes(buf[start:stop])
        elif length == -1:
            if not self._dechunk():
                return None
            content = b"".join(self.chunks)
            stop = self.body_at
        else:
            if not self.eof:
                return None
            stop = len(buf)
            content = bytes(buf[start:])
        keep_alive = self.keep_alive and stop == len(buf)
        del buf[:stop]
        headers = self.headers
        assert headers is not None
        return _Response(self.status, headers, content, keep_alive)

    def _dechunk(self) -> bool:
        """Read the complete chunks after ``body_at`` (which moves past them) into ``chunks``;
        True once the last chunk and the trailers are in."""
        buf = self.buf
        pos = self.body_at
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return False
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _Lost("malformed chunk size") from None
            if size == 0:
                if buf[eol + 2 : eol + 4] == b"\r\n":
                    self.body_at = eol + 4
                    return True
                end = buf.find(b"\r\n\r\n", eol + 2)  # trailers
                if end < 0:
                    return False
                self.body_at = end + 4
                return True
            if len(buf) < eol + 2 + size + 2:
                return False
            self.chunks.append(bytes(buf[eol + 2 : eol + 2 + size]))
            pos = self.body_at = eol + 2 + size + 2

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise ValueError
            status = int(parts[1])
        except ValueError:
            raise _Lost(f"not an HTTP/1.1 answer: {lines[0][:80]!r}") from None
        if 100 <= status < 200:
            return
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _Lost(f"malformed header line {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        connection = headers.get("connection", "").lower()
        keep_alive = parts[0] == b"HTTP/1.1" and "close" not in connection
        if "chunked" in headers.get("transfer-encoding", "").lower():
            length = -1
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise _Lost("malformed content-length") from None
            if length < 0:
                raise _Lost("malformed content-length")
        elif status in (204, 304):
            length = 0
        else:
            length = -2
            keep_alive = False
        self.status = status
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive


class _Pool:
    """Keep-alive HTTP/1.1 connections to one server: idle ones are reused (the most recent
    first), at most ``limit`` are open; a broken or cancelled exchange drops its connection."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        connect_timeout: float,
        limit: int = 100,
    ) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.connect_timeout = connect_timeout
        self.limit = limit
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def acquire(self) -> _Connection:
        idle = self.idle
        while True:
            while idle:
                conn = idle.pop()
                if conn.usable():
                    return conn
                self.discard(conn)
            if self.open < self.limit:
                break
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                self._wake()  # pass the turn on
                raise
        self.open += 1
        try:
            return await self._connect()
        except BaseException:
            self.open -= 1
            self._wake()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        error: BaseException | None = None
        for _ in range(2):  # one retry, like httpx's transport
            try:
                async with asyncio.timeout(self.connect_timeout):
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop),
                        self.host,
                        self.port,
                        ssl=self.context,
                        server_hostname=self.host if self.context is not None else None,
                    )
                return conn
            except (OSError, TimeoutError) as exc:
                error = exc
        assert error is not None
        raise error

    def release(self, conn: _Connection, keep_alive: bool) -> None:
        if keep_alive and not self.closed and conn.usable():
            self.idle.append(conn)
            self._wake()
        else:
            self.discard(conn)

    def discard(self, conn: _Connection) -> None:
        conn.abort()
        self.open -= 1
        self._wake()

    def _wake(self) -> None:
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
            self.open -= 1
