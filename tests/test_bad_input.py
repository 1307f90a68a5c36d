"""Bad input gets a precise error naming the field, and never changes the store or the ctxs.

Every test runs on the memory, SQLite and PostgreSQL drivers, against a store that already
holds a few versions; "unchanged" compares the whole log and the delayed states before and
after, and the callers' ctxs (current, committed, transitions, datas).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs

FAR_FUTURE = datetime(2200, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[fs.Engine]:
    if request.param == "memory":
        driver: fs.Driver = fs.MemoryDriver()
    elif request.param == "sqlite":
        driver = fs.SqliteDriver(tmp_path / "bad.db")
    else:
        from tests import pgutil

        pgutil.require()
        driver = fs.PostgresDriver(pgutil.dsn_for(pgutil.new_schema()))
    async with fs.Engine(driver, fs.FlowRegistry(), recovery=False, delayer=False) as eng:
        a = fs.StateCtx(current=fs.State(id="a", labels={"kind": "seed"}))
        b = fs.StateCtx(current=fs.State(id="b", annotations={"x": "1"}))
        await eng.do(fs.commit(fs.park(a), fs.transit(b, "somewhere")))
        a.current.annotations["again"] = "yes"
        await eng.do(fs.commit(fs.park(a)))
        await eng.do(fs.delay(b, "later", timedelta(hours=1)))
        yield eng


async def snapshot(engine: fs.Engine) -> tuple[list[Any], list[Any]]:
    log = [
        (s.id, s.rev, s.annotations, s.labels, s.committed_at, s.transition)
        async for s in engine.iter(fs.get_states())
    ]
    cmd = fs.get_delayed_states(until=FAR_FUTURE)
    await engine.do(cmd)
    assert cmd.result is not None
    delayed = [(d.offset, d.execute_at, d.state) for d in cmd.result.delayed_states]
    return log, delayed


@asynccontextmanager
async def unchanged(engine: fs.Engine, *ctxs: fs.StateCtx) -> AsyncIterator[None]:
    """Assert that the block leaves the store and ``ctxs`` exactly as they were."""
    before = await snapshot(engine)
    copies = [c.deep_copy() for c in ctxs]
    yield
    assert await snapshot(engine) == before, "the store changed"
    for ctx, copy in zip(ctxs, copies, strict=True):
        assert ctx == copy, f"ctx of {ctx.current.id!r} changed"


async def loaded(engine: fs.Engine, state_id: str) -> fs.StateCtx:
    ctx = fs.StateCtx()
    await engine.do(fs.get_state_by_id(ctx, state_id))
    return ctx


def new(state_id: str) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id))


# ---------------------------------------------------------------------------------------------
# ids and flow ids


async def test_empty_state_id_in_commit(engine: fs.Engine) -> None:
    empty = new("")
    async with unchanged(engine, empty):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.park(empty)))
    assert info.value.field == "commands[0].current.id"

    ok = await loaded(engine, "a")
    async with unchanged(engine, ok, empty):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.park(ok), fs.transit(empty, "f")))
    assert info.value.field == "commands[1].current.id"


async def test_empty_flow_id_in_do(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "a")
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.transit(ctx, ""))
    assert info.value.field == "to"
    assert "flow id empty" in str(info.value)


async def test_empty_flow_id_in_commit(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "a")
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.transit(ctx, "")))
    assert info.value.field == "commands[0].to"


async def test_set_flow_with_empty_id(engine: fs.Engine) -> None:
    async def flow(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.noop()

    with pytest.raises(fs.ValidationError) as info:
        engine.registry.set_flow("", flow)
    assert info.value.field == "flow_id"
    assert engine.registry.ids() == []
    with pytest.raises(fs.ValidationError) as info:
        engine.registry.unset_flow("")
    assert info.value.field == "flow_id"


async def test_execute_with_empty_transition_to(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "a")  # parked: transition.to is empty
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.execute(ctx)
    assert info.value.field == "current.transition.to"


async def test_execute_with_empty_state_id(engine: fs.Engine) -> None:
    ctx = new("")
    ctx.current.transition.to = "somewhere"
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.execute(ctx)
    assert info.value.field == "current.id"


async def test_execute_unknown_flow(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "b")  # in transition to "somewhere", which nobody registered
    async with unchanged(engine, ctx):
        with pytest.raises(fs.FlowNotFoundError) as info:
            await engine.execute(ctx)
    assert info.value.flow_id == "somewhere"
    assert "somewhere" in str(info.value)


# ---------------------------------------------------------------------------------------------
# what a commit may contain


@pytest.mark.parametrize(
    ("inner", "word"),
    [
        (lambda c: fs.commit(fs.park(c)), "commit"),
        (lambda c: fs.execute(c), "execute"),
        (lambda c: fs.get_states(), "get states"),
        (lambda c: fs.get_delayed_states(until=FAR_FUTURE), "get delayed states"),
    ],
    ids=["commit", "execute", "get_states", "get_delayed_states"],
)
async def test_not_allowed_inside_commit(
    engine: fs.Engine, inner: Callable[[fs.StateCtx], fs.Command], word: str
) -> None:
    a = await loaded(engine, "a")
    b = await loaded(engine, "b")
    async with unchanged(engine, a, b):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.park(a), inner(b), fs.park(b)))
    assert info.value.field == "commands[1]"
    assert f"{word} command not allowed inside commit" in str(info.value)


async def test_commit_without_commands(engine: fs.Engine) -> None:
    async with unchanged(engine):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit())
    assert info.value.field == "commands"
    assert "no commands to commit" in str(info.value)


async def test_multi_command_commit_returned_from_flow_is_rejected_first(
    engine: fs.Engine,
) -> None:
    calls: list[str] = []

    async def multi(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        calls.append(ctx.current.id)
        return fs.commit(fs.park(ctx), fs.park(new("other")))

    engine.registry.set_flow("multi", multi)
    ctx = await loaded(engine, "a")
    await engine.do(fs.commit(fs.transit(ctx, "multi")))
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.execute(ctx)
    assert info.value.field == "commands"
    assert calls == ["a"]


# ---------------------------------------------------------------------------------------------
# stack / unstack


async def test_unstack_empty_annotation(engine: fs.Engine) -> None:
    carrier = await loaded(engine, "a")
    target = new("t")
    async with unchanged(engine, carrier, target):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.unstack(carrier, target, "k"))
        assert info.value.field == "annotation"
        assert "'k'" in str(info.value)
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.unstack(carrier, target, "k"), fs.park(carrier)))
        assert info.value.field == "commands[0].annotation"

    carrier.current.annotations["k"] = ""  # what an earlier unstack leaves behind
    async with unchanged(engine, carrier, target):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.unstack(carrier, target, "k"))
    assert info.value.field == "annotation"


async def test_stack_onto_annotation_already_set(engine: fs.Engine) -> None:
    carrier = await loaded(engine, "a")
    carrier.current.annotations["k"] = "taken"
    stacked = await loaded(engine, "b")
    async with unchanged(engine, carrier, stacked):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.stack(carrier, stacked, "k"))
        assert info.value.field == "annotation"
        assert "'k' already set" in str(info.value)
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.park(stacked), fs.stack(carrier, stacked, "k")))
        assert info.value.field == "commands[1].annotation"
    with pytest.raises(fs.ValidationError) as info:
        await engine.do(fs.stack(carrier, stacked, ""))
    assert info.value.field == "annotation"


def _corrupt_values() -> list[tuple[str, str]]:
    return [
        ("not base64", "!!not*base64"),
        ("truncated varint", base64.b64encode(b"\xff\xff\xff").decode()),
        ("bad wire type", base64.b64encode(b"hello world").decode()),
    ]


@pytest.mark.parametrize(("why", "value"), _corrupt_values(), ids=[w for w, _ in _corrupt_values()])
async def test_unstack_corrupt_annotation(engine: fs.Engine, why: str, value: str) -> None:
    carrier = await loaded(engine, "a")
    carrier.current.annotations["k"] = value
    target = new("t")
    async with unchanged(engine, carrier, target):
        with pytest.raises(fs.ValidationError):
            await engine.do(fs.unstack(carrier, target, "k"))
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.unstack(carrier, target, "k"), fs.park(carrier)))
        assert info.value.field.startswith("commands[0].")
    if why == "not base64":
        assert "'k'" in str(info.value) and info.value.field == "commands[0].annotation"


async def test_unstack_not_a_state_ctx_names_the_annotation(engine: fs.Engine) -> None:
    carrier = await loaded(engine, "a")
    carrier.current.annotations["k"] = base64.b64encode(b"\xff\xff\xff").decode()
    with pytest.raises(fs.ValidationError) as info:
        await engine.do(fs.unstack(carrier, new("t"), "k"))
    assert info.value.field == "annotation" and "'k'" in str(info.value)


# ---------------------------------------------------------------------------------------------
# data, queries


async def test_get_data_of_alias_never_stored(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "a")
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.get_data(ctx, "foo"))
        assert info.value.field == "current.annotations['flowstate.data.foo']"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.get_data(ctx, "foo"), fs.park(ctx)))
        assert info.value.field == "commands[0].current.annotations['flowstate.data.foo']"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.get_data(ctx, ""))
        assert info.value.field == "alias"


async def test_store_data_of_unknown_alias(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "a")
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.store_data(ctx, "nothing"))
    assert info.value.field == "alias"
    assert "'nothing'" in str(info.value)


async def test_get_state_by_id_bad_arguments(engine: fs.Engine) -> None:
    ctx = await loaded(engine, "a")
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.get_state_by_id(ctx, ""))
        assert info.value.field == "id"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.get_state_by_id(ctx, "a", -1))
        assert info.value.field == "rev"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.get_state_by_id(ctx, "", 0), fs.park(ctx)))
        assert info.value.field == "commands[0].id"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.get_state_by_id(ctx, "a", -5), fs.park(ctx)))
        assert info.value.field == "commands[0].rev"


async def test_get_states_bad_limits(engine: fs.Engine) -> None:
    async with unchanged(engine):
        cmd = fs.get_states(limit=-1)
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(cmd)
        assert info.value.field == "limit"
        assert cmd.result is None
        with pytest.raises(fs.ValidationError) as info:
            engine.iter(fs.get_states(limit=-1))
        assert info.value.field == "limit"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.get_states(since_rev=-2))
        assert info.value.field == "since_rev"


@pytest.mark.parametrize("where", ["labels", "annotations", "transition.annotations"])
async def test_non_string_values_in_commit(engine: fs.Engine, where: str) -> None:
    ctx = await loaded(engine, "a")
    if where == "labels":
        ctx.current.labels["k"] = 5  # type: ignore[assignment]
        cmd: fs.Command = fs.park(ctx)
    elif where == "annotations":
        ctx.current.annotations["k"] = None  # type: ignore[assignment]
        cmd = fs.park(ctx)
    else:
        cmd = fs.transit(ctx, "f", {"k": b"bytes"})  # type: ignore[dict-item]
    other = await loaded(engine, "b")
    async with unchanged(engine, ctx, other):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.park(other), cmd))
    assert info.value.field == f"commands[1].current.{where}['k']"


# ---------------------------------------------------------------------------------------------
# a later invalid sub-command undoes nothing because nothing was done


def _bad_later_commands() -> list[tuple[str, Callable[[fs.StateCtx], fs.Command], str]]:
    def bad_label(c: fs.StateCtx) -> fs.Command:
        c.current.labels["n"] = 1  # type: ignore[assignment]
        return fs.park(c)

    def stack_taken(c: fs.StateCtx) -> fs.Command:
        c.current.annotations["k"] = "taken"
        return fs.stack(c, c, "k")

    return [
        ("empty flow id", lambda c: fs.transit(c, ""), "commands[3].to"),
        ("empty state id", lambda c: fs.park(new("")), "commands[3].current.id"),
        ("label not a string", bad_label, "commands[3].current.labels['n']"),
        ("get by empty id", lambda c: fs.get_state_by_id(c, ""), "commands[3].id"),
        ("unstack empty", lambda c: fs.unstack(c, new("t"), "nope"), "commands[3].annotation"),
        ("stack taken", stack_taken, "commands[3].annotation"),
        (
            "get data missing",
            lambda c: fs.get_data(c, "nope"),
            "commands[3].current.annotations['flowstate.data.nope']",
        ),
        ("store data missing", lambda c: fs.store_data(c, "nope"), "commands[3].alias"),
        ("delay empty flow id", lambda c: fs.delay(c, "", 10), "commands[3].to"),
    ]


@pytest.mark.parametrize(
    ("why", "bad", "field"), _bad_later_commands(), ids=[w for w, _, _ in _bad_later_commands()]
)
async def test_invalid_later_sub_command_changes_nothing(
    engine: fs.Engine, why: str, bad: Callable[[fs.StateCtx], fs.Command], field: str
) -> None:
    a = await loaded(engine, "a")
    b = await loaded(engine, "b")
    c = new("c")
    c.datas["d"] = fs.Data(b"payload")
    subject = new("subject")
    bad_cmd = bad(subject)
    async with unchanged(engine, a, b, c, subject):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(
                fs.commit(
                    fs.park(a),
                    fs.delay(b, "later", 60),
                    fs.store_data(c, "d"),
                    bad_cmd,
                    fs.transit(b, "x"),
                    fs.park(c),
                )
            )
    assert info.value.field == field
    # The data of the failed commit was not stored either: data rev 1 does not exist.
    probe = new("probe")
    probe.current.annotations["flowstate.data.d"] = "1"
    with pytest.raises(fs.DataNotFoundError):
        await engine.do(fs.get_data(probe, "d"))


# ---------------------------------------------------------------------------------------------
# text a store cannot keep, numbers out of range


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("id", "current.id"),
        ("label key", "current.labels"),
        ("label value", "current.labels['k']"),
        ("annotation value", "current.annotations['k']"),
        ("flow", "current.transition.to"),
    ],
)
async def test_nul_characters_are_refused(engine: fs.Engine, where: str, field: str) -> None:
    ctx = new("nul")
    to = "flow"
    if where == "id":
        ctx.current.id = "nul\x00id"
    elif where == "label key":
        ctx.current.labels["k\x00"] = "v"
    elif where == "label value":
        ctx.current.labels["k"] = "v\x00"
    elif where == "annotation value":
        ctx.current.annotations["k"] = "\x00"
    else:
        to = "fl\x00ow"
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.commit(fs.transit(ctx, to)))
        assert info.value.field == f"commands[0].{field}"
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.delay(ctx, to, 60))
        assert info.value.field == field


async def test_out_of_range_numbers(engine: fs.Engine) -> None:
    async with unchanged(engine):
        for cmd, field in (
            (fs.get_states(limit=2**63), "limit"),
            (fs.get_states(since_rev=2**64), "since_rev"),
            (fs.get_state_by_id(fs.StateCtx(), "a", rev=2**63), "rev"),
            (fs.get_delayed_states(until=FAR_FUTURE, offset=2**63), "offset"),
            (fs.get_delayed_states(until=FAR_FUTURE, limit=10**9), "limit"),
        ):
            with pytest.raises(fs.ValidationError) as info:
                await engine.do(cmd)
            assert info.value.field == field


async def test_delay_of_a_state_without_id(engine: fs.Engine) -> None:
    ctx = new("")
    async with unchanged(engine, ctx):
        with pytest.raises(fs.ValidationError) as info:
            await engine.do(fs.delay(ctx, "flow", 60))
        assert info.value.field == "current.id"
