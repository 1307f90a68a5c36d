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
import enum
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

    async def wait_freed(self) -> None:
        """Return once fewer than ``limit`` executions run (at once if that is so now)."""
        while self._running >= max(self.limit, 1):
            self._freed.clear()
            await self._freed.wait()

    def _release(self) -> None:
        self._running -= 1
        self._freed.set()


class RoleState(enum.Enum):
    """Where a process stands in a role (design.md: roles are explicit state machines).

    ``STANDBY`` → ``ACTIVE`` (its claim or creation of the meta state won) → ``STANDBY`` (another
    process committed the meta state with ``state=active``, or one of our writes conflicted)
    → … ; on shutdown ``ACTIVE`` → ``STEPPING_DOWN`` (writing ``state=inactive``) →
    ``RELEASED``, or ``STANDBY`` → ``RELEASED`` (a standby writes nothing). ``RELEASED`` is
    final. Every change is reported to the worker, which drops what it held in memory.
    """

    STANDBY = "standby"
    ACTIVE = "active"
    STEPPING_DOWN = "stepping down"
    RELEASED = "released"


_ALLOWED: dict[RoleState, frozenset[RoleState]] = {
    RoleState.STANDBY: frozenset({RoleState.ACTIVE, RoleState.RELEASED}),
    RoleState.ACTIVE: frozenset({RoleState.STANDBY, RoleState.STEPPING_DOWN}),
    RoleState.STEPPING_DOWN: frozenset({RoleState.RELEASED}),
    RoleState.RELEASED: frozenset(),
}

#: How long (seconds, real time) a cancelled meta write is given to settle before it is given up.
SETTLE_TIMEOUT = 10.0


