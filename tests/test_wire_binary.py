"""Binary protobuf codec of the model messages (wire.md §2-§3, vectors from §7.3)."""

from __future__ import annotations

import base64
import contextlib
import random
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowstate.clock import from_millis
from flowstate.data import Data
from flowstate.errors import ValidationError
from flowstate.state import State, StateCtx, Transition
from flowstate.wire.binary import (
    close_message,
    decode_data,
    decode_state,
    decode_state_ctx,
    decode_transition,
    encode_data,
    encode_state,
    encode_state_ctx,
    encode_transition,
    open_message,
    put_int64,
    put_string,
    read_tag,
    skip_field,
    write_state_ctx,
)

INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def field_chunks(buf: bytes) -> list[bytes]:
    """Split a message into its top-level fields (tag + value), in byte order."""
    chunks = []
    pos = 0
    while pos < len(buf):
        _, wire_type, after_tag = read_tag(buf, pos, len(buf), "test")
        end = skip_field(buf, after_tag, len(buf), wire_type, "test")
        chunks.append(buf[pos:end])
        pos = end
    return chunks


# --- test vectors ---------------------------------------------------------------------------


def test_empty_state_ctx_vector() -> None:
    assert encode_state_ctx(StateCtx()) == h("0a 02 32 00 12 02 32 00")


def test_state_ctx_with_current_id_vector() -> None:
    ctx = StateCtx(current=State(id="aTID"))
    assert encode_state_ctx(ctx) == h("0a 02 32 00 12 08 0a 04 61 54 49 44 32 00")
    assert decode_state_ctx(h("0a 02 32 00 12 08 0a 04 61 54 49 44 32 00")) == ctx


def test_full_state_vector() -> None:
    state = State(
        id="aTID",
        rev=13,
        annotations={"v": "1"},
        labels={"foo": "fooVal"},
        committed_at=from_millis(1735689600000),
        transition=Transition("first", {"k": "v"}),
    )
    expected = h(
        "0a 04 61 54 49 44"  # id
        "10 0d"  # rev 13
        "1a 06 0a 01 76 12 01 31"  # annotations v=1
        "22 0d 0a 03 66 6f 6f 12 06 66 6f 6f 56 61 6c"  # labels foo=fooVal
        "28 80 f8 a5 f9 c1 32"  # committed_at_unix_milli 1735689600000
        "32 0f 12 05 66 69 72 73 74 1a 06 0a 01 6b 12 01 76"  # transition
    )
    assert encode_state(state) == expected
    assert decode_state(expected) == state


def test_empty_state_writes_only_transition() -> None:
    assert encode_state(State()) == h("32 00")
    assert decode_state(b"") == State()


def test_get_state_by_id_command_vector_with_helpers() -> None:
    # wire.md §7.3: the helpers are enough to build a Command (two-byte tag for field 17).
    out = bytearray()
    start = open_message(out, 1 << 3 | 2)
    write_state_ctx(out, StateCtx())
    close_message(out, start)
    cmd = open_message(out, 17 << 3 | 2)
    put_string(out, 0x0A, "aTID")
    ref = open_message(out, 3 << 3 | 2)
    put_int64(out, 0x08, 0, "idx")
    close_message(out, ref)
    close_message(out, cmd)
    assert bytes(out) == h("0a 08 0a 02 32 00 12 02 32 00 8a 01 0a 0a 04 61 54 49 44 1a 02 08 00")


def test_long_message_gets_multibyte_length() -> None:
    state = State(id="x" * 300)
    encoded = encode_state(state)
    assert encoded[:3] == h("0a ac 02")
    assert decode_state(encoded) == state
    ctx = StateCtx(current=state)
    assert decode_state_ctx(encode_state_ctx(ctx)) == ctx


# --- scalars ------------------------------------------------------------------------------


def test_negative_rev_is_ten_byte_varint() -> None:
    encoded = encode_state(State(rev=-1))
    assert encoded == h("10 ff ff ff ff ff ff ff ff ff 01 32 00")
    assert decode_state(encoded).rev == -1


def test_int64_extremes_round_trip() -> None:
    for rev in (-(1 << 63), (1 << 63) - 1, -2, 1):
        assert decode_state(encode_state(State(rev=rev))).rev == rev
        assert decode_data(encode_data(Data(rev=rev))).rev == rev


def test_rev_out_of_int64_range_is_rejected() -> None:
    with pytest.raises(ValidationError) as err:
        encode_state(State(rev=1 << 63))
    assert err.value.field == "state.rev"
    with pytest.raises(ValidationError):
        encode_data(Data(rev=-(1 << 63) - 1))


