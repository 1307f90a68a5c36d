"""Property tests of commits: optimistic concurrency against a model, and real concurrency.

Every property runs against the memory, SQLite and PostgreSQL drivers (a fresh file or schema
per example). The tests are plain functions that run their own event loop, so hypothesis can
build a fresh driver for every example. Memory and SQLite number revisions densely (1, 2, 3…);
PostgreSQL revisions only increase (a rejected commit consumes its block of revs, as in Go), so
there the model checks the order of revs, not their values.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowstate as fs
from tests import pgutil

DRIVERS = ["memory", "sqlite", "postgres"]
IDS = ["s0", "s1", "s2", "s3"]
ACTORS = 3

# SQLite examples open a file each: fewer of them keep the module fast.
EXAMPLES = {"memory": 300, "sqlite": 100, "postgres": 60}
CONCURRENT_EXAMPLES = {"memory": 30, "sqlite": 10, "postgres": 10}


def run_with_engine(kind: str, body: Callable[[fs.Engine], Awaitable[Any]]) -> Any:
    """Run ``body(engine)`` on a fresh, empty store of ``kind`` in a new event loop."""

    async def main(tmp: str) -> Any:
        if kind == "memory":
            driver: fs.Driver = fs.MemoryDriver()
        elif kind == "sqlite":
            driver = fs.SqliteDriver(Path(tmp) / "props.db")
        else:
            driver = fs.PostgresDriver(pgutil.dsn_for(pgutil.new_schema()))
        async with fs.Engine(driver, fs.FlowRegistry(), recovery=False, delayer=False) as engine:
            return await body(engine)

    if kind == "postgres":
        pgutil.require()
    with tempfile.TemporaryDirectory() as tmp:
        return asyncio.run(main(tmp))


async def read_log(engine: fs.Engine) -> list[fs.State]:
    return [s async for s in engine.iter(fs.get_states())]


def row(s: fs.State) -> tuple[Any, ...]:
    return (
        s.id,
        s.rev,
        dict(s.annotations),
        dict(s.labels),
        s.transition.to,
        dict(s.transition.annotations),
    )


# ---------------------------------------------------------------------------------------------
# a. deterministic interleavings against a model


@dataclass
class Model:
    """A pure-Python store: the serial history of versions, as rows (see :func:`row`)."""

    log: list[tuple[Any, ...]] = field(default_factory=list)
    latest: dict[str, int] = field(default_factory=dict)
    by_rev: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    dense: bool = True

    @property
    def head(self) -> int:
        return self.log[-1][1] if self.log else 0

    def latest_row(self, state_id: str) -> tuple[Any, ...]:
        return self.by_rev[self.latest[state_id]]

    def next_rev(self, actual: int) -> int:
        """The rev the next stored version must get (dense), or ``actual`` if it is later."""
        if self.dense:
            return self.head + 1
        assert actual > self.head, f"rev {actual} does not follow {self.head}"
        return actual


read_step = st.tuples(
    st.just("read"), st.integers(0, ACTORS - 1), st.sampled_from(IDS), st.just(())
)
commit_step = st.tuples(
    st.just("commit"),
    st.integers(0, ACTORS - 1),
    st.lists(st.sampled_from(IDS), min_size=1, max_size=len(IDS), unique=True),
    st.lists(st.sampled_from(["park", "transit"]), min_size=len(IDS), max_size=len(IDS)),
)
programs = st.lists(st.one_of(read_step, commit_step), min_size=1, max_size=30)


async def run_program(engine: fs.Engine, program: list[tuple[Any, ...]], dense: bool) -> None:
    model = Model(dense=dense)
    ctxs: list[dict[str, fs.StateCtx]] = [{} for _ in range(ACTORS)]

    for step, (kind, actor, arg, moves) in enumerate(program):
        mine = ctxs[actor]
        if kind == "read":
            sid = arg
            ctx = fs.StateCtx()
            if sid in model.latest:
                await engine.do(fs.get_state_by_id(ctx, sid))
                assert row(ctx.current) == model.latest_row(sid)
                assert ctx.committed == ctx.current
                assert ctx.transitions == []
            else:
                with pytest.raises(fs.NotFoundError):
                    await engine.do(fs.get_state_by_id(ctx, sid))
                ctx = fs.StateCtx(current=fs.State(id=sid))
            mine[sid] = ctx
            continue

        ids: list[str] = arg
        cmds: list[fs.Command] = []
        for sid, move in zip(ids, moves, strict=False):
            ctx = mine.setdefault(sid, fs.StateCtx(current=fs.State(id=sid)))
            ctx.current.annotations["v"] = f"{step}/{actor}"
            ctx.current.labels["actor"] = str(actor)
            if move == "park":
                cmds.append(fs.park(ctx))
            else:
                cmds.append(fs.transit(ctx, f"flow{step % 3}", {"step": str(step)}))
        before = {sid: mine[sid].deep_copy() for sid in ids}
        conflicts = [sid for sid in ids if mine[sid].committed.rev != model.latest.get(sid, 0)]

        if conflicts:
            with pytest.raises(fs.RevMismatchError) as info:
                await engine.do(fs.commit(*cmds))
            assert info.value.ids == conflicts
            for sid in ids:
                assert mine[sid] == before[sid], f"rejected commit changed the ctx of {sid}"
            assert [row(s) for s in await read_log(engine)] == model.log
            continue

        await engine.do(fs.commit(*cmds))
        for i, (sid, move) in enumerate(zip(ids, moves, strict=False)):
            ctx = mine[sid]
            rev = model.next_rev(ctx.committed.rev)
            assert ctx.committed.rev == rev, (sid, i)
            assert ctx.current == ctx.committed
            assert ctx.transitions == []
            assert ctx.committed.committed_at is not None
            expected_to = "" if move == "park" else f"flow{step % 3}"
            expected_tann = {} if move == "park" else {"step": str(step)}
            expected = (
                sid,
                rev,
                before[sid].current.annotations,
                before[sid].current.labels,
                expected_to,
                expected_tann,
            )
            assert row(ctx.committed) == expected
            model.log.append(expected)
            model.by_rev[rev] = expected
            model.latest[sid] = rev

    log = await read_log(engine)
    if dense:
        assert [s.rev for s in log] == list(range(1, len(model.log) + 1))
    assert [row(s) for s in log] == model.log
    assert all(s.committed_at is not None for s in log)
    latest = await engine_get_states(engine, fs.get_states(latest_only=True, limit=100))
    assert sorted((s.id, s.rev) for s in latest) == sorted(model.latest.items())


async def engine_get_states(engine: fs.Engine, cmd: fs.GetStatesCmd) -> list[fs.State]:
    await engine.do(cmd)
    assert cmd.result is not None
    return cmd.result.states


def _interleavings(kind: str) -> Callable[..., None]:
    @settings(
        max_examples=EXAMPLES[kind],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(program=programs)
    def test(program: list[tuple[Any, ...]]) -> None:
        run_with_engine(kind, lambda engine: run_program(engine, program, kind != "postgres"))

    return test


test_interleavings_memory = _interleavings("memory")
test_interleavings_sqlite = _interleavings("sqlite")
test_interleavings_postgres = _interleavings("postgres")


# ---------------------------------------------------------------------------------------------
# b. real concurrency: read-modify-commit loops with retry

TASKS = 8
SUCCESSES_PER_TASK = 6
CONCURRENT_IDS = ["c0", "c1", "c2"]


async def worker(
    engine: fs.Engine, name: str, rng: random.Random
) -> tuple[list[list[tuple[str, int, str]]], int]:
    """Commit SUCCESSES_PER_TASK times; returns the committed (id, rev, based_on) per commit."""
    done: list[list[tuple[str, int, str]]] = []
    conflicts = 0
    while len(done) < SUCCESSES_PER_TASK:
        ids = rng.sample(CONCURRENT_IDS, rng.randint(1, len(CONCURRENT_IDS)))
        ctxs = []
        for sid in ids:
            ctx = fs.StateCtx()
            try:
                await engine.do(fs.get_state_by_id(ctx, sid))
            except fs.NotFoundError:
                ctx = fs.StateCtx(current=fs.State(id=sid))
            ctxs.append(ctx)
            if rng.random() < 0.5:
                await asyncio.sleep(0)  # a yield point: let the others read and commit
        cmds: list[fs.Command] = []
        based = []
        for ctx in ctxs:
            based_on = str(ctx.committed.rev)
            based.append(based_on)
            ctx.current.annotations["based_on"] = based_on
            ctx.current.annotations["writer"] = name
            cmds.append(fs.park(ctx) if rng.random() < 0.5 else fs.transit(ctx, "next"))
        if rng.random() < 0.5:
            await asyncio.sleep(0)
        try:
            await engine.do(fs.commit(*cmds))
        except fs.RevMismatchError as exc:
            conflicts += 1
            assert exc.ids, "a conflict must name at least one id"
            assert set(exc.ids) <= set(ids)
            assert exc.ids == [sid for sid in ids if sid in exc.ids], "ids not in commit order"
            continue
        revs = [ctx.committed.rev for ctx in ctxs]
        assert revs == sorted(revs) and len(set(revs)) == len(revs)
        done.append([(c.current.id, c.committed.rev, b) for c, b in zip(ctxs, based, strict=True)])
    return done, conflicts


async def run_concurrent(engine: fs.Engine, seed: int) -> None:
    results = await asyncio.gather(
        *(worker(engine, f"w{i}", random.Random(seed * 1000 + i)) for i in range(TASKS))
    )
    commits = [c for done, _ in results for c in done]
    assert len(commits) == TASKS * SUCCESSES_PER_TASK
    reported = [v for c in commits for v in c]

    log = await read_log(engine)
    revs = [s.rev for s in log]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    assert len(log) == len(reported)
    assert sorted((s.id, s.rev, s.annotations["based_on"]) for s in log) == sorted(reported)
    chains: dict[str, int] = {}
    for s in log:
        assert s.annotations["based_on"] == str(chains.get(s.id, 0)), f"chain broken at {s}"
        chains[s.id] = s.rev


def _concurrent(kind: str) -> Callable[..., None]:
    @settings(
        max_examples=CONCURRENT_EXAMPLES[kind],
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(seed=st.integers(0, 2**31))
    def test(seed: int) -> None:
        run_with_engine(kind, lambda engine: run_concurrent(engine, seed))

    return test


test_concurrent_memory = _concurrent("memory")
test_concurrent_sqlite = _concurrent("sqlite")
test_concurrent_postgres = _concurrent("postgres")


# ---------------------------------------------------------------------------------------------
# c. the same id twice in one commit


@pytest.mark.parametrize("kind", DRIVERS)
def test_same_id_twice_sequential(kind: str) -> None:
    async def body(engine: fs.Engine) -> None:
        a = fs.StateCtx(current=fs.State(id="a"))
        a.current.annotations["n"] = "1"
        await engine.do(fs.commit(fs.park(a), fs.transit(a, "x")))
        assert a.committed.rev == 2
        assert a.current == a.committed and a.transitions == []
        log = await read_log(engine)
        assert [(s.id, s.rev, s.transition.to) for s in log] == [("a", 1, ""), ("a", 2, "x")]
        assert all(s.annotations == {"n": "1"} for s in log)

        # on an existing state, loaded from the store
        b = fs.StateCtx()
        await engine.do(fs.get_state_by_id(b, "a"))
        await engine.do(fs.commit(fs.transit(b, "y"), fs.park(b), fs.transit(b, "z")))
        assert b.committed.rev == 5
        log = await read_log(engine)
        assert [(s.rev, s.transition.to) for s in log] == [
            (1, ""),
            (2, "x"),
            (3, "y"),
            (4, ""),
            (5, "z"),
        ]

    run_with_engine(kind, body)


@pytest.mark.parametrize("kind", DRIVERS)
def test_same_id_twice_second_stale_conflicts(kind: str) -> None:
    """Two ctxs of one id at the same rev: the second expects a rev the first replaced."""

    async def body(engine: fs.Engine) -> None:
        a = fs.StateCtx(current=fs.State(id="a"))
        await engine.do(fs.commit(fs.park(a)))
        a1, a2 = a.copy(), a.copy()
        b = fs.StateCtx(current=fs.State(id="b"))
        before = [a1.deep_copy(), a2.deep_copy(), b.deep_copy()]
        with pytest.raises(fs.RevMismatchError) as info:
            await engine.do(fs.commit(fs.park(b), fs.park(a1), fs.transit(a2, "x")))
        assert info.value.ids == ["a"]
        assert [a1, a2, b] == before
        assert [(s.id, s.rev) for s in await read_log(engine)] == [("a", 1)]

    run_with_engine(kind, body)
