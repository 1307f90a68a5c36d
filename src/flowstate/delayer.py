"""The Delayer: fires delayed states when they are due.

Every process runs one; only the active one fires (see :mod:`flowstate.roles`). It reads the
delayed-state log by offset into memory and fires each entry once ``execute_at`` has passed:
with ``commit`` (the default) it commits the delayed transition, expecting the rev the state
had when it was delayed, and then executes it; with ``commit=False`` it only executes.

Progress is stored on ``flowstate.delayer.meta``: ``flowstate.delayer.offset`` is a watermark
(every offset up to it has fired or was skipped) and ``flowstate.delayer.fired`` lists the
offsets above it that already fired (a later offset can be due before an earlier one). A
restart, or a standby taking over, resumes from there and does not fire an entry twice —
except one fired in the instant between firing and storing the progress, whose second firing
is harmless with ``commit`` because its commit fails on rev.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from flowstate.commands import DelayedState, commit, execute, get_delayed_states, transit
from flowstate.errors import RevMismatchError
from flowstate.roles import RoleWorker, in_batches
from flowstate.state import DELAY_COMMIT

if TYPE_CHECKING:
    from flowstate.engine import Engine

META_ID = "flowstate.delayer.meta"
OFFSET = "flowstate.delayer.offset"
FIRED = "flowstate.delayer.fired"
_FOREVER = datetime(9999, 1, 1, tzinfo=UTC)

log = logging.getLogger("flowstate.delayer")


@dataclass(slots=True)
class DelayerStats:
    """Counters since start. ``added``: delayed states loaded; ``completed``: fired;
    ``dropped``: not fired because the state changed since it was delayed; ``retried``:
    firings that failed and were tried again; ``head``/``tail``: highest loaded offset and
    the stored watermark."""

    active: bool
    added: int
    completed: int
    retried: int
    dropped: int
    pending: int
    head: int
    tail: int


class Delayer(RoleWorker):
    """Fires delayed states on time. Started by the Engine (``delayer=True``)."""

    name = "delayer"

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = 1.0,
        takeover_after: float = 180.0,
        heartbeat: float = 60.0,
    ) -> None:
        super().__init__(engine, META_ID, interval, takeover_after)
        self.heartbeat = heartbeat
        self._pending: dict[int, DelayedState] = {}
        self._fired: set[int] = set()
        self._watermark = 0
        self._loaded = 0
        self._stored: tuple[int, str] = (0, "")
        self._added = self._completed = self._retried = self._dropped = 0
        self._poked = asyncio.Event()
        self._failed = False

    def poke(self) -> None:
        """A state was delayed in this process: load it now rather than at the next tick."""
        self._poked.set()

    def stats(self) -> DelayerStats:
        return DelayerStats(
            self.role.active,
            self._added,
            self._completed,
            self._retried,
            self._dropped,
            len(self._pending),
            self._loaded,
            self._watermark,
        )

    async def tick(self) -> None:
        """Settle the role; if active, load new delayed states and fire the due ones."""
        self._poked.clear()
        if await self.role.check(has_work=await self._work_waiting()):
            self._reset()
        if not self.role.active:
            return
        await self._load()
        await self._fire_due()
        await self._store_progress()

    def _tick_failed(self) -> None:
        self._failed = True

    async def _sleep(self) -> None:
        """Until the next tick: ``interval`` at most, less when a pending state falls due
        sooner, cut short by :meth:`poke`."""
        seconds = self.interval
        if self._pending and not self._failed:
            due = min(d.execute_at for d in self._pending.values())
            seconds = min(seconds, max((due - self.engine.clock.now()).total_seconds(), 0.0))
        self._failed = False
        if self._poked.is_set():
            return
        sleep = asyncio.ensure_future(self.engine.clock.sleep(seconds))  # registers now
        poked = asyncio.ensure_future(self._poked.wait())
        try:
            await asyncio.wait((sleep, poked), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleep.cancel()
            poked.cancel()

    def _reset(self) -> None:
        ann = self.role.annotations
        self._watermark = self._loaded = int(ann.get(OFFSET, "0") or 0)
        self._fired = {int(x) for x in ann.get(FIRED, "").split(",") if x}
        self._stored = self._progress_key()
        self._pending.clear()

    async def _work_waiting(self) -> bool:
        """Whether something is due that the active process has not fired (standby only)."""
        if self.role.active:
            return True
        since = int(self.role.annotations.get(OFFSET, "0") or 0)
        fired = {int(x) for x in self.role.annotations.get(FIRED, "").split(",") if x}
        query = get_delayed_states(
            until=self.engine.clock.now(), offset=since, limit=len(fired) + 1
        )
        await self.engine.do(query)
        assert query.result is not None
        return any(d.offset not in fired for d in query.result.delayed_states)

    async def _load(self) -> None:
        while True:
            query = get_delayed_states(until=_FOREVER, offset=self._loaded, limit=500)
            await self.engine.do(query)
            assert query.result is not None
            for delayed in query.result.delayed_states:
                self._loaded = delayed.offset
                if delayed.offset not in self._fired:
                    self._pending[delayed.offset] = delayed
                    self._added += 1
            if not query.result.more:
                return

    async def _fire_due(self) -> None:
        now = self.engine.clock.now()
        due = [d for _, d in sorted(self._pending.items()) if d.execute_at <= now]
        for delayed, error in await in_batches(due, self._fire):
            if error is not None:
                self._retried += 1
                self._failed = True
                log.error(
                    "firing delayed state %r failed; retrying", delayed.state.id, exc_info=error
                )
                continue  # stays pending
            del self._pending[delayed.offset]
            self._fired.add(delayed.offset)
        self._watermark = min(self._pending) - 1 if self._pending else self._loaded
        self._fired = {o for o in self._fired if o > self._watermark}

    async def _fire(self, delayed: DelayedState) -> None:
        ctx = delayed.state.to_ctx()
        transition = ctx.current.transition
        if transition.annotations.get(DELAY_COMMIT) != "false":
            try:
                await self.engine.do(
                    commit(transit(ctx, transition.to, dict(transition.annotations)))
                )
            except RevMismatchError:
                self._dropped += 1  # the state changed since it was delayed
                return
        self._completed += 1
        await self.engine.do(execute(ctx))

    def _progress_key(self) -> tuple[int, str]:
        return self._watermark, ",".join(str(o) for o in sorted(self._fired))

    def _progress(self) -> dict[str, str]:
        watermark, fired = self._progress_key()
        return {OFFSET: str(watermark), FIRED: fired}

    async def _store_progress(self) -> None:
        key = self._progress_key()
        at = self.role.meta.current.committed_at
        age = (self.engine.clock.now() - at).total_seconds() if at else self.heartbeat
        if (key != self._stored or age >= self.heartbeat) and await self.role.write(
            self._progress()
        ):
            self._stored = key
