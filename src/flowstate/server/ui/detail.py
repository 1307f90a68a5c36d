"""What the UI shows of one state: JSON shapes of versions, the timeline of its revisions, the
difference between two revisions, why it is waiting, and its attached data."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flowstate import recovery
from flowstate.commands import DelayedState
from flowstate.data import REF_PREFIX, Data
from flowstate.engine import Engine
from flowstate.gotime import format_rfc3339
from flowstate.server.ui.query import Page, page_back, statuses
from flowstate.state import DELAY_COMMIT, State, parked

#: Text data larger than this is cut in the preview (the download has it all).
TEXT_PREVIEW = 256 * 1024
#: Bytes of binary data shown as a hex dump.
HEX_PREVIEW = 4096


def iso(when: datetime | None) -> str | None:
    return format_rfc3339(when) if when is not None else None


def summary(state: State, pending: Collection[str] = ()) -> dict[str, Any]:
    """A version as a row of the states view."""
    return {
        "id": state.id,
        "rev": state.rev,
        "to": state.transition.to,
        "labels": dict(state.labels),
        "committed_at": iso(state.committed_at),
        "statuses": statuses(state, pending),
        "attempt": recovery.attempt(state),
    }


def full(state: State, pending: Collection[str] = ()) -> dict[str, Any]:
    """A version with everything it carries."""
    out = summary(state, pending)
    out["annotations"] = dict(state.annotations)
    out["transition_annotations"] = dict(state.transition.annotations)
    return out


async def timeline(engine: Engine, state_id: str, before: int | None, limit: int) -> Page:
    """Revisions of ``state_id`` with rev < ``before``, newest first."""
    return await page_back(
        engine, [], False, lambda s: s.id == state_id, before=before, limit=limit
    )


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two versions. ``section``: ``transition``, ``transition
    annotations``, ``annotations`` or ``labels``; ``old``/``new`` None: absent."""

    section: str
    key: str
    old: str | None
    new: str | None

    @property
    def kind(self) -> str:
        if self.old is None:
            return "added"
        if self.new is None:
            return "removed"
        return "changed"

    def as_json(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "key": self.key,
            "old": self.old,
            "new": self.new,
            "kind": self.kind,
        }


def diff(old: State, new: State) -> list[Change]:
    """What changed from ``old`` to ``new``: flow, then each map, keys in order."""
    changes: list[Change] = []
    if old.transition.to != new.transition.to:
        changes.append(Change("transition", "to", old.transition.to, new.transition.to))
    for section, a, b in (
        ("transition annotations", old.transition.annotations, new.transition.annotations),
        ("annotations", old.annotations, new.annotations),
        ("labels", old.labels, new.labels),
    ):
        for key in sorted(a.keys() | b.keys()):
            if a.get(key) != b.get(key):
                changes.append(Change(section, key, a.get(key), b.get(key)))
    return changes


def _seconds(td: Any) -> float:
    return float(td.total_seconds())


