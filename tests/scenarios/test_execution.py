"""Execution scenarios (behaviour.md §7.1), run on every driver.

Flows are mostly ``async def``; SingleNode, TwoConsequentNodes and Condition also use plain
functions (run in a worker thread, talking to the engine through ``engine.do_sync``).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import flowstate as fs

from .harness import TIMEOUT, Signal, Tracker

# SingleNode and the chains


async def test_single_node(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("first")
    def first(ctx, engine):  # a plain function: runs in a worker thread
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "first"))
    await engine.execute(ctx)

    assert tracker.visited == ["first"]


async def test_two_consequent_nodes(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("first")
    def first(ctx, engine):
        tracker.track(ctx)
        return fs.transit(ctx, "second")

    @registry.flow("second")
    async def second(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "first"))
    await engine.execute(ctx)

    assert tracker.visited == ["first", "second"]


async def test_two_consequent_nodes_with_commit(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("first")
    async def first(ctx, engine):
        tracker.track(ctx)
        return fs.commit(fs.transit(ctx, "second"))

    @registry.flow("second")
    async def second(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.commit(fs.transit(ctx, "first")))
    await engine.execute(ctx)

    assert tracker.visited == ["first", "second"]


async def test_three_consequent_nodes(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("first")
    async def first(ctx, engine):
        tracker.track(ctx)
        return fs.transit(ctx, "second")

    @registry.flow("second")
    async def second(ctx, engine):
        tracker.track(ctx)
        return fs.transit(ctx, "third")

    @registry.flow("third")
    async def third(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "first"))
    await engine.execute(ctx)

    assert tracker.visited == ["first", "second", "third"]


async def test_condition(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("first")
    def first(ctx, engine):
        tracker.track(ctx)
        if ctx.current.annotations.get("condition") == "true":
            return fs.transit(ctx, "second")
        return fs.transit(ctx, "third")

    @registry.flow("second")
    async def second(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    @registry.flow("third")
    def third(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)

    true_ctx = fs.StateCtx(current=fs.State(id="aTrueTID", annotations={"condition": "true"}))
    await engine.do(fs.transit(true_ctx, "first"))
    await engine.execute(true_ctx)
    assert tracker.visited == ["first", "second"]

    tracker.reset()
    false_ctx = fs.StateCtx(current=fs.State(id="aFalseTID", annotations={"condition": "false"}))
    await engine.do(fs.transit(false_ctx, "first"))
    await engine.execute(false_ctx)
    assert tracker.visited == ["first", "third"]


# Fork and join


def _fork_registry(tracker: Tracker, *, with_commit: bool) -> fs.FlowRegistry:
    registry = fs.FlowRegistry()

    @registry.flow("fork")
    async def fork(ctx, engine):
        tracker.track(ctx)
        forked = ctx.copy()
        forked.current.id = "forkedTID"
        forked.current.rev = 0
        forked.committed = forked.current.copy()
        if with_commit:
            await engine.do(
                fs.commit(fs.transit(ctx, "origin"), fs.transit(forked, "forked")),
                fs.execute(ctx),
                fs.execute(forked),
            )
        else:
            await engine.do(
                fs.transit(ctx, "origin"),
                fs.transit(forked, "forked"),
                fs.execute(ctx),
                fs.execute(forked),
            )
        return fs.noop()

    @registry.flow("origin")
    async def origin(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    @registry.flow("forked")
    async def forked_flow(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    return registry


async def test_fork(engine_factory):
    tracker = Tracker()
    engine = await engine_factory(_fork_registry(tracker, with_commit=False))
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "fork"))
    await engine.execute(ctx)

    await tracker.wait_sorted_visited_equal(["fork", "forked", "origin"])


async def test_fork_with_commit(engine_factory):
    tracker = Tracker()
    engine = await engine_factory(_fork_registry(tracker, with_commit=True))
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "fork"))
    await engine.execute(ctx)

    await tracker.wait_sorted_visited_equal(["fork", "forked", "origin"])


def _fork_join_registry(tracker: Tracker, *, winner: int) -> fs.FlowRegistry:
    """Three branches join; the branch whose join commit is number ``winner`` goes on."""
    registry = fs.FlowRegistry()
    label = "theForkJoinLabel"

    @registry.flow("fork")
    async def fork(ctx, engine):
        tracker.track(ctx)
        ctx.current.labels[label] = ctx.current.id
        forked = ctx.new_to("forkedTID")
        forked_two = ctx.new_to("forkedTwoTID")
        origin = ctx.copy()
        await engine.do(
            fs.commit(
                fs.transit(origin, "forked"),
                fs.transit(forked, "forked"),
                fs.transit(forked_two, "forked"),
            ),
            fs.execute(origin),
            fs.execute(forked),
            fs.execute(forked_two),
        )
        return fs.noop()

    @registry.flow("forked")
    async def forked_flow(ctx, engine):
        tracker.track(ctx)
        return fs.transit(ctx, "join")

    @registry.flow("join")
    async def join(ctx, engine):
        tracker.track(ctx)
        if ctx.committed.transition.to != "join":
            await engine.do(fs.commit(fs.transit(ctx, "join")))

        cnt = 0
        cmd = fs.get_states_by_labels({label: ctx.current.labels[label]})
        async with engine.watch(cmd) as watcher:
            async for state in watcher:
                if state.transition.to != "join":
                    continue
                cnt += 1
                if state.id != ctx.current.id:
                    continue
                if cnt == winner:
                    return fs.commit(fs.transit(ctx, "joined"))
                return fs.commit(fs.park(ctx))
        return fs.noop()

    @registry.flow("joined")
    async def joined(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    return registry


_FORK_JOIN_VISITS = ["fork", "forked", "forked", "forked", "join", "join", "join", "joined"]


async def test_fork_join_first_wins(engine_factory):
    tracker = Tracker()
    engine = await engine_factory(_fork_join_registry(tracker, winner=1))
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "fork"))
    await engine.execute(ctx)

    await tracker.wait_sorted_visited_equal(_FORK_JOIN_VISITS)


async def test_fork_join_last_wins(engine_factory):
    tracker = Tracker()
    engine = await engine_factory(_fork_join_registry(tracker, winner=3))
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "fork"))
    await engine.execute(ctx)

    await tracker.wait_sorted_visited_equal(_FORK_JOIN_VISITS)


# Sub-flow calls

_CALL_VISITS = ["call", "called", "calledEnd", "call", "callEnd"]


async def test_call_flow(engine_factory):
    tracker = Tracker()
    ended = Signal()
    registry = fs.FlowRegistry()

    @registry.flow("call")
    async def call(ctx, engine):
        tracker.track(ctx)
        if ctx.current.annotation("state") == "resumed":
            return fs.transit(ctx, "callEnd")
        nxt = fs.StateCtx(current=fs.State(id="aTID"))
        await engine.do(
            fs.park(ctx),
            fs.stack(nxt, ctx, "caller_state"),
            fs.transit(nxt, "called"),
            fs.execute(nxt),
        )
        return fs.noop()

    @registry.flow("called")
    async def called(ctx, engine):
        tracker.track(ctx)
        return fs.transit(ctx, "calledEnd")

    @registry.flow("calledEnd")
    async def called_end(ctx, engine):
        tracker.track(ctx)
        if ctx.current.annotations.get("caller_state", "") != "":
            caller = fs.StateCtx()
            await engine.do(
                fs.unstack(ctx, caller, "caller_state"),
                fs.transit(caller, "call").with_annotation("state", "resumed"),
                fs.execute(caller),
                fs.park(ctx),
            )
            return fs.noop()
        return fs.park(ctx)

    @registry.flow("callEnd")
    async def call_end(ctx, engine):
        tracker.track(ctx)
        ended.set()
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "call"))
    await engine.execute(ctx)

    await ended.wait()
    assert tracker.visited == _CALL_VISITS


async def test_call_flow_with_commit(engine_factory):
    tracker = Tracker()
    ended = Signal()
    registry = fs.FlowRegistry()

    @registry.flow("call")
    async def call(ctx, engine):
        tracker.track(ctx)
        if ctx.current.annotation("state") == "resumed":
            return fs.transit(ctx, "callEnd")
        nxt = fs.StateCtx(current=fs.State(id="aNextTID"))
        await engine.do(
            fs.commit(
                fs.park(ctx),
                fs.stack(nxt, ctx, "caller_state"),
                fs.transit(nxt, "called"),
            ),
            fs.execute(nxt),
        )
        return fs.noop()

    @registry.flow("called")
    async def called(ctx, engine):
        tracker.track(ctx)
        await engine.do(fs.transit(ctx, "calledEnd"), fs.execute(ctx))
        return fs.noop()

    @registry.flow("calledEnd")
    async def called_end(ctx, engine):
        tracker.track(ctx)
        if ctx.current.annotations.get("caller_state", "") != "":
            caller = fs.StateCtx()
            await engine.do(
                fs.commit(
                    fs.unstack(ctx, caller, "caller_state"),
                    fs.transit(caller, "call").with_annotation("state", "resumed"),
                    fs.park(ctx),
                ),
                fs.execute(caller),
            )
            return fs.noop()
        return fs.commit(fs.park(ctx))

    @registry.flow("callEnd")
    async def call_end(ctx, engine):
        tracker.track(ctx)
        ended.set()
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.commit(fs.transit(ctx, "call")))
    await engine.execute(ctx)

    await ended.wait()
    assert tracker.visited == _CALL_VISITS


async def test_call_flow_with_watch(engine_factory):
    tracker = Tracker()
    ended = Signal()
    registry = fs.FlowRegistry()

    @registry.flow("call")
    async def call(ctx, engine):
        tracker.track(ctx)
        if not ctx.current.annotations.get("called"):
            nxt = fs.StateCtx(
                current=fs.State(id="aNextTID", labels={"theWatchLabel": ctx.current.id})
            )
            nxt.committed = nxt.current.copy()
            ctx.current.annotations["called"] = "true"
            await engine.do(
                fs.commit(fs.transit(ctx, "call"), fs.transit(nxt, "called")),
                fs.execute(nxt),
            )

        cmd = fs.get_states_by_labels({"theWatchLabel": ctx.current.id}).with_since_rev(
            ctx.committed.rev
        )
        async with engine.watch(cmd) as watcher:
            async for state in watcher:
                if fs.parked(state):
                    del ctx.current.annotations["called"]
                    return fs.commit(fs.transit(ctx, "callEnd"))
        return fs.noop()

    @registry.flow("called")
    async def called(ctx, engine):
        tracker.track(ctx)
        return fs.transit(ctx, "calledEnd")

    @registry.flow("calledEnd")
    async def called_end(ctx, engine):
        tracker.track(ctx)
        return fs.commit(fs.park(ctx))

    @registry.flow("callEnd")
    async def call_end(ctx, engine):
        tracker.track(ctx)
        ended.set()
        return fs.commit(fs.park(ctx))

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.commit(fs.transit(ctx, "call")))
    await engine.execute(ctx)

    await ended.wait()
    assert tracker.visited == ["call", "called", "calledEnd", "callEnd"]


# Delayed execution


async def test_delay(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("first")
    async def first(ctx, engine):
        tracker.track(ctx)
        if fs.delayed(ctx.current):
            return fs.transit(ctx, "second")
        return fs.delay(ctx, "first", timedelta(milliseconds=200))

    @registry.flow("second")
    async def second(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "first"))
    await engine.execute(ctx)

    await tracker.wait_visited_equal(["first", "first", "second"], timeout=20)


def _next_fire_times(schedule: str, now: datetime) -> tuple[datetime, datetime]:
    """The next two fire times after ``now``. Only "every second" is needed by the scenario."""
    if schedule != "* * * * * * *":
        raise ValueError(f"unsupported cron schedule {schedule!r}")
    next0 = now.replace(microsecond=0) + timedelta(seconds=1)
    return next0, next0 + timedelta(seconds=1)


async def test_cron(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()

    @registry.flow("cron")
    async def cron(ctx, engine):
        tracker.track(ctx)
        schedule = ctx.current.annotations.get("cron", "")
        task_flow = ctx.current.annotations.get("cron_task_flow_id", "")
        now = engine.clock.now()
        try:
            next0, next1 = _next_fire_times(schedule, now)
            if not task_flow:
                raise ValueError("cron_task_flow_id is empty")
        except ValueError as exc:
            ctx.current.annotations["error"] = str(exc)
            return fs.commit(fs.park(ctx))

        if now < next0 < now + timedelta(seconds=1):
            task = fs.StateCtx(
                current=fs.State(
                    id=f"task_{int(next0.timestamp())}",
                    annotations={"cron": schedule, "cron_task": "true"},
                )
            )
            await engine.do(
                fs.commit(
                    fs.park(ctx),
                    fs.delay_until(ctx, "cron", next1),
                    fs.transit(task, task_flow),
                ),
                fs.execute(task),
            )
            return fs.noop()
        await engine.do(fs.commit(fs.park(ctx), fs.delay_until(ctx, "cron", next0)))
        return fs.noop()

    @registry.flow("task")
    async def task(ctx, engine):
        tracker.track(ctx)
        return fs.commit(fs.park(ctx))

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(
        current=fs.State(
            id="aTID",
            annotations={"cron": "* * * * * * *", "cron_task_flow_id": "task"},
        )
    )
    await engine.do(fs.commit(fs.transit(ctx, "cron")), fs.execute(ctx))

    await tracker.wait_visited_equal(["cron", "task", "cron", "task", "cron", "task"], timeout=20)


async def test_cron_delay_snapshots_after_park(engine_factory):
    """What Cron relies on without the delayer: ``commit(park(c), delay_until(c, ...))``
    schedules ``c`` as committed by that park (§2.5 sequential visibility), so the delayer's
    commit expects the park's rev and succeeds."""
    engine = await engine_factory(fs.FlowRegistry())
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.commit(fs.transit(ctx, "cron")))
    delay = fs.delay_until(ctx, "cron", engine.clock.now() + timedelta(seconds=1))
    await engine.do(fs.commit(fs.park(ctx), delay))

    assert delay.result is not None
    assert delay.result.state.rev == ctx.committed.rev


