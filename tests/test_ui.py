"""The web UI's JSON API, live stream and actions over real HTTP, on every store driver.

States are created through the server (engine -> NetDriver -> server -> store), as a client
would; the server's store follows the test's manual clock, so recovery and delay times are
exact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate import recovery
from flowstate.drivers.net import NetDriver
from flowstate.server import BackgroundServer, create_app
from flowstate.server.ui import detail, graph, query
from flowstate.server.ui.routes import ACTION, is_public
from tests import netserver
from tests.conftest import DRIVERS
from tests.workers import ticks, until

API = "/ui/api/"
STORES = [name for name in DRIVERS if not name.startswith("net-over-")]


def parking_flows() -> fs.FlowRegistry:
    """The server's flows: ``work`` parks, ``pay`` moves on to ``ship``, ``ship`` ends."""
    registry = fs.FlowRegistry()

    @registry.flow("work")
    async def work(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.commit(fs.park(ctx))

    return registry


@dataclass
class UiServer:
    url: str
    http: httpx.AsyncClient
    engine: fs.Engine
    clock: fs.ManualClock

    async def get(self, path: str, **params: Any) -> Any:
        r = await self.http.get(API + path, params=params)
        assert r.status_code == 200, r.text
        return r.json()

    async def error(self, path: str, code: int, **params: Any) -> dict[str, Any]:
        r = await self.http.get(API + path, params=params)
        assert r.status_code == code, r.text
        body: dict[str, Any] = r.json()
        return body

    async def ids(self, **params: Any) -> list[str]:
        return [s["id"] for s in (await self.get("states", **params))["states"]]

    async def post(self, action: str, body: Any) -> httpx.Response:
        return await self.http.post(API + action, json=body)


@pytest.fixture(params=STORES)
async def ui(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UiServer]:
    """A server with the UI on a fresh store, a client engine on it, and an HTTP client."""
    backing = DRIVERS[request.param](tmp_path, 0)
    server = netserver.serve(backing, flows=parking_flows())
    net = NetDriver(server.url)
    backing.clock = netserver.FollowClock(net)
    clock = fs.ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
    engine = fs.Engine(net, fs.FlowRegistry(), recovery=False, delayer=False, clock=clock)
    await engine.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        yield UiServer(server.url, http, engine, clock)
    await engine.shutdown(timeout=5.0)


async def commit(engine: fs.Engine, ctx: fs.StateCtx, *cmds: fs.Command) -> None:
    await engine.do(fs.commit(*cmds))


def new(state_id: str, **labels: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(state_id, labels=labels))


async def seed_shop(engine: fs.Engine) -> None:
    """a1: pay -> ship -> ended; a2: pay; a3: parked; a4: pay, then parked."""
    a1 = new("a1", app="shop", env="prod")
    await commit(engine, a1, fs.transit(a1, "pay"))
    await commit(engine, a1, fs.transit(a1, "ship"))
    await commit(engine, a1, fs.end(a1))
    a2 = new("a2", app="shop", env="dev")
    await commit(engine, a2, fs.transit(a2, "pay"))
    a3 = new("a3", app="blog")
    await commit(engine, a3, fs.park(a3))
    a4 = new("a4", app="blog")
    await commit(engine, a4, fs.transit(a4, "pay"))
    await commit(engine, a4, fs.park(a4))


# ---------------------------------------------------------------------------------------------
# States view


async def test_states_view_filters_by_labels_flow_and_status(ui: UiServer) -> None:
    await seed_shop(ui.engine)
    assert await ui.ids() == ["a4", "a3", "a2", "a1"]  # latest versions, newest first
    every = await ui.get("states", view="all")
    assert [(s["id"], s["rev"]) for s in every["states"]] == [
        ("a4", 7),
        ("a4", 6),
        ("a3", 5),
        ("a2", 4),
        ("a1", 3),
        ("a1", 2),
        ("a1", 1),
    ]
    assert every["head_rev"] == 7

    r = await ui.http.get(
        API + "states", params=[("labels", "app=shop, env=prod"), ("labels", "app=blog")]
    )
    assert [s["id"] for s in r.json()["states"]] == ["a4", "a3", "a1"]  # OR of AND-sets
    assert await ui.ids(labels="app=shop,env=dev") == ["a2"]
    assert await ui.ids(flow="pay") == ["a2"]
    assert await ui.ids(flow="pay", view="all") == ["a4", "a2", "a1"]
    assert await ui.ids(status="ended") == ["a1"]
    assert await ui.ids(status="parked") == ["a4", "a3"]
    r = await ui.http.get(API + "states", params=[("status", "running"), ("status", "ended")])
    assert [s["id"] for s in r.json()["states"]] == ["a2", "a1"]
    rows = {s["id"]: s for s in (await ui.get("states"))["states"]}
    assert rows["a1"]["statuses"] == ["ended"] and rows["a1"]["to"] == ""
    assert rows["a2"] | {"committed_at": None} == {
        "id": "a2",
        "rev": 4,
        "to": "pay",
        "labels": {"app": "shop", "env": "dev"},
        "committed_at": None,
        "statuses": ["running"],
        "attempt": 0,
    }


async def test_bad_queries_name_the_field(ui: UiServer) -> None:
    for params, field in [
        ({"status": "stuck"}, "status"),
        ({"labels": "app"}, "labels[0]"),
        ({"labels": "=x"}, "labels[0]"),
        ({"view": "newest"}, "view"),
        ({"limit": "0"}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"before": "-3"}, "before"),
        ({"system": "yes"}, "system"),
    ]:
        body = await ui.error("states", 400, **params)
        assert body["field"] == field, (params, body)
        assert body["error"].startswith(field + ":")
    assert (await ui.error("state", 400))["field"] == "id"
    assert (await ui.error("state", 404, id="nope"))["error"].startswith("state not found")
    assert (await ui.error("diff", 400, id="x", a="1"))["field"] == "b"
    assert (await ui.error("data", 400, id="x"))["field"] == "alias"
    assert (await ui.error("stream", 400, since="x"))["field"] == "since"


