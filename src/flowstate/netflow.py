"""Remote flows (wire.md §8): flows hosted by other processes, found through the store.

A process hosting flows advertises each of them as a parked state ``flowstate.flow.<id>`` that
names its address; every :class:`NetFlowRegistry` on the same store follows those states and
registers, for a flow hosted elsewhere, a :class:`RemoteFlow` that hands the state to the
hosting process's Flow service. The local execution then ends (the remote flow returns noop to
it) and the hosting process carries on; all state changes go through the shared store.

Anyone who can write to the store can write an advertisement, so a registry calls only the
hosts its operator allowed (``remote_hosts``; by default loopback addresses only): the bearer
token is never sent elsewhere, and an advertisement cannot make this process post anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from flowstate.commands import Command, NoopCmd, commit, get_states, park
from flowstate.drivers.base import Driver
from flowstate.errors import (
    FlowNotFoundError,
    FlowstateError,
    NotFoundError,
    RevMismatchError,
    ValidationError,
)
from flowstate.flow import AsyncFlow, Flow, FlowFunc, FlowRegistry
from flowstate.iterator import Watcher
from flowstate.server.connect import FLOW_EXECUTE, JSON, PROTO, decode_error, exception_of
from flowstate.state import State, StateCtx
from flowstate.wire import codec

if TYPE_CHECKING:
    from flowstate.engine import Engine

log = logging.getLogger("flowstate.netflow")

STATE_PREFIX = "flowstate.flow."
TYPE_LABEL = "flow.type"
REMOTE = "remote"
TRANSITION_ID = "flowstate.flow.transition_id"
HTTP_HOST = "flowstate.flow.http_host"
ACTION = "flowstate.flow.action"
SET = "set"
UNSET = "unset"
#: Environment variable listing the allowed remote hosts (comma-separated ``HOST[:PORT]``).
REMOTE_HOSTS_ENV = "FLOWSTATE_REMOTE_HOSTS"
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Refused hosts remembered (each is warned about once); past this, refusals are silent.
MAX_REFUSED = 1000

#: An allowed endpoint: (lower-case host, port); port None allows every port of the host.
Endpoint = tuple[str, int | None]


def parse_remote_hosts(entries: Iterable[str], field: str = "remote_hosts") -> frozenset[Endpoint]:
    """``HOST``, ``HOST:PORT``, ``[IPV6]:PORT`` (or a base URL ``http://HOST:PORT``) entries as
    endpoints; a malformed entry is a :class:`ValidationError` naming ``field``."""
    out: set[Endpoint] = set()
    for raw in entries:
        entry = raw.strip().rstrip("/")
        if not entry:
            continue
        url = entry if "://" in entry else "http://" + entry
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValidationError(field, f"{raw!r}: {exc}") from None
        host = parts.hostname
        if (
            not host
            or parts.scheme not in _DEFAULT_PORTS
            or parts.username is not None
            or parts.path
            or parts.query
            or parts.fragment
        ):
            raise ValidationError(field, f"{raw!r}: expected HOST or HOST:PORT")
        out.add((host.lower(), port))
    return frozenset(out)


def _endpoint(url: str) -> tuple[str, int] | None:
    """(host, port) of an advertised base URL; None when it is not a plain http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or not parts.hostname or parts.username is not None or parts.password:
        return None
    return parts.hostname.lower(), port if port is not None else default


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def flow_state_id(flow_id: str) -> str:
    """The id of the state that advertises flow ``flow_id``."""
    return STATE_PREFIX + flow_id


class RemoteFlow:
    """A flow run by another process: executing it posts the state to that process's Flow
    service, which runs the flow in the background, and returns noop."""

    def __init__(self, http_host: str, client: httpx.AsyncClient) -> None:
        self.http_host = http_host.rstrip("/")
        self._client = client

    async def execute(self, ctx: StateCtx, engine: Engine) -> Command:
        url = self.http_host + FLOW_EXECUTE
        try:
            response = await self._client.post(url, content=codec.encode_state_ctx(ctx))
        except httpx.TransportError as exc:
            raise FlowstateError(f"remote flow at {self.http_host}: {exc!r}") from exc
        if response.status_code != 200:
            ctype = response.headers.get("content-type", "").split(";", 1)[0].strip()
            if ctype not in ("", PROTO, JSON):
                raise FlowstateError(
                    f"remote flow at {self.http_host}: status {response.status_code}"
                )
            raise exception_of(decode_error(response.content, json_body=ctype == JSON))
        return NoopCmd()

    def __repr__(self) -> str:
        return f"RemoteFlow({self.http_host!r})"


class NetFlowRegistry(FlowRegistry):
    """A flow registry shared through the store by every process that uses one.

    ``http_host`` is the address other processes reach this one at (its server's base URL).
    Flows registered with :meth:`set_flow` are advertised once the registry is started (and
    withdrawn by :meth:`unset_flow`); flows advertised by other processes become
    :class:`RemoteFlow` proxies, learnt by following the advertisement states and, for a flow
    not seen yet, by reading its state on lookup. ``token`` (default ``FLOWSTATE_TOKEN``) is
    sent to the other processes' Flow services.

    ``remote_hosts`` lists the hosts this registry may call (``HOST`` or ``HOST:PORT``; default
    ``FLOWSTATE_REMOTE_HOSTS``, comma-separated). With none, only loopback hosts
    (``localhost``, ``127.0.0.0/8``, ``::1``) are called. An advertisement naming another host
    is ignored, with one warning per host.
    """

    def __init__(
        self,
        http_host: str,
        driver: Driver,
        *,
        token: str | None = None,
        remote_hosts: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        self.http_host = http_host.rstrip("/")
        self.driver = driver
        self.token = token if token is not None else os.environ.get("FLOWSTATE_TOKEN") or None
        if remote_hosts is None:
            field = REMOTE_HOSTS_ENV
            remote_hosts = os.environ.get(REMOTE_HOSTS_ENV, "").split(",")
        else:
            field = "remote_hosts"
        self.allowed: frozenset[Endpoint] = parse_remote_hosts(remote_hosts, field)
        self._refused: set[str] = set()  # hosts already warned about
        self._local: set[str] = set()
        self._remote: dict[str, str] = {}  # flow id -> host of the proxy registered for it
        self._proxies: dict[str, RemoteFlow] = {}
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._started = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # lifecycle

    async def start(self) -> NetFlowRegistry:
        """Open the store, advertise the local flows and start following the others."""
        if self._started:
            return self
        await self.driver.open()
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._stop.clear()
        for flow_id in sorted(self._local):
            await self.advertise(flow_id)
        self._follower = asyncio.create_task(self._follow())
        return self

    async def close(self) -> None:
        """Stop following, finish pending advertisements, release the store."""
        if not self._started:
            return
        self._started = False
        self._stop.set()
        self.driver.notifier.wake()
        if self._follower is not None:
            await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._proxies.clear()
        await self.driver.close()

    async def __aenter__(self) -> NetFlowRegistry:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # registration

    def set_flow(self, flow_id: str, flow: FlowFunc | Flow) -> None:
        """Host ``flow`` here and advertise it (in the background once started)."""
        super().set_flow(flow_id, flow)
        self._local.add(flow_id)
        self._remote.pop(flow_id, None)
        if self._started:
            self._spawn(self.advertise(flow_id))

    def unset_flow(self, flow_id: str) -> None:
        """Stop hosting ``flow_id`` (withdrawing it) or forget a remote one; unknown: no-op."""
        super().unset_flow(flow_id)
        if self._remote.pop(flow_id, None) is not None:
            return
        if flow_id in self._local:
            self._local.discard(flow_id)
            if self._started:
                self._spawn(self.withdraw(flow_id))

    def get_flow(self, flow_id: str) -> AsyncFlow:
        """The flow, local or a proxy; for an id not known yet, a flow that first looks it up
        in the store when run (FlowNotFoundError then if nobody hosts it)."""
        try:
            return super().get_flow(flow_id)
        except FlowNotFoundError:
            if not self._started:
                raise

        async def lookup_then_run(ctx: StateCtx, engine: Engine) -> Command:
            flow = await self.lookup(flow_id)
            return await flow(ctx, engine)

        return lookup_then_run

    async def lookup(self, flow_id: str) -> AsyncFlow:
        """The flow, reading its advertisement from the store if it is not registered."""
        try:
            return super().get_flow(flow_id)
        except FlowNotFoundError:
            pass
        try:
            state = await self.driver.get_state(flow_state_id(flow_id), 0)
        except NotFoundError:
            raise FlowNotFoundError(flow_id) from None
        self.apply(state)
        return super().get_flow(flow_id)

    def has_flows(self) -> bool:
        """A server's registry may run flows advertised by others: always a host."""
        return True

    async def hosts(self, flow_id: str) -> bool:
        """Whether ``flow_id`` is local or advertised by a live host in the store."""
        try:
            await self.lookup(flow_id)
        except FlowNotFoundError:
            return False
        return True

    def remote_hosts(self) -> dict[str, str]:
        """Flow id -> host, for the flows this process runs through a proxy."""
        return dict(self._remote)

    # the store

    async def advertise(self, flow_id: str) -> None:
        """Write (or refresh) the advertisement of local flow ``flow_id``."""
        ctx = await self._load(flow_id)
        state = ctx.current
        if (
            state.annotations.get(HTTP_HOST) == self.http_host
            and state.annotations.get(ACTION) == SET
            and state.labels.get(TYPE_LABEL) == REMOTE
        ):
            return
        state.labels[TYPE_LABEL] = REMOTE
        state.annotations[TRANSITION_ID] = flow_id
        state.annotations[HTTP_HOST] = self.http_host
        state.annotations[ACTION] = SET
        await self._park(ctx)

    async def withdraw(self, flow_id: str) -> None:
        """Mark the advertisement of ``flow_id`` unset (if this process wrote it last)."""
        ctx = await self._load(flow_id)
        if ctx.committed.rev == 0:
            log.warning("flow %r was never advertised; nothing to withdraw", flow_id)
            return
        if ctx.current.annotations.get(HTTP_HOST) != self.http_host:
            return  # another process hosts it now
        ctx.current.annotations[ACTION] = UNSET
        await self._park(ctx)

    def allows(self, url: str) -> bool:
        """Whether this registry may call (and send its token to) the host at base ``url``."""
        endpoint = _endpoint(url)
        if endpoint is None:
            return False
        host, port = endpoint
        if not self.allowed:
            return _is_loopback(host)
        return (host, None) in self.allowed or (host, port) in self.allowed

    def apply(self, state: State) -> None:
        """Register (or drop) the proxy an advertisement state describes; one naming a host
        that is not allowed changes nothing."""
        host = state.annotations.get(HTTP_HOST, "").rstrip("/")
        flow_id = state.annotations.get(TRANSITION_ID, "")
        if not host:
            log.warning("flow state %r names no http host", state.id)
            return
        if host == self.http_host:
            return
        if not self.allows(host):
            # once per host (the store may repeat it forever), for at most MAX_REFUSED hosts
            # (a stranger could write endless distinct ones)
            if host not in self._refused and len(self._refused) < MAX_REFUSED:
                self._refused.add(host)
                log.warning(
                    "ignoring remote flow %r advertised at %r: host not allowed "
                    "(allow it with --remote-host or %s)",
                    flow_id,
                    host,
                    REMOTE_HOSTS_ENV,
                )
            return
        if not flow_id:
            log.warning("flow state %r names no flow id", state.id)
            return
        if flow_id in self._local:
            return  # a flow hosted here is run here
        if state.annotation(ACTION) == UNSET:
            if self._remote.get(flow_id) == host:
                del self._remote[flow_id]
                FlowRegistry.unset_flow(self, flow_id)
            return
        FlowRegistry.set_flow(self, flow_id, self._proxy(host))
        self._remote[flow_id] = host

    async def _load(self, flow_id: str) -> StateCtx:
        try:
            return (await self.driver.get_state(flow_state_id(flow_id), 0)).to_ctx()
        except NotFoundError:
            return StateCtx(current=State(flow_state_id(flow_id)))

    async def _park(self, ctx: StateCtx) -> None:
        with contextlib.suppress(RevMismatchError):  # someone else wrote it meanwhile
            await self.driver.commit(commit(park(ctx)))

    async def _follow(self) -> None:
        """Apply every advertisement as it is committed (history first)."""
        cmd = get_states({TYPE_LABEL: REMOTE}, latest_only=True)
        while not self._stop.is_set():
            watcher = Watcher(self.driver, cmd, self._stop)
            try:
                async for state in watcher:
                    self.apply(state)
                    cmd.since_rev = state.rev
            except Exception:
                log.exception("following remote flows failed; retrying")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)

    def _proxy(self, host: str) -> RemoteFlow:
        if not self.allows(host):  # apply() checks first; this guards every other path
            raise FlowstateError(f"remote host {host!r} is not allowed")
        proxy = self._proxies.get(host)
        if proxy is None:
            if self._client is None:
                headers = {"content-type": PROTO}
                if self.token:
                    headers["authorization"] = f"Bearer {self.token}"
                self._client = httpx.AsyncClient(headers=headers, timeout=30.0)
            proxy = self._proxies[host] = RemoteFlow(host, self._client)
        return proxy

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("updating a flow advertisement failed")

        loop = self._loop
        assert loop is not None  # only called once started
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task = loop.create_task(run())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:  # registered from another thread (a plain-function flow, say)
            asyncio.run_coroutine_threadsafe(run(), loop)
