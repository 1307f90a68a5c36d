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

# Caps on stored text and on queries, the same on every driver (docs/limits.md). Lengths count
# bytes of UTF-8, as the stores do: PostgreSQL refuses a btree entry above ~2.7 kB (ids are
# indexed), and SQLite and PostgreSQL fail on a query with too many label conditions.
#: The longest state id.
MAX_ID_BYTES = 1024
#: The longest flow id (a transition's ``to``, a registered flow): below the id cap, so that
#: the state advertising a remote flow (``flowstate.flow.<flow id>``) is within it.
MAX_FLOW_ID_BYTES = 1000
#: The longest label key and label value.
MAX_LABEL_KEY_BYTES = 256
MAX_LABEL_VALUE_BYTES = 1024
#: The longest annotation key (values have no cap here: the request size limit bounds them).
MAX_ANNOTATION_KEY_BYTES = 256
#: The most labels one state may carry.
MAX_STATE_LABELS = 256
#: The most label sets one query may OR together, and the most labels in all its sets.
MAX_QUERY_LABEL_SETS = 64
MAX_QUERY_LABELS = 256


def check_committable(ctx: StateCtx) -> None:
    """Validate the state a commit is about to store."""
    state = ctx.current
    if not state.id:
        raise ValidationError("current.id", "state id empty")
    if not isinstance(state.id, str):
        raise ValidationError("current.id", "state id must be a string")
    check_text(state.id, "current.id", MAX_ID_BYTES)
    check_labels(state.labels, "current.labels")
    check_annotations(state.annotations, "current.annotations")
    check_annotations(state.transition.annotations, "current.transition.annotations")
    if not isinstance(state.transition.to, str):
        raise ValidationError("current.transition.to", "must be a string")
    check_text(state.transition.to, "current.transition.to", MAX_FLOW_ID_BYTES)


def check_text(value: str, field: str, max_bytes: int | None = None) -> None:
    """Text a store keeps: valid Unicode (a lone surrogate has no UTF-8 form, so no store
    could keep it), no NUL (PostgreSQL cannot store it; refused on every driver so that a
    store can move between drivers), and at most ``max_bytes`` bytes of UTF-8."""
    problem = _text_problem(value, max_bytes)
    if problem:
        raise ValidationError(field, problem)


def _text_problem(value: str, max_bytes: int | None) -> str:
    """What is wrong with ``value`` as stored text, or "" if nothing."""
    if value.isascii():  # O(1) in CPython: ASCII has no surrogates and one byte a character
        size = len(value)
    else:
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            return "must be valid Unicode: a lone surrogate cannot be stored"
    if max_bytes is not None and size > max_bytes:
        return f"is {size:,} bytes of UTF-8; at most {max_bytes:,} allowed"
    if "\x00" in value:
        return "must not contain a NUL character"
    return ""


