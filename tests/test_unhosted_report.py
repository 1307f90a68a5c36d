"""Flows that no process hosts are reported: ``/health`` (``unhosted_flows``) and the UI's info
(``unhosted``, shown as a banner) list the due states the recoverer and the delayer leave
alone, by flow. The server stays healthy: such states wait for a host, they are not a fault."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import flowstate as fs
from flowstate.server import create_app
from tests.workers import ticks

STATIC = Path(__file__).resolve().parent.parent / "src" / "flowstate" / "server" / "static"


@dataclass
class FakeStats:
    unhosted: dict[str, int] = field(default_factory=dict)


class FakeWorker:
    """Stands in for a recoverer or delayer: only ``stats()`` is read."""

    def __init__(self, **unhosted: int) -> None:
        self.unhosted = unhosted

    def stats(self) -> FakeStats:
        return FakeStats(dict(self.unhosted))


class StatsWithout:
    """Stats of a worker that does not report unhosted flows (older code)."""

    def stats(self) -> object:
        return object()


@pytest.fixture
async def engine() -> AsyncIterator[fs.Engine]:
    async with fs.Engine(fs.MemoryDriver(), recovery=False, delayer=False) as e:
        yield e


async def get(engine: fs.Engine, path: str) -> httpx.Response:
    app = create_app(engine.driver, engine=engine)
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as http:
        return await http.get(path)


async def test_health_lists_unhosted_flows_and_stays_ok(engine: fs.Engine) -> None:
    r = await get(engine, "/health")
    assert r.status_code == 200
    assert "unhosted_flows" not in r.json()  # nothing to report: the answer is as before

    engine.recoverer = FakeWorker(billing=2, mail=1)  # type: ignore[assignment]
    engine.delayer = FakeWorker(billing=3)  # type: ignore[assignment]
    r = await get(engine, "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "head_rev": 0, "unhosted_flows": {"billing": 5, "mail": 1}}

    info = (await get(engine, "/ui/api/info")).json()
    assert info["unhosted"] == {"billing": 5, "mail": 1}


def test_unhosted_flows_tolerates_missing_workers_and_fields() -> None:
    from flowstate.server.ui.routes import unhosted_flows

    @dataclass
    class Holder:
        recoverer: Any = None
        delayer: Any = None

    assert unhosted_flows(None) == {}
    assert unhosted_flows(Holder()) == {}  # type: ignore[arg-type]
    assert unhosted_flows(Holder(StatsWithout(), FakeWorker(x=0))) == {}  # type: ignore[arg-type]
    assert unhosted_flows(Holder(delayer=FakeWorker(b=1, a=2))) == {"a": 2, "b": 1}  # type: ignore[arg-type]


async def test_a_real_delayer_reports_a_flow_nobody_hosts() -> None:
    """A delayed state due for a flow this process does not host: the active delayer leaves it
    and /health names the flow."""
    registry = fs.FlowRegistry()
    registry.set_flow("here", lambda ctx, engine: fs.noop())
    clock = fs.ManualClock(datetime(2030, 1, 1, tzinfo=UTC))
    async with fs.Engine(
        fs.MemoryDriver(), registry, recovery=False, delayer=True, clock=clock
    ) as engine:
        ctx = fs.StateCtx(current=fs.State("s1"))
        await engine.do(fs.commit(fs.park(ctx)))
        await engine.do(fs.delay(ctx, "elsewhere", 5))
        clock.advance(5)
        await ticks(clock, engine.delayer, 3)
        health = (await get(engine, "/health")).json()
        assert (health["status"], health["unhosted_flows"]) == ("ok", {"elsewhere": 1})


def test_the_page_shows_unhosted_flows() -> None:
    """The page reads ``unhosted`` from the info and names each flow in a banner."""
    app_js = (STATIC / "app.js").read_text()
    assert "info.unhosted" in app_js
    assert "no process hosts flow" in app_js
    assert 'id="unhosted"' in (STATIC / "index.html").read_text()
