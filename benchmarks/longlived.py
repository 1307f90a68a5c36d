"""Long-lived stores, idle filtered watchers, fan-out and the measurement hooks (issue 13).

A scenario that starts on an empty store cannot show work that grows with the log. Here every
driver is measured on a store that already holds ``size`` revisions (100k and 1M in the full
run), each figure beside the same measurement on a fresh store taken right before or after it
(the order alternates per repetition), so a ratio of the two is the verdict:

* ``commit``: ``engine.do(fs.commit(fs.park(ctx)))`` at one worker (and 16 on the network
  driver: the server's commit rate);
* ``filtered``: the same at one worker while 100 watchers wait on labels that never match;
* ``watch``: commit -> a watcher of the same engine receives it, one commit every ``gap``.

The stores are filled through the public API with multi-state commits (``fs.commit`` of 1,000
``fs.park`` on distinct ids; 5,000 over the network), once per backend per run: SQLite files
are built by :func:`build_sqlite` (each size a copy of the smaller one, extended) and copied
by every run that uses them; PostgreSQL schemas are built by :func:`build_pg`, one per size,
kept for the run (the orchestrator drops them at the end); the memory store is built inside
the measuring process (:func:`longlived`), and so is the network driver's server
(``flowstate serve --store memory://`` in a process of its own, filled by this client).

A measured window ends after ``duration`` seconds or ``cap`` commits (2 % of the size, at
least ``cap_min``), whichever comes first, so the store stays near its nominal size; the
revisions actually held are reported. A fill that does not finish within ``budget`` seconds
stops where it got (the slowness is itself the finding) and the figures say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

import flowstate as fs
from benchmarks.common import PG_DSN, capped_loop, percentile, pg_drop_schema, process_cpu_s

FILL_BATCH = 1000
NET_FILL_BATCH = 5000


# --------------------------------------------------------------------------------------------
# filling a store


def _fill_cmds(start: int, end: int) -> list[fs.Command]:
    return [
        fs.park(
            fs.StateCtx(
                current=fs.State(
                    id=f"fill-{j}",
                    labels={"fill": "yes", "group": f"g{j % 100}"},
                    annotations={"n": str(j)},
                )
            )
        )
        for j in range(start, end)
    ]


async def fill(
    eng: fs.Engine, start: int, end: int, batch: int, deadline: float | None = None
) -> int:
    """Commit revisions ``start`` .. ``end`` (states ``fill-<n>``), ``batch`` per commit;
    stops early past ``deadline`` (perf_counter). Returns how far it got."""
    i = start
    while i < end:
        if deadline is not None and time.perf_counter() > deadline:
            break
        j = min(end, i + batch)
        try:
            await eng.do(fs.commit(*_fill_cmds(i, j)))
        except (fs.StoreUnavailableError, fs.CommitUnknownError):
            break  # a store too slow to take more: measure what it holds (reported partial)
        i = j
    return i


@contextlib.asynccontextmanager
async def _engine(driver: fs.Driver) -> AsyncIterator[fs.Engine]:
    """An engine as users run it (recoverer and delayer on)."""
    eng = fs.Engine(driver, fs.FlowRegistry())
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def _sqlite_driver(backend: str, path: str) -> fs.SqliteDriver:
    return fs.SqliteDriver(path, synchronous="FULL" if backend == "sqlite-full" else "NORMAL")


def _copy_sqlite(src: str, dst: str) -> None:
    for suffix in ("", "-wal"):
        if os.path.exists(src + suffix):
            shutil.copyfile(src + suffix, dst + suffix)


async def build_sqlite(params: dict[str, Any]) -> dict[str, Any]:
    """One SQLite file per size in ``params['dir']``, each a copy of the previous one, extended."""
    built: dict[str, Any] = {}
    prev_path, prev_n = None, 0
    deadline = time.perf_counter() + params["budget"]
    for size in sorted(s for s in params["sizes"] if s > 0):
        path = os.path.join(params["dir"], f"ll-{size}.db")
        t0 = time.perf_counter()
        if prev_path is not None:
            _copy_sqlite(prev_path, path)
        async with _engine(fs.SqliteDriver(path, synchronous="OFF")) as eng:
            got = await fill(eng, prev_n, size, params.get("batch", FILL_BATCH), deadline)
        built[str(size)] = {"path": path, "revisions": got, "seconds": time.perf_counter() - t0}
        prev_path, prev_n = path, got
    return {"built": built}


async def build_pg(params: dict[str, Any]) -> dict[str, Any]:
    """One PostgreSQL schema per size (``<prefix>ll_<size>``), kept until the run ends."""
    built: dict[str, Any] = {}
    deadline = time.perf_counter() + params["budget"]
    for size in sorted(s for s in params["sizes"] if s > 0):
        schema = f"{params['schema_prefix']}ll_{size}"
        await pg_drop_schema(schema)
        t0 = time.perf_counter()
        async with _engine(fs.PostgresDriver(PG_DSN, schema=schema)) as eng:
            got = await fill(eng, 0, size, params.get("batch", FILL_BATCH), deadline)
        built[str(size)] = {
            "schema": schema,
            "revisions": got,
            "seconds": time.perf_counter() - t0,
        }
    return {"built": built}


# --------------------------------------------------------------------------------------------
# servers


class _Server:
    """``flowstate serve --store memory://`` in a process of its own."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        code = "from flowstate.cli import main; main()"
        args = ["serve", "--store", "memory://", "--addr", f"127.0.0.1:{port}"]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_up(self) -> None:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient() as client:
            while True:
                try:
                    if (await client.get(self.url + "/health", timeout=1)).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"flowstate serve did not come up on {self.url}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------------------------