async def test_paging_walks_every_state_once_newest_first(ui: UiServer) -> None:
    for i in range(23):
        ctx = new(f"p{i:02}", app="paged" if i % 3 else "other")
        await commit(ui.engine, ctx, fs.transit(ctx, "work" if i % 2 else "other"))
        if i % 4 == 0:
            await commit(ui.engine, ctx, fs.park(ctx))
    seen: list[str] = []
    before: int | None = None
    pages = 0
    while True:
        page = await ui.get(
            "states", labels="app=paged", limit=4, **({"before": before} if before else {})
        )
        assert len(page["states"]) <= 4
        seen += [s["id"] for s in page["states"]]
        pages += 1
        before = page["before"]
        if before is None:
            break
    expected = [f"p{i:02}" for i in range(23) if i % 3]
    # newest first means by latest rev: the parked ones moved up when they were parked
    latest = (await ui.get("states", labels="app=paged", limit=500))["states"]
    assert seen == [s["id"] for s in latest]
    assert sorted(seen) == expected and len(seen) == len(set(seen))
    assert pages == -(-len(expected) // 4)


async def test_the_newest_page_of_a_large_store_reads_a_small_window(ui: UiServer) -> None:
    """Responsiveness without timing: the first page of 10,000 states examines a few hundred
    versions, not the store; filters that match little stop at the scan budget."""
    ctxs = [new(f"big-{i:05}", app="big") for i in range(10_000)]
    for start in range(0, len(ctxs), 500):
        batch = ctxs[start : start + 500]
        await ui.engine.do(fs.commit(*[fs.transit(c, "work") for c in batch]))
    page = await ui.get("states")
    assert [s["id"] for s in page["states"]] == [f"big-{i:05}" for i in range(9999, 9949, -1)]
    assert page["scanned"] <= 500
    assert page["before"] == 9951
    last = await ui.get("states", before=51)
    assert [s["id"] for s in last["states"]] == [f"big-{i:05}" for i in range(49, -1, -1)]
    assert last["before"] is None


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 6), st.booleans()), max_size=40),
    st.integers(1, 7),
    st.sampled_from([None, "running", "parked"]),
)
def test_page_back_equals_a_reverse_filter_of_the_log(
    ops: list[tuple[int, bool]], limit: int, status: str | None
) -> None:
    """Pages read backwards from the head, concatenated, are the matching latest versions in
    reverse rev order, each once, whatever the sizes and the budget."""

    async def run() -> None:
        async with fs.Engine(fs.MemoryDriver(), recovery=False, delayer=False) as engine:
            ctxs: dict[int, fs.StateCtx] = {}
            for n, to_park in ops:
                ctx = ctxs.setdefault(n, new(f"s{n}"))
                await engine.do(fs.commit(fs.park(ctx) if to_park else fs.transit(ctx, "f")))
            flt = query.Filter(statuses=frozenset([status] if status else []))
            got: list[int] = []
            before: int | None = None
            while True:
                page = await query.page_back(
                    engine,
                    [],
                    True,
                    lambda s: flt.matches(s, ()),
                    before=before,
                    limit=limit,
                    budget=5,
                )
                got += [s.rev for s in page.states]
                if page.before is None:
                    break
                before = page.before
            want = sorted(
                (c.committed.rev for c in ctxs.values() if flt.matches(c.committed, ())),
                reverse=True,
            )
            assert got == want

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------
# Detail


