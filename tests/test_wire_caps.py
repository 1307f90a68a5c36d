"""Caps on repeated fields, enforced while decoding (issue 14 item 1): both codecs stop at the
first item over a cap with a WireError naming the field, before building the rest, so a body
of cheap items (2 bytes of protobuf, 3 of JSON each) cannot amplify into gigabytes."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable

import pytest

import flowstate as fs
from flowstate.commands import Command
from flowstate.perform import MAX_QUERY_LABEL_SETS, MAX_QUERY_LABELS, MAX_STATE_LABELS
from flowstate.wire import codec
from flowstate.wire.errors import WireError
from flowstate.wire.limits import (
    MAX_ANNOTATIONS,
    MAX_COMMIT_COMMANDS,
    MAX_MAP_ENTRIES,
    MAX_STATE_CTXS,
    MAX_TRANSITIONS,
)
from tests.wire_support import varint

MIB = 2**20


def _peak(decode: Callable[[], object]) -> tuple[BaseException | None, int]:
    """What ``decode`` raised, and the peak of memory it allocated (bytes)."""
    tracemalloc.start()
    try:
        decode()
    except WireError as exc:
        return exc, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return None, 0


def test_16_mib_of_empty_state_ctxs_stops_at_the_cap() -> None:
    body = b"\x0a\x00" * (8 * MIB - 8) + b"\x52\x00"
    exc, peak = _peak(lambda: codec.decode_command(body))
    assert isinstance(exc, WireError) and exc.field == "state_ctxs", exc
    assert f"{MAX_STATE_CTXS:,}" in exc.reason
    assert peak < 32 * MIB, peak  # 8M contexts were 7.5 GB


def test_4_mib_json_array_of_empty_objects_stops_at_the_cap() -> None:
    body = b'{"stateCtxs":[' + b",".join([b"{}"] * (4 * MIB // 3)) + b'],"noop":{}}'
    exc, peak = _peak(lambda: codec.decode_command(body, json=True))
    assert isinstance(exc, WireError) and exc.field == "state_ctxs", exc
    assert peak < 32 * MIB, peak  # json.loads alone built ~100 MB of dicts


def test_json_values_are_capped_under_unknown_keys() -> None:
    body = b'{"whatever":[' + b",".join([b"[]"] * (2 * MAX_MAP_ENTRIES // 2)) + b'],"noop":{}}'
    exc, peak = _peak(lambda: codec.decode_command(body, json=True))
    assert isinstance(exc, WireError), exc
    assert "JSON values" in exc.reason or exc.field == "whatever"
    assert peak < 48 * MIB, peak


def test_a_commit_of_millions_of_noops_is_refused() -> None:
    inner = b"\x0a\x02\x52\x00" * (4 * MIB - 8)
    body = b"\x4a" + varint(len(inner)) + inner
    exc, peak = _peak(lambda: codec.decode_command(body))
    assert isinstance(exc, WireError) and exc.field == "commit.commands", exc
    assert peak < 32 * MIB, peak
    noops = {"commit": {"commands": [{"noop": {}}] * (MAX_COMMIT_COMMANDS + 1)}}
    with pytest.raises(WireError) as info:
        codec.decode_command(json.dumps(noops).encode(), json=True)
    assert info.value.field == "commit.commands"


def test_transitions_are_capped_across_the_message() -> None:
    per_ctx = MAX_TRANSITIONS // 10 + 1
    ctx = b"\x1a\x00" * per_ctx
    body = (b"\x0a" + varint(len(ctx)) + ctx) * 11 + b"\x52\x00"
    with pytest.raises(WireError) as info:
        codec.decode_command(body)
    assert ".transitions" in info.value.field and info.value.field.startswith("state_ctxs[")


def _both(cmd: Command) -> list[tuple[bytes, bool]]:
    return [(codec.encode_command(cmd), False), (codec.encode_command(cmd, json=True), True)]


@pytest.mark.parametrize("as_json", [False, True])
def test_caps_name_the_field_in_both_codecs(as_json: bool) -> None:
    def refused(cmd: Command) -> str:
        body = codec.encode_command(cmd, json=as_json)
        with pytest.raises(WireError) as info:
            codec.decode_command(body, json=as_json)
        return info.value.field

    many_ctxs = fs.commit(*(fs.park(fs.StateCtx(fs.State(f"s{i}"))) for i in range(10_001)))
    assert refused(many_ctxs) == "state_ctxs"

    ctx = fs.StateCtx(fs.State("a"))
    labels = {f"k{i}": "v" for i in range(MAX_STATE_LABELS + 1)}
    ctx.current.labels = labels
    assert refused(fs.commit(fs.park(ctx))) == "state_ctxs[0].current.labels"

    ctx = fs.StateCtx(fs.State("a"))
    ctx.current.annotations = {f"k{i}": "v" for i in range(MAX_ANNOTATIONS + 1)}
    assert refused(fs.commit(fs.park(ctx))) == "state_ctxs[0].current.annotations"

    park = fs.park(fs.StateCtx(fs.State("a")))
    park.annotations = {f"k{i}": "v" for i in range(MAX_ANNOTATIONS + 1)}
    assert refused(park) == "park.annotations"

    sets = fs.get_states(or_labels=[{"k": str(i)} for i in range(MAX_QUERY_LABEL_SETS + 1)])
    assert refused(sets) == "get_states.labels"
    wide = fs.get_states(labels={f"k{i}": "v" for i in range(MAX_QUERY_LABELS + 1)})
    assert refused(wide).startswith("get_states.labels")

    by_labels = fs.get_state_by_labels(fs.StateCtx(), labels)
    assert refused(by_labels) == "get_state_by_labels.labels"


@pytest.mark.parametrize("as_json", [False, True])
def test_at_the_caps_everything_decodes(as_json: bool) -> None:
    ctx = fs.StateCtx(fs.State("a"))
    ctx.current.labels = {f"k{i}": "v" for i in range(MAX_STATE_LABELS)}
    ctx.current.annotations = {f"k{i}": "v" for i in range(MAX_ANNOTATIONS)}
    cmd = fs.commit(fs.park(ctx), *(fs.noop() for _ in range(MAX_COMMIT_COMMANDS - 1)))
    back = codec.decode_command(codec.encode_command(cmd, json=as_json), json=as_json)
    assert isinstance(back, type(cmd)) and len(back.commands) == MAX_COMMIT_COMMANDS