def test_committed_at_ms_precision() -> None:
    when = datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    decoded = decode_state(encode_state(State(committed_at=when)))
    assert decoded.committed_at == datetime(2025, 1, 1, 0, 0, 0, 123000, tzinfo=UTC)


def test_committed_at_none_is_omitted_and_epoch_is_written() -> None:
    assert decode_state(encode_state(State())).committed_at is None
    epoch = from_millis(0)
    encoded = encode_state(State(committed_at=epoch))
    assert encoded == h("28 00 32 00")
    assert decode_state(encoded).committed_at == epoch


def test_negative_committed_at() -> None:
    when = from_millis(-1)
    encoded = encode_state(State(committed_at=when))
    assert encoded.startswith(h("28 ff ff ff ff ff ff ff ff ff 01"))
    assert decode_state(encoded).committed_at == when


def test_committed_at_out_of_datetime_range() -> None:
    with pytest.raises(ValidationError) as err:
        decode_state(h("28 ff ff ff ff ff ff ff ff 7f"))
    assert err.value.field == "state.committed_at_unix_milli"


# --- maps -----------------------------------------------------------------------------------


def test_empty_map_value_is_omitted() -> None:
    encoded = encode_state(State(annotations={"k": ""}))
    assert encoded == h("1a 03 0a 01 6b 32 00")
    assert decode_state(encoded).annotations == {"k": ""}


def test_map_value_may_be_written_explicitly_empty() -> None:
    assert decode_state(h("1a 05 0a 01 6b 12 00")).annotations == {"k": ""}


def test_map_entry_fields_in_any_order() -> None:
    assert decode_state(h("22 06 12 01 76 0a 01 6b")).labels == {"k": "v"}


@pytest.mark.parametrize(
    ("encode", "field"),
    [
        (lambda: encode_state(State(annotations={"": "v"})), "annotations"),
        (lambda: encode_state(State(labels={"": "v"})), "labels"),
        (lambda: encode_transition(Transition("x", {"": ""})), "annotations"),
        (lambda: encode_data(Data(annotations={"": "v"})), "annotations"),
        (lambda: encode_state_ctx(StateCtx(datas={"": Data()})), "datas"),
    ],
)
def test_encoding_empty_map_key_is_rejected(encode: Callable[[], bytes], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        encode()
    assert err.value.field == field
    assert "map key cannot be empty" in str(err.value)


@pytest.mark.parametrize(
    ("decode", "buf", "field"),
    [
        (decode_state, "1a 03 12 01 76", "annotations"),
        (decode_state, "22 00", "labels"),
        (decode_transition, "1a 02 0a 00", "annotations"),
        (decode_data, "2a 00", "annotations"),
        (decode_state_ctx, "22 02 12 00", "datas"),
    ],
)
def test_decoding_empty_map_key_is_rejected(
    decode: Callable[[bytes], object], buf: str, field: str
) -> None:
    with pytest.raises(ValidationError) as err:
        decode(h(buf))
    assert err.value.field == field


def test_datas_are_sorted_by_alias() -> None:
    ctx = StateCtx(datas={"b": Data(b"2"), "a": Data(b"1")})
    encoded = encode_state_ctx(ctx)
    assert encoded == h(
        "0a 02 32 00 12 02 32 00"  # committed, current
        "22 08 0a 01 61 12 03 22 01 31"  # a -> blob "1"
        "22 08 0a 01 62 12 03 22 01 32"  # b -> blob "2"
    )
    decoded = decode_state_ctx(encoded)
    assert decoded == ctx
    assert list(decoded.datas) == ["a", "b"]


def test_data_entry_without_value_is_empty_data() -> None:
    assert decode_state_ctx(h("22 03 0a 01 61")).datas == {"a": Data()}


def test_transitions_keep_order() -> None:
    ctx = StateCtx(transitions=[Transition("a"), Transition(), Transition("b", {"k": "v"})])
    decoded = decode_state_ctx(encode_state_ctx(ctx))
    assert decoded.transitions == ctx.transitions


# --- data blobs -------------------------------------------------------------------------------


def test_binary_blob_is_base64() -> None:
    data = Data(b"\x00\xff", {"binary": "true"}, rev=3)
    encoded = encode_data(data)
    assert (
        encoded == h("10 03 22 04") + b"AP8=" + h("2a 0e 0a 06") + b"binary" + h("12 04") + b"true"
    )
    assert decode_data(encoded) == data


def test_text_blob_is_raw() -> None:
    data = Data(b"hello", {"binary": "false"})
    encoded = encode_data(data)
    assert encoded.startswith(h("22 05") + b"hello")
    assert decode_data(encoded) == data


def test_binary_flag_after_blob_is_honoured() -> None:
    blob = base64.b64encode(b"\x01\x02\x03")
    annotations = h("2a 0e 0a 06") + b"binary" + h("12 04") + b"true"
    after = h("22 04") + blob + annotations
    before = annotations + h("22 04") + blob
    assert decode_data(after) == Data(b"\x01\x02\x03", {"binary": "true"})
    assert decode_data(before) == Data(b"\x01\x02\x03", {"binary": "true"})


def test_invalid_base64_blob_is_rejected() -> None:
    buf = h("22 03") + b"AP8" + h("2a 0e 0a 06") + b"binary" + h("12 04") + b"true"
    with pytest.raises(ValidationError) as err:
        decode_data(buf)
    assert err.value.field == "data.blob"


def test_non_utf8_text_blob_is_accepted_like_go() -> None:
    assert decode_data(h("22 02 ff fe")).blob == b"\xff\xfe"


def test_empty_blob_is_omitted() -> None:
    assert encode_data(Data(b"", {"binary": "true"})).startswith(h("2a"))
    assert encode_data(Data()) == b""


# --- decoding robustness ---------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    unknown = (
        h("78 05")  # field 15 varint
        + h("81 01 01 02 03 04 05 06 07 08")  # field 16 fixed64
        + h("8a 01 02 aa bb")  # field 17 bytes
        + h("95 01 01 02 03 04")  # field 18 fixed32
    )
    assert decode_state(h("0a 01 78") + unknown + h("10 02")) == State(id="x", rev=2)
    ctx = decode_state_ctx(unknown + encode_state_ctx(StateCtx(current=State(id="y"))))
    assert ctx == StateCtx(current=State(id="y"))
    assert decode_transition(unknown + h("12 01 74")) == Transition("t")
    # Data fields 1 (id) and 3 (binary) are legacy: skipped whatever their content.
    assert decode_data(h("0a 02 69 64 18 01 10 07") + unknown) == Data(rev=7)
    # Transition.from is ignored.
    assert decode_transition(h("0a 01 66 12 01 74")) == Transition("t")
    # Unknown fields inside map entries too.
    assert decode_state(h("1a 08 0a 01 6b 12 01 76 18 01")).annotations == {"k": "v"}