# Actors, queues, mutexes, rate limits


async def test_actor(engine_factory):
    tracker = Tracker(include_task_id=True)
    registry = fs.FlowRegistry()

    @registry.flow("actor")
    async def actor(ctx, engine):
        tracker.track(ctx)
        loop = asyncio.get_running_loop()
        timer_at: float | None = loop.time() + 0.1  # a one-shot 100 ms timer
        cmd = fs.get_states_by_labels({"actor.foo": "inbox"})
        async with engine.watch(cmd) as watcher:
            while True:
                timeout = None if timer_at is None else max(0.0, timer_at - loop.time())
                try:
                    state = await asyncio.wait_for(anext(watcher), timeout)
                except TimeoutError:
                    timer_at = None
                    await engine.do(fs.commit(fs.transit(ctx, "actor")))
                    continue
                except StopAsyncIteration:  # the engine is shutting down
                    break
                tracker.track(state.to_ctx())
        return fs.commit(fs.park(ctx))

    @registry.flow("inbox")
    async def inbox(ctx, engine):
        raise AssertionError("the inbox flow must never run")

    engine = await engine_factory(registry)
    actor_ctx = fs.StateCtx(current=fs.State(id="actorTID"))
    await engine.do(fs.commit(fs.transit(actor_ctx, "actor")), fs.execute(actor_ctx))

    for msg_id in ("msg0TID", "msg1TID"):
        msg = fs.StateCtx(current=fs.State(id=msg_id, labels={"actor.foo": "inbox"}))
        await engine.do(fs.commit(fs.park(msg)))

    await tracker.wait_visited_equal(["actor:actorTID", ":msg0TID", ":msg1TID"])


