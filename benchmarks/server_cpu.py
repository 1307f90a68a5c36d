"""Server CPU per request: `flowstate serve --store memory://` under wrk (issue 13, item 3).

The server runs as a subprocess on a free port, exactly as `flowstate serve --store memory://`
runs it (engine with recoverer and delayer, the remote-flow registry and its watcher), on the
HTTP stack named by ``stack``. wrk (HTTP/1.1, keep-alive) drives ``connections`` connections
from 2 threads for ``seconds`` per request type, after a one-second warm-up; the server's CPU
time (utime + stime of the process, all threads, from /proc/PID/stat) over the measured run
divided by the requests wrk completed is the figure reported.

Request types:

- **Commit**: binary protobuf (no Content-Type, as the Go client sends), a commit parking one
  new state (id ``w<thread>-<12-digit counter>``, label ``app=bench``): every commit succeeds
  and each one adds a revision, as a client creating work does.
- **GetStates**: binary protobuf, ``get_states(limit=50)`` from rev 0: a full page of 50
  states (the store is pre-filled with at least 100 revisions).

Every answer must be 200 (wrk's non-2xx count must be 0), else the run fails.

Stacks: ``hypercorn`` (HTTP/1.1 and h2c, the server before this benchmark), ``uvicorn``
(HTTP/1.1 by uvicorn's httptools protocol on uvloop, h2c connections handed to hypercorn: what
`flowstate serve` runs; ``uvicorn-asyncio`` on the stdlib loop) and ``granian`` (ASGI, embedded;
needs ``pip install granian``), each with the lean RPC route of
``flowstate.server.app.LeanRoutes`` in front of Starlette; with the suffix ``-starlette`` the
lean route is bypassed (every request goes through Starlette, as before). ``default`` is what
`flowstate serve` runs. wrk speaks HTTP/1.1 only, so every figure is an HTTP/1.1 figure.

    python -m benchmarks.server_cpu            # every stack, a table
    python -m benchmarks.server_cpu granian hypercorn-starlette --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DRIVER = "/flowstate.v1.Driver/"

#: stack name -> (HTTP server, event loop, lean route in front of Starlette)
STACKS: dict[str, tuple[str, str, bool]] = {
    "hypercorn-starlette": ("hypercorn", "asyncio", False),
    "hypercorn": ("hypercorn", "asyncio", True),
    "uvicorn-starlette": ("uvicorn", "uvloop", False),
    "uvicorn": ("uvicorn", "uvloop", True),
    "uvicorn-asyncio": ("uvicorn", "asyncio", True),
    "granian-starlette": ("granian", "asyncio", False),
    "granian": ("granian", "asyncio", True),
}
ID_TEMPLATE = "w{thread}-{counter:012d}"
_PLACEHOLDER = "Z" * len(ID_TEMPLATE.format(thread=0, counter=0))


def default_stack() -> str:
    """What `flowstate serve` runs."""
    from flowstate.server.run import DEFAULT_LOOP, DEFAULT_STACK

    for name, (server, loop, lean) in STACKS.items():
        if server == DEFAULT_STACK and loop == DEFAULT_LOOP and lean:
            return name
    raise LookupError(DEFAULT_STACK)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _lua_bytes(data: bytes) -> str:
    return "".join(f"\\{b}" for b in data)


def _bodies() -> tuple[bytes, bytes, bytes]:
    """(commit prefix, commit suffix, GetStates body)."""
    import flowstate as fs
    from flowstate.wire import codec

    ctx = fs.StateCtx(current=fs.State(_PLACEHOLDER, labels={"app": "bench"}))
    body = codec.encode_command(fs.commit(fs.park(ctx)))
    assert body.count(_PLACEHOLDER.encode()) == 1
    prefix, suffix = body.split(_PLACEHOLDER.encode())
    return prefix, suffix, codec.encode_command(fs.get_states(limit=50))


_DONE = """
function done(summary, latency, requests)
  io.write(string.format('{"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _scripts(directory: Path) -> dict[str, Path]:
    prefix, suffix, get_states = _bodies()
    commit = (
        f"""
local prefix = "{_lua_bytes(prefix)}"
local suffix = "{_lua_bytes(suffix)}"
local next_thread = 0
local counter = 0
function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
end
function init(args)
  base = (tonumber(args[1]) or 0)
end
request = function()
  counter = counter + 1
  local id = string.format("w%d-%012d", tid, base + counter)
  return wrk.format("POST", "{DRIVER}Commit", nil, prefix .. id .. suffix)
end
"""
        + _DONE
    )
    reads = (
        f"""
wrk.method = "POST"
wrk.body = "{_lua_bytes(get_states)}"
wrk.path = "{DRIVER}GetStates"
"""
        + _DONE
    )
    paths = {"Commit": directory / "commit.lua", "GetStates": directory / "get_states.lua"}
    paths["Commit"].write_text(commit)
    paths["GetStates"].write_text(reads)
    return paths


def _wrk(url: str, script: Path, connections: int, seconds: float, base: int) -> dict[str, float]:
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            url,
            "--",
            str(base),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith('{"requests"'))
    result: dict[str, float] = json.loads(line)
    if result["non2xx"] or result["errors"]:
        raise RuntimeError(f"wrk saw failures: {result}\n{out}")
    return result


def _h2load(url: str, directory: Path, connections: int, seconds: float) -> tuple[int, float]:
    """GetStates(limit 50) over h2c with prior knowledge, one stream at a time on each of
    ``connections`` connections: (requests, requests/s)."""
    body = directory / "get_states.bin"
    body.write_bytes(_bodies()[2])
    out = subprocess.run(
        [
            "h2load",
            "-c",
            str(connections),
            "-m",
            "1",
            "-t",
            "2",
            "-D",
            str(max(1, round(seconds))),
            "--warm-up-time",
            "1",
            "-d",
            str(body),
            url + DRIVER + "GetStates",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    ).stdout
    done = next(x for x in out.splitlines() if x.startswith("requests:"))
    codes = next(x for x in out.splitlines() if x.startswith("status codes:"))
    count = int(done.split(",")[2].split()[0])  # "N done"
    ok = int(codes.split(":")[1].split(",")[0].split()[0])  # "N 2xx"
    if ok < count - connections or count == 0:  # those cut off at the deadline aside
        raise RuntimeError(f"h2load saw failures:\n{out}")
    finished = next(x for x in out.splitlines() if x.startswith("finished in"))
    per_s = float(finished.split(",")[1].split()[0])
    return count, per_s


def _prefill(url: str, revisions: int) -> None:
    """At least ``max(revisions, 100)`` revisions, 100 new states per commit."""
    import flowstate as fs
    from flowstate.wire import codec

    total, batch = max(revisions, 100), 100
    with httpx.Client(base_url=url, timeout=60.0) as http:
        for start in range(0, total, batch):
            ctxs = [
                fs.StateCtx(current=fs.State(f"fill-{i}", labels={"app": "bench"}))
                for i in range(start, min(total, start + batch))
            ]
            body = codec.encode_command(fs.commit(*(fs.park(c) for c in ctxs)))
            r = http.post(DRIVER + "Commit", content=body)
            r.raise_for_status()


def _start(stack: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.server_cpu", "--serve", stack, str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return wait_up(proc, port, f"the {stack} server")


def wait_up(proc: subprocess.Popen[bytes], port: int, what: str) -> subprocess.Popen[bytes]:
    """``proc`` once its server on ``port`` answers ``/health`` (killed after 60 s without)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5.0).raise_for_status()
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not come up") from None
            time.sleep(0.1)


def measure(
    stack: str = "default", connections: int = 16, seconds: float = 5.0, revisions: int = 0
) -> dict[str, float]:
    """Server CPU µs per Commit and per GetStates(limit 50), requests/s and p99 (ms) of each,
    with ``connections`` concurrent HTTP/1.1 connections (keys ``commit_cpu_us``,
    ``commit_per_s``, ``commit_p99_ms``, ``get_states_cpu_us``, ``get_states_per_s``,
    ``get_states_p99_ms``)."""
    if shutil.which("wrk") is None:
        raise RuntimeError("needs wrk (apt-get install wrk)")
    if stack == "default":
        stack = default_stack()
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(stack, port)
    result: dict[str, float] = {}
    try:
        _prefill(url, revisions)
        with tempfile.TemporaryDirectory() as tmp:
            scripts = _scripts(Path(tmp))
            base = 0
            for kind, key in (("GetStates", "get_states"), ("Commit", "commit")):
                _wrk(url, scripts[kind], connections, 1.0, base)  # warm-up
                base += 10**9
                before = _cpu_seconds(proc.pid)
                run = _wrk(url, scripts[kind], connections, seconds, base)
                used = _cpu_seconds(proc.pid) - before
                base += 10**9
                result[f"{key}_cpu_us"] = used / run["requests"] * 1e6
                result[f"{key}_per_s"] = run["requests"] / (run["duration_us"] / 1e6)
                result[f"{key}_p99_ms"] = run["p99_us"] / 1000.0
            if shutil.which("h2load") is not None and stack != "uvicorn-asyncio":
                before = _cpu_seconds(proc.pid)
                count, per_s = _h2load(url, Path(tmp), connections, seconds)
                used = _cpu_seconds(proc.pid) - before
                result["get_states_h2_cpu_us"] = used / count * 1e6
                result["get_states_h2_per_s"] = per_s
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return result


async def _serve_granian(app: Any, sock: socket.socket, stop: Any, **_: Any) -> None:
    """``serve_app`` on granian's embedded server (ASGI, HTTP/1.1 and h2c prior knowledge;
    no ``Upgrade: h2c``), on the socket the server listens on. Measurement only."""
    import asyncio

    from granian._granian import SocketHolder
    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    class OnSocket(Server):  # type: ignore[misc]
        def _init_shared_socket(self) -> None:
            self._shd = SocketHolder(os.dup(sock.fileno()), False, 1024)
            self._sfd = self._shd.get_fd()
            self._ssp = None

    bound = sock.getsockname()
    server = OnSocket(
        app,
        address=bound[0],
        port=bound[1],
        interface=Interfaces.ASGI,
        http=HTTPModes.auto,
        websockets=False,
        log_enabled=False,
    )

    async def trigger() -> None:
        await stop.wait()
        app.state.ui.close()
        server.signal_handler_interrupt()

    watcher = asyncio.create_task(trigger())
    try:
        await server.serve()
    finally:
        watcher.cancel()


def _serve_child(stack: str, port: int) -> None:
    """The server process: `flowstate serve --store memory://` on ``stack``."""
    from flowstate.server import app as app_module
    from flowstate.server import run as run_module

    server, loop, lean = STACKS[stack]
    os.environ["FLOWSTATE_SERVER_LOOP"] = loop
    if server == "granian":
        run_module.serve_app = _serve_granian  # type: ignore[assignment]
    else:
        os.environ["FLOWSTATE_SERVER_STACK"] = server
    if not lean:

        async def through(self: Any, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)

        app_module.LeanRoutes.__call__ = through  # type: ignore[method-assign]
    run_module.serve("memory://", f"127.0.0.1:{port}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("stacks", nargs="*", default=list(STACKS))
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--revisions", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--serve", nargs=2, metavar=("STACK", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve_child(args.serve[0], int(args.serve[1]))
        return 0
    print(
        "| stack | Commit CPU µs | Commit req/s | Commit p99 ms "
        "| GetStates CPU µs | GetStates req/s | GetStates p99 ms "
        "| h2c GetStates CPU µs | h2c GetStates req/s |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for _ in range(args.repeat):
        for stack in args.stacks:
            with contextlib.suppress(KeyboardInterrupt):
                r = measure(stack, args.connections, args.seconds, args.revisions)
                print(
                    f"| {stack} | {r['commit_cpu_us']:.0f} | {r['commit_per_s']:.0f} "
                    f"| {r['commit_p99_ms']:.1f} | {r['get_states_cpu_us']:.0f} "
                    f"| {r['get_states_per_s']:.0f} | {r['get_states_p99_ms']:.1f} "
                    f"| {r.get('get_states_h2_cpu_us', float('nan')):.0f} "
                    f"| {r.get('get_states_h2_per_s', float('nan')):.0f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
