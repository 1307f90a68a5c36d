"""Binary protobuf codec of flowstate.v1 Commands, byte for byte what the Go encoder writes.

Builds on :mod:`flowstate.wire.binary` (the model messages). Encoding follows wire.md §3: fields
in ascending order, zero scalars omitted, ``StateCtxRef.idx`` always written, a noop as the
empty message. Decoding accepts any field order, ignores unknown fields, rejects a known field
with the wrong wire type, takes the first command field of the envelope (like Go) and resolves
references into the root ``state_ctxs`` list, one object per entry (wire.md §4.1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

from flowstate.clock import from_millis, from_seconds, to_millis, to_seconds
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    DelayedState,
    ExecuteCmd,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetDelayedStatesResult,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    GetStatesResult,
    NoopCmd,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.data import Data
from flowstate.errors import ValidationError
from flowstate.state import State, StateCtx, Transition
from flowstate.wire.binary import (
    LEN,
    VARINT,
    as_int64,
    close_message,
    open_message,
    put_bytes,
    put_int64,
    put_string_map,
    put_tag,
    put_varint,
    read_data,
    read_span,
    read_state,
    read_string,
    read_string_map_entry,
    read_transition,
    read_varint,
    skip_field,
    write_state,
    write_state_ctx,
)
from flowstate.wire.errors import WireError
from flowstate.wire.limits import (
    MAX_ANNOTATIONS,
    MAX_COMMIT_COMMANDS,
    MAX_DATAS,
    MAX_PAGE_ITEMS,
    MAX_QUERY_LABEL_SETS,
    MAX_QUERY_LABELS,
    MAX_STATE_CTXS,
    MAX_STATE_LABELS,
    Budget,
    too_many,
)
from flowstate.wire.refs import state_ctxs
from flowstate.wire.state_cache import EncodedStates

__all__ = [
    "decode_command",
    "decode_error",
    "decode_state_ctx",
    "encode_command",
    "encode_error",
    "encode_state_ctx",
]

# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

# Tags (field << 3 | LEN) of the Command envelope's command fields.
_TRANSIT = 3 << 3 | LEN
_PARK = 6 << 3 | LEN
_EXECUTE = 7 << 3 | LEN
_DELAY = 8 << 3 | LEN
_COMMIT = 9 << 3 | LEN
_NOOP = 10 << 3 | LEN
_STACK = 11 << 3 | LEN
_UNSTACK = 12 << 3 | LEN
_GET_STATE_BY_ID = 17 << 3 | LEN
_GET_STATE_BY_LABELS = 18 << 3 | LEN
_GET_STATES = 19 << 3 | LEN
_GET_DELAYED_STATES = 20 << 3 | LEN
_STORE_DATA = 21 << 3 | LEN
_GET_DATA = 22 << 3 | LEN

Refs = dict[int, int]
_MAX_FIELD = (1 << 29) - 1


def _put_ref(out: bytearray, tag: int, ctx: StateCtx | None, refs: Refs) -> None:
    if ctx is None:
        return
    idx = refs[id(ctx)]
    put_tag(out, tag)
    if idx < 0x80:
        out += bytes((2, 0x08, idx))
    else:
        size = bytearray()
        put_varint(size, idx)
        out.append(1 + len(size))
        out.append(0x08)
        out += size


def _put_str(out: bytearray, tag: int, text: str) -> None:
    if text:
        put_bytes(out, tag, text.encode())


def _put_time_sec(out: bytearray, tag: int, when: datetime | None, where: str) -> None:
    if when is not None:
        put_int64(out, tag, to_seconds(when), where)


def _write_delayed_state(out: bytearray, delayed: DelayedState) -> None:
    start = open_message(out, 0x0A)
    write_state(out, delayed.state)
    close_message(out, start)
    if delayed.offset:
        put_int64(out, 0x10, delayed.offset, "offset")
    seconds = to_seconds(delayed.execute_at)
    if seconds:
        put_int64(out, 0x18, seconds, "execute_at_sec")


def _write_transit(out: bytearray, cmd: TransitCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.ctx, refs)
    _put_str(out, 0x12, cmd.to)
    put_string_map(out, 0x1A, cmd.annotations, "transit.annotations")


def _write_park(out: bytearray, cmd: ParkCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.ctx, refs)
    put_string_map(out, 0x1A, cmd.annotations, "park.annotations")


def _write_execute(out: bytearray, cmd: ExecuteCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.ctx, refs)


def _write_delay(out: bytearray, cmd: DelayCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.ctx, refs)
    if cmd.result is not None:
        start = open_message(out, 0x12)
        _write_delayed_state(out, cmd.result)
        close_message(out, start)
    if cmd.execute_at is None and cmd.after is not None:
        raise WireError(
            "delay.execute_at_sec",
            "a delay given only as 'after' has no time yet; set execute_at before encoding",
        )
    _put_time_sec(out, 0x18, cmd.execute_at, "delay.execute_at_sec")
    if cmd.commit:
        out += b"\x20\x01"
    _put_str(out, 0x2A, cmd.to)
    put_string_map(out, 0x32, cmd.annotations, "delay.annotations")


def _write_commit(out: bytearray, cmd: CommitCmd, refs: Refs) -> None:
    for i, sub in enumerate(cmd.commands):
        if type(sub) is CommitCmd:
            raise WireError(f"commit.commands[{i}]", "a commit inside a commit is not allowed")
        start = open_message(out, 0x0A)
        _write_command_field(out, sub, refs)
        close_message(out, start)


def _write_noop(out: bytearray, cmd: NoopCmd, refs: Refs) -> None:
    pass


def _write_stack(out: bytearray, cmd: StackCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.carrier, refs)
    _put_ref(out, 0x12, cmd.stacked, refs)
    _put_str(out, 0x1A, cmd.annotation)


def _write_unstack(out: bytearray, cmd: UnstackCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.carrier, refs)
    _put_ref(out, 0x12, cmd.target, refs)
    _put_str(out, 0x1A, cmd.annotation)


def _write_data_cmd(out: bytearray, cmd: StoreDataCmd | GetDataCmd, refs: Refs) -> None:
    _put_ref(out, 0x0A, cmd.ctx, refs)
    _put_str(out, 0x12, cmd.alias)


def _write_get_state_by_id(out: bytearray, cmd: GetStateByIdCmd, refs: Refs) -> None:
    _put_str(out, 0x0A, cmd.id)
    if cmd.rev:
        put_int64(out, 0x10, cmd.rev, "get_state_by_id.rev")
    _put_ref(out, 0x1A, cmd.ctx, refs)


def _write_get_state_by_labels(out: bytearray, cmd: GetStateByLabelsCmd, refs: Refs) -> None:
    put_string_map(out, 0x0A, cmd.labels, "get_state_by_labels.labels")
    _put_ref(out, 0x12, cmd.ctx, refs)


def _write_get_states(
    out: bytearray, cmd: GetStatesCmd, refs: Refs, states: EncodedStates | None = None
) -> None:
    if cmd.since_rev:
        put_int64(out, 0x08, cmd.since_rev, "get_states.since_rev")
    if cmd.since_time is not None:
        put_int64(out, 0x10, to_millis(cmd.since_time), "get_states.since_time_usec")
    for labels in cmd.labels:
        start = open_message(out, 0x1A)
        put_string_map(out, 0x0A, labels, "get_states.labels")
        close_message(out, start)
    if cmd.latest_only:
        out += b"\x20\x01"
    if cmd.limit:
        put_int64(out, 0x28, cmd.limit, "get_states.limit")
    result = cmd.result
    if result is not None:
        start = open_message(out, 0x32)
        if states is not None:
            for state in result.states:
                states.write_entry(out, state)
        else:
            for state in result.states:
                sub = open_message(out, 0x0A)
                write_state(out, state)
                close_message(out, sub)
        if result.more:
            out += b"\x10\x01"
        if result.scanned_rev:  # an extension of flowstate.v1; Go skips the unknown field
            put_int64(out, 0x18, result.scanned_rev, "get_states.result.scanned_rev")
        close_message(out, start)


def _write_get_delayed_states(out: bytearray, cmd: GetDelayedStatesCmd, refs: Refs) -> None:
    _put_time_sec(out, 0x08, cmd.since, "get_delayed_states.since_time_sec")
    _put_time_sec(out, 0x10, cmd.until, "get_delayed_states.until_time_sec")
    if cmd.offset:
        put_int64(out, 0x18, cmd.offset, "get_delayed_states.offset")
    if cmd.limit:
        put_int64(out, 0x20, cmd.limit, "get_delayed_states.limit")
    result = cmd.result
    if result is not None:
        start = open_message(out, 0x2A)
        for delayed in result.delayed_states:
            sub = open_message(out, 0x0A)
            _write_delayed_state(out, delayed)
            close_message(out, sub)
        if result.more:
            out += b"\x10\x01"
        close_message(out, start)


_Writer = Callable[[bytearray, Any, Refs], None]
_WRITERS: dict[type, tuple[int, _Writer]] = {
    TransitCmd: (_TRANSIT, _write_transit),
    ParkCmd: (_PARK, _write_park),
    ExecuteCmd: (_EXECUTE, _write_execute),
    DelayCmd: (_DELAY, _write_delay),
    CommitCmd: (_COMMIT, _write_commit),
    NoopCmd: (_NOOP, _write_noop),
    StackCmd: (_STACK, _write_stack),
    UnstackCmd: (_UNSTACK, _write_unstack),
    GetStateByIdCmd: (_GET_STATE_BY_ID, _write_get_state_by_id),
    GetStateByLabelsCmd: (_GET_STATE_BY_LABELS, _write_get_state_by_labels),
    GetStatesCmd: (_GET_STATES, _write_get_states),
    GetDelayedStatesCmd: (_GET_DELAYED_STATES, _write_get_delayed_states),
    StoreDataCmd: (_STORE_DATA, _write_data_cmd),
    GetDataCmd: (_GET_DATA, _write_data_cmd),
}


def _write_command_field(out: bytearray, cmd: Command, refs: Refs) -> None:
    entry = _WRITERS.get(type(cmd))
    if entry is None:
        raise WireError("command", f"{type(cmd).__name__} has no flowstate.v1 encoding")
    tag, writer = entry
    start = open_message(out, tag)
    writer(out, cmd, refs)
    close_message(out, start)


def _encode_failure(exc: Exception, where: str) -> WireError:
    if isinstance(exc, WireError):
        return exc
    if isinstance(exc, ValidationError):
        return WireError(exc.field, exc.reason)
    if isinstance(exc, UnicodeEncodeError):
        return WireError(where, "a string is not valid UTF-8 (lone surrogate)")
    return WireError(where, f"cannot encode: {exc}")


def encode_command(cmd: Command, states: EncodedStates | None = None) -> bytes:
    """Encode ``cmd`` as a binary Command: the ``state_ctxs`` list, then its command field.
    ``states``: the store's cache of encoded versions, for the states of a GetStates answer
    (see :mod:`flowstate.wire.state_cache`; the event loop's thread only)."""
    ctxs, refs = state_ctxs(cmd)
    out = bytearray()
    try:
        for i, ctx in enumerate(ctxs):
            start = open_message(out, 0x0A)
            try:
                write_state_ctx(out, ctx)
            except ValidationError as exc:
                raise WireError(f"state_ctxs[{i}].{exc.field}", exc.reason) from None
            close_message(out, start)
        if states is not None and type(cmd) is GetStatesCmd:
            start = open_message(out, _GET_STATES)
            _write_get_states(out, cmd, refs, states)
            close_message(out, start)
        else:
            _write_command_field(out, cmd, refs)
    except (ValidationError, UnicodeEncodeError, AttributeError, TypeError, ValueError) as exc:
        raise _encode_failure(exc, "command") from None
    return bytes(out)


def encode_state_ctx(ctx: StateCtx) -> bytes:
    """Encode a StateCtx message (the body of Flow/Execute)."""
    out = bytearray()
    try:
        write_state_ctx(out, ctx)
    except (ValidationError, UnicodeEncodeError, AttributeError, TypeError, ValueError) as exc:
        raise _encode_failure(exc, "state_ctx") from None
    return bytes(out)


def encode_error(code: str, message: str) -> bytes:
    """Encode the Error message of wire.md §2.9 (1 code, 2 message)."""
    out = bytearray()
    _put_str(out, 0x0A, code)
    _put_str(out, 0x12, message.encode("utf-8", "replace").decode())
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _fields(buf: bytes, pos: int, end: int, where: str) -> Iterator[tuple[int, int, int, int]]:
    """The fields of ``buf[pos:end]`` as ``(field, wire_type, start, stop)``, one at a time
    (so that a reader can stop at a cap before the rest is even split).

    For LEN fields ``start:stop`` is the payload; for VARINT fields ``start`` is the value.
    Other wire types are skipped (they belong to no known field of flowstate.v1).
    """
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, where)
        field = tag >> 3
        wire_type = tag & 7
        if field == 0 or field > _MAX_FIELD:
            raise WireError(where, f"invalid field number {field}")
        if wire_type == LEN:
            start, pos = read_span(buf, pos, end, where)
            yield field, LEN, start, pos
        elif wire_type == VARINT:
            value, pos = read_varint(buf, pos, end, where)
            yield field, VARINT, value, 0
        else:
            after = skip_field(buf, pos, end, wire_type, where)
            yield field, wire_type, pos, after
            pos = after