async def test_queue(engine_factory):
    tracker = Tracker(include_task_id=True)
    registry = fs.FlowRegistry()

    @registry.flow("enqueue")
    async def enqueue(ctx, engine):
        tracker.track(ctx)
        ctx.current.labels["queue"] = "theName"
        return fs.commit(fs.park(ctx))

    @registry.flow("queue")
    async def queue(ctx, engine):
        tracker.track(ctx)
        async with engine.watch(fs.get_states_by_labels({"queue": "theName"})) as watcher:
            async for state in watcher:
                q = state.to_ctx()
                del q.current.labels["queue"]
                await engine.do(
                    fs.commit(fs.transit(q, "dequeued"), fs.park(ctx)),
                    fs.execute(q),
                )
                return fs.noop()
        return fs.noop()

    @registry.flow("dequeued")
    async def dequeued(ctx, engine):
        tracker.track(ctx)
        return fs.commit(fs.park(ctx))

    engine = await engine_factory(registry)
    for i in range(3):
        ctx = fs.StateCtx(current=fs.State(id=f"aTID{i}"))
        await engine.do(fs.commit(fs.transit(ctx, "enqueue")))
        await engine.execute(ctx)

    worker = fs.StateCtx(current=fs.State(id="workerTID"))
    await engine.do(fs.commit(fs.transit(worker, "queue")))
    await engine.execute(worker)

    await tracker.wait_visited_equal(
        [
            "enqueue:aTID0",
            "enqueue:aTID1",
            "enqueue:aTID2",
            "queue:workerTID",
            "dequeued:aTID0",
        ]
    )


