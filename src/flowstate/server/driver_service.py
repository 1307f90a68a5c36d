"""The Driver service: each method performs one decoded command against the store driver and
returns it with its ctxs updated and its results filled (wire.md §4.2)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from flowstate import perform
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    DelayedState,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    StoreDataCmd,
)
from flowstate.drivers.base import Driver, load_into
from flowstate.errors import ValidationError
from flowstate.state import State
from flowstate.wire.limits import MAX_PAGE_ITEMS

T = TypeVar("T")

#: How the states of an answer are measured: :func:`state_size`, or the encoded size from the
#: server's cache of encodings (which then also serves the answer's encoding).
SizeOf = Callable[[State], int]
#: A handler performs the command and returns the approximate size of its answer in bytes
#: (0 when small: the request's own size is a bound then).
Handler = Callable[[Driver, Command, SizeOf], Awaitable[int]]

#: The most states (or delayed states) one answer carries; a larger limit is cut to it and
#: ``more`` tells the client to ask for the next page. Also what the codecs accept in a page.
MAX_PAGE = MAX_PAGE_ITEMS
#: A GetStates or GetDelayedStates page ends early (``more`` set) once its states reach about
#: this many bytes; it always carries at least one state, so that paging progresses.
MAX_PAGE_BYTES = 4 * 2**20


def state_size(state: State) -> int:
    """About how many bytes ``state`` takes encoded: its strings, and a few bytes a field.
    Map keys count as 40 bytes (they are at most 256); characters count as bytes."""
    size = 64 + len(state.id) + len(state.transition.to)
    annotations = state.annotations
    if annotations:
        size += sum(map(len, annotations.values())) + 40 * len(annotations)
    labels = state.labels
    if labels:
        size += sum(map(len, labels.values())) + 40 * len(labels)
    moved = state.transition.annotations
    if moved:
        size += sum(map(len, moved.values())) + 40 * len(moved)
    return size


def _cut(states: list[T], size_of: Callable[[T], int], budget: int) -> tuple[int, int]:
    """``(n, bytes)``: the first ``n`` of ``states`` (at least one) fit in ``budget`` bytes
    (``n == len(states)`` when all do); ``bytes`` is their size."""
    total = 0
    for i, size in enumerate(map(size_of, states)):
        if total + size > budget and i:
            return i, total
        total += size
    return len(states), total


#: The command field name of each command class (as wire.md names them), for messages.
_FIELD_NAMES: dict[type, str] = {
    GetStateByIdCmd: "get_state_by_id",
    GetStateByLabelsCmd: "get_state_by_labels",
    GetStatesCmd: "get_states",
    GetDelayedStatesCmd: "get_delayed_states",
    DelayCmd: "delay",
    CommitCmd: "commit",
    GetDataCmd: "get_data",
    StoreDataCmd: "store_data",
}


def command_name(cmd: Command) -> str:
    """The wire name of ``cmd``'s command field (``transit``, ``get_states``…)."""
    name = _FIELD_NAMES.get(type(cmd))
    if name is not None:
        return name
    base = type(cmd).__name__.removesuffix("Cmd")
    return "".join("_" + c.lower() if c.isupper() else c for c in base).lstrip("_")


async def get_state_by_id(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    assert isinstance(cmd, GetStateByIdCmd)
    perform.check_get_state_by_id(cmd)
    load_into(cmd.ctx, await driver.get_state(cmd.id, cmd.rev))
    return 2 * state_size(cmd.ctx.current)  # current and committed


async def get_state_by_labels(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    assert isinstance(cmd, GetStateByLabelsCmd)
    perform.check_map(cmd.labels, "get_state_by_labels.labels")
    load_into(cmd.ctx, await driver.get_state_by_labels(cmd.labels))
    return 2 * state_size(cmd.ctx.current)


async def get_states(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    assert isinstance(cmd, GetStatesCmd)
    perform.normalize_get_states(cmd)
    cmd.limit = min(cmd.limit, MAX_PAGE)
    result = cmd.result = await driver.read_states(cmd)  # only encoded: no copies needed
    states = result.states
    n, size = _cut(states, size_of, MAX_PAGE_BYTES)
    if n < len(states):
        # the page ends early: the client asks again from the last state it got
        del states[n:]
        result.more = True
        result.scanned_rev = 0
    return size


def _delayed_size(delayed: DelayedState) -> int:
    return state_size(delayed.state) + 16


async def get_delayed_states(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    assert isinstance(cmd, GetDelayedStatesCmd)
    perform.normalize_get_delayed_states(cmd, driver.clock.now())
    cmd.limit = min(cmd.limit, MAX_PAGE)
    assert cmd.until is not None
    result = await driver.get_delayed_states(cmd.since, cmd.until, cmd.offset, cmd.limit)
    cmd.result = result
    items = result.delayed_states
    n, size = _cut(items, _delayed_size, MAX_PAGE_BYTES)
    if n < len(items):
        del items[n:]
        result.more = True
    return size


async def delay(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    assert isinstance(cmd, DelayCmd)
    delayed = perform.prepare_delay(cmd, driver.clock.now())
    delayed.offset = await driver.delay(delayed)
    cmd.result = delayed
    return 0


async def commit(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    assert isinstance(cmd, CommitCmd)
    await driver.commit(cmd)
    return 0


async def get_data(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    """Always loads, even when the request already carries that data rev (as Go does)."""
    assert isinstance(cmd, GetDataCmd)
    if cmd.alias:
        cmd.ctx.datas.pop(cmd.alias, None)
    data = perform.prepare_get_data(cmd)
    assert data is not None
    await driver.get_data(data)
    return len(data.blob) * 4 // 3 + 2 * state_size(cmd.ctx.current)


async def store_data(driver: Driver, cmd: Command, size_of: SizeOf = state_size) -> int:
    """Always stores, even data the client's checksum says is clean (as Go does), and sets the
    state's reference annotation (Go leaves that to the client, which sets the same value)."""
    assert isinstance(cmd, StoreDataCmd)
    data = perform.prepare_store_data(cmd)
    if data is None:
        data = cmd.ctx.datas[cmd.alias]
    await driver.store_data(data)
    perform.link_data(cmd, data)
    return 0


#: Driver method -> (the command class its request must carry, the handler).
METHODS: dict[str, tuple[type, Handler]] = {
    "GetStateByID": (GetStateByIdCmd, get_state_by_id),
    "GetStateByLabels": (GetStateByLabelsCmd, get_state_by_labels),
    "GetStates": (GetStatesCmd, get_states),
    "GetDelayedStates": (GetDelayedStatesCmd, get_delayed_states),
    "Delay": (DelayCmd, delay),
    "Commit": (CommitCmd, commit),
    "GetData": (GetDataCmd, get_data),
    "StoreData": (StoreDataCmd, store_data),
}


async def perform_method(
    driver: Driver, method: str, cmd: Command, size_of: SizeOf = state_size
) -> int:
    """Run ``cmd`` as Driver method ``method``; ValidationError if it carries another command.
    Returns about how many bytes the answer takes (0: no more than the request), its states
    measured by ``size_of``."""
    expected, handler = METHODS[method]
    if type(cmd) is not expected:
        raise ValidationError(
            "command",
            f"{method} expects a {_FIELD_NAMES[expected]} command, got {command_name(cmd)}",
        )
    return await handler(driver, cmd, size_of)