# the stores of one backend


class _Stores:
    """The long-lived store of each size and fresh reference stores, for one backend."""

    def __init__(self, backend: str, params: dict[str, Any], tmpdir: str) -> None:
        self.backend = backend
        self.params = params
        self.tmpdir = tmpdir
        self.built: dict[str, Any] = params.get("built") or {}
        self.deadline = time.perf_counter() + params["budget"]
        self.n_fresh = 0
        self.schemas: list[str] = []
        # memory and network: one store grown from size to size
        self.grown = 0
        self.grown_eng: fs.Engine | None = None
        self.grown_server: _Server | None = None
        self.grown_stack = contextlib.AsyncExitStack()

    async def close(self) -> None:
        await self.grown_stack.aclose()
        if self.grown_server is not None:
            self.grown_server.stop()
        for schema in self.schemas:
            await pg_drop_schema(schema)

    async def _grow(self, size: int) -> tuple[fs.Engine, float]:
        """Memory and network: the one store, filled up to ``size`` (as far as the budget
        lets); returns the engine and the seconds the fill took."""
        if self.grown_eng is None:
            if self.backend == "net":
                self.grown_server = _Server()
                await self.grown_server.wait_up()
                driver: fs.Driver = fs.NetDriver(self.grown_server.url)
            else:
                driver = fs.MemoryDriver()
            self.grown_eng = await self.grown_stack.enter_async_context(_engine(driver))
        batch = NET_FILL_BATCH if self.backend == "net" else FILL_BATCH
        t0 = time.perf_counter()
        self.grown = await fill(self.grown_eng, self.grown, size, batch, self.deadline)
        return self.grown_eng, time.perf_counter() - t0

    @contextlib.asynccontextmanager
    async def sized(self, size: int) -> AsyncIterator[tuple[fs.Engine, list[int], dict[str, Any]]]:
        """The store holding ``size`` revisions: (engine, pids of server processes, info)."""
        b = self.backend
        info: dict[str, Any] = {"size": size}
        if b in ("memory", "net"):
            eng, secs = await self._grow(size)
            info.update(revisions=self.grown, fill_s=secs)
            pids = [self.grown_server.proc.pid] if self.grown_server is not None else []
            yield eng, pids, info
            return
        if size == 0:
            async with self.fresh() as (eng, pids):
                info.update(revisions=0, fill_s=0.0)
                yield eng, pids, info
            return
        got = self.built.get(str(size))
        t0 = time.perf_counter()
        if b.startswith("sqlite"):
            path = os.path.join(self.tmpdir, f"ll-{size}.db")
            if got is not None:
                _copy_sqlite(got["path"], path)
                revs = got["revisions"]
                info["fill_s"] = got["seconds"]
            driver: fs.Driver = _sqlite_driver(b, path)
        else:
            if got is not None:
                schema = got["schema"]
                revs = got["revisions"]
                info["fill_s"] = got["seconds"]
            else:
                schema = f"{self.params['schema_prefix']}{self.params['job']}_ll{size}"
                self.schemas.append(schema)
                await pg_drop_schema(schema)
            driver = fs.PostgresDriver(PG_DSN, schema=schema, max_size=16)
        async with _engine(driver) as eng:
            if got is None:  # not built by the orchestrator (e.g. a direct call): fill here
                revs = await fill(eng, 0, size, FILL_BATCH, self.deadline)
                info["fill_s"] = time.perf_counter() - t0
            info["revisions"] = revs
            yield eng, [], info

    @contextlib.asynccontextmanager
    async def fresh(self) -> AsyncIterator[tuple[fs.Engine, list[int]]]:
        """A new, empty store of this backend."""
        self.n_fresh += 1
        k, b = self.n_fresh, self.backend
        if b == "memory":
            async with _engine(fs.MemoryDriver()) as eng:
                yield eng, []
        elif b.startswith("sqlite"):
            async with _engine(_sqlite_driver(b, os.path.join(self.tmpdir, f"ref{k}.db"))) as eng:
                yield eng, []
        elif b == "postgres":
            schema = f"{self.params['schema_prefix']}{self.params['job']}_ref{k}"
            await pg_drop_schema(schema)
            try:
                async with _engine(fs.PostgresDriver(PG_DSN, schema=schema, max_size=16)) as eng:
                    yield eng, []
            finally:
                await pg_drop_schema(schema)
        elif b == "net":
            server = _Server()
            try:
                await server.wait_up()
                async with _engine(fs.NetDriver(server.url)) as eng:
                    yield eng, [server.proc.pid]
            finally:
                server.stop()
        else:
            raise ValueError(f"unknown backend {b}")


