"""Flows and the registry that maps flow ids to them."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from flowstate.commands import Command
from flowstate.errors import FlowNotFoundError, ValidationError
from flowstate.perform import MAX_FLOW_ID_BYTES, check_text
from flowstate.state import StateCtx

if TYPE_CHECKING:
    from flowstate.engine import Engine


class Flow(Protocol):
    """Anything with ``execute(ctx, engine)`` returning (or awaiting to) a command."""

    def execute(self, ctx: StateCtx, engine: Engine) -> Command | Awaitable[Command]: ...


FlowFunc = Callable[[StateCtx, "Engine"], Any]
AsyncFlow = Callable[[StateCtx, "Engine"], Awaitable[Command]]
F = TypeVar("F", bound=Callable[..., Any])


class FlowRegistry:
    """Maps flow ids to flows.

    A flow is an ``async def f(ctx, engine)`` returning a command, a plain ``def`` (run in a
    worker thread, so it may block), or an object with such an ``execute`` method.
    """

    def __init__(self) -> None:
        self._flows: dict[str, AsyncFlow] = {}
        self._originals: dict[str, object] = {}

    def flow(self, flow_id: str) -> Callable[[F], F]:
        """Decorator: register the decorated function as flow ``flow_id``."""

        def register(fn: F) -> F:
            self.set_flow(flow_id, fn)
            return fn

        return register

    def set_flow(self, flow_id: str, flow: FlowFunc | Flow) -> None:
        """Register ``flow`` under ``flow_id``, replacing any previous one."""
        _check_id(flow_id)
        self._flows[flow_id] = _as_async(flow)
        self._originals[flow_id] = flow

    def unset_flow(self, flow_id: str) -> None:
        """Remove flow ``flow_id`` (no error if it is unknown)."""
        _check_id(flow_id)
        self._flows.pop(flow_id, None)
        self._originals.pop(flow_id, None)

    def get_flow(self, flow_id: str) -> AsyncFlow:
        """The flow registered as ``flow_id``, as an async callable. FlowNotFoundError if none."""
        _check_id(flow_id)
        try:
            return self._flows[flow_id]
        except KeyError:
            raise FlowNotFoundError(flow_id) from None

    def __contains__(self, flow_id: object) -> bool:
        return flow_id in self._flows

    def ids(self) -> list[str]:
        return sorted(self._flows)

    def has_flows(self) -> bool:
        """Whether this registry hosts any flow (the engine takes the recoverer and delayer
        roles by default only then)."""
        return bool(self._flows)

    async def hosts(self, flow_id: str) -> bool:
        """Whether a state transiting to ``flow_id`` can be run from this process: the recoverer
        and the delayer leave states of flows nobody here can run (behaviour.md §3)."""
        return flow_id in self._flows


def _check_id(flow_id: str) -> None:
    """A flow id must be one that a transition can carry (the caps of docs/limits.md)."""
    if not isinstance(flow_id, str) or not flow_id:
        raise ValidationError("flow_id", "flow id empty")
    check_text(flow_id, "flow_id", MAX_FLOW_ID_BYTES)


def _as_async(flow: FlowFunc | Flow) -> AsyncFlow:
    fn: Callable[..., Any]
    if callable(flow) and not hasattr(flow, "execute"):
        fn = flow
    elif hasattr(flow, "execute"):
        fn = flow.execute
    else:
        raise ValidationError("flow", f"{flow!r} is neither callable nor has execute()")
    if _is_async(fn):
        return cast(AsyncFlow, fn)

    async def in_thread(ctx: StateCtx, engine: Engine) -> Command:
        result = await asyncio.to_thread(fn, ctx, engine)
        if inspect.isawaitable(result):
            result = await result
        return result  # type: ignore[no-any-return]

    return in_thread


def _is_async(fn: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004
    return call is not None and inspect.iscoroutinefunction(call)
