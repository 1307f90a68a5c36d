"""Run every flowstate benchmark scenario and print one table (issue 4).

From the repository root::

    .venv/bin/python -m benchmarks.run                  # the full run (a few minutes)
    .venv/bin/python -m benchmarks.run --smoke          # tiny N, seconds: CI keeps it alive
    .venv/bin/python -m benchmarks.run --json out.json --plot out.png

(``python benchmarks/run.py ...`` works too.) Every scenario runs in its own child process, one
after the other, so each reports its own peak RSS and none disturbs another. PostgreSQL is the
server at ``FLOWSTATE_BENCH_PG_DSN`` (default ``postgresql://postgres@127.0.0.1:5432/test``);
each scenario uses a schema of its own and drops it. Without a server, or without ``dbos``
installed, those parts are skipped with a message. Exit status: 1 if one of our scenarios
failed (a failing DBOS peer is reported, but does not fail the run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BACKENDS, PG_DSN, pg_available

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONCS = [1, 4, 16]

TARGET_LIMIT_RATIO = 0.7
TARGET_MEMORY = 100_000
TARGET_DBOS_RATIO = 10.0
TARGET_WATCH_INPROC_MS = 10.0
TARGET_WATCH_XPROC_MS = 50.0
TARGET_DELAY_P99_MS = 100.0
TARGET_RECOVERY_S = 10.0

FULL = {
    "duration": 3.0,
    "warmup": 0.5,
    "n": 500,
    "dbos_n": 500,
    "watch_m": 500,
    "watch_gap": 0.002,
    "watchers": 1000,
    "delay_per_second": 100,
    "delay_seconds": 4,
    "delay_interval": 0.05,
    "delay_lead": 1.0,
    "recovery_n": 10_000,
    "recovery_interval": 1.0,
}
SMOKE = {
    "duration": 0.05,
    "warmup": 0.01,
    "n": 8,
    "dbos_n": 4,
    "watch_m": 5,
    "watch_gap": 0.001,
    "watchers": 20,
    "delay_per_second": 3,
    "delay_seconds": 1,
    "delay_interval": 0.05,
    "delay_lead": 0.5,
    "recovery_n": 20,
    "recovery_interval": 1.0,
}


# --------------------------------------------------------------------------------------------
# jobs


def build_jobs(cfg: dict[str, Any], backends: list[str], dbos: bool) -> list[dict[str, Any]]:
    d, w = cfg["duration"], cfg["warmup"]
    timed = {"duration": d, "warmup": w}
    jobs: list[dict[str, Any]] = []
    # each store's limit right before its engine run: the two see the same background load
    for b in backends:
        if b == "memory":
            jobs.append({"scenario": "floor", "backend": "python", "concs": CONCS, **timed})
        elif b.startswith("sqlite"):
            jobs.append({"scenario": "raw_sqlite", "backend": b, **timed})
        elif b == "postgres":
            jobs.append({"scenario": "raw_pg", "backend": b, "concs": CONCS, **timed})
        jobs.append({"scenario": "commit", "backend": b, "concs": CONCS, **timed})
    for b in backends:
        jobs.append({"scenario": "contention", "backend": b, "workers": 16, "states": 4, **timed})
    for b in backends:
        jobs.append({"scenario": "flows", "backend": b, "concs": CONCS, "n": cfg["n"]})
    if dbos:
        stores = ["sqlite"] + (["postgres"] if "postgres" in backends else [])
        for s in stores:
            jobs.append(
                {
                    "scenario": "dbos",
                    "backend": f"dbos-{s}",
                    "store": s,
                    "concs": CONCS,
                    "n": cfg["dbos_n"],
                }
            )
    watch = {"m": cfg["watch_m"], "gap": cfg["watch_gap"]}
    for b in backends:
        jobs.append({"scenario": "watch", "backend": b, **watch})
    if "postgres" in backends:
        jobs.append({"scenario": "watch_xproc", "backend": "postgres", **watch})
    for b in backends:
        jobs.append({"scenario": "watchers", "backend": b, "count": cfg["watchers"]})
    for b in backends:
        if b == "net":
            continue  # the server's own delayer is the active one, and it hosts no flows
        jobs.append(
            {
                "scenario": "delay",
                "backend": b,
                "per_second": cfg["delay_per_second"],
                "seconds": cfg["delay_seconds"],
                "interval": cfg["delay_interval"],
                "lead": cfg["delay_lead"],
            }
        )
    for b in backends:
        if b == "net":
            continue  # committed_at comes from the server's clock: no backdated stall to recover
        jobs.append(
            {
                "scenario": "recovery",
                "backend": b,
                "n": cfg["recovery_n"],
                "interval": cfg["recovery_interval"],
            }
        )
    for i, job in enumerate(jobs):
        job["job"] = f"{i}_{job['scenario']}"
    return jobs


def run_job(job: dict[str, Any], prefix: str, timeout: float, verbose: bool) -> dict[str, Any]:
    params = dict(job, schema_prefix=prefix)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"scenario": job["scenario"], "backend": job["backend"], "params": job}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.child", json.dumps(params)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        rec["error"] = f"timed out after {timeout:.0f} s"
        return rec
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT:")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        rec["error"] = f"exit {proc.returncode}: " + " | ".join(tail)
    else:
        rec["result"] = json.loads(lines[-1][len("RESULT:") :])
    rec["wall_s"] = time.perf_counter() - t0
    if verbose:
        status = "ok" if "result" in rec else "FAILED"
        print(
            f"  {job['scenario']:<12} {job['backend']:<14} {status} ({rec['wall_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        if "error" in rec:
            print(f"    {rec['error']}", file=sys.stderr, flush=True)
    return rec


# --------------------------------------------------------------------------------------------
# analysis


def _get(recs: list[dict[str, Any]], scenario: str, backend: str) -> dict[str, Any] | None:
    for r in recs:
        if r["scenario"] == scenario and r["backend"] == backend:
            return r
    return None


def _res(recs: list[dict[str, Any]], scenario: str, backend: str) -> dict[str, Any] | None:
    r = _get(recs, scenario, backend)
    return r.get("result") if r else None


def limit_for(recs: list[dict[str, Any]], backend: str, conc: int) -> tuple[str, float | None]:
    """The physical limit an engine figure is compared with: (kind, commits/s)."""
    if backend == "memory":
        r = _res(recs, "floor", "python")
        return "pure-Python floor", _per_s(r, conc)
    if backend.startswith("sqlite"):
        r = _res(recs, "raw_sqlite", backend)
        return "raw sqlite3 (1 writer)", _per_s(r, 1)
    if backend == "postgres":
        r = _res(recs, "raw_pg", backend)
        return "raw asyncpg 1-statement", _per_s(r, conc)
    return "-", None


def _per_s(r: dict[str, Any] | None, conc: int, key: str = "by_conc") -> float | None:
    if not r:
        return None
    v = r.get(key, {}).get(str(conc))
    return v["per_s"] if v else None


def dbos_for(recs: list[dict[str, Any]], backend: str, conc: int) -> tuple[str, float | None]:
    store = (
        "postgres" if backend == "postgres" else "sqlite" if backend.startswith("sqlite") else None
    )
    if store is None:
        return "-", None
    r = _res(recs, "dbos", f"dbos-{store}")
    v = r["by_conc"].get(str(conc)) if r else None
    return f"DBOS {store}", (v["flows_per_s"] if v else None)


def analyse(recs: list[dict[str, Any]], backends: list[str]) -> dict[str, Any]:
    """The comparison rows and the target verdicts, from the raw records."""
    commit_rows, flow_rows, targets = [], [], []
    for b in backends:
        res = _res(recs, "commit", b)
        for c in CONCS:
            eng = _per_s(res, c)
            kind, lim = limit_for(recs, b, c)
            ratio = eng / lim if eng is not None and lim else None
            tx = _per_s(_res(recs, "raw_pg", b), c, "by_conc_tx") if b == "postgres" else None
            commit_rows.append(
                {
                    "backend": b,
                    "conc": c,
                    "engine_per_s": eng,
                    "limit_kind": kind,
                    "limit_per_s": lim,
                    "ratio": ratio,
                    "limit_tx_per_s": tx,
                    "ratio_tx": eng / tx if eng is not None and tx else None,
                }
            )
            if b == "memory":
                ok = None if eng is None else eng >= TARGET_MEMORY
                targets.append((f"memory commits/s >= 100k (conc {c})", ok, _fmt_n(eng)))
            else:
                ok = None if ratio is None else ratio >= TARGET_LIMIT_RATIO
                targets.append(
                    (f"{BACKENDS[b]} engine >= 0.7x limit (conc {c})", ok, _fmt_ratio(ratio))
                )
    for b in backends:
        res = _res(recs, "flows", b)
        for c in CONCS:
            v = res["by_conc"].get(str(c)) if res else None
            store, dbos = dbos_for(recs, b, c)
            fps = v["flows_per_s"] if v else None
            ratio = fps / dbos if fps is not None and dbos else None
            flow_rows.append(
                {
                    "backend": b,
                    "conc": c,
                    "flows_per_s": fps,
                    "steps_per_s": v["steps_per_s"] if v else None,
                    "dbos_store": store,
                    "dbos_flows_per_s": dbos,
                    "us_over_dbos": ratio,
                }
            )
            if b != "memory":
                ok = None if ratio is None else ratio >= TARGET_DBOS_RATIO
                targets.append(
                    (f"{BACKENDS[b]} 3-step flows >= 10x DBOS (conc {c})", ok, _fmt_ratio(ratio))
                )
    for b in backends:
        w = _res(recs, "watch", b)
        p99 = w["p99_ms"] if w else None
        targets.append(
            (
                f"watch p99 < 10 ms in-process ({BACKENDS[b]})",
                None if p99 is None else p99 < TARGET_WATCH_INPROC_MS,
                _fmt_ms(p99),
            )
        )
    if "postgres" in backends:
        w = _res(recs, "watch_xproc", "postgres")
        p99 = w["p99_ms"] if w else None
        targets.append(
            (
                "watch p99 < 50 ms across processes (PostgreSQL)",
                None if p99 is None else p99 < TARGET_WATCH_XPROC_MS,
                _fmt_ms(p99),
            )
        )
    for b in backends:
        if b == "net":
            continue  # not measured (build_jobs)
        d = _res(recs, "delay", b)
        p99 = d["p99_ms"] if d else None
        targets.append(
            (
                f"delayed firing lateness p99 < 100 ms ({BACKENDS[b]})",
                None if p99 is None else p99 < TARGET_DELAY_P99_MS,
                _fmt_ms(p99),
            )
        )
    for b in backends:
        if b == "net":
            continue  # not measured (build_jobs)
        r = _res(recs, "recovery", b)
        secs = r["seconds"] if r else None
        ok = None if r is None or r["n"] < 10_000 else r["seconds"] < TARGET_RECOVERY_S
        label = f", measured with {r['n']:,}" if r and r["n"] != 10_000 else ""
        targets.append(
            (
                f"recovery of 10,000 stalled states < 10 s ({BACKENDS[b]}{label})",
                ok,
                "-" if secs is None else f"{secs:.2f} s",
            )
        )
    return {
        "commit": commit_rows,
        "flows": flow_rows,
        "targets": [{"target": t, "met": ok, "value": v} for t, ok, v in targets],
    }


# --------------------------------------------------------------------------------------------
# the table


def _fmt_n(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.0f}"


def _fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _fmt_ms(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "-"
    return f"{v:.2f} ms" if v < 100 else f"{v:,.0f} ms"


def _rss(recs: list[dict[str, Any]], scenario: str, backend: str) -> str:
    r = _res(recs, scenario, backend)
    return f"{r['peak_rss_mb']:.0f} MB" if r else "-"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def render(report: dict[str, Any]) -> str:
    recs, meta, an = report["records"], report["meta"], report["analysis"]
    backends = meta["backends"]
    out: list[str] = []
    out.append(
        f"flowstate benchmarks  {meta['started']}  mode={meta['mode']}  "
        f"python {meta['python']}  {meta['cpus']} CPUs  load avg at start {meta['loadavg']}"
    )
    out.append(
        f"duration per timed point {meta['config']['duration']} s "
        f"(+{meta['config']['warmup']} s warm-up); flows N={meta['config']['n']}, "
        f"DBOS N={meta['config']['dbos_n']}"
    )
    for note in meta["notes"]:
        out.append(f"NOTE: {note}")

    out.append("\n== Commit throughput: engine.do(commit(park(ctx))), one state per worker ==")
    rows = []
    for r in an["commit"]:
        rows.append(
            [
                BACKENDS[r["backend"]],
                str(r["conc"]),
                _fmt_n(r["engine_per_s"]),
                _fmt_n(r["limit_per_s"]),
                r["limit_kind"],
                _fmt_ratio(r["ratio"]),
                _fmt_n(r["limit_tx_per_s"]),
                _fmt_ratio(r["ratio_tx"]),
                _rss(recs, "commit", r["backend"]),
            ]
        )
    out.append(
        _table(
            [
                "backend",
                "conc",
                "engine/s",
                "limit/s",
                "limit",
                "engine/limit",
                "BEGIN..COMMIT/s",
                "engine/that",
                "peak RSS",
            ],
            rows,
        )
    )
    lim_rss = [
        f"{k} {_rss(recs, s, b)}"
        for k, s, b in [
            ("floor", "floor", "python"),
            ("raw sqlite NORMAL", "raw_sqlite", "sqlite-normal"),
            ("raw sqlite FULL", "raw_sqlite", "sqlite-full"),
            ("raw pg", "raw_pg", "postgres"),
        ]
        if _get(recs, s, b)
    ]
    out.append("limits' peak RSS: " + ", ".join(lim_rss))
    pg = _res(recs, "raw_pg", "postgres")
    if pg and "settings" in pg:
        out.append(
            "PostgreSQL settings: " + ", ".join(f"{k}={v}" for k, v in pg["settings"].items())
        )

    out.append("\n== Contention: 16 workers on 4 states, retry (reload) on RevMismatchError ==")
    rows = []
    for b in backends:
        r = _res(recs, "contention", b)
        if r:
            rows.append(
                [
                    BACKENDS[b],
                    _fmt_n(r["per_s"]),
                    _fmt_n(r["attempts_per_s"]),
                    f"{r['conflict_rate'] * 100:.1f}%",
                    _rss(recs, "contention", b),
                ]
            )
        else:
            rows.append([BACKENDS[b], "-", "-", "-", "-"])
    out.append(
        _table(["backend", "successful commits/s", "attempts/s", "conflict rate", "peak RSS"], rows)
    )

    out.append("\n== 3-step flow (3 commits + the starting commit): N flows at concurrency c ==")
    rows = []
    for r in an["flows"]:
        rows.append(
            [
                BACKENDS[r["backend"]],
                str(r["conc"]),
                _fmt_n(r["flows_per_s"]),
                _fmt_n(r["steps_per_s"]),
                r["dbos_store"],
                _fmt_n(r["dbos_flows_per_s"]),
                _fmt_ratio(r["us_over_dbos"]),
                _rss(recs, "flows", r["backend"]),
            ]
        )
    out.append(
        _table(
            ["backend", "conc", "flows/s", "steps/s", "peer", "DBOS wf/s", "us/DBOS", "peak RSS"],
            rows,
        )
    )
    for s in ("sqlite", "postgres"):
        rec = _get(recs, "dbos", f"dbos-{s}")
        if rec and "result" in rec:
            out.append(
                f"DBOS {rec['result'].get('version', '?')} on {s}: peak RSS "
                f"{rec['result']['peak_rss_mb']:.0f} MB"
            )
        elif rec:
            out.append(f"DBOS on {s}: FAILED: {rec['error']}")
    if meta.get("dbos_skipped"):
        out.append(f"DBOS: skipped: {meta['dbos_skipped']}")

    out.append(
        "\n== Watch latency: commit call -> watcher receives it (from return in brackets) =="
    )
    rows = []
    for scen, b, label in [("watch", b, f"{BACKENDS[b]}, in-process") for b in backends] + (
        [("watch_xproc", "postgres", "PostgreSQL, across processes")]
        if "postgres" in backends
        else []
    ):
        r = _res(recs, scen, b)
        if r:
            rows.append(
                [
                    label,
                    f"{r['received']}/{r['m']}",
                    _fmt_ms(r["p50_ms"]),
                    _fmt_ms(r["p99_ms"]),
                    _fmt_ms(r["max_ms"]),
                    f"{_fmt_ms(r['from_return_p50_ms'])} / {_fmt_ms(r['from_return_p99_ms'])}",
                    _rss(recs, scen, b),
                ]
            )
        else:
            rows.append([label, "-", "-", "-", "-", "-", "-"])
    out.append(
        _table(
            ["store", "received", "p50", "p99", "max", "(p50 / p99 from return)", "peak RSS"], rows
        )
    )

    out.append("\n== Idle watchers: memory per watcher, then one commit fanned out to all ==")
    rows = []
    for b in backends:
        r = _res(recs, "watchers", b)
        if r:
            rows.append(
                [
                    BACKENDS[b],
                    str(r["count"]),
                    f"{r['bytes_per_watcher'] / 1024:.1f} KiB",
                    f"{r['fanout_received']}/{r['count']}",
                    _fmt_ms(r["fanout_p50_ms"]),
                    _fmt_ms(r["fanout_p99_ms"]),
                    _fmt_ms(r["fanout_all_ms"]),
                    _rss(recs, "watchers", b),
                ]
            )
        else:
            rows.append([BACKENDS[b], "-", "-", "-", "-", "-", "-", "-"])
    out.append(
        _table(
            ["store", "watchers", "RSS/watcher", "fan-out got", "p50", "p99", "all", "peak RSS"],
            rows,
        )
    )

    cfg = meta["config"]
    out.append(
        f"\n== Delayed firing: {cfg['delay_per_second']} states due at each of "
        f"{cfg['delay_seconds']} whole seconds, delayer polling every "
        f"{cfg['delay_interval'] * 1000:.0f} ms; lateness = flow starts - execute_at =="
    )
    rows = []
    for b in backends:
        if b == "net":
            continue
        r = _res(recs, "delay", b)
        if r:
            rows.append(
                [
                    BACKENDS[b],
                    f"{r['fired']}/{r['count']}",
                    str(r["early"]),
                    _fmt_ms(r["p50_ms"]),
                    _fmt_ms(r["p99_ms"]),
                    _fmt_ms(r["max_ms"]),
                    _rss(recs, "delay", b),
                ]
            )
        else:
            rows.append([BACKENDS[b], "-", "-", "-", "-", "-", "-"])
    out.append(_table(["store", "fired", "early", "p50", "p99", "max", "peak RSS"], rows))

    out.append(
        f"\n== Recovery: {cfg['recovery_n']:,} stalled states (committed to a flow, never "
        f"executed, already due); a new engine's recoverer (interval "
        f"{cfg['recovery_interval']:g} s) retries them; time from its start until all parked =="
    )
    rows = []
    for b in backends:
        if b == "net":
            continue
        r = _res(recs, "recovery", b)
        if r:
            rows.append(
                [
                    BACKENDS[b],
                    f"{r['completed']:,}/{r['n']:,}",
                    f"{r['seconds']:.2f} s",
                    _fmt_n(r["states_per_s"]),
                    f"{r['phase1_commit_s']:.2f} s",
                    _rss(recs, "recovery", b),
                ]
            )
        else:
            rows.append([BACKENDS[b], "-", "-", "-", "-", "-"])
    out.append(
        _table(
            ["store", "recovered", "time", "states/s", "(committing them took)", "peak RSS"], rows
        )
    )

    out.append("\n== Targets (issue 4) ==")
    rows = []
    for t in an["targets"]:
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        rows.append([t["target"], t["value"], verdict])
    out.append(_table(["target", "measured", "verdict"], rows))

    failed = [r for r in recs if "error" in r]
    if failed:
        out.append("\n== Failures ==")
        for r in failed:
            out.append(f"{r['scenario']} {r['backend']}: {r['error']}")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# the plot


def plot(report: dict[str, Any], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (pip install 'flowstate-engine[bench]'): no plot"
    an = report["analysis"]
    colors = {
        "memory": "tab:gray",
        "sqlite-normal": "tab:green",
        "sqlite-full": "tab:blue",
        "postgres": "tab:red",
        "net": "tab:purple",
    }
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.4))
    for b in report["meta"]["backends"]:
        rows = [r for r in an["commit"] if r["backend"] == b]
        xs = [r["conc"] for r in rows if r["engine_per_s"]]
        ys = [r["engine_per_s"] for r in rows if r["engine_per_s"]]
        if xs:
            ax1.plot(xs, ys, "o-", color=colors[b], label=f"{BACKENDS[b]} engine")
        lx = [r["conc"] for r in rows if r["limit_per_s"]]
        ly = [r["limit_per_s"] for r in rows if r["limit_per_s"]]
        if lx:
            ax1.plot(
                lx,
                ly,
                "s--",
                color=colors[b],
                alpha=0.6,
                label=f"{BACKENDS[b]} limit ({rows[0]['limit_kind']})",
            )
        tx = [(r["conc"], r["limit_tx_per_s"]) for r in rows if r["limit_tx_per_s"]]
        if tx:
            ax1.plot(
                [x for x, _ in tx],
                [y for _, y in tx],
                "^:",
                color=colors[b],
                alpha=0.6,
                label=f"{BACKENDS[b]} limit (asyncpg BEGIN..COMMIT)",
            )
    ax1.set_title("Commit throughput vs concurrency")
    ax1.set_ylabel("commits/s (log)")
    ax2.set_title("3-step flow throughput vs concurrency")
    ax2.set_ylabel("flows/s (log)")
    dbos_done = set()
    for b in report["meta"]["backends"]:
        rows = [r for r in an["flows"] if r["backend"] == b]
        xs = [r["conc"] for r in rows if r["flows_per_s"]]
        ys = [r["flows_per_s"] for r in rows if r["flows_per_s"]]
        if xs:
            ax2.plot(xs, ys, "o-", color=colors[b], label=f"flowstate {BACKENDS[b]}")
        store = rows[0]["dbos_store"] if rows else "-"
        if store != "-" and store not in dbos_done:
            dx = [r["conc"] for r in rows if r["dbos_flows_per_s"]]
            dy = [r["dbos_flows_per_s"] for r in rows if r["dbos_flows_per_s"]]
            if dx:
                dbos_done.add(store)
                c = colors["postgres" if store == "DBOS postgres" else "sqlite-full"]
                ax2.plot(dx, dy, "x:", color=c, label=store)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(CONCS)
        ax.set_xticklabels([str(c) for c in CONCS])
        ax.set_xlabel("concurrency (workers)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(
                fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False
            )
    meta = report["meta"]
    fig.suptitle(
        f"flowstate benchmarks, {meta['started']} ({meta['cpus']} CPUs, {meta['mode']})",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--smoke", action="store_true", help="tiny N and durations (CI; no timings)")
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write the results as JSON (full run default: benchmarks/results/bench.json)",
    )
    ap.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG plot (full run default: benchmarks/results/bench.png)",
    )
    ap.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated subset of " + ",".join(BACKENDS),
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated scenario names to run "
        "(floor,raw_sqlite,raw_pg,commit,contention,flows,dbos,watch,watch_xproc,"
        "watchers,delay,recovery)",
    )
    ap.add_argument("--no-dbos", action="store_true", help="skip the DBOS peer")
    ap.add_argument("--duration", type=float, help="seconds per timed point")
    ap.add_argument("--n", type=int, help="flows per concurrency level (us and DBOS)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = ap.parse_args(argv)

    cfg = dict(SMOKE if args.smoke else FULL)
    if args.duration:
        cfg["duration"] = args.duration
    if args.n:
        cfg["n"] = cfg["dbos_n"] = args.n
    backends = [b for b in args.backends.split(",") if b]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        ap.error(f"unknown backends {unknown}")
    notes: list[str] = []
    if "postgres" in backends:
        why = pg_available()
        if why:
            backends.remove("postgres")
            notes.append(f"PostgreSQL skipped: {why}")
    from benchmarks.dbos_peer import available as dbos_available

    dbos_skipped = "--no-dbos" if args.no_dbos else dbos_available()
    jobs = build_jobs(cfg, backends, dbos=dbos_skipped is None)
    if args.only:
        wanted = set(args.only.split(","))
        jobs = [j for j in jobs if j["scenario"] in wanted]
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    started = datetime.now(UTC)
    meta = {
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "smoke" if args.smoke else "full",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg": load,
        "config": cfg,
        "backends": backends,
        "pg_dsn": PG_DSN if "postgres" in backends else None,
        "dbos_skipped": dbos_skipped,
        "notes": notes,
    }
    prefix = f"bench_{os.getpid()}_"
    timeout = 120 if args.smoke else 900
    if not args.quiet:
        print(f"running {len(jobs)} scenarios ({meta['mode']})...", file=sys.stderr, flush=True)
    records = [run_job(j, prefix, timeout, not args.quiet) for j in jobs]
    if "postgres" in backends:
        _drop_leftovers(prefix)
    meta["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = {"meta": meta, "records": records, "analysis": analyse(records, backends)}
    print(render(report))

    json_path = args.json or (None if args.smoke else str(RESULTS / "bench.json"))
    plot_path = args.plot or (None if args.smoke else str(RESULTS / "bench.png"))
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=1, default=str))
        print(f"\nresults: {json_path}")
    if plot_path:
        why = plot(report, Path(plot_path))
        print(f"plot: {plot_path}" if why is None else f"plot skipped: {why}")
    ours_failed = [r for r in records if "error" in r and r["scenario"] != "dbos"]
    return 1 if ours_failed else 0


def _drop_leftovers(prefix: str) -> None:
    """Drop any schema a crashed scenario left behind."""
    import asyncio

    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(PG_DSN)
        try:
            names = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix + "%"
            )
            for (name,) in names:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    try:
        asyncio.run(drop())
    except Exception as exc:
        print(f"warning: could not drop leftover schemas {prefix}*: {exc}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