async def test_mutex(engine_factory):
    tracker = Tracker()
    registry = fs.FlowRegistry()
    holders = {"now": 0, "max": 0}  # processes inside the protected section (race detector)

    @registry.flow("mutex")
    async def mutex(ctx, engine):
        raise AssertionError("the mutex flow must never run")

    @registry.flow("lock")
    async def lock(ctx, engine):
        tracker.track(ctx)
        m: fs.State | None = None
        cmd = fs.get_states_by_labels({"mutex": "theName"}).with_since_latest()
        async with engine.watch(cmd) as watcher:
            while True:
                if m is not None and m.annotation("state") == "unlocked":
                    c = ctx.copy()
                    mc = m.to_ctx()
                    try:
                        await engine.do(
                            fs.commit(
                                fs.park(mc).with_annotation("state", "locked"),
                                fs.stack(c, mc, "mutex_state"),
                                fs.transit(c, "protected"),
                            )
                        )
                    except fs.RevMismatchError as exc:
                        if not exc.contains(m.id):
                            raise
                        m = None  # somebody else took it: wait for the next version
                        continue
                    return fs.execute(c)
                state = await anext(watcher, None)
                if state is None:  # the engine is shutting down
                    return fs.noop()
                m = state

    @registry.flow("protected")
    async def protected(ctx, engine):
        tracker.track(ctx)
        holders["now"] += 1
        holders["max"] = max(holders["max"], holders["now"])
        return fs.transit(ctx, "unlock")

    @registry.flow("unlock")
    async def unlock(ctx, engine):
        tracker.track(ctx)
        holders["now"] -= 1  # still locked: nobody can enter before the commit below
        m = fs.StateCtx()
        await engine.do(
            fs.commit(
                fs.unstack(ctx, m, "mutex_state"),
                fs.park(m).with_annotation("state", "unlocked"),
                fs.park(ctx),
            )
        )
        return fs.noop()

    engine = await engine_factory(registry)
    mutex_ctx = fs.StateCtx(current=fs.State(id="aMutexTID", labels={"mutex": "theName"}))
    await engine.do(fs.commit(fs.park(mutex_ctx).with_annotation("state", "unlocked")))

    for i in range(3):
        ctx = fs.StateCtx(current=fs.State(id=f"aTID{i}"))
        await engine.do(fs.commit(fs.transit(ctx, "lock")), fs.execute(ctx))

    visited = await tracker.wait_visited_count_ge(9)
    assert len(visited) == 9, visited
    assert visited.count("lock") == 3
    assert visited.count("protected") == 3
    assert visited.count("unlock") == 3
    for i, visit in enumerate(visited):
        if visit == "protected":
            assert visited[i + 1 : i + 2] == ["unlock"], visited
    assert holders["max"] == 1