async def test_detail_timeline_diff_and_data(ui: UiServer) -> None:
    ctx = new("doc", app="docs")
    ctx.current.annotations["owner"] = "ann"
    ctx.set_data("note", fs.Data(b"hello\nworld"))
    blob = bytes(range(256)) * 20
    raw = fs.Data(blob)
    raw.binary = True
    ctx.set_data("raw", raw)
    await ui.engine.do(
        fs.commit(fs.store_data(ctx, "note"), fs.store_data(ctx, "raw"), fs.transit(ctx, "work"))
    )
    ctx.current.annotations["owner"] = "bob"
    ctx.current.labels["stage"] = "two"
    await ui.engine.do(fs.commit(fs.transit(ctx, "review", {"why": "checked"})))
    del ctx.current.annotations["owner"]
    await ui.engine.do(fs.commit(fs.end(ctx)))

    doc = await ui.get("state", id="doc")
    assert doc["state"]["rev"] == 3 and doc["state"]["statuses"] == ["ended"]
    assert [r["rev"] for r in doc["revisions"]] == [3, 2, 1]
    assert [r["to"] for r in doc["revisions"]] == ["", "review", "work"]
    assert doc["revisions"][1]["transition_annotations"] == {"why": "checked"}
    assert doc["revisions"][1]["labels"] == {"app": "docs", "stage": "two"}
    assert doc["revisions"][0]["committed_at"] == "2030-01-01T00:00:00Z"
    assert doc["before"] is None
    assert {d["alias"] for d in doc["data"]} == {"note", "raw"}
    assert doc["actions"] == {"retry": False, "end": False}
    assert doc["waiting"]["parked"] and doc["waiting"]["delays"] == []

    older = await ui.get("state", id="doc", limit=2)
    assert [r["rev"] for r in older["revisions"]] == [3, 2] and older["before"] == 2
    rest = await ui.get("state", id="doc", limit=2, before=2)
    assert [r["rev"] for r in rest["revisions"]] == [1] and rest["before"] is None

    d = await ui.get("diff", id="doc", a=1, b=3)
    changes = {(c["section"], c["key"]): (c["old"], c["new"], c["kind"]) for c in d["changes"]}
    assert changes == {
        ("transition", "to"): ("work", "", "changed"),
        ("transition annotations", "flowstate.state"): (None, "ended", "added"),
        ("annotations", "owner"): ("ann", None, "removed"),
        ("labels", "stage"): (None, "two", "added"),
    }

    note = await ui.get("data", id="doc", alias="note")
    assert (note["binary"], note["text"], note["size"]) == (False, "hello\nworld", 11)
    shown = await ui.get("data", id="doc", alias="raw", rev=1)
    assert shown["binary"] and shown["truncated"] and shown["size"] == len(blob)
    assert shown["hex"].splitlines()[1].startswith("00000010  10 11 12")
    r = await ui.http.get(API + "data/raw", params={"id": "doc", "alias": "raw"})
    assert r.status_code == 200 and r.content == blob
    assert r.headers["content-type"] == "application/octet-stream"
    assert 'filename="raw"' in r.headers["content-disposition"]
    r = await ui.http.get(API + "data/raw", params={"id": "doc", "alias": "note"})
    assert (
        r.content == b"hello\nworld" and 'filename="note.txt"' in r.headers["content-disposition"]
    )
    assert (await ui.error("data", 400, id="doc", alias="nothing"))["field"].startswith(
        "current.annotations"
    )


