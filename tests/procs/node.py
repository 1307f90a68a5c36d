"""One process of a flowstate cluster, for the fault tests (tests/test_faults.py).

Usage: node.py STORE_URL CLOCK_FILE STATUS_FILE LOG_FILE MODE NAME [SEED]

Runs an engine with the recoverer and the delayer on the shared store and the shared
:class:`FileClock`, until killed. Every 20 ms it writes its status (which roles it holds) to
STATUS_FILE. Flows append one line per event to LOG_FILE (``O_APPEND``, one write per line):
``run ID FLOW REV TIME_NS NAME`` when a flow starts, ``ended ID - REV TIME_NS NAME`` after a
flow committed the end of its state; ``seeded`` once the SEED states are committed. MODE
selects the flows:

* ``steps``: step1 -> step2 -> step3 -> end, a commit at every step; with SEED, first commit
  SEED states to step1 and execute them.
* ``park``: flows ``work`` and ``fire`` park the state with the state annotation ``by`` = NAME.
* ``crash``: flow ``work`` kills its own process with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

from fileclock import FileClock

import flowstate as fs

STATUS_EVERY = 0.02


class Log:
    def __init__(self, path: str, name: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.name = name

    def write(self, kind: str, ctx: fs.StateCtx, flow: str) -> None:
        line = f"{kind} {ctx.current.id} {flow} {ctx.current.rev} {time.time_ns()} {self.name}\n"
        os.write(self.fd, line.encode())


def registry_for(mode: str, log: Log, name: str) -> fs.FlowRegistry:
    registry = fs.FlowRegistry()
    if mode == "steps":
        for step, following in (("step1", "step2"), ("step2", "step3")):

            def make(step: str, following: str) -> None:
                @registry.flow(step)
                async def run(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
                    log.write("run", ctx, step)
                    await asyncio.sleep(0.001)  # some work: kills land mid-flow
                    return fs.commit(fs.transit(ctx, following))

            make(step, following)

        @registry.flow("step3")
        async def step3(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            log.write("run", ctx, "step3")
            await engine.do(fs.commit(fs.end(ctx)))
            log.write("ended", ctx, "-")
            return fs.noop()

    elif mode == "park":
        for flow in ("work", "fire"):

            def make_park(flow: str) -> None:
                @registry.flow(flow)
                async def run(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
                    log.write("run", ctx, flow)
                    ctx.current.annotations["by"] = name
                    return fs.commit(fs.park(ctx))

            make_park(flow)
    elif mode == "crash":

        @registry.flow("work")
        async def crash(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
            log.write("run", ctx, "work")
            os.kill(os.getpid(), signal.SIGKILL)
            return fs.noop()

    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return registry


def write_status(path: str, engine: fs.Engine) -> None:
    rec, dly = engine.recoverer, engine.delayer
    status = {
        "pid": os.getpid(),
        "recoverer": bool(rec and rec.stats().active),
        "delayer": bool(dly and dly.stats().active),
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


async def seed(engine: fs.Engine, n: int, log: Log) -> None:
    """Commit n states to step1, then execute them all (a kill may land anywhere after)."""
    ctxs = [fs.StateCtx(current=fs.State(id=f"s{i:03d}")) for i in range(n)]
    await asyncio.gather(*(engine.do(fs.commit(fs.transit(ctx, "step1"))) for ctx in ctxs))
    os.write(log.fd, b"seeded\n")
    await asyncio.gather(*(engine.execute(ctx) for ctx in ctxs))


async def main() -> None:
    store, clock_file, status_file, log_file, mode, name = sys.argv[1:7]
    seed_n = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    log = Log(log_file, name)
    driver = fs.open_driver(store)
    async with fs.Engine(driver, registry_for(mode, log, name), clock=FileClock(clock_file)) as e:
        if seed_n:
            asyncio.get_running_loop().create_task(seed(e, seed_n, log))
        while True:
            write_status(status_file, e)
            await asyncio.sleep(STATUS_EVERY)


if __name__ == "__main__":
    asyncio.run(main())