class _TokenBucket:
    """One token, refilled every ``interval`` seconds (burst 1); starts full."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.next_at = asyncio.get_running_loop().time()

    async def take(self, timeout: float) -> None:
        now = asyncio.get_running_loop().time()
        wait = max(0.0, self.next_at - now)
        if wait > timeout:
            raise TimeoutError("no token within the timeout")
        self.next_at = max(now, self.next_at) + self.interval
        await asyncio.sleep(wait)


async def test_rate_limit(engine_factory):
    tracker = Tracker(include_state=True)
    registry = fs.FlowRegistry()

    @registry.flow("limiter")
    async def limiter(ctx, engine):
        bucket = _TokenBucket(0.1)
        async with engine.watch(fs.get_states_by_labels({"limiter": "theName"})) as watcher:
            async for state in watcher:
                await bucket.take(timeout=1.0)
                if ctx.stopped:
                    break
                if not fs.parked(state):
                    continue
                s = state.to_ctx()
                del s.current.labels["limiter"]
                await engine.do(
                    fs.commit(fs.transit(s, "limited").with_annotation("state", "resumed")),
                    fs.execute(s),
                )
        return fs.noop()

    @registry.flow("limited")
    async def limited(ctx, engine):
        tracker.track(ctx)
        if ctx.current.annotation("state") == "resumed":
            return fs.commit(fs.park(ctx))
        ctx.current.labels["limiter"] = "theName"
        return fs.commit(fs.park(ctx))

    engine = await engine_factory(registry)
    limiter_ctx = fs.StateCtx(current=fs.State(id="aLimiterTID"))
    await engine.do(fs.commit(fs.transit(limiter_ctx, "limiter")), fs.execute(limiter_ctx))
    for i in range(10):
        ctx = fs.StateCtx(current=fs.State(id=f"aTID{i}"))
        await engine.do(fs.commit(fs.transit(ctx, "limited")), fs.execute(ctx))

    # Every state is let through, one token at a time. Waiting for all of them (not for a
    # prefix such as 10 + 5) keeps the check independent of how fast the first executions run
    # against the limiter's resumptions, and shuts down a limiter that is idle, not one about
    # to resume a state as the engine stops.
    visited = await tracker.wait_visited_count_ge(20, timeout=TIMEOUT)
    assert sorted(visited) == ["limited"] * 10 + ["limited:resumed"] * 10, visited
    await engine.shutdown(timeout=5.0)
    assert len(tracker.visited) == 20, tracker.visited