def test_fields_in_any_order() -> None:
    state = State(id="a", rev=5, labels={"l": "1"}, transition=Transition("t"))
    chunks = field_chunks(encode_state(state))
    assert decode_state(b"".join(reversed(chunks))) == state


def test_repeated_message_fields_merge() -> None:
    buf = h("12 03 0a 01 61") + h("12 02 10 05")
    assert decode_state_ctx(buf).current == State(id="a", rev=5)


def test_non_canonical_tag_varint_is_accepted() -> None:
    assert decode_state(h("8a 00 01 61")) == State(id="a")


def test_buffer_types() -> None:
    encoded = encode_state_ctx(StateCtx(current=State(id="aTID")))
    assert decode_state_ctx(bytearray(encoded)) == decode_state_ctx(memoryview(encoded))


@pytest.mark.parametrize(
    ("decode", "buf", "field", "reason"),
    [
        (decode_state_ctx, "0a", "state_ctx", "truncated varint"),
        (decode_state_ctx, "0a 05 32 00", "state_ctx", "truncated length-delimited field"),
        (decode_state_ctx, "82", "state_ctx", "truncated varint"),
        (decode_state, "10", "state.rev", "truncated varint"),
        (decode_state, "10 ff", "state.rev", "truncated varint"),
        (decode_state, "08 01", "state.id", "wrong wire type 0"),
        (decode_state, "12 01 00", "state.rev", "wrong wire type 2"),
        (decode_state, "35 00 00 00 00", "state.transition", "wrong wire type 5"),
        (decode_state_ctx, "08 00", "state_ctx.committed", "wrong wire type 0"),
        (decode_data, "20 01", "data.blob", "wrong wire type 0"),
        (decode_transition, "10 01", "transition.to", "wrong wire type 0"),
        (decode_state, "00", "state", "invalid field number 0"),
        (decode_state, "0b", "state.id", "wrong wire type 3"),
        (decode_state, "7b", "state", "unsupported wire type 3"),
        (decode_state, "7c", "state", "unsupported wire type 4"),
        (decode_state, "7e", "state", "unsupported wire type 6"),
        (decode_state, "79 00", "state", "truncated fixed-size field"),
        (decode_state, "10 ff ff ff ff ff ff ff ff ff 02", "state.rev", "varint overflows"),
        (decode_state, "10 ff ff ff ff ff ff ff ff ff ff 01", "state.rev", "varint overflows"),
        (decode_state, "0a 01 ff", "state.id", "not valid UTF-8"),
        (decode_state, "0a 03 ed a0 80", "state.id", "not valid UTF-8"),
        (decode_state, "1a 06 0a 01 6b 12 00 ff", "annotations", "truncated varint"),
        (decode_state, "1a 06 0a 01 6b 12 01 c3", "annotations", "not valid UTF-8"),
        (decode_state, "32 02 12 01", "transition", "truncated length-delimited field"),
    ],
)
def test_malformed_input_is_a_validation_error(
    decode: Callable[[bytes], object], buf: str, field: str, reason: str
) -> None:
    with pytest.raises(ValidationError) as err:
        decode(h(buf))
    assert err.value.field == field
    assert reason in err.value.reason


