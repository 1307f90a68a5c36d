"""NetDriver: a flowstate server (ours or the Go one) as the store, over flowstate.v1.

Each driver call is one Connect unary request carrying binary protobuf; the connection is kept
alive and reused. Watchers learn about commits of other clients by polling the head rev, once
per driver and only while someone waits.
"""

from __future__ import annotations

import os
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

    async def _open(self) -> None:
        self._http()

    async def _close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # the wire

    async def _call(self, method: str, cmd: Command, *, writes: bool) -> Command:
        """Send ``cmd`` to Driver method ``method``; the decoded answer (fresh objects)."""
        body = codec.encode_command(cmd)
        path = DRIVER_SERVICE.removeprefix("/") + method
        client = self._http()
        attempts = 1 if writes else 2
        for attempt in range(attempts):
            try:
                response = await client.post(path, content=body)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                raise StoreUnavailableError(f"{self.url}: {exc!r}") from exc
            except httpx.TransportError as exc:
                if writes:
                    raise CommitUnknownError(
                        f"{method} to {self.url} failed after the request was sent: {exc!r}"
                    ) from exc
                if attempt + 1 == attempts:
                    raise StoreUnavailableError(f"{self.url}: {exc!r}") from exc
        if response.status_code != 200:
            raise self._error(response)
        try:
            return codec.decode_command(response.content)
        except ValidationError as exc:
            raise FlowstateError(f"{method}: undecodable answer from {self.url}: {exc}") from exc

    def _error(self, response: httpx.Response) -> FlowstateError:
        status = response.status_code
        ctype = response.headers.get("content-type", "").split(";", 1)[0].strip()
        if ctype not in ("", PROTO, JSON):
            return FlowstateError(f"response status code: {status}; {response.text[:200]!r}")
        try:
            err = decode_error(response.content, json_body=ctype == JSON)
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