def waiting(
    state: State, now: datetime, delays: Iterable[DelayedState], recoverer_here: bool
) -> dict[str, Any]:
    """Why the latest version ``state`` is where it is: its recovery clock and pending delays.

    ``reasons`` says it in words, the other keys give the numbers.
    """
    pending = [_delay_json(d, state, now) for d in delays]
    reasons: list[str] = []
    out: dict[str, Any] = {"parked": parked(state), "delays": pending, "reasons": reasons}
    for d in pending:
        when = _span(d["in_seconds"])
        if d["stale"]:
            reasons.append(
                f"A delay to {d['to']!r} fires {when}, but the state changed since it was "
                f"delayed (rev {d['rev']} then, {state.rev} now): it will be dropped."
            )
        else:
            reasons.append(f"A delay to {d['to']!r} fires {when} ({d['execute_at']}).")
    if parked(state):
        if not pending:
            reasons.append("Parked: nothing runs until something commits it to a flow.")
        return out
    enabled = recovery.enabled(state)
    attempt = recovery.attempt(state)
    limit = recovery.max_attempts(state)
    retry_after = recovery.retry_after(state)
    committed = state.committed_at or now
    since = now - committed
    due = committed + retry_after
    out["recovery"] = {
        "enabled": enabled,
        "since_commit_seconds": _seconds(since),
        "retry_after_seconds": _seconds(retry_after),
        "due_at": iso(due),
        "due_in_seconds": _seconds(due - now),
        "attempt": attempt,
        "max_attempts": limit,
        "attempts_left": max(limit - attempt, 0),
        "recoverer_here": recoverer_here,
    }
    head = f"In flow {state.transition.to!r} for {_span(_seconds(since), ago=False)}"
    if not enabled:
        reasons.append(
            f"{head}; recovery is disabled for this state: only a flow or an operator moves it on."
        )
        return out
    action = (
        f"retries it (attempt {attempt + 1} of {limit})"
        if attempt < limit
        else f"ends it by force (all {limit} attempts used)"
    )
    if due > now:
        reasons.append(
            f"{head}; if no flow commits it within its retry-after of "
            f"{_span(_seconds(retry_after), ago=False)}, recovery {action} "
            f"{_span(_seconds(due - now))}."
        )
    else:
        late = f"{head}; its retry-after of {_span(_seconds(retry_after), ago=False)} passed "
        late += f"{_span(_seconds(due - now))}: recovery {action} at its next check"
        if not recoverer_here:
            late += " (no recoverer runs in this server: is one running elsewhere?)"
        reasons.append(late + ".")
    return out


def _delay_json(delayed: DelayedState, state: State, now: datetime) -> dict[str, Any]:
    commits = delayed.state.transition.annotations.get(DELAY_COMMIT) != "false"
    return {
        "offset": delayed.offset,
        "to": delayed.state.transition.to,
        "execute_at": iso(delayed.execute_at),
        "in_seconds": _seconds(delayed.execute_at - now),
        "rev": delayed.state.rev,
        "commit": commits,
        "stale": commits and delayed.state.rev != state.rev,
    }


def _span(seconds: float, ago: bool = True) -> str:
    """``in 5m 3s`` / ``3s ago`` (or just ``5m 3s`` without ``ago``)."""
    whole = round(abs(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n}{u}" for n, u in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if secs or not parts:
        parts.append(f"{secs}s")
    text = " ".join(parts[:2])
    if not ago:
        return text
    return f"in {text}" if seconds >= 0 else f"{text} ago"


def data_refs(state: State) -> list[dict[str, Any]]:
    """The data attached to a version: alias and data rev, from its ``flowstate.data.*``
    annotations."""
    refs = []
    for key, value in sorted(state.annotations.items()):
        if key.startswith(REF_PREFIX):
            rev = value.split(":")[-1]
            refs.append({"alias": key.removeprefix(REF_PREFIX), "rev": rev})
    return refs


def is_binary(data: Data) -> bool:
    """Marked binary, or not UTF-8."""
    if data.binary:
        return True
    try:
        data.blob.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def data_preview(alias: str, data: Data) -> dict[str, Any]:
    """Text as text (cut at :data:`TEXT_PREVIEW`), anything else as a hex dump."""
    binary = is_binary(data)
    out: dict[str, Any] = {
        "alias": alias,
        "rev": data.rev,
        "size": len(data.blob),
        "binary": binary,
        "annotations": dict(data.annotations),
    }
    if binary:
        out["hex"] = hexdump(data.blob[:HEX_PREVIEW])
        out["truncated"] = len(data.blob) > HEX_PREVIEW
    else:
        out["text"] = data.blob[:TEXT_PREVIEW].decode("utf-8", errors="replace")
        out["truncated"] = len(data.blob) > TEXT_PREVIEW
    return out


def hexdump(blob: bytes) -> str:
    """Lines of ``offset  16 hex bytes  |ascii|``."""
    lines = []
    for at in range(0, len(blob), 16):
        chunk = blob[at : at + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{at:08x}  {hexes:<47}  |{text}|")
    return "\n".join(lines)
