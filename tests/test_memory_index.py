"""The memory driver's label index answers exactly what a scan of the log would."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.drivers.base import label_match

LABELS = st.dictionaries(st.sampled_from("abc"), st.sampled_from("xy"), max_size=3)
SETS = st.lists(LABELS, max_size=3)


def _ctx(state_id: str, labels: dict[str, str]) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id, labels=labels))


@settings(max_examples=150, deadline=None)
@given(
    log=st.lists(st.tuples(st.integers(0, 4), LABELS), max_size=25),
    sets=SETS,
    since=st.integers(-1, 26),
    latest_only=st.booleans(),
    limit=st.integers(1, 5),
)
def test_indexed_queries_equal_a_scan(log, sets, since, latest_only, limit):
    asyncio.run(_check(log, sets, since, latest_only, limit))


async def _check(log, sets, since, latest_only, limit) -> None:
    d = fs.MemoryDriver()
    ctxs: dict[int, fs.StateCtx] = {}
    for n, labels in log:
        ctx = ctxs.setdefault(n, _ctx(f"s{n}", {}))
        ctx.current.labels = dict(labels)
        await d.commit(fs.commit(fs.park(ctx)))
    versions = d._log
    latest = {s.id: s.rev for s in versions}
    sets = [s for s in sets if s]

    def ok(s: fs.State) -> bool:
        return label_match(s.labels, sets) and (not latest_only or latest[s.id] == s.rev)

    start = since
    if since < 0:
        hits = [s.rev for s in versions if label_match(s.labels, sets)]
        start = hits[-1] - 1 if hits else len(versions)
    want = [s.rev for s in versions if s.rev > start and ok(s)]
    got: list[int] = []
    cmd = fs.GetStatesCmd(since_rev=since, labels=sets, latest_only=latest_only, limit=limit)
    while True:
        result = await d.get_states(cmd)
        got += [s.rev for s in result.states]
        if not result.more:
            break
        cmd.since_rev = result.states[-1].rev
    assert got == want
    for want_set in sets:
        matching = [s for s in versions if label_match(s.labels, [want_set])]
        if matching:
            assert (await d.get_state_by_labels(want_set)).rev == matching[-1].rev
        else:
            with pytest.raises(fs.NotFoundError):
                await d.get_state_by_labels(want_set)


async def test_read_states_shares_the_stored_versions_and_get_states_copies() -> None:
    """read_states (the server's answers, the shared tail) skips the copies; get_states, what
    users call, still hands out versions they may change without touching the store."""
    driver = fs.MemoryDriver()
    await driver.open()
    await driver.commit(fs.commit(fs.park(_ctx("a", {"k": "v"}))))
    shared = (await driver.read_states(fs.get_states())).states
    copied = (await driver.get_states(fs.get_states())).states
    assert shared == copied
    assert shared[0] is (await driver.read_states(fs.get_states())).states[0]
    copied[0].labels["k"] = "changed"
    assert (await driver.get_states(fs.get_states({"k": "v"}))).states[0].id == "a"
    await driver.close()