def _expect(wire_type: int, want: int, where: str) -> None:
    if wire_type != want:
        raise WireError(where, f"wrong wire type {wire_type} (expected {want})")


class _Ctxs:
    """The decoded root ``state_ctxs``; resolves references by index."""

    __slots__ = ("budget", "items")

    def __init__(self, items: list[StateCtx], budget: Budget) -> None:
        self.items = items
        self.budget = budget

    def resolve(self, buf: bytes, start: int, stop: int, where: str) -> StateCtx:
        idx = 0
        for field, wire_type, value, _ in _fields(buf, start, stop, where):
            if field == 1:
                _expect(wire_type, VARINT, f"{where}.idx")
                idx = as_int64(value)
        items = self.items
        if not 0 <= idx < len(items):
            raise WireError(
                f"{where}.idx",
                f"{idx} does not refer to a state context (state_ctxs has {len(items)})",
            )
        return items[idx]


def _missing_ref(where: str) -> WireError:
    return WireError(where, "missing state context reference")


def _str_field(buf: bytes, wire_type: int, start: int, stop: int, where: str) -> str:
    _expect(wire_type, LEN, where)
    return read_string(buf, start, stop, where)


def _int_field(wire_type: int, value: int, where: str) -> int:
    _expect(wire_type, VARINT, where)
    return as_int64(value)


