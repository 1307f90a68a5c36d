"""SqliteDriver's inline commit path (synchronous NORMAL and OFF; see docs/sqlite.md).

A commit runs on the event loop thread only when it cannot block there: the writer thread is
idle, the write lock is free (no busy wait), and the WAL has room, so the COMMIT appends
frames without a sync and no checkpoint runs. Everything else goes to the writer thread.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs
from flowstate.drivers.sqlite import SqliteDriver
from tests.test_sqlite_faults import (  # noqa: F401  (tmpfs is a fixture)
    SmallCacheDriver,
    pair,
    sqlite_threads,
    stored,
    tmpfs,
    within,
)


class CountingQueue:
    """The writer's job queue, counting the jobs put in it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.queued = 0

    def put(self, item: Any) -> None:
        if item is not None:
            self.queued += 1
        self.inner.put(item)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
async def normal(tmp_path: Path) -> AsyncIterator[SqliteDriver]:
    d = SqliteDriver(tmp_path / "inline.db", synchronous="NORMAL")
    await d.open()
    try:
        yield d
    finally:
        await within(d.close())
    assert not sqlite_threads()


def wal_frames(driver: SqliteDriver) -> int:
    size = os.path.getsize(driver.path + "-wal")
    return max(0, size - 32) // (4096 + 24)


async def test_commits_run_inline_and_checkpoints_keep_the_wal_bounded(
    normal: SqliteDriver,
) -> None:
    counting = CountingQueue(normal._queue)
    normal._queue = counting  # type: ignore[assignment]
    ctx = fs.StateCtx(current=fs.State(id="s"))
    n = 3000
    for _ in range(n):
        await normal.commit(fs.commit(fs.park(ctx)))
    assert (await normal.get_state("s", 0)).rev == ctx.committed.rev == n
    # the first commit writes the WAL header, then one or two commits per WAL cycle go to
    # the writer thread (the one that checkpoints and the one that restarts the WAL)
    assert counting.queued < n // 50, counting.queued
    # the WAL is checkpointed and reused, never grown past the checkpoint threshold by much
    assert wal_frames(normal) < 1100, wal_frames(normal)


async def test_full_commits_never_run_inline(tmp_path: Path) -> None:
    d = SqliteDriver(tmp_path / "full.db", synchronous="FULL")  # every COMMIT syncs
    await d.open()
    try:
        assert d._fast is None
        counting = CountingQueue(d._queue)
        d._queue = counting  # type: ignore[assignment]
        ctx = fs.StateCtx(current=fs.State(id="s"))
        for _ in range(20):
            await d.commit(fs.commit(fs.park(ctx)))
        assert counting.queued == 20
    finally:
        await d.close()


async def test_an_inline_conflict_stores_nothing_and_the_next_commit_lands(
    normal: SqliteDriver,
) -> None:
    a = fs.StateCtx(current=fs.State(id="a"))
    for _ in range(5):
        await normal.commit(fs.commit(fs.park(a)))
    stale = fs.StateCtx(current=fs.State(id="a"), committed=fs.State(id="a", rev=1))
    other = fs.StateCtx(current=fs.State(id="b"))
    head = await normal.head_rev()
    with pytest.raises(fs.RevMismatchError):
        await normal.commit(fs.commit(fs.park(other), fs.park(stale)))
    assert await normal.head_rev() == head
    assert await stored(normal, "b") is None
    assert other.committed.rev == 0  # the caller's ctx is untouched
    await normal.commit(fs.commit(fs.park(other)))
    assert (await normal.get_state("b", 0)).rev == head + 1


async def test_a_write_lock_held_elsewhere_sends_the_commit_to_the_writer_thread(
    normal: SqliteDriver,
) -> None:
    ctx = fs.StateCtx(current=fs.State(id="s"))
    for _ in range(3):
        await normal.commit(fs.commit(fs.park(ctx)))
    other = sqlite3.connect(normal.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(normal.commit(fs.commit(fs.park(ctx))))
        # the event loop keeps running while the commit waits for the lock
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert not task.done()
        other.execute("COMMIT")
        await within(task)
    finally:
        other.close()
    assert (await normal.get_state("s", 0)).rev == ctx.committed.rev == 4


async def test_a_commit_cancelled_before_it_starts_does_not_land(normal: SqliteDriver) -> None:
    ctx = fs.StateCtx(current=fs.State(id="s"))
    await normal.commit(fs.commit(fs.park(ctx)))
    task = asyncio.create_task(normal.commit(fs.commit(fs.park(ctx))))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (await normal.get_state("s", 0)).rev == ctx.committed.rev == 1


async def test_disk_full_on_the_inline_path_fails_cleanly_and_recovers(tmpfs: Path) -> None:  # noqa: F811
    driver = SmallCacheDriver(tmpfs / "full.db", synchronous="NORMAL")
    await within(driver.open())
    try:
        assert driver._fast is not None
        free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * max(0, free - 400 * 1024))
        pad = "x" * 8000
        ok: dict[int, int] = {}
        failed: dict[int, BaseException] = {}
        i = 0
        while len(failed) < 5 and i < 2000:
            cmd, ctx, _ = pair(i, pad)
            try:
                await within(driver.commit(cmd))
                ok[i] = ctx.committed.rev
            except fs.FlowstateError as exc:
                failed[i] = exc
            i += 1
        assert failed, "the disk never filled up"
        assert all(isinstance(e, fs.StoreUnavailableError) for e in failed.values()), failed
        assert driver.unavailable() is None
        for n in range(i):
            a, b = await stored(driver, f"a{n}"), await stored(driver, f"b{n}")
            assert (a is None) == (b is None), f"commit {n} is only partly stored"
            if n in ok:
                assert a is not None and a.rev == ok[n]
            else:
                assert a is None, f"commit {n} failed with {failed[n]!r} but is stored"
        filler.unlink()
        for n in range(i, i + 20):
            cmd, _, _ = pair(n, pad)
            await within(driver.commit(cmd))
            assert (await stored(driver, f"a{n}")) is not None
    finally:
        await within(driver.close())
    assert not sqlite_threads()


