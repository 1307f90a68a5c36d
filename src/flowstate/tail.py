"""One reader of new commits per driver, shared by every waiting watcher of the process.

Without it each watcher waiting at the head queried the store on its own after every commit:
N watchers cost N queries per commit, and a filtered watcher whose labels rarely match
re-read everything since its last match each time. The tail reads each new commit once, in
rev order and unfiltered, and hands it to the watchers whose filter accepts it; a commit wakes
only those.

Invariants (everything runs on the driver's event loop; the methods below never await, so a
join, a dispatch and a leave are atomic with respect to each other):

* ``rev``: every version with a rev at or below it has been read and offered to every
  subscriber. It only grows while the tail runs.
* ``_ring`` holds every version with ``_ring_from < rev <= self.rev`` (at most
  :data:`RING_SIZE`), so a watcher that caught up with its own queries to a rev in that range
  joins without a gap by replaying the ring.
* A subscriber is offered only versions above its own ``_scanned`` (what its own queries
  already covered), so joining ahead of the tail is safe too.
* A subscriber whose buffer holds :data:`MAX_PENDING` versions is detached (a slow consumer
  must not make the tail hold the log in memory); it resumes with its own queries from the
  last rev decided for it, and joins again once it is back at the head.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from flowstate.commands import GetStatesCmd, GetStatesResult
from flowstate.state import State

if TYPE_CHECKING:
    from flowstate.drivers.base import Driver
    from flowstate.iterator import Watcher

#: Recent versions kept for watchers that join while the tail is ahead of them.
RING_SIZE = 1024
#: Versions read per query.
PAGE = 500
#: Versions a subscriber may hold undelivered before it is detached.
MAX_PENDING = 1000
#: How long the tail waits for a notification before it re-reads anyway (a safety net).
REFRESH = 5.0

LabelPair = tuple[str, str]


class Tail:
    """The shared reader of one driver. Created on first use by :func:`tail_of`."""

    def __init__(self, driver: Driver) -> None:
        self.driver = driver
        self.rev = 0
        self._ring: deque[State] = deque()
        self._ring_from = 0
        # Subscribers by the first label pair of each of their label sets (a version can only
        # match a set if it carries that pair), and those without label sets (match anything).
        self._by_pair: dict[LabelPair, set[Watcher]] = {}
        self._any: set[Watcher] = set()
        self._subs: set[Watcher] = set()
        # Subscribers by the stop event of their engine, so that a shutdown's sweep costs one
        # check per engine, not one per watcher (every close() wakes the notifier blind).
        self._by_stop: dict[asyncio.Event, set[Watcher]] = {}
        self._task: asyncio.Task[None] | None = None
        self._waiting = False
        # Set by the notifier hook when something may be new beyond ``rev`` (a higher rev
        # announced, or a wake naming none); ``_poke`` wakes the reader if it waits.
        self._dirty = False
        self._poke: asyncio.Future[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def join(self, w: Watcher, since: int) -> bool:
        """Subscribe ``w``, whose own queries covered every rev up to ``since``.

        Returns False (and changes nothing) when the tail is so far ahead that its ring no
        longer covers ``since``: the watcher must catch up with its own queries first.
        """
        if self._task is None or self._task.done():
            self.rev = since
            self._ring.clear()
            self._ring_from = since
            self._task = asyncio.get_running_loop().create_task(self._run())
        elif since < self._ring_from:
            return False
        elif since < self.rev:
            # replay what the tail read since ``since`` (atomic: no await until the end)
            latest = _latest_revs(self._ring) if w.cmd.latest_only else None
            for state in self._ring:
                if state.rev > since and w.accepts(state, latest):
                    w.push(state.copy())
        w._scanned = max(since, self.rev)
        w._tail = self
        self._subs.add(w)
        if w._stop is not None:
            self._by_stop.setdefault(w._stop, set()).add(w)
        sets = w.cmd.labels
        if not sets:
            self._any.add(w)
        for want in sets:
            if want:
                self._by_pair.setdefault(next(iter(want.items())), set()).add(w)
            else:
                self._any.add(w)
        return True

    def leave(self, w: Watcher) -> None:
        """Unsubscribe ``w``; it keeps its buffer and resumes after the last rev decided for it."""
        if w._tail is not self:
            return
        w._scanned = max(w._scanned, self.rev)
        w._tail = None
        # back to its own queries (with their retry and backoff if the store fails) before it
        # joins again; with nothing buffered, they start after what the tail decided for it
        w._at_head = False
        if not w._buf:
            w.cmd.since_rev = max(w.cmd.since_rev, w._scanned)
        self._subs.discard(w)
        self._any.discard(w)
        if w._stop is not None:
            engine_subs = self._by_stop.get(w._stop)
            if engine_subs is not None:
                engine_subs.discard(w)
                if not engine_subs:
                    del self._by_stop[w._stop]
        for want in w.cmd.labels:
            if want:
                pair = next(iter(want.items()))
                group = self._by_pair.get(pair)
                if group is not None:
                    group.discard(w)
                    if not group:
                        del self._by_pair[pair]
        if not self._subs and self._waiting and self._task is not None:
            self._task.cancel()  # idle: nothing to read for (cancelling a wait is harmless)

    async def stop(self) -> None:
        """Detach every subscriber and end the reader (the driver is closing)."""
        for w in list(self._subs):
            self.leave(w)
            w.wake()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def offer(self, stored: list[State]) -> None:
        """Versions this process just made durable, in commit order. Those that continue the
        tail without a gap are dispatched at once, so the tail need not read them back; any
        other (a rev skipped, another process's commit between) is left to the next read."""
        if self._task is None or not stored:
            return
        run: list[State] = []
        rev = self.rev
        for state in stored:
            if state.rev != rev + 1:
                break
            run.append(state)
            rev = state.rev
        if run:
            self._dispatch(GetStatesResult(run, more=True))

    def _on_notify(self, rev: int) -> None:
        """Notifier hook. Own commits were offered before they are announced, so their revs
        are already held and wake nobody; a higher rev (another process's commit, one of
        ours that left a gap) or a wake naming no rev (reconnection, shutdown) does."""
        if rev == 0:
            # a blind wake is also how an engine's shutdown reaches its watchers: those it
            # closed leave now, not after a read that may be slow or stuck on a failing store
            # (subscribers wait on the tail alone, with no timer of their own)
            self._sweep()
        if rev == 0 or rev > self.rev:
            self._dirty = True
            poke = self._poke
            if poke is not None and not poke.done():
                poke.set_result(None)

    async def _run(self) -> None:
        driver = self.driver
        notifier = driver.notifier
        notifier.hooks.append(self._on_notify)
        poller = driver._head_poller if driver.poll_interval is not None else None
        loop = asyncio.get_running_loop()
        try:
            while self._subs:
                self._dirty = False  # what is announced from now on is read next time
                result = await driver.read_states(GetStatesCmd(since_rev=self.rev, limit=PAGE))
                self._dispatch(result)
                self._sweep()
                if result.more or self._dirty:
                    continue
                if not self._subs:
                    break
                # Wait for the doorbell, or REFRESH seconds (the safety net). A polling driver
                # learns of other processes' commits only while someone waits on its poller.
                poke = self._poke = loop.create_future()
                self._waiting = True
                if poller is not None:
                    poller.hold()
                try:
                    await asyncio.wait_for(poke, REFRESH)
                except TimeoutError:
                    pass
                finally:
                    self._waiting = False
                    self._poke = None
                    if poller is not None:
                        poller.unhold()
        except asyncio.CancelledError:
            pass
        except Exception:
            # The watchers' own queries retry and report a failing store; hand them back.
            pass
        finally:
            if self._on_notify in notifier.hooks:
                notifier.hooks.remove(self._on_notify)
            if self._task is asyncio.current_task():
                self._task = None
            for w in list(self._subs):
                self.leave(w)
                w.wake()

    def _dispatch(self, result: GetStatesResult) -> None:
        """Offer each new version to the subscribers that may want it; wake those it reached."""
        states = result.states
        woken: set[Watcher] = set()
        latest: dict[str, int] | None = None
        for state in states:
            if state.rev <= self.rev:
                continue  # never re-offer (a store that returned an overlap)
            candidates = self._candidates(state)
            for w in candidates:
                if state.rev <= w._scanned:
                    continue
                if w.cmd.latest_only and latest is None:
                    latest = _latest_revs(states)
                if not w.accepts(state, latest):
                    continue
                if w.pending >= MAX_PENDING:
                    w._scanned = max(w._scanned, state.rev - 1)
                    self._detach_slow(w)
                    woken.add(w)
                    continue
                w.push(state.copy())
                woken.add(w)
            self._remember(state)
            self.rev = state.rev
        if not result.more and result.scanned_rev > self.rev:
            self.rev = result.scanned_rev  # nothing up to there: readers may resume after it
        for w in woken:
            w.wake()

    def _sweep(self) -> None:
        """Let go of the watchers of engines that shut down (a shutdown wakes blind, which
        gets here); a watcher closed on its own leaves by itself."""
        for stop in [stop for stop in self._by_stop if stop.is_set()]:
            for w in list(self._by_stop.get(stop, ())):
                self.leave(w)
                w.wake()

    def _candidates(self, state: State) -> list[Watcher]:
        found: set[Watcher] = set(self._any)
        by_pair = self._by_pair
        if by_pair:
            for pair in state.labels.items():
                group = by_pair.get(pair)
                if group:
                    found |= group
        return list(found)

    def _detach_slow(self, w: Watcher) -> None:
        # leave() would move its cursor to self.rev, past versions of this batch not yet
        # offered to it; keep the exact rev decided so far
        scanned = w._scanned
        self.leave(w)
        w._scanned = scanned

    def _remember(self, state: State) -> None:
        self._ring.append(state)
        while len(self._ring) > RING_SIZE:
            self._ring_from = self._ring.popleft().rev


def _latest_revs(states: deque[State] | list[State]) -> dict[str, int]:
    """The highest rev of each id among ``states`` (for latest-only subscribers)."""
    return {s.id: s.rev for s in states}


def tail_of(driver: Driver) -> Tail:
    """The driver's shared tail, created on first use."""
    tail = driver._tail
    if tail is None:
        tail = driver._tail = Tail(driver)
    return tail
