"""Compact Markdown tables from a results JSON (for the README and docs/performance.md).

.venv/bin/python -m benchmarks.markdown docs/bench/bench.json [BEFORE.json]

With a second (earlier) JSON, the long-lived stores, the fan-out and the targets are shown
before | after.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from benchmarks.common import BACKENDS
from benchmarks.run import CONCS, _fmt_ms, _fmt_n, _res, _sub, fmt_target


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] + ["---:"] * (len(headers) - 1)
    return [_row(headers), _row(align)] + [_row(r) for r in rows]


def _cell(value: float | None, base: float | None) -> str:
    if value is None:
        return "-"
    if not base:
        return _fmt_n(value)
    return f"{_fmt_n(value)} ({value / base:.2f}x)"


def render(report: dict[str, Any], before: dict[str, Any] | None = None) -> str:
    recs, meta, an = report.get("merged", report["records"]), report["meta"], report["analysis"]
    backends = meta["backends"]
    out = [
        f"Run {meta['started']}, {meta['cpus']} CPUs, Python {meta['python']}, "
        f"load average at start {meta['loadavg']}; {meta['config']['duration']} s per point.",
        "",
        "Commits/s, `engine.do(commit(park(ctx)))`, one state per worker; in brackets the ratio "
        "to the limit below it (same store, same concurrency).",
        "",
    ]
    rows = []
    for b in backends:
        by = {r["conc"]: r for r in an["commit"] if r["backend"] == b}
        rows.append(
            [f"**{BACKENDS[b]}**"]
            + [
                _cell(by[c]["engine_per_s"], by[c]["limit_per_s"]) if c in by else "-"
                for c in CONCS
            ]
        )
        kind = by[CONCS[0]]["limit_kind"] if CONCS[0] in by else "-"
        if kind != "-":  # the network driver has no limit of its own in the run
            rows.append(
                [f"limit: {kind}"]
                + [_fmt_n(by[c]["limit_per_s"]) if c in by else "-" for c in CONCS]
            )
        if b == "postgres":
            rows.append(
                ["limit: asyncpg BEGIN/UPDATE/INSERT/COMMIT"]
                + [_fmt_n(by[c]["limit_tx_per_s"]) if c in by else "-" for c in CONCS]
            )
    out += _table(["store", *(f"conc {c}" for c in CONCS)], rows)

    out += [
        "",
        "3-step flow (a commit at every step), flows/s; in brackets us / DBOS 3-step "
        "workflows/s on the same store, same N and concurrency.",
        "",
    ]
    rows = []
    for b in backends:
        by = {r["conc"]: r for r in an["flows"] if r["backend"] == b}
        rows.append(
            [BACKENDS[b]]
            + [
                _cell(by[c]["flows_per_s"], by[c]["dbos_flows_per_s"]) if c in by else "-"
                for c in CONCS
            ]
        )
    for s in ("sqlite", "postgres"):
        r = _res(recs, "dbos", f"dbos-{s}")
        if r:
            rows.append(
                [f"DBOS {r.get('version', '')} on {s}"]
                + [_fmt_n(r["by_conc"].get(str(c), {}).get("flows_per_s")) for c in CONCS]
            )
    out += _table(["store", *(f"conc {c}" for c in CONCS)], rows)

    out += ["", "Latency and recovery (p99 unless noted).", ""]
    rows = []
    for b in backends:
        w = _res(recs, "watch", b)
        d = _res(recs, "delay", b)
        r = _res(recs, "recovery", b)
        c = _res(recs, "contention", b)
        ws = _res(recs, "watchers", b)
        rows.append(
            [
                BACKENDS[b],
                _fmt_ms(w["p99_ms"]) if w else "-",
                _fmt_ms(d["p99_ms"]) if d else "-",
                f"{r['seconds']:.1f} s ({r['n']:,})" if r else "-",
                f"{_fmt_n(c['per_s'])} ({c['conflict_rate'] * 100:.0f}%)" if c else "-",
                f"{ws['bytes_per_watcher'] / 1024:.1f} KiB" if ws else "-",
            ]
        )
    out += _table(
        [
            "store",
            "watch, in-process",
            "delay lateness",
            "recovery",
            "contention commits/s (conflicts)",
            "RSS per idle watcher",
        ],
        rows,
    )
    x = _res(recs, "watch_xproc", "postgres")
    if x:
        out += [
            "",
            f"Watch across processes on PostgreSQL: p50 {_fmt_ms(x['p50_ms'])}, "
            f"p99 {_fmt_ms(x['p99_ms'])}.",
        ]
    out += _issue13(report, before)
    met = [t for t in an["targets"] if t["met"] is True]
    missed = [t for t in an["targets"] if t["met"] is False]
    out += ["", f"Targets: {len(met)} met, {len(missed)} missed."]
    return "\n".join(out)


def _ratio_cell(row: dict[str, Any] | None, *path: str, fmt: Any = _fmt_n) -> str:
    """``value (ratio to the fresh store beside it)``."""
    v = _sub(row, *path)
    ref = _sub(row, "ref", *path)
    if v is None:
        return (row or {}).get("filtered_skipped") or "-" if path[0] == "filtered" else "-"
    return f"{fmt(v)} ({v / ref:.2f}x)" if ref else fmt(v)


def _issue13(report: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    recs, meta = report.get("merged", report["records"]), report["meta"]
    brecs = before.get("merged", before["records"]) if before else []
    out: list[str] = []
    rows = []
    for b in meta["backends"]:
        ll = _res(recs, "longlived", b)
        bl = _res(brecs, "longlived", b) if before else None
        for key, row in (ll or {}).get("sizes", {}).items():
            brow = _sub(bl, "sizes", key)
            c = str(max(ll.get("concs", [1])))
            cells = [BACKENDS[b], f"{int(key):,}"]
            for path in (("commit", c, "per_s"), ("filtered", "per_s")):
                if before:
                    cells.append(_ratio_cell(brow, *path))
                cells.append(_ratio_cell(row, *path))
            if before:
                cells.append(_ratio_cell(brow, "watch", "p99_ms", fmt=_fmt_ms))
            cells.append(_ratio_cell(row, "watch", "p99_ms", fmt=_fmt_ms))
            rows.append(cells)
    if rows:
        idle = meta["config"].get("ll_idle", 100)
        out += [
            "",
            "Long-lived stores: commits/s at one worker (16 callers on the network driver), the "
            f"same with {idle} idle watchers on labels that never match, watch p99; in brackets "
            "the ratio to a fresh store measured beside it.",
            "",
        ]
        heads = ["store", "revisions"]
        for h in ("commits/s", "with idle filtered watchers", "watch p99"):
            heads += [f"{h}, before", f"{h}, after"] if before else [h]
        out += _table(heads, rows)
    rows = []
    for b in meta["backends"]:
        f = _res(recs, "fanout", b)
        if f:
            f0 = _res(brecs, "fanout", b) if before else None
            cells = [BACKENDS[b], f"{f['count']:,}"]
            if before:
                cells.append(_fmt_ms(f0["last_p99_ms"]) if f0 else "-")
            cells.append(_fmt_ms(f["last_p99_ms"]))
            rows.append(cells)
    if rows:
        out += ["", "Fan-out: p99 over the commits of the time until the last watcher has it.", ""]
        out += _table(
            ["store", "watchers"] + (["before", "after"] if before else ["p99"]),
            rows,
        )
    bt = {t["target"]: t for t in before["analysis"]["targets"]} if before else {}
    ts = [t for t in report["analysis"]["targets"] if t.get("group") == "issue 13"]
    if ts:
        out += ["", "Issue 13 targets (median of the repetitions, min - max).", ""]
        rows = []
        for t in ts:
            b0 = bt.get(t["target"])
            cells = [t["target"]]
            if before:
                cells.append(fmt_target(b0) if b0 and "median" in b0 else "-")
            cells += [fmt_target(t), t["verdict"]]
            rows.append(cells)
        heads = ["target"] + (["before", "after"] if before else ["measured"]) + ["verdict"]
        out += _table(heads, rows)
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    with open(argv[1]) as f:
        report = json.load(f)
    before = None
    if len(argv) == 3:
        with open(argv[2]) as f:
            before = json.load(f)
    print(render(report, before))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
