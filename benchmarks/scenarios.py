"""The flowstate scenarios and the physical limits they are compared with.

Every public coroutine here takes a ``params`` dict (from the orchestrator) and returns a
JSON-able dict. Each runs in its own child process (see :mod:`benchmarks.child`), so the peak
RSS the child reports belongs to that scenario alone.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import json
import math
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

import flowstate as fs
from benchmarks.common import (
    PG_DSN,
    current_rss_bytes,
    percentile,
    pg_drop_schema,
    timed_loop,
)

# --------------------------------------------------------------------------------------------
# drivers


def driver_for(
    backend: str,
    tmpdir: str,
    tag: str,
    *,
    conc: int = 1,
    schema: str | None = None,
    clock: Any = None,
) -> fs.Driver:
    """A driver on the store ``tag`` of ``backend`` (a file in ``tmpdir``, or a PG schema);
    ``clock`` stamps its commits (the network driver's server uses its own)."""
    if backend == "memory":
        return fs.MemoryDriver(clock=clock)
    if backend in ("sqlite-normal", "sqlite-full"):
        sync = "NORMAL" if backend == "sqlite-normal" else "FULL"
        return fs.SqliteDriver(os.path.join(tmpdir, f"{tag}.db"), synchronous=sync, clock=clock)
    if backend == "postgres":
        assert schema is not None
        # one pooled connection per worker, like the raw limit (the default pool is 10)
        return fs.PostgresDriver(PG_DSN, schema=schema, max_size=max(10, conc), clock=clock)
    if backend == "net":
        return fs.NetDriver(_server_for(tag))
    raise ValueError(f"unknown backend {backend}")


_servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}


