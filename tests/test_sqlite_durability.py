"""A commit that returned survives a SIGKILL of the process, with synchronous FULL and NORMAL.

A child process (tests/procs/commit_stream.py) commits a stream of states and reports every
commit after it returned; the parent kills it mid-stream and checks the file.
"""

from __future__ import annotations

import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

import flowstate as fs

SCRIPT = Path(__file__).parent / "procs" / "commit_stream.py"
WANT = 500  # reported versions to see before the kill
TIMEOUT = 60.0


@dataclass
class Killed:
    reported: list[tuple[str, int]]
    stderr: str


def run_and_kill(path: Path, synchronous: str, writers: int = 4) -> Killed:
    """Start the child, read until WANT versions were reported, SIGKILL it, read the rest."""
    err_path = path.with_suffix(".stderr")
    with err_path.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(path), synchronous, str(writers)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    got: list[str] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(got) < WANT:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"child reported only {len(got)} versions in {TIMEOUT} s")
            if line is None:
                pytest.fail(f"child ended early: {err_path.read_text()}")
            got.append(line)
        assert proc.poll() is None, "the child must still be committing when it is killed"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        reader.join(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    # Lines the child wrote before it died are reported commits too.
    while True:
        line = lines.get(timeout=TIMEOUT)
        if line is None:
            break
        got.append(line)
    reported = []
    for line in got:
        if not line.endswith("\n"):
            continue  # cut by the kill: the commit was not reported completely
        sid, rev = line.split()
        reported.append((sid, int(rev)))
    return Killed(reported, err_path.read_text())


async def read_log(engine: fs.Engine) -> list[fs.State]:
    return [s async for s in engine.iter(fs.get_states())]


def check_log(log: list[fs.State], reported: list[tuple[str, int]]) -> None:
    revs = [s.rev for s in log]
    assert revs == list(range(1, len(log) + 1)), "revs must be unique, ordered and gap-free"
    reported_revs = [rev for _, rev in reported]
    assert len(set(reported_revs)) == len(reported_revs), "the child got a rev twice"
    by_rev = {s.rev: s for s in log}
    lost = [(sid, rev) for sid, rev in reported if rev not in by_rev]
    assert not lost, f"{len(lost)} reported commits are missing, e.g. {lost[:5]}"
    wrong = [(sid, rev, by_rev[rev].id) for sid, rev in reported if by_rev[rev].id != sid]
    assert not wrong, f"reported revs hold other ids: {wrong[:5]}"
    # Every id's versions are complete and in order: annotation n counts 0, 1, 2, ...
    per_id: dict[str, list[int]] = defaultdict(list)
    for s in log:
        per_id[s.id].append(int(s.annotations["n"]))
    for sid, ns in per_id.items():
        assert ns == list(range(len(ns))), f"versions of {sid} are not contiguous: {ns}"


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_reported_commits_survive_sigkill(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "stream.db"
    killed = run_and_kill(path, synchronous)
    assert len(killed.reported) >= WANT

    driver = fs.SqliteDriver(path, synchronous=synchronous)  # type: ignore[arg-type]
    async with fs.Engine(driver, fs.FlowRegistry(), recovery=False, delayer=False) as engine:
        log = await read_log(engine)
    check_log(log, killed.reported)
    assert len(log) >= max(rev for _, rev in killed.reported)


@pytest.mark.parametrize("synchronous", ["FULL", "NORMAL"])
async def test_reopen_after_sigkill_keeps_committing(tmp_path: Path, synchronous: str) -> None:
    path = tmp_path / "stream.db"
    killed = run_and_kill(path, synchronous)

    driver = fs.SqliteDriver(path, synchronous=synchronous)  # type: ignore[arg-type]
    async with fs.Engine(driver, fs.FlowRegistry(), recovery=False, delayer=False) as engine:
        log = await read_log(engine)
        check_log(log, killed.reported)
        head = log[-1].rev
        latest = fs.get_states(latest_only=True, limit=1000)
        await engine.do(latest)
        assert latest.result is not None
        ids = sorted(s.id for s in latest.result.states)
        ctxs = []
        for sid in ids:  # continue every chain, in one commit
            ctx = fs.StateCtx()
            await engine.do(fs.get_state_by_id(ctx, sid))
            ctx.current.annotations["n"] = str(int(ctx.current.annotations["n"]) + 1)
            ctxs.append(ctx)
        fresh = fs.StateCtx(current=fs.State(id="after-kill", annotations={"n": "0"}))
        await engine.do(fs.commit(*(fs.park(c) for c in ctxs), fs.transit(fresh, "x")))
        assert [c.committed.rev for c in ctxs] == list(range(head + 1, head + 1 + len(ids)))
        assert fresh.committed.rev == head + len(ids) + 1
        for ctx in ctxs:  # and one more commit each, one by one
            ctx.current.annotations["n"] = str(int(ctx.current.annotations["n"]) + 1)
            await engine.do(fs.commit(fs.park(ctx)))

    driver = fs.SqliteDriver(path, synchronous=synchronous)  # type: ignore[arg-type]
    async with fs.Engine(driver, fs.FlowRegistry(), recovery=False, delayer=False) as engine:
        after = await read_log(engine)
    check_log(after, killed.reported)
    assert len(after) == head + 2 * len(ids) + 1
    assert [(s.id, s.rev) for s in after[: len(log)]] == [(s.id, s.rev) for s in log]

    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        conn.close()
