"""Run one scenario in this process and print its result as ``RESULT:<json>``.

Used by :mod:`benchmarks.run`: ``python -m benchmarks.child '{"scenario": "commit", ...}'``.
The result carries this process's peak RSS, so each scenario's memory is its own.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from benchmarks.common import peak_rss_mb


def _scenarios() -> dict[str, Any]:
    from benchmarks import longlived, scenarios

    table: dict[str, Any] = {
        "commit": scenarios.commit,
        "contention": scenarios.contention,
        "flows": scenarios.flows,
        "raw_sqlite": scenarios.raw_sqlite,
        "raw_pg": scenarios.raw_pg,
        "floor": scenarios.floor,
        "watch": scenarios.watch,
        "watch_xproc": scenarios.watch_xproc,
        "watch_committer": scenarios.watch_committer,
        "watchers": scenarios.watchers,
        "delay": scenarios.delay,
        "recovery": scenarios.recovery,
        "ll_build_sqlite": longlived.build_sqlite,
        "ll_build_pg": longlived.build_pg,
        "longlived": longlived.longlived,
        "fanout": longlived.fanout,
    }
    return table


def main(argv: list[str]) -> int:
    params: dict[str, Any] = json.loads(argv[1])
    name = params["scenario"]
    fn: Any = None
    if name == "dbos":
        from benchmarks.dbos_peer import dbos_flows

        fn = dbos_flows
    elif name != "hook":
        fn = _scenarios()[name]
    t0 = time.perf_counter()
    if name == "hook":  # another helper's measure(): may run its own event loop
        from benchmarks.longlived import hook

        result: dict[str, Any] = hook(params)
    else:
        result = asyncio.run(fn(params))
    result["wall_s"] = time.perf_counter() - t0
    result["peak_rss_mb"] = peak_rss_mb()
    print("RESULT:" + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
