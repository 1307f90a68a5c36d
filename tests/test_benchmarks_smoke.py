"""The benchmarks' smoke mode runs and prints its table, so the harness never rots.

No timing is asserted: this only checks that every scenario still runs (memory, SQLite, and
PostgreSQL when a server answers; the DBOS peer is skipped when ``dbos`` is not installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_benchmarks_smoke(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--quiet", "--json", str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    out = proc.stdout
    for heading in (
        "== Commit throughput",
        "== Contention",
        "== 3-step flow",
        "== Watch latency",
        "== Idle watchers",
        "== Delayed firing",
        "== Recovery",
        "== Long-lived stores",
        "== Fan-out",
        "== Targets (issue 4",
        "== Targets (issue 13",
    ):
        assert heading in out, out
    for backend in ("memory", "SQLite NORMAL", "SQLite FULL"):
        assert backend in out

    report = json.loads(out_json.read_text())
    backends = report["meta"]["backends"]
    assert {"memory", "sqlite-normal", "sqlite-full"} <= set(backends)
    theirs = {"dbos", "sqlite_queries", "pg_queries", "server_cpu", "client_cpu", "codec"}
    ours = [r for r in report["records"] if r["scenario"] not in theirs]
    assert ours and all("result" in r for r in ours), [r.get("error") for r in ours]
    scenarios = {(r["scenario"], r["backend"]) for r in ours}
    assert "net" in backends
    for b in backends:
        for scenario in ("commit", "flows", "delay", "recovery"):
            # the network driver's store is served by a process whose delayer and recoverer
            # are the active ones: those two scenarios do not apply to it
            if b != "net" or scenario in ("commit", "flows"):
                assert (scenario, b) in scenarios
    sizes = report["meta"]["config"]["sizes"]
    assert 0 in sizes and max(sizes) > 0
    for b in backends:
        assert ("fanout", b) in scenarios and ("longlived", b) in scenarios
        ll = [r for r in ours if r["scenario"] == "longlived" and r["backend"] == b]
        for size in sizes:
            row = ll[0]["result"]["sizes"][str(size)]
            assert row["revisions"] >= size, (b, size, row)
            assert row["commit"]["1"]["ops"] > 0 and row["filtered"]["ops"] > 0
            assert row["watch"]["received"] == row["watch"]["m"]
            if size:  # a fresh store measured beside the long-lived one
                assert row["ref"]["filtered"]["ops"] > 0
    for r in ours:
        if r["scenario"] == "fanout":  # every watcher got every commit
            assert r["result"]["complete"] == r["result"]["commits"], r["result"]
        if r["scenario"] == "delay":  # every delayed state fired, none before its time
            assert r["result"]["fired"] == r["result"]["count"] and r["result"]["early"] == 0
        if r["scenario"] == "recovery":
            assert r["result"]["completed"] == r["result"]["n"]
    if "postgres" not in backends:
        assert any("PostgreSQL skipped" in n for n in report["meta"]["notes"])
    if report["meta"]["dbos_skipped"] is None:
        assert any(r["scenario"] == "dbos" for r in report["records"])
    else:
        assert "DBOS: skipped" in out

    from benchmarks import markdown

    tables = markdown.render(report)
    assert "| store | conc 1 | conc 4 | conc 16 |" in tables
    targets = report["analysis"]["targets"]
    assert all(t["verdict"] in ("met", "MISSED", "skipped", "info") for t in targets)
    assert any("idle filtered watchers" in t["target"] for t in targets)

    # a previous run's JSON printed beside the new figures
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.markdown", str(out_json), str(out_json)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| before |" in proc.stdout


def test_profiling_tools_import() -> None:
    """The profiling tools are run by hand; importing them catches renamed internals."""
    import importlib

    for name in ("benchmarks.profile", "benchmarks.pg_ceiling", "benchmarks.pg_levers"):
        assert importlib.import_module(name).main
