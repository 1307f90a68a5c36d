"""MemoryDriver: everything in process memory. For tests, demos and benchmarks of the engine."""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime

from flowstate.clock import Clock, to_millis, to_seconds
from flowstate.commands import (
    CommitCmd,
    DelayedState,
    GetDelayedStatesResult,
    GetStatesCmd,
    GetStatesResult,
)
from flowstate.data import Data
from flowstate.drivers.base import Driver, label_match, process_commit, run_commit
from flowstate.errors import DataNotFoundError, NotFoundError
from flowstate.state import State


class MemoryDriver(Driver):
    """An in-memory store. Commits are atomic and run without awaiting, so they never interleave.

    Nothing survives the process; use :class:`~flowstate.SqliteDriver` for durability.
    """

    settles_writes = True  # writes never suspend: a cancellation cannot split one

    def __init__(self, clock: Clock | None = None) -> None:
        super().__init__(clock)
        self._log: list[State] = []  # _log[i].rev == i + 1
        self._latest: dict[str, State] = {}
        # label index: (key, value) -> revs of the versions carrying it, ascending, so label
        # queries read only candidate versions instead of the whole log
        self._by_pair: dict[tuple[str, str], list[int]] = {}
        self._datas: list[tuple[dict[str, str], bytes]] = []  # _datas[i] has rev i + 1
        self._delayed: list[DelayedState] = []  # by offset; _delayed[i].offset == i + 1
        # execute_at index: hour (Unix seconds // 3600) -> offsets due in it, ascending, so a
        # query with a lower time bound (the delayer's look-ahead window) reads only the hours
        # it spans instead of every delayed state ever stored
        self._delayed_by_hour: dict[int, list[int]] = {}

    async def commit(self, cmd: CommitCmd) -> None:
        tx = _MemoryTx(self)
        outcome = run_commit(process_commit(cmd, self.clock.now()), tx)
        tx.apply()
        outcome.apply()
        self._announce_stored(outcome)

    async def get_state(self, state_id: str, rev: int) -> State:
        return self._get_state(state_id, rev).copy()

    def _get_state(self, state_id: str, rev: int) -> State:
        if rev == 0:
            found = self._latest.get(state_id)
        else:
            found = self._log[rev - 1] if 0 < rev <= len(self._log) else None
            if found is not None and found.id != state_id:
                found = None
        if found is None:
            raise NotFoundError(f"id={state_id} rev={rev}")
        return found

    async def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        return self._get_state_by_labels(labels).copy()

    def _get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        sets = [dict(labels)] if labels else []
        for state in self._newest_first(sets):
            if label_match(state.labels, sets):
                return state
        raise NotFoundError(f"labels={dict(labels)}")

    def _candidates(self, want: Mapping[str, str]) -> list[int]:
        """Revs that may match label set ``want`` (non-empty): its rarest pair's."""
        by_pair = self._by_pair
        return min((by_pair.get(p, _NONE) for p in want.items()), key=len)

    def _newest_first(self, sets: list[dict[str, str]]) -> Iterable[State]:
        """Versions that may match ``sets``, highest rev first."""
        log = self._log
        if not sets or not all(sets):
            return reversed(log)
        lists = [self._candidates(want) for want in sets]
        if len(lists) == 1:
            return (log[r - 1] for r in reversed(lists[0]))
        merged = heapq.merge(*(reversed(c) for c in lists), reverse=True)
        return (log[r - 1] for r in _unique(merged))

    def _oldest_first(self, sets: list[dict[str, str]], after: int) -> Iterable[State]:
        """Versions with rev > ``after`` that may match ``sets``, lowest rev first."""
        log = self._log
        if not sets or not all(sets):
            return (log[i] for i in range(after, len(log)))
        lists = [self._candidates(want) for want in sets]
        tails = [c[bisect_right(c, after) :] for c in lists]
        merged = tails[0] if len(tails) == 1 else _unique(heapq.merge(*tails))
        return (log[r - 1] for r in merged)

    async def get_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        result = self._page(cmd)
        result.states = [s.copy() for s in result.states]
        return result

    async def read_states(self, cmd: GetStatesCmd) -> GetStatesResult:
        """The stored versions themselves: they are never changed once committed (a commit
        appends new ones), and the caller promises not to change them."""
        return self._page(cmd)

    def _page(self, cmd: GetStatesCmd) -> GetStatesResult:
        log, sets = self._log, cmd.labels
        since_ms = to_millis(cmd.since_time) if cmd.since_time is not None else None

        def visible(s: State) -> bool:
            if since_ms is not None and to_millis(s.committed_at or _EPOCH) < since_ms:
                return False
            return label_match(s.labels, sets)

        start = cmd.since_rev
        if start < 0:
            anchor = next((s for s in self._newest_first(sets) if visible(s)), None)
            start = anchor.rev - 1 if anchor is not None else len(log)
        out: list[State] = []
        more = False
        latest_only, latest = cmd.latest_only, self._latest
        for s in self._oldest_first(sets, start):
            if visible(s) and (not latest_only or latest[s.id] is s):
                if len(out) == cmd.limit:
                    more = True
                    break
                out.append(s)
        return GetStatesResult(out, more, 0 if more else len(log))

    async def delay(self, delayed: DelayedState) -> int:
        return _MemoryTx(self).delay(delayed, apply=True)

    async def get_delayed_states(
        self, since: datetime | None, until: datetime, offset: int, limit: int
    ) -> GetDelayedStatesResult:
        lo = to_seconds(since) if since is not None else None
        hi = to_seconds(until)
        out: list[DelayedState] = []
        more = False
        for d in self._delayed_candidates(lo, hi, offset):
            at = to_seconds(d.execute_at)
            if at > hi or (lo is not None and at <= lo):
                continue
            if len(out) == limit:
                more = True
                break
            out.append(DelayedState(d.state.copy(), d.execute_at, d.offset))
        return GetDelayedStatesResult(out, more)

    def _delayed_candidates(self, lo: int | None, hi: int, offset: int) -> Iterator[DelayedState]:
        """Delayed states with offset > ``offset`` that may lie in (lo, hi], by offset."""
        if lo is None or hi < lo:
            log = self._delayed  # by offset: start right after ``offset``
            return (log[i] for i in range(max(offset, 0), len(log)))
        first, last = lo // 3600, hi // 3600
        if last - first + 1 <= len(self._delayed_by_hour):
            hours = [self._delayed_by_hour.get(h, []) for h in range(first, last + 1)]
        else:
            hours = [v for h, v in self._delayed_by_hour.items() if first <= h <= last]
        offsets = sorted(o for hour in hours for o in hour if o > offset)
        return (self._delayed[o - 1] for o in offsets)

    async def store_data(self, data: Data) -> None:
        self._datas.append((dict(data.annotations), bytes(data.blob)))
        data.rev = len(self._datas)

    async def get_data(self, data: Data) -> None:
        _load_data(self._datas, data)


