"""Several OS processes share one SQLite file: contended commits stay serial, watchers see them.

The child program is tests/procs/contend.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
import flowstate.iterator

SCRIPT = Path(__file__).parent / "procs" / "contend.py"
TIMEOUT = 120.0
PROCS = 4
ENGINES = 2
TASKS = 2
SUCCESSES = 8
IDS = ["x", "y", "z"]


async def spawn(path: Path, name: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        str(path),
        name,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """Wait for the child; return its final JSON report."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()
    last = out.decode().strip().splitlines()[-1]
    report: dict[str, Any] = json.loads(last)
    return report


async def read_log(engine: fs.Engine) -> list[fs.State]:
    return [s async for s in engine.iter(fs.get_states())]


async def test_processes_contend_on_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    ids = ",".join(IDS)
    procs = [
        await spawn(
            path,
            f"p{i}",
            "--ids",
            ids,
            "--engines",
            str(ENGINES),
            "--tasks",
            str(TASKS),
            "--successes",
            str(SUCCESSES),
            "--wait-go",
        )
        for i in range(PROCS)
    ]
    try:
        for proc in procs:  # every process has its engines open: start them together
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
            assert line == b"ready\n", line
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
        reports = [await finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    reported = [tuple(v) for r in reports for v in r["versions"]]
    commits = PROCS * ENGINES * TASKS * SUCCESSES
    assert len(reported) >= commits  # every commit stores at least one version

    async with fs.Engine(
        fs.SqliteDriver(path), fs.FlowRegistry(), recovery=False, delayer=False
    ) as engine:
        log = await read_log(engine)
    revs = [s.rev for s in log]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    assert len(log) == len(reported), "the log must hold exactly the reported versions"
    assert sorted((s.id, s.rev, s.annotations["based_on"]) for s in log) == sorted(reported)
    chains: dict[str, int] = {}
    for s in log:
        assert s.annotations["based_on"] == str(chains.get(s.id, 0)), f"chain broken at {s}"
        chains[s.id] = s.rev
    assert set(chains) == set(IDS)
    writers = {s.annotations["writer"].split("/")[0] for s in log}
    assert writers == {f"p{i}" for i in range(PROCS)}


async def test_watcher_sees_commit_of_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the periodic safety-net re-query, only noticing the other process can wake it.
    monkeypatch.setattr(flowstate.iterator, "WATCH_REFRESH", 3600.0)
    path = tmp_path / "watched.db"
    async with fs.Engine(
        fs.SqliteDriver(path), fs.FlowRegistry(), recovery=False, delayer=False
    ) as engine:
        mine = fs.StateCtx(current=fs.State(id="parent"))
        await engine.do(fs.commit(fs.park(mine)))
        async with engine.watch(fs.get_states()) as watcher:
            first = await asyncio.wait_for(anext(watcher), TIMEOUT)
            assert (first.id, first.rev) == ("parent", 1)
            waiting = asyncio.ensure_future(anext(watcher))
            try:
                proc = await spawn(
                    path, "child", "--ids", "child-x", "--engines", "1", "--tasks", "1",
                    "--successes", "1",
                )  # fmt: skip
                report = await finish(proc)
                assert report["versions"] == [["child-x", 2, "0"]]
                state = await asyncio.wait_for(waiting, TIMEOUT)
            finally:
                waiting.cancel()
            assert (state.id, state.rev) == ("child-x", 2)
            assert state.annotations["writer"] == "child/0/0"
