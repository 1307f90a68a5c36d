"""Protobuf binary codec of the flowstate.v1 model messages: State, Transition, StateCtx, Data.

Hand-written and dependency-free. Encoding follows the Go encoder byte for byte (wire.md §2-§3):
fields in ascending order, zero scalars omitted, ``State.transition`` and
``StateCtx.committed``/``current`` always written, ``datas`` sorted by alias, map values omitted
when empty. Map entries follow the caller's dict order (Go's is random).

Decoding accepts any field order, ignores unknown fields, *merges* repeated occurrences of a
message field like protobuf does, and reports every malformed input as a
:class:`~flowstate.errors.ValidationError` whose ``field`` names the message or field at fault.

The ``put_*``/``write_*`` and ``read_*`` helpers are public so that the Command codec can build
on them: writers append to a ``bytearray``; readers work on ``bytes`` between ``pos`` and ``end``
and return the position after what they consumed.
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping

from flowstate.clock import from_millis, to_millis
from flowstate.data import BINARY, Data
from flowstate.errors import ValidationError
from flowstate.state import State, StateCtx, Transition
from flowstate.wire.limits import (
    MAX_ANNOTATIONS,
    MAX_DATAS,
    MAX_STATE_LABELS,
    Budget,
    over,
)

__all__ = [
    "as_int64",
    "close_message",
    "decode_data",
    "decode_state",
    "decode_state_ctx",
    "decode_transition",
    "encode_data",
    "encode_state",
    "encode_state_ctx",
    "encode_transition",
    "open_message",
    "put_bytes",
    "put_int64",
    "put_string",
    "put_string_map",
    "put_tag",
    "put_varint",
    "read_data",
    "read_span",
    "read_state",
    "read_state_ctx",
    "read_string",
    "read_string_map_entry",
    "read_tag",
    "read_transition",
    "read_varint",
    "skip_field",
    "unexpected_field",
    "write_data",
    "write_state",
    "write_state_ctx",
    "write_transition",
]

Buffer = bytes | bytearray | memoryview

VARINT = 0
I64 = 1
LEN = 2
I32 = 5

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64 = 1 << 64
_MAX_FIELD = (1 << 29) - 1


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def put_varint(out: bytearray, value: int) -> None:
    """Append ``value`` (0 <= value < 2**64) as a base-128 varint."""
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def put_tag(out: bytearray, tag: int) -> None:
    """Append a field tag (``field << 3 | wire_type``)."""
    if tag < 0x80:
        out.append(tag)
    else:
        put_varint(out, tag)


def put_int64(out: bytearray, tag: int, value: int, where: str) -> None:
    """Append an int64 field; negatives become 10-byte two's complement varints."""
    if value < 0:
        if value < _INT64_MIN:
            raise ValidationError(where, f"{value} is out of int64 range")
        value += _UINT64
    elif value > _INT64_MAX:
        raise ValidationError(where, f"{value} is out of int64 range")
    put_tag(out, tag)
    put_varint(out, value)


def put_bytes(out: bytearray, tag: int, data: bytes | bytearray) -> None:
    """Append a length-delimited field holding ``data``."""
    put_tag(out, tag)
    size = len(data)
    if size < 0x80:
        out.append(size)
    else:
        put_varint(out, size)
    out += data


def put_string(out: bytearray, tag: int, text: str) -> None:
    """Append a string field (UTF-8). Lone surrogates raise UnicodeEncodeError."""
    put_bytes(out, tag, text.encode())


def open_message(out: bytearray, tag: int) -> int:
    """Start an embedded message field; pass the result to :func:`close_message`."""
    put_tag(out, tag)
    return len(out)


def close_message(out: bytearray, start: int) -> None:
    """Finish the embedded message begun at ``start`` by inserting its length prefix."""
    size = len(out) - start
    if size < 0x80:
        out.insert(start, size)
    else:
        prefix = bytearray()
        put_varint(prefix, size)
        out[start:start] = prefix


def _varint_size(value: int) -> int:
    return 1 if value < 0x80 else (value.bit_length() + 6) // 7


