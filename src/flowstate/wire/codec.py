"""The flowstate.v1 codecs: Commands, StateCtxs and error bodies, binary or JSON.

Binary output is byte for byte what the Go encoder writes (wire.md §3; map entries in the
objects' order, which Go leaves random). JSON output is the Go server's dialect unless
``dialect="proto3"`` asks for canonical proto3 JSON; JSON input accepts both (wire.md §9).
Decoding rebuilds :mod:`flowstate.commands` objects, every reference resolved through the
root ``state_ctxs`` list (wire.md §4.1): refs with the same index share one StateCtx. Anything
malformed raises :class:`WireError`, whose ``field`` names the offending field.
"""

from __future__ import annotations

from flowstate.commands import Command
from flowstate.state import StateCtx
from flowstate.wire import json_codec, proto_codec
from flowstate.wire.errors import WireError
from flowstate.wire.json_codec import Dialect
from flowstate.wire.state_cache import EncodedStates

__all__ = [
    "JSON",
    "PROTO",
    "Dialect",
    "WireError",
    "content_type",
    "decode_command",
    "decode_error",
    "decode_state_ctx",
    "encode_command",
    "encode_error",
    "encode_state_ctx",
    "is_json",
]

PROTO = "application/proto"
JSON = "application/json"

Body = bytes | bytearray | memoryview


def is_json(content_type: str | None) -> bool:
    """Whether a request's Content-Type selects JSON: ``application/json``, with or without
    parameters (Go accepts only the bare value); anything else, or none, means protobuf."""
    if not content_type:
        return False
    return content_type.split(";", 1)[0].strip().lower() == JSON


def content_type(json: bool) -> str:
    """The response Content-Type for an encoding."""
    return JSON if json else PROTO


def encode_command(
    cmd: Command,
    *,
    json: bool = False,
    dialect: Dialect = "go",
    states: EncodedStates | None = None,
) -> bytes:
    """Encode ``cmd`` with its ``state_ctxs`` list; ``dialect`` applies to JSON only, and
    ``states`` (a store's cache of encoded versions) to protobuf only."""
    if json:
        return json_codec.encode_command(cmd, dialect=dialect)
    return proto_codec.encode_command(cmd, states)


def decode_command(body: Body, *, json: bool = False) -> Command:
    """Decode a Command; raises :class:`WireError` on anything malformed."""
    if json:
        return json_codec.decode_command(body)
    return proto_codec.decode_command(body)


def encode_state_ctx(ctx: StateCtx, *, json: bool = False, dialect: Dialect = "go") -> bytes:
    """Encode a StateCtx (the request body of Flow/Execute)."""
    if json:
        return json_codec.encode_state_ctx(ctx, dialect=dialect)
    return proto_codec.encode_state_ctx(ctx)


def decode_state_ctx(body: Body, *, json: bool = False) -> StateCtx:
    """Decode a StateCtx; raises :class:`WireError` on anything malformed."""
    if json:
        return json_codec.decode_state_ctx(body)
    return proto_codec.decode_state_ctx(body)


def encode_error(code: str, message: str, *, json: bool = False) -> bytes:
    """An error response body: the binary ``Error`` message (1 code, 2 message) of wire.md
    §2.9, or the Connect JSON shape ``{"code": …, "message": …}``."""
    if json:
        return json_codec.encode_error(code, message)
    return proto_codec.encode_error(code, message)


def decode_error(body: Body, *, json: bool = False) -> tuple[str, str]:
    """``(code, message)`` of an error response body."""
    if json:
        return json_codec.decode_error(body)
    return proto_codec.decode_error(body)
