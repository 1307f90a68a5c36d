"""Request bodies as an attacker writes them: JSON objects in the Go dialect, and the same
objects as binary protobuf, encoded without any of the checks of flowstate's own encoders
(strings may be invalid UTF-8, integers any size: a varint past 64 bits is written as such).
"""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from flowstate.wire import flowstate_pb2 as pb

#: Go-dialect JSON names whose proto field is spelled differently.
_ALIASES = {"flowid": "to", "stateref": "staterexf", "stackedstateref": "stackstateref"}


def _norm(name: str) -> str:
    return name.lower().replace("_", "")


def _varint(n: int) -> bytes:
    if n < 0:
        n &= (1 << 64) - 1  # two's complement, as protobuf writes a negative int64
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if not n:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


def _tagged(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _encode(desc: Descriptor, obj: dict[str, Any]) -> bytes:
    out = bytearray()
    fields = {_norm(f.name): f for f in desc.fields}
    for key, value in obj.items():
        name = _norm(key)
        field = fields.get(name) or fields[_ALIASES[name]]
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            for k, v in value.items():
                out += _tagged(field.number, _encode(entry, {"key": k, "value": v}))
            continue
        for item in value if field.is_repeated else [value]:
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if desc.name == "GetStatesCommand" and name == "labels":
                    item = {"labels": item}  # Go's [{k: v}] is proto's [{labels: {k: v}}]
                out += _tagged(field.number, _encode(field.message_type, item))
            elif field.type == FieldDescriptor.TYPE_STRING:
                out += _tagged(field.number, item.encode("utf-8", "surrogatepass"))
            elif field.type == FieldDescriptor.TYPE_BOOL:
                out += _varint(field.number << 3) + _varint(1 if item else 0)
            else:
                out += _varint(field.number << 3) + _varint(int(item))
    return bytes(out)


def proto_command(obj: dict[str, Any]) -> bytes:
    """A Command from its Go-dialect JSON object (int64 values as strings or numbers)."""
    return _encode(pb.DESCRIPTOR.message_types_by_name["Command"], obj)


def proto_state_ctx(obj: dict[str, Any]) -> bytes:
    """A StateCtx (the Flow/Execute body) from its JSON object."""
    return _encode(pb.DESCRIPTOR.message_types_by_name["StateCtx"], obj)


def json_body(obj: dict[str, Any]) -> bytes:
    """The JSON text of ``obj``; lone surrogates and NULs travel as ``\\u`` escapes."""
    return json.dumps(obj, ensure_ascii=True).encode()


def body(obj: dict[str, Any], kind: str, *, state_ctx: bool = False) -> tuple[bytes, str]:
    """(body, content type) of ``obj`` sent as ``kind`` ("json" or "proto")."""
    if kind == "json":
        return json_body(obj), "application/json"
    return (proto_state_ctx(obj) if state_ctx else proto_command(obj)), "application/proto"