async def test_a_label_entry_left_by_a_single_statement_commit_is_never_returned(
    normal: SqliteDriver,
) -> None:
    warm = fs.StateCtx(current=fs.State(id="warm"))
    for _ in range(3):
        await normal.commit(fs.commit(fs.park(warm)))
    ctx = fs.StateCtx(current=fs.State(id="s", labels={"k": "v"}))
    await normal.commit(fs.commit(fs.park(ctx)))
    # a ctx whose committed version claims no labels (the stored one has k=v): its unlabelled
    # park is one statement that does not clear the old version's latest-label entry
    liar = fs.StateCtx(current=fs.State(id="s"), committed=fs.State(id="s", rev=ctx.committed.rev))
    await normal.commit(fs.commit(fs.park(liar)))
    conn = sqlite3.connect(normal.path)
    try:
        left = conn.execute("SELECT rev FROM flowstate_latest_labels").fetchall()
    finally:
        conn.close()
    assert left == [(ctx.committed.rev,)]  # the entry is there...
    for cmd in (
        fs.GetStatesCmd(labels=[{"k": "v"}], latest_only=True),
        fs.GetStatesCmd(labels=[{"x": "y"}, {"k": "v"}], latest_only=True, since_rev=-1),
    ):
        r = await normal.get_states(cmd)
        assert r.states == [] and not r.more  # ...and never returned as the latest version
    assert (await normal.get_state("s", 0)).labels == {}


async def test_disk_full_on_a_single_statement_commit_fails_cleanly_and_recovers(
    tmpfs: Path,  # noqa: F811
) -> None:
    driver = SmallCacheDriver(tmpfs / "lean.db", synchronous="NORMAL")
    await within(driver.open())
    try:
        free = os.statvfs(tmpfs).f_bavail * os.statvfs(tmpfs).f_frsize
        filler = tmpfs / "filler"
        filler.write_bytes(b"\0" * max(0, free - 400 * 1024))
        pad = {"pad": "x" * 8000}
        ok: dict[str, int] = {}
        failed: dict[str, BaseException] = {}
        i = 0
        while len(failed) < 5 and i < 2000:
            ctx = fs.StateCtx(current=fs.State(id=f"s{i}", annotations=dict(pad)))
            try:
                await within(driver.commit(fs.commit(fs.park(ctx))))  # one statement
                ok[ctx.current.id] = ctx.committed.rev
            except fs.FlowstateError as exc:
                failed[ctx.current.id] = exc
            i += 1
        assert failed, "the disk never filled up"
        assert all(isinstance(e, fs.StoreUnavailableError) for e in failed.values()), failed
        for sid, rev in ok.items():
            got = await stored(driver, sid)
            assert got is not None and got.rev == rev
        for sid, exc in failed.items():
            if isinstance(exc, fs.StoreWriteError):
                assert await stored(driver, sid) is None, f"{sid} failed with {exc!r}"
        assert driver.unavailable() is None
        filler.unlink()
        ctx = fs.StateCtx(current=fs.State(id="after", annotations=dict(pad)))
        await within(driver.commit(fs.commit(fs.park(ctx))))
        assert (await stored(driver, "after")) is not None
    finally:
        await within(driver.close())
    assert not sqlite_threads()


async def test_commits_of_several_tasks_go_to_the_writer_thread_in_batches(
    normal: SqliteDriver,
) -> None:
    ctxs = [fs.StateCtx(current=fs.State(id=f"w{i}")) for i in range(4)]
    for ctx in ctxs:
        await normal.commit(fs.commit(fs.park(ctx)))
    counting = CountingQueue(normal._queue)
    normal._queue = counting  # type: ignore[assignment]

    async def worker(ctx: fs.StateCtx) -> None:
        for _ in range(25):
            await normal.commit(fs.commit(fs.park(ctx)))

    await asyncio.gather(*(worker(c) for c in ctxs))
    assert counting.queued >= 90, counting.queued  # interleaved tasks: the writer batches them
    assert all(c.committed.rev > 0 for c in ctxs)


async def test_a_task_committing_in_a_loop_lets_the_loop_run_other_tasks(
    normal: SqliteDriver,
) -> None:
    ctx = fs.StateCtx(current=fs.State(id="s"))
    for _ in range(3):
        await normal.commit(fs.commit(fs.park(ctx)))
    ticks = 0
    stop = False

    async def other() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    bystander = asyncio.create_task(other())
    await asyncio.sleep(0)
    start = ticks
    for _ in range(200):
        await normal.commit(fs.commit(fs.park(ctx)))
    stop = True
    await bystander
    # inline commits never wait, yet the committing task yields every few commits
    assert ticks - start >= 200 // 8 - 2, ticks - start