# --------------------------------------------------------------------------------------------
# measurements on one engine


async def _settle(
    pids: list[int], min_s: float = 0.3, max_s: float = 30.0, window: float = 0.1
) -> float:
    """Wait until this process and ``pids`` are (nearly) idle: three ``window`` s windows
    under 20 % of one CPU, at most ``max_s``. Returns the seconds waited."""
    t_start = time.perf_counter()
    await asyncio.sleep(min_s)
    calm = 0

    def cpu() -> float:
        return process_cpu_s() + sum(process_cpu_s(p) for p in pids)

    while time.perf_counter() - t_start < max_s and calm < 3:
        c0, t0 = cpu(), time.perf_counter()
        await asyncio.sleep(window)
        busy = (cpu() - c0) / max(time.perf_counter() - t0, 1e-6)
        calm = calm + 1 if busy < 0.2 else 0
    return time.perf_counter() - t_start


def _committer(eng: fs.Engine, sid: str, counter: list[int]) -> Callable[[], Awaitable[None]]:
    ctx = fs.StateCtx(current=fs.State(id=sid))

    async def op() -> None:
        await eng.do(fs.commit(fs.park(ctx)))
        counter[0] += 1
        # a worker that never suspends (a memory commit does not) would starve every other
        # task, the watchers too: a real one awaits something between two commits
        await asyncio.sleep(0)

    return op


async def _bounded(
    coro: Awaitable[dict[str, float]], limit: float, counter: list[int], t0: float
) -> dict[str, float]:
    """``coro`` (a capped loop), or after ``limit`` seconds what it got so far."""
    task = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({task}, timeout=limit)
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(task, 30)
    secs = time.perf_counter() - t0
    return {"ops": float(counter[0]), "seconds": secs, "per_s": counter[0] / secs, "stalled": 1.0}


