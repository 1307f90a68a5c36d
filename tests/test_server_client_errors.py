"""Client errors are 4xx on every store: hostile values for the fields of every Driver method
and of Flow/Execute, sent as JSON and as binary protobuf to a real server over memory, SQLite
and PostgreSQL, are refused with 400 ``invalid_argument`` naming the field, and change nothing.

The bodies are written by hand (tests/hostile_wire.py), past the checks of flowstate's own
encoders, as a Go client or an attacker would send them. Among them are what the stores used to
fail on with 5xx: 1,000 label sets on SQLite ("Expression tree is too large"), 40,000 on
PostgreSQL (too many query arguments), an id over PostgreSQL's btree row limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.server import BackgroundServer, create_app
from flowstate.wire import codec
from tests import hostile_wire
from tests.conftest import DRIVERS

STORES = [name for name in ("memory", "sqlite", "postgres") if name in DRIVERS]
KINDS = ["json", "proto"]
REF = {"stateRef": {"idx": "0"}}
I64_MAX = 2**63 - 1
YEAR_1 = -62_135_596_800  # seconds of 0001-01-01T00:00:00Z
YEAR_9999 = 253_402_300_799  # seconds of 9999-12-31T23:59:59Z

_counter = itertools.count()


def ctxs(**current: Any) -> list[dict[str, Any]]:
    return [{"current": {"id": "s", **current}}]


def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
    return fs.commit(fs.park(ctx))


class Server:
    """A server over a fresh store of one kind, with a flow ``f`` that parks its state."""

    def __init__(self, store: str, tmp_path: Path, *, with_flow: bool = True) -> None:
        flows = fs.FlowRegistry()
        if with_flow:
            flows.set_flow("f", flow)
        self.store = store
        self.server = BackgroundServer(
            create_app(DRIVERS[store](tmp_path, next(_counter)), flows=flows)
        )
        self.server.start()
        self.http = httpx.Client(base_url=self.server.url, timeout=120.0)

    def close(self) -> None:
        self.http.close()
        self.server.stop()

    def post(self, method: str, obj: dict[str, Any], kind: str) -> httpx.Response:
        execute = method == "Flow/Execute"
        content, ctype = hostile_wire.body(obj, kind, state_ctx=execute)
        path = "/flowstate.v1." + (method if execute else f"Driver/{method}")
        return self.http.post(path, content=content, headers={"content-type": ctype})

    def call(self, cmd: fs.Command, method: str) -> fs.Command:
        r = self.http.post(
            f"/flowstate.v1.Driver/{method}",
            content=codec.encode_command(cmd),
            headers={"content-type": "application/proto"},
        )
        assert r.status_code == 200, r.content
        return codec.decode_command(r.content)

    def snapshot(self) -> tuple[Any, ...]:
        """Everything stored that a client can see: every revision of every state, every
        delayed state, and whether data exists just past the highest data rev seen."""
        answer = self.call(fs.get_states(limit=10_000), "GetStates")
        assert isinstance(answer, fs.GetStatesCmd) and answer.result is not None
        states = [
            (s.id, s.rev, s.annotations, s.labels, s.transition.to, s.transition.annotations)
            for s in answer.result.states
        ]
        delayed_cmd = fs.GetDelayedStatesCmd(
            since=fs.clock.from_seconds(YEAR_1), until=fs.clock.from_seconds(YEAR_9999)
        )
        delayed = self.call(delayed_cmd, "GetDelayedStates")
        assert isinstance(delayed, fs.GetDelayedStatesCmd) and delayed.result is not None
        delays = [(d.offset, d.state.id, d.execute_at) for d in delayed.result.delayed_states]
        return states, delays, self.data_revs()

    def data_revs(self, upto: int = 8) -> list[int]:
        """The data revs 1..upto that exist."""
        found = []
        for rev in range(1, upto + 1):
            ctx = fs.StateCtx(current=fs.State(id="d", annotations={"flowstate.data.a": str(rev)}))
            r = self.http.post(
                "/flowstate.v1.Driver/GetData",
                content=codec.encode_command(fs.get_data(ctx, "a")),
                headers={"content-type": "application/proto"},
            )
            assert r.status_code in (200, 404), r.content
            if r.status_code == 200:
                found.append(rev)
        return found


def seeded(store: str, tmp_path: Path, *, with_flow: bool = True) -> Server:
    """A server over a fresh store holding something, so that "changed nothing" means
    something: two states, a delayed one and a data."""
    if store == "postgres":
        from tests import pgutil

        pgutil.require()
    s = Server(store, tmp_path, with_flow=with_flow)
    try:
        seed = fs.StateCtx(current=fs.State(id="seed", labels={"k": "v"}))
        seed.datas["a"] = fs.Data(blob=b"blob")
        stored = s.call(fs.store_data(seed, "a"), "StoreData")
        assert isinstance(stored, fs.StoreDataCmd)
        s.call(fs.commit(fs.park(stored.ctx), fs.park(fs.StateCtx(fs.State(id="b")))), "Commit")
        at = fs.clock.from_seconds(4_000_000_000)
        s.call(fs.delay_until(fs.StateCtx(fs.State(id="later")), "f", at), "Delay")
    except BaseException:
        s.close()
        raise
    return s


@pytest.fixture(params=STORES)
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    s = seeded(request.param, tmp_path)
    try:
        yield s
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# refused: (name, method, body, text the message must contain)

BAD_TEXTS = {"nul": "a\x00b", "surrogate": "a\ud800", "too long": "x" * 3000}

REFUSED: list[tuple[str, str, dict[str, Any], str | tuple[str, ...]]] = [
    (
        "1,000 label sets",
        "GetStates",
        {"getStates": {"labels": [{"k": str(i)} for i in range(1000)]}},
        "labels",
    ),
    (
        "40,000 label sets",
        "GetStates",
        {"getStates": {"labels": [{"k": str(i)} for i in range(40_000)]}},
        "labels",
    ),
    (
        "1,000 labels",
        "GetStateByLabels",
        {
            "getStateByLabels": {**REF, "labels": {f"k{i}": "v" for i in range(1000)}},
            "stateCtxs": ctxs(),
        },
        "labels",
    ),
    (
        "negative rev",
        "GetStateByID",
        {"getStateByID": {**REF, "id": "s", "rev": "-1"}, "stateCtxs": ctxs()},
        "rev",
    ),
    ("since_rev below -1", "GetStates", {"getStates": {"sinceRev": "-2"}}, "since_rev"),
    ("negative limit", "GetStates", {"getStates": {"limit": "-1"}}, "limit"),
    ("limit over the cap", "GetStates", {"getStates": {"limit": "1000001"}}, "limit"),
    ("negative offset", "GetDelayedStates", {"getDelayedStates": {"offset": "-1"}}, "offset"),
    ("negative delayed limit", "GetDelayedStates", {"getDelayedStates": {"limit": "-7"}}, "limit"),
    (
        "since_time past year 9999",
        "GetStates",
        {"getStates": {"sinceTime_usec": str(10**17)}},
        "since_time",
    ),
    (
        "until past year 9999",
        "GetDelayedStates",
        {"getDelayedStates": {"untilTimeSec": str(10**15)}},
        "until_time",
    ),
    (
        "execute_at past year 9999",
        "Delay",
        {"delay": {**REF, "to": "f", "executeAtSec": str(10**15)}, "stateCtxs": ctxs()},
        "execute_at",
    ),
    (
        "rev past int64",
        "GetStateByID",
        {"getStateByID": {**REF, "id": "s", "rev": str(2**64 + 5)}, "stateCtxs": ctxs()},
        "get_state_by_id",
    ),
    (
        "limit past int64",
        "GetStates",
        {"getStates": {"limit": str(10**30)}},
        "get_states",
    ),
    (
        "too many labels on a state",
        "Commit",
        {
            "commit": {"commands": [{"park": REF}]},
            "stateCtxs": ctxs(labels={str(i): "v" for i in range(300)}),
        },
        ("current.labels", "state.labels"),  # the decoder may refuse it first
    ),
]
for _name, _bad in BAD_TEXTS.items():
    REFUSED += [
        (
            f"{_name} id",
            "GetStateByID",
            {"getStateByID": {**REF, "id": _bad}, "stateCtxs": ctxs()},
            "id",
        ),
        (
            f"{_name} label of a lookup",
            "GetStateByLabels",
            {"getStateByLabels": {**REF, "labels": {"k": _bad}}, "stateCtxs": ctxs()},
            "labels",
        ),
        (
            f"{_name} label key of a query",
            "GetStates",
            {"getStates": {"labels": [{"k": "v"}, {_bad: "v"}]}},
            "labels",
        ),
        (
            f"{_name} id in a commit",
            "Commit",
            {"commit": {"commands": [{"park": REF}]}, "stateCtxs": ctxs(id=_bad)},
            "id",
        ),
        (
            f"{_name} label value in a commit",
            "Commit",
            {"commit": {"commands": [{"park": REF}]}, "stateCtxs": ctxs(labels={"k": _bad})},
            "labels",
        ),
        (
            f"{_name} annotation key in a commit",
            "Commit",
            {"commit": {"commands": [{"park": REF}]}, "stateCtxs": ctxs(annotations={_bad: "v"})},
            "annotations",
        ),
        (
            f"{_name} flow id in a commit",
            "Commit",
            {"commit": {"commands": [{"transit": {**REF, "flowId": _bad}}]}, "stateCtxs": ctxs()},
            "to",
        ),
        (
            f"{_name} stack annotation",
            "Commit",
            {
                "commit": {
                    "commands": [
                        {
                            "stack": {
                                "carrierStateRef": {"idx": "0"},
                                "stackedStateRef": {"idx": "1"},
                                "annotation": _bad,
                            }
                        },
                        {"park": REF},
                    ]
                },
                "stateCtxs": [{"current": {"id": "c"}}, {"current": {"id": "t"}}],
            },
            "annotation",
        ),
        (
            f"{_name} flow id of a delay",
            "Delay",
            {"delay": {**REF, "to": _bad, "executeAtSec": "100"}, "stateCtxs": ctxs()},
            "to",
        ),
        (
            f"{_name} annotation key of a delay",
            "Delay",
            {
                "delay": {**REF, "to": "f", "executeAtSec": "100", "annotations": {_bad: "v"}},
                "stateCtxs": ctxs(),
            },
            "annotations",
        ),
        (
            f"{_name} id of a delay",
            "Delay",
            {"delay": {**REF, "to": "f", "executeAtSec": "100"}, "stateCtxs": ctxs(id=_bad)},
            "id",
        ),
        (
            f"{_name} data alias",
            "StoreData",
            {
                "storeData": {**REF, "alias": _bad},
                "stateCtxs": [{"current": {"id": "s"}, "datas": {_bad: {"blob": "x"}}}],
            },
            ("alias", "datas"),  # a lone surrogate is refused while decoding the datas
        ),
        (
            f"{_name} data annotation key",
            "StoreData",
            {
                "storeData": {**REF, "alias": "a"},
                "stateCtxs": [
                    {
                        "current": {"id": "s"},
                        "datas": {"a": {"blob": "x", "annotations": {_bad: "v"}}},
                    }
                ],
            },
            "annotations",
        ),
        (
            f"{_name} id to execute",
            "Flow/Execute",
            {"current": {"id": _bad, "transition": {"to": "f"}}},
            "id",
        ),
        (
            f"{_name} label to execute",
            "Flow/Execute",
            {"current": {"id": "e", "labels": {"k": _bad}, "transition": {"to": "f"}}},
            "labels",
        ),
    ]
# a data reference past int64: no store holds such a rev (SQLite and PostgreSQL failed on it)
for _ref in (str(2**63), str(10**30)):
    REFUSED.append(
        (
            f"data reference {_ref!r}",
            "GetData",
            {
                "getData": {**REF, "alias": "a"},
                "stateCtxs": ctxs(annotations={"flowstate.data.a": _ref}),
            },
            "flowstate.data.a",
        )
    )


@pytest.mark.parametrize("kind", KINDS)
def test_hostile_values_are_400_naming_the_field_and_change_nothing(
    server: Server, kind: str
) -> None:
    before = server.snapshot()
    wrong = []
    for name, method, obj, field in REFUSED:
        r = server.post(method, obj, kind)
        if r.status_code != 400:
            wrong.append(f"{name} ({method}): {r.status_code} {r.content[:200]!r}")
            continue
        code, message = codec.decode_error(r.content, json=kind == "json")
        fields = (field,) if isinstance(field, str) else field
        if code != "invalid_argument" or not any(f in message for f in fields):
            wrong.append(f"{name} ({method}): {code} {message[:200]!r} does not name {field}")
    assert not wrong, "\n".join(wrong)
    assert server.snapshot() == before


# ---------------------------------------------------------------------------------------------
# accepted: values at the edges of their ranges are valid, and answered alike by every store

EDGES: list[tuple[str, str, dict[str, Any]]] = [
    ("since_rev at int64 max", "GetStates", {"getStates": {"sinceRev": str(I64_MAX)}}),
    ("offset at int64 max", "GetDelayedStates", {"getDelayedStates": {"offset": str(I64_MAX)}}),
    ("since_time at year 1", "GetStates", {"getStates": {"sinceTime_usec": str(YEAR_1 * 1000)}}),
    (
        "since_time at year 9999",
        "GetStates",
        {"getStates": {"sinceTime_usec": str(YEAR_9999 * 1000)}},
    ),
    (
        "delayed from year 1 to 9999",
        "GetDelayedStates",
        {"getDelayedStates": {"sinceTimeSec": str(YEAR_1), "untilTimeSec": str(YEAR_9999)}},
    ),
    (
        "rev at int64 max",
        "GetStateByID",
        {"getStateByID": {**REF, "id": "seed", "rev": str(I64_MAX)}, "stateCtxs": ctxs()},
    ),
]


@pytest.mark.parametrize("kind", KINDS)
def test_values_at_the_edges_of_their_ranges_are_not_5xx(server: Server, kind: str) -> None:
    for name, method, obj in EDGES:
        r = server.post(method, obj, kind)
        assert r.status_code in (200, 404), (name, r.status_code, r.content[:300])


# ---------------------------------------------------------------------------------------------
# a property: random hostile values in every field of every method never get a 5xx, and a
# refused request changes nothing

_HOSTILE_INTS = st.one_of(
    st.sampled_from([-1, -2, 10_001, 1_000_001, I64_MAX, -(2**63), 2**63, 2**64 + 1, 10**30]),
    st.sampled_from([YEAR_1, YEAR_9999, YEAR_1 - 1, YEAR_9999 + 1, YEAR_9999 * 1000 + 999]),
    st.integers(-(10**20), 10**20),
)
_HOSTILE_TEXTS = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", "flowstate.data.a", " 1_0", "9" * 30]),
    st.tuples(st.text(max_size=5), st.sampled_from(["\x00", "\ud800", "\udfff"])).map("".join),
    st.sampled_from([1025, 3000]).map(lambda n: "é" * n),
)


def _mostly(
    plain: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``plain`` most of the time: a request with one or two hostile values among its many
    fields gets past the first checks and reaches deeper ones, and the store."""
    return st.integers(0, 15).flatmap(lambda n: hostile if n == 7 else plain)