def put_string_map(out: bytearray, tag: int, entries: Mapping[str, str], where: str) -> None:
    """Append one map-entry message per item (key = 1, value = 2, omitted when empty)."""
    for key, value in entries.items():
        if not key:
            raise ValidationError(where, "map key cannot be empty")
        k = key.encode()
        v = value.encode()
        klen = len(k)
        vlen = len(v)
        size = 1 + _varint_size(klen) + klen
        if vlen:
            size += 1 + _varint_size(vlen) + vlen
        put_tag(out, tag)
        put_varint(out, size)
        out.append(0x0A)
        put_varint(out, klen)
        out += k
        if vlen:
            out.append(0x12)
            put_varint(out, vlen)
            out += v


def write_transition(out: bytearray, transition: Transition) -> None:
    """Append the fields of a Transition (``from`` is never written)."""
    if transition.to:
        put_bytes(out, 0x12, transition.to.encode())
    if transition.annotations:
        put_string_map(out, 0x1A, transition.annotations, "annotations")


def write_state(out: bytearray, state: State) -> None:
    """Append the fields of a State."""
    if state.id:
        put_bytes(out, 0x0A, state.id.encode())
    if state.rev:
        put_int64(out, 0x10, state.rev, "state.rev")
    if state.annotations:
        put_string_map(out, 0x1A, state.annotations, "annotations")
    if state.labels:
        put_string_map(out, 0x22, state.labels, "labels")
    if state.committed_at is not None:
        put_int64(out, 0x28, to_millis(state.committed_at), "state.committed_at_unix_milli")
    start = open_message(out, 0x32)
    write_transition(out, state.transition)
    close_message(out, start)


def write_data(out: bytearray, data: Data) -> None:
    """Append the fields of a Data; the blob is base64-encoded when the data is binary."""
    if data.rev:
        put_int64(out, 0x10, data.rev, "data.rev")
    blob = data.blob
    if blob:
        if data.annotations.get(BINARY) == "true":
            blob = binascii.b2a_base64(blob, newline=False)
        put_bytes(out, 0x22, blob)
    if data.annotations:
        put_string_map(out, 0x2A, data.annotations, "annotations")


def write_state_ctx(out: bytearray, ctx: StateCtx) -> None:
    """Append the fields of a StateCtx (datas sorted by alias)."""
    start = open_message(out, 0x0A)
    write_state(out, ctx.committed)
    close_message(out, start)
    start = open_message(out, 0x12)
    write_state(out, ctx.current)
    close_message(out, start)
    for transition in ctx.transitions:
        start = open_message(out, 0x1A)
        write_transition(out, transition)
        close_message(out, start)
    datas = ctx.datas
    for alias in sorted(datas):
        if not alias:
            raise ValidationError("datas", "map key cannot be empty")
        entry = open_message(out, 0x22)
        put_bytes(out, 0x0A, alias.encode())
        start = open_message(out, 0x12)
        write_data(out, datas[alias])
        close_message(out, start)
        close_message(out, entry)


def _not_utf8(where: str) -> ValidationError:
    return ValidationError(where, "string is not valid UTF-8")


def encode_transition(transition: Transition) -> bytes:
    """Encode a Transition message."""
    out = bytearray()
    try:
        write_transition(out, transition)
    except UnicodeEncodeError:
        raise _not_utf8("transition") from None
    return bytes(out)


def encode_state(state: State) -> bytes:
    """Encode a State message."""
    out = bytearray()
    try:
        write_state(out, state)
    except UnicodeEncodeError:
        raise _not_utf8("state") from None
    return bytes(out)


def encode_data(data: Data) -> bytes:
    """Encode a Data message."""
    out = bytearray()
    try:
        write_data(out, data)
    except UnicodeEncodeError:
        raise _not_utf8("data") from None
    return bytes(out)