async def measure_commit(
    eng: fs.Engine, tag: str, conc: int, cfg: dict[str, Any], cap: int | None
) -> dict[str, float]:
    counter = [0]
    ops = [_committer(eng, f"{tag}-c{conc}-w{w}", counter) for w in range(conc)]
    for op in ops:
        await op()  # creates the states
    counter[0] = 0
    t0 = time.perf_counter()
    loop = capped_loop(ops, cfg["duration"], cfg["warmup"], cap)
    r = await _bounded(loop, cfg["duration"] + cfg["warmup"] + cfg["stall_s"], counter, t0)
    r["committed"] = float(counter[0] + conc)  # warm-up and creation included
    return r


async def measure_filtered(
    eng: fs.Engine, tag: str, cfg: dict[str, Any], cap: int | None, pids: list[int]
) -> dict[str, float]:
    """Commits/s of one worker while ``cfg['idle']`` watchers wait on labels no state has."""
    ws = [eng.watch(fs.get_states({"bench.never": f"{tag}-{k}"})) for k in range(cfg["idle"])]

    async def drain(w: fs.Watcher) -> None:
        async for _ in w:
            raise RuntimeError("an idle filtered watcher received a state")

    tasks = [asyncio.create_task(drain(w)) for w in ws]
    try:
        settle_s = await _settle(pids, cfg["settle_s"], cfg["stall_s"], cfg["settle_s"] / 3)
        t0 = time.perf_counter()
        r: dict[str, Any]
        try:
            r = await measure_commit(eng, f"{tag}-f", 1, cfg, cap)
        except (fs.StoreUnavailableError, fs.CommitUnknownError) as exc:  # a store too slow
            secs = time.perf_counter() - t0
            r = {"ops": 0.0, "seconds": secs, "per_s": 0.0, "committed": 0.0}
            r["error"] = f"a commit failed after {secs:.1f} s: {exc}"[:300]
        r["settle_s"] = settle_s
    finally:
        for w in ws:
            w.close()
        _, pending = await asyncio.wait(tasks, timeout=30)
        for t in pending:
            t.cancel()
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return r


async def measure_watch(eng: fs.Engine, tag: str, m: int, gap: float) -> dict[str, float]:
    """Commit -> a watcher of the same engine receives it: p50/p99 ms from the commit call."""
    label = {"bench.watch": tag}
    sent: dict[int, float] = {}
    recv: dict[int, float] = {}
    first = asyncio.Event()

    async def consume() -> None:
        async with eng.watch(fs.get_states(label)) as w:
            async for s in w:
                i = int(s.annotations["i"])
                if i < 0:
                    first.set()
                    continue
                recv[i] = time.perf_counter()
                if len(recv) >= m:
                    return

    task = asyncio.create_task(consume())
    try:
        ctx = fs.StateCtx(current=fs.State(id=f"{tag}-watched", labels=label))
        ctx.current.annotations["i"] = "-1"
        await eng.do(fs.commit(fs.park(ctx)))
        await asyncio.wait_for(first.wait(), 120)  # the watcher is at the head
        for i in range(m):
            ctx.current.annotations["i"] = str(i)
            sent[i] = time.perf_counter()
            await eng.do(fs.commit(fs.park(ctx)))
            await asyncio.sleep(gap)
        await asyncio.wait_for(task, 60)
    finally:
        task.cancel()
    lat = [(recv[i] - sent[i]) * 1000 for i in sent if i in recv]
    return {
        "m": m,
        "received": len(recv),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
    }