@given(st.binary(max_size=300), st.booleans())
def test_data_preview_shows_text_as_text_and_the_rest_as_hex(blob: bytes, marked: bool) -> None:
    data = fs.Data(blob)
    data.binary = marked
    shown = detail.data_preview("x", data)
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    assert shown["binary"] == (marked or text is None)
    if shown["binary"]:
        lines = shown["hex"].splitlines() if blob else []
        assert len(lines) == -(-len(blob) // 16)
        assert bytes.fromhex("".join(line[10:57] for line in lines)) == blob
    else:
        assert shown["text"] == text


@given(
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=4),
    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=4),
    st.text(max_size=3),
    st.text(max_size=3),
)
def test_diff_lists_exactly_what_differs(
    a: dict[str, str], b: dict[str, str], to_a: str, to_b: str
) -> None:
    old = fs.State("x", 1, annotations=a, labels=b, transition=fs.Transition(to_a, dict(b)))
    new_ = fs.State("x", 2, annotations=b, labels=a, transition=fs.Transition(to_b, dict(a)))
    changes = detail.diff(old, new_)
    rebuilt = {"annotations": dict(a), "labels": dict(b), "transition annotations": dict(b)}
    to = to_a
    for c in changes:
        if c.section == "transition":
            to = c.new or ""
            continue
        if c.new is None:
            del rebuilt[c.section][c.key]
        else:
            rebuilt[c.section][c.key] = c.new
    assert rebuilt == {"annotations": b, "labels": a, "transition annotations": a}
    assert to == to_b
    assert all(c.old != c.new for c in changes)


