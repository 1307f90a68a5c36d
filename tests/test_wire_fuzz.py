"""Bad input to the decoders: random bytes and JSON, truncated and corrupted bodies, wrong
types, missing references. Always a WireError naming the problem, never another exception;
whatever is accepted can be encoded again (the server can always answer)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flowstate import StateCtx
from flowstate.commands import Command
from flowstate.wire.codec import (
    WireError,
    decode_command,
    decode_error,
    decode_state_ctx,
    encode_command,
    encode_state_ctx,
)
from tests.wire_support import any_command, state_ctxs

# FLOWSTATE_FUZZ_EXAMPLES raises the budget for a longer local run.
FUZZ = settings(
    max_examples=int(os.environ.get("FLOWSTATE_FUZZ_EXAMPLES", "500")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.sampled_from(["0", "-1", "9223372036854775808", "true", "AAE=", "%%%"]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "stateCtxs",
                    "state_ctxs",
                    "current",
                    "committed",
                    "transitions",
                    "datas",
                    "id",
                    "rev",
                    "idx",
                    "stateRef",
                    "transit",
                    "park",
                    "commit",
                    "commands",
                    "noop",
                    "getStates",
                    "labels",
                    "limit",
                    "result",
                    "states",
                    "delay",
                    "executeAtSec",
                    "blob",
                    "annotations",
                    "binary",
                    "getStateByID",
                    "stack",
                    "carrierStateRef",
                    "stackedStateRef",
                ]
            )
            | st.text(max_size=6),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


def check_command(body: bytes | str, *, json_body: bool) -> None:
    raw = body.encode() if isinstance(body, str) else body
    try:
        cmd = decode_command(raw, json=json_body)
    except WireError as err:
        assert isinstance(err.field, str) and err.field
        assert str(err).startswith(err.field)
        return
    reencode(cmd)


def reencode(cmd: Command) -> None:
    encode_command(cmd)
    encode_command(cmd, json=True)
    encode_command(cmd, json=True, dialect="proto3")


def check_state_ctx(body: bytes, *, json_body: bool) -> None:
    try:
        ctx = decode_state_ctx(body, json=json_body)
    except WireError as err:
        assert err.field
        return
    encode_state_ctx(ctx)
    encode_state_ctx(ctx, json=True)


# --- binary ---------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
@example(b"\x0a\xff\xff\xff\xff\x0f")  # a length far past the end
@example(b"\x08")  # truncated varint
@example(b"\x00")  # field number 0
@example(b"\x0b\x0c")  # groups
@example(b"\x52\x00" * 3)
def test_random_bytes(body: bytes) -> None:
    check_command(body, json_body=False)
    check_state_ctx(body, json_body=False)
    try:
        decode_error(body)
    except WireError as err:
        assert err.field


@FUZZ
@given(any_command(), st.data())
def test_truncated_and_corrupted_commands(cmd: Command, data: st.DataObject) -> None:
    body = encode_command(cmd)
    cut = data.draw(st.integers(0, len(body)))
    check_command(body[:cut], json_body=False)
    if body:
        flips = data.draw(
            st.lists(st.tuples(st.integers(0, len(body) - 1), st.integers(0, 255)), max_size=4)
        )
        corrupted = bytearray(body)
        for pos, value in flips:
            corrupted[pos] = value
        check_command(bytes(corrupted), json_body=False)
        insert_at = data.draw(st.integers(0, len(body)))
        junk = data.draw(st.binary(min_size=1, max_size=6))
        check_command(body[:insert_at] + junk + body[insert_at:], json_body=False)


@FUZZ
@given(state_ctxs(), st.data())
def test_truncated_state_ctx(ctx: StateCtx, data: st.DataObject) -> None:
    body = encode_state_ctx(ctx)
    check_state_ctx(body[: data.draw(st.integers(0, len(body)))], json_body=False)


def test_every_truncation_of_a_commit() -> None:
    from tests.test_wire_codec import COMMIT_TRANSIT, GET_STATE_BY_ID, GET_STATES

    for body in (COMMIT_TRANSIT, GET_STATE_BY_ID, GET_STATES):
        for cut in range(len(body)):
            check_command(body[:cut], json_body=False)


# --- JSON -----------------------------------------------------------------------------------


@FUZZ
@given(JSON_VALUES)
def test_random_json(value: Any) -> None:
    body = json.dumps(value)
    check_command(body, json_body=True)
    check_state_ctx(body.encode(), json_body=True)
    try:
        decode_error(body.encode(), json=True)
    except WireError as err:
        assert err.field


@FUZZ
@given(st.binary(max_size=80))
@example(b"\xff\xfe{\x00}\x00")  # UTF-16: not accepted
@example(b'{"noop":{}')  # truncated
@example(b'{"noop":{}} trailing')
@example(b'{"getStates":{"limit":NaN}}')
@example(b'{"getStates":{"limit":1e999}}')
@example(b'{"getStates":{"limit":' + b"9" * 5000 + b"}}")
def test_random_bytes_as_json(body: bytes) -> None:
    check_command(body, json_body=True)
    check_state_ctx(body, json_body=True)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*path, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*path, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, *rest = path
    copy: Any = dict(value) if isinstance(value, dict) else list(value)
    copy[head] = _replace(value[head], tuple(rest), new)
    return copy


@FUZZ
@given(any_command(), st.sampled_from(["go", "proto3"]), st.data())
def test_json_with_a_field_replaced(cmd: Command, dialect: str, data: st.DataObject) -> None:
    """Wrong types anywhere: each field of a valid body replaced by a random JSON value."""
    tree = json.loads(encode_command(cmd, json=True, dialect=dialect))  # type: ignore[arg-type]
    path = data.draw(st.sampled_from(_paths(tree)))
    new = data.draw(JSON_VALUES)
    check_command(json.dumps(_replace(tree, path, new)), json_body=True)


@FUZZ
@given(any_command(), st.data())
def test_truncated_json(cmd: Command, data: st.DataObject) -> None:
    body = encode_command(cmd, json=True)
    check_command(body[: data.draw(st.integers(0, len(body)))], json_body=True)


def test_deeply_nested_json() -> None:
    for body in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000):
        with pytest.raises(WireError) as err:
            decode_command(body, json=True)
        assert err.value.field == "command"


# --- precise errors -------------------------------------------------------------------------

BAD: list[tuple[str, bytes, bool, str, str]] = [
    # (name, body, json, field, words in the message)
    ("empty body", b"", False, "command", "no command"),
    ("no command", b"\x0a\x00", False, "command", "no command"),
    ("ref out of range", bytes.fromhex("3a 04 0a 02 08 00"), False, "execute.state_ref.idx", "0"),
    (
        "negative ref",
        bytes.fromhex("0a 00 3a 0d 0a 0b 08 ff ff ff ff ff ff ff ff ff 01"),
        False,
        "execute.state_ref.idx",
        "-1",
    ),
    ("missing ref", bytes.fromhex("0a 00 3a 00"), False, "execute.state_ref", "missing"),
    (
        "missing carrier",
        bytes.fromhex("0a 00 5a 04 12 02 08 00"),
        False,
        "stack.carrier_state_ref",
        "missing",
    ),
    (
        "wrong wire type",
        bytes.fromhex("9a 01 02 2a 00"),
        False,
        "get_states.limit",
        "wire type",
    ),
    (
        "commit in commit",
        bytes.fromhex("4a 04 0a 02 4a 00"),
        False,
        "commit.commands[0].commit",
        "commit inside a commit",
    ),
    (
        "nested state_ctxs",
        bytes.fromhex("4a 06 0a 04 0a 00 52 00"),
        False,
        "commit.commands[0].state_ctxs",
        "must not carry",
    ),
    (
        "empty map key",
        bytes.fromhex("0a 06 12 04 1a 02 12 00 52 00"),
        False,
        "state_ctxs[0].current.annotations",
        "key",
    ),
    (
        "bad base64",
        bytes.fromhex("0a 1a 22 18 0a 01 61 12 13 22 01 21 2a 0e 0a 06")
        + b"binary"
        + bytes.fromhex("12 04")
        + b"true"
        + bytes.fromhex("52 00"),
        False,
        "state_ctxs[0].datas['a'].blob",
        "base64",
    ),
    ("not an object", b"[]", True, "command", "object"),
    ("not json", b"{", True, "command", "invalid JSON"),
    ("no command json", b'{"stateCtxs":[]}', True, "command", "no command"),
    (
        "json ref out of range",
        b'{"transit":{"stateRef":{"idx":"3"},"flowId":"x"}}',
        True,
        "transit.state_ref.idx",
        "3",
    ),
    (
        "json number rev in a list",
        b'{"stateCtxs":[{"current":{"rev":[1]}}],"noop":{}}',
        True,
        "state_ctxs[0].current.rev",
        "int64",
    ),
    (
        "json rev out of range",
        b'{"stateCtxs":[{"current":{"rev":"9223372036854775808"}}],"noop":{}}',
        True,
        "state_ctxs[0].current.rev",
        "range",
    ),
    (
        "json fractional limit",
        b'{"getStates":{"limit":1.5}}',
        True,
        "get_states.limit",
        "integer",
    ),
    (
        "json label value not a string",
        b'{"getStates":{"labels":[{"k":1}]}}',
        True,
        "get_states.labels[0]['k']",
        "string",
    ),
    (
        "json bool as string",
        b'{"getStates":{"latestOnly":"yes"}}',
        True,
        "get_states.latest_only",
        "true or false",
    ),
    (
        "json commit in commit",
        b'{"commit":{"commands":[{"commit":{}}]}}',
        True,
        "commit.commands[0].commit",
        "commit inside a commit",
    ),
    (
        "json bad base64",
        b'{"stateCtxs":[{"datas":{"f":{"blob":"!","annotations":{"binary":"true"}}}}],"noop":{}}',
        True,
        "state_ctxs[0].datas['f'].blob",
        "base64",
    ),
    (
        "json lone surrogate",
        b'{"stateCtxs":[{"current":{"id":"\\ud800"}}],"noop":{}}',
        True,
        "state_ctxs[0].current.id",
        "UTF-8",
    ),
    ("json not utf-8", b'{"noop":{}, "x":"\xff"}', True, "command", "UTF-8"),
    (
        "json time out of range",
        b'{"getStates":{"sinceTimeUsec":"9223372036854775807"}}',
        True,
        "get_states.since_time_usec",
        "range",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "use_json", "field", "words"), BAD, ids=[b[0] for b in BAD]
)
def test_bad_input_names_the_field(
    name: str, body: bytes, use_json: bool, field: str, words: str
) -> None:
    with pytest.raises(WireError) as err:
        decode_command(body, json=use_json)
    assert err.value.field == field, str(err.value)
    assert words in err.value.reason, str(err.value)


@pytest.mark.parametrize(
    ("decode", "body", "field"),
    [
        (lambda b: decode_state_ctx(b), bytes.fromhex("12 03 0a 05 61"), "state_ctx.current"),
        (lambda b: decode_state_ctx(b, json=True), b'{"current":7}', "state_ctx.current"),
        (lambda b: decode_error(b), bytes.fromhex("08 01"), "error.code"),
        (lambda b: decode_error(b, json=True), b'{"code":1}', "error.code"),
    ],
)
def test_other_decoders_name_the_field(
    decode: Callable[[bytes], object], body: bytes, field: str
) -> None:
    with pytest.raises(WireError) as err:
        decode(body)
    assert err.value.field == field, str(err.value)
