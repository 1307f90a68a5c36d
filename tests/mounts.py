"""A small tmpfs of its own for a test that must fill a real disk.

Mounting needs root: elsewhere the test skips with the reason, except under CI (``CI=true``),
where that is a failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test must run)")
    pytest.skip(reason)


@contextlib.contextmanager
def tmpfs(where: Path, size_mib: int) -> Iterator[Path]:
    """A tmpfs of ``size_mib`` MiB mounted at ``where`` (created), unmounted at the end."""
    where.mkdir()
    if shutil.which("mount") is None or shutil.which("umount") is None:
        skip_or_fail("mount/umount not found: cannot create a small tmpfs to fill")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        skip_or_fail(f"mounting a tmpfs is not permitted here: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=True)
