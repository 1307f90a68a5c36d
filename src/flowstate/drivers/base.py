"""The driver seam, and the commit logic every driver shares.

A driver stores state versions, data blobs and delayed states. It is handed commands that the
engine has already validated; for a commit it runs :func:`process_commit`, which performs the
sub-commands on private copies of the callers' ctxs and asks the driver's transaction for the
few storage operations it needs. The callers' ctxs are only updated once the driver has made the
whole commit durable (:meth:`CommitOutcome.apply`).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from flowstate import perform
from flowstate.clock import Clock, SystemClock, from_millis, to_millis
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    DelayedState,
    GetDataCmd,
    GetDelayedStatesResult,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    GetStatesResult,
    NoopCmd,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.data import Data
from flowstate.errors import RevMismatchError, ValidationError
from flowstate.state import State, StateCtx

if TYPE_CHECKING:
    from flowstate.tail import Tail

T = TypeVar("T")


class CommitTx(Protocol):
    """What a commit needs from a driver's open transaction. Called in sub-command order.

    ``commit_state`` sets ``state.rev`` to the next global rev and stores ``state`` if the
    latest stored rev of ``state.id`` equals ``expected_rev`` (0: no version may exist);
    otherwise it stores nothing and returns False. Writes of a commit that ends with an
    exception (conflict included) must be rolled back by the driver.
    """

    def commit_state(self, state: State, expected_rev: int) -> bool: ...

    def get_state(self, state_id: str, rev: int) -> State: ...

    def get_state_by_labels(self, labels: Mapping[str, str]) -> State: ...

    def store_data(self, data: Data) -> None: ...

    def get_data(self, data: Data) -> None: ...

    def delay(self, delayed: DelayedState) -> int: ...


class AsyncCommitTx(Protocol):
    """:class:`CommitTx` with coroutine methods, for drivers whose client is asynchronous."""

    async def commit_state(self, state: State, expected_rev: int) -> bool: ...

    async def get_state(self, state_id: str, rev: int) -> State: ...

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State: ...

    async def store_data(self, data: Data) -> None: ...

    async def get_data(self, data: Data) -> None: ...

    async def delay(self, delayed: DelayedState) -> int: ...


# One storage request of a commit: the CommitTx method name and its arguments.
TxOp = tuple[str, tuple[Any, ...]]


@dataclass(slots=True)
class CommitOutcome:
    """The result of a processed commit, applied to the callers' objects once it is durable."""

    pairs: list[tuple[StateCtx, StateCtx]] = field(default_factory=list)
    delays: list[tuple[DelayCmd, DelayedState]] = field(default_factory=list)
    max_rev: int = 0
    #: The versions stored, in commit order (never handed to a caller: the ctxs get copies).
    stored: list[State] = field(default_factory=list)

    def apply(self) -> None:
        for orig, work in self.pairs:
            orig.current = work.current
            orig.committed = work.committed
            orig.transitions = work.transitions
            datas = orig.datas
            for alias in [a for a in datas if a not in work.datas]:
                del datas[alias]
            for alias, wd in work.datas.items():
                od = datas.get(alias)
                if od is None:
                    datas[alias] = wd
                else:
                    od.blob, od.annotations, od.rev = wd.blob, wd.annotations, wd.rev
        for cmd, delayed in self.delays:
            cmd.result = delayed


