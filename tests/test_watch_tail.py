"""Watchers and iterators do no work proportional to the log (issue 13, item 1).

Work is counted, not timed: every ``get_states`` call is recorded with the rev it starts after
and the head at that moment; ``head - since_rev`` bounds what the call may read. Before the
shared tail each filtered watcher re-read everything since its last match after every commit,
and N watchers ran N queries per commit.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate import tail as tail_mod
from flowstate.commands import GetStatesCmd, GetStatesResult
from flowstate.drivers.base import label_match

from .scenarios.harness import TIMEOUT

NEVER = {"never": "matches"}


class QuerySpy:
    """Records (since_rev, head) of every get_states call a driver serves."""

    def __init__(self, driver: fs.Driver) -> None:
        self.calls: list[tuple[int, int]] = []
        self.driver = driver
        # the tail reads through read_states, watchers' own queries through get_states
        for name in ("get_states", "read_states"):
            setattr(driver, name, self._spy(getattr(driver, name)))

    def _spy(self, inner: Any) -> Any:
        driver = self.driver

        async def spied(cmd: GetStatesCmd) -> GetStatesResult:
            self.calls.append((cmd.since_rev, driver.notifier.head))
            return await inner(cmd)

        return spied

    def reset(self) -> None:
        self.calls.clear()

    @property
    def span(self) -> int:
        """Sum over the calls of the revs each could have had to read."""
        return sum(max(0, head - since) for since, head in self.calls)


def _ctx(state_id: str, labels: dict[str, str] | None = None) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id, labels=dict(labels or {})))


async def _drain(watcher: fs.Watcher, into: list[fs.State]) -> None:
    async for state in watcher:
        into.append(state)


async def _until(cond: Any, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT
    while not cond():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def _settle(engine: fs.Engine) -> None:
    """Let every watcher task reach its wait (a few loop turns plus one store round trip)."""
    for _ in range(5):
        await asyncio.sleep(0)
    await engine.driver.head_rev()
    for _ in range(5):
        await asyncio.sleep(0)


async def test_iterator_resumes_after_the_head_it_scanned(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    for i in range(5):
        await engine.do(fs.commit(fs.park(_ctx(f"s{i}", {"k": "v"}))))
    head = await engine.driver.head_rev()
    it = engine.iter(fs.get_states(NEVER))
    assert [s async for s in it] == []
    assert it.since_rev == head  # was 0: the next read would re-scan all five


async def test_iterator_resumes_after_the_head_past_its_last_match(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    await engine.do(fs.commit(fs.park(_ctx("hit", {"k": "v"}))))
    for i in range(3):
        await engine.do(fs.commit(fs.park(_ctx(f"miss{i}"))))
    head = await engine.driver.head_rev()
    it = engine.iter(fs.get_states({"k": "v"}))
    assert [s.id async for s in it] == ["hit"]
    assert it.since_rev == head


async def test_idle_filtered_watchers_do_not_rescan(engine_factory):
    """20 watchers on a label nothing carries, 60 commits: one shared reader, no rescans."""
    engine = await engine_factory(fs.FlowRegistry())
    for i in range(50):  # some history before the watchers start
        await engine.do(fs.commit(fs.park(_ctx(f"old{i}"))))
    spy = QuerySpy(engine.driver)
    got: list[fs.State] = []
    watchers = [engine.watch(fs.get_states(NEVER)) for _ in range(20)]
    tasks = [asyncio.create_task(_drain(w, got)) for w in watchers]
    await _settle(engine)
    spy.reset()
    commits = 60
    for i in range(commits):
        await engine.do(fs.commit(fs.park(_ctx(f"new{i}"))))
        await _settle(engine)
    # Before: about 20 queries per commit, each from rev 0 (a span of about 20 * 60 * 80).
    assert len(spy.calls) <= 3 * commits + 10, spy.calls[:40]  # a LISTEN echo may add one
    assert spy.span <= 3 * commits + 100, spy.calls[:40]
    assert got == []
    for w in watchers:
        w.close()
    await asyncio.gather(*tasks)


async def test_fan_out_reads_each_commit_once(engine_factory):
    """200 watchers that all match get one commit through one query, not 200."""
    engine = await engine_factory(fs.FlowRegistry())
    n = 200
    received: list[list[fs.State]] = [[] for _ in range(n)]
    watchers = [engine.watch(fs.get_states({"fan": "out"})) for _ in range(n)]
    tasks = [asyncio.create_task(_drain(w, r)) for w, r in zip(watchers, received, strict=True)]
    await _settle(engine)
    spy = QuerySpy(engine.driver)
    await engine.do(fs.commit(fs.park(_ctx("one", {"fan": "out"}))))
    await _until(lambda: all(len(r) == 1 for r in received), "every watcher to get the commit")
    assert len(spy.calls) <= 5, spy.calls
    assert {r[0].id for r in received} == {"one"}
    # each watcher got its own copy: one consumer changing it cannot affect another
    received[0][0].labels["fan"] = "changed"
    assert received[1][0].labels["fan"] == "out"
    for w in watchers:
        w.close()
    await asyncio.gather(*tasks)


async def test_slow_consumer_is_bounded_and_loses_nothing(engine_factory, monkeypatch):
    monkeypatch.setattr(tail_mod, "MAX_PENDING", 10)
    engine = await engine_factory(fs.FlowRegistry())
    slow = engine.watch(fs.get_states({"k": "v"}))
    first = asyncio.create_task(anext(slow))
    await _settle(engine)
    await engine.do(fs.commit(fs.park(_ctx("first", {"k": "v"}))))
    assert (await first).id == "first"
    # nobody reads the watcher now; 50 matching commits and 50 others land
    for i in range(50):
        await engine.do(fs.commit(fs.park(_ctx(f"m{i}", {"k": "v"})), fs.park(_ctx(f"x{i}"))))
        await _settle(engine)
        assert slow.pending <= 10
    got = [await anext(slow) for _ in range(50)]
    assert [s.id for s in got] == [f"m{i}" for i in range(50)]
    revs = [s.rev for s in got]
    assert revs == sorted(set(revs))
    await slow.aclose()


async def test_tail_stops_when_the_last_watcher_closes(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    w = engine.watch(fs.get_states(NEVER))
    task = asyncio.create_task(_drain(w, []))
    driver = engine.driver
    await _until(lambda: driver._tail is not None and driver._tail.subscribers == 1, "a join")
    tail = driver._tail
    w.close()
    await task
    if tail is not None:
        assert tail.subscribers == 0
        await _until(lambda: tail._task is None, "the tail to stop")


async def test_shutdown_ends_watchers_waiting_on_the_tail(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    watchers = [engine.watch(fs.get_states({"k": str(i)})) for i in range(3)]
    tasks = [asyncio.create_task(_drain(w, [])) for w in watchers]
    await _settle(engine)
    await engine.shutdown(timeout=5.0)
    await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)


async def test_shutdown_ends_watchers_while_the_tail_read_is_stuck():
    """Subscribers wait on the tail without a timer of their own, so an engine's shutdown must
    reach them even while the tail's read of the store does not return."""
    engine = fs.Engine(fs.MemoryDriver(), fs.FlowRegistry(), recovery=False, delayer=False)
    driver = engine.driver
    inner = driver.get_states
    stuck = asyncio.Event()
    release = asyncio.Event()

    async def hanging(cmd: GetStatesCmd) -> GetStatesResult:
        if stuck.is_set():
            await release.wait()
        return await inner(cmd)

    driver.get_states = driver.read_states = hanging  # type: ignore[method-assign]
    w = engine.watch(fs.get_states({"k": "v"}))
    task = asyncio.create_task(_drain(w, []))
    await _until(lambda: driver._tail is not None and driver._tail.subscribers == 1, "a join")
    stuck.set()
    driver.notifier.notify(10**6)  # another process's commit: the tail reads, and hangs
    await _until(lambda: not driver._tail._waiting, "the tail's read")
    await engine.shutdown(timeout=5.0)
    try:
        await asyncio.wait_for(task, TIMEOUT)
    finally:
        release.set()
        await driver.close()


