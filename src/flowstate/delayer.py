"""The Delayer: fires delayed states when they are due.

Every process runs one; only the active one fires (see :mod:`flowstate.roles`). Firing a due
delayed state: with ``commit`` (the default) commit the delayed transition, expecting the rev
the state had when it was delayed (a conflict means the state moved on: dropped), then start
its execution; with ``commit=False`` only start the execution.

Progress (:class:`Progress`) lives on the parked meta state ``flowstate.delayer.meta`` in the
annotations the Go delayer reads and writes (behaviour.md §4.3) — ``flowstate.delayer.since``
(RFC 3339, seconds) and ``flowstate.delayer.offset`` (decimal) — plus two short lists of ours
that a Go reader ignores. Memory holds a look-ahead window of delays, not every pending one.
See docs/delayer.md for the design and its consequences.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from flowstate.clock import from_seconds, to_seconds
from flowstate.commands import DelayedState, commit, get_delayed_states, transit
from flowstate.errors import RevMismatchError
from flowstate.gotime import format_rfc3339, parse_rfc3339
from flowstate.roles import ExecutionGate, RoleWorker, in_batches
from flowstate.state import DELAY_COMMIT

if TYPE_CHECKING:
    from flowstate.engine import Engine

META_ID = "flowstate.delayer.meta"
#: Go's annotations (behaviour.md §4.3).
OFFSET = "flowstate.delayer.offset"
SINCE = "flowstate.delayer.since"
#: Ours (absent when empty): offsets done but not covered by the watermarks, and offsets
#: covered by the watermarks but not done. Comma-separated decimals.
FIRED = "flowstate.delayer.fired"
OWED = "flowstate.delayer.owed"

#: Most offsets each of FIRED and OWED holds: 64 offsets of up to 19 digits stay under 1.3 KB
#: per list, so the meta state's annotations stay under 4 KiB.
LIST_CAP = 64
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FOREVER = datetime(9999, 1, 1, tzinfo=UTC)
_PAGE = 500

log = logging.getLogger("flowstate.delayer")


@dataclass(slots=True)
class Progress:
    """What the delayer has done, as stored on the meta state. Times are Unix seconds (delayed
    states are stored with second precision).

    Invariant (``since`` = T, ``offset`` = O): every delayed state with offset ≤ O and
    execute_at ≤ T is done (fired or dropped) — except the offsets in ``owed``; and every
    offset in ``fired`` is done although the watermarks may not cover it.

    * T and O only grow. O advances over delayed states read in offset order (the scan); T over
      time whose due delayed states have all fired, or were recorded in ``owed``.
    * ``owed`` never loses an entry. In memory it is not capped (every owed entry is also held
      in memory, due but not fired: a flow nobody hosts, a failing firing); when it holds more
      than ``LIST_CAP`` offsets the *stored* T is lowered to just below the earliest of them
      and none is listed, so the stored claim still holds (see :meth:`Delayer._stored`).
    * ``fired`` may lose entries (capped when stored): such a delayed state fires again after a
      restart — harmless with ``commit`` (its commit fails on rev), a second execution with
      ``commit=False``. So does anything fired after a lowered stored T. In normal operation
      both lists are empty: T follows the clock over what fired.

    This is also what Go's loaders assume: they read ``(since, now+1m]`` from offset 0 and
    offsets above ``offset``, so a Go delayer resuming from it misses nothing.
    """

    since: int = 0
    offset: int = 0
    #: offset -> execute_at (Unix seconds) when known (None: read from the meta state)
    fired: dict[int, int | None] = field(default_factory=dict)
    owed: set[int] = field(default_factory=set)

    def covers(self, offset: int, at: int) -> bool:
        """Whether the watermarks alone claim this delayed state is done."""
        return offset <= self.offset and at <= self.since

    def done(self, d: DelayedState) -> bool:
        if d.offset in self.fired:
            return True
        return self.covers(d.offset, to_seconds(d.execute_at)) and d.offset not in self.owed

    def prune(self) -> None:
        """Forget fired offsets the watermarks now cover."""
        for offset, at in list(self.fired.items()):
            if at is not None and self.covers(offset, at):
                del self.fired[offset]

    def annotations(self) -> dict[str, str]:
        """The meta state annotations: Go's two, and ours when non-empty."""
        out = {OFFSET: str(self.offset), SINCE: format_rfc3339(from_seconds(self.since))}
        if self.fired:
            out[FIRED] = _join(sorted(self.fired)[:LIST_CAP])
        if self.owed:
            out[OWED] = _join(sorted(self.owed))
        return out

    @classmethod
    def read(cls, annotations: dict[str, str], now: datetime, warn: bool = True) -> Progress:
        """Progress from meta annotations written by us, by Go, or by our earlier format
        (``offset`` and ``fired`` without ``since``: every offset up to ``offset`` was done,
        so T can start at ``now``). Unreadable values count as nothing done (Go panics)."""
        progress = cls()
        try:
            progress.offset = max(int(annotations.get(OFFSET) or 0), 0)
        except ValueError:
            if warn:
                log.warning("unreadable %s=%r: starting from 0", OFFSET, annotations.get(OFFSET))
        since = annotations.get(SINCE)
        if since is None:
            progress.since = to_seconds(now) if progress.offset else 0
        else:
            try:
                progress.since = max(to_seconds(parse_rfc3339(since)), 0)
            except ValueError:
                if warn:
                    log.warning("unreadable %s=%r: starting from the epoch", SINCE, since)
        progress.fired = dict.fromkeys(_split(annotations.get(FIRED, "")))
        progress.owed = set(_split(annotations.get(OWED, "")))
        return progress