class Role:
    """Whether this process is the active one for the meta state ``meta_id``.

    Invariants: at most one process is ``ACTIVE`` per meta state as far as the store can tell
    (every claim is an optimistic commit); ``meta`` is the latest version of the meta state
    this process read or wrote, and every meta write settles (a cancelled caller waits for its
    write's outcome) so that ``meta`` never trails a version we wrote; ``_mine`` holds the
    revs we wrote. ``on_change`` is called after every change of :attr:`state`.
    """

    def __init__(
        self,
        engine: Engine,
        meta_id: str,
        takeover_after: float,
        on_change: Callable[[RoleState], None] | None = None,
    ) -> None:
        self.engine = engine
        self.meta_id = meta_id
        self.takeover_after = takeover_after
        self.meta = StateCtx()
        self._state = RoleState.STANDBY
        self._on_change = on_change
        self._mine: set[int] = set()
        # a write whose outcome we never learned (cancelled, or failed without a verdict):
        # its state annotations, to recognise it if it did land
        self._unsettled: dict[str, str] | None = None

    @property
    def state(self) -> RoleState:
        """Where this process stands (see :class:`RoleState`)."""
        return self._state

    @property
    def active(self) -> bool:
        """Whether this process holds the role (and may do the work)."""
        return self._state is RoleState.ACTIVE

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
        ctx.current.annotations[RECOVERY_ENABLED] = "false"  # as Go writes it
        await self._claim_with(ctx)  # on a conflict another process created it: stand by

    async def check(self, has_work: bool) -> bool:
        """Re-read the meta state (one read); step down or take over as the rules say. True if
        the role changed to active."""
        if self._state not in (RoleState.ACTIVE, RoleState.STANDBY):
            return False
        await self._reload()
        state = self.meta.current
        if self._state is RoleState.ACTIVE:
            if self._ours(state):
                return False
            # someone else wrote the meta state: a claim (step down), or a release by a
            # process that was not active (Go's standby does that): step down, then claim
            self._become(RoleState.STANDBY)
            if state.transition.annotations.get(ROLE) == ACTIVE:
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
        for _ in range(2):
            if not self.active:
                return False
            ctx = self.meta.copy()
            ctx.current.annotations.update(annotations)
            try:
                await self._commit(ctx, ACTIVE)
                return True
            except RevMismatchError:
                if not await self._latest_is_ours():
                    self._become(RoleState.STANDBY)
                    return False
        return False

    async def release(self, annotations: Mapping[str, str]) -> None:
        """On shutdown: the active process stores progress and marks the role free (a standby
        writes nothing). If a write of ours landed unseen meanwhile, the release retries on
        top of it, so that the next process can take over at once."""
        if self._state is RoleState.STANDBY:
            if self._unsettled is not None and await self._latest_is_ours():
                self._become(RoleState.ACTIVE)  # a claim of ours landed unseen: free it
            else:
                self._become(RoleState.RELEASED)
                return
        if self._state is not RoleState.ACTIVE:
            return
        self._become(RoleState.STEPPING_DOWN)
        try:
            for _ in range(3):
                ctx = self.meta.copy()
                ctx.current.annotations.update(annotations)
                try:
                    await self._commit(ctx, INACTIVE)
                    return
                except RevMismatchError:
                    if not await self._latest_is_ours():
                        return  # someone took over meanwhile: the role is theirs
        finally:
            self._become(RoleState.RELEASED)

    async def _claim(self) -> bool:
        ctx = self.meta.copy()
        await self._claim_with(ctx)
        return self.active

    async def _claim_with(self, ctx: StateCtx) -> None:
        """Commit ``ctx`` with ``state=active``; become active if it was stored, even when the
        caller is being cancelled meanwhile (so that the release frees the role)."""
        try:
            await self._commit(ctx, ACTIVE)
        except RevMismatchError:
            await self._reload()
            return
        except asyncio.CancelledError:
            if self.meta is ctx:  # the claim settled as stored
                self._become(RoleState.ACTIVE)
            raise
        self._become(RoleState.ACTIVE)

    async def _commit(self, ctx: StateCtx, role: str) -> None:
        """Commit ``park(ctx, state=role)`` and adopt it as :attr:`meta` once stored.

        The write runs in a task of its own: cancelling the caller does not abandon it half
        way; the caller waits (up to SETTLE_TIMEOUT) for its outcome, adopts it if it landed,
        then re-raises the cancellation. A write whose outcome stays unknown is remembered.
        """
        attempted = dict(ctx.current.annotations)
        self._unsettled = attempted
        task = asyncio.ensure_future(self.engine.do(commit(park(ctx, {ROLE: role}))))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            await _settle(task)
            error = task.exception() if task.done() and not task.cancelled() else None
            if task.done() and not task.cancelled() and error is None:
                self._adopt(ctx)
            elif isinstance(error, RevMismatchError):
                self._unsettled = None
            raise
        except RevMismatchError:
            self._unsettled = None
            raise
        self._adopt(ctx)

    async def _latest_is_ours(self) -> bool:
        """After a conflict: whether the latest meta version is one we wrote (a write whose
        answer was lost); if so it is now :attr:`meta`."""
        await self._reload()
        return self._ours(self.meta.current)

    def _ours(self, latest: State) -> bool:
        """Whether ``latest`` (just read) was written by this process: a rev we adopted, or
        the write whose outcome we never learned (same annotations, ``state=active``)."""
        if latest.rev in self._mine:
            return True
        unsettled, self._unsettled = self._unsettled, None
        if (
            unsettled is not None
            and latest.transition.annotations.get(ROLE) == ACTIVE
            and latest.annotations == unsettled
        ):
            self._mine.add(latest.rev)
            return True
        return False

    def _adopt(self, ctx: StateCtx) -> None:
        self.meta = ctx
        self._mine.add(ctx.committed.rev)
        self._unsettled = None

    def _become(self, new: RoleState) -> None:
        old = self._state
        if new is old:
            return
        if new not in _ALLOWED[old]:
            raise AssertionError(f"role {self.meta_id}: {old.value} -> {new.value} not allowed")
        self._state = new
        if self._on_change is not None:
            self._on_change(new)

    async def _reload(self) -> bool:
        ctx = StateCtx()
        try:
            await self.engine.do(get_state_by_id(ctx, self.meta_id))
        except NotFoundError:
            return False
        self.meta = ctx
        return True


async def _settle(task: asyncio.Future[None]) -> None:
    """Wait for ``task`` despite further cancellations, at most SETTLE_TIMEOUT seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            task.cancel()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({task}, timeout=remaining)
    if not task.cancelled():
        task.exception()  # retrieved: an outcome we handle is not "never retrieved"


class RoleWorker:
    """A loop in every process that does its work only while it holds the :class:`Role` of
    ``meta_id``: ticks every ``interval`` seconds of the engine's clock, stores its progress
    on the meta state, and releases the role on shutdown. Subclasses define :meth:`tick`,
    :meth:`_reset` (load progress from the meta state) and :meth:`_progress`."""

    name = "worker"

    def __init__(self, engine: Engine, meta_id: str, interval: float, takeover_after: float):
        self.engine = engine
        self.interval = interval
        self.role = Role(engine, meta_id, takeover_after, on_change=self._role_changed)
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

    def _role_changed(self, state: RoleState) -> None:
        """Every change of role drops what the previous one held in memory."""
        self._reset()

    def _reset(self) -> None:
        """Forget in-memory work and load progress from the meta state (``role.annotations``).
        Called at start and on every change of role."""
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
