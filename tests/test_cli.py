"""The ``flowstate`` command, run as a real subprocess against a SQLite store, a PostgreSQL
database and a running ``flowstate serve``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

import flowstate as fs
from tests import pgutil

EXE = shutil.which("flowstate", path=str(Path(sys.executable).parent))
COMMAND = [EXE] if EXE else [sys.executable, "-m", "flowstate.cli"]
TIMEOUT = 60


def env() -> dict[str, str]:
    """The environment without any FLOWSTATE_* setting of the caller's."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_")}
    clean["PYTHONUNBUFFERED"] = "1"
    return clean


def cli(*args: str, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**env(), **(extra_env or {})},
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str, extra_env: dict[str, str] | None = None) -> str:
    done = cli(*args, extra_env=extra_env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stdout


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


async def _seed(driver: fs.Driver, prefix: str, n: int) -> None:
    """``n`` orders: each transits to ``pay``; every third one then ends."""
    async with fs.Engine(driver, recovery=False, delayer=False) as engine:
        for i in range(n):
            labels = {"kind": "order", "tenant": "acme" if i % 2 else "zed"}
            ctx = fs.StateCtx(current=fs.State(id=f"{prefix}-{i}", labels=labels))
            await engine.do(fs.commit(fs.transit(ctx, "pay")))
            if i % 3 == 0:
                await engine.do(fs.commit(fs.end(ctx)))


def seed(url: str, prefix: str, n: int) -> None:
    asyncio.run(_seed(fs.open_driver(url), prefix, n))


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A SQLite store with 6 orders: revs 1..8 (orders 0 and 3 have two revisions)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    seed(url, "order", 6)
    return url


# --- states ---------------------------------------------------------------------------------


def test_states_table(store: str) -> None:
    lines = ok("states", "--store", store).splitlines()
    assert lines[0].split() == ["REV", "ID", "FLOW", "LABELS", "COMMITTED", "AT"]
    rows = [line.split() for line in lines[1:]]
    assert [r[0] for r in rows] == [str(rev) for rev in range(1, 9)]
    assert rows[0][1:3] == ["order-0", "→"] and rows[0][3] == "pay"
    assert rows[1][1:3] == ["order-0", "ended"]
    assert "tenant=zed" in lines[1]


def test_states_json_and_filters(store: str) -> None:
    every = json_lines(ok("states", "--store", store, "--json"))
    assert [s["rev"] for s in every] == list(range(1, 9))
    first = every[0]
    assert first["id"] == "order-0"
    assert first["transition"] == {"to": "pay", "annotations": {}}
    assert first["labels"] == {"kind": "order", "tenant": "zed"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["committed_at"])

    latest = json_lines(ok("states", "-s", store, "--json", "--latest-only"))
    assert sorted(s["id"] for s in latest) == [f"order-{i}" for i in range(6)]
    assert {s["id"]: s["rev"] for s in latest}["order-0"] == 2

    acme = json_lines(ok("states", "-s", store, "--json", "--label", "tenant=acme"))
    assert [s["id"] for s in acme] == ["order-1", "order-3", "order-3", "order-5"]
    both = json_lines(
        ok(
            "states",
            "-s",
            store,
            "--json",
            "-l",
            "tenant=acme",
            "-l",
            "kind=order",
            "--latest-only",
        )
    )
    assert [s["id"] for s in both] == ["order-1", "order-3", "order-5"]
    assert (
        json_lines(ok("states", "-s", store, "--json", "-l", "tenant=acme", "-l", "kind=x")) == []
    )

    after = json_lines(ok("states", "-s", store, "--json", "--since-rev", "5"))
    assert [s["rev"] for s in after] == [6, 7, 8]
    limited = json_lines(ok("states", "-s", store, "--json", "--limit", "3"))
    assert [s["rev"] for s in limited] == [1, 2, 3]


def test_states_limit_pages_through_a_larger_store(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'big.db'}"
    seed(url, "o", 700)  # 934 revisions: more than one page of 500
    assert len(json_lines(ok("states", "-s", url, "--json", "--limit", "0"))) == 934
    assert len(json_lines(ok("states", "-s", url, "--json", "--limit", "600"))) == 600


# --- state ----------------------------------------------------------------------------------


def test_state_latest_and_rev(store: str) -> None:
    shown = ok("state", "order-0", "--store", store)
    assert re.search(r"rev\s+2\b", shown)
    assert "ended" in shown and "tenant = zed" in shown
    first = json.loads(ok("state", "order-0", "--rev", "1", "-s", store, "--json"))
    assert (first["rev"], first["transition"]["to"]) == (1, "pay")


def test_state_not_found(store: str) -> None:
    done = cli("state", "nope", "--store", store)
    assert done.returncode == 1
    assert "state not found" in done.stderr
    assert "Traceback" not in done.stderr


# --- bad input ------------------------------------------------------------------------------


def test_bad_label(store: str) -> None:
    done = cli("states", "--store", store, "--label", "novalue")
    assert done.returncode == 2
    assert "--label" in done.stderr and "key=value" in done.stderr


def test_bad_store_url() -> None:
    done = cli("states", "--store", "ftp://example")
    assert done.returncode == 2
    assert "unsupported store url" in done.stderr


def test_missing_sqlite_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    done = cli("states", "--store", f"sqlite:///{path}")
    assert done.returncode == 1
    assert "no SQLite store" in done.stderr
    assert not path.exists()


def test_store_from_environment(store: str) -> None:
    rows = json_lines(ok("states", "--json", "--limit", "1", extra_env={"FLOWSTATE_STORE": store}))
    assert rows[0]["id"] == "order-0"


# --- watch ----------------------------------------------------------------------------------


class Lines:
    """Collects a subprocess's output lines from a thread, for waiting on conditions."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float = TIMEOUT) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.lines):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out; got {self.lines!r}"
                self._cond.wait(left)
            return list(self.lines)


def start(*args: str) -> tuple[subprocess.Popen[str], Lines]:
    proc = subprocess.Popen(
        [*COMMAND, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env(),
    )
    assert proc.stdout is not None
    return proc, Lines(proc.stdout)


def interrupt(proc: subprocess.Popen[str]) -> str:
    """Ctrl-C the process; returns its stderr after checking that it ended cleanly."""
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    return stderr


def test_watch_streams_new_commits_until_interrupted(store: str) -> None:
    # Start after rev 8 explicitly, so that commits made right away are not missed.
    proc, out = start("watch", "--store", store, "--json", "--since-rev", "8", "-l", "tenant=acme")
    try:
        seed(store, "late", 4)  # late-1 and late-3 are acme: revs of late-1, late-3, late-3 ended
        lines = out.wait_for(lambda ls: len(ls) >= 3)
    finally:
        stderr = interrupt(proc)
    got = [json.loads(line) for line in lines]
    assert [(s["id"], s["transition"]["to"]) for s in got] == [
        ("late-1", "pay"),
        ("late-3", "pay"),
        ("late-3", ""),
    ]
    assert all(s["rev"] > 8 for s in got)
    assert stderr == ""


def test_watch_replays_history_then_follows(store: str) -> None:
    proc, out = start("watch", "--store", store, "--since-rev", "6")
    try:
        out.wait_for(lambda ls: len(ls) >= 2)  # revs 7 and 8
        seed(store, "next", 1)
        lines = out.wait_for(lambda ls: len(ls) >= 4)
    finally:
        interrupt(proc)
    assert [line.split()[0] for line in lines] == ["7", "8", "9", "10"]
    assert lines[2].split()[1:4] == ["next-0", "→", "pay"]
    assert lines[3].split()[1:3] == ["next-0", "ended"]


# --- migrate --------------------------------------------------------------------------------


def test_migrate_sqlite_creates_the_store(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "new.db"
    assert "SQLite store ready" in ok("migrate", "--store", f"sqlite:///{path}")
    assert path.exists()
    assert ok("states", "--store", f"sqlite:///{path}", "--json") == ""


def test_migrate_postgres() -> None:
    pgutil.require()
    schema = pgutil.new_schema()
    url = pgutil.dsn_for(schema)
    dry = ok("migrate", "--store", url, "--dry-run")
    assert f"pending in schema {schema}" in dry and "0001_init.sql" in dry
    applied = ok("migrate", "--store", url)
    assert "applied 1" in applied
    assert "up to date" in ok("migrate", "--store", url)
    seed(url, "pg", 2)
    rows = json_lines(ok("states", "--store", url, "--json", "--latest-only"))
    assert sorted(r["id"] for r in rows) == ["pg-0", "pg-1"]


def test_migrate_rejects_other_stores() -> None:
    for url in ("memory://", "http://127.0.0.1:1"):
        done = cli("migrate", "--store", url)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr


# --- against a server -----------------------------------------------------------------------


@pytest.fixture
def server(store: str) -> Iterator[str]:
    """``flowstate serve`` on the seeded store (port chosen by the OS), with a token."""
    proc, out = start("serve", "--store", store, "--addr", "127.0.0.1:0", "--token", "s3cret")
    try:
        lines = out.wait_for(lambda ls: any("serving" in line for line in ls))
        line = next(line for line in lines if "serving" in line)
        match = re.search(r" on 127\.0\.0\.1:(\d+)", json.loads(line)["msg"])
        assert match, line
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        interrupt(proc)


def test_cli_against_a_server(server: str, store: str) -> None:
    done = cli("states", "--store", server)
    assert done.returncode == 1
    assert "unauthenticated" in done.stderr or "token" in done.stderr
    token = ("--token", "s3cret")
    rows = json_lines(ok("states", "--store", server, "--json", "-l", "kind=order", *token))
    assert [r["rev"] for r in rows] == list(range(1, 9))
    shown = json.loads(ok("state", "order-3", "--store", server, "--json", *token))
    assert (shown["rev"], shown["transition"]["annotations"]) == (6, {"flowstate.state": "ended"})
    assert cli("state", "nope", "--store", server, *token).returncode == 1
    via_env = ok(
        "states", "-s", server, "--json", "--limit", "1", extra_env={"FLOWSTATE_TOKEN": "s3cret"}
    )
    assert json_lines(via_env)[0]["id"] == "order-0"

    proc, out = start(
        "watch", "--store", server, "--json", "--since-rev", "8", "-l", "kind=order", *token
    )
    try:
        seed(store, "remote", 1)  # another process commits straight into the server's store
        lines = out.wait_for(lambda ls: len(ls) >= 2)
    finally:
        interrupt(proc)
    assert [json.loads(line)["id"] for line in lines] == ["remote-0", "remote-0"]