async def _measure_all(
    eng: fs.Engine,
    tag: str,
    cfg: dict[str, Any],
    cap: int | None,
    pids: list[int],
    what: list[str],
    skip_filtered: str | None,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "commit" in what:
        out["commit"] = {}
        for c in cfg["concs"]:
            t0 = time.perf_counter()
            try:
                out["commit"][str(c)] = await measure_commit(eng, f"{tag}-k", c, cfg, cap)
            except (fs.StoreUnavailableError, fs.CommitUnknownError) as exc:
                secs = time.perf_counter() - t0
                out["commit"][str(c)] = {
                    "ops": 0.0,
                    "seconds": secs,
                    "per_s": 0.0,
                    "committed": 0.0,
                    "error": f"a commit failed after {secs:.1f} s: {exc}"[:300],
                }
    if "filtered" in what:
        if skip_filtered:
            out["filtered_skipped"] = skip_filtered
        else:
            out["filtered"] = await measure_filtered(eng, f"{tag}-i", cfg, cap, pids)
    if "watch" in what:
        try:
            out["watch"] = await measure_watch(eng, f"{tag}-w", cfg["watch_m"], cfg["watch_gap"])
        except (TimeoutError, fs.StoreUnavailableError, fs.CommitUnknownError) as exc:
            out["watch_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


# --------------------------------------------------------------------------------------------
# the scenario


async def longlived(params: dict[str, Any]) -> dict[str, Any]:
    """Every size of ``params['sizes']`` in turn (ascending), ``reps`` repetitions each; at a
    size above 0 each repetition measures a fresh store too (alternately before and after);
    size 0 is a new empty store in every repetition."""
    backend = params["backend"]
    cfg = {
        "duration": params["duration"],
        "warmup": params["warmup"],
        "stall_s": params.get("stall_s", 30.0),
        "settle_s": params.get("settle_s", 0.3),
        "idle": params.get("idle", 100),
        "watch_m": params.get("watch_m", 100),
        "watch_gap": params.get("watch_gap", 0.002),
        "concs": [1, 16] if backend == "net" else [1],
    }
    what = params.get("what", ["commit", "filtered", "watch"])
    reps = params.get("reps", 1)
    out: dict[str, Any] = {"sizes": {}, "concs": cfg["concs"], "idle": cfg["idle"]}
    skip_filtered: str | None = None
    with tempfile.TemporaryDirectory(prefix="fs-bench-ll-") as tmpdir:
        stores = _Stores(backend, params, tmpdir)
        try:
            for size in sorted(params["sizes"]):
                cap = max(params.get("cap_min", 5000), int(size * params.get("cap_frac", 0.02)))
                per_size: dict[str, Any] = {"reps": []}
                out["sizes"][str(size)] = per_size
                if size == 0:  # a new empty store for every repetition
                    per_size.update(size=0, revisions=0, fill_s=0.0)
                    for rep in range(reps):
                        async with stores.fresh() as (feng, fpids):
                            row0 = {"revisions_before": 0}
                            row0.update(
                                await _measure_all(feng, f"s0r{rep}", cfg, cap, fpids, what, None)
                            )
                        per_size["reps"].append(row0)
                    continue
                async with stores.sized(size) as (eng, pids, info):
                    per_size.update(info)
                    if info["revisions"] < size:
                        per_size["partial"] = (
                            f"the fill reached {info['revisions']:,} of {size:,} revisions "
                            f"in the {params['budget']:.0f} s budget"
                        )
                    added = 0  # what this size's windows committed so far
                    for rep in range(reps):
                        tag = f"s{size}r{rep}"
                        row: dict[str, Any] = {"revisions_before": info["revisions"] + added}

                        async def ref(
                            tag: str = tag, row: dict[str, Any] = row, cap: int = cap
                        ) -> None:
                            async with stores.fresh() as (reng, rpids):
                                row["ref"] = await _measure_all(
                                    reng, tag + "ref", cfg, cap, rpids, what, None
                                )

                        if size > 0 and rep % 2 == 0:
                            await ref()
                        row.update(
                            await _measure_all(eng, tag, cfg, cap, pids, what, skip_filtered)
                        )
                        if size > 0 and rep % 2 == 1:
                            await ref()
                        per_size["reps"].append(row)
                        added += _ops({k: v for k, v in row.items() if k != "ref"})
                        f = row.get("filtered")
                        if f and f.get("stalled"):
                            # one window took longer than stall_s: the O(n) is shown; more
                            # windows at this size or above would only take minutes each
                            skip_filtered = (
                                f"collapsed at {size:,} revisions "
                                f"({f['per_s']:.2f} commits/s): not repeated"
                            )
                    if backend in ("memory", "net"):  # the next size grows from here
                        stores.grown += added
        finally:
            await stores.close()
    return out


def _ops(row: dict[str, Any]) -> int:
    """How many revisions a repetition's windows committed."""
    n = sum(int(v["committed"]) for v in row.get("commit", {}).values())
    if "filtered" in row:
        n += int(row["filtered"]["committed"])
    if "watch" in row:
        n += row["watch"]["m"] + 1
    return n


# --------------------------------------------------------------------------------------------
# fan-out


async def fanout(params: dict[str, Any]) -> dict[str, Any]:
    """``count`` idle watchers that all match; ``commits`` commits one after the other; for
    each, the time from the commit call until the last watcher has it. p99 over the commits."""
    from benchmarks.scenarios import driver_for, workspace

    backend, count, commits = params["backend"], params["count"], params["commits"]
    label = {"bench": "fanout"}
    got: dict[int, list[float]] = {}
    async with workspace(backend, params) as (tmpdir, schema):
        driver = driver_for(backend, tmpdir, "fanout", conc=1, schema=schema)
        async with _engine(driver) as eng:
            ctx = fs.StateCtx(current=fs.State(id="fan", labels=label))

            async def idle(w: fs.Watcher) -> None:
                async for s in w:
                    got.setdefault(int(s.annotations["i"]), []).append(time.perf_counter())

            ws = [eng.watch(fs.get_states(label)) for _ in range(count)]
            tasks = [asyncio.create_task(idle(w)) for w in ws]
            last: list[float] = []
            every: list[float] = []
            errors: list[str] = []
            complete = 0
            try:
                for i in range(-1, commits):  # -1: every watcher reaches the head first
                    ctx.current.annotations["i"] = str(i)
                    t0 = time.perf_counter()
                    try:
                        await eng.do(fs.commit(fs.park(ctx)))
                    except fs.StoreUnavailableError as exc:  # e.g. no pooled connection left
                        errors.append(f"commit {i}: {exc}"[:200])
                        break  # each further one would wait as long
                    deadline = t0 + (60 if i < 0 else 10)
                    while len(got.get(i, ())) < count and time.perf_counter() < deadline:
                        await asyncio.sleep(0.0005)
                    times = got.get(i, [])
                    if len(times) < count:
                        errors.append(f"commit {i}: {len(times)} of {count} watchers got it")
                        if i < 0 or len(errors) >= 2:
                            break  # more commits would each wait as long: enough shown
                    if i >= 0:
                        complete += len(times) == count
                        if times:
                            last.append((max(times) - t0) * 1000)
                            every += [(t - t0) * 1000 for t in times]
                    await asyncio.sleep(params.get("gap", 0.05))
            finally:
                for w in ws:
                    w.close()
                _, pending = await asyncio.wait(tasks, timeout=30)
                for t in pending:
                    t.cancel()
    return {
        "count": count,
        "commits": commits,
        "complete": complete,
        "last_p50_ms": percentile(last, 50),
        "last_p99_ms": percentile(last, 99),
        "last_max_ms": max(last) if last else float("nan"),
        "each_p50_ms": percentile(every, 50),
        "each_p99_ms": percentile(every, 99),
        "problems": len(errors),
        "errors": errors[:3],
    }


# --------------------------------------------------------------------------------------------
# other helpers' measurement modules


def hook(params: dict[str, Any]) -> dict[str, Any]:
    """Call ``benchmarks.<module>.measure(**kwargs)`` if that module exists (synchronously:
    some run their own event loop); a coroutine it returns is run to completion."""
    import importlib
    import inspect

    name = f"benchmarks.{params['module']}"
    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        return {"skipped": f"{name} does not exist yet"}
    fn = getattr(mod, "measure", None)
    if fn is None:
        return {"skipped": f"{name} has no measure()"}
    result = fn(**params.get("kwargs", {}))
    if inspect.isawaitable(result):
        result = asyncio.run(_await(result))
    return {"measured": result}


async def _await(aw: Awaitable[Any]) -> Any:
    return await aw