async def test_why_a_running_state_waits_and_the_recovery_statuses(ui: UiServer) -> None:
    ctx = new("stuck", app="ops")
    recovery.set_max_attempts(ctx, 2)
    await commit(ui.engine, ctx, fs.transit(ctx, "lost"))
    ui.clock.advance(30)
    doc = await ui.get("state", id="stuck")
    w = doc["waiting"]
    assert not w["parked"]
    assert w["recovery"] == {
        "enabled": True,
        "since_commit_seconds": 30.0,
        "retry_after_seconds": 120.0,
        "due_at": "2030-01-01T00:02:00Z",
        "due_in_seconds": 90.0,
        "attempt": 0,
        "max_attempts": 2,
        "attempts_left": 2,
        "recoverer_here": False,
    }
    assert "recovery retries it (attempt 1 of 2) in 1m 30s" in w["reasons"][0]
    assert doc["actions"] == {"retry": True, "end": True}
    ui.clock.advance(120)
    w = (await ui.get("state", id="stuck"))["waiting"]
    assert (
        "passed 30s ago" in w["reasons"][0]
        and "no recoverer runs in this server" in w["reasons"][0]
    )

    # The real recoverer (in a client engine that hosts "lost", a flow that never makes
    # progress) retries twice, then ends it by force.
    hosts_lost = fs.FlowRegistry()
    hosts_lost.set_flow("lost", lambda ctx, engine: fs.noop())
    worker = fs.Engine(NetDriver(ui.url), hosts_lost, clock=ui.clock, delayer=False)
    await worker.start()
    try:
        assert worker.recoverer is not None
        await ticks(ui.clock, worker.recoverer)
        await until(lambda: _attempt_is(ui, "stuck", 1), "the first retry")
        assert await ui.ids(status="recovering") == ["stuck"]
        assert (await ui.get("state", id="stuck"))["waiting"]["recovery"]["attempts_left"] == 1
        for _ in range(2):
            ui.clock.advance(recovery.DEFAULT_RETRY_AFTER.total_seconds())
            await ticks(ui.clock, worker.recoverer)
        await until(lambda: _forced(ui, "stuck"), "the forced end")
    finally:
        await worker.shutdown(timeout=5.0)
    assert await ui.ids(status="forced") == ["stuck"]
    assert await ui.ids(status="recovering") == []
    assert await ui.ids(status="recovering", view="all") == ["stuck", "stuck"]
    nodes = {n["id"]: n for n in (await ui.get("graph"))["nodes"]}
    assert nodes["(ended)"]["now"] == 1 and nodes["lost"]["visits"] == 3


async def _attempt_is(ui: UiServer, sid: str, n: int) -> bool:
    return bool((await ui.get("state", id=sid))["state"]["attempt"] == n)


async def _forced(ui: UiServer, sid: str) -> bool:
    return "forced" in (await ui.get("state", id=sid))["state"]["statuses"]


async def test_a_pending_delay_and_when_it_fires(ui: UiServer) -> None:
    ctx = new("later", app="ops")
    await commit(ui.engine, ctx, fs.park(ctx))
    await ui.engine.do(fs.delay(ctx, "work", timedelta(hours=1)))
    doc = await ui.get("state", id="later")
    assert doc["state"]["statuses"] == ["parked", "delayed"]
    [d] = doc["waiting"]["delays"]
    assert d | {"offset": 0} == {
        "offset": 0,
        "to": "work",
        "execute_at": "2030-01-01T01:00:00Z",
        "in_seconds": 3600.0,
        "rev": 1,
        "commit": True,
        "stale": False,
    }
    assert "A delay to 'work' fires in 1h" in doc["waiting"]["reasons"][0]
    assert await ui.ids(status="delayed") == ["later"]
    await commit(ui.engine, ctx, fs.park(ctx))  # the delay now expects an old rev
    [d] = (await ui.get("state", id="later"))["waiting"]["delays"]
    assert d["stale"]
    assert "it will be dropped" in (await ui.get("state", id="later"))["waiting"]["reasons"][0]


# ---------------------------------------------------------------------------------------------
# Graph


async def test_graph_of_flows_with_counts(ui: UiServer) -> None:
    await seed_shop(ui.engine)
    g = await ui.get("graph")
    edges = {(e["from"], e["to"]): e["count"] for e in g["edges"]}
    assert edges == {("pay", "ship"): 1, ("ship", "(ended)"): 1, ("pay", "(parked)"): 1}
    nodes = {n["id"]: (n["now"], n["visits"], n["kind"]) for n in g["nodes"]}
    assert nodes == {
        "pay": (1, 3, "flow"),
        "ship": (0, 1, "flow"),
        "(ended)": (1, 1, "ended"),
        "(parked)": (2, 2, "parked"),
    }
    assert (g["states"], g["versions"], g["complete"]) == (4, 7, True)
    blog = await ui.get("graph", labels="app=blog")
    assert [(e["from"], e["to"]) for e in blog["edges"]] == [("pay", "(parked)")]
    assert {n["id"] for n in (await ui.get("graph", status="ended"))["nodes"]} == {
        "pay",
        "ship",
        "(ended)",
    }


