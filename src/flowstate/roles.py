"""Active/standby between processes, through a parked meta state in the store.

The recoverer and the delayer each run in every process, but only one process does the work:
the one whose commit of the meta state with ``state=active`` succeeded. The others stand by
and take over when the active one shuts down cleanly (it writes ``state=inactive``) or when it
has not written the meta state for ``takeover_after`` seconds while there is work. Every
claim is an optimistic commit on the meta state, so at most one claimant wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from flowstate.commands import commit, get_state_by_id, park
from flowstate.errors import NotFoundError, RevMismatchError
from flowstate.state import State, StateCtx

if TYPE_CHECKING:
    from flowstate.engine import Engine

ROLE = "state"
ACTIVE = "active"
INACTIVE = "inactive"
RECOVERY_ENABLED = "flowstate.recovery.enabled"

log = logging.getLogger("flowstate")

T = TypeVar("T")

#: How many retries or firings a worker runs at once.
BATCH = 32


async def in_batches(
    items: Sequence[T], fn: Callable[[T], Awaitable[object]], size: int = BATCH
) -> list[tuple[T, BaseException | None]]:
    """Run ``fn`` on ``items``, ``size`` at a time; stop after the first batch with a failure.
    Returns (item, exception or None) for every item that ran."""
    done: list[tuple[T, BaseException | None]] = []
    for start in range(0, len(items), size):
        batch = items[start : start + size]
        results = await asyncio.gather(*(fn(item) for item in batch), return_exceptions=True)
        failed = False
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            error = result if isinstance(result, BaseException) else None
            failed = failed or error is not None
            done.append((item, error))
        if failed:
            break
    return done


class ExecutionGate:
    """Starts executions in the background for a worker, at most ``limit`` running at once.

    After an outage the recoverer and the delayer may find thousands of states due at once;
    without a gate each would start its execution immediately. :meth:`start` waits for a free
    slot (so the worker's tick slows down instead of flooding the process), then runs the
    execution as an engine background task, whose failures the engine logs.
    """

    def __init__(self, engine: Engine, limit: int = 64) -> None:
        self.engine = engine
        self.limit = limit
        self._running = 0
        self._freed = asyncio.Event()

    @property
    def running(self) -> int:
        """Executions started through this gate that have not finished."""
        return self._running

    async def start(self, ctx: StateCtx) -> None:
        """Wait until fewer than ``limit`` executions of this gate run, then start one."""
        while self._running >= max(self.limit, 1):
            self._freed.clear()
            await self._freed.wait()
        self._running += 1
        try:
            task = self.engine.spawn_execution(ctx)
        except BaseException:
            self._release()
            raise
        task.add_done_callback(lambda _t: self._release())

    def _release(self) -> None:
        self._running -= 1
        self._freed.set()


class Role:
    """Whether this process is the active one for the meta state ``meta_id``."""

    def __init__(self, engine: Engine, meta_id: str, takeover_after: float) -> None:
        self.engine = engine
        self.meta_id = meta_id
        self.takeover_after = takeover_after
        self.active = False
        self.meta = StateCtx()
        self._mine: set[int] = set()

    @property
    def annotations(self) -> dict[str, str]:
        """The meta state's annotations as last read or written."""
        return self.meta.current.annotations

    async def start(self, initial: Mapping[str, str]) -> None:
        """Create the meta state (and become active) or read it and decide."""
        if await self._reload():
            if self.meta.current.transition.annotations.get(ROLE) != ACTIVE:
                await self._claim()
            return
        ctx = StateCtx(current=State(self.meta_id, annotations=dict(initial)))
        ctx.current.annotations[RECOVERY_ENABLED] = "false"
        try:
            await self.engine.do(commit(park(ctx, {ROLE: ACTIVE})))
        except RevMismatchError:
            await self._reload()
            self.active = False
            return
        self._adopt(ctx)

    async def check(self, has_work: bool) -> bool:
        """Re-read the meta state; step down or take over as the rules say. True if the role
        changed to active."""
        await self._reload()
        state = self.meta.current
        if self.active:
            if state.rev not in self._mine and state.transition.annotations.get(ROLE) == ACTIVE:
                self.active = False  # another process took over
            return False
        if state.transition.annotations.get(ROLE) != ACTIVE:
            return await self._claim()
        at = state.committed_at
        stale = at is None or (self.engine.clock.now() - at).total_seconds() > self.takeover_after
        if stale and has_work:
            return await self._claim()
        return False

    async def write(self, annotations: Mapping[str, str]) -> bool:
        """As the active process, store progress (and prove liveness). False if we lost."""
        if not self.active:
            return False
        ctx = self.meta.copy()
        ctx.current.annotations.update(annotations)
        try:
            await self.engine.do(commit(park(ctx, {ROLE: ACTIVE})))
        except RevMismatchError:
            self.active = False
            await self._reload()
            return False
        self._adopt(ctx)
        return True

    async def release(self, annotations: Mapping[str, str]) -> None:
        """On shutdown of the active process: store progress and mark the role free."""
        if not self.active:
            return
        ctx = self.meta.copy()
        ctx.current.annotations.update(annotations)
        with contextlib.suppress(RevMismatchError):  # someone took over meanwhile
            await self.engine.do(commit(park(ctx, {ROLE: INACTIVE})))
        self.active = False

    async def _claim(self) -> bool:
        ctx = self.meta.copy()
        try:
            await self.engine.do(commit(park(ctx, {ROLE: ACTIVE})))
        except RevMismatchError:
            await self._reload()
            return False
        self._adopt(ctx)
        return True

    def _adopt(self, ctx: StateCtx) -> None:
        self.meta = ctx
        self._mine.add(ctx.committed.rev)
        self.active = True

    async def _reload(self) -> bool:
        ctx = StateCtx()
        try:
            await self.engine.do(get_state_by_id(ctx, self.meta_id))
        except NotFoundError:
            return False
        self.meta = ctx
        return True


class RoleWorker:
    """A loop in every process that does its work only while it holds the :class:`Role` of
    ``meta_id``: ticks every ``interval`` seconds of the engine's clock, stores its progress
    on the meta state, and releases the role on shutdown. Subclasses define :meth:`tick`,
    :meth:`_reset` (load progress from the meta state) and :meth:`_progress`."""

    name = "worker"

    def __init__(self, engine: Engine, meta_id: str, interval: float, takeover_after: float):
        self.engine = engine
        self.interval = interval
        self.role = Role(engine, meta_id, takeover_after)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ticked = asyncio.Event()

    @property
    def takeover_after(self) -> float:
        """Seconds of silence of the active process after which a standby takes over (while
        there is work waiting)."""
        return self.role.takeover_after

    @takeover_after.setter
    def takeover_after(self, seconds: float) -> None:
        self.role.takeover_after = seconds

    async def start(self) -> None:
        """Claim the role or stand by, then start ticking."""
        await self.role.start(self._progress())
        self._reset()
        self._task = asyncio.create_task(self._run(), name=f"flowstate-{self.name}")

    async def shutdown(self) -> None:
        """Stop ticking; the active process stores its progress and frees the role."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.role.release(self._progress())

    async def wait_tick(self) -> None:
        """Wait for the next completed tick (for tests and tools)."""
        self._ticked.clear()
        await self._ticked.wait()

    async def tick(self) -> None:
        raise NotImplementedError

    def _reset(self) -> None:
        raise NotImplementedError

    def _progress(self) -> dict[str, str]:
        raise NotImplementedError

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.tick()
            except Exception:
                self._tick_failed()
                log.exception("%s tick failed; retrying next tick", self.name)
            self._ticked.set()
            await self._sleep()

    def _tick_failed(self) -> None:
        pass

    async def _sleep(self) -> None:
        await self.engine.clock.sleep(self.interval)
