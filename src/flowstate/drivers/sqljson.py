"""The JSON texts the SQL drivers store: annotation and label maps, and the snapshot of a
delayed state."""

from __future__ import annotations

import json
from collections.abc import Mapping

from flowstate.clock import from_millis, to_millis
from flowstate.state import State, Transition


def dumps_map(values: Mapping[str, str]) -> str:
    """A map as compact JSON (``{}`` without encoding when empty: the common case)."""
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")) if values else "{}"


def loads_map(text: str) -> dict[str, str]:
    return json.loads(text) if text != "{}" else {}


def dumps_state(state: State) -> str:
    """A whole state version as one JSON object (the snapshot a delayed state keeps)."""
    return json.dumps(
        {
            "id": state.id,
            "rev": state.rev,
            "annotations": state.annotations,
            "labels": state.labels,
            "committed_at": to_millis(state.committed_at) if state.committed_at else None,
            "to": state.transition.to,
            "transition_annotations": state.transition.annotations,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


def loads_state(text: str) -> State:
    d = json.loads(text)
    at = d["committed_at"]
    return State(
        d["id"],
        d["rev"],
        d["annotations"],
        d["labels"],
        from_millis(at) if at is not None else None,
        Transition(d["to"], d["transition_annotations"]),
    )
