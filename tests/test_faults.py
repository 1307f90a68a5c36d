"""Fault tests of recovery, the delayer and cluster mode with real OS processes and SIGKILL,
on a shared SQLite file and on PostgreSQL (issue 5, a-d).

Each process is tests/procs/node.py. All processes and the test share a :class:`FileClock`:
the test moves time forward by minutes in a few milliseconds, so the retry windows (minutes),
the takeover windows (3 and 6 minutes) and the delays pass quickly, while everything else runs
for real: separate processes, one store, SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import flowstate as fs
from flowstate import recovery
from tests import pgutil
from tests.procs.fileclock import FileClock

NODE = Path(__file__).parent / "procs" / "node.py"
TIMEOUT = 120.0
STEP = 30.0  # seconds of store time per clock move


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    status_file: Path

    def status(self) -> dict[str, object]:
        try:
            status: dict[str, object] = json.loads(self.status_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return status

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)


class Cluster:
    def __init__(self, url: str, tmp: Path) -> None:
        self.url = url
        self.tmp = tmp
        self.clock = FileClock(tmp / "clock")
        self.log = tmp / "events.log"
        self.nodes: list[Node] = []

    def start(self, mode: str, name: str, seed: int = 0) -> Node:
        status = self.tmp / f"status-{name}.json"
        args = [str(self.clock.path), str(status), str(self.log), mode, name]
        if seed:
            args.append(str(seed))
        proc = subprocess.Popen(
            [sys.executable, str(NODE), self.url, *args],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / f"stderr-{name}.txt", "wb"),  # noqa: SIM115 - child owns it
        )
        node = Node(name, proc, status)
        self.nodes.append(node)
        wait_for(lambda: node.status() != {} or not node.alive(), f"{name} to start")
        assert node.alive(), (self.tmp / f"stderr-{name}.txt").read_text()
        return node

    def events(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [line.split() for line in lines if line != "seeded"]

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.alive():
                node.kill()


def wait_for(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        pgutil.require()
        return pgutil.dsn_for(pgutil.new_schema())
    return f"sqlite:///{tmp_path / 'cluster.db'}"


@pytest.fixture
def cluster(store_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    c = Cluster(store_url, tmp_path)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def observer(cluster: Cluster) -> AsyncIterator[fs.Engine]:
    """The test's own engine on the store: no recoverer, no delayer, the shared clock."""
    driver = fs.open_driver(cluster.url)
    engine = fs.Engine(driver, recovery=False, delayer=False, clock=cluster.clock)
    async with engine:
        yield engine


async def latest_states(engine: fs.Engine, prefix: str) -> dict[str, fs.State]:
    out: dict[str, fs.State] = {}
    async for state in engine.iter(fs.get_states(latest_only=True, limit=500)):
        if state.id.startswith(prefix):
            out[state.id] = state
    return out


async def history(engine: fs.Engine) -> dict[str, list[fs.State]]:
    out: dict[str, list[fs.State]] = {}
    async for state in engine.iter(fs.get_states(limit=500)):
        out.setdefault(state.id, []).append(state)
    return out