def process_commit(cmd: CommitCmd, now: datetime) -> Generator[TxOp, Any, CommitOutcome]:
    """Perform a commit's sub-commands in order, yielding the storage operations to run.

    Sub-commands work on copies of the ctxs, so a later sub-command sees what an earlier one
    did (a park's new rev, a stacked snapshot) while the callers' ctxs stay untouched until
    :meth:`CommitOutcome.apply`. Every conflicting id is collected; the generator then raises
    :class:`RevMismatchError` naming all of them.
    """
    perform.check_commit(cmd)
    committed_at = from_millis(to_millis(now))
    work: dict[int, tuple[StateCtx, StateCtx]] = {}

    def w(ctx: StateCtx) -> StateCtx:
        pair = work.get(id(ctx))
        if pair is None:
            # committed is only ever replaced, never changed in place: it may be shared
            datas = {k: d.copy() for k, d in ctx.datas.items()} if ctx.datas else {}
            copy = StateCtx(ctx.current.copy(), ctx.committed, list(ctx.transitions), datas)
            copy.done = ctx.done
            pair = work[id(ctx)] = (ctx, copy)
        return pair[1]

    outcome = CommitOutcome()
    conflicts: list[str] = []
    for i, sub in enumerate(cmd.commands):
        try:
            ctx: StateCtx | None = None
            if isinstance(sub, TransitCmd):
                ctx = w(sub.ctx)
                perform.transit(TransitCmd(ctx, sub.to, sub.annotations))
            elif isinstance(sub, ParkCmd):
                ctx = w(sub.ctx)
                perform.park(ParkCmd(ctx, sub.annotations))
            elif isinstance(sub, NoopCmd):
                pass
            elif isinstance(sub, StackCmd):
                perform.stack(StackCmd(w(sub.carrier), w(sub.stacked), sub.annotation))
            elif isinstance(sub, UnstackCmd):
                perform.unstack(UnstackCmd(w(sub.carrier), w(sub.target), sub.annotation))
            elif isinstance(sub, StoreDataCmd):
                sd = StoreDataCmd(w(sub.ctx), sub.alias)
                data = perform.prepare_store_data(sd)
                if data is not None:
                    yield "store_data", (data,)
                    perform.link_data(sd, data)
            elif isinstance(sub, GetDataCmd):
                data = perform.prepare_get_data(GetDataCmd(w(sub.ctx), sub.alias))
                if data is not None:
                    yield "get_data", (data,)
            elif isinstance(sub, GetStateByIdCmd):
                perform.check_get_state_by_id(sub)
                found = yield "get_state", (sub.id, sub.rev)
                load_into(w(sub.ctx), found)
            elif isinstance(sub, GetStateByLabelsCmd):
                perform.check_map(sub.labels, "labels")
                found = yield "get_state_by_labels", (sub.labels,)
                load_into(w(sub.ctx), found)
            elif isinstance(sub, DelayCmd):
                work_delay = DelayCmd(
                    w(sub.ctx), sub.to, sub.execute_at, sub.after, sub.commit, sub.annotations
                )
                delayed = perform.prepare_delay(work_delay, now)
                delayed.offset = yield "delay", (delayed,)
                outcome.delays.append((sub, delayed))
            else:
                raise ValidationError("", f"unknown command {type(sub).__name__}")
            if ctx is not None:
                perform.check_committable(ctx)
        except ValidationError as exc:
            if conflicts:
                break
            where = f"commands[{i}].{exc.field}" if exc.field else f"commands[{i}]"
            raise ValidationError(where, exc.reason) from None
        if ctx is None:
            continue
        stored = ctx.current  # the working copy: the store may keep it
        stored.committed_at = committed_at
        ok = yield "commit_state", (stored, ctx.committed.rev)
        if not ok:
            conflicts.append(stored.id)
            continue
        ctx.current = stored.copy()
        ctx.committed = stored.copy()
        ctx.transitions = []
        outcome.max_rev = max(outcome.max_rev, stored.rev)
        outcome.stored.append(stored)
    if conflicts:
        raise RevMismatchError(conflicts)
    outcome.pairs = list(work.values())
    return outcome


def run_commit(gen: Generator[TxOp, Any, CommitOutcome], tx: CommitTx) -> CommitOutcome:
    """Drive :func:`process_commit` against a synchronous transaction."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.send(result) if error is None else gen.throw(error)
        except StopIteration as stop:
            outcome: CommitOutcome = stop.value
            return outcome
        name, args = op
        try:
            result = getattr(tx, name)(*args)
            error = None
        except Exception as exc:
            result, error = None, exc


async def run_commit_async(
    gen: Generator[TxOp, Any, CommitOutcome], tx: AsyncCommitTx
) -> CommitOutcome:
    """Drive :func:`process_commit` against an asynchronous transaction."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            op = gen.send(result) if error is None else gen.throw(error)
        except StopIteration as stop:
            outcome: CommitOutcome = stop.value
            return outcome
        name, args = op
        try:
            result = await getattr(tx, name)(*args)
            error = None
        except Exception as exc:
            result, error = None, exc


def committable_count(cmd: CommitCmd) -> int:
    """How many versions a commit may store (its transit and park sub-commands)."""
    return sum(1 for c in cmd.commands if isinstance(c, TransitCmd | ParkCmd))