def _map_entry(
    buf: bytes,
    wire_type: int,
    start: int,
    stop: int,
    target: dict[str, str],
    where: str,
    ctxs: _Ctxs,
    cap: int = MAX_ANNOTATIONS,
) -> None:
    """One entry of a command's map field, within ``cap`` entries and the message's budget."""
    _expect(wire_type, LEN, where)
    read_string_map_entry(buf, start, stop, target, where)
    if len(target) > cap:
        raise too_many(where, cap, "entries")
    ctxs.budget.take(1, where)


def _time_ms(value: int, where: str) -> datetime:
    try:
        return from_millis(value)
    except OverflowError:
        raise WireError(where, f"{value} ms is out of range") from None


def _time_sec(value: int, where: str) -> datetime:
    try:
        return from_seconds(value)
    except OverflowError:
        raise WireError(where, f"{value} s is out of range") from None


def _rebase(exc: ValidationError, where: str, own: str) -> WireError:
    """Re-anchor an error of :mod:`flowstate.wire.binary` (named after the message ``own``)
    at the path ``where``."""
    if isinstance(exc, WireError):
        return exc
    field = exc.field
    if field == own:
        return WireError(where, exc.reason)
    if field.startswith(own + "."):
        field = field[len(own) + 1 :]
    return WireError(f"{where}.{field}", exc.reason)


