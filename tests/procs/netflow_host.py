"""Child process of test_netflow: a flowstate server hosting one flow of a hop chain.

Usage: netflow_host.py STORE_URL NAME FLOW_ID NEXT_FLOW_ID

Serves STORE_URL on 127.0.0.1 (a free port) with a flow registry shared through the store,
hosting flow FLOW_ID: it records ``hop.<n>`` = NAME on the state and transits it to
NEXT_FLOW_ID (hosted by another process), until the state has made ``max_hops`` hops, then
ends it. Prints its base URL on the first line of stdout and serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import flowstate as fs
from flowstate.server.run import listen, run_server


def hop_flow(name: str, next_flow: str) -> fs.flow.AsyncFlow:
    async def hop(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        hops = int(ctx.current.annotations.get("hops", "0")) + 1
        ctx.current.annotations["hops"] = str(hops)
        ctx.current.annotations[f"hop.{hops}"] = name
        if hops >= int(ctx.current.annotations["max_hops"]):
            return fs.commit(fs.end(ctx))
        return fs.commit(fs.transit(ctx, next_flow))

    return hop


async def main(store: str, name: str, flow_id: str, next_flow: str) -> None:
    sock = listen("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(url, flush=True)
    await run_server(
        fs.open_driver(store),
        sock,
        http_host=url,
        flows=lambda registry: registry.set_flow(flow_id, hop_flow(name, next_flow)),
        stop=stop,
    )


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