def load_into(ctx: StateCtx, state: State) -> None:
    """Fill ``ctx`` from a stored version: current = committed = it, no transitions."""
    ctx.current = state.copy()
    ctx.committed = state.copy() if state.rev > 0 else State()
    ctx.transitions = []


def label_match(labels: Mapping[str, str], sets: list[dict[str, str]]) -> bool:
    """Whether ``labels`` contain every pair of at least one set (no sets: match anything)."""
    if not sets:
        return True
    for want in sets:
        for key, value in want.items():
            if labels.get(key) != value:
                break
        else:
            return True
    return False


class Notifier:
    """Wakes watchers when the store may have changed. One per driver, used on its event loop.

    ``version`` counts notifications: a reader records it before querying and then waits for
    it to move, so a commit that lands between the query and the wait is never missed.
    ``head`` is the highest rev announced so far.
    """

    def __init__(self) -> None:
        self.head = 0
        self.version = 0
        self._event = asyncio.Event()
        self._waiting = 0  # waiters on _event: without any, a wake only bumps the version
        # wakes that named no rev (something may have changed anywhere): a reader that skips
        # a read when ``head`` shows nothing new must read after one of these
        self.blind = 0
        #: Called with the announced rev (0: unknown) on every notify and wake, before the
        #: waiters run (the shared tail's doorbell: it wakes only for what it does not hold).
        self.hooks: list[Callable[[int], None]] = []

    def notify(self, rev: int = 0) -> None:
        """Announce a commit (``rev`` 0: something changed, rev unknown)."""
        if rev <= 0:
            self.wake()
            return
        self.head = max(self.head, rev)
        for hook in self.hooks:
            hook(rev)
        self._bump()

    def wake(self) -> None:
        """Wake every waiter (also used on close and shutdown)."""
        self.blind += 1
        for hook in self.hooks:
            hook(0)
        self._bump()

    def _bump(self) -> None:
        self.version += 1
        if self._waiting:
            event, self._event = self._event, asyncio.Event()
            event.set()

    async def wait(self, version: int, timeout: float | None) -> None:
        """Return once ``version`` is outdated, or after ``timeout`` seconds."""
        if self.version != version:
            return
        event = self._event
        self._waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            self._waiting -= 1


async def settled(fut: asyncio.Future[T], on_success: Callable[[T], object] | None = None) -> T:
    """Await ``fut`` without letting a cancellation of the caller abandon it.

    If the caller is cancelled while ``fut`` is pending, wait for ``fut`` anyway, hand its
    result to ``on_success`` (e.g. apply a commit's outcome to the ctxs), then re-raise the
    cancellation. ``fut`` itself is never cancelled by this. Cheap: no task is created.
    """
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        if fut.cancelled():
            raise
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fut)
        if fut.exception() is None and on_success is not None:
            on_success(fut.result())
        raise


