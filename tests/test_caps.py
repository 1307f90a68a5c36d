"""Caps on stored text and on queries (docs/limits.md), the same on every driver.

Each cap holds at its limit and refuses one byte (or one item) more with a ValidationError that
names the field, leaving the store as it was. Lone surrogates are refused in every text. Queries
larger than the caps, which SQLite and PostgreSQL used to fail on with raw driver errors, are
refused before they reach a store, and over the network as a 400.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate import perform
from flowstate.data import ref_annotation
from flowstate.netflow import flow_state_id
from flowstate.wire import codec
from tests import netserver
from tests.conftest import DriverFactory
from tests.workers import until

FAR_FUTURE = datetime(2200, 1, 1, tzinfo=UTC)

ID = perform.MAX_ID_BYTES
FLOW_ID = perform.MAX_FLOW_ID_BYTES
LABEL_KEY = perform.MAX_LABEL_KEY_BYTES
LABEL_VALUE = perform.MAX_LABEL_VALUE_BYTES
ANNOTATION_KEY = perform.MAX_ANNOTATION_KEY_BYTES
STATE_LABELS = perform.MAX_STATE_LABELS
QUERY_SETS = perform.MAX_QUERY_LABEL_SETS
QUERY_LABELS = perform.MAX_QUERY_LABELS

# (lowest, highest) code point of the characters that take 1, 2, 3 and 4 bytes of UTF-8.
_WIDTHS = {1: (0x21, 0x7E), 2: (0x80, 0x7FF), 3: (0x800, 0xD7FF), 4: (0x10000, 0x10FFFF)}


def text_of(size: int, seed: int = 0) -> str:
    """Random text of exactly ``size`` bytes of UTF-8, mixing 1- to 4-byte characters (random
    so that PostgreSQL cannot compress it below its btree row limit)."""
    rng = random.Random(seed)
    out: list[str] = []
    left = size
    while left:
        width = rng.randint(1, min(4, left))
        low, high = _WIDTHS[width]
        out.append(chr(rng.randint(low, high)))
        left -= width
    text = "".join(out)
    assert len(text.encode()) == size
    return text


def over(size: int, seed: int = 0) -> str:
    """``size + 1`` bytes in at most ``size`` characters: the cap counts bytes, not characters."""
    return text_of(size - 1, seed) + "é"


def ctx_of(state_id: str = "s", **fields: Any) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id, **fields))


@pytest.fixture
async def engine(driver_factory: DriverFactory) -> AsyncIterator[fs.Engine]:
    """A started engine on a fresh store that already holds two states and a delayed one."""
    async with fs.Engine(driver_factory(), fs.FlowRegistry(), recovery=False, delayer=False) as e:
        a, b = ctx_of("a", labels={"kind": "seed"}), ctx_of("b")
        await e.do(fs.commit(fs.park(a), fs.transit(b, "somewhere")))
        await e.do(fs.delay(b, "later", timedelta(hours=1)))

        async def seeded() -> bool:
            log, delayed = await snapshot(e)
            return (len(log), len(delayed)) == (2, 1)

        # PostgreSQL shows a commit once no older transaction of the cluster is open: wait for
        # the seed to be visible, or a slow neighbour would make "unchanged" compare stale reads.
        await until(seeded, "the seed to be visible", timeout=60)
        yield e


async def snapshot(engine: fs.Engine) -> tuple[list[Any], list[Any]]:
    """The whole log and every delayed state."""
    log = [
        (s.id, s.rev, s.annotations, s.labels, s.transition)
        async for s in engine.iter(fs.get_states())
    ]
    cmd = fs.get_delayed_states(until=FAR_FUTURE)
    await engine.do(cmd)
    assert cmd.result is not None
    return log, [(d.offset, d.execute_at, d.state) for d in cmd.result.delayed_states]


async def refused(engine: fs.Engine, cmd: fs.Command, field: str | None) -> fs.ValidationError:
    """Assert that ``cmd`` is refused with a ValidationError naming ``field`` (if given) and
    that the store is unchanged."""
    before = await snapshot(engine)
    with pytest.raises(fs.ValidationError) as caught:
        await engine.do(cmd)
    if field is not None:
        assert field in str(caught.value), f"{field!r} not named in {caught.value}"
    assert await snapshot(engine) == before, "the store changed"
    return caught.value


# ---------------------------------------------------------------------------------------------
# at the caps


async def test_texts_at_their_caps_are_stored_and_found(engine: fs.Engine) -> None:
    key, value = text_of(LABEL_KEY, 1), text_of(LABEL_VALUE, 2)
    big = text_of(200_000, 3)  # annotation values have no cap of their own
    ctx = ctx_of(
        text_of(ID, 4),
        labels={key: value},
        annotations={text_of(ANNOTATION_KEY, 5): big},
    )
    await engine.do(
        fs.commit(fs.transit(ctx, text_of(FLOW_ID, 6), {text_of(ANNOTATION_KEY, 7): "x"}))
    )
    many = ctx_of("many", labels={f"k{i}": f"v{i}" for i in range(STATE_LABELS)})
    await engine.do(fs.commit(fs.park(many)))

    got = fs.StateCtx()
    await engine.do(fs.get_state_by_id(got, ctx.current.id))
    assert got.current == ctx.committed
    await engine.do(fs.get_state_by_labels(got, {key: value}))
    assert got.current.id == ctx.current.id
    await engine.do(fs.get_state_by_labels(got, many.current.labels))
    assert got.current.id == "many"

    # A query at both query caps: 64 label sets holding 256 labels in all.
    sets: list[dict[str, str]] = [{"kind": f"none{i}"} for i in range(QUERY_SETS - 2)]
    sets.append({key: value})
    sets.append(
        {k: v for k, v in list(many.current.labels.items())[: QUERY_LABELS - QUERY_SETS + 1]}
    )
    assert (len(sets), sum(map(len, sets))) == (QUERY_SETS, QUERY_LABELS)
    cmd = fs.get_states(or_labels=sets)
    await engine.do(cmd)
    assert cmd.result is not None
    assert sorted(s.id for s in cmd.result.states) == sorted([ctx.current.id, "many"])

    delayed = ctx_of("d")
    await engine.do(fs.delay(delayed, text_of(FLOW_ID, 8), timedelta(hours=1)))

    data = ctx_of("data")
    data.datas["blob"] = fs.Data(blob=b"123", annotations={text_of(ANNOTATION_KEY, 9): big})
    await engine.do(fs.commit(fs.store_data(data, "blob"), fs.park(data)))
    await engine.do(_standalone_data(text_of(ALIAS, 10)))


def test_flow_ids_of_the_registry_are_capped() -> None:
    registry = fs.FlowRegistry()
    registry.set_flow(text_of(FLOW_ID), lambda ctx, engine: fs.noop())
    assert text_of(FLOW_ID) in registry
    for bad in (over(FLOW_ID), "a\ud800", "\udfff"):
        with pytest.raises(fs.ValidationError) as caught:
            registry.set_flow(bad, lambda ctx, engine: fs.noop())
        assert caught.value.field == "flow_id"
        with pytest.raises(fs.ValidationError):
            registry.get_flow(bad)
    assert registry.ids() == [text_of(FLOW_ID)]
    # A server advertises each flow it hosts as a state: its id must fit too.
    assert len(flow_state_id(text_of(FLOW_ID)).encode()) <= ID


# ---------------------------------------------------------------------------------------------
# one over


def _with_data(annotations: dict[str, str]) -> fs.Command:
    ctx = ctx_of("data")
    ctx.datas["blob"] = fs.Data(blob=b"123", annotations=annotations)
    return fs.commit(fs.store_data(ctx, "blob"), fs.park(ctx))


def _standalone_data(alias: str) -> fs.Command:
    ctx = ctx_of("data")
    ctx.datas[alias] = fs.Data(blob=b"123")
    return fs.store_data(ctx, alias)


#: The longest alias: its reference annotation key ``flowstate.data.<alias>`` at the key cap.
ALIAS = ANNOTATION_KEY - len(ref_annotation(""))

OVER: list[tuple[str, Callable[[], fs.Command], str]] = [
    ("id", lambda: fs.commit(fs.park(ctx_of(over(ID)))), "current.id"),
    ("long random id", lambda: fs.commit(fs.park(ctx_of(text_of(3000)))), "current.id"),
    (
        "label key",
        lambda: fs.commit(fs.park(ctx_of(labels={over(LABEL_KEY): "v"}))),
        "current.labels",
    ),
    (
        "label value",
        lambda: fs.commit(fs.park(ctx_of(labels={"k": over(LABEL_VALUE)}))),
        "current.labels['k']",
    ),
    (
        "label count",
        lambda: fs.commit(fs.park(ctx_of(labels={str(i): "v" for i in range(STATE_LABELS + 1)}))),
        "current.labels",
    ),
    (
        "annotation key",
        lambda: fs.commit(fs.park(ctx_of(annotations={over(ANNOTATION_KEY): "v"}))),
        "current.annotations",
    ),
    (
        "transition annotation key",
        lambda: fs.commit(fs.transit(ctx_of(), "f", {over(ANNOTATION_KEY): "v"})),
        "current.transition.annotations",
    ),
    ("flow id", lambda: fs.commit(fs.transit(ctx_of(), over(FLOW_ID))), "current.transition.to"),
    ("delay flow id", lambda: fs.delay(ctx_of(), over(FLOW_ID), 60), "current.transition.to"),
    ("data annotation key", lambda: _with_data({over(ANNOTATION_KEY): "v"}), "data.annotations"),
    ("data alias", lambda: _standalone_data(over(ALIAS)), "alias"),
    ("get by id", lambda: fs.get_state_by_id(fs.StateCtx(), over(ID)), "id"),
    (
        "get by labels: key",
        lambda: fs.get_state_by_labels(fs.StateCtx(), {over(LABEL_KEY): "v"}),
        "labels",
    ),
    (
        "get by labels: value",
        lambda: fs.get_state_by_labels(fs.StateCtx(), {"k": over(LABEL_VALUE)}),
        "labels['k']",
    ),
    (
        "get by labels: count",
        lambda: fs.get_state_by_labels(
            fs.StateCtx(), {str(i): "v" for i in range(QUERY_LABELS + 1)}
        ),
        "labels",
    ),
    (
        "query: label key",
        lambda: fs.get_states({"a": "b"}, or_labels=[{over(LABEL_KEY): "v"}]),
        "labels[1]",
    ),
    ("query: label value", lambda: fs.get_states({"k": over(LABEL_VALUE)}), "labels[0]['k']"),
    (
        "query: label sets",
        lambda: fs.get_states(or_labels=[{"k": str(i)} for i in range(QUERY_SETS + 1)]),
        "labels",
    ),
    (
        "query: labels in all",
        lambda: fs.get_states(
            or_labels=[{f"k{j}": str(i) for j in range(QUERY_LABELS // 8)} for i in range(8)]
            + [{"one": "more"}]
        ),
        "labels",
    ),
    # What SQLite ("Expression tree is too large") and PostgreSQL (more than 32,767 query
    # arguments) failed on with their own errors.
    (
        "query: 1,000 label sets",
        lambda: fs.get_states(or_labels=[{"k": str(i)} for i in range(1000)]),
        "labels",
    ),
    (
        "query: 40,000 label sets",
        lambda: fs.get_states(or_labels=[{"k": str(i)} for i in range(40_000)]),
        "labels",
    ),
    (
        "get by labels: 1,000 labels",
        lambda: fs.get_state_by_labels(fs.StateCtx(), {f"k{i}": "v" for i in range(1000)}),
        "labels",
    ),
]


@pytest.mark.parametrize("case", OVER, ids=[name for name, _, _ in OVER])
async def test_one_over_a_cap_is_refused(
    engine: fs.Engine, case: tuple[str, Callable[[], fs.Command], str]
) -> None:
    _, make, field = case
    await refused(engine, make(), field)


async def test_a_refused_query_is_a_400_on_the_server(driver_factory: DriverFactory) -> None:
    """The server checks the caps itself (a Go client checks none): its answer is a 400 that
    the network driver turns into a ValidationError."""
    server = netserver.serve(driver_factory())
    too_many = fs.get_states(or_labels=[{"k": str(i)} for i in range(QUERY_SETS + 1)])
    by_labels = fs.get_state_by_labels(fs.StateCtx(), {over(LABEL_KEY): "v"})
    long_id = fs.commit(fs.park(ctx_of(over(ID))))
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        for method, cmd, field in [
            ("GetStates", too_many, "labels"),
            ("GetStateByLabels", by_labels, "labels"),
            ("GetStateByID", fs.get_state_by_id(fs.StateCtx(), over(ID)), "id"),
            ("Commit", long_id, "commands[0].current.id"),
        ]:
            r = await http.post(f"/flowstate.v1.Driver/{method}", content=codec.encode_command(cmd))
            assert r.status_code == 400, r.content
            code, message = codec.decode_error(r.content, json=False)
            assert code == "invalid_argument"
            assert field in message

    net = fs.NetDriver(server.url)
    try:
        with pytest.raises(fs.ValidationError, match="label sets"):
            await net.get_states(too_many)  # straight to the server, past the engine's checks
    finally:
        await net.close()


# ---------------------------------------------------------------------------------------------
# lone surrogates


def _surrogate_text() -> st.SearchStrategy[str]:
    """Text with at least one lone surrogate somewhere, short enough for every cap."""
    return st.tuples(
        st.text(max_size=20),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
        st.text(max_size=20),
    ).map("".join)


def _with_text(place: str, bad: str) -> tuple[fs.Command, str]:
    """A command carrying ``bad`` at ``place``, and the field the refusal must name."""
    if place == "id":
        return fs.commit(fs.park(ctx_of(bad))), "current.id"
    if place == "label key":
        return fs.commit(fs.park(ctx_of(labels={bad: "v"}))), "current.labels"
    if place == "label value":
        return fs.commit(fs.park(ctx_of(labels={"k": bad}))), "current.labels['k']"
    if place == "annotation key":
        return fs.commit(fs.park(ctx_of(annotations={bad: "v"}))), "current.annotations"
    if place == "annotation value":
        return fs.commit(fs.park(ctx_of(annotations={"k": bad}))), "current.annotations['k']"
    if place == "park annotation":
        return fs.commit(fs.park(ctx_of(), {"k": bad})), "current.transition.annotations['k']"
    if place == "flow id":
        return fs.commit(fs.transit(ctx_of(), bad)), "current.transition.to"
    if place == "delay flow id":
        return fs.delay(ctx_of(), bad, 60), "current.transition.to"
    if place == "data annotation":
        return _with_data({"k": bad}), "data.annotations['k']"
    if place == "data alias":
        return _standalone_data(bad), "alias"
    if place == "query label":
        return fs.get_states({"k": bad}), "labels[0]['k']"
    if place == "get by labels":
        return fs.get_state_by_labels(fs.StateCtx(), {bad: "v"}), "labels"
    assert place == "get by id"
    return fs.get_state_by_id(fs.StateCtx(), bad), "id"


PLACES = [
    "id",
    "label key",
    "label value",
    "annotation key",
    "annotation value",
    "park annotation",
    "flow id",
    "delay flow id",
    "data annotation",
    "data alias",
    "query label",
    "get by labels",
    "get by id",
]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(place=st.sampled_from(PLACES), bad=_surrogate_text())
async def test_lone_surrogates_are_refused_in_every_text(
    engine: fs.Engine, driver_name: str, place: str, bad: str
) -> None:
    cmd, field = _with_text(place, bad)
    # Over the network the client's encoder refuses the text before it is sent: a
    # ValidationError, though it can only name the wire message.
    await refused(engine, cmd, None if driver_name.startswith("net-over-") else field)


def test_valid_text_passes_the_check_unchanged() -> None:
    """The byte count is the UTF-8 length whatever the characters (the check takes a shortcut
    for ASCII)."""
    for size in (0, 1, 5, 300):
        for seed in range(5):
            perform.check_text(text_of(size, seed), "f", size)
            with pytest.raises(fs.ValidationError):
                perform.check_text(text_of(size + 1, seed), "f", size)