def _server_for(tag: str) -> str:
    """The URL of a `flowstate serve --store memory://` process of its own for store ``tag``
    (started on first use, killed when this process exits): the network path, measured with
    the fastest store behind it."""
    if tag in _servers:
        return _servers[tag][1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code = "from flowstate.cli import main; main()"
    args = ["serve", "--store", "memory://", "--addr", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(proc.kill)
    _servers[tag] = (proc, url)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"flowstate serve did not come up on {url}")
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def engine_for(
    backend: str, tmpdir: str, tag: str, *, conc: int = 1, schema: str | None = None
) -> AsyncIterator[fs.Engine]:
    """A started engine (recoverer and delayer on, as by default) on a fresh, empty store."""
    registry = fs.FlowRegistry()
    _register_flows(registry)
    engine = fs.Engine(driver_for(backend, tmpdir, tag, conc=conc, schema=schema), registry)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


@contextlib.asynccontextmanager
async def workspace(backend: str, params: dict[str, Any]) -> AsyncIterator[tuple[str, str | None]]:
    """A temp dir, and for PostgreSQL a dedicated schema that is dropped afterwards."""
    with tempfile.TemporaryDirectory(prefix="fs-bench-") as tmpdir:
        schema = None
        if backend == "postgres":
            schema = f"{params['schema_prefix']}{params['job']}"
            await pg_drop_schema(schema)
        try:
            yield tmpdir, schema
        finally:
            if schema is not None:
                await pg_drop_schema(schema)


def _register_flows(registry: fs.FlowRegistry) -> None:
    """The 3-step flow: s1 -> s2 -> s3 -> parked, a commit at every step."""

    @registry.flow("s1")
    async def s1(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.commit(fs.transit(ctx, "s2"))

    @registry.flow("s2")
    async def s2(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.commit(fs.transit(ctx, "s3"))

    @registry.flow("s3")
    async def s3(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        return fs.commit(fs.park(ctx))


# --------------------------------------------------------------------------------------------
# engine commit throughput


async def commit(params: dict[str, Any]) -> dict[str, Any]:
    """``engine.do(fs.commit(fs.park(ctx)))`` on one state per worker, at each concurrency."""
    backend = params["backend"]
    out: dict[str, Any] = {"by_conc": {}}
    async with workspace(backend, params) as (tmpdir, schema):
        for conc in params["concs"]:
            async with engine_for(backend, tmpdir, f"c{conc}", conc=conc, schema=schema) as eng:
                ctxs = []
                for w in range(conc):
                    ctx = fs.StateCtx(current=fs.State(id=f"c{conc}-w{w}"))
                    await eng.do(fs.commit(fs.park(ctx)))  # creates the state
                    ctxs.append(ctx)

                def make(ctx: fs.StateCtx, eng: fs.Engine = eng) -> Any:
                    async def op() -> None:
                        await eng.do(fs.commit(fs.park(ctx)))

                    return op

                r = await timed_loop([make(c) for c in ctxs], params["duration"], params["warmup"])
                out["by_conc"][str(conc)] = r
    return out


async def contention(params: dict[str, Any]) -> dict[str, Any]:
    """16 workers on 4 states; on RevMismatchError reload the state and retry."""
    backend = params["backend"]
    workers, states = params.get("workers", 16), params.get("states", 4)
    async with (
        workspace(backend, params) as (tmpdir, schema),
        engine_for(backend, tmpdir, "cont", conc=workers, schema=schema) as eng,
    ):
        for s in range(states):
            await eng.do(fs.commit(fs.park(fs.StateCtx(current=fs.State(id=f"hot-{s}")))))
        ctxs = []
        for w in range(workers):
            ctx = fs.StateCtx()
            await eng.do(fs.get_state_by_id(ctx, f"hot-{w % states}"))
            ctxs.append(ctx)

        def make(ctx: fs.StateCtx) -> Any:
            sid = ctx.current.id

            async def op() -> int:
                try:
                    await eng.do(fs.commit(fs.park(ctx)))
                    ok = 1
                except fs.RevMismatchError:
                    await eng.do(fs.get_state_by_id(ctx, sid))
                    ok = 0
                # let the other workers in (memory commits never suspend on their own)
                await asyncio.sleep(0)
                return ok

            return op

        r = await timed_loop([make(c) for c in ctxs], params["duration"], params["warmup"])
    attempts = r["attempts"]
    r["conflict_rate"] = (attempts - r["ops"]) / attempts if attempts else float("nan")
    r["workers"], r["states"] = workers, states
    return r


# --------------------------------------------------------------------------------------------
# 3-step flows


async def flows(params: dict[str, Any]) -> dict[str, Any]:
    """N flows started with do(commit(transit)) then execute(), ``conc`` at a time."""
    backend, n = params["backend"], params["n"]
    out: dict[str, Any] = {"by_conc": {}, "n": n}
    async with workspace(backend, params) as (tmpdir, schema):
        for conc in params["concs"]:
            async with engine_for(backend, tmpdir, f"f{conc}", conc=conc, schema=schema) as eng:

                async def run(
                    prefix: str, count: int, eng: fs.Engine = eng, conc: int = conc
                ) -> float:
                    ids = iter(range(count))
                    ctxs: list[fs.StateCtx] = []

                    async def worker() -> None:
                        for i in ids:
                            ctx = fs.StateCtx(current=fs.State(id=f"{prefix}{i}"))
                            await eng.do(fs.commit(fs.transit(ctx, "s1")))
                            await eng.execute(ctx)
                            ctxs.append(ctx)

                    t0 = time.perf_counter()
                    await asyncio.gather(*(worker() for _ in range(conc)))
                    dt = time.perf_counter() - t0
                    bad = [c.current.id for c in ctxs if not fs.parked(c.current)]
                    if len(ctxs) != count or bad:
                        raise RuntimeError(
                            f"flows did not all finish: {len(ctxs)} ok, bad {bad[:3]}"
                        )
                    return dt

                await run(f"warm{conc}-", max(conc, n // 20))
                dt = await run(f"f{conc}-", n)
                out["by_conc"][str(conc)] = {
                    "seconds": dt,
                    "flows_per_s": n / dt,
                    "steps_per_s": 3 * n / dt,
                    "commits_per_s": 4 * n / dt,
                }
    return out


# --------------------------------------------------------------------------------------------
# physical limits


def _state_row(sid: str) -> tuple[Any, ...]:
    """The columns flowstate writes for a parked state without annotations or labels."""
    return (sid, int(time.time() * 1000), "{}", "{}", "", "{}")


async def raw_sqlite(params: dict[str, Any]) -> dict[str, Any]:
    """One writer, stdlib sqlite3 in a thread, WAL, the same synchronous setting and schema:
    per commit BEGIN IMMEDIATE, the rev-check SELECT, the INSERT, COMMIT."""
    from flowstate.drivers.sqlite import SCHEMA

    sync = "NORMAL" if params["backend"] == "sqlite-normal" else "FULL"
    duration, warmup = params["duration"], params["warmup"]

    def loop(path: str) -> dict[str, Any]:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.executescript(SCHEMA)
        sid, expected = "raw-1", 0
        insert = (
            "INSERT INTO flowstate_states (id, committed_at, annotations, labels, transition_to, "
            "transition_annotations) VALUES (?, ?, ?, ?, ?, ?)"
        )
        start = time.perf_counter() + warmup
        end = start + duration
        n = 0
        while True:
            t = time.perf_counter()
            if t >= end:
                break
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute(
                "SELECT max(rev) FROM flowstate_states WHERE id = ?", (sid,)
            ).fetchone()
            if (row[0] or 0) != expected:
                raise RuntimeError("raw sqlite: rev mismatch")
            cur = conn.execute(insert, _state_row(sid))
            conn.execute("COMMIT")
            expected = cur.lastrowid
            if t >= start:
                n += 1
        conn.close()
        return {"ops": n, "seconds": duration, "per_s": n / duration}

    with tempfile.TemporaryDirectory(prefix="fs-bench-raw-") as tmpdir:
        r = await asyncio.to_thread(loop, os.path.join(tmpdir, "raw.db"))
    return {"synchronous": sync, "by_conc": {"1": r}}


RAW_PG_SCHEMA = """
CREATE SEQUENCE raw_seq;
CREATE TABLE raw_latest (id text PRIMARY KEY, rev bigint NOT NULL);
CREATE TABLE raw_states (
    rev bigint PRIMARY KEY,
    id text NOT NULL,
    committed_at bigint NOT NULL,
    annotations jsonb NOT NULL,
    labels jsonb NOT NULL,
    transition_to text NOT NULL,
    transition_annotations jsonb NOT NULL
);
CREATE INDEX raw_states_by_id ON raw_states (id, rev);
CREATE INDEX raw_states_by_labels ON raw_states USING gin (labels jsonb_path_ops);
CREATE INDEX raw_states_by_time ON raw_states (committed_at);
"""

RAW_PG_COMMIT = """
WITH u AS (
    UPDATE raw_latest SET rev = nextval('raw_seq') WHERE id = $1 AND rev = $2 RETURNING id, rev
)
INSERT INTO raw_states (rev, id, committed_at, annotations, labels, transition_to,
                        transition_annotations)
SELECT u.rev, u.id, $3, $4::jsonb, $5::jsonb, $6, $7::jsonb FROM u
RETURNING rev
"""


RAW_PG_UPDATE = (
    "UPDATE raw_latest SET rev = nextval('raw_seq') WHERE id = $1 AND rev = $2 RETURNING rev"
)
RAW_PG_INSERT = """
INSERT INTO raw_states (rev, id, committed_at, annotations, labels, transition_to,
                        transition_annotations)
VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7::jsonb)
"""


async def raw_pg(params: dict[str, Any]) -> dict[str, Any]:
    """The same logical commit through asyncpg, one connection per worker, default durable
    settings: as ONE autocommit statement (rev check + update latest + insert the log row),
    ``by_conc``; and as BEGIN / UPDATE / INSERT / COMMIT round trips, ``by_conc_tx``."""
    import asyncpg

    out: dict[str, Any] = {"by_conc": {}, "by_conc_tx": {}}
    async with workspace("postgres", params) as (_tmpdir, schema):
        assert schema is not None
        conn = await asyncpg.connect(PG_DSN)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(f'SET search_path = "{schema}"')
            await conn.execute(RAW_PG_SCHEMA)
            out["settings"] = {
                k: await conn.fetchval(f"SHOW {k}")
                for k in ("synchronous_commit", "fsync", "wal_sync_method", "server_version")
            }
        finally:
            await conn.close()
        for conc in params["concs"]:
            conns = [
                await asyncpg.connect(PG_DSN, server_settings={"search_path": f'"{schema}"'})
                for _ in range(conc)
            ]
            try:
                ops, tx_ops = [], []
                for w, c in enumerate(conns):
                    sid, tx_sid = f"raw-c{conc}-w{w}", f"raw-tx-c{conc}-w{w}"
                    await c.execute("INSERT INTO raw_latest (id, rev) VALUES ($1, 0)", sid)
                    await c.execute("INSERT INTO raw_latest (id, rev) VALUES ($1, 0)", tx_sid)
                    ops.append(_raw_pg_op(await c.prepare(RAW_PG_COMMIT), sid))
                    tx_ops.append(
                        _raw_pg_tx_op(
                            c,
                            await c.prepare(RAW_PG_UPDATE),
                            await c.prepare(RAW_PG_INSERT),
                            tx_sid,
                        )
                    )
                out["by_conc"][str(conc)] = await timed_loop(
                    ops, params["duration"], params["warmup"]
                )
                out["by_conc_tx"][str(conc)] = await timed_loop(
                    tx_ops, params["duration"], params["warmup"]
                )
            finally:
                for c in conns:
                    await c.close()
    return out


def _raw_pg_op(stmt: Any, sid: str) -> Any:
    box = [0]

    async def op() -> None:
        row = _state_row(sid)
        rev = await stmt.fetchval(sid, box[0], *row[1:])
        if rev is None:
            raise RuntimeError("raw pg: rev mismatch")
        box[0] = rev

    return op


def _raw_pg_tx_op(conn: Any, update: Any, insert: Any, sid: str) -> Any:
    box = [0]

    async def op() -> None:
        row = _state_row(sid)
        async with conn.transaction():  # BEGIN ... COMMIT: four round trips in all
            rev = await update.fetchval(sid, box[0])
            if rev is None:
                raise RuntimeError("raw pg (tx): rev mismatch")
            await insert.fetchval(rev, sid, *row[1:])
        box[0] = rev

    return op


async def floor(params: dict[str, Any]) -> dict[str, Any]:
    """The pure-Python floor: dict compare-and-set + counter + copy + list append under an
    asyncio.Lock, one state per worker."""
    out: dict[str, Any] = {"by_conc": {}}
    for conc in params["concs"]:
        lock = asyncio.Lock()
        latest: dict[str, dict[str, Any]] = {}
        log: list[dict[str, Any]] = []
        counter = [0]
        template = {"id": "", "rev": 0, "annotations": {}, "labels": {}, "to": ""}

        def make(
            sid: str,
            lock: asyncio.Lock = lock,
            latest: Any = latest,
            log: Any = log,
            counter: list[int] = counter,
            template: dict[str, Any] = template,
        ) -> Any:
            mine = dict(template, id=sid)

            async def op() -> None:
                async with lock:
                    cur = latest.get(sid)
                    if (cur["rev"] if cur is not None else 0) != mine["rev"]:
                        raise RuntimeError("floor: rev mismatch")
                    counter[0] += 1
                    stored = dict(mine)
                    stored["rev"] = counter[0]
                    log.append(stored)
                    latest[sid] = stored
                    mine["rev"] = counter[0]

            return op

        ops = [make(f"floor-{conc}-{w}") for w in range(conc)]
        out["by_conc"][str(conc)] = await timed_loop(ops, params["duration"], params["warmup"])
    return out


# --------------------------------------------------------------------------------------------
# watch latency


async def watch(params: dict[str, Any]) -> dict[str, Any]:
    """In-process: commit -> a watcher of the same engine receives it, one commit every gap."""
    backend, m, gap = params["backend"], params["m"], params["gap"]
    async with (
        workspace(backend, params) as (tmpdir, schema),
        engine_for(backend, tmpdir, "watch", schema=schema) as eng,
    ):
        sent: dict[int, tuple[float, float]] = {}
        recv: dict[int, float] = {}
        ready = asyncio.Event()

        async def consume() -> None:
            async with eng.watch(fs.get_states({"bench": "watch"})) as w:
                ready.set()
                async for s in w:
                    recv[int(s.annotations["i"])] = time.perf_counter()
                    if len(recv) >= m:
                        return

        task = asyncio.create_task(consume())
        await ready.wait()
        await asyncio.sleep(0.05)
        ctx = fs.StateCtx(current=fs.State(id="watched", labels={"bench": "watch"}))
        for i in range(m):
            ctx.current.annotations["i"] = str(i)
            t0 = time.perf_counter()
            await eng.do(fs.commit(fs.park(ctx)))
            sent[i] = (t0, time.perf_counter())
            await asyncio.sleep(gap)
        await asyncio.wait_for(task, 30)
    return _latencies(sent, recv, m)


def _latencies(
    sent: dict[int, tuple[float, float]], recv: dict[int, float], m: int
) -> dict[str, Any]:
    from_call = [(recv[i] - sent[i][0]) * 1000 for i in sent if i in recv]
    from_return = [(recv[i] - sent[i][1]) * 1000 for i in sent if i in recv]
    return {
        "m": m,
        "received": len(recv),
        "p50_ms": percentile(from_call, 50),
        "p99_ms": percentile(from_call, 99),
        "max_ms": max(from_call) if from_call else float("nan"),
        "from_return_p50_ms": percentile(from_return, 50),
        "from_return_p99_ms": percentile(from_return, 99),
    }


async def watch_xproc(params: dict[str, Any]) -> dict[str, Any]:
    """Across processes on PostgreSQL: a child process commits (wall-clock timestamp taken just
    before each commit call, and just after it returns), this process watches."""
    m, gap = params["m"], params["gap"]
    async with (
        workspace("postgres", params) as (tmpdir, schema),
        engine_for("postgres", tmpdir, "wx", schema=schema) as eng,
    ):
        recv: dict[int, float] = {}
        ready = asyncio.Event()

        async def consume() -> None:
            async with eng.watch(fs.get_states({"bench": "xwatch"})) as w:
                ready.set()
                async for s in w:
                    recv[int(s.annotations["i"])] = time.time()
                    if len(recv) >= m:
                        return

        task = asyncio.create_task(consume())
        await ready.wait()
        await asyncio.sleep(0.1)
        child = {"scenario": "watch_committer", "schema": schema, "m": m, "gap": gap}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.child",
            json.dumps(child),
            stdout=asyncio.subprocess.PIPE,
            env=dict(os.environ),
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 120)
        if proc.returncode != 0:
            raise RuntimeError(f"committer process exited {proc.returncode}")
        line = [x for x in stdout.decode().splitlines() if x.startswith("RESULT:")][-1]
        sent_raw = json.loads(line[len("RESULT:") :])["sent"]
        await asyncio.wait_for(task, 30)
    sent = {int(i): (t0, t1) for i, (t0, t1) in sent_raw.items()}
    return _latencies(sent, recv, m)


async def watch_committer(params: dict[str, Any]) -> dict[str, Any]:
    """The committing side of :func:`watch_xproc` (run in its own process)."""
    driver = fs.PostgresDriver(PG_DSN, schema=params["schema"])
    sent: dict[str, tuple[float, float]] = {}
    async with fs.Engine(driver) as eng:
        ctx = fs.StateCtx(current=fs.State(id="xwatched", labels={"bench": "xwatch"}))
        for i in range(params["m"]):
            ctx.current.annotations["i"] = str(i)
            t0 = time.time()
            await eng.do(fs.commit(fs.park(ctx)))
            sent[str(i)] = (t0, time.time())
            await asyncio.sleep(params["gap"])
    return {"sent": sent}


# --------------------------------------------------------------------------------------------
# idle watchers


async def watchers(params: dict[str, Any]) -> dict[str, Any]:
    """Memory per idle watcher (RSS delta over ``count`` watchers waiting at the head), then
    the fan-out: one commit, how long until every watcher has it."""
    backend, count = params["backend"], params["count"]
    async with (
        workspace(backend, params) as (tmpdir, schema),
        engine_for(backend, tmpdir, "watchers", conc=1, schema=schema) as eng,
    ):
        await eng.do(fs.commit(fs.park(fs.StateCtx(current=fs.State(id="other")))))
        got: list[float] = []
        waiting = 0
        gc.collect()
        await asyncio.sleep(0.05)
        rss0 = current_rss_bytes()

        async def idle(w: fs.Watcher) -> None:
            nonlocal waiting
            waiting += 1
            async for _ in w:
                got.append(time.perf_counter())
                return

        ws = [eng.watch(fs.get_states({"bench": "fanout"})) for _ in range(count)]
        tasks = [asyncio.create_task(idle(w)) for w in ws]
        # let every watcher make its first query and settle at the head
        prev, t_settle = -1, time.perf_counter()
        while time.perf_counter() - t_settle < 20:
            await asyncio.sleep(0.2)
            rss = current_rss_bytes()
            if rss == prev and waiting == count:
                break
            prev = rss
        gc.collect()
        rss1 = current_rss_bytes()
        t0 = time.perf_counter()
        ctx = fs.StateCtx(current=fs.State(id="fan", labels={"bench": "fanout"}))
        await eng.do(fs.commit(fs.park(ctx)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        lat = [(t - t0) * 1000 for t in got]
        for w in ws:
            w.close()
    return {
        "count": count,
        "rss_delta_bytes": rss1 - rss0,
        "bytes_per_watcher": (rss1 - rss0) / count,
        "fanout_received": len(got),
        "fanout_p50_ms": percentile(lat, 50),
        "fanout_p99_ms": percentile(lat, 99),
        "fanout_all_ms": max(lat) if lat else float("nan"),
    }


# --------------------------------------------------------------------------------------------
# delay lateness


async def delay(params: dict[str, Any]) -> dict[str, Any]:
    """Delayed states fire on time: ``per_second`` states due at each of ``seconds`` whole
    seconds (the stored execute_at has second precision), the delayer polling every
    ``interval`` s. Lateness = when the flow starts running - execute_at, on the wall clock."""
    backend, per_s, seconds = params["backend"], params["per_second"], params["seconds"]
    total = per_s * seconds
    late: list[float] = []
    done = asyncio.Event()
    registry = fs.FlowRegistry()

    @registry.flow("fire")
    async def fire(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        late.append(time.time() - float(ctx.current.annotations["bench.due"]))
        if len(late) == total:
            done.set()
        return fs.commit(fs.park(ctx))

    async with workspace(backend, params) as (tmpdir, schema):
        driver = driver_for(backend, tmpdir, "delay", conc=4, schema=schema)
        eng = fs.Engine(driver, registry)
        assert eng.delayer is not None
        eng.delayer.interval = params["interval"]
        async with eng:
            first = math.ceil(time.time() + params.get("lead", 1.0))
            schedule = []
            for k in range(seconds):
                for j in range(per_s):
                    ctx = fs.StateCtx(current=fs.State(id=f"d{k}-{j}"))
                    ctx.current.annotations["bench.due"] = str(first + k)
                    schedule.append(fs.delay_until(ctx, "fire", _utc(first + k)))
            t0 = time.time()
            for i in range(0, len(schedule), 50):
                await eng.do(*schedule[i : i + 50])
            scheduled_in = time.time() - t0
            if time.time() >= first:
                raise RuntimeError(f"scheduling took {scheduled_in:.2f} s: past the first due time")
            await asyncio.wait_for(done.wait(), seconds + 60)
            stats = eng.delayer.stats()
    ms = [x * 1000 for x in late]
    return {
        "count": total,
        "fired": len(late),
        "interval_s": params["interval"],
        "per_second": per_s,
        "seconds": seconds,
        "scheduled_in_s": scheduled_in,
        "early": sum(1 for x in ms if x < 0),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms) if ms else float("nan"),
        "min_ms": min(ms) if ms else float("nan"),
        "delayer": {"completed": stats.completed, "dropped": stats.dropped},
    }


def _utc(epoch: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch, UTC)


# --------------------------------------------------------------------------------------------
# recovery time


class _PastClock:
    """The wall clock, ``behind`` seconds ago: commits made with it look that old."""

    def __init__(self, behind: float) -> None:
        from datetime import timedelta

        self._behind = timedelta(seconds=behind)

    def now(self) -> Any:
        from datetime import UTC, datetime

        return datetime.now(UTC) - self._behind

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def recovery(params: dict[str, Any]) -> dict[str, Any]:
    """Recovery time of ``n`` stalled states.

    Phase 1 (no recoverer): ``n`` states are committed in transition to flow ``stalled`` and
    never executed, as by a process that crashed. Their retry_after is the minimum (1 min),
    and they are committed with a clock ``retry_after + 2`` s behind the wall clock, so they
    are already due when phase 2 starts (the alternative is sleeping a minute).
    Phase 2: a new engine (new driver on the same store, real clock, recoverer polling every
    ``interval`` s) starts; the time from its start until every state's flow has committed
    ``park`` is the recovery time.
    """
    backend, n, batch = params["backend"], params["n"], params.get("batch", 100)
    done = asyncio.Event()
    finished = [0]
    registry = fs.FlowRegistry()

    @registry.flow("stalled")
    async def stalled(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        await engine.do(fs.commit(fs.park(ctx)))
        finished[0] += 1
        if finished[0] == n:
            done.set()
        return fs.noop()

    async with workspace(backend, params) as (tmpdir, schema):
        clock = _PastClock(fs.recovery.MIN_RETRY_AFTER.total_seconds() + 2)
        # the store stamps committed_at with its driver's clock, and recovery runs in that
        # log time: the driver of phase 1 runs behind too
        driver = driver_for(backend, tmpdir, "recovery", schema=schema, clock=clock)
        t0 = time.perf_counter()
        async with fs.Engine(driver, registry, recovery=False, delayer=False, clock=clock) as e1:
            for i in range(0, n, batch):
                cmds: list[fs.Command] = []
                for j in range(i, min(n, i + batch)):
                    ctx = fs.StateCtx(current=fs.State(id=f"stalled-{j}"))
                    fs.recovery.set_retry_after(ctx, 1)  # clamped to the 1 min minimum
                    cmds.append(fs.transit(ctx, "stalled"))
                await e1.do(fs.commit(*cmds))
        committed_in = time.perf_counter() - t0

        if backend != "memory":  # a fresh driver: like a new process on the same store
            driver = driver_for(backend, tmpdir, "recovery", conc=10, schema=schema)
        else:  # the same store (it lives in the driver), stamped by the real clock from now
            driver.clock = fs.SystemClock()
        eng = fs.Engine(driver, registry, delayer=False, clock=fs.SystemClock())
        assert eng.recoverer is not None
        eng.recoverer.interval = params["interval"]
        t1 = time.perf_counter()
        async with eng:
            # past the timeout the target is missed anyway: report how far it got
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), params.get("timeout", 300))
            elapsed = time.perf_counter() - t1
            stats = eng.recoverer.stats()
    return {
        "n": n,
        "interval_s": params["interval"],
        "phase1_commit_s": committed_in,
        "seconds": elapsed,
        "states_per_s": finished[0] / elapsed,
        "completed": finished[0],
        "timed_out": finished[0] < n,
        "recoverer": {"retried": stats.retried, "dropped": stats.dropped, "added": stats.added},
    }