class HeadPoller:
    """While watchers wait, asks the store for its head rev every ``driver.poll_interval``
    seconds and announces each change: how watchers see commits made elsewhere (another
    process, another client of a server). One task per driver, only while someone waits."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.waiters = 0
        self.task: asyncio.Task[None] | None = None

    async def wait(self, version: int, timeout: float) -> None:
        notifier = self.driver.notifier
        if notifier.version != version:
            return
        self.waiters += 1
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        try:
            await notifier.wait(version, timeout)
        finally:
            self.waiters -= 1

    def hold(self) -> None:
        """Keep polling until :meth:`unhold` (for a reader that waits by other means)."""
        self.waiters += 1
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())

    def unhold(self) -> None:
        self.waiters -= 1

    async def stop(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        driver = self.driver
        seen = driver.notifier.head
        while self.waiters > 0:
            await asyncio.sleep(driver.poll_interval or 1.0)
            try:
                head = await driver.head_rev()
            except Exception:  # the watchers' own queries report persistent errors
                continue
            if head != seen:
                seen = head
                driver.notifier.notify(head)


class Driver(abc.ABC):
    """A store of state versions, data and delayed states.

    Drivers may be shared by several engines of one event loop: :meth:`open` and :meth:`close`
    are reference counted. Query methods receive validated, normalised commands.
    """

    #: How often a waiting watcher re-checks the store for commits made by other processes
    #: (None: only this process commits, notifications are enough).
    poll_interval: float | None = None

    #: True if the driver itself keeps the cancellation contract of ``Engine.do``: a write
    #: (commit, delay, store_data) cancelled after it reached the store completes and applies
    #: its outcome before CancelledError propagates. Otherwise the engine runs each write as a
    #: task of its own and holds the caller's cancellation back (one loop iteration more).
    settles_writes: bool = False

    #: True if the watchers of this process read new commits through one shared reader
    #: (:mod:`flowstate.tail`: one unfiltered query per batch of commits for all of them)
    #: instead of one filtered query each.
    shares_tail: bool = True

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self.notifier = Notifier()
        self._opened = 0
        self._head_poller = HeadPoller(self)
        self._tail: Tail | None = None

    async def open(self) -> None:
        if self._opened == 0:
            await self._open()
        self._opened += 1

    async def close(self) -> None:
        if self._opened == 0:
            return
        self._opened -= 1
        if self._opened == 0:
            if self._tail is not None:
                await self._tail.stop()
            await self._head_poller.stop()
            await self._close()

    def unavailable(self) -> str | None:
        """Why this driver cannot serve any call now (e.g. its writer thread died), or None.
        Health checks report it; every call fails with StoreUnavailableError meanwhile."""
        return None

    async def _open(self) -> None:  # noqa: B027 - optional hook
        """Connect and create the schema."""

    async def _close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads."""

    @abc.abstractmethod
    async def commit(self, cmd: CommitCmd) -> None:
        """Atomically persist ``cmd`` (see :func:`process_commit`), then apply it to the ctxs."""

    @abc.abstractmethod
    async def get_state(self, state_id: str, rev: int) -> State:
        """Version ``rev`` of ``state_id`` (0 = latest). NotFoundError when there is none."""

    @abc.abstractmethod
    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        """The highest-rev version whose labels contain ``labels``. NotFoundError if none."""

    @abc.abstractmethod
    async def get_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        """Matching versions in rev order (behaviour.md §2.7); never hides a lower rev later."""

    async def read_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        """:meth:`get_states` for a reader that only reads what it gets (the server encoding an
        answer, the shared tail copying for its watchers): the versions may be the store's own
        objects, which the caller must never change. Drivers that hand out copies anyway keep
        this default; the memory driver skips its copies here."""
        return await self.get_states(cmd)

    @abc.abstractmethod
    async def delay(self, delayed: DelayedState) -> int:
        """Append a delayed state; returns its offset."""

    @abc.abstractmethod
    async def get_delayed_states(
        self, since: datetime | None, until: datetime, offset: int, limit: int
    ) -> GetDelayedStatesResult:
        """Delayed states with since < execute_at <= until and offset > ``offset``, by offset."""

    @abc.abstractmethod
    async def store_data(self, data: Data) -> None:
        """Store ``data`` and set ``data.rev`` to the next data rev."""

    @abc.abstractmethod
    async def get_data(self, data: Data) -> None:
        """Load blob and annotations of ``data.rev`` into ``data``. DataNotFoundError if none."""

    def _announce_stored(self, outcome: CommitOutcome) -> None:
        """Announce a durable commit of this process: its versions go straight to the shared
        tail (which then need not read them back), then the notifier wakes readers."""
        if outcome.max_rev:
            if self._tail is not None and outcome.stored:
                self._tail.offer(outcome.stored)
            self.notifier.notify(outcome.max_rev)

    async def head_rev(self) -> int:
        """The highest committed rev visible to readers."""
        return self.notifier.head

    async def readers_held(self) -> dict[str, object] | None:
        """What holds readers back, when a store can say (a commit in flight for a while
        below which nothing newer is shown), for /health and the UI; None when nothing does."""
        return None

    async def wait_for_commit(self, version: int, timeout: float) -> None:
        """Return soon after a commit following notifier ``version`` (or after ``timeout``);
        with a ``poll_interval``, also after a commit made elsewhere."""
        if self.poll_interval is None:
            await self.notifier.wait(version, timeout)
        else:
            await self._head_poller.wait(version, timeout)


def commands_of(cmd: Command) -> list[Command]:
    """The sub-commands of a commit, or the command itself."""
    return cmd.commands if isinstance(cmd, CommitCmd) else [cmd]