def _state(buf: bytes, start: int, stop: int, where: str, state: State | None = None) -> State:
    if state is None:
        state = State()
    try:
        read_state(buf, start, stop, state)
    except ValidationError as exc:
        raise _rebase(exc, where, "state") from None
    return state


def _data_entry(buf: bytes, start: int, stop: int, datas: dict[str, Data], where: str) -> Data:
    alias = ""
    span: tuple[int, int] | None = None
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            alias = _str_field(buf, wire_type, a, b, where)
        elif field == 2:
            _expect(wire_type, LEN, where)
            span = (a, b)
    if not alias:
        raise WireError(where, "map key cannot be empty")
    if span is None:
        datas[alias] = data = Data()
        return data
    try:
        datas[alias] = data = read_data(buf, span[0], span[1])
    except ValidationError as exc:
        raise _rebase(exc, f"{where}[{alias!r}]", "data") from None
    return data


def _state_ctx(buf: bytes, start: int, stop: int, where: str, budget: Budget) -> StateCtx:
    ctx = StateCtx()
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 2:
            _expect(wire_type, LEN, f"{where}.current")
            _state(buf, a, b, f"{where}.current", ctx.current)
        elif field == 1:
            _expect(wire_type, LEN, f"{where}.committed")
            _state(buf, a, b, f"{where}.committed", ctx.committed)
        elif field == 3:
            at = f"{where}.transitions[{len(ctx.transitions)}]"
            _expect(wire_type, LEN, at)
            transition = Transition()
            try:
                read_transition(buf, a, b, transition)
            except ValidationError as exc:
                raise _rebase(exc, at, "transition") from None
            ctx.transitions.append(transition)
            budget.transition(len(transition.annotations), at)
        elif field == 4:
            _expect(wire_type, LEN, f"{where}.datas")
            data = _data_entry(buf, a, b, ctx.datas, f"{where}.datas")
            if len(ctx.datas) > MAX_DATAS:
                raise too_many(f"{where}.datas", MAX_DATAS, "datas")
            budget.take(1 + len(data.annotations), f"{where}.datas")
    budget.state(ctx.current, f"{where}.current")
    budget.state(ctx.committed, f"{where}.committed")
    return ctx


