"""Slow and greedy clients against a real ``flowstate serve`` process: a stalled request is
answered 408 and closed after the body timeout (HTTP/1.1 and h2c), connections beyond the cap
are closed at once while the others are served, and a full file-descriptor table is logged a
bounded number of times (issue 14, item 5).

The timeouts are injected small (``--body-timeout``); the tests wait on conditions, with
generous limits, and measure nothing.
"""

from __future__ import annotations

import json
import re
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from flowstate.errors import ValidationError
from flowstate.server.run import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    default_max_connections,
    settings,
)
from tests.test_cli import COMMAND, TIMEOUT, Lines, env

STALL = "0.5"  # seconds: --body-timeout of these servers
LENGTH = ("content-length", "100")
HEALTH = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@contextmanager
def served(
    *args: str, extra_env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None
) -> Iterator[tuple[int, Lines]]:
    """``flowstate serve`` on a memory store; yields its port and its log lines."""
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--store", "memory://", "--addr", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**env(), **(extra_env or {})},
        preexec_fn=preexec,
    )
    assert proc.stdout is not None
    out = Lines(proc.stdout)
    try:
        lines = out.wait_for(lambda ls: any('"serving ' in line for line in ls))
        line = next(line for line in lines if '"serving ' in line)
        match = re.search(r" on 127\.0\.0\.1:(\d+)", json.loads(line)["msg"])
        assert match, line
        yield int(match.group(1)), out
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_to_end(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (fails on the timeout)."""
    got = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def serves_again(port: int) -> None:
    """Wait until the server answers ``/health`` (it may not have seen closes yet)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=TIMEOUT).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server does not take connections again"
        time.sleep(0.05)  # polling a condition


def read_answer(conn: socket.socket) -> bytes:
    """One whole answer (head and Content-Length body) from a kept-alive connection."""
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {got!r}"
        got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = conn.recv(65536)
        assert chunk, f"closed after {got!r}"
        body += chunk
    return head + b"\r\n\r\n" + body


HEAD = (
    b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n"
)


@pytest.mark.parametrize(
    ("path", "stack"),
    [
        (b"/flowstate.v1.Driver/Commit", "uvicorn"),
        (b"/ui/api/end", "uvicorn"),
        (b"/flowstate.v1.Driver/Commit", "hypercorn"),  # the comparison stack
    ],
)
def test_a_stalled_body_is_answered_408_and_closed(path: bytes, stack: str) -> None:
    stack_env = {"FLOWSTATE_SERVER_STACK": stack}
    with served("--body-timeout", STALL, extra_env=stack_env) as (port, _), connect(port) as conn:
        conn.sendall(HEAD % path + b"0123456789")  # 10 of 100 bytes, then nothing
        answer = read_to_end(conn)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"deadline_exceeded" in answer and b"connection: close" in answer.lower()


def test_a_body_answered_early_then_stalled_is_closed() -> None:
    """404 before the body was read: the answer stands, the stalled rest closes the connection."""
    with served("--body-timeout", STALL) as (port, _), connect(port) as conn:
        conn.sendall(HEAD % b"/nowhere" + b"0123456789")
        answer = read_to_end(conn)
    assert answer.startswith(b"HTTP/1.1 404 "), answer
    assert b" 408 " not in answer


def test_stalled_heads_are_closed() -> None:
    with served("--body-timeout", STALL) as (port, _):
        with connect(port) as conn:  # a first request that never completes its head
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert read_to_end(conn) == b""
        with connect(port) as conn:  # the second request of a kept-alive connection
            conn.sendall(HEALTH)
            first = read_answer(conn)
            assert first.startswith(b"HTTP/1.1 200 "), first
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            answer = read_to_end(conn)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


