"""Caps on how many repeated items one message may carry, enforced while decoding.

A few bytes on the wire can stand for hundreds of bytes in memory (an empty ``state_ctxs``
entry is 2 bytes of protobuf and a StateCtx of five objects), so the request size limit alone
does not bound what decoding builds. Both codecs count the repeated fields as they read them
and stop with a :class:`~flowstate.wire.errors.WireError` naming the field as soon as a count
passes its cap, before the rest is built (docs/limits.md lists the caps and why).
"""

from __future__ import annotations

from flowstate.perform import MAX_QUERY_LABEL_SETS, MAX_QUERY_LABELS, MAX_STATE_LABELS
from flowstate.state import State
from flowstate.wire.errors import WireError

__all__ = [
    "MAX_ANNOTATIONS",
    "MAX_COMMIT_COMMANDS",
    "MAX_DATAS",
    "MAX_JSON_VALUES",
    "MAX_MAP_ENTRIES",
    "MAX_PAGE_ITEMS",
    "MAX_QUERY_LABELS",
    "MAX_QUERY_LABEL_SETS",
    "MAX_STATE_CTXS",
    "MAX_STATE_LABELS",
    "MAX_TRANSITIONS",
    "Budget",
    "over",
    "too_many",
]

#: State contexts in one command's ``state_ctxs`` (a commit touching more states is split).
MAX_STATE_CTXS = 10_000
#: Commands in one commit.
MAX_COMMIT_COMMANDS = 10_000
#: Entries of one annotations map (of a state, a transition, a data or a command).
MAX_ANNOTATIONS = 10_000
#: Datas of one state context.
MAX_DATAS = 10_000
#: Transitions in all state contexts of one message.
MAX_TRANSITIONS = 100_000
#: Map entries (labels, annotations, datas) in all of one message.
MAX_MAP_ENTRIES = 1_000_000
#: States (or delayed states) in one result page; the server never sends more.
MAX_PAGE_ITEMS = 10_000
#: JSON values (objects, arrays, strings, numbers…) in one JSON body: what ``json.loads``
#: builds before the decoder sees it.
MAX_JSON_VALUES = 1_000_000


def too_many(field: str, cap: int, what: str = "items") -> WireError:
    """The error for a repeated ``field`` past its ``cap``."""
    return WireError(field, over(cap, what))


def over(cap: int, what: str) -> str:
    """The reason of :func:`too_many`."""
    return f"more than {cap:,} {what}; that many are not allowed"


def _state_entries(state: State) -> int:
    return len(state.labels) + len(state.annotations) + len(state.transition.annotations)


class Budget:
    """What one message may still hold across all its parts: transitions and map entries.

    Charged after each part is read; a part's own maps are capped as they are read, so a
    part never overshoots by more than those caps.
    """

    __slots__ = ("entries", "transitions")

    def __init__(self) -> None:
        self.entries = MAX_MAP_ENTRIES
        self.transitions = MAX_TRANSITIONS

    def take(self, count: int, where: str) -> None:
        """Charge ``count`` map entries read at ``where``."""
        self.entries -= count
        if self.entries < 0:
            raise too_many(
                where or "command", MAX_MAP_ENTRIES, "labels, annotations and datas in one message"
            )

    def state(self, state: State, where: str) -> None:
        """Charge the map entries of ``state``."""
        self.take(_state_entries(state), where)

    def transition(self, annotations: int, where: str) -> None:
        """Charge one transition (with ``annotations`` entries) read at ``where``."""
        self.transitions -= 1
        if self.transitions < 0:
            raise too_many(where, MAX_TRANSITIONS, "transitions in one message")
        self.take(annotations, where)