def test_lone_surrogate_cannot_be_encoded() -> None:
    with pytest.raises(ValidationError) as err:
        encode_state(State(id="\udc00"))
    assert err.value.field == "state"
    with pytest.raises(ValidationError):
        encode_state_ctx(StateCtx(datas={"a": Data(annotations={"k": "\ud800"})}))


# --- property tests ----------------------------------------------------------------------------

keys = st.text(min_size=1, max_size=8)
values = st.text(max_size=8)
string_maps = st.dictionaries(keys, values, max_size=4)
millis = st.integers(min_value=-62_135_596_800_000, max_value=253_402_300_799_999)

transitions = st.builds(Transition, to=st.text(max_size=8), annotations=string_maps)
states = st.builds(
    State,
    id=st.text(max_size=12),
    rev=INT64,
    annotations=string_maps,
    labels=string_maps,
    committed_at=st.none() | millis.map(from_millis),
    transition=transitions,
)
plain_annotations = st.dictionaries(keys.filter(lambda k: k != "binary"), values, max_size=3)
binary_datas = st.builds(
    lambda blob, annotations, rev: Data(blob, {**annotations, "binary": "true"}, rev),
    st.binary(max_size=64),
    plain_annotations,
    INT64,
)
text_datas = st.builds(
    lambda text, annotations, flag, rev: Data(
        text.encode(), {**annotations, **({"binary": flag} if flag else {})}, rev
    ),
    st.text(max_size=32),
    plain_annotations,
    st.sampled_from(["", "false", "TRUE", "1"]),
    INT64,
)
datas = binary_datas | text_datas
state_ctxs = st.builds(
    StateCtx,
    current=states,
    committed=states,
    transitions=st.lists(transitions, max_size=3),
    datas=st.dictionaries(keys, datas, max_size=3),
)


@given(states)
def test_state_round_trip(state: State) -> None:
    encoded = encode_state(state)
    assert decode_state(encoded) == state
    assert encode_state(decode_state(encoded)) == encoded


@given(transitions)
def test_transition_round_trip(transition: Transition) -> None:
    assert decode_transition(encode_transition(transition)) == transition


@given(datas)
def test_data_round_trip(data: Data) -> None:
    assert decode_data(encode_data(data)) == data


@given(state_ctxs)
def test_state_ctx_round_trip(ctx: StateCtx) -> None:
    encoded = encode_state_ctx(ctx)
    decoded = decode_state_ctx(encoded)
    assert decoded == ctx
    assert encode_state_ctx(decoded) == encoded


@given(states, st.randoms(use_true_random=False))
def test_state_field_order_independence(state: State, rnd: random.Random) -> None:
    chunks = field_chunks(encode_state(state))
    rnd.shuffle(chunks)
    assert decode_state(b"".join(chunks)) == state


@given(datas, st.randoms(use_true_random=False))
def test_data_field_order_independence(data: Data, rnd: random.Random) -> None:
    chunks = field_chunks(encode_data(data))
    rnd.shuffle(chunks)
    assert decode_data(b"".join(chunks)) == data


DECODERS: list[Callable[[bytes], object]] = [
    decode_state_ctx,
    decode_state,
    decode_data,
    decode_transition,
]


def _only_validation_errors(buf: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(ValidationError):
            decode(buf)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_only_raises_validation_error(buf: bytes) -> None:
    _only_validation_errors(buf)


@settings(max_examples=300)
@given(state_ctxs, st.data())
def test_mutated_encodings_only_raise_validation_error(ctx: StateCtx, data: st.DataObject) -> None:
    encoded = bytearray(encode_state_ctx(ctx))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    _only_validation_errors(bytes(encoded[:cut]))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
    _only_validation_errors(bytes(encoded))
