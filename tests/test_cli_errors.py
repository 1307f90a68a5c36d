"""The ``flowstate`` command never prints a traceback (issue 14, item 9).

Every case runs the command as a real subprocess and checks: no ``Traceback`` on stderr, one
``error: …`` line naming the real cause, and the exit status docs/cli.md promises (1: the
operation failed, 2: bad usage). A broken pipe ends the command quietly with status 141.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120.0
PG = "postgres@127.0.0.1:5432"


def env() -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSTATE_")}
    return {**clean, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "80"}


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flowstate", *args],
        capture_output=True,
        text=True,
        env=env(),
        cwd=cwd,
        timeout=TIMEOUT,
    )


def one_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    """The single ``error:`` line of a failed run; it must name every one of ``words``."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert done.returncode == code, (done.returncode, done.stderr)
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_available() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return False
    return True


needs_pg = pytest.mark.skipif(not pg_available(), reason="PostgreSQL not running")
COMMANDS = [["states"], ["state", "some-id"], ["serve", "--addr", "127.0.0.1:0"]]
IDS = ["states", "state", "serve"]


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_file_that_is_not_sqlite(command: list[str]) -> None:
    one_error(cli(*command, "--store", "sqlite:////etc/passwd"), 1, "/etc/passwd", "not a")


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_directory(command: list[str], tmp_path: Path) -> None:
    one_error(cli(*command, "--store", f"sqlite:///{tmp_path}"), 1, str(tmp_path), "directory")


@pytest.mark.parametrize("command", COMMANDS[:2], ids=IDS[:2])
def test_a_missing_sqlite_file(command: list[str], tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such.db"
    one_error(cli(*command, "--store", f"sqlite:///{missing}"), 1, str(missing))
    assert not missing.exists()


@needs_pg
@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_missing_postgres_database(command: list[str]) -> None:
    name = f"db_{uuid.uuid4().hex}"
    line = one_error(cli(*command, "--store", f"postgresql://{PG}/{name}"), 1, name)
    assert "does not exist" in line
    assert "cannot serve on" not in line


@needs_pg
@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_a_missing_postgres_role(command: list[str]) -> None:
    role = f"role_{uuid.uuid4().hex}"
    line = one_error(cli(*command, "--store", f"postgresql://{role}@127.0.0.1:5432/test"), 1, role)
    assert "does not exist" in line


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_an_unreachable_host(command: list[str]) -> None:
    port = free_port()  # nothing listens there
    line = one_error(cli(*command, "--store", f"postgresql://u@127.0.0.1:{port}/db"), 1, "refused")
    assert "cannot serve on" not in line  # the store is at fault, not the listen address
    assert str(port) in line


@pytest.mark.parametrize("command", COMMANDS, ids=IDS)
def test_an_unknown_host_name(command: list[str]) -> None:
    line = one_error(cli(*command, "--store", "postgresql://u@no-such-host.invalid/db"), 1)
    assert "no-such-host.invalid" in line
    assert "cannot serve on" not in line


_BAD_PORTS = ["postgresql://u@127.0.0.1:abc/db", "postgresql://u@127.0.0.1:99999/db"]
_BAD_SERVER_PORTS = ["http://127.0.0.1:abc", "http://127.0.0.1:70000"]


@pytest.mark.parametrize(
    ("command", "url"),
    [
        pytest.param(command, url, id=f"{name}-{url}")
        for command, name in zip(COMMANDS, IDS, strict=True)
        # serve takes database URLs only; the read commands also take a server's URL
        for url in _BAD_PORTS + ([] if name == "serve" else _BAD_SERVER_PORTS)
    ],
)
def test_a_bad_port(command: list[str], url: str) -> None:
    one_error(cli(*command, "--store", url), 2, "port")


def test_an_unreachable_server() -> None:
    port = free_port()
    one_error(cli("states", "--store", f"http://127.0.0.1:{port}"), 1, str(port))


def test_the_password_is_not_printed() -> None:
    port = free_port()
    done = cli("states", "--store", f"postgresql://u:hunter2@127.0.0.1:{port}/db")
    assert "hunter2" not in done.stderr
    one_error(done, 1)


def test_serve_blames_the_listen_address_when_it_is_at_fault(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        done = cli("serve", "--addr", addr, "--store", "memory://")
    one_error(done, 1, "cannot serve on", addr)


def test_version() -> None:
    done = cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("flowstate ")
    assert done.stdout.split()[1][0].isdigit()
    assert done.stderr == ""


@pytest.mark.skipif(shutil.which("head") is None, reason="no head(1)")
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_a_broken_pipe_exits_quietly(tmp_path: Path, as_json: bool) -> None:
    store = f"sqlite:///{tmp_path / 'big.db'}"
    fill = (
        "import asyncio, flowstate as fs\n"
        "async def main():\n"
        f"    d = fs.open_driver({store!r}); await d.open()\n"
        "    for i in range(0, 3000, 500):\n"
        "        cmds = []\n"
        "        for j in range(i, i + 500):\n"
        "            ctx = fs.StateCtx(current=fs.State(f's{j}', labels={'k': 'v' * 100}))\n"
        "            cmds.append(fs.park(ctx))\n"
        "        await d.commit(fs.commit(*cmds))\n"
        "    await d.close()\n"
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", fill], check=True, env=env(), timeout=TIMEOUT)
    args = ["states", "--store", store, "--limit", "0"] + (["--json"] if as_json else [])
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowstate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env(),
    )
    head = subprocess.run(["head", "-1"], stdin=proc.stdout, capture_output=True, timeout=TIMEOUT)
    assert proc.stdout is not None
    proc.stdout.close()  # head has gone: the pipe is broken
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert head.stdout.strip()
    assert stderr.decode() == ""
    # JSON is written state by state: the write after head left fails, status 141. The table
    # is one write that the pipe may take whole before head leaves: then 0 is right too.
    assert proc.returncode == 141 if as_json else proc.returncode in (0, 141)


def test_a_malformed_remote_host_is_a_usage_error() -> None:
    done = cli("serve", "--store", "memory://", "--addr", "127.0.0.1:0", "--remote-host", "h:x")
    one_error(done, 2, "--remote-host", "h:x")
    env_done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowstate",
            "serve",
            "--store",
            "memory://",
            "--addr",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        env={**env(), "FLOWSTATE_REMOTE_HOSTS": "ok,u@h"},
        timeout=TIMEOUT,
    )
    one_error(env_done, 2, "FLOWSTATE_REMOTE_HOSTS", "u@h")
