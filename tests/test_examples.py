"""The programs in examples/ run and show what they claim to show."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import flowstate as fs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = sorted(p.stem for p in EXAMPLES.glob("*.py"))


def load(name: str) -> ModuleType:
    """Import examples/<name>.py under a private module name (examples/ is not a package)."""
    module_name = f"flowstate_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=["sqlite", "memory"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    return "sqlite:///" + (tmp_path / "example.db").as_posix()


async def latest(url: str, *ids: str) -> list[fs.State]:
    """The latest stored version of each id, read through a new engine (a 'restart')."""
    async with fs.Engine(fs.open_driver(url)) as engine:
        ctxs = [fs.StateCtx() for _ in ids]
        await engine.do(*(fs.get_state_by_id(c, i) for c, i in zip(ctxs, ids, strict=True)))
    return [c.current for c in ctxs]


def steps(log: list[fs.State]) -> list[tuple[str, str]]:
    return [(s.id, "ended" if fs.ended(s) else s.transition.to or "parked") for s in log]


def test_no_example_shadows_a_stdlib_module() -> None:
    # `python examples/x.py` puts examples/ first on sys.path, so a file named like a stdlib
    # module (queue.py!) would replace that module for flowstate and every other example.
    assert SCRIPTS
    assert not set(SCRIPTS) & set(sys.stdlib_module_names)


async def test_demo(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    log = await load("demo").main(store_url)
    assert steps(log) == [("aTID", "first"), ("aTID", "second"), ("aTID", "ended")]
    revs = [s.rev for s in log]
    assert revs == sorted(set(revs)), "the log is in commit order"
    assert log[-1].annotations["flowstate.data.result"] == "1"
    out = capsys.readouterr().out
    assert "hello from flow second" in out
    assert "what happened: aTID was committed 3 times (first -> second -> ended)" in out


async def test_demo_default_store_is_reset_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    demo = load("demo")
    await demo.main()
    log = await demo.main()  # a rerun starts from an empty log instead of conflicting
    revs = [s.rev for s in log]
    assert revs == sorted(set(revs)), "the log is in commit order"
    assert (tmp_path / "flowstate-demo.db").exists()


def test_demo_script_quick_start(tmp_path: Path) -> None:
    for _ in range(2):  # a second run finds the store of the first
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "demo.py")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        rows = [line.split()[:3] for line in lines if line.strip().startswith("rev ")]
        assert [row[2] for row in rows] == ["aTID"] * 3
        revs = [int(row[1]) for row in rows]
        assert revs == sorted(set(revs))
        assert "-> first" in done.stdout and "-> second" in done.stdout
        assert "what happened:" in lines[-1]
    assert (tmp_path / "flowstate-demo.db").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_with_its_default_store(name: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) >= 5, "an example should show what it does"


def test_script_accepts_a_store_url(tmp_path: Path) -> None:
    url = "sqlite:///" + (tmp_path / "given.db").as_posix()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "durable_execute.py"), url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert url in done.stdout
    assert (tmp_path / "given.db").exists()


async def test_durable_execute(store_url: str) -> None:
    log = await load("durable_execute").main(store_url)
    assert steps(log) == [
        ("aTID", "example"),
        ("aTID", "parked"),
        ("bTID", "example"),  # committed, then the first engine shut down...
        ("bTID", "parked"),  # ...and the restarted engine ran the owed flow
    ]
    if store_url.startswith("sqlite"):
        assert all(fs.parked(s) for s in await latest(store_url, "aTID", "bTID"))


async def test_money_transfer_conserves_the_total(store_url: str) -> None:
    example = load("money_transfer")
    report = await example.main(store_url)
    assert report.deposits == example.DEPOSIT
    assert report.total == report.opening_total + report.deposits
    assert report.conflicts >= 1  # the race with the deposit is always lost once
    assert len(report.attempts) == len(example.CONCURRENT)
    assert all(a >= 1 for a in report.attempts)
    # Every transfer was applied exactly once, whatever the order.
    expected = dict(example.OPENING)
    expected["alice"] += example.DEPOSIT - 30
    expected["bob"] += 30
    for src, dst, amount in example.CONCURRENT:
        expected[src] -= amount
        expected[dst] += amount
    assert report.balances == expected
    if store_url.startswith("sqlite"):
        stored = await latest(store_url, "alice", "bob")
        assert {s.id: int(s.annotations["balance"]) for s in stored} == expected


async def test_work_queue_consumes_all_jobs_in_commit_order(store_url: str) -> None:
    example = load("work_queue")
    taken = await example.main(store_url)
    assert [s.id for s in taken] == [f"job-{i}" for i in range(example.JOBS)]
    revs = [s.rev for s in taken]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)
    assert all(s.labels == example.QUEUE and fs.parked(s) for s in taken)
    if store_url.startswith("sqlite"):
        jobs = await latest(store_url, *(s.id for s in taken))
        assert all(fs.ended(job) for job in jobs)


async def test_iterate_walks_the_whole_log(store_url: str) -> None:
    example = load("iterate")
    seen = await example.main(store_url)
    first = seen[0].rev  # the recoverer's and the delayer's meta states come first
    assert [s.rev for s in seen] == list(range(first, first + example.ITEMS + 1))
    assert [s.id for s in seen] == [f"item-{i}" for i in range(example.ITEMS)] + ["late"]


async def test_fork_join(store_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    example = load("fork_join")
    parent = await example.main(store_url)
    assert parent.id == "order-1"
    assert fs.ended(parent)
    assert parent.annotations["total"] == str(sum(n * n for n in range(1, example.PARTS + 1)))
    assert f"join: all {example.PARTS} parts ended" in capsys.readouterr().out
    if store_url.startswith("sqlite"):
        parts = await latest(store_url, *(f"order-1.part-{n}" for n in (1, 2, 3)))
        assert all(fs.ended(p) for p in parts)