def check_int64(value: object, field: str, low: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _INT64_MAX:
        raise ValidationError(field, f"must be an integer in {low}..{_INT64_MAX}")


def check_labels(labels: Mapping[str, str], field: str, max_items: int = MAX_STATE_LABELS) -> None:
    """A state's labels, or the labels a query matches: at most ``max_items`` pairs, keys and
    values within their caps."""
    if len(labels) > max_items:
        raise ValidationError(field, f"{len(labels):,} labels; at most {max_items:,} allowed")
    _check_map(labels, field, "label key", MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES)


def check_annotations(annotations: Mapping[str, str], field: str) -> None:
    """Annotations (of a state, a transition or a data): keys within their cap."""
    _check_map(annotations, field, "annotation key", MAX_ANNOTATION_KEY_BYTES, None)


def check_map(values: Mapping[str, str], field: str) -> None:
    """:func:`check_labels` for a field named like labels (``current.labels``, ``labels[2]``,
    ``get_state_by_labels.labels``), else :func:`check_annotations`.

    The drivers, the engine and the server check the labels of ``get_state_by_labels``
    through this name, so the label caps reach every one of them.
    """
    if field.rpartition(".")[2].startswith("labels"):
        check_labels(values, field)
    else:
        check_annotations(values, field)


def _check_map(
    values: Mapping[str, str], field: str, key_kind: str, key_max: int, value_max: int | None
) -> None:
    """Keys must be non-empty strings and values strings (the wire cannot carry anything else),
    all of them valid stored text within the caps."""
    for key, value in values.items():
        if not isinstance(key, str) or not key:
            raise ValidationError(field, f"key {key!r} must be a non-empty string")
        if not isinstance(value, str):
            raise ValidationError(
                f"{field}[{key!r}]", f"value must be a string, got {type(value).__name__}"
            )
        # The common case (short ASCII) inline: this runs for every pair of every commit.
        if not (key.isascii() and len(key) <= key_max and "\x00" not in key):
            problem = _text_problem(key, key_max)
            if problem:
                raise ValidationError(field, f"{key_kind} {_short(key)} {problem}")
        if (
            not (value.isascii() and (value_max is None or len(value) <= value_max))
            or "\x00" in value
        ):
            check_text(value, f"{field}[{key!r}]", value_max)


def _short(text: str) -> str:
    """``text`` quoted for a message, shortened past 40 characters (a key may be kilobytes)."""
    return repr(text) if len(text) <= 40 else repr(text[:37]) + "…"


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
    check_text(cmd.id, "id", MAX_ID_BYTES)


def normalize_get_states(cmd: GetStatesCmd) -> None:
    """Validate a query and apply the defaults (limit 0 means 50)."""
    _check_limit(cmd.limit)
    if cmd.limit == 0:
        cmd.limit = DEFAULT_STATES_LIMIT
    if not isinstance(cmd.since_rev, int) or cmd.since_rev < -1:
        raise ValidationError("since_rev", "since_rev must be >= 0, or -1 for since latest")
    check_int64(cmd.since_rev, "since_rev", -1)
    # Every label is one condition in the stores' SQL: SQLite stops at an expression depth of
    # 1,000, PostgreSQL at 32,767 arguments. Refuse big queries before they reach a store.
    if len(cmd.labels) > MAX_QUERY_LABEL_SETS:
        raise ValidationError(
            "labels", f"{len(cmd.labels):,} label sets; at most {MAX_QUERY_LABEL_SETS} allowed"
        )
    total = sum(len(labels) for labels in cmd.labels)
    if total > MAX_QUERY_LABELS:
        raise ValidationError(
            "labels", f"{total:,} labels in all sets; at most {MAX_QUERY_LABELS} allowed"
        )
    for i, labels in enumerate(cmd.labels):
        check_labels(labels, f"labels[{i}]")


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
    # The alias becomes the state annotation key flowstate.data.<alias>: refuse it here,
    # before the data is stored, rather than at the commit of the state.
    problem = _text_problem(ref_annotation(alias), MAX_ANNOTATION_KEY_BYTES)
    if problem:
        raise ValidationError("alias", f"annotation key {_short(ref_annotation(alias))} {problem}")
    data = cmd.ctx.datas.get(alias)
    if data is None:
        raise ValidationError(
            "alias", f"no data with name {alias!r}; has it been loaded with get_data?"
        )
    if data.rev < 0:
        raise ValidationError("rev", "data rev is negative")
    if not isinstance(data.blob, bytes | bytearray):
        raise ValidationError("blob", f"data blob must be bytes, got {type(data.blob).__name__}")
    check_annotations(data.annotations, "data.annotations")
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
    # int() would also take " 1_0", "+1" and other scripts' digits
    if not (ref.isascii() and ref.isdigit()):
        raise ValidationError(
            f"current.annotations[{ref_key!r}]", f"data rev {ref!r} is not a decimal integer"
        )
    rev = int(ref)
    if rev <= 0:
        raise ValidationError(f"current.annotations[{ref_key!r}]", "data rev must be > 0")
    if rev > _INT64_MAX:  # no store has such a rev; SQLite and PostgreSQL cannot even look
        raise ValidationError(
            f"current.annotations[{ref_key!r}]", f"data rev must be <= {_INT64_MAX}"
        )
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