# Many watchers with different filters, joining at different moments, some reading slowly, with
# a tiny ring, page and buffer bound so that every path of the tail runs (replay on join, a
# join refused because the ring moved on, detach of a slow consumer, rejoin): each delivers
# exactly what one query over the final log returns, in rev order, once.

LABELS = st.dictionaries(st.sampled_from("ab"), st.sampled_from("xy"), max_size=2)
STEP = st.one_of(
    st.tuples(st.just("commit"), st.lists(LABELS, min_size=1, max_size=3)),
    st.tuples(st.just("watch"), st.lists(LABELS, max_size=2), st.booleans()),
    st.tuples(st.just("yield"), st.integers(1, 4)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEP, min_size=1, max_size=30))
def test_watchers_deliver_exactly_their_query(steps):
    asyncio.run(_run_watch_model(steps))


async def _run_watch_model(steps: list[Any]) -> None:
    saved = (tail_mod.RING_SIZE, tail_mod.PAGE, tail_mod.MAX_PENDING)
    tail_mod.RING_SIZE, tail_mod.PAGE, tail_mod.MAX_PENDING = 3, 2, 2
    engine = fs.Engine(fs.MemoryDriver(), fs.FlowRegistry(), recovery=False, delayer=False)
    await engine.start()
    watched: list[tuple[fs.Watcher, list[dict[str, str]], int, list[fs.State]]] = []
    tasks = []
    try:
        n = 0
        for step in steps:
            if step[0] == "commit":
                subs = []
                for labels in step[1]:
                    n += 1
                    subs.append(fs.park(_ctx(f"s{n % 5}-{n}", labels)))
                await engine.do(fs.commit(*subs))
            elif step[0] == "watch":
                sets = [s for s in step[1] if s]
                start = await engine.driver.head_rev() if step[2] else 0
                w = engine.watch(fs.GetStatesCmd(since_rev=start, labels=sets, limit=2))
                got: list[fs.State] = []
                watched.append((w, sets, start, got))
                tasks.append(asyncio.create_task(_drain_slowly(w, got, len(watched))))
            else:
                for _ in range(step[1]):
                    await asyncio.sleep(0)
        log = [s async for s in engine.iter(fs.get_states(limit=100))]
        for _w, sets, start, got in watched:
            want = [s.rev for s in log if s.rev > start and label_match(s.labels, sets)]
            await _until(lambda got=got, want=want: len(got) >= len(want), "watchers")
            assert [s.rev for s in got] == want
    finally:
        for w, *_ in watched:
            w.close()
        await asyncio.gather(*tasks)
        await engine.shutdown()
        tail_mod.RING_SIZE, tail_mod.PAGE, tail_mod.MAX_PENDING = saved


