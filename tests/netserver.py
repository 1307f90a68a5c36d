"""Test servers: a store driver served on a real socket (hypercorn, in a thread of its own) and
a NetDriver pointing at it. ``stop_all`` (run after every test by conftest) shuts them down.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import datetime

import flowstate as fs
from flowstate.drivers.net import NetDriver
from flowstate.server import BackgroundServer, create_app

_running: list[BackgroundServer] = []
_lock = threading.Lock()


class FollowClock:
    """The server store's clock reads the client engine's: an injected (manual) clock of the
    engine then governs ``committed_at`` as it does with an in-process driver."""

    def __init__(self, net: NetDriver) -> None:
        self._net = net

    def now(self) -> datetime:
        return self._net.clock.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def serve(backing: fs.Driver, **app_options: object) -> BackgroundServer:
    """Serve ``backing`` until :func:`stop_all`; returns the started server."""
    server = BackgroundServer(create_app(backing, **app_options))  # type: ignore[arg-type]
    server.start()
    with _lock:
        _running.append(server)
    return server


def net_driver(backing: fs.Driver) -> NetDriver:
    """A NetDriver whose server stores into ``backing``, with ``backing`` following its clock."""
    net = NetDriver(serve(backing).url)
    backing.clock = FollowClock(net)
    return net


def stop_all() -> None:
    with _lock:
        servers = list(_running)
        _running.clear()
    for server in reversed(servers):
        server.stop()
