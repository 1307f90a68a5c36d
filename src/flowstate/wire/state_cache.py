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
from flowstate.wire.binary import close_message, open_message, write_state

#: Bytes of encodings one store's cache holds by default.
DEFAULT_MAX_BYTES = 8 * 1024 * 1024
#: Encodings larger than this are not kept.
DEFAULT_MAX_ENTRY = 64 * 1024

_Key = tuple[str, int, datetime]
#: ``GetStatesResult.states``: field 1, length-delimited.
_STATES_FIELD = 0x0A


class EncodedStates:
    """Encodings of stored versions (as entries of a GetStates answer), bounded in bytes."""

    __slots__ = ("_items", "hits", "max_bytes", "max_entry", "misses", "nbytes")

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_entry: int = DEFAULT_MAX_ENTRY
    ) -> None:
        self.max_bytes = max_bytes
        self.max_entry = min(max_entry, max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._items: dict[_Key, bytes] = {}

    def __len__(self) -> int:
        return len(self._items)

    def write_entry(self, out: bytearray, state: State) -> None:
        """Append ``state`` as an entry of ``GetStatesResult.states`` (field 1: its tag, its
        length, its fields), exactly as the plain encoder would."""
        encoded = self._lookup(state)
        if encoded is not None:
            out += encoded
        else:
            out += _entry(state)

    def size(self, state: State) -> int:
        """The encoded size of ``state``'s entry; a stored version's encoding is kept, so
        the answer that carries it next takes it from here."""
        encoded = self._lookup(state)
        return len(encoded) if encoded is not None else len(_entry(state))

    def _lookup(self, state: State) -> bytes | None:
        """The entry of a stored version (made and kept on a miss); None for a version that
        is not stored or too big to keep."""
        at = state.committed_at
        if not state.rev or at is None:
            return None  # not a stored version: nothing identifies it
        key = (state.id, state.rev, at)
        items = self._items
        encoded = items.get(key)
        if encoded is not None:
            self.hits += 1
            return encoded
        self.misses += 1
        encoded = _entry(state)
        size = len(encoded)
        if size > self.max_entry:
            return None
        items[key] = encoded
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            oldest = next(iter(items))
            self.nbytes -= len(items.pop(oldest))
        return encoded


def _entry(state: State) -> bytes:
    out = bytearray()
    start = open_message(out, _STATES_FIELD)
    write_state(out, state)
    close_message(out, start)
    return bytes(out)
