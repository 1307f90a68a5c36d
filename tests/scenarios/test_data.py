"""Data scenarios (behaviour.md §7.2), run on every driver."""

from __future__ import annotations

import json

import flowstate as fs

from .harness import Tracker

CHECKSUM = "checksum/xxhash64"


async def test_store_data(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = fs.StateCtx(current=fs.State(id="aTID"))

    ctx.datas["bEmpty"] = fs.Data()
    await engine.do(fs.store_data(ctx, "bEmpty"))
    assert ctx.datas["bEmpty"].rev > 0
    assert ctx.datas["bEmpty"].annotations.get(CHECKSUM, "") != ""
    assert ctx.current.annotations.get("flowstate.data.bEmpty", "") != ""

    ctx.datas["bNotEmpty"] = fs.Data(blob=b"aContent")
    await engine.do(fs.store_data(ctx, "bNotEmpty"))
    data = ctx.datas["bNotEmpty"]
    assert data.rev > 0
    assert data.annotations.get(CHECKSUM, "") != ""
    assert ctx.current.annotations.get("flowstate.data.bNotEmpty", "") != ""

    stored_rev = data.rev
    await engine.do(fs.store_data(ctx, "bNotEmpty"))
    assert ctx.datas["bNotEmpty"].rev == stored_rev  # unchanged: not stored again

    ctx.datas["bNotEmpty"].blob = b"aContentUpdated"
    await engine.do(fs.store_data(ctx, "bNotEmpty"))
    assert ctx.datas["bNotEmpty"].rev > stored_rev


async def test_get_data(engine_factory):
    engine = await engine_factory(fs.FlowRegistry())
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    ctx.datas["anAlias"] = fs.Data(blob=b"aContent")
    await engine.do(fs.store_data(ctx, "anAlias"))
    assert ctx.current.annotations.get("flowstate.data.anAlias", "") != ""
    exp = ctx.datas["anAlias"].rev

    # no local data: loaded
    ctx.datas = {}
    await engine.do(fs.get_data(ctx, "anAlias"))
    assert ctx.datas["anAlias"].rev == exp
    assert ctx.datas["anAlias"].blob == b"aContent"

    # local data of another rev: reset and reloaded
    ctx.datas["anAlias"].rev += 1
    ctx.datas["anAlias"].blob = b""
    await engine.do(fs.get_data(ctx, "anAlias"))
    assert ctx.datas["anAlias"].rev == exp
    assert ctx.datas["anAlias"].blob == b"aContent"

    # local data of the referenced rev: left alone, even if its blob was changed
    ctx.datas["anAlias"].blob = b""
    await engine.do(fs.get_data(ctx, "anAlias"))
    assert ctx.datas["anAlias"].rev == exp
    assert ctx.datas["anAlias"].blob == b""


_FOO_DATA = fs.Data(rev=1, annotations={CHECKSUM: "3728699739546630719"}, blob=b"foo")


async def test_data_store_get(engine_factory):
    tracker = Tracker()
    remembered: list[fs.Data] = []
    registry = fs.FlowRegistry()

    # plain-function flows: they reach the engine through do_sync
    @registry.flow("store")
    def store(ctx, engine):
        tracker.track(ctx)
        ctx.datas["aDataKey"] = fs.Data(blob=b"foo")
        engine.do_sync(fs.store_data(ctx, "aDataKey"), fs.transit(ctx, "get"))
        return fs.execute(ctx)

    @registry.flow("get")
    def get(ctx, engine):
        tracker.track(ctx)
        engine.do_sync(fs.get_data(ctx, "aDataKey"), fs.transit(ctx, "end"))
        remembered.append(ctx.datas["aDataKey"].copy())
        return fs.execute(ctx)

    @registry.flow("end")
    def end(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "store"))
    await engine.execute(ctx)

    await tracker.wait_visited_equal(["store", "get", "end"])
    assert remembered == [_FOO_DATA]


async def test_data_store_get_with_commit(engine_factory):
    tracker = Tracker()
    remembered: list[fs.Data] = []
    registry = fs.FlowRegistry()

    @registry.flow("store")
    async def store(ctx, engine):
        tracker.track(ctx)
        ctx.datas["aDataKey"] = fs.Data(blob=b"foo")
        await engine.do(fs.commit(fs.store_data(ctx, "aDataKey"), fs.transit(ctx, "get")))
        return fs.execute(ctx)

    @registry.flow("get")
    async def get(ctx, engine):
        tracker.track(ctx)
        await engine.do(fs.commit(fs.get_data(ctx, "aDataKey"), fs.transit(ctx, "end")))
        remembered.append(ctx.datas["aDataKey"].copy())
        return fs.execute(ctx)

    @registry.flow("end")
    async def end(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="aTID"))
    await engine.do(fs.transit(ctx, "store"))
    await engine.execute(ctx)

    await tracker.wait_visited_equal(["store", "get", "end"])
    assert remembered == [_FOO_DATA]


async def test_data_flow_config(engine_factory):
    tracker = Tracker()
    remembered: list[fs.Data] = []
    registry = fs.FlowRegistry()

    async def load(ctx, engine):
        await engine.do(fs.get_data(ctx, "config_set"), fs.get_data(ctx, "data"))
        config = json.loads(ctx.datas["config_set"].blob)
        return config, int(ctx.datas["data"].blob)

    @registry.flow("foo")
    async def foo(ctx, engine):
        tracker.track(ctx)
        config, value = await load(ctx, engine)
        ctx.datas["data"].blob = str(config["foo"]["a"] * value).encode()
        await engine.do(fs.store_data(ctx, "data"), fs.transit(ctx, "bar"))
        return fs.execute(ctx)

    @registry.flow("bar")
    async def bar(ctx, engine):
        tracker.track(ctx)
        config, value = await load(ctx, engine)
        ctx.datas["data"].blob = str(value // config["bar"]["b"]).encode()
        await engine.do(fs.store_data(ctx, "data"), fs.transit(ctx, "end"))
        remembered.append(ctx.datas["data"].copy())
        return fs.execute(ctx)

    @registry.flow("end")
    async def end(ctx, engine):
        tracker.track(ctx)
        return fs.park(ctx)

    engine = await engine_factory(registry)
    ctx = fs.StateCtx(current=fs.State(id="TID"))
    config_set = {"foo": {"a": 10}, "bar": {"b": 20}}
    ctx.datas["config_set"] = fs.Data(blob=json.dumps(config_set, indent=2).encode())
    ctx.datas["data"] = fs.Data(blob=b"100")
    await engine.do(fs.store_data(ctx, "config_set"), fs.store_data(ctx, "data"))
    assert (ctx.datas["config_set"].rev, ctx.datas["data"].rev) == (1, 2)

    await engine.do(fs.transit(ctx, "foo"))
    await engine.execute(ctx)

    await tracker.wait_visited_equal(["foo", "bar", "end"])
    assert remembered == [
        fs.Data(rev=4, annotations={CHECKSUM: "11329650324634456925"}, blob=b"50")
    ]