def test_graph_window_marks_an_incomplete_picture() -> None:
    async def run() -> graph.Graph:
        async with fs.Engine(fs.MemoryDriver(), recovery=False, delayer=False) as engine:
            ctx = new("g")
            for to in ["a", "b", "a", "b", "c"]:
                await engine.do(fs.commit(fs.transit(ctx, to)))
            return await graph.flow_graph(engine, query.Filter(), set(), window=3)

    g = asyncio.run(run())
    assert not g.complete
    assert dict(g.edges) == {("a", "b"): 1, ("b", "c"): 1}
    assert g.now == {"c": 1}


# ---------------------------------------------------------------------------------------------
# Live stream


async def read_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    name, data = "", ""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and name:
            yield name, json.loads(data)
            name, data = "", ""


async def test_live_stream_delivers_new_commits_matching_the_labels(ui: UiServer) -> None:
    await seed_shop(ui.engine)
    params = {"labels": "app=shop", "status": "running", "since": "7"}
    async with ui.http.stream("GET", API + "stream", params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_events(r)
        assert await anext(events) == ("hello", {"since": 7})
        other = new("b1", app="blog")
        await commit(ui.engine, other, fs.transit(other, "pay"))
        a5 = new("a5", app="shop")
        await commit(ui.engine, a5, fs.transit(a5, "pay"))
        name, row = await asyncio.wait_for(anext(events), 30)
        assert name == "state" and (row["id"], row["rev"], row["match"]) == ("a5", 9, True)
        await commit(ui.engine, a5, fs.end(a5))
        name, row = await asyncio.wait_for(anext(events), 30)
        assert (row["id"], row["statuses"], row["match"]) == ("a5", ["ended"], False)


async def test_closing_the_ui_ends_its_streams(tmp_path: Path) -> None:
    app = create_app(fs.SqliteDriver(tmp_path / "s.db"))
    server = BackgroundServer(app)
    url = server.start()
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=30.0) as http,
            http.stream("GET", API + "stream") as r,
        ):
            lines = r.aiter_lines()
            assert await anext(lines) == "event: hello"
            stopping = asyncio.get_running_loop().run_in_executor(None, server.stop)
            rest = [line async for line in lines]  # ends: the server closed the stream
            assert all(not line.startswith("event: state") for line in rest)
            await stopping
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Actions and the token


async def test_retry_now_and_end_are_rev_checked_commits(ui: UiServer) -> None:
    ctx = new("job", app="ops")
    await commit(ui.engine, ctx, fs.transit(ctx, "work", {"n": "1"}))
    r = await ui.post("retry", {"id": "job", "rev": 1})
    assert r.status_code == 200, r.text
    retried = r.json()["state"]
    assert retried["rev"] == 2 and retried["to"] == "work"
    assert retried["transition_annotations"] == {"n": "1", ACTION: "retry"}
    # the server executed it: flow ``work`` parks the state
    await until(lambda: _rev_is(ui, "job", 3), "the retried execution to park the state")
    doc = await ui.get("state", id="job")
    assert doc["state"]["statuses"] == ["parked"]

    stale = await ui.post("end", {"id": "job", "rev": 2})
    assert stale.status_code == 409 and stale.json()["ids"] == ["job"]
    assert (await ui.get("state", id="job"))["state"]["rev"] == 3
    parked_retry = await ui.post("retry", {"id": "job", "rev": 3})
    assert parked_retry.status_code == 409 and "parked" in parked_retry.json()["error"]

    ended = await ui.post("end", {"id": "job", "rev": 3})
    assert ended.status_code == 200
    state = ended.json()["state"]
    assert state["statuses"] == ["ended"] and state["transition_annotations"][ACTION] == "end"
    again = await ui.post("end", {"id": "job", "rev": state["rev"]})
    assert again.status_code == 409 and "already ended" in again.json()["error"]

    orphan = new("orphan")
    await commit(ui.engine, orphan, fs.transit(orphan, "nobody-hosts-this"))
    r = await ui.post("retry", {"id": "orphan", "rev": orphan.committed.rev})
    assert r.status_code == 409 and "nobody-hosts-this" in r.json()["error"]
    latest = (await ui.get("state", id="orphan"))["state"]
    assert latest["rev"] == orphan.committed.rev  # nothing committed


