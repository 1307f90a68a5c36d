"""The README's snippets run, and CI runs exactly the README's test command."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import flowstate as fs

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_snippet_runs(index: int, tmp_path: Path) -> None:
    script = tmp_path / f"snippet{index}.py"
    script.write_text(SNIPPETS[index])
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip(), "a snippet should show what it did"


def test_ci_runs_the_readme_test_command() -> None:
    block = README.split("<!-- test-command -->", 1)[1]
    command = re.search(r"```sh\n(.*?)\n```", block, re.S)
    assert command is not None
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.group(1).strip() in [line.strip() for line in ci]


def test_quick_start_has_exactly_two_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)\n```", quick, re.S)
    assert len(blocks) == 2
    assert all("python3 -m venv" in b and "\n" not in b.strip() for b in blocks)


def test_main_command_serves_the_ui_with_a_demo_workflow(tmp_path: Path) -> None:
    """The quick start's first command, minus the install: ``flowstate serve --demo`` (the
    entry point of this environment) serves the UI and runs demo orders to their end in
    ``flowstate.db`` in the current directory, and stops cleanly on SIGTERM."""
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    first = re.findall(r"```sh\n(.*?)\n```", quick, re.S)[0]
    run = shlex.split(first.split("&&")[-1])
    assert run[0] == ".venv/bin/flowstate"
    exe = Path(sys.executable).parent / "flowstate"
    assert exe.exists(), "the flowstate command is not installed in this environment"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLOWSTATE_ADDR": f"127.0.0.1:{port}"}
    proc = subprocess.Popen(
        [str(exe), *run[1:]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                page = httpx.get(url + "/")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                assert proc.poll() is None, "the server exited"
                time.sleep(0.05)
        assert page.status_code == 200 and "flowstate" in page.text

        async def demo_order_ended() -> bool:
            engine = fs.Engine(fs.open_driver(url), recovery=False, delayer=False)
            async with engine:
                async for state in engine.iter(fs.get_states({"app": "demo"}, latest_only=True)):
                    if fs.ended(state):
                        return True
            return False

        while not asyncio.run(demo_order_ended()):
            assert time.monotonic() < deadline, "no demo order ended"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert (tmp_path / "flowstate.db").exists()
