"""The encoded form of stored versions, kept per store for the server's answers.

A GetStates page of 50 states spent about half of the server's CPU encoding states, and the
same recent versions are read again and again (every watcher, the web UI, each page of a
client that catches up). A stored version never changes, so its protobuf encoding can be kept.

Invariants: one cache serves one store (keys are ``(id, rev, committed_at)``; the commit time
tells apart two stores, or a store recreated, that reuse an id and a rev); it
holds at most ``max_bytes`` of encodings, evicting the oldest first; a version whose encoding is
larger than ``max_entry`` bytes is encoded each time and not kept (one big annotation must not
flush the cache). It is used from the event loop only (no lock).
"""

from __future__ import annotations

from datetime import datetime

from flowstate.state import State
from flowstate.wire.binary import write_state

#: Bytes of encodings one store's cache holds by default.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
#: Encodings larger than this are not kept.
DEFAULT_MAX_ENTRY = 64 * 1024

_Key = tuple[str, int, datetime]


class EncodedStates:
    """Encodings of stored versions (the fields of a ``State`` message), bounded in bytes."""

    __slots__ = ("_items", "hits", "max_bytes", "max_entry", "misses", "size")

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_entry: int = DEFAULT_MAX_ENTRY
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry = min(max_entry, max_bytes)
        self.size = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[_Key, bytes] = {}

    def __len__(self) -> int:
        return len(self._items)

    def write(self, out: bytearray, state: State) -> None:
        """Append the fields of ``state`` (a stored version: rev and commit time set) to
        ``out``, as :func:`flowstate.wire.binary.write_state` would."""
        at = state.committed_at
        if not state.rev or at is None:
            write_state(out, state)  # not a stored version: nothing identifies it
            return
        key = (state.id, state.rev, at)
        items = self._items
        encoded = items.get(key)
        if encoded is not None:
            self.hits += 1
            out += encoded
            return
        self.misses += 1
        start = len(out)
        write_state(out, state)
        size = len(out) - start
        if size > self.max_entry:
            return
        items[key] = bytes(out[start:])
        self.size += size
        while self.size > self.max_bytes:
            oldest = next(iter(items))
            self.size -= len(items.pop(oldest))
