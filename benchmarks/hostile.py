"""The server under hostile bodies (issue 14, item 1): is `/health` still answered at once?

A real `flowstate serve --store memory://` process (no token, the default 16 MiB body limit)
on a free port. For ``seconds``, ``senders`` clients post maximum-size hostile bodies in a
loop, one after another:

- **proto_ctxs**: 16 MiB (just under the limit) of binary protobuf, nothing but empty
  ``state_ctxs`` entries (2 bytes each) to Driver/Commit;
- **json_ctxs**: a 4 MiB JSON Command whose ``state_ctxs`` is an array of ``{}``;
- **noops**: a binary Commit of as many noops as fit in 16 MiB (4 bytes each).

Meanwhile a prober sends ``GET /health`` every 20 ms on a connection of its own and records
each answer's latency (a request unanswered after 120 s counts as 120 s). The server's peak
RSS (``VmHWM`` of /proc/PID/status) is read at the end; if its RSS passes ``rss_cap_mb``
while running, it is killed (the machine is shared) and the peak is reported as that cap.

    python -m benchmarks.hostile                  # 20 s, a table
    python -m benchmarks.hostile --seconds 60
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.server_cpu import wait_up
from flowstate.wire.binary import put_varint

ROOT = Path(__file__).resolve().parent.parent
DRIVER = "/flowstate.v1.Driver/"
MAX_BODY = 16 * 2**20


def bodies() -> dict[str, tuple[bytes, str | None]]:
    """name -> (body, content type) of the hostile requests."""
    ctxs = b"\x0a\x00" * ((MAX_BODY - 16) // 2)  # state_ctxs entries, each an empty message
    json_ctxs = b'{"stateCtxs":[' + b",".join([b"{}"] * (4 * 2**20 // 3)) + b'],"noop":{}}'
    inner = b"\x0a\x02\x52\x00" * ((MAX_BODY - 16) // 4)  # commands: each a noop envelope
    noops = b"\x4a" + _varint(len(inner)) + inner
    return {
        "proto_ctxs": (ctxs + b"\x52\x00", None),
        "json_ctxs": (json_ctxs, "application/json"),
        "noops": (noops, None),
    }


def _varint(value: int) -> bytes:
    out = bytearray()
    put_varint(out, value)
    return bytes(out)


def _rss_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _start(port: int) -> subprocess.Popen[bytes]:
    addr = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_")}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{ROOT}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowstate.cli", "serve", "--store", "memory://", "--addr", addr],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return wait_up(proc, port, "the server")


def _send(
    url: str,
    hostile: dict[str, tuple[bytes, str | None]],
    offset: int,
    quit_sending: Any,
    results: Any,
) -> None:
    """A sender process: posts the hostile bodies in turn until told to quit, then reports
    how each was answered."""
    names = list(hostile)
    answers: dict[str, int] = {}
    i = offset
    with httpx.Client(base_url=url, timeout=300.0) as http:
        while not quit_sending.is_set():
            name = names[i % len(names)]
            i += 1
            body, ctype = hostile[name]
            headers = {"content-type": ctype} if ctype else {}
            try:
                answer = http.post(DRIVER + "Commit", content=body, headers=headers)
                status = str(answer.status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            key = f"{name} {status}"
            answers[key] = answers.get(key, 0) + 1
    results.put(answers)


def measure(
    seconds: float = 20.0, senders: int = 1, rss_cap_mb: int = 4096, only: str = ""
) -> dict[str, Any]:
    """``/health`` latency p50/p99/max (ms) while hostile bodies arrive, how many were sent
    and how they were answered, and the server's peak RSS (MB). ``only``: a comma-separated
    subset of the bodies."""
    from benchmarks.server_cpu import _free_port

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start(port)
    hostile = bodies()
    if only:
        hostile = {k: v for k, v in hostile.items() if k in only.split(",")}
    # the senders are processes of their own: their work must not delay the prober's
    fork = multiprocessing.get_context("fork")
    quit_sending = fork.Event()
    results: multiprocessing.Queue[dict[str, int]] = fork.Queue()
    sending = [
        fork.Process(target=_send, args=(url, hostile, i, quit_sending, results), daemon=True)
        for i in range(senders)
    ]
    stop = threading.Event()
    latencies: list[float] = []
    answers: dict[str, int] = {}
    killed = threading.Event()
    finished = threading.Event()  # the senders are done: the RSS watch may end

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=120.0) as http:
            while not stop.is_set():
                start = time.perf_counter()
                with contextlib.suppress(httpx.HTTPError):
                    http.get("/health")
                latencies.append(time.perf_counter() - start)
                time.sleep(0.02)

    def watch() -> None:
        while not finished.is_set():
            if _rss_kb(proc.pid, "VmRSS") > rss_cap_mb * 1024:
                killed.set()
                proc.kill()
                return
            time.sleep(0.05)

    prober = threading.Thread(target=probe, daemon=True)
    watcher = threading.Thread(target=watch)
    try:
        for p in sending:
            p.start()
        watcher.start()
        prober.start()
        time.sleep(seconds)
        stop.set()
        quit_sending.set()
        for _ in sending:
            with contextlib.suppress(queue.Empty):
                for key, count in results.get(timeout=600).items():
                    answers[key] = answers.get(key, 0) + count
        prober.join(600)
        finished.set()
        watcher.join()
        peak_mb = rss_cap_mb if killed.is_set() else _rss_kb(proc.pid, "VmHWM") / 1024
    finally:
        stop.set()
        quit_sending.set()
        finished.set()
        for p in sending:
            p.join(5)
            if p.is_alive():
                p.kill()
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ms = sorted(x * 1000 for x in latencies)
    return {
        "health_p50_ms": statistics.median(ms) if ms else float("nan"),
        "health_p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan"),
        "health_max_ms": ms[-1] if ms else float("nan"),
        "health_probes": len(ms),
        "server_peak_rss_mb": peak_mb,
        "server_killed_at_cap": killed.is_set(),
        "answers": ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--senders", type=int, default=1)
    ap.add_argument("--rss-cap-mb", type=int, default=4096)
    ap.add_argument("--only", default="", help="comma-separated: " + ",".join(bodies()))
    args = ap.parse_args(argv)
    result = measure(args.seconds, args.senders, args.rss_cap_mb, args.only)
    for key, value in result.items():
        print(f"{key:24} {value:,.1f}" if isinstance(value, float) else f"{key:24} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