def _delayed_state(buf: bytes, start: int, stop: int, where: str) -> DelayedState:
    state: State | None = None
    offset = 0
    seconds = 0
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _expect(wire_type, LEN, f"{where}.state")
            state = _state(buf, a, b, f"{where}.state", state)
        elif field == 2:
            offset = _int_field(wire_type, a, f"{where}.offset")
        elif field == 3:
            seconds = _int_field(wire_type, a, f"{where}.execute_at_sec")
    return DelayedState(
        state if state is not None else State(),
        _time_sec(seconds, f"{where}.execute_at_sec"),
        offset,
    )


def _read_transit(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    ctx: StateCtx | None = None
    to = ""
    annotations: dict[str, str] = {}
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _expect(wire_type, LEN, f"{where}.state_ref")
            ctx = ctxs.resolve(buf, a, b, f"{where}.state_ref")
        elif field == 2:
            to = _str_field(buf, wire_type, a, b, f"{where}.to")
        elif field == 3:
            _map_entry(buf, wire_type, a, b, annotations, f"{where}.annotations", ctxs)
    if ctx is None:
        raise _missing_ref(f"{where}.state_ref")
    return TransitCmd(ctx, to, annotations)


def _read_park(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    ctx: StateCtx | None = None
    annotations: dict[str, str] = {}
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _expect(wire_type, LEN, f"{where}.state_rexf")
            ctx = ctxs.resolve(buf, a, b, f"{where}.state_rexf")
        elif field == 3:
            _map_entry(buf, wire_type, a, b, annotations, f"{where}.annotations", ctxs)
    if ctx is None:
        raise _missing_ref(f"{where}.state_rexf")
    return ParkCmd(ctx, annotations)


def _read_single_ref(
    buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str, *, alias_field: bool = True
) -> tuple[StateCtx, str]:
    """The ``state_ref`` (1) and ``alias`` (2) shared by execute, store_data and get_data."""
    ctx: StateCtx | None = None
    alias = ""
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _expect(wire_type, LEN, f"{where}.state_ref")
            ctx = ctxs.resolve(buf, a, b, f"{where}.state_ref")
        elif field == 2 and alias_field:
            alias = _str_field(buf, wire_type, a, b, f"{where}.alias")
    if ctx is None:
        raise _missing_ref(f"{where}.state_ref")
    return ctx, alias


def _read_execute(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    return ExecuteCmd(_read_single_ref(buf, start, stop, ctxs, where, alias_field=False)[0])


def _read_store_data(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    return StoreDataCmd(*_read_single_ref(buf, start, stop, ctxs, where))


def _read_get_data(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    return GetDataCmd(*_read_single_ref(buf, start, stop, ctxs, where))


def _read_delay(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    ctx: StateCtx | None = None
    result: DelayedState | None = None
    execute_at: datetime | None = None
    commit = False
    to = ""
    annotations: dict[str, str] = {}
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _expect(wire_type, LEN, f"{where}.state_ref")
            ctx = ctxs.resolve(buf, a, b, f"{where}.state_ref")
        elif field == 2:
            _expect(wire_type, LEN, f"{where}.result")
            result = _delayed_state(buf, a, b, f"{where}.result")
        elif field == 3:
            seconds = _int_field(wire_type, a, f"{where}.execute_at_sec")
            execute_at = _time_sec(seconds, f"{where}.execute_at_sec")
        elif field == 4:
            _expect(wire_type, VARINT, f"{where}.commit")
            commit = a != 0
        elif field == 5:
            to = _str_field(buf, wire_type, a, b, f"{where}.to")
        elif field == 6:
            _map_entry(buf, wire_type, a, b, annotations, f"{where}.annotations", ctxs)
    if ctx is None:
        raise _missing_ref(f"{where}.state_ref")
    return DelayCmd(
        ctx, to, execute_at=execute_at, commit=commit, annotations=annotations, result=result
    )


def _read_commit(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    commands: list[Command] = []
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            if len(commands) >= MAX_COMMIT_COMMANDS:
                raise too_many(f"{where}.commands", MAX_COMMIT_COMMANDS, "commands")
            at = f"{where}.commands[{len(commands)}]"
            _expect(wire_type, LEN, at)
            commands.append(_read_envelope(buf, a, b, ctxs, at, nested=True))
    return CommitCmd(commands)


def _read_noop(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    for _ in _fields(buf, start, stop, where):
        pass  # validates the framing; a noop has no fields we read
    return NoopCmd()


def _read_pair(
    buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str, second: str
) -> tuple[StateCtx, StateCtx, str]:
    carrier: StateCtx | None = None
    other: StateCtx | None = None
    annotation = ""
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _expect(wire_type, LEN, f"{where}.carrier_state_ref")
            carrier = ctxs.resolve(buf, a, b, f"{where}.carrier_state_ref")
        elif field == 2:
            _expect(wire_type, LEN, f"{where}.{second}")
            other = ctxs.resolve(buf, a, b, f"{where}.{second}")
        elif field == 3:
            annotation = _str_field(buf, wire_type, a, b, f"{where}.annotation")
    if carrier is None:
        raise _missing_ref(f"{where}.carrier_state_ref")
    if other is None:
        raise _missing_ref(f"{where}.{second}")
    return carrier, other, annotation


def _read_stack(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    return StackCmd(*_read_pair(buf, start, stop, ctxs, where, "stack_state_ref"))


def _read_unstack(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    return UnstackCmd(*_read_pair(buf, start, stop, ctxs, where, "unstack_state_ref"))


def _read_get_state_by_id(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    ctx: StateCtx | None = None
    state_id = ""
    rev = 0
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            state_id = _str_field(buf, wire_type, a, b, f"{where}.id")
        elif field == 2:
            rev = _int_field(wire_type, a, f"{where}.rev")
        elif field == 3:
            _expect(wire_type, LEN, f"{where}.state_ref")
            ctx = ctxs.resolve(buf, a, b, f"{where}.state_ref")
    if ctx is None:
        raise _missing_ref(f"{where}.state_ref")
    return GetStateByIdCmd(ctx, state_id, rev)


def _read_get_state_by_labels(
    buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str
) -> Command:
    ctx: StateCtx | None = None
    labels: dict[str, str] = {}
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            _map_entry(buf, wire_type, a, b, labels, f"{where}.labels", ctxs, MAX_STATE_LABELS)
        elif field == 2:
            _expect(wire_type, LEN, f"{where}.state_ref")
            ctx = ctxs.resolve(buf, a, b, f"{where}.state_ref")
    if ctx is None:
        raise _missing_ref(f"{where}.state_ref")
    return GetStateByLabelsCmd(ctx, labels)


def _read_get_states(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    cmd = GetStatesCmd(limit=0)
    total = 0
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            cmd.since_rev = _int_field(wire_type, a, f"{where}.since_rev")
        elif field == 2:
            ms = _int_field(wire_type, a, f"{where}.since_time_usec")
            cmd.since_time = _time_ms(ms, f"{where}.since_time_usec")
        elif field == 3:
            if len(cmd.labels) >= MAX_QUERY_LABEL_SETS:
                raise too_many(f"{where}.labels", MAX_QUERY_LABEL_SETS, "label sets")
            at = f"{where}.labels[{len(cmd.labels)}]"
            _expect(wire_type, LEN, at)
            labels: dict[str, str] = {}
            cmd.labels.append(labels)
            for f, wt, x, y in _fields(buf, a, b, at):
                if f == 1:
                    _map_entry(buf, wt, x, y, labels, f"{at}.labels", ctxs, MAX_QUERY_LABELS)
                    total += 1
                    if total > MAX_QUERY_LABELS:
                        raise too_many(f"{where}.labels", MAX_QUERY_LABELS, "labels in all sets")
        elif field == 4:
            _expect(wire_type, VARINT, f"{where}.latest_only")
            cmd.latest_only = a != 0
        elif field == 5:
            cmd.limit = _int_field(wire_type, a, f"{where}.limit")
        elif field == 6:
            at = f"{where}.result"
            _expect(wire_type, LEN, at)
            page = cmd.result if cmd.result is not None else GetStatesResult()
            cmd.result = _read_page(buf, a, b, at, page, page.states, "states", _state, ctxs)
    return cmd


def _read_get_delayed_states(buf: bytes, start: int, stop: int, ctxs: _Ctxs, where: str) -> Command:
    cmd = GetDelayedStatesCmd(limit=0)
    for field, wire_type, a, b in _fields(buf, start, stop, where):
        if field == 1:
            seconds = _int_field(wire_type, a, f"{where}.since_time_sec")
            cmd.since = _time_sec(seconds, f"{where}.since_time_sec")
        elif field == 2:
            seconds = _int_field(wire_type, a, f"{where}.until_time_sec")
            cmd.until = _time_sec(seconds, f"{where}.until_time_sec")
        elif field == 3:
            cmd.offset = _int_field(wire_type, a, f"{where}.offset")
        elif field == 4:
            cmd.limit = _int_field(wire_type, a, f"{where}.limit")
        elif field == 5:
            at = f"{where}.result"
            _expect(wire_type, LEN, at)
            dpage = cmd.result if cmd.result is not None else GetDelayedStatesResult()
            items = dpage.delayed_states
            cmd.result = _read_page(
                buf, a, b, at, dpage, items, "delayed_states", _delayed_state, ctxs
            )
    return cmd


_P = TypeVar("_P", GetStatesResult, GetDelayedStatesResult)
_I = TypeVar("_I")


def _read_page(
    buf: bytes,
    start: int,
    stop: int,
    where: str,
    page: _P,
    items: list[_I],
    name: str,
    read_item: Callable[[bytes, int, int, str], _I],
    ctxs: _Ctxs,
) -> _P:
    """A query's result page: repeated items (field 1), ``more`` (field 2) and, for
    GetStatesResult, the ``scanned_rev`` extension (field 3)."""
    budget = ctxs.budget
    for f, wt, x, y in _fields(buf, start, stop, where):
        if f == 1:
            if len(items) >= MAX_PAGE_ITEMS:
                raise too_many(f"{where}.{name}", MAX_PAGE_ITEMS, name.replace("_", " "))
            at = f"{where}.{name}[{len(items)}]"
            _expect(wt, LEN, at)
            item = read_item(buf, x, y, at)
            items.append(item)
            budget.state(item if isinstance(item, State) else item.state, at)  # type: ignore[attr-defined]
        elif f == 2:
            _expect(wt, VARINT, f"{where}.more")
            page.more = x != 0
        elif f == 3 and isinstance(page, GetStatesResult):
            page.scanned_rev = _int_field(wt, x, f"{where}.scanned_rev")
    return page


_CommandReader = Callable[[bytes, int, int, _Ctxs, str], Command]
_READERS: dict[int, tuple[str, _CommandReader]] = {
    3: ("transit", _read_transit),
    6: ("park", _read_park),
    7: ("execute", _read_execute),
    8: ("delay", _read_delay),
    9: ("commit", _read_commit),
    10: ("noop", _read_noop),
    11: ("stack", _read_stack),
    12: ("unstack", _read_unstack),
    17: ("get_state_by_id", _read_get_state_by_id),
    18: ("get_state_by_labels", _read_get_state_by_labels),
    19: ("get_states", _read_get_states),
    20: ("get_delayed_states", _read_get_delayed_states),
    21: ("store_data", _read_store_data),
    22: ("get_data", _read_get_data),
}


def _read_envelope(
    buf: bytes, start: int, stop: int, ctxs: _Ctxs | None, where: str, *, nested: bool = False
) -> Command:
    """Decode a Command message; the root one (``ctxs is None``) reads its own state_ctxs."""
    spans: list[tuple[int, int]] = []
    command: tuple[int, int, int] | None = None
    for field, wire_type, a, b in _fields(buf, start, stop, where or "command"):
        if field == 1:
            at = f"{where}.state_ctxs" if where else "state_ctxs"
            _expect(wire_type, LEN, at)
            if nested:
                raise WireError(at, "a command inside a commit must not carry state_ctxs")
            if len(spans) >= MAX_STATE_CTXS:
                raise too_many(at, MAX_STATE_CTXS, "state contexts")
            spans.append((a, b))
        elif field in _READERS:
            name = _READERS[field][0]
            _expect(wire_type, LEN, f"{where}.{name}" if where else name)
            if command is None:
                command = (field, a, b)
    if ctxs is None:
        budget = Budget()
        ctxs = _Ctxs(
            [_state_ctx(buf, a, b, f"state_ctxs[{i}]", budget) for i, (a, b) in enumerate(spans)],
            budget,
        )
    if command is None:
        raise WireError(where or "command", "no command")
    field, a, b = command
    name, reader = _READERS[field]
    if nested and field == 9:
        raise WireError(f"{where}.commit", "a commit inside a commit is not allowed")
    return reader(buf, a, b, ctxs, f"{where}.{name}" if where else name)


def _as_bytes(body: bytes | bytearray | memoryview) -> bytes:
    return body if isinstance(body, bytes) else bytes(body)


def decode_command(body: bytes | bytearray | memoryview) -> Command:
    """Decode a binary Command into our command objects, references resolved."""
    buf = _as_bytes(body)
    try:
        return _read_envelope(buf, 0, len(buf), None, "")
    except WireError:
        raise
    except ValidationError as exc:
        raise WireError(exc.field, exc.reason) from None


def decode_state_ctx(body: bytes | bytearray | memoryview) -> StateCtx:
    """Decode a binary StateCtx message."""
    buf = _as_bytes(body)
    try:
        return _state_ctx(buf, 0, len(buf), "state_ctx", Budget())
    except ValidationError as exc:
        raise _rebase(exc, "state_ctx", "state_ctx") from None


def decode_error(body: bytes | bytearray | memoryview) -> tuple[str, str]:
    """Decode an Error message into ``(code, message)``."""
    buf = _as_bytes(body)
    code = message = ""
    try:
        for field, wire_type, a, b in _fields(buf, 0, len(buf), "error"):
            if field == 1:
                code = _str_field(buf, wire_type, a, b, "error.code")
            elif field == 2:
                message = _str_field(buf, wire_type, a, b, "error.message")
    except WireError:
        raise
    except ValidationError as exc:
        raise WireError(exc.field, exc.reason) from None
    return code, message
