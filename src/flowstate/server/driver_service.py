"""The Driver service: each method performs one decoded command against the store driver and
returns it with its ctxs updated and its results filled (wire.md §4.2)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from flowstate import perform
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    StoreDataCmd,
)
from flowstate.drivers.base import Driver, load_into
from flowstate.errors import ValidationError

Handler = Callable[[Driver, Command], Awaitable[None]]

#: The most states (or delayed states) one answer carries; a larger limit is cut to it and
#: ``more`` tells the client to ask for the next page.
MAX_PAGE = 10_000

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


async def get_state_by_id(driver: Driver, cmd: Command) -> None:
    assert isinstance(cmd, GetStateByIdCmd)
    perform.check_get_state_by_id(cmd)
    load_into(cmd.ctx, await driver.get_state(cmd.id, cmd.rev))


async def get_state_by_labels(driver: Driver, cmd: Command) -> None:
    assert isinstance(cmd, GetStateByLabelsCmd)
    perform.check_map(cmd.labels, "get_state_by_labels.labels")
    load_into(cmd.ctx, await driver.get_state_by_labels(cmd.labels))


async def get_states(driver: Driver, cmd: Command) -> None:
    assert isinstance(cmd, GetStatesCmd)
    perform.normalize_get_states(cmd)
    cmd.limit = min(cmd.limit, MAX_PAGE)
    cmd.result = await driver.get_states(cmd)


async def get_delayed_states(driver: Driver, cmd: Command) -> None:
    assert isinstance(cmd, GetDelayedStatesCmd)
    perform.normalize_get_delayed_states(cmd, driver.clock.now())
    cmd.limit = min(cmd.limit, MAX_PAGE)
    assert cmd.until is not None
    cmd.result = await driver.get_delayed_states(cmd.since, cmd.until, cmd.offset, cmd.limit)


async def delay(driver: Driver, cmd: Command) -> None:
    assert isinstance(cmd, DelayCmd)
    delayed = perform.prepare_delay(cmd, driver.clock.now())
    delayed.offset = await driver.delay(delayed)
    cmd.result = delayed


async def commit(driver: Driver, cmd: Command) -> None:
    assert isinstance(cmd, CommitCmd)
    await driver.commit(cmd)


async def get_data(driver: Driver, cmd: Command) -> None:
    """Always loads, even when the request already carries that data rev (as Go does)."""
    assert isinstance(cmd, GetDataCmd)
    if cmd.alias:
        cmd.ctx.datas.pop(cmd.alias, None)
    data = perform.prepare_get_data(cmd)
    assert data is not None
    await driver.get_data(data)


async def store_data(driver: Driver, cmd: Command) -> None:
    """Always stores, even data the client's checksum says is clean (as Go does), and sets the
    state's reference annotation (Go leaves that to the client, which sets the same value)."""
    assert isinstance(cmd, StoreDataCmd)
    data = perform.prepare_store_data(cmd)
    if data is None:
        data = cmd.ctx.datas[cmd.alias]
    await driver.store_data(data)
    perform.link_data(cmd, data)


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


async def perform_method(driver: Driver, method: str, cmd: Command) -> None:
    """Run ``cmd`` as Driver method ``method``; ValidationError if it carries another command."""
    expected, handler = METHODS[method]
    if type(cmd) is not expected:
        raise ValidationError(
            "command",
            f"{method} expects a {_FIELD_NAMES[expected]} command, got {command_name(cmd)}",
        )
    await handler(driver, cmd)
