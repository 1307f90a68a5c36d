"""flowstate.wire.codec: golden vectors of wire.md §7.3, the §4.1 reference scheme, and
agreement with the official protobuf runtime (binary and json_format) in both directions."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowstate import (
    Data,
    State,
    StateCtx,
    Transition,
    commit,
    get_data,
    get_state_by_id,
    get_states,
    get_states_by_labels,
    noop,
    park,
    stack,
    transit,
    unstack,
)
from flowstate.clock import from_millis, from_seconds, to_millis, to_seconds
from flowstate.commands import (
    CommitCmd,
    DelayCmd,
    DelayedState,
    GetDelayedStatesCmd,
    GetDelayedStatesResult,
    GetStatesCmd,
    GetStatesResult,
    ParkCmd,
    StackCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.wire import flowstate_pb2 as pb
from flowstate.wire.codec import (
    JSON,
    PROTO,
    WireError,
    content_type,
    decode_command,
    decode_error,
    decode_state_ctx,
    encode_command,
    encode_error,
    encode_state_ctx,
    is_json,
)
from tests.wire_support import (
    any_command,
    ctx_list,
    ctx_shape,
    pb_state_ctx,
    shape,
    state_ctxs,
    to_pb,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --- wire.md §7.3 ---------------------------------------------------------------------------

GET_STATE_BY_ID = h("0a 08 0a 02 32 00 12 02 32 00 8a 01 0a 0a 04 61 54 49 44 1a 02 08 00")
COMMIT_TRANSIT = h(
    "0a 0e 0a 02 32 00 12 08 0a 04 61 54 49 44 32 00 4a 0f 0a 0d 1a 0b 0a 02 08 00 12 05 66 69 72"
    " 73 74"
)
ERROR_ABORTED = h(
    "0a 07 61 62 6f 72 74 65 64 12 12 72 65 76 20 6d 69 73 6d 61 74 63 68 3a 20 61 54 49 44"
)
GET_STATES = h(
    "9a 01 1e 08 ff ff ff ff ff ff ff ff ff 01 1a 0f 0a 0d 0a 03 66 6f 6f 12 06 66 6f 6f 56 61 6c"
    " 28 32"
)


def test_get_state_by_id_vector() -> None:
    assert encode_command(get_state_by_id(StateCtx(), "aTID", 0)) == GET_STATE_BY_ID
    cmd = decode_command(GET_STATE_BY_ID)
    assert shape(cmd) == shape(get_state_by_id(StateCtx(), "aTID", 0))


def test_commit_transit_vector() -> None:
    original = commit(transit(StateCtx(current=State(id="aTID")), "first"))
    assert encode_command(original) == COMMIT_TRANSIT
    assert shape(decode_command(COMMIT_TRANSIT)) == shape(original)


def test_noop_vector() -> None:
    assert encode_command(noop()) == h("52 00")
    assert shape(decode_command(h("52 00"))) == ("noop",)


def test_error_vector() -> None:
    assert encode_error("aborted", "rev mismatch: aTID") == ERROR_ABORTED
    assert decode_error(ERROR_ABORTED) == ("aborted", "rev mismatch: aTID")


def test_get_states_vector() -> None:
    cmd = get_states_by_labels({"foo": "fooVal"}).with_since_latest()
    assert encode_command(cmd) == GET_STATES
    decoded = decode_command(GET_STATES)
    assert isinstance(decoded, GetStatesCmd)
    assert (decoded.since_rev, decoded.labels, decoded.limit) == (-1, [{"foo": "fooVal"}], 50)


def test_vectors_decode_with_the_protobuf_runtime() -> None:
    msg = pb.Command.FromString(GET_STATE_BY_ID)
    assert msg.get_state_by_id.id == "aTID"
    assert msg.get_state_by_id.state_ref.HasField("idx")
    assert pb.Command.FromString(COMMIT_TRANSIT).commit.commands[0].transit.to == "first"
    assert pb.Command.FromString(GET_STATES).get_states.since_rev == -1


def test_json_error_body() -> None:
    body = encode_error("not_found", "state not found; id=<x>", json=True)
    assert body == b'{"code":"not_found","message":"state not found; id=\\u003cx\\u003e"}'
    assert decode_error(body, json=True) == ("not_found", "state not found; id=<x>")


def test_content_type_selection() -> None:
    assert is_json("application/json")
    assert is_json("application/json; charset=utf-8")
    assert not is_json(None)
    assert not is_json("")
    assert not is_json("application/proto")
    assert not is_json("application/jsonx")
    assert content_type(True) == JSON
    assert content_type(False) == PROTO


# --- wire.md §4.1 references ----------------------------------------------------------------


def test_refs_same_object_twice() -> None:
    a = StateCtx(current=State(id="a"))
    cmd = commit(transit(a, "x"), park(a))
    msg = pb.Command.FromString(encode_command(cmd))
    assert len(msg.state_ctxs) == 1
    assert [c.transit.state_ref.idx or c.park.state_rexf.idx for c in msg.commit.commands] == [0, 0]
    decoded = decode_command(encode_command(cmd))
    assert isinstance(decoded, CommitCmd)
    first, second = decoded.commands
    assert isinstance(first, TransitCmd) and isinstance(second, ParkCmd)
    assert first.ctx is second.ctx


@pytest.mark.parametrize("use_json", [False, True])
def test_refs_preserve_ref(use_json: bool) -> None:
    s = StateCtx(current=State(id="s"))
    cmd = commit(transit(s, "x"), park(s), stack(s, s, "k"), unstack(s, s, "k"))
    body = encode_command(cmd, json=use_json)
    decoded = decode_command(body, json=use_json)
    assert isinstance(decoded, CommitCmd)
    t, p, st_, un = decoded.commands
    assert isinstance(t, TransitCmd) and isinstance(p, ParkCmd)
    assert isinstance(st_, StackCmd) and isinstance(un, UnstackCmd)
    objs = {id(t.ctx), id(p.ctx), id(st_.carrier), id(st_.stacked), id(un.carrier), id(un.target)}
    assert len(objs) == 1
    if not use_json:
        assert len(pb.Command.FromString(body).state_ctxs) == 1


def test_refs_only_consecutive_duplicates_removed() -> None:
    a = StateCtx(current=State(id="a"))
    b = StateCtx(current=State(id="b"))
    cmd = commit(park(a), stack(b, a, "k"), transit(b, "x"))
    msg = pb.Command.FromString(encode_command(cmd))
    assert [c.current.id for c in msg.state_ctxs] == ["a", "b", "a", "b"]
    p, s, t = msg.commit.commands
    assert p.park.state_rexf.idx == 0
    assert (s.stack.carrier_state_ref.idx, s.stack.stack_state_ref.idx) == (1, 0)
    assert t.transit.state_ref.idx == 1
    decoded = decode_command(encode_command(cmd))
    assert isinstance(decoded, CommitCmd)
    dp, ds, dt = decoded.commands
    assert isinstance(dp, ParkCmd) and isinstance(ds, StackCmd) and isinstance(dt, TransitCmd)
    assert dp.ctx is ds.stacked and ds.carrier is dt.ctx and dp.ctx is not dt.ctx


def test_idx_zero_is_written_explicitly() -> None:
    body = encode_command(get_data(StateCtx(), "alias"))
    assert body.endswith(h("b2 01 0b 0a 02 08 00 12 05 61 6c 69 61 73"))


def test_missing_idx_means_zero() -> None:
    # A standard proto3 encoder (or Connect-web's JSON) omits idx 0.
    body = h("0a 04 0a 00 12 00") + h("3a 02 0a 00")
    decoded = decode_command(body)
    assert shape(decoded)[0] == "execute"
    ui = b'{"stateCtxs":[{"current":{"id":"x"}}],"getData":{"alias":"a","stateRef":{}}}'
    got = decode_command(ui, json=True)
    assert got.ctx.current.id == "x"  # type: ignore[attr-defined]


# --- the protobuf runtime reads what we write, and we read what it writes -------------------


@SETTINGS
@given(any_command())
def test_runtime_decodes_our_binary(cmd: Any) -> None:
    assert pb.Command.FromString(encode_command(cmd)) == to_pb(cmd)


@SETTINGS
@given(any_command())
def test_runtime_decodes_our_proto3_json(cmd: Any) -> None:
    body = encode_command(cmd, json=True, dialect="proto3")
    assert json_format.Parse(body, pb.Command()) == to_pb(cmd)


@SETTINGS
@given(any_command())
def test_we_decode_runtime_binary(cmd: Any) -> None:
    msg = to_pb(cmd)
    decoded = decode_command(msg.SerializeToString())
    assert to_pb(decoded) == msg
    # Same contexts shared the same way, and the same list of contexts.
    assert [ctx_shape(c) for c in ctx_list(decoded)] == [
        ctx_shape(decode_state_ctx(c.SerializeToString())) for c in msg.state_ctxs
    ]


@SETTINGS
@given(any_command(), st.booleans())
def test_we_decode_runtime_json(cmd: Any, snake_case: bool) -> None:
    msg = to_pb(cmd)
    body = json_format.MessageToJson(msg, preserving_proto_field_name=snake_case)
    assert to_pb(decode_command(body.encode(), json=True)) == msg


@SETTINGS
@given(any_command(), st.sampled_from(["binary", "go", "proto3"]))
def test_round_trip_preserves_contents_and_sharing(cmd: Any, encoding: str) -> None:
    if encoding == "binary":
        decoded = decode_command(encode_command(cmd))
    else:
        body = encode_command(cmd, json=True, dialect=encoding)  # type: ignore[arg-type]
        decoded = decode_command(body, json=True)
    assert shape(decoded) == shape(cmd)


def _canonical(cmd: Any) -> None:
    """Make ``cmd`` one that a canonical encoder writes exactly as Go does: maps in key order
    (Go's order is random), no empty map values (Go omits them, upb writes ``12 00``) and no
    zero times (Go writes a set time even at 0, proto3 omits a zero scalar)."""
    seen: set[int] = set()

    def fix_map(d: dict[str, str]) -> None:
        # upb's deterministic order: bytewise, and on a common prefix the longer key first.
        items = sorted(((k, v or "-") for k, v in d.items()), key=lambda kv: [*kv[0].encode(), 256])
        d.clear()
        d.update(items)

    def fix_state(state: State) -> None:
        fix_map(state.annotations)
        fix_map(state.labels)
        fix_map(state.transition.annotations)
        if state.committed_at is not None and to_millis(state.committed_at) == 0:
            state.committed_at = None

    def fix_ctx(ctx: StateCtx) -> None:
        if id(ctx) in seen:
            return
        seen.add(id(ctx))
        fix_state(ctx.current)
        fix_state(ctx.committed)
        for t in ctx.transitions:
            fix_map(t.annotations)
        for d in ctx.datas.values():
            fix_map(d.annotations)

    def fix(c: Any) -> None:
        for name in ("ctx", "carrier", "stacked", "target"):
            if hasattr(c, name):
                fix_ctx(getattr(c, name))
        for name in ("annotations", "labels"):
            value = getattr(c, name, None)
            if isinstance(value, dict):
                fix_map(value)
            elif isinstance(value, list):
                for d in value:
                    fix_map(d)
        if isinstance(c, CommitCmd):
            for sub in c.commands:
                fix(sub)
        if isinstance(c, DelayCmd):
            if c.execute_at is not None and to_seconds(c.execute_at) == 0:
                c.execute_at = None
            if c.result is not None:
                fix_state(c.result.state)
        if isinstance(c, GetStatesCmd):
            if c.since_time is not None and to_millis(c.since_time) == 0:
                c.since_time = None
            for state in c.result.states if c.result else ():
                fix_state(state)
        if isinstance(c, GetDelayedStatesCmd):
            if c.since is not None and to_seconds(c.since) == 0:
                c.since = None
            if c.until is not None and to_seconds(c.until) == 0:
                c.until = None
            for d in c.result.delayed_states if c.result else ():
                fix_state(d.state)

    fix(cmd)


@SETTINGS
@given(any_command())
def test_binary_bytes_equal_a_canonical_encoder(cmd: Any) -> None:
    """Field order, tags, varints, lengths and presence: byte for byte those of the runtime's
    deterministic encoding of the message Go would send, once map order is made canonical."""
    _canonical(cmd)
    assert encode_command(cmd) == to_pb(cmd).SerializeToString(deterministic=True)


@SETTINGS
@given(state_ctxs(), st.sampled_from(["binary", "go", "proto3"]))
def test_state_ctx_round_trip(ctx: StateCtx, encoding: str) -> None:
    if encoding == "binary":
        body = encode_state_ctx(ctx)
        assert pb.StateCtx.FromString(body) == pb_state_ctx(ctx)
        decoded = decode_state_ctx(body)
    else:
        body = encode_state_ctx(ctx, json=True, dialect=encoding)  # type: ignore[arg-type]
        if encoding == "proto3":
            assert json_format.Parse(body, pb.StateCtx()) == pb_state_ctx(ctx)
        decoded = decode_state_ctx(body, json=True)
    assert ctx_shape(decoded) == ctx_shape(ctx)


@SETTINGS
@given(state_ctxs())
def test_we_decode_runtime_state_ctx(ctx: StateCtx) -> None:
    msg = pb_state_ctx(ctx)
    assert pb_state_ctx(decode_state_ctx(msg.SerializeToString())) == msg
    body = json_format.MessageToJson(msg).encode()
    assert pb_state_ctx(decode_state_ctx(body, json=True)) == msg


# --- the Go JSON dialect (wire.md §9.2) -----------------------------------------------------


def full_state() -> State:
    return State(
        id="aTID",
        rev=13,
        annotations={"v": "1"},
        labels={"foo": "fooVal"},
        committed_at=from_millis(1735689600000),
        transition=Transition("first", {"k": "v"}),
    )


def test_go_json_state_shape() -> None:
    ctx = StateCtx(current=full_state())
    body = encode_state_ctx(ctx, json=True)
    assert body == (
        b'{"current":{"id":"aTID","rev":"13","annotations":{"v":"1"},"labels":{"foo":"fooVal"},'
        b'"committedAtUnixMilli":"1735689600000","transition":{"to":"first","annotations":'
        b'{"k":"v"}}}}'
    )


def test_go_json_state_ctx_key_order_and_committed_presence() -> None:
    ctx = StateCtx(
        current=State(id="x"),
        committed=State(id="x", rev=3),
        transitions=[Transition("x")],
        datas={"b": Data(b"\x00\xff", {"binary": "true"}, 3), "a": Data(b"text", {}, 1)},
    )
    obj = json.loads(encode_state_ctx(ctx, json=True))
    assert list(obj) == ["current", "committed", "transitions", "datas"]
    assert list(obj["datas"]) == ["a", "b"]
    assert obj["datas"]["b"] == {"rev": "3", "blob": "AP8=", "annotations": {"binary": "true"}}
    assert obj["datas"]["a"] == {"rev": "1", "blob": "text"}
    assert obj["transitions"] == [{"to": "x", "annotations": {}}] or obj["transitions"] == [
        {"to": "x"}
    ]
    unsaved = json.loads(encode_state_ctx(StateCtx(current=State(id="x")), json=True))
    assert "committed" not in unsaved


def test_go_json_renamed_fields() -> None:
    a = StateCtx(current=State(id="a"))
    b = StateCtx(current=State(id="b"))
    body = encode_command(commit(transit(a, "next"), park(a), stack(b, a, "k")), json=True)
    obj = json.loads(body)
    t, p, s = (c for c in obj["commit"]["commands"])
    assert t == {"transit": {"stateRef": {"idx": "0"}, "flowId": "next"}}
    assert p == {"park": {"stateRef": {"idx": "0"}}}
    assert list(s["stack"]) == ["stackedStateRef", "carrierStateRef", "annotation"]
    assert json.loads(encode_command(get_state_by_id(a, "a", 2), json=True))["getStateByID"] == {
        "stateRef": {"idx": "0"},
        "id": "a",
        "rev": "2",
    }


def test_go_json_get_states_and_delayed() -> None:
    cmd = get_states(
        {"b": "2", "a": "1"}, since_rev=5, since_time=from_millis(1000), latest_only=True, limit=7
    )
    cmd.result = GetStatesResult([State(id="s", rev=6)], more=True)
    obj = json.loads(encode_command(cmd, json=True))["getStates"]
    assert list(obj) == ["sinceRev", "sinceTime_usec", "labels", "latestOnly", "limit", "result"]
    assert obj["labels"] == [{"a": "1", "b": "2"}]
    assert list(obj["labels"][0]) == ["a", "b"]
    assert obj["sinceTime_usec"] == "1000"
    assert obj["result"] == {"states": [{"id": "s", "rev": "6", "transition": {}}], "more": True}

    delayed = GetDelayedStatesCmd(since=from_seconds(10), until=from_seconds(20), offset=3, limit=4)
    delayed.result = GetDelayedStatesResult([DelayedState(State(id="d"), from_seconds(15), 7)])
    obj = json.loads(encode_command(delayed, json=True))["getDelayedStates"]
    assert obj == {
        "sinceTimeSec": "10",
        "untilTimeSec": "20",
        "offset": "3",
        "limit": "4",
        "Result": {
            "delayedStates": [
                {"state": {"id": "d", "transition": {}}, "offset": "7", "executeAtSec": "15"}
            ]
        },
    }


def test_go_json_delay_key_order() -> None:
    ctx = StateCtx(current=State(id="d"))
    cmd = DelayCmd(ctx, "later", execute_at=from_seconds(100), commit=True, annotations={"k": "v"})
    cmd.result = DelayedState(State(id="d"), from_seconds(100))
    obj = json.loads(encode_command(cmd, json=True))["delay"]
    assert list(obj) == ["stateRef", "executeAtSec", "commit", "to", "annotations", "result"]


def test_go_json_escapes_like_go() -> None:
    body = encode_state_ctx(StateCtx(current=State(id="<a&b>\u2028\u2029é")), json=True)
    assert b'"id":"\\u003ca\\u0026b\\u003e\\u2028\\u2029\xc3\xa9"' in body
    assert b" " not in body


def test_go_json_input_both_dialects() -> None:
    go = (
        b'{"stateCtxs":[{"current":{"id":"a"}},{"current":{"id":"b"}}],"commit":{"commands":['
        b'{"transit":{"stateRef":{"idx":"0"},"flowId":"x","to":"ignored"}},'
        b'{"park":{"stateRef":{"idx":"1"}}},'
        b'{"stack":{"carrierStateRef":{"idx":1},"stackedStateRef":{"idx":"0"},"annotation":"k"}}'
        b"]}}"
    )
    proto3 = (
        b'{"state_ctxs":[{"current":{"id":"a"}},{"current":{"id":"b"}}],"commit":{"commands":['
        b'{"transit":{"stateRef":{"idx":"0"},"to":"x"}},'
        b'{"park":{"stateRexf":{"idx":"1"}}},'
        b'{"stack":{"carrier_state_ref":{"idx":"1"},"stackStateRef":{},"annotation":"k"}}'
        b"]}}"
    )
    assert shape(decode_command(go, json=True)) == shape(decode_command(proto3, json=True))
    decoded = decode_command(go, json=True)
    assert isinstance(decoded, CommitCmd)
    t = decoded.commands[0]
    assert isinstance(t, TransitCmd) and t.to == "x"


def test_json_input_case_insensitive_and_label_forms() -> None:
    go = b'{"GETSTATES":{"sinceTime_usec":"5","labels":[{"k":"v"},{}],"Limit":3}}'
    proto3 = (
        b'{"getStates":{"sinceTimeUsec":5,"labels":[{"labels":{"k":"v"}},{"labels":{}}],'
        b'"limit":"3"}}'
    )
    for body in (go, proto3):
        cmd = decode_command(body, json=True)
        assert isinstance(cmd, GetStatesCmd)
        assert (cmd.since_time, cmd.labels, cmd.limit) == (from_millis(5), [{"k": "v"}, {}], 3)
    by_id = decode_command(b'{"stateCtxs":[{}],"getStateById":{"id":"x","stateRef":{}}}', json=True)
    assert shape(by_id)[0] == "get_state_by_id"
    delayed = decode_command(b'{"getDelayedStates":{"result":{"more":true}}}', json=True)
    assert isinstance(delayed, GetDelayedStatesCmd) and delayed.result is not None
    assert delayed.result.more


def test_json_nulls_are_absent() -> None:
    body = b'{"stateCtxs":[{"current":{"id":"x","rev":null,"labels":null}}],"noop":null}'
    with pytest.raises(WireError) as err:  # a null command field is no command
        decode_command(body, json=True)
    assert err.value.field == "command"
    ok = decode_command(b'{"stateCtxs":null,"getStates":{"limit":null}}', json=True)
    assert isinstance(ok, GetStatesCmd) and ok.limit == 0


# --- semantics carried by the wire ----------------------------------------------------------


def test_delay_commit_false_is_the_wire_default() -> None:
    ctx = StateCtx(current=State(id="d"))
    body = encode_command(DelayCmd(ctx, "x", execute_at=from_seconds(5), commit=False))
    decoded = decode_command(body)
    assert isinstance(decoded, DelayCmd) and decoded.commit is False
    assert pb.Command.FromString(body).delay.commit is False
    decoded = decode_command(encode_command(DelayCmd(ctx, "x", execute_at=from_seconds(5))))
    assert isinstance(decoded, DelayCmd) and decoded.commit is True


def test_delay_with_only_after_cannot_be_encoded() -> None:
    from datetime import timedelta

    cmd = DelayCmd(StateCtx(), "x", after=timedelta(seconds=3))
    for use_json in (False, True):
        with pytest.raises(WireError) as err:
            encode_command(cmd, json=use_json)
        assert err.value.field == "delay.execute_at_sec"


def test_get_states_absent_limit_decodes_as_zero() -> None:
    # Go applies no default on the server: limit 0 stays 0 (wire.md §4.2).
    cmd = decode_command(h("9a 01 00"))
    assert isinstance(cmd, GetStatesCmd) and cmd.limit == 0 and cmd.since_time is None


def test_since_time_epoch_is_present() -> None:
    cmd = get_states(since_time=from_millis(0))
    body = encode_command(cmd)
    assert body == h("9a 01 04 10 00 28 32")
    decoded = decode_command(body)
    assert isinstance(decoded, GetStatesCmd) and decoded.since_time == from_millis(0)


def test_binary_data_blob_is_base64_on_the_wire() -> None:
    ctx = StateCtx(datas={"f": Data(b"\x00\x01\x02", {"binary": "true"}, 2)})
    msg = pb.StateCtx.FromString(encode_state_ctx(ctx))
    assert msg.datas["f"].blob == "AAEC"
    assert decode_state_ctx(encode_state_ctx(ctx)).datas["f"].blob == b"\x00\x01\x02"


def test_text_blob_with_invalid_utf8_in_json_is_replaced_like_go() -> None:
    ctx = StateCtx(datas={"t": Data(b"ok\xff", {}, 1)})
    obj = json.loads(encode_state_ctx(ctx, json=True))
    assert obj["datas"]["t"]["blob"] == "ok\ufffd"
    # Binary protobuf carries the bytes as they are (Go does not check UTF-8 either).
    assert decode_state_ctx(encode_state_ctx(ctx)).datas["t"].blob == b"ok\xff"


def test_first_command_field_wins() -> None:
    body = h("52 00") + h("9a 01 00")
    assert shape(decode_command(body)) == ("noop",)


def test_unknown_fields_are_ignored() -> None:
    body = h("f8 07 01") + h("52 00") + h("a2 06 02 08 01")  # fields 127 and 100
    assert shape(decode_command(body)) == ("noop",)


# --- extension: GetStatesResult.scanned_rev (field 3, JSON scannedRev) ----------------------


def _page(scanned_rev: int) -> GetStatesCmd:
    cmd = get_states({"a": "1"}, limit=50)
    cmd.result = GetStatesResult([State(id="s", rev=6)], more=False, scanned_rev=scanned_rev)
    return cmd


@pytest.mark.parametrize("encoding", ["binary", "go", "proto3"])
def test_scanned_rev_round_trip(encoding: str) -> None:
    for value in (1, 123_456, (1 << 63) - 1):
        cmd = _page(value)
        if encoding == "binary":
            decoded = decode_command(encode_command(cmd))
        else:
            body = encode_command(cmd, json=True, dialect=encoding)  # type: ignore[arg-type]
            assert json.loads(body)["getStates"]["result"]["scannedRev"] == str(value)
            decoded = decode_command(body, json=True)
        assert isinstance(decoded, GetStatesCmd) and decoded.result is not None
        assert decoded.result.scanned_rev == value


def test_scanned_rev_on_the_wire() -> None:
    body = encode_command(_page(300))
    result = pb.Command.FromString(body).get_states.result
    assert result.scanned_rev == 300
    # field 3, varint, after `states` (and `more`): 18 ac 02
    assert body.endswith(h("18 ac 02"))
    decoded = decode_command(h("9a 01 07 32 05 10 01 18 ac 02"))
    assert isinstance(decoded, GetStatesCmd) and decoded.result is not None
    assert (decoded.result.more, decoded.result.scanned_rev) == (True, 300)


def test_scanned_rev_absent_is_zero_and_not_written() -> None:
    # What a Go server sends (it knows no field 3) decodes as 0 = unknown; 0 is not written,
    # so the bytes are those Go writes.
    cmd = _page(0)
    body = encode_command(cmd)
    assert pb.Command.FromString(body).get_states.result.scanned_rev == 0
    assert body == to_pb(cmd).SerializeToString(deterministic=True)
    decoded = decode_command(h("9a 01 02 32 00"))
    assert isinstance(decoded, GetStatesCmd) and decoded.result is not None
    assert decoded.result.scanned_rev == 0
    for dialect in ("go", "proto3"):
        text = encode_command(cmd, json=True, dialect=dialect)  # type: ignore[arg-type]
        assert "scannedRev" not in json.loads(text)["getStates"]["result"]
        got = decode_command(b'{"getStates":{"result":{"states":[]}}}', json=True)
        assert isinstance(got, GetStatesCmd) and got.result is not None
        assert got.result.scanned_rev == 0


def test_scanned_rev_bad_input_names_the_field() -> None:
    with pytest.raises(WireError) as err:
        decode_command(h("9a 01 04 32 02 1a 00"))  # field 3 with the wrong wire type
    assert err.value.field == "get_states.result.scanned_rev"
    with pytest.raises(WireError) as err:
        decode_command(b'{"getStates":{"result":{"scannedRev":"x"}}}', json=True)
    assert err.value.field == "get_states.result.scanned_rev"
    with pytest.raises(WireError) as err:
        encode_command(_page(1 << 63))
    assert err.value.field == "get_states.result.scanned_rev"