def _join(offsets: list[int]) -> str:
    return ",".join(str(o) for o in offsets)


def _split(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip().isdigit()]


@dataclass(slots=True)
class DelayerStats:
    """Counters since start. ``added``: delayed states loaded; ``completed``: fired;
    ``dropped``: not fired because the state changed since it was delayed; ``retried``:
    firings that failed and were tried again; ``pending``: delayed states held in memory;
    ``head``/``tail``: the offset watermark in memory and as last stored; ``unhosted``: flow
    id -> due delayed states left pending because no process hosts that flow."""

    active: bool
    added: int
    completed: int
    retried: int
    dropped: int
    pending: int
    head: int
    tail: int
    unhosted: dict[str, int] = field(default_factory=dict)


class Delayer(RoleWorker):
    """Fires delayed states on time. Started by the Engine (``delayer=True``).

    Each tick of the active process: load the look-ahead window (delayed states due up to
    ``lookahead`` seconds ahead, at most about ``max_window`` at once), scan the delayed
    states added since the last scan (states delayed into the past are found there), fire the
    due ones in execute_at order through an :class:`~flowstate.roles.ExecutionGate`
    (``max_executions`` running at once), advance the watermarks and store them. A standby
    only reads the meta state and asks one small query per ``interval``.

    In memory (active only; every change of role clears it and re-reads the meta state):
    the progress P (T, O, owed, fired) whose claim holds for what is stored or about to be;
    W ≥ T, the time up to which the window is loaded; ``_pending``, the delayed states held:
    not done, offset ≤ O, and either due in (T, W] or owed. Every delayed state due in
    (T, W] with offset ≤ O is held or done, so firing what is held and moving T up to
    min(now, W) keeps the claim.
    """

    name = "delayer"

    def __init__(
        self,
        engine: Engine,
        *,
        interval: float = 1.0,
        takeover_after: float = 180.0,
        heartbeat: float = 60.0,
        lookahead: float = 60.0,
        max_window: int = 10_000,
        scan_pages: int = 1,
        max_executions: int = 64,
    ) -> None:
        self._progress_now = Progress()
        super().__init__(engine, META_ID, interval, takeover_after)
        self.heartbeat = heartbeat
        self.lookahead = lookahead
        self.max_window = max_window
        self.scan_pages = scan_pages
        self._gate = ExecutionGate(engine, max_executions)
        self._added = self._completed = self._retried = self._dropped = 0
        self._poked = asyncio.Event()
        self._was_active = False
        self._clear()

    @property
    def max_executions(self) -> int:
        """Executions started by firings that may run at once."""
        return self._gate.limit

    @max_executions.setter
    def max_executions(self, limit: int) -> None:
        self._gate.limit = limit

    def _clear(self) -> None:
        """Drop everything held in memory (progress aside)."""
        #: delayed states not done, offset ≤ O: the window (T, W] and the owed ones
        self._pending: dict[int, DelayedState] = {}
        self._window_end = self._progress_now.since  # W: the window is loaded up to here
        self._owed_loaded = not self._progress_now.owed
        self._scan_more = False  # the last scan stopped at its page budget
        self._window_behind = False  # the last window load stopped short of now + lookahead
        self._failed = False
        self._dirty = False  # progress changed in ways a restart must see
        self._hosted: dict[str, bool] = {}
        self._unhosted: dict[str, int] = {}
        self._warned: set[str] = set()

    def poke(self) -> None:
        """A state was delayed in this process: load it now rather than at the next tick."""
        self._poked.set()

    def stats(self) -> DelayerStats:
        stored = self.role.annotations.get(OFFSET, "0")
        return DelayerStats(
            self.role.active,
            self._added,
            self._completed,
            self._retried,
            self._dropped,
            len(self._pending),
            self._progress_now.offset,
            int(stored) if stored.isdigit() else 0,
            dict(self._unhosted),
        )

    async def tick(self) -> None:
        """Settle the role; if active, load, fire the due delayed states, store progress."""
        self._poked.clear()
        claimed = await self.role.check(has_work=await self._work_waiting())
        if claimed or self.role.active != self._was_active:
            self._reset()  # the role changed: what we held belongs to the previous one
        if not self.role.active:
            return
        now = self.engine.clock.now()
        self._hosted.clear()
        await self._load_owed()
        await self._load_window(now)
        await self._scan()
        await self._fire_due(now)
        self._advance(now)
        await self._store_progress()

    def _tick_failed(self) -> None:
        self._failed = True

    async def _sleep(self) -> None:
        """Until the next tick: ``interval``, less when a delayed state we hold falls due
        sooner, none while the scan or the window has more to read, cut short by :meth:`poke`.

        Only the active process shortens it, and only for entries not yet due: an entry that
        is due but could not fire waits for the next interval, so nothing polls in a loop."""
        seconds = self.interval
        if self.role.active and not self._failed:
            if self._scan_more or self._window_behind:
                seconds = 0.0
            else:
                now = self.engine.clock.now()
                upcoming = [d.execute_at for d in self._pending.values() if d.execute_at > now]
                if upcoming:
                    seconds = min(seconds, (min(upcoming) - now).total_seconds())
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
        """Forget everything in memory and take progress from the meta state as last read.
        Called at start and whenever the role changes (claimed or lost)."""
        self._progress_now = Progress.read(self.role.annotations, self.engine.clock.now())
        self._was_active = self.role.active
        self._clear()

    async def _work_waiting(self) -> bool:
        """Whether something is due that the active process has not fired (standby only):
        an owed entry, or a delayed state due after its time watermark that it has not listed
        as fired. One query of at most ``LIST_CAP + 1`` entries."""
        if self.role.active:
            return True
        progress = Progress.read(self.role.annotations, self.engine.clock.now(), warn=False)
        if progress.owed:
            return True
        query = get_delayed_states(
            since=from_seconds(progress.since),
            until=self.engine.clock.now(),
            limit=len(progress.fired) + 1,
        )
        await self.engine.do(query)
        assert query.result is not None
        return any(d.offset not in progress.fired for d in query.result.delayed_states)

    async def _load_owed(self) -> None:
        """After a reset: load the owed entries (the watermarks cover them, no window or scan
        reads them again)."""
        if self._owed_loaded:
            return
        p = self._progress_now
        for offset in sorted(p.owed):
            query = get_delayed_states(until=from_seconds(p.since), offset=offset - 1, limit=1)
            await self.engine.do(query)
            assert query.result is not None
            found = [d for d in query.result.delayed_states if d.offset == offset]
            if found:
                self._hold(found[0])
            else:
                p.owed.discard(offset)  # not in the store (any more): nothing to fire
                self._dirty = True
        self._owed_loaded = True

    async def _load_window(self, now: datetime) -> None:
        """Load the delayed states due in (W, now + lookahead] into memory.

        If that span holds more than ``max_window`` of them, the span is halved (down to one
        second) until it fits: memory holds a bounded window even after a long outage."""
        start = self._window_end
        end = target = to_seconds(now + timedelta(seconds=self.lookahead))
        self._window_behind = False
        if end <= start:
            return  # loaded already (the window moves by whole seconds)
        while True:
            # past one second, take the span whatever it holds: it can not be split further
            cap = self.max_window if end - start > 1 else None
            loaded = await self._read_span(start, end, stop_after=cap)
            if loaded is not None:
                break
            end = start + (end - start) // 2
        p = self._progress_now
        for d in loaded:
            if d.offset <= p.offset and not p.done(d):
                self._hold(d)
        self._window_end = end
        self._window_behind = end < target

    async def _read_span(
        self, start: int, end: int, stop_after: int | None
    ) -> list[DelayedState] | None:
        """Delayed states with start < execute_at ≤ end (Unix seconds), all offsets; None if
        there are more than ``stop_after``."""
        out: list[DelayedState] = []
        offset = 0
        page = _PAGE if stop_after is None else min(_PAGE, stop_after + 1)
        while True:
            query = get_delayed_states(
                since=from_seconds(start), until=from_seconds(end), offset=offset, limit=page
            )
            await self.engine.do(query)
            assert query.result is not None
            out.extend(query.result.delayed_states)
            if stop_after is not None and len(out) > stop_after:
                return None
            if not query.result.more:
                return out
            offset = out[-1].offset

    async def _scan(self) -> None:
        """Read the delayed states added since the offset watermark O, in offset order, at
        most ``scan_pages`` pages per tick, and move O past them: one due at or before T (a
        state delayed into the past) becomes owed; one in the loaded window is held; a later
        one is left to the window."""
        p = self._progress_now
        self._scan_more = False
        for _ in range(self.scan_pages):
            query = get_delayed_states(until=FOREVER, offset=p.offset, limit=_PAGE)
            await self.engine.do(query)
            assert query.result is not None
            for d in query.result.delayed_states:
                at = to_seconds(d.execute_at)
                if d.offset in p.fired:
                    p.fired[d.offset] = at
                elif at <= p.since:
                    p.owed.add(d.offset)
                    self._hold(d)
                    self._dirty = True
                elif at <= self._window_end:
                    self._hold(d)
                # O moving alone need not be stored: after a restart the scan would read the
                # same entries again and do the same (a held one is stored when it fires)
                p.offset = d.offset
            if not query.result.more:
                self._drop_above(p.offset)
                return
        self._scan_more = True
        self._drop_above(p.offset)

    def _drop_above(self, offset: int) -> None:
        """Keep in memory only entries the scan has passed (offset ≤ O), so that every entry
        that fires is one O covers; the scan reaches the others later."""
        for key in [k for k in self._pending if k > offset]:
            del self._pending[key]

    def _hold(self, d: DelayedState) -> None:
        if d.offset not in self._pending:
            self._pending[d.offset] = d
            self._added += 1

    async def _hosts(self, flow_id: str) -> bool:
        """Whether this process can run ``flow_id`` (asked once per tick per flow)."""
        hosted = self._hosted.get(flow_id)
        if hosted is None:
            hosted = self._hosted[flow_id] = await self.engine.registry.hosts(flow_id)
        return hosted

    async def _fire_due(self, now: datetime) -> None:
        """Fire the due entries in execute_at order; leave (and report) those of flows this
        process does not host; keep those whose firing failed, for the next tick."""
        due = sorted(
            (d for d in self._pending.values() if d.execute_at <= now),
            key=lambda d: (d.execute_at, d.offset),
        )
        unhosted: dict[str, int] = {}
        fireable: list[DelayedState] = []
        for d in due:
            flow_id = d.state.transition.to
            if await self._hosts(flow_id):
                self._warned.discard(flow_id)
                fireable.append(d)
                continue
            unhosted[flow_id] = unhosted.get(flow_id, 0) + 1
            if flow_id not in self._warned:
                self._warned.add(flow_id)
                log.warning(
                    "no process hosts flow %r: its due delayed states stay pending", flow_id
                )
        self._unhosted = unhosted
        p = self._progress_now
        for delayed, error in await in_batches(fireable, self._fire):
            if error is not None:
                self._retried += 1
                self._failed = True
                log.error(
                    "firing delayed state %r failed; retrying", delayed.state.id, exc_info=error
                )
                continue  # stays pending
            del self._pending[delayed.offset]
            p.owed.discard(delayed.offset)
            if not p.covers(delayed.offset, to_seconds(delayed.execute_at)):
                p.fired[delayed.offset] = to_seconds(delayed.execute_at)
            self._dirty = True

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
        await self._gate.start(ctx)

    def _advance(self, now: datetime) -> None:
        """Move T up to min(now, W): every due entry there fired, or is still pending and
        becomes owed (in memory ``owed`` is not capped: it is a subset of what we hold)."""
        p = self._progress_now
        target = min(to_seconds(now), self._window_end)
        if target <= p.since:
            return
        for d in self._pending.values():
            if to_seconds(d.execute_at) <= target:
                p.owed.add(d.offset)
        p.since = target
        p.prune()

    def _stored(self) -> Progress:
        """The progress to store: the one in memory, unless more entries are owed than the
        meta state may list. Then T is stored just below the earliest owed entry (none is
        listed), which uncovers what fired since: after a restart that fires again rather
        than the owed entries being lost (harmless with ``commit``; see docs/delayer.md)."""
        p = self._progress_now
        if len(p.owed) <= LIST_CAP:
            return p
        times = [to_seconds(self._pending[o].execute_at) for o in p.owed if o in self._pending]
        since = min(times) - 1 if len(times) == len(p.owed) else 0
        return Progress(max(min(since, p.since), 0), p.offset, dict(p.fired), set())

    def _progress(self) -> dict[str, str]:
        annotations = self._stored().annotations()
        # Role.write merges into the meta state's annotations: an emptied list of ours must
        # disappear from them, not linger with its last value
        stored = self.role.meta.current.annotations
        for key in (FIRED, OWED):
            if key not in annotations:
                stored.pop(key, None)
        return annotations

    async def _store_progress(self) -> None:
        """Write progress when it changed in a way a restart must see (something fired, was
        scanned or became owed), else only every ``heartbeat`` seconds to prove liveness."""
        at = self.role.meta.current.committed_at
        age = (self.engine.clock.now() - at).total_seconds() if at else self.heartbeat
        if not self._dirty and age < self.heartbeat:
            return
        if await self.role.write(self._progress()):
            self._dirty = False
