"""Remote flows call only allowed hosts (issue 14, item 3).

Anyone who can write to the store can write a flow advertisement. A registry must therefore
never send its bearer token, or any request at all, to a host its operator did not allow:
``remote_hosts=`` / ``FLOWSTATE_REMOTE_HOSTS`` / ``flowstate serve --remote-host``, loopback
only by default. Each test runs real HTTP listeners that record what reaches them.
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import flowstate as fs
from flowstate.netflow import (
    ACTION,
    HTTP_HOST,
    REMOTE,
    REMOTE_HOSTS_ENV,
    TRANSITION_ID,
    TYPE_LABEL,
    NetFlowRegistry,
    RemoteFlow,
    flow_state_id,
    parse_remote_hosts,
)
from flowstate.server.connect import PROTO

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0
TOKEN = "sekrit-token-14"


class Recorder:
    """An HTTP listener on 127.0.0.1 that answers 200 to every POST and records it."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                self.rfile.read(length)
                recorder.requests.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                self.send_response(200)
                self.send_header("content-type", PROTO)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorders() -> Iterator[Callable[[], Recorder]]:
    made: list[Recorder] = []

    def make() -> Recorder:
        made.append(Recorder())
        return made[-1]

    yield make
    for r in made:
        r.close()


async def wait_for(condition: Callable[[], object], timeout: float = TIMEOUT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail("condition not met within the timeout")
        await asyncio.sleep(0.02)


def advertisement(flow_id: str, host: str) -> fs.StateCtx:
    ctx = fs.StateCtx(current=fs.State(flow_state_id(flow_id), labels={TYPE_LABEL: REMOTE}))
    ctx.current.annotations.update({TRANSITION_ID: flow_id, HTTP_HOST: host, ACTION: "set"})
    return ctx


async def advertise(driver: fs.Driver, flow_id: str, host: str) -> None:
    await driver.commit(fs.commit(fs.park(advertisement(flow_id, host))))


def refusals(caplog: pytest.LogCaptureFixture, host: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == "flowstate.netflow"
        and "not allowed" in r.getMessage()
        and host in r.getMessage()
    )


async def run_flows(registry: NetFlowRegistry, driver: fs.Driver) -> dict[str, str]:
    """Execute one state towards each of ``evil`` and ``good``; flow id -> outcome."""
    outcome: dict[str, str] = {}
    async with fs.Engine(driver, registry, recovery=False, delayer=False) as engine:
        for flow_id in ("evil", "good"):
            ctx = fs.StateCtx(current=fs.State(f"job-{flow_id}"))
            await engine.do(fs.commit(fs.transit(ctx, flow_id)))
            try:
                await engine.execute(ctx)
                outcome[flow_id] = "ran"
            except fs.FlowNotFoundError:
                outcome[flow_id] = "not found"
    return outcome


async def test_only_allowed_hosts_receive_the_call_and_the_token(
    recorders: Callable[[], Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = recorders(), recorders()
    driver = fs.MemoryDriver()
    await driver.open()
    await advertise(driver, "evil", bad.url)
    await advertise(driver, "good", good.url)
    registry = NetFlowRegistry(
        "http://127.0.0.1:1", driver, token=TOKEN, remote_hosts=[f"127.0.0.1:{good.port}"]
    )
    caplog.set_level(logging.WARNING, "flowstate.netflow")
    async with registry:
        await wait_for(lambda: "good" in registry.remote_hosts())
        outcome = await run_flows(registry, driver)
        for _ in range(3):  # looked up again and again: still one warning
            with pytest.raises(fs.FlowNotFoundError):
                await registry.lookup("evil")
    assert outcome == {"evil": "not found", "good": "ran"}
    assert registry.remote_hosts() == {"good": good.url}
    assert bad.requests == []
    assert len(good.requests) == 1
    path, headers = good.requests[0]
    assert path == "/flowstate.v1.Flow/Execute"
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert refusals(caplog, bad.url) == 1
    assert refusals(caplog, good.url) == 0


async def test_the_allow_list_comes_from_the_environment(
    recorders: Callable[[], Recorder],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both listeners are on loopback: only FLOWSTATE_REMOTE_HOSTS tells them apart."""
    good, bad = recorders(), recorders()
    monkeypatch.setenv(REMOTE_HOSTS_ENV, f" 127.0.0.1:{good.port} , example.org")
    driver = fs.MemoryDriver()
    await driver.open()
    await advertise(driver, "evil", bad.url)
    await advertise(driver, "good", good.url)
    registry = NetFlowRegistry("http://127.0.0.1:1", driver, token=TOKEN)
    async with registry:
        outcome = await run_flows(registry, driver)
    assert outcome == {"evil": "not found", "good": "ran"}
    assert bad.requests == []
    assert [h["authorization"] for _, h in good.requests] == [f"Bearer {TOKEN}"]


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("http://127.0.0.1:8080", True),
        ("http://127.9.9.9:1", True),
        ("http://localhost:8080/", True),
        ("http://LOCALHOST", True),
        ("https://[::1]:8443", True),
        ("http://10.0.0.5:8080", False),
        ("http://169.254.169.254", False),
        ("http://example.org:8080", False),
        ("http://localhost.example.org", False),
        ("http://user:pw@127.0.0.1:8080", False),
        ("ftp://127.0.0.1", False),
        ("http://127.0.0.1:99999", False),
        ("127.0.0.1:8080", False),
    ],
)
async def test_by_default_only_loopback_hosts_are_called(
    host: str, allowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(REMOTE_HOSTS_ENV, raising=False)
    registry = NetFlowRegistry("http://127.0.0.1:1", fs.MemoryDriver())
    assert registry.allows(host) is allowed
    state = advertisement("f", host).current
    registry.apply(state)
    assert ("f" in registry.remote_hosts()) is allowed


def test_allow_list_entries() -> None:
    assert parse_remote_hosts(["Billing.Internal", "10.0.0.5:8081", "[::1]:80", "http://h:1/"]) == {
        ("billing.internal", None),
        ("10.0.0.5", 8081),
        ("::1", 80),
        ("h", 1),
    }
    registry = NetFlowRegistry(
        "http://me:1", fs.MemoryDriver(), remote_hosts=["billing.internal", "10.0.0.5:8081"]
    )
    assert registry.allows("http://billing.internal:9000")  # a host without a port: any port
    assert registry.allows("https://BILLING.internal/prefix")
    assert registry.allows("http://10.0.0.5:8081")
    assert not registry.allows("http://10.0.0.5:8082")
    assert not registry.allows("http://127.0.0.1:8081")  # a list replaces the loopback default
    for bad in ("h:port", "http://h/path", "u@h", "h:1?x", "ftp://h"):
        with pytest.raises(fs.ValidationError, match="remote_hosts"):
            parse_remote_hosts([bad])


def test_a_malformed_environment_entry_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(REMOTE_HOSTS_ENV, "ok,bad:port")
    with pytest.raises(fs.ValidationError, match=REMOTE_HOSTS_ENV):
        NetFlowRegistry("http://me:1", fs.MemoryDriver())


def test_flowstate_serve_remote_host(tmp_path: Path, recorders: Callable[[], Recorder]) -> None:
    """End to end: `flowstate serve --token T --remote-host 127.0.0.1:GOOD`, advertisements
    written to its SQLite store by a stranger; executing through the server's Flow service."""
    good, bad = recorders(), recorders()
    store = f"sqlite:///{tmp_path / 's.db'}"

    async def prepare() -> None:
        driver = fs.open_driver(store)
        await driver.open()
        await advertise(driver, "evil", bad.url)
        await advertise(driver, "good", good.url)
        await driver.close()

    asyncio.run(prepare())
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowstate",
            "serve",
            "--store",
            store,
            "--addr",
            "127.0.0.1:0",
            "--token",
            TOKEN,
            "--remote-host",
            f"127.0.0.1:{good.port}",
            "--no-recoverer",
            "--no-delayer",
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT / "src")},
        stdout=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            lines.append(line)
            if "serving " in line:
                port = line.split(" on 127.0.0.1:", 1)[1].split(" ", 1)[0]
                url = f"http://127.0.0.1:{port}"
                break
        assert url, "".join(lines)
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
        reader.start()

        async def execute() -> None:
            headers = {"content-type": PROTO, "authorization": f"Bearer {TOKEN}"}
            async with httpx.AsyncClient(headers=headers, timeout=TIMEOUT) as client:
                server = RemoteFlow(url, client)
                for flow_id in ("evil", "good"):
                    ctx = fs.StateCtx(current=fs.State(f"job-{flow_id}"))
                    ctx.current.transition = fs.Transition(flow_id)
                    try:
                        await server.execute(ctx, None)  # type: ignore[arg-type]
                    except fs.FlowNotFoundError:
                        assert flow_id == "evil"
            await wait_for(lambda: good.requests and any(bad.url in line for line in lines))

        asyncio.run(execute())
    finally:
        proc.terminate()
        proc.wait(timeout=TIMEOUT)
    assert bad.requests == []
    assert [h["authorization"] for _, h in good.requests] == [f"Bearer {TOKEN}"]
    warned = [line for line in lines if bad.url in line]
    assert len(warned) == 1 and "not allowed" in warned[0], warned


def test_refused_hosts_are_remembered_up_to_a_cap(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stranger writing endless distinct hosts costs neither memory nor log lines without
    end."""
    monkeypatch.setattr("flowstate.netflow.MAX_REFUSED", 3)
    registry = NetFlowRegistry("http://127.0.0.1:1", fs.MemoryDriver(), remote_hosts=["ok"])
    caplog.set_level(logging.WARNING, "flowstate.netflow")
    for i in range(10):
        for _ in range(2):
            registry.apply(advertisement(f"f{i}", f"http://h{i}.example").current)
    assert len(registry._refused) == 3
    assert sum("not allowed" in r.getMessage() for r in caplog.records) == 3
    assert registry.remote_hosts() == {}
