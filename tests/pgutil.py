"""PostgreSQL for tests: availability, a fresh schema per test, and clean-up.

The server is the one at ``FLOWSTATE_TEST_PG_DSN`` (default: the machine's local PostgreSQL).
Without a server the PostgreSQL tests skip with the reason, except under CI (``CI=true``),
where a missing server fails them.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

DSN = os.environ.get("FLOWSTATE_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
PREFIX = f"fst_{os.getpid()}_"
_counter = itertools.count()


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in a thread (safe inside async tests)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(fn())  # type: ignore[arg-type]
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


@functools.cache
def unavailable() -> str | None:
    """None when the server answers, else why not."""
    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(DSN, timeout=5)
        await conn.close()

    try:
        run_sync(probe)
    except Exception as exc:
        return f"PostgreSQL not reachable at {DSN}: {exc!r}"
    return None


def require() -> None:
    """Skip (or, under CI, fail) the calling test when PostgreSQL is not available."""
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL tests must run)")
    pytest.skip(reason)


def new_schema() -> str:
    """A schema name no other test uses (the driver creates it on open)."""
    return f"{PREFIX}{next(_counter)}"


def dsn_for(schema: str) -> str:
    return f"{DSN}{'&' if '?' in DSN else '?'}schema={schema}"


def drop_schemas(prefix: str = PREFIX) -> None:
    """Drop every schema this test process created."""
    import asyncpg

    async def drop() -> None:
        conn = await asyncpg.connect(DSN)
        try:
            names = await conn.fetch(
                "SELECT nspname FROM pg_namespace WHERE nspname LIKE $1", prefix + "%"
            )
            for (name,) in names:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()

    if unavailable() is None:
        run_sync(drop)


async def raw(schema: str) -> Any:
    """A plain asyncpg connection whose search_path is ``schema`` (a store's own tables)."""
    import asyncpg

    return await asyncpg.connect(DSN, server_settings={"search_path": f'"{schema}"'})


def park_ctx(sid: str, **labels: str) -> Any:
    """A fresh ctx of state ``sid`` with ``labels``, ready to park."""
    import flowstate as fs

    return fs.StateCtx(current=fs.State(id=sid, labels=dict(labels)))