async def _drain_slowly(watcher: fs.Watcher, into: list[fs.State], k: int) -> None:
    async for state in watcher:
        into.append(state)
        for _ in range(k % 3):  # some consumers let several commits pass between reads
            await asyncio.sleep(0)


async def test_own_commits_reach_the_tail_without_a_read(engine_factory, driver_name):
    """A commit of this process continues the tail: its versions go to the watchers at once
    and are not read back (another process's commits are still read; a NetDriver's commits
    are stored by the server, so its tail reads them)."""
    engine = await engine_factory(fs.FlowRegistry())
    got: list[fs.State] = []
    w = engine.watch(fs.get_states({"k": "v"}))
    task = asyncio.create_task(_drain(w, got))
    await _until(
        lambda: engine.driver._tail is not None and engine.driver._tail.subscribers, "a join"
    )
    await _settle(engine)
    spy = QuerySpy(engine.driver)
    for i in range(30):
        await engine.do(fs.commit(fs.park(_ctx(f"m{i}", {"k": "v"})), fs.park(_ctx(f"x{i}"))))
        await _settle(engine)
    await _until(lambda: len(got) == 30, "30 versions")
    assert [s.id for s in got] == [f"m{i}" for i in range(30)]
    if driver_name.startswith("net-"):  # the server stores them: the client's tail reads
        assert len(spy.calls) <= 3 * 30, spy.calls
    else:
        assert len(spy.calls) <= 3, spy.calls
    w.close()
    await task


async def test_a_failing_store_sends_watchers_back_to_their_own_retrying_queries(monkeypatch):
    """When the tail's read fails, its watchers leave it for their own queries, which retry
    with backoff (not an immediate rejoin that would hammer a failing store), and deliver
    once the store answers again."""
    engine = fs.Engine(fs.MemoryDriver(), fs.FlowRegistry(), recovery=False, delayer=False)
    await engine.start()
    driver = engine.driver
    inner = driver.get_states
    failing = {"on": False, "calls": 0}

    async def flaky(cmd: GetStatesCmd) -> GetStatesResult:
        if failing["on"]:
            failing["calls"] += 1
            raise fs.StoreUnavailableError("down for the test")
        return await inner(cmd)

    driver.get_states = driver.read_states = flaky  # type: ignore[method-assign]
    got: list[fs.State] = []
    w = engine.watch(fs.get_states({"k": "v"}))
    task = asyncio.create_task(_drain(w, got))
    await _until(lambda: driver._tail is not None and driver._tail.subscribers == 1, "a join")
    failing["on"] = True
    driver.notifier.wake()  # a blind wake: the tail reads, and fails
    await _until(lambda: driver._tail.subscribers == 0, "the watcher to leave the tail")
    for _ in range(50):
        await asyncio.sleep(0)
    assert failing["calls"] <= 3, failing["calls"]  # backing off, not spinning
    failing["on"] = False
    await engine.do(fs.commit(fs.park(_ctx("after", {"k": "v"}))))
    await _until(lambda: [s.id for s in got] == ["after"], "delivery after the store is back")
    w.close()
    await task
    await engine.shutdown()