_INTS = _mostly(st.integers(0, 3), _HOSTILE_INTS)
#: int64 fields: a JSON string or number (either is valid JSON for them), any size.
INTS = st.one_of(_INTS.map(str), _INTS)
_PLAIN = st.sampled_from(["s", "seed", "b", "f", "a", "k", "v"])
TEXTS = _mostly(_PLAIN, _HOSTILE_TEXTS)
MAPS = _mostly(
    st.dictionaries(_PLAIN, _PLAIN, max_size=2),
    st.one_of(
        st.dictionaries(TEXTS, TEXTS, min_size=1, max_size=3),
        st.integers(257, 1100).map(lambda n: {f"k{i}": "v" for i in range(n)}),
    ),
)


def _obj(
    required: dict[str, st.SearchStrategy[Any]] | None = None, **optional: st.SearchStrategy[Any]
) -> st.SearchStrategy[dict[str, Any]]:
    """An object with the ``required`` fields and any subset of the ``optional`` ones."""
    return st.fixed_dictionaries(required or {}, optional=optional)


TRANSITION = _obj(to=TEXTS, annotations=MAPS)
STATE = _obj(
    rev=INTS, labels=MAPS, annotations=MAPS, committedAtUnixMilli=INTS, transition=TRANSITION
)
DATA = _obj(rev=INTS, blob=TEXTS, annotations=MAPS)
CTX = _obj(
    {
        "current": _mostly(
            _obj({"id": TEXTS}).flatmap(lambda i: STATE.map(lambda s: {**s, **i})), STATE
        )
    },
    committed=STATE,
    transitions=st.lists(TRANSITION, max_size=2),
    datas=st.dictionaries(TEXTS, DATA, max_size=2),
)
REFS = _mostly(st.just({"idx": "0"}), st.one_of(st.just({}), INTS.map(lambda i: {"idx": i})))
LABEL_SETS = _mostly(
    st.lists(st.dictionaries(_PLAIN, _PLAIN, max_size=2), max_size=3),
    st.one_of(
        st.lists(MAPS, max_size=3),
        st.integers(65, 40_000).map(lambda n: [{"k": str(i)} for i in range(n)]),
    ),
)
DELAY = _obj(
    {"stateRef": REFS, "to": TEXTS}, executeAtSec=INTS, commit=st.booleans(), annotations=MAPS
)
COMMANDS = {
    "GetStateByID": ("getStateByID", _obj({"stateRef": REFS, "id": TEXTS}, rev=INTS)),
    "GetStateByLabels": ("getStateByLabels", _obj({"stateRef": REFS}, labels=MAPS)),
    "GetStates": (
        "getStates",
        _obj(
            sinceRev=INTS,
            sinceTime_usec=INTS,
            labels=LABEL_SETS,
            latestOnly=st.booleans(),
            limit=INTS,
        ),
    ),
    "GetDelayedStates": (
        "getDelayedStates",
        _obj(sinceTimeSec=INTS, untilTimeSec=INTS, offset=INTS, limit=INTS),
    ),
    "Delay": ("delay", DELAY),
    "GetData": ("getData", _obj({"stateRef": REFS, "alias": TEXTS})),
    "StoreData": ("storeData", _obj({"stateRef": REFS, "alias": TEXTS})),
}
SUB_COMMANDS = st.one_of(
    _obj({"stateRef": REFS}, annotations=MAPS).map(lambda o: {"park": o}),
    _obj({"stateRef": REFS, "flowId": TEXTS}, annotations=MAPS).map(lambda o: {"transit": o}),
    _obj({"stateRef": REFS, "alias": TEXTS}).map(lambda o: {"storeData": o}),
    _obj({"carrierStateRef": REFS, "stackedStateRef": REFS, "annotation": TEXTS}).map(
        lambda o: {"stack": o}
    ),
    _obj({"carrierStateRef": REFS, "unstackStateRef": REFS, "annotation": TEXTS}).map(
        lambda o: {"unstack": o}
    ),
    DELAY.map(lambda o: {"delay": o}),
)
READS = {"GetStateByID", "GetStateByLabels", "GetStates", "GetDelayedStates", "GetData"}


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """(method, body object) with hostile values anywhere."""
    method = draw(st.sampled_from([*COMMANDS, "Commit", "Flow/Execute"]))
    if method == "Flow/Execute":
        return method, draw(CTX)
    if method == "Commit":
        subs = draw(st.lists(SUB_COMMANDS, min_size=1, max_size=3))
        payload: dict[str, Any] = {"commands": subs}
        key = "commit"
    else:
        key, strategy = COMMANDS[method]
        payload = draw(strategy)
    obj = {key: payload}
    if method not in ("GetStates", "GetDelayedStates") or draw(st.booleans()):
        contexts = draw(st.lists(CTX, min_size=1, max_size=2))
        alias = payload.get("alias")
        if isinstance(alias, str) and draw(st.booleans()):
            # the data the command names is there (StoreData), or referenced (GetData)
            contexts[0].setdefault("datas", {})[alias] = draw(DATA)
            ref = draw(_mostly(st.integers(1, 3).map(str), INTS.map(str)))
            contexts[0]["current"].setdefault("annotations", {})["flowstate.data." + alias] = ref
        obj["stateCtxs"] = contexts
    return method, obj


@pytest.mark.parametrize("store", STORES)
def test_random_hostile_requests_never_5xx_and_refusals_change_nothing(
    store: str, tmp_path: Path
) -> None:
    # no flow registered: an accepted Flow/Execute would commit in the background, after the
    # answer, and blur what a later refusal changed; hostile values are checked before the
    # flow is looked up
    server = seeded(store, tmp_path, with_flow=False)
    last = {"snapshot": server.snapshot()}

    @settings(
        max_examples=15 if store == "postgres" else 60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(request=requests(), kind=st.sampled_from(KINDS))
    def one(request: tuple[str, dict[str, Any]], kind: str) -> None:
        method, obj = request
        r = server.post(method, obj, kind)
        assert r.status_code < 500, (method, kind, r.status_code, r.content[:300])
        if r.status_code == 200 and method in READS:
            return
        after = server.snapshot()
        if r.status_code != 200:
            assert after == last["snapshot"], (method, kind, r.status_code, r.content[:300])
        last["snapshot"] = after

    try:
        one()
    finally:
        server.close()
