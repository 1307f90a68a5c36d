"""``flowstate serve`` as a pure store: without its recoverer and delayer on request.

A real ``flowstate serve`` process on SQLite. Its engine takes the roles while it starts,
before it listens, so once the server answers, the meta states of the roles it runs exist in
the store and those of the roles turned off never will.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

import flowstate as fs
from flowstate.delayer import META_ID as DELAYER_META
from flowstate.recovery import META_ID as RECOVERY_META
from flowstate.server import settings
from tests.test_cli import COMMAND, TIMEOUT, env

METAS = {RECOVERY_META, DELAYER_META}


@contextmanager
def served(db: Path, *args: str, extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``flowstate serve`` on the SQLite file ``db``; yields its URL once it answers."""
    proc = subprocess.Popen(
        [*COMMAND, "serve", "--store", f"sqlite:///{db}", "--addr", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**env(), **(extra_env or {})},
    )
    try:
        line = _serving_line(proc)
        match = re.search(r" on 127\.0\.0\.1:(\d+)", json.loads(line)["msg"])
        assert match, line
        url = f"http://127.0.0.1:{match.group(1)}"
        assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def _serving_line(proc: subprocess.Popen[str]) -> str:
    """The server's "serving …" log line; fails at once if the process ends before it."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process is gone

    threading.Thread(target=pump, daemon=True).start()
    while True:
        line = lines.get(timeout=TIMEOUT)
        if line is None:
            assert proc.stderr is not None
            raise AssertionError(f"the server exited ({proc.wait(TIMEOUT)}): {proc.stderr.read()}")
        if '"serving ' in line:
            return line


def metas_in(db: Path) -> set[str]:
    """The role meta states stored in the SQLite file ``db``."""

    async def read() -> set[str]:
        found = set()
        async with fs.Engine(fs.SqliteDriver(db), recovery=False, delayer=False) as engine:
            for meta in METAS:
                try:
                    await engine.do(fs.get_state_by_id(fs.StateCtx(), meta))
                except fs.NotFoundError:
                    continue
                found.add(meta)
        return found

    return asyncio.run(read())


CASES = [
    ("default", [], {}, METAS),
    ("--no-recoverer", ["--no-recoverer"], {}, {DELAYER_META}),
    ("--no-delayer", ["--no-delayer"], {}, {RECOVERY_META}),
    ("pure store by options", ["--no-recoverer", "--no-delayer"], {}, set()),
    (
        "pure store by environment",
        [],
        {"FLOWSTATE_NO_RECOVERER": "1", "FLOWSTATE_NO_DELAYER": "true"},
        set(),
    ),
    (
        "an option beats the environment",
        ["--recoverer"],
        {"FLOWSTATE_NO_RECOVERER": "1", "FLOWSTATE_NO_DELAYER": "1"},
        {RECOVERY_META},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_serve_runs_the_roles_asked_for(
    tmp_path: Path, case: tuple[str, list[str], dict[str, str], set[str]]
) -> None:
    _, args, extra_env, expected = case
    db = tmp_path / "store.db"
    with served(db, *args, extra_env=extra_env):
        assert metas_in(db) == expected
    assert metas_in(db) == expected  # shutting down wrote no other meta state either


async def _client_roles(url: str) -> tuple[bool, bool, str]:
    """A client engine with its own recoverer and delayer (as a Go client may run them):
    whether each role is active, and what a delayed state of its flow ran."""
    registry = fs.FlowRegistry()
    ran: asyncio.Queue[str] = asyncio.Queue()

    @registry.flow("remind")
    async def remind(ctx: fs.StateCtx, engine: fs.Engine) -> fs.Command:
        await ran.put(ctx.current.id)
        return fs.commit(fs.end(ctx))

    engine = fs.Engine(fs.NetDriver(url), registry, recovery=True, delayer=True)
    async with engine:
        assert engine.recoverer is not None and engine.delayer is not None
        roles = engine.recoverer.role.active, engine.delayer.role.active
        fired = ""
        if roles[1]:
            ctx = fs.StateCtx(current=fs.State(id="reminder"))
            await engine.do(fs.commit(fs.delay(ctx, "remind", timedelta(0))))
            fired = await asyncio.wait_for(ran.get(), TIMEOUT)
    return roles[0], roles[1], fired


def test_a_client_runs_the_roles_of_a_pure_store(tmp_path: Path) -> None:
    with served(tmp_path / "pure.db", "--no-recoverer", "--no-delayer") as url:
        assert asyncio.run(_client_roles(url)) == (True, True, "reminder")
    with served(tmp_path / "full.db") as url:
        assert asyncio.run(_client_roles(url)) == (False, False, "")  # the server holds them


def test_settings_read_the_role_switches_from_the_environment() -> None:
    for value, on in [("1", False), ("true", False), ("YES", False), ("0", True), ("", True)]:
        s = settings(env={"FLOWSTATE_NO_RECOVERER": value, "FLOWSTATE_NO_DELAYER": value})
        assert (s.recoverer, s.delayer) == (on, on), value
    s = settings(recoverer=True, delayer=False, env={"FLOWSTATE_NO_RECOVERER": "1"})
    assert (s.recoverer, s.delayer) == (True, False)
    assert (settings(env={}).recoverer, settings(env={}).delayer) == (True, True)
    with pytest.raises(fs.ValidationError, match="FLOWSTATE_NO_DELAYER"):
        settings(env={"FLOWSTATE_NO_DELAYER": "maybe"})