def encode_state_ctx(ctx: StateCtx) -> bytes:
    """Encode a StateCtx message (committed, current, transitions, datas)."""
    out = bytearray()
    try:
        write_state_ctx(out, ctx)
    except UnicodeEncodeError:
        raise _not_utf8("state_ctx") from None
    return bytes(out)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_varint(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    """Read a varint at ``pos``; returns ``(value, next_pos)`` (value as unsigned 64-bit)."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ValidationError(where, "truncated varint")
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise ValidationError(where, "varint overflows 64 bits")
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def as_int64(value: int) -> int:
    """Reinterpret an unsigned 64-bit varint value as a signed int64."""
    return value - _UINT64 if value > _INT64_MAX else value


def read_tag(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int, int]:
    """Read a field tag; returns ``(field_number, wire_type, next_pos)``."""
    tag = buf[pos]
    if tag < 0x80:
        pos += 1
    else:
        tag, pos = read_varint(buf, pos, end, where)
    field = tag >> 3
    if field == 0 or field > _MAX_FIELD:
        raise ValidationError(where, f"invalid field number {field}")
    return field, tag & 7, pos


def read_span(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    """Read a length prefix at ``pos``; returns ``(start, stop)`` of the payload."""
    if pos >= end:
        raise ValidationError(where, "truncated varint")
    size = buf[pos]
    if size < 0x80:
        pos += 1
    else:
        size, pos = read_varint(buf, pos, end, where)
    stop = pos + size
    if stop > end:
        raise ValidationError(where, "truncated length-delimited field")
    return pos, stop


def skip_field(buf: bytes, pos: int, end: int, wire_type: int, where: str) -> int:
    """Skip the value of an unknown field; returns the position after it."""
    if wire_type == VARINT:
        return read_varint(buf, pos, end, where)[1]
    if wire_type == LEN:
        return read_span(buf, pos, end, where)[1]
    if wire_type == I64:
        pos += 8
    elif wire_type == I32:
        pos += 4
    else:
        raise ValidationError(where, f"unsupported wire type {wire_type}")
    if pos > end:
        raise ValidationError(where, "truncated fixed-size field")
    return pos


def unexpected_field(
    buf: bytes, pos: int, end: int, tag: int, where: str, known: Mapping[int, str]
) -> int:
    """Handle a tag no branch matched: a known field with the wrong wire type raises,
    an unknown field is skipped (returns the position after it)."""
    field = tag >> 3
    wire_type = tag & 7
    if field == 0 or field > _MAX_FIELD:
        raise ValidationError(where, f"invalid field number {field}")
    name = known.get(field)
    if name is not None:
        raise ValidationError(f"{where}.{name}", f"wrong wire type {wire_type}")
    return skip_field(buf, pos, end, wire_type, where)


def read_string(buf: bytes, start: int, stop: int, where: str) -> str:
    """Decode ``buf[start:stop]`` as UTF-8."""
    try:
        return buf[start:stop].decode()
    except UnicodeDecodeError:
        raise _not_utf8(where) from None


def _read_varint_field(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:
            return byte, pos + 1
    return read_varint(buf, pos, end, where)


def read_string_map_entry(
    buf: bytes, pos: int, end: int, target: dict[str, str], where: str
) -> None:
    """Decode one ``map<string, string>`` entry message into ``target``."""
    # Fast path for the canonical layout with short strings: 0a <len> key [12 <len> value].
    if pos + 2 <= end and buf[pos] == 0x0A:
        key_stop = pos + 2 + buf[pos + 1]
        if buf[pos + 1] < 0x80 and key_stop <= end:
            value_start = value_stop = key_stop
            if key_stop + 2 <= end and buf[key_stop] == 0x12 and buf[key_stop + 1] < 0x80:
                value_start = key_stop + 2
                value_stop = value_start + buf[key_stop + 1]
            if value_stop == end:
                try:
                    key = buf[pos + 2 : key_stop].decode()
                    value = buf[value_start:value_stop].decode()
                except UnicodeDecodeError:
                    raise _not_utf8(where) from None
                if not key:
                    raise ValidationError(where, "map key cannot be empty")
                target[key] = value
                return
    key = ""
    value = ""
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, where)
        if tag == 0x0A:
            start, pos = read_span(buf, pos, end, where)
            key = read_string(buf, start, pos, where)
        elif tag == 0x12:
            start, pos = read_span(buf, pos, end, where)
            value = read_string(buf, start, pos, where)
        else:
            pos = unexpected_field(buf, pos, end, tag, where, _MAP_FIELDS)
    if not key:
        raise ValidationError(where, "map key cannot be empty")
    target[key] = value


_MAP_FIELDS = {1: "key", 2: "value"}
_TRANSITION_FIELDS = {1: "from", 2: "to", 3: "annotations"}
_STATE_FIELDS = {
    1: "id",
    2: "rev",
    3: "annotations",
    4: "labels",
    5: "committed_at_unix_milli",
    6: "transition",
}
_STATE_CTX_FIELDS = {1: "committed", 2: "current", 3: "transitions", 4: "datas"}
_DATA_FIELDS = {2: "rev", 4: "blob", 5: "annotations"}


def read_transition(buf: bytes, pos: int, end: int, transition: Transition) -> None:
    """Decode Transition fields from ``buf[pos:end]`` into ``transition`` (merging)."""
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, "transition")
        if tag == 0x12:
            start, pos = read_span(buf, pos, end, "transition")
            transition.to = read_string(buf, start, pos, "transition.to")
        elif tag == 0x1A:
            start, pos = read_span(buf, pos, end, "transition")
            read_string_map_entry(buf, start, pos, transition.annotations, "annotations")
            if len(transition.annotations) > MAX_ANNOTATIONS:
                raise ValidationError(
                    "transition.annotations", over(MAX_ANNOTATIONS, "annotations")
                )
        elif tag == 0x0A:  # legacy `from`: ignored
            pos = read_span(buf, pos, end, "transition")[1]
        else:
            pos = unexpected_field(buf, pos, end, tag, "transition", _TRANSITION_FIELDS)


def read_state(buf: bytes, pos: int, end: int, state: State) -> None:
    """Decode State fields from ``buf[pos:end]`` into ``state`` (merging)."""
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, "state")
        if tag == 0x0A:
            start, pos = read_span(buf, pos, end, "state")
            state.id = read_string(buf, start, pos, "state.id")
        elif tag == 0x10:
            value, pos = _read_varint_field(buf, pos, end, "state.rev")
            state.rev = as_int64(value)
        elif tag == 0x1A:
            start, pos = read_span(buf, pos, end, "state")
            read_string_map_entry(buf, start, pos, state.annotations, "annotations")
            if len(state.annotations) > MAX_ANNOTATIONS:
                raise ValidationError("state.annotations", over(MAX_ANNOTATIONS, "annotations"))
        elif tag == 0x22:
            start, pos = read_span(buf, pos, end, "state")
            read_string_map_entry(buf, start, pos, state.labels, "labels")
            if len(state.labels) > MAX_STATE_LABELS:
                raise ValidationError("state.labels", over(MAX_STATE_LABELS, "labels"))
        elif tag == 0x28:
            value, pos = read_varint(buf, pos, end, "state.committed_at_unix_milli")
            try:
                state.committed_at = from_millis(as_int64(value))
            except OverflowError:
                raise ValidationError(
                    "state.committed_at_unix_milli", f"{as_int64(value)} is out of range"
                ) from None
        elif tag == 0x32:
            start, pos = read_span(buf, pos, end, "state")
            read_transition(buf, start, pos, state.transition)
        else:
            pos = unexpected_field(buf, pos, end, tag, "state", _STATE_FIELDS)


def read_data(buf: bytes, pos: int, end: int) -> Data:
    """Decode a Data message from ``buf[pos:end]``.

    The blob is base64-decoded when annotation ``binary`` is ``"true"``, wherever the
    annotations appear. A non-binary blob is taken as raw bytes (like Go, UTF-8 is not checked).
    """
    data = Data()
    blob_start = blob_stop = 0
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, "data")
        if tag == 0x22:
            blob_start, pos = read_span(buf, pos, end, "data")
            blob_stop = pos
        elif tag == 0x10:
            value, pos = _read_varint_field(buf, pos, end, "data.rev")
            data.rev = as_int64(value)
        elif tag == 0x2A:
            start, pos = read_span(buf, pos, end, "data")
            read_string_map_entry(buf, start, pos, data.annotations, "annotations")
            if len(data.annotations) > MAX_ANNOTATIONS:
                raise ValidationError("data.annotations", over(MAX_ANNOTATIONS, "annotations"))
        else:
            pos = unexpected_field(buf, pos, end, tag, "data", _DATA_FIELDS)
    if blob_stop > blob_start:
        raw = buf[blob_start:blob_stop]
        if data.annotations.get(BINARY) == "true":
            try:
                data.blob = binascii.a2b_base64(raw, strict_mode=True)
            except binascii.Error as exc:
                raise ValidationError("data.blob", f"invalid base64: {exc}") from None
        else:
            data.blob = raw
    return data


def _read_data_entry(buf: bytes, pos: int, end: int, target: dict[str, Data]) -> Data:
    key = ""
    data: Data | None = None
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, "datas")
        if tag == 0x0A:
            start, pos = read_span(buf, pos, end, "datas")
            key = read_string(buf, start, pos, "datas")
        elif tag == 0x12:
            start, pos = read_span(buf, pos, end, "datas")
            data = read_data(buf, start, pos)
        else:
            pos = unexpected_field(buf, pos, end, tag, "datas", _MAP_FIELDS)
    if not key:
        raise ValidationError("datas", "map key cannot be empty")
    target[key] = data = data if data is not None else Data()
    return data


def read_state_ctx(
    buf: bytes, pos: int, end: int, ctx: StateCtx, budget: Budget | None = None
) -> None:
    """Decode StateCtx fields from ``buf[pos:end]`` into ``ctx`` (merging), charging its
    transitions and map entries to ``budget`` (a fresh one if None)."""
    if budget is None:
        budget = Budget()
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = read_varint(buf, pos, end, "state_ctx")
        if tag == 0x12:
            start, pos = read_span(buf, pos, end, "state_ctx")
            read_state(buf, start, pos, ctx.current)
        elif tag == 0x0A:
            start, pos = read_span(buf, pos, end, "state_ctx")
            read_state(buf, start, pos, ctx.committed)
        elif tag == 0x1A:
            start, pos = read_span(buf, pos, end, "state_ctx")
            transition = Transition()
            read_transition(buf, start, pos, transition)
            ctx.transitions.append(transition)
            budget.transition(len(transition.annotations), "state_ctx.transitions")
        elif tag == 0x22:
            start, pos = read_span(buf, pos, end, "state_ctx")
            data = _read_data_entry(buf, start, pos, ctx.datas)
            if len(ctx.datas) > MAX_DATAS:
                raise ValidationError("state_ctx.datas", over(MAX_DATAS, "datas"))
            budget.take(1 + len(data.annotations), "state_ctx.datas")
        else:
            pos = unexpected_field(buf, pos, end, tag, "state_ctx", _STATE_CTX_FIELDS)
    budget.state(ctx.current, "state_ctx.current")
    budget.state(ctx.committed, "state_ctx.committed")


def _as_bytes(buf: Buffer) -> bytes:
    return buf if isinstance(buf, bytes) else bytes(buf)


def decode_transition(buf: Buffer) -> Transition:
    """Decode a Transition message."""
    data = _as_bytes(buf)
    transition = Transition()
    read_transition(data, 0, len(data), transition)
    return transition


def decode_state(buf: Buffer) -> State:
    """Decode a State message."""
    data = _as_bytes(buf)
    state = State()
    read_state(data, 0, len(data), state)
    return state


def decode_data(buf: Buffer) -> Data:
    """Decode a Data message."""
    data = _as_bytes(buf)
    return read_data(data, 0, len(data))


def decode_state_ctx(buf: Buffer) -> StateCtx:
    """Decode a StateCtx message."""
    data = _as_bytes(buf)
    ctx = StateCtx()
    read_state_ctx(data, 0, len(data), ctx)
    return ctx
