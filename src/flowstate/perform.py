"""The semantics of each command's in-memory part, shared by the engine and the drivers.

Drivers do the storage; everything a command does to a ctx (and every validation) is here, so
that every driver and the server behave the same.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import datetime, timedelta

from flowstate.clock import from_seconds, to_seconds
from flowstate.commands import (
    DEFAULT_DELAYED_LIMIT,
    DEFAULT_STATES_LIMIT,
    CommitCmd,
    DelayCmd,
    DelayedState,
    ExecuteCmd,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetStateByIdCmd,
    GetStatesCmd,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.data import CHECKSUM, Data, checksum, ref_annotation
from flowstate.errors import ValidationError
from flowstate.gotime import format_rfc3339
from flowstate.state import DELAY_COMMIT, DELAY_UNTIL, State, StateCtx, Transition


def transit(cmd: TransitCmd) -> None:
    if not cmd.to:
        raise ValidationError("to", "flow id empty")
    _move(cmd.ctx, Transition(cmd.to, dict(cmd.annotations)))


def park(cmd: ParkCmd) -> None:
    _move(cmd.ctx, Transition("", dict(cmd.annotations)))


def _move(ctx: StateCtx, transition: Transition) -> None:
    ctx.transitions.append(ctx.current.transition)
    ctx.current.transition = transition


def stack(cmd: StackCmd) -> None:
    from flowstate.wire.binary import encode_state_ctx

    name = cmd.annotation
    if not name:
        raise ValidationError("annotation", "stack annotation name empty")
    if cmd.carrier.current.annotations.get(name):
        raise ValidationError("annotation", f"stack annotation {name!r} already set")
    encoded = base64.b64encode(encode_state_ctx(cmd.stacked)).decode("ascii")
    cmd.carrier.current.annotations[name] = encoded


def unstack(cmd: UnstackCmd) -> None:
    from flowstate.wire.binary import decode_state_ctx

    name = cmd.annotation
    value = cmd.carrier.current.annotations.get(name, "")
    if not value:
        raise ValidationError("annotation", f"stack annotation {name!r} value empty")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError("annotation", f"stack annotation {name!r} is not base64") from exc
    try:
        decoded = decode_state_ctx(raw)
    except ValidationError as exc:
        raise ValidationError(
            "annotation", f"stack annotation {name!r} is not a StateCtx: {exc}"
        ) from None
    target = cmd.target
    target.current = decoded.current
    target.committed = decoded.committed
    target.transitions = decoded.transitions
    target.datas = decoded.datas
    cmd.carrier.current.annotations[name] = ""


#: The largest page a query may ask for.
MAX_LIMIT = 1_000_000
_INT64_MAX = 2**63 - 1


def check_committable(ctx: StateCtx) -> None:
    """Validate the state a commit is about to store."""
    state = ctx.current
    if not state.id:
        raise ValidationError("current.id", "state id empty")
    if not isinstance(state.id, str):
        raise ValidationError("current.id", "state id must be a string")
    check_text(state.id, "current.id")
    check_map(state.labels, "current.labels")
    check_map(state.annotations, "current.annotations")
    check_map(state.transition.annotations, "current.transition.annotations")
    if not isinstance(state.transition.to, str):
        raise ValidationError("current.transition.to", "must be a string")
    check_text(state.transition.to, "current.transition.to")


def check_text(value: str, field: str) -> None:
    """Text the stores keep must not contain NUL (PostgreSQL cannot store it; we refuse it on
    every driver so that a store can move between drivers)."""
    if "\x00" in value:
        raise ValidationError(field, "must not contain a NUL character")


def check_int64(value: object, field: str, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _INT64_MAX:
        raise ValidationError(field, f"must be an integer in {low}..{_INT64_MAX}")


def check_map(values: Mapping[str, str], field: str) -> None:
    """Keys must be non-empty strings and values strings (the wire cannot carry anything else)."""
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ValidationError(field, f"key {key!r} must be a non-empty string")
        if not isinstance(value, str):
            raise ValidationError(
                f"{field}[{key!r}]", f"value must be a string, got {type(value).__name__}"
            )
        check_text(key, field)
        check_text(value, f"{field}[{key!r}]")


def check_commit(cmd: CommitCmd) -> None:
    """Reject what may not appear inside a commit, before anything is performed."""
    if not cmd.commands:
        raise ValidationError("commands", "no commands to commit")
    for i, sub in enumerate(cmd.commands):
        bad = _NOT_IN_COMMIT.get(type(sub))
        if bad:
            raise ValidationError(f"commands[{i}]", f"{bad} command not allowed inside commit")


_NOT_IN_COMMIT: dict[type, str] = {
    CommitCmd: "commit",
    ExecuteCmd: "execute",
    GetStatesCmd: "get states",
    GetDelayedStatesCmd: "get delayed states",
}


def check_get_state_by_id(cmd: GetStateByIdCmd) -> None:
    if not cmd.id:
        raise ValidationError("id", "id is empty")
    if not isinstance(cmd.rev, int) or cmd.rev < 0:
        raise ValidationError("rev", "rev must be >= 0")
    check_int64(cmd.rev, "rev")
    check_text(cmd.id, "id")


def normalize_get_states(cmd: GetStatesCmd) -> None:
    """Validate a query and apply the defaults (limit 0 means 50)."""
    _check_limit(cmd.limit)
    if cmd.limit == 0:
        cmd.limit = DEFAULT_STATES_LIMIT
    if not isinstance(cmd.since_rev, int) or cmd.since_rev < -1:
        raise ValidationError("since_rev", "since_rev must be >= 0, or -1 for since latest")
    check_int64(cmd.since_rev, "since_rev", -1)
    for i, labels in enumerate(cmd.labels):
        check_map(labels, f"labels[{i}]")


def _check_limit(limit: object) -> None:
    if not isinstance(limit, int) or limit < 0:
        raise ValidationError("limit", "limit must be >= 0")
    if limit > MAX_LIMIT:
        raise ValidationError("limit", f"limit must be <= {MAX_LIMIT:,}; page with since_rev")


def normalize_get_delayed_states(cmd: GetDelayedStatesCmd, now: datetime) -> None:
    _check_limit(cmd.limit)
    if cmd.limit == 0:
        cmd.limit = DEFAULT_DELAYED_LIMIT
    if not isinstance(cmd.offset, int) or cmd.offset < 0:
        raise ValidationError("offset", "offset must be >= 0")
    check_int64(cmd.offset, "offset")
    if cmd.until is None:
        cmd.until = now


def prepare_store_data(cmd: StoreDataCmd) -> Data | None:
    """Validate; return the data if it must be written, else link the stored rev and return None."""
    alias = cmd.alias
    if not alias:
        raise ValidationError("alias", "name is empty")
    data = cmd.ctx.datas.get(alias)
    if data is None:
        raise ValidationError(
            "alias", f"no data with name {alias!r}; has it been loaded with get_data?"
        )
    if data.rev < 0:
        raise ValidationError("rev", "data rev is negative")
    if not isinstance(data.blob, bytes | bytearray):
        raise ValidationError("blob", f"data blob must be bytes, got {type(data.blob).__name__}")
    check_map(data.annotations, "data.annotations")
    if not data.dirty():
        link_data(cmd, data)
        return None
    data.annotations[CHECKSUM] = checksum(data.blob)
    return data


def link_data(cmd: StoreDataCmd, data: Data) -> None:
    cmd.ctx.current.annotations[ref_annotation(cmd.alias)] = str(data.rev)


def prepare_get_data(cmd: GetDataCmd) -> Data | None:
    """Validate; return the Data object to load into, or None if the local copy is current."""
    alias = cmd.alias
    if not alias:
        raise ValidationError("alias", "alias is empty")
    ref_key = ref_annotation(alias)
    ref = cmd.ctx.current.annotations.get(ref_key, "")
    if not ref:
        raise ValidationError(
            f"current.annotations[{ref_key!r}]", f"annotation {ref_key!r} is not set"
        )
    try:
        rev = int(ref)
    except ValueError:
        raise ValidationError(
            f"current.annotations[{ref_key!r}]", f"data rev {ref!r} is not an integer"
        ) from None
    if rev <= 0:
        raise ValidationError(f"current.annotations[{ref_key!r}]", "data rev must be > 0")
    data = cmd.ctx.datas.get(alias)
    if data is not None and data.rev == rev:
        return None
    if data is None:
        data = cmd.ctx.datas[alias] = Data()
    data.rev = rev
    data.blob = b""
    data.annotations.clear()
    return data


def prepare_delay(cmd: DelayCmd, now: datetime) -> DelayedState:
    """Build the delayed snapshot of ``cmd.ctx`` (the ctx itself is not modified)."""
    if not cmd.to:
        raise ValidationError("to", "flow id empty")
    at = cmd.execute_at
    if at is None:
        at = now + (cmd.after or timedelta())
    at = from_seconds(to_seconds(at))
    annotations = dict(cmd.annotations)
    annotations[DELAY_UNTIL] = format_rfc3339(at)
    if not cmd.commit:
        annotations[DELAY_COMMIT] = "false"
    state: State = cmd.ctx.current.copy()
    state.transition = Transition(cmd.to, annotations)
    check_committable(StateCtx(current=state))  # the delayer will commit it
    return DelayedState(state, at, 0)
