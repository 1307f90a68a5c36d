"""The scenario harness (behaviour.md §7.0): a visit tracker and watcher helpers.

Nothing here sleeps a fixed time to decide an outcome: every wait polls a condition and gives up
only after a generous timeout, so a slow machine makes the suite slower, never flaky.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import Any

import pytest

import flowstate as fs

#: Default upper bound of every wait. Passing scenarios return as soon as the condition holds.
TIMEOUT = 5.0
_POLL = 0.01


class Tracker:
    """A thread-safe list of visits, appended to by flows (async ones and plain-function ones).

    ``track(ctx)`` records ``ctx.current.transition.to`` (the flow being run); with
    ``include_state`` it appends ``:resumed`` / ``:paused`` when the annotation ``state`` says
    so, with ``include_task_id`` it appends ``:`` and the state id.
    """

    def __init__(self, *, include_state: bool = False, include_task_id: bool = False) -> None:
        self.include_state = include_state
        self.include_task_id = include_task_id
        self._lock = threading.Lock()
        self._visited: list[str] = []

    def track(self, ctx: fs.StateCtx) -> None:
        visit = ctx.current.transition.to
        if self.include_state:
            state = ctx.current.annotation("state")
            if state == "resumed":
                visit += ":resumed"
            elif state == "paused":
                visit += ":paused"
        if self.include_task_id:
            visit += ":" + ctx.current.id
        with self._lock:
            self._visited.append(visit)

    @property
    def visited(self) -> list[str]:
        """A snapshot of the visits so far."""
        with self._lock:
            return list(self._visited)

    def reset(self) -> None:
        with self._lock:
            self._visited.clear()

    async def wait_visited_count_ge(self, n: int, timeout: float = TIMEOUT) -> list[str]:
        """Poll until at least ``n`` visits (or the timeout); return the snapshot. Never fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            visited = self.visited
            if len(visited) >= n or loop.time() >= deadline:
                return visited
            await asyncio.sleep(_POLL)

    async def wait_visited_equal(self, expected: list[str], timeout: float = TIMEOUT) -> None:
        """Wait for ``len(expected)`` visits, then require exactly ``expected`` (order matters)."""
        visited = await self.wait_visited_count_ge(len(expected), timeout)
        assert visited == expected, visited

    async def wait_sorted_visited_equal(
        self, expected: list[str], timeout: float = TIMEOUT
    ) -> None:
        """Like :meth:`wait_visited_equal`, on the lexicographically sorted visits."""
        visited = await self.wait_visited_count_ge(len(expected), timeout)
        assert sorted(visited) == sorted(expected)


class Signal:
    """A one-shot flag set by a flow (from any thread) and awaited by the test."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout: float = TIMEOUT) -> None:
        """Wait until set; fail the test after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._event.is_set():
            if loop.time() >= deadline:
                pytest.fail(f"signal not set within {timeout} s")
            await asyncio.sleep(_POLL)


def filter_system_states(states: Iterable[fs.State]) -> list[fs.State]:
    """Drop the engine's own states (ids starting with ``flowstate.``)."""
    return [s for s in states if not fs.is_system(s.id)]


async def watch_collect_states(watcher: Any, n: int, timeout: float = TIMEOUT) -> list[fs.State]:
    """Read ``n`` non-system states from ``watcher`` in delivery order.

    Each state must carry ``committed_at``; it is blanked so that states compare by content.
    Fails when fewer than ``n`` states arrive within ``timeout`` seconds or the watcher ends.
    ``n == 0`` returns at once: proving that nothing *would* arrive takes a sentinel commit
    (see ``test_watch_since_time``), not a fixed wait.
    """
    collected: list[fs.State] = []
    if n <= 0:
        return collected
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(collected) < n:
        remaining = deadline - loop.time()
        if remaining <= 0:
            pytest.fail(f"watcher delivered {len(collected)} of {n} states within {timeout} s")
        try:
            state = await asyncio.wait_for(anext(watcher), remaining)
        except TimeoutError:
            pytest.fail(f"watcher delivered {len(collected)} of {n} states within {timeout} s")
        except StopAsyncIteration:
            pytest.fail(f"watcher ended after {len(collected)} of {n} states")
        if fs.is_system(state.id):
            continue
        assert state.committed_at is not None, f"state {state.id}@{state.rev} has no committed_at"
        assert state.committed_at.timestamp() > 0
        state.committed_at = None
        collected.append(state)
    return collected


async def query(engine: fs.Engine, cmd: fs.GetStatesCmd) -> tuple[list[fs.State], bool]:
    """Run a get_states command; return (non-system states, more)."""
    await engine.do(cmd)
    assert cmd.result is not None
    return filter_system_states(cmd.result.states), cmd.result.more