def test_a_stalled_h2_stream_is_answered_408_and_the_others_carry_on() -> None:
    with served("--body-timeout", STALL) as (port, _), connect(port) as conn:
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        h2c.initiate_connection()
        common = [(":scheme", "http"), (":authority", f"127.0.0.1:{port}")]
        h2c.send_headers(
            1,
            [(":method", "POST"), (":path", "/flowstate.v1.Driver/Commit"), *common, LENGTH],
        )
        h2c.send_data(1, b"0123456789")
        conn.sendall(h2c.data_to_send())
        statuses: dict[int, str] = {}
        ended: set[int] = set()
        asked_health = False
        while not (statuses.get(1) and 3 in ended):
            data = conn.recv(65536)
            assert data, f"connection closed; statuses {statuses}"
            for event in h2c.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    statuses[event.stream_id] = dict(event.headers)[b":status"].decode()
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    h2c.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if not asked_health:  # another stream on the same connection, while 1 stalls
                asked_health = True
                h2c.send_headers(3, [(":method", "GET"), (":path", "/health"), *common], True)
            conn.sendall(h2c.data_to_send())
    assert statuses == {1: "408", 3: "200"}


def test_connections_over_the_cap_are_closed_while_the_others_work() -> None:
    cap = 4
    with served("--max-connections", str(cap)) as (port, out):
        held = []
        try:
            for _ in range(cap):  # each one served and kept alive
                conn = connect(port)
                held.append(conn)
                conn.sendall(HEALTH)
                assert read_answer(conn).startswith(b"HTTP/1.1 200 ")
            with connect(port) as extra:
                extra.sendall(HEALTH)
                assert read_to_end(extra) == b""  # closed at once, no answer
            for conn in held:  # the others still work
                conn.sendall(HEALTH)
                assert read_answer(conn).startswith(b"HTTP/1.1 200 ")
            out.wait_for(lambda ls: any("connection refused" in line for line in ls))
        finally:
            for conn in held:
                conn.close()
        serves_again(port)  # once they are gone


def _few_files() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def test_running_out_of_file_descriptors_is_logged_a_bounded_number_of_times() -> None:
    """asyncio's loop (what embedding programs may run, and serve without uvloop): it used to
    log 'out of system resource' tens of thousands of times a second; uvloop logs nothing."""

    def accept_errors(lines: list[str]) -> list[str]:
        return [
            line
            for line in lines
            if "cannot accept connections" in line or "socket.accept() out of system" in line
        ]

    def summary(lines: list[str]) -> bool:
        return any(re.search(r"\(\d+ times in the last", line) for line in lines)

    with served(
        "--max-connections",
        "1000",
        "--no-recoverer",
        "--no-delayer",
        extra_env={"FLOWSTATE_SERVER_LOOP": "asyncio"},
        preexec=_few_files,
    ) as (port, out):
        conns = [connect(port) for _ in range(120)]  # more than the server has descriptors
        try:
            lines = out.wait_for(lambda ls: summary(ls) or len(accept_errors(ls)) > 100)
            errors = accept_errors(lines)
            assert 2 <= len(errors) <= 3, errors[:5]
            assert "Too many open files" in errors[0]
            count = re.search(r"\((\d+) times", errors[-1])
            assert count and int(count.group(1)) >= 1
        finally:
            for conn in conns:
                conn.close()
        serves_again(port)  # once descriptors are free


def test_the_timeout_and_the_cap_come_from_options_or_the_environment() -> None:
    assert settings().body_timeout == DEFAULT_BODY_TIMEOUT == 30.0
    assert settings().max_connections is None  # default_max_connections() at run time
    assert 1 <= default_max_connections() <= DEFAULT_MAX_CONNECTIONS == 1000
    from_env = settings(env={"FLOWSTATE_BODY_TIMEOUT": "2.5", "FLOWSTATE_MAX_CONNECTIONS": "7"})
    assert (from_env.body_timeout, from_env.max_connections) == (2.5, 7)
    given = settings(body_timeout=1, max_connections=3, env={"FLOWSTATE_BODY_TIMEOUT": "9"})
    assert (given.body_timeout, given.max_connections) == (1, 3)
    for bad in (
        {"FLOWSTATE_BODY_TIMEOUT": "0"},
        {"FLOWSTATE_BODY_TIMEOUT": "nan"},
        {"FLOWSTATE_MAX_CONNECTIONS": "-1"},
    ):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            settings(env=bad)
    with pytest.raises(ValidationError, match="max_connections"):
        settings(max_connections=0)