async def drive(
    cluster: Cluster, done: Callable[[], object], what: str, timeout: float = TIMEOUT
) -> None:
    """Move the shared clock forward a step at a time until ``await done()`` holds."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not await done():  # type: ignore[misc]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        cluster.clock.advance(STEP)
        await asyncio.sleep(0.05)


async def commit_stalled(engine: fs.Engine, sid: str) -> None:
    """A transition committed and never executed: its process died right after the commit."""
    await engine.do(fs.commit(fs.transit(fs.StateCtx(current=fs.State(id=sid)), "work")))


async def test_a_killed_worker_leaves_nothing_unfinished(
    cluster: Cluster, observer: fs.Engine
) -> None:
    """(a) 200 states in a three-step flow; the worker is killed at a random point; a fresh
    process finishes every state, and no step runs for a state after it ended."""
    n = 200
    kill_after = random.Random(os.getpid()).randint(n // 4, 2 * n)  # of 3n step runs
    worker = cluster.start("steps", "worker", seed=n)
    wait_for(lambda: "seeded" in cluster.log.read_text(), f"the {n} states to be committed")
    wait_for(lambda: len(cluster.events()) >= kill_after, f"{kill_after} step runs")
    worker.kill()
    runs_before = len(cluster.events())
    assert runs_before < 4 * n, "the worker finished before it was killed: no fault injected"

    cluster.start("steps", "fresh")

    async def all_ended() -> bool:
        states = await latest_states(observer, "s")
        return len(states) == n and all(fs.ended(s) for s in states.values())

    await drive(cluster, all_ended, "every state to end")

    events = cluster.events()
    ended_at: dict[str, int] = {}
    for kind, sid, _flow, _rev, t, _name in events:
        if kind == "ended":
            assert sid not in ended_at, f"{sid} ended twice"
            ended_at[sid] = int(t)
    late = [e for e in events if e[0] == "run" and e[1] in ended_at and int(e[4]) > ended_at[e[1]]]
    assert late == [], f"steps ran after their state ended: {late[:5]}"
    logs = await history(observer)
    for i in range(n):
        versions = logs[f"s{i:03d}"]
        assert fs.ended(versions[-1])
        assert [v for v in versions if fs.ended(v)] == [versions[-1]]
        flows = [v.transition.to for v in versions[:-1]]
        assert flows == sorted(flows) and set(flows) == {"step1", "step2", "step3"}, flows


async def test_a_standby_takes_over_from_a_killed_recoverer(
    cluster: Cluster, observer: fs.Engine
) -> None:
    """(b) The active recoverer's process is killed; the standby takes over; states committed
    before and after the kill are all recovered."""
    a = cluster.start("park", "a")
    wait_for(lambda: a.status().get("recoverer") is True, "a to be the active recoverer")
    b = cluster.start("park", "b")
    assert b.status().get("recoverer") is False

    for i in range(5):
        await commit_stalled(observer, f"early{i}")

    async def parked(prefix: str, count: int) -> bool:
        states = await latest_states(observer, prefix)
        return len(states) == count and all(fs.parked(s) for s in states.values())

    await drive(cluster, lambda: parked("early", 5), "a to recover the early states")
    for i in range(10):
        await commit_stalled(observer, f"before{i}")
    a.kill()
    for i in range(10):
        await commit_stalled(observer, f"after{i}")

    await drive(cluster, lambda: parked("before", 10), "the states committed before the kill")
    await drive(cluster, lambda: parked("after", 10), "the states committed after the kill")
    assert b.status().get("recoverer") is True
    states = await latest_states(observer, "")
    by = {sid: s.annotations.get("by") for sid, s in states.items() if "flowstate" not in sid}
    assert {by[f"early{i}"] for i in range(5)} == {"a"}
    assert {by[f"before{i}"] for i in range(10)} | {by[f"after{i}"] for i in range(10)} == {"b"}
    for s in states.values():
        if s.id.startswith(("before", "after")):
            assert recovery.attempt(s) == 0  # the park by the retried flow carries none
    assert b.alive()


async def test_delayed_states_survive_a_killed_delayer(
    cluster: Cluster, observer: fs.Engine
) -> None:
    """(c) Delayed states are scheduled and the active delayer is killed before they are due;
    the other process fires each of them, and each leads to exactly one committed transition."""
    a = cluster.start("park", "a")
    wait_for(lambda: a.status().get("delayer") is True, "a to be the active delayer")
    b = cluster.start("park", "b")
    assert b.status().get("delayer") is False

    async def schedule(prefix: str, after: float, count: int) -> None:
        for i in range(count):
            ctx = fs.StateCtx(current=fs.State(id=f"{prefix}{i}"))
            recovery.disable(ctx)  # only the delayer may fire these
            await observer.do(fs.commit(fs.park(ctx)))
            await observer.do(fs.delay(ctx, "fire", after))

    async def parked(prefix: str, count: int) -> bool:
        states = await latest_states(observer, prefix)
        return len(states) == count and all(
            fs.parked(s) and s.annotations.get("by") for s in states.values()
        )

    await schedule("soon", 30, 10)
    await schedule("late", 1800, 20)
    await drive(cluster, lambda: parked("soon", 10), "a to fire the early delays")
    a.kill()
    await drive(cluster, lambda: parked("late", 20), "b to fire the late delays")

    logs = await history(observer)
    for prefix, count, by in (("soon", 10, "a"), ("late", 20, "b")):
        for i in range(count):
            versions = logs[f"{prefix}{i}"]
            fired = [v for v in versions if v.transition.to == "fire"]
            assert len(fired) == 1, [(v.rev, v.transition.to) for v in versions]
            assert fs.delayed(fired[0])
            assert versions[-1].annotations["by"] == by
    assert b.status().get("delayer") is True


async def test_a_state_failing_every_attempt_is_ended(
    cluster: Cluster, observer: fs.Engine
) -> None:
    """(d) Every attempt kills the process running it; after max attempts the state is ended
    by force, with the attempt count on it."""
    await commit_stalled(observer, "doomed")
    deaths = 0

    async def final() -> fs.State:
        ctx = fs.StateCtx()
        await observer.do(fs.get_state_by_id(ctx, "doomed"))
        return ctx.current

    for round_ in range(recovery.DEFAULT_MAX_ATTEMPTS + 2):
        node = cluster.start("crash", f"n{round_}")

        async def settled(node: Node = node) -> bool:
            return not node.alive() or fs.ended(await final())

        await drive(cluster, settled, f"node n{round_} to crash or the state to end")
        if node.alive():
            break
        deaths += 1
    state = await final()
    assert fs.ended(state)
    assert recovery.attempt(state) == recovery.DEFAULT_MAX_ATTEMPTS + 1
    assert deaths == recovery.DEFAULT_MAX_ATTEMPTS
    runs = [e for e in cluster.events() if e[0] == "run"]
    assert len(runs) == recovery.DEFAULT_MAX_ATTEMPTS
