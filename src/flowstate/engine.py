"""The Engine: runs commands, executes flows, and hands out iterators and watchers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from flowstate import perform
from flowstate.clock import Clock
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    ExecuteCmd,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    NoopCmd,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.data import ref_annotation
from flowstate.delayer import Delayer
from flowstate.drivers.base import Driver, load_into
from flowstate.errors import EngineStoppedError, FlowstateError, RevMismatchError, ValidationError
from flowstate.flow import FlowRegistry
from flowstate.iterator import StateIterator, Watcher
from flowstate.recovery import Recoverer
from flowstate.state import StateCtx

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("flowstate")

T = TypeVar("T")


class Engine:
    """Executes flows and the commands they return, on top of one driver.

    Use it as an async context manager (``async with Engine(driver, registry) as engine``) or
    call :meth:`start` and :meth:`shutdown`. The engine opens the driver on start and releases
    it on shutdown.
    """

    def __init__(
        self,
        driver: Driver,
        registry: FlowRegistry | None = None,
        *,
        recovery: bool | None = None,
        delayer: bool | None = None,
        clock: Clock | None = None,
        logger: logging.Logger | None = None,
    ) -> None:
        self.driver = driver
        self.registry = registry if registry is not None else FlowRegistry()
        if clock is not None:
            driver.clock = clock
        self.clock: Clock = driver.clock
        self.log = logger or log
        self._done = asyncio.Event()
        self._started = False
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        #: The recoverer and the delayer (None when turned off); tune their attributes
        #: (``interval``, ``role.takeover_after``…) before the engine starts.
        self.recoverer: Recoverer | None = Recoverer(self) if recovery is not False else None
        self.delayer: Delayer | None = Delayer(self) if delayer is not False else None
        self._want = {"recoverer": recovery, "delayer": delayer}
        self._workers: list[Recoverer | Delayer] = []
        self._handlers: dict[type, Callable[[Any], Awaitable[None]]] = {
            TransitCmd: self._sync(perform.transit),
            ParkCmd: self._sync(perform.park),
            StackCmd: self._sync(perform.stack),
            UnstackCmd: self._sync(perform.unstack),
            NoopCmd: self._noop,
            CommitCmd: self._commit,
            ExecuteCmd: self._execute_cmd,
            GetStateByIdCmd: self._get_state_by_id,
            GetStateByLabelsCmd: self._get_state_by_labels,
            GetStatesCmd: self._get_states,
            GetDelayedStatesCmd: self._get_delayed_states,
            DelayCmd: self._delay,
            StoreDataCmd: self._store_data,
            GetDataCmd: self._get_data,
        }

    # lifecycle

    async def start(self) -> Engine:
        """Open the driver, start the recoverer and the delayer. Called by ``async with`` and,
        lazily, by the first command.

        The recoverer and the delayer start when asked (``recovery=True``, ``delayer=True``)
        or, by default, when the registry hosts flows: a process that runs no flows (a query
        script, the CLI) takes no role. Start is all or nothing: if a step fails, what already
        started is shut down (its role released) and the driver closed before the error is
        raised, so a failed start leaves nothing running.
        """
        async with self._start_lock:
            if self._stopped:
                raise EngineStoppedError()
            if not self._started:
                await self.driver.open()
                self._loop = asyncio.get_running_loop()
                self._started = True  # before the workers start: they issue commands
                try:
                    for worker in (self.recoverer, self.delayer):
                        if worker is not None and self._takes_role(worker.name):
                            self._workers.append(worker)
                            await worker.start()
                except BaseException:
                    await self._stop_workers()
                    self._started = False
                    await self.driver.close()
                    raise
        return self

    def _takes_role(self, name: str) -> bool:
        want = self._want[name]
        return want if want is not None else self.registry.has_flows()

    async def _stop_workers(self) -> None:
        """Shut the started workers down (releasing their roles), last started first."""
        workers, self._workers = self._workers, []
        for worker in reversed(workers):
            try:
                await worker.shutdown()
            except Exception:
                self.log.exception("shutdown of %s failed", type(worker).__name__)

    async def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop new executions, signal running ones (``ctx.done``), wait for them, close.

        Executions still running after ``timeout`` seconds are cancelled.
        """
        if self._stopped:
            return
        if self._started:
            await self._stop_workers()
        self._stopped = True
        self._done.set()
        self.driver.notifier.wake()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            self.log.warning("shutdown: cancelling %d running executions", len(self._tasks))
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._started:
            await self.driver.close()

    @property
    def stopped(self) -> bool:
        return self._stopped

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # commands

    async def do(self, *cmds: Command) -> None:
        """Run ``cmds`` one after another; stop at (and raise) the first error.

        Earlier commands are not undone: use :func:`flowstate.commit` for atomicity.

        Cancellation (``task.cancel()``, ``asyncio.wait_for``, ``asyncio.timeout``,
        ``do_sync(timeout=...)``) never leaves the caller guessing: a write (commit, delay,
        store_data) that already went to the store is waited for, and its outcome applied to
        the ctxs, the Data objects and the local watchers, before ``CancelledError`` (or
        ``TimeoutError``) is raised. So after a cancellation ``ctx.committed.rev`` tells
        whether the commit landed. A write cancelled before it reached the store does not
        land. The wait is bounded by the driver's own timeouts.
        """
        if not cmds:
            raise ValidationError("cmds", "no commands to do")
        if not self._started:
            await self.start()
        for cmd in cmds:
            await self._do_one(cmd)

    def do_sync(self, *cmds: Command, timeout: float | None = None) -> None:
        """:meth:`do` for plain-function flows and other threads (not the engine's loop)."""
        loop = self._loop
        if loop is None:
            raise FlowstateError("engine not started")
        if threading.get_ident() == getattr(loop, "_thread_id", None):
            raise FlowstateError("do_sync called on the engine's event loop; await do()")
        # The timeout runs on the loop, so that a commit it interrupts settles (and updates its
        # ctxs) before TimeoutError reaches this thread: see the cancellation contract of do().
        work = self.do(*cmds) if timeout is None else asyncio.wait_for(self.do(*cmds), timeout)
        asyncio.run_coroutine_threadsafe(work, loop).result()

    async def _do_one(self, cmd: Command) -> None:
        handler = self._handlers.get(type(cmd))
        if handler is None:
            raise ValidationError("cmd", f"unknown command {type(cmd).__name__}")
        await handler(cmd)

    @staticmethod
    def _sync(fn: Callable[[Any], None]) -> Callable[[Any], Awaitable[None]]:
        async def run(cmd: Any) -> None:
            fn(cmd)

        return run

    async def _noop(self, cmd: NoopCmd) -> None:
        return None

    async def _settle(self, write: Coroutine[Any, Any, T]) -> T:
        """Await a store write so that cancelling the caller cannot interrupt it half way.

        Invariant: when this raises CancelledError, the write has finished (landed or failed)
        and applied its outcome, or never started. The write runs as a task of its own; a
        cancellation of the caller is held back until that task is done, then re-raised.
        """
        if self.driver.settles_writes:
            return await write
        task = asyncio.ensure_future(write)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                raise
            self.log.debug("a write was cancelled; waiting for the store's answer")
            while not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)
            if not task.cancelled():
                task.exception()  # retrieved: the cancellation is what the caller sees
            raise

    async def _commit(self, cmd: CommitCmd) -> None:
        perform.check_commit(cmd)
        await self._settle(self.driver.commit(cmd))
        if self.delayer is not None and any(isinstance(c, DelayCmd) for c in cmd.commands):
            self.delayer.poke()

    async def _execute_cmd(self, cmd: ExecuteCmd) -> None:
        if cmd.sync:
            return
        self.spawn_execution(cmd.ctx)

    def spawn_execution(self, ctx: StateCtx) -> asyncio.Task[None]:
        """Start executing a deep copy of ``ctx`` in the background and return its task.
        Failures are logged; :meth:`shutdown` waits for (then cancels) such tasks."""
        if self._stopped:
            raise EngineStoppedError()
        copy = ctx.deep_copy()
        self._begin()
        task = asyncio.create_task(self._background(copy))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _background(self, ctx: StateCtx) -> None:
        try:
            await self._run(ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("execution of state %r failed", ctx.current.id)
        finally:
            self._end()

    async def _get_state_by_id(self, cmd: GetStateByIdCmd) -> None:
        perform.check_get_state_by_id(cmd)
        load_into(cmd.ctx, await self.driver.get_state(cmd.id, cmd.rev))

    async def _get_state_by_labels(self, cmd: GetStateByLabelsCmd) -> None:
        perform.check_map(cmd.labels, "labels")
        load_into(cmd.ctx, await self.driver.get_state_by_labels(cmd.labels))

    async def _get_states(self, cmd: GetStatesCmd) -> None:
        perform.normalize_get_states(cmd)
        cmd.result = await self.driver.get_states(cmd)

    async def _get_delayed_states(self, cmd: GetDelayedStatesCmd) -> None:
        perform.normalize_get_delayed_states(cmd, self.clock.now())
        assert cmd.until is not None
        cmd.result = await self.driver.get_delayed_states(
            cmd.since, cmd.until, cmd.offset, cmd.limit
        )

    async def _delay(self, cmd: DelayCmd) -> None:
        delayed = perform.prepare_delay(cmd, self.clock.now())
        delayed.offset = await self._settle(self.driver.delay(delayed))
        cmd.result = delayed
        if self.delayer is not None:
            self.delayer.poke()

    async def _store_data(self, cmd: StoreDataCmd) -> None:
        # Prepared and stored on a copy: the caller's Data (rev, checksum) and ctx change only
        # once the store succeeded, so a failed store leaves nothing that looks stored.
        work = StateCtx(cmd.ctx.current.copy(), cmd.ctx.committed, datas=dict(cmd.ctx.datas))
        original = work.datas.get(cmd.alias)
        if original is not None:
            work.datas[cmd.alias] = original.copy()
        sub = StoreDataCmd(work, cmd.alias)
        data = perform.prepare_store_data(sub)

        def apply() -> None:
            if data is not None:
                perform.link_data(sub, data)
            if original is not None:
                stored = work.datas[cmd.alias]
                original.annotations, original.rev = stored.annotations, stored.rev
            ref = ref_annotation(cmd.alias)
            cmd.ctx.current.annotations[ref] = work.current.annotations[ref]

        if data is not None:
            try:
                await self._settle(self.driver.store_data(data))
            except asyncio.CancelledError:
                if data.rev > 0 and data.rev != getattr(original, "rev", 0):
                    apply()  # it landed before the cancellation: the caller must know
                raise
        apply()

    async def _get_data(self, cmd: GetDataCmd) -> None:
        data = perform.prepare_get_data(cmd)
        if data is not None:
            await self.driver.get_data(data)

    # execution

    async def execute(self, ctx: StateCtx) -> None:
        """Run flows for ``ctx`` until one parks, delays, or returns noop (see behaviour.md §2.4).

        A rev conflict on the command a flow returned ends the execution quietly: another
        actor moved the state on. Errors raised by flows propagate.
        """
        if self._stopped:
            raise EngineStoppedError()
        if not self._started:
            await self.start()
        self._begin()
        try:
            await self._run(ctx)
        finally:
            self._end()

    async def _run(self, ctx: StateCtx) -> None:
        if not ctx.current.id:
            raise ValidationError("current.id", "state id empty")
        registry = self.registry
        while not self._stopped:
            ctx.done = self._done
            to = ctx.current.transition.to
            if not to:
                raise ValidationError("current.transition.to", "transition to id empty")
            flow = registry.get_flow(to)
            cmd = await flow(ctx, self)
            if not isinstance(cmd, Command):
                raise FlowstateError(f"flow {to!r} returned {cmd!r}, expected a command")
            if isinstance(cmd, CommitCmd) and len(cmd.commands) != 1:
                raise ValidationError(
                    "commands", "a commit returned by a flow must have exactly one command"
                )
            if isinstance(cmd, ExecuteCmd):
                cmd.sync = True
            try:
                await self._do_one(cmd)
            except RevMismatchError as exc:
                self.log.info("execution of %r ended by a conflict: %s", ctx.current.id, exc)
                return
            nxt = _continuation(cmd)
            if nxt is None:
                return
            ctx = nxt

    def _begin(self) -> None:
        self._running += 1
        self._idle.clear()

    def _end(self) -> None:
        self._running -= 1
        if self._running == 0:
            self._idle.set()

    # reading

    def iter(self, cmd: GetStatesCmd) -> StateIterator:
        """An async iterator over the matching states in rev order, ending at the head."""
        return StateIterator(self.driver, cmd)

    def watch(self, cmd: GetStatesCmd) -> Watcher:
        """Like :meth:`iter`, then waits for new commits until closed or the engine stops."""
        return Watcher(self.driver, cmd, self._done)


def _continuation(cmd: Command) -> StateCtx | None:
    if isinstance(cmd, CommitCmd):
        return _continuation(cmd.commands[0])
    if isinstance(cmd, ExecuteCmd | TransitCmd):
        return cmd.ctx
    if isinstance(cmd, DelayCmd | ParkCmd | NoopCmd):
        return None
    raise FlowstateError(f"unknown command {type(cmd).__name__} returned by a flow")
