"""The network client's own cost: NetDriver's CPU per commit and its commit rate.

    .venv/bin/python -m benchmarks.client_cpu [--callers 16] [--seconds 5] [--serve]

The server is a stub in another process (``python -m benchmarks.client_cpu --stub PORT``): an
asyncio protocol (uvloop when installed) that answers every request with one canned
``Commit`` answer (a transit whose ctx comes back at rev 1), so the time measured is the
client's: its process CPU (``time.process_time``) per commit while ``callers`` tasks call
``NetDriver.commit(commit(transit(ctx, ...)))`` back to back for ``seconds``.

``--serve`` also measures against ``flowstate serve --store memory://`` (a real server;
commits/s is then bounded by the server).

``measure()`` returns ``stub_cpu_us_per_commit``, ``stub_commits_per_s``, the same through
``Engine.do`` (``stub_engine_cpu_us_per_commit``, ``stub_engine_commits_per_s``) and, with
``serve=True``, ``serve_cpu_us_per_commit`` and ``serve_commits_per_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# --- the stub server (runs in its own process) -----------------------------------------------


def _canned_answer() -> bytes:
    from flowstate.commands import CommitCmd, TransitCmd
    from flowstate.state import State, StateCtx, Transition
    from flowstate.wire import codec

    state = State(id="bench", rev=1, transition=Transition("next"))
    ctx = StateCtx(current=state, committed=state.copy())
    body = codec.encode_command(CommitCmd([TransitCmd(ctx, "next")]))
    head = (
        f"HTTP/1.1 200 OK\r\ncontent-type: application/proto\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body


class _Stub(asyncio.Protocol):
    answer = b""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(buf) < end + 4 + length:
                return
            del buf[: end + 4 + length]
            self.transport.write(self.answer)


def run_stub(port: int) -> None:
    """Serve the canned answer on 127.0.0.1:``port`` until killed."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    _Stub.answer = _canned_answer()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(_Stub, "127.0.0.1", port, backlog=256)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- the client side -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    extra = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + extra if extra else "")
    return env


@contextlib.contextmanager
def _process(args: list[str], port: int) -> Iterator[str]:
    proc = subprocess.Popen(
        args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{args} did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()


def _stub() -> contextlib.AbstractContextManager[str]:
    port = _free_port()
    return _process([sys.executable, "-m", "benchmarks.client_cpu", "--stub", str(port)], port)


def _serve() -> contextlib.AbstractContextManager[str]:
    port = _free_port()
    args = [
        sys.executable,
        "-m",
        "flowstate.cli",
        "serve",
        "--store",
        "memory://",
        "--addr",
        f"127.0.0.1:{port}",
        "--no-recoverer",
        "--no-delayer",
    ]
    return _process(args, port)


async def _run(
    url: str, callers: int, seconds: float, *, engine: bool, warmup: float
) -> dict[str, float]:
    import flowstate as fs
    from flowstate.drivers.net import NetDriver

    driver = NetDriver(url)
    async with fs.Engine(driver, recovery=False, delayer=False) as eng:
        ctxs = [fs.StateCtx(current=fs.State(f"bench-{i}")) for i in range(callers)]

        def op(ctx: fs.StateCtx) -> Callable[[], Awaitable[Any]]:
            if engine:
                return lambda: eng.do(fs.commit(fs.transit(ctx, "next")))
            return lambda: driver.commit(fs.commit(fs.transit(ctx, "next")))

        ops = [op(c) for c in ctxs]
        phase = {"measuring": False, "done": False}
        count = [0]

        async def loop(fn: Callable[[], Awaitable[Any]]) -> None:
            while not phase["done"]:
                await fn()
                if phase["measuring"]:
                    count[0] += 1

        async def clock() -> tuple[float, float]:
            await asyncio.sleep(warmup)
            phase["measuring"] = True
            t0, c0 = time.perf_counter(), time.process_time()
            await asyncio.sleep(seconds)
            phase["done"] = True
            return time.perf_counter() - t0, time.process_time() - c0

        timing = asyncio.ensure_future(clock())
        await asyncio.gather(*(loop(fn) for fn in ops))
        wall, cpu = await timing
    n = max(count[0], 1)
    return {"cpu_us_per_commit": cpu / n * 1e6, "commits_per_s": count[0] / wall}


def measure(callers: int = 16, seconds: float = 5.0, *, serve: bool = False) -> dict[str, float]:
    """Client CPU µs per commit and commits/s at ``callers`` concurrent callers, against the
    stub (driver level and through ``Engine.do``) and, with ``serve``, a real server."""
    warmup = min(1.0, seconds / 5)
    out: dict[str, float] = {}
    with _stub() as url:
        for prefix, engine in (("stub", False), ("stub_engine", True)):
            r = asyncio.run(_run(url, callers, seconds, engine=engine, warmup=warmup))
            out[f"{prefix}_cpu_us_per_commit"] = round(r["cpu_us_per_commit"], 1)
            out[f"{prefix}_commits_per_s"] = round(r["commits_per_s"], 1)
    if serve:
        with _serve() as url:
            r = asyncio.run(_run(url, callers, seconds, engine=False, warmup=warmup))
            out["serve_cpu_us_per_commit"] = round(r["cpu_us_per_commit"], 1)
            out["serve_commits_per_s"] = round(r["commits_per_s"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--serve", action="store_true", help="also against flowstate serve")
    parser.add_argument("--stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stub is not None:
        run_stub(args.stub)
        return
    for key, value in measure(args.callers, args.seconds, serve=args.serve).items():
        print(f"{key:<32} {value:>10.1f}")


if __name__ == "__main__":
    main()
