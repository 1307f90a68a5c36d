"""The server under hostile input (issue 14): count caps answered 400 naming the field (item 1),
pages bounded in bytes and server memory bounded under concurrent readers (item 6), each
5xx cause logged once (item 7)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

import flowstate as fs
from flowstate.commands import GetStatesCmd, GetStatesResult
from flowstate.drivers.net import NetDriver
from flowstate.iterator import StateIterator
from flowstate.server import driver_service
from flowstate.server.driver_service import MAX_PAGE_BYTES
from flowstate.wire import codec
from tests import netserver
from tests.test_cli import COMMAND, TIMEOUT, env
from tests.test_serve_roles import _serving_line
from tests.wire_support import varint

MIB = 2**20
DRIVER = "/flowstate.v1.Driver/"


def hostile_bodies() -> dict[str, tuple[bytes, str | None, str]]:
    """name -> (body, content type, the field the refusal names)."""
    inner = b"\x0a\x02\x52\x00" * (4 * MIB - 8)
    return {
        "proto_ctxs": (b"\x0a\x00" * (8 * MIB - 8) + b"\x52\x00", None, "state_ctxs"),
        "json_ctxs": (
            b'{"stateCtxs":[' + b",".join([b"{}"] * (4 * MIB // 3)) + b'],"noop":{}}',
            "application/json",
            "state_ctxs",
        ),
        "noops": (b"\x4a" + varint(len(inner)) + inner, None, "commit.commands"),
    }


def test_hostile_bodies_are_refused_with_400_naming_the_field() -> None:
    store = fs.MemoryDriver()
    server = netserver.serve(store)
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as http:
        for name, (body, ctype, field) in hostile_bodies().items():
            headers = {"content-type": ctype} if ctype else {}
            answer = http.post(DRIVER + "Commit", content=body, headers=headers)
            assert answer.status_code == 400, (name, answer.status_code, answer.content[:200])
            code, message = codec.decode_error(answer.content, json=ctype is not None)
            assert code == "invalid_argument", name
            assert message.startswith(field + ":"), (name, message)
        assert http.get("/health").json()["status"] == "ok"
    assert store._log == []


# --- pages bounded in bytes -----------------------------------------------------------------


async def test_get_states_pages_end_at_the_byte_budget() -> None:
    store = fs.MemoryDriver()
    size = MAX_PAGE_BYTES * 3 // 8  # two fit in a page, a third does not
    for i in range(7):
        ctx = fs.StateCtx(fs.State(f"big{i}", annotations={"blob": "x" * size}))
        await store.commit(fs.commit(fs.park(ctx)))
    cmd = fs.get_states(limit=50)
    await driver_service.get_states(store, cmd)
    assert isinstance(cmd.result, GetStatesResult)
    assert [s.id for s in cmd.result.states] == ["big0", "big1"]
    assert cmd.result.more

    one = fs.StateCtx(fs.State("huge", annotations={"blob": "y" * (MAX_PAGE_BYTES + 10)}))
    await store.commit(fs.commit(fs.park(one)))
    cmd = fs.get_states(since_rev=7, limit=50)
    await driver_service.get_states(store, cmd)
    assert cmd.result is not None and [s.id for s in cmd.result.states] == ["huge"]

    # a NetDriver walking the log through the server still sees every state, in order
    net = NetDriver(netserver.serve(store).url)
    await net.open()
    try:
        got = [s.id async for s in StateIterator(net, GetStatesCmd(limit=50))]
    finally:
        await net.close()
    assert got == [f"big{i}" for i in range(7)] + ["huge"]


async def test_get_delayed_states_pages_end_at_the_byte_budget() -> None:
    store = fs.MemoryDriver()
    size = MAX_PAGE_BYTES * 3 // 8
    for i in range(5):
        ctx = fs.StateCtx(fs.State(f"d{i}", annotations={"blob": "x" * size}))
        await store.commit(fs.commit(fs.park(ctx)))
        delay = fs.delay_until(ctx, "f", store.clock.now(), commit=False)
        await driver_service.delay(store, delay)
    cmd = fs.get_delayed_states(limit=50)
    await driver_service.get_delayed_states(store, cmd)
    assert cmd.result is not None
    assert len(cmd.result.delayed_states) == 2 and cmd.result.more


# --- server memory under concurrent readers (a real server process) ----------------------------


@contextmanager
def serve_process() -> Iterator[tuple[str, int]]:
    """``flowstate serve --store memory://`` in a process of its own: (URL, pid)."""
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--store", "memory://", "--addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env(),
    )
    try:
        line = _serving_line(proc)
        match = re.search(r" on 127\.0\.0\.1:(\d+)", json.loads(line)["msg"])
        assert match, line
        yield f"http://127.0.0.1:{match.group(1)}", proc.pid
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def peak_rss_mb(pid: int) -> float:
    """The peak resident set of process ``pid`` (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


#: The bound docs/server.md gives for this load: a store of 12 states of 4 MiB each (48 MiB)
#: read by 10 concurrent GetStates(limit 50), three rounds.
READERS_RSS_MB = 400


def test_concurrent_readers_of_big_states_keep_server_memory_bounded() -> None:
    with serve_process() as (url, pid):
        with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
            for i in range(12):
                ctx = fs.StateCtx(fs.State(f"big{i}", annotations={"blob": "z" * (4 * MIB)}))
                body = codec.encode_command(fs.commit(fs.park(ctx)))
                assert http.post(DRIVER + "Commit", content=body).status_code == 200
        query = codec.encode_command(fs.get_states(limit=50))
        failures: list[str] = []

        def read() -> None:
            with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
                for _ in range(3):
                    answer = http.post(DRIVER + "GetStates", content=query)
                    if answer.status_code != 200:
                        failures.append(f"{answer.status_code} {answer.content[:200]!r}")

        readers = [threading.Thread(target=read) for _ in range(10)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(TIMEOUT * 5)
        assert not failures, failures
        peak = peak_rss_mb(pid)
    assert peak < READERS_RSS_MB, f"server peak RSS {peak:.0f} MiB"


# --- 5xx logged once per cause ---------------------------------------------------------------


class _Broken(fs.MemoryDriver):
    async def get_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        raise RuntimeError("the disk caught fire")

    read_states = get_states  # what the server reads through


def test_each_5xx_cause_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    server = netserver.serve(_Broken())
    query = codec.encode_command(fs.get_states(limit=5))
    with (
        caplog.at_level(logging.ERROR, logger="flowstate.server"),
        httpx.Client(base_url=server.url, timeout=TIMEOUT) as http,
    ):
        for _ in range(20):
            assert http.post(DRIVER + "GetStates", content=query).status_code == 500
    records = [
        r
        for r in caplog.records
        if "caught fire" in r.getMessage() or (r.exc_info and "caught fire" in str(r.exc_info[1]))
    ]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].exc_info is not None  # the traceback, once


async def test_large_answers_share_a_budget_of_bytes_in_flight() -> None:
    from flowstate.server.app import _BytesInFlight

    budget = _BytesInFlight(100)
    entered: list[str] = []
    gates = {"a": asyncio.Event(), "b": asyncio.Event(), "huge": asyncio.Event()}

    async def reader(name: str, size: int) -> None:
        async with budget.hold(size):
            entered.append(name)
            await gates[name].wait()

    first = asyncio.create_task(reader("a", 80))
    second = asyncio.create_task(reader("b", 80))
    for _ in range(20):  # let both run as far as they can
        await asyncio.sleep(0)
    assert entered == ["a"] and budget.used == 80  # b waits: 160 bytes would not fit
    gates["a"].set()
    await first
    for _ in range(20):
        await asyncio.sleep(0)
    assert entered == ["a", "b"] and budget.used == 80
    gates["b"].set()
    await second
    assert budget.used == 0
    huge = asyncio.create_task(reader("huge", 500))  # bigger than the budget: goes alone
    for _ in range(20):
        await asyncio.sleep(0)
    assert entered[-1] == "huge" and budget.used == 500
    gates["huge"].set()
    await huge
    assert budget.used == 0