def _load_data(datas: list[tuple[dict[str, str], bytes]], data: Data) -> None:
    if not 0 < data.rev <= len(datas):
        raise DataNotFoundError(data.rev)
    annotations, blob = datas[data.rev - 1]
    data.annotations = dict(annotations)
    data.blob = blob


class _MemoryTx:
    """Buffers one commit's writes; :meth:`apply` publishes them all at once."""

    def __init__(self, driver: MemoryDriver) -> None:
        self.d = driver
        self.states: list[State] = []
        self.latest: dict[str, int] = {}
        self.datas: list[tuple[dict[str, str], bytes]] = []
        self.delayed: list[DelayedState] = []

    def commit_state(self, state: State, expected_rev: int) -> bool:
        current = self.latest.get(state.id)
        if current is None:
            stored = self.d._latest.get(state.id)
            current = stored.rev if stored is not None else 0
        if current != expected_rev:
            return False
        state.rev = len(self.d._log) + len(self.states) + 1
        self.states.append(state)
        self.latest[state.id] = state.rev
        return True

    def get_state(self, state_id: str, rev: int) -> State:
        for s in reversed(self.states):
            if s.id == state_id and (rev == 0 or s.rev == rev):
                return s.copy()
        return self.d._get_state(state_id, rev).copy()

    def get_state_by_labels(self, labels: Mapping[str, str]) -> State:
        sets = [dict(labels)] if labels else []
        for s in reversed(self.states):
            if label_match(s.labels, sets):
                return s.copy()
        return self.d._get_state_by_labels(labels).copy()

    def store_data(self, data: Data) -> None:
        self.datas.append((dict(data.annotations), bytes(data.blob)))
        data.rev = len(self.d._datas) + len(self.datas)

    def get_data(self, data: Data) -> None:
        n = len(self.d._datas)
        if data.rev > n and data.rev - n <= len(self.datas):
            annotations, blob = self.datas[data.rev - n - 1]
            data.annotations, data.blob = dict(annotations), blob
            return
        _load_data(self.d._datas, data)

    def delay(self, delayed: DelayedState, apply: bool = False) -> int:
        stored = DelayedState(delayed.state.copy(), delayed.execute_at, 0)
        stored.offset = len(self.d._delayed) + len(self.delayed) + 1
        self.delayed.append(stored)
        if apply:
            self.apply()
        return stored.offset

    def apply(self) -> None:
        d = self.d
        by_pair = d._by_pair
        for s in self.states:
            d._log.append(s)
            d._latest[s.id] = s
            for pair in s.labels.items():
                revs = by_pair.get(pair)
                if revs is None:
                    by_pair[pair] = [s.rev]
                else:
                    revs.append(s.rev)
        d._datas.extend(self.datas)
        d._delayed.extend(self.delayed)
        for delayed in self.delayed:
            hour = to_seconds(delayed.execute_at) // 3600
            d._delayed_by_hour.setdefault(hour, []).append(delayed.offset)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NONE: list[int] = []


def _unique(revs: Iterable[int]) -> Iterator[int]:
    """``revs`` (sorted) without repeats: a version may match several label sets."""
    last = None
    for rev in revs:
        if rev != last:
            yield rev
            last = rev