async def _rev_is(ui: UiServer, sid: str, rev: int) -> bool:
    return bool((await ui.get("state", id=sid))["state"]["rev"] == rev)


async def test_actions_refuse_bad_bodies(ui: UiServer) -> None:
    ctx = new("job")
    await commit(ui.engine, ctx, fs.transit(ctx, "work"))
    for body, field in [
        ({"rev": 1}, "id"),
        ({"id": "", "rev": 1}, "id"),
        ({"id": "job"}, "rev"),
        ({"id": "job", "rev": "1"}, "rev"),
        ({"id": "job", "rev": 0}, "rev"),
        ({"id": "job", "rev": True}, "rev"),
        ([1], "body"),
    ]:
        r = await ui.post("end", body)
        assert r.status_code == 400 and r.json()["field"] == field, (body, r.text)
    form = await ui.http.post(API + "end", data={"id": "job", "rev": "1"})
    assert form.status_code == 400 and form.json()["field"] == "content-type"
    junk = await ui.http.post(
        API + "end", content=b"{", headers={"content-type": "application/json"}
    )
    assert junk.status_code == 400 and junk.json()["field"] == "body"
    assert (await ui.post("end", {"id": "ghost", "rev": 1})).status_code == 404
    assert (await ui.get("state", id="job"))["state"]["rev"] == 1


async def test_the_page_is_public_and_the_api_needs_the_token(tmp_path: Path) -> None:
    backing = fs.SqliteDriver(tmp_path / "t.db")
    server = netserver.serve(backing, token="s3cret")
    async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "/ui/static/app.js" in page.text
        for name in [
            "app.js",
            "api.js",
            "states.js",
            "detail.js",
            "graph.js",
            "dom.js",
            "style.css",
        ]:
            assert (await http.get(f"/ui/static/{name}")).status_code == 200, name
        assert (await http.get("/ui/static/nope.js")).status_code == 404
        for path in ["info", "states", "graph", "state?id=x", "stream", "data?id=x&alias=y"]:
            r = await http.get(API + path)
            assert r.status_code == 401, path
            assert r.json() == {"code": "unauthenticated", "message": "missing bearer token"}
        r = await http.post(API + "end", json={"id": "x", "rev": 1})
        assert r.status_code == 401
        wrong = await http.get(API + "info", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        ok = await http.get(API + "info", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["head_rev"] == 0


def test_only_the_page_and_its_files_are_public() -> None:
    assert is_public("/") and is_public("/ui/static/app.js")
    for path in [
        "/ui/api/info",
        "/ui/static",
        "/ui/staticx/a",
        "/health",
        "/flowstate.v1.Driver/Commit",
        "//",
    ]:
        assert not is_public(path), path


def test_the_ui_files_ship_inside_the_package() -> None:
    from flowstate.server.ui.routes import STATIC

    names = {p.name for p in STATIC.iterdir()}
    assert {
        "index.html",
        "app.js",
        "api.js",
        "states.js",
        "detail.js",
        "graph.js",
        "dom.js",
        "style.css",
    } <= names
    html = (STATIC / "index.html").read_text()
    assert (
        "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    )  # offline
