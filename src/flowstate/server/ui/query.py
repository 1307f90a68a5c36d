"""The states view's questions to the store: filters, the status of a version, pending delays,
and pages of matching versions read backwards from a rev, newest first.

The driver API reads the log forwards (``since_rev``) and filters only by labels; flow and
status are checked here. A page is found by scanning windows of revs that grow backwards from
the cursor until enough versions match, so the newest page of a large store costs one small
query, and a scan never examines more than :data:`SCAN_BUDGET` versions per request.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from flowstate import recovery
from flowstate.commands import DelayedState, GetStatesCmd, get_delayed_states, get_state_by_id
from flowstate.delayer import FIRED, OFFSET
from flowstate.delayer import META_ID as DELAYER_META
from flowstate.engine import Engine
from flowstate.errors import NotFoundError, ValidationError
from flowstate.perform import (
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_QUERY_LABEL_SETS,
    MAX_QUERY_LABELS,
    check_text,
)
from flowstate.state import State, StateCtx, ended, is_system, parked

#: Every status the view filters by. ``forced``: ended by recovery after its max attempts.
STATUSES = ("running", "parked", "ended", "delayed", "recovering", "forced")
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Versions read per driver query while scanning.
SCAN_PAGE = 500
#: At most this many versions are examined to answer one request; the page then ends early
#: and its cursor continues the scan.
SCAN_BUDGET = 50_000
#: At most this many pending delays are loaded to mark states as delayed.
MAX_PENDING = 10_000
_FOREVER = datetime(9999, 1, 1, tzinfo=UTC)


def parse_label_set(raw: str, field_name: str = "labels") -> dict[str, str]:
    """``"k=v,k2=v2"`` -> ``{"k": "v", "k2": "v2"}``; every pair needs a key and ``=``."""
    labels: dict[str, str] = {}
    for part in raw.split(","):
        pair = part.strip()
        if not pair:
            continue
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValidationError(field_name, f"{pair!r} is not key=value")
        if key in labels and labels[key] != value:
            raise ValidationError(field_name, f"label {key!r} given twice with different values")
        check_text(key, f"{field_name} key", MAX_LABEL_KEY_BYTES)
        check_text(value, f"{field_name} value", MAX_LABEL_VALUE_BYTES)
        labels[key] = value
        if len(labels) > MAX_QUERY_LABELS:
            raise ValidationError(field_name, f"more than {MAX_QUERY_LABELS} labels")
    return labels


@dataclass(frozen=True, slots=True)
class Filter:
    """Which versions the view shows. ``labels`` is an OR of AND-sets (none: any labels);
    ``flows`` and ``statuses`` are OR-sets (empty: any)."""

    labels: tuple[dict[str, str], ...] = ()
    flows: frozenset[str] = frozenset()
    statuses: frozenset[str] = frozenset()
    latest_only: bool = True
    system: bool = False

    def matches(self, state: State, pending: Collection[str]) -> bool:
        """Whether ``state`` passes the flow, status and system filters (labels are the
        driver's job)."""
        if not self.system and is_system(state.id):
            return False
        if self.flows and state.transition.to not in self.flows:
            return False
        return not self.statuses or not self.statuses.isdisjoint(statuses(state, pending))

    def label_sets(self) -> list[dict[str, str]]:
        return [dict(s) for s in self.labels]


def parse_filter(params: Mapping[str, list[str]]) -> Filter:
    """The filter of a query string: ``view`` (``latest`` or ``all``), ``labels`` (repeated:
    OR; each ``k=v,k=v``: AND), ``flow`` and ``status`` (repeated: OR), ``system`` (``1``:
    include the engine's own ``flowstate.*`` states)."""
    view = _one(params, "view", "latest")
    if view not in ("latest", "all"):
        raise ValidationError("view", f"{view!r}: expected latest or all")
    sets = []
    raws = params.get("labels", [])
    if len(raws) > MAX_QUERY_LABEL_SETS:
        raise ValidationError("labels", f"{len(raws)} label sets; at most {MAX_QUERY_LABEL_SETS}")
    for i, raw in enumerate(raws):
        labels = parse_label_set(raw, f"labels[{i}]")
        if labels:
            sets.append(labels)
    total = sum(len(labels) for labels in sets)
    if total > MAX_QUERY_LABELS:
        raise ValidationError("labels", f"{total} labels in all sets; at most {MAX_QUERY_LABELS}")
    flows = frozenset(f for f in params.get("flow", []) if f)
    wanted = frozenset(s for s in params.get("status", []) if s)
    unknown = sorted(wanted.difference(STATUSES))
    if unknown:
        raise ValidationError("status", f"unknown {unknown[0]!r}: expected one of {STATUSES}")
    system = _one(params, "system", "0")
    if system not in ("0", "1"):
        raise ValidationError("system", f"{system!r}: expected 0 or 1")
    return Filter(tuple(sets), flows, wanted, view == "latest", system == "1")


def parse_int(params: Mapping[str, list[str]], name: str, default: int, lo: int, hi: int) -> int:
    raw = _one(params, name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValidationError(name, f"{raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ValidationError(name, f"{value} is out of range {lo}..{hi}")
    return value


def _one(params: Mapping[str, list[str]], name: str, default: str) -> str:
    values = params.get(name, [])
    if len(values) > 1:
        raise ValidationError(name, "given more than once")
    return values[0].strip() if values else default


def statuses(state: State, pending: Collection[str] = ()) -> list[str]:
    """The statuses of one version; ``pending`` holds the ids with a delay not yet fired."""
    tags: list[str] = []
    attempt = recovery.attempt(state)
    if parked(state):
        if ended(state):
            tags.append("ended")
            if attempt > recovery.max_attempts(state):
                tags.append("forced")
        else:
            tags.append("parked")
    else:
        tags.append("running")
        if attempt > 0:
            tags.append("recovering")
    if state.id in pending:
        tags.append("delayed")
    return tags


async def pending_delays(engine: Engine, limit: int = MAX_PENDING) -> list[DelayedState]:
    """Delayed states the delayer has not fired yet (by its stored progress), by offset."""
    watermark, fired = 0, set[int]()
    ctx = StateCtx()
    try:
        await engine.do(get_state_by_id(ctx, DELAYER_META))
        watermark = int(ctx.current.annotations.get(OFFSET, "0") or 0)
        fired = {int(x) for x in ctx.current.annotations.get(FIRED, "").split(",") if x}
    except (NotFoundError, ValueError):
        pass
    out: list[DelayedState] = []
    offset = watermark
    while len(out) < limit:
        cmd = get_delayed_states(until=_FOREVER, offset=offset, limit=min(500, limit - len(out)))
        await engine.do(cmd)
        assert cmd.result is not None
        for delayed in cmd.result.delayed_states:
            offset = delayed.offset
            if delayed.offset not in fired:
                out.append(delayed)
        if not cmd.result.more or not cmd.result.delayed_states:
            break
    return out


@dataclass(slots=True)
class Page:
    """Matching versions newest first; ``before`` continues with older ones (None: no more).
    ``scanned`` counts the versions examined."""

    states: list[State] = field(default_factory=list)
    before: int | None = None
    scanned: int = 0


async def scan(
    engine: Engine,
    labels: list[dict[str, str]],
    latest_only: bool,
    lo: int,
    hi: int,
    keep: Callable[[State], bool],
) -> tuple[list[State], int]:
    """Versions with ``lo < rev <= hi`` that match ``labels`` and ``keep``, in rev order, and
    how many were examined."""
    out: list[State] = []
    examined = 0
    since = lo
    while since < hi:
        cmd = GetStatesCmd(since, None, [dict(s) for s in labels], latest_only, SCAN_PAGE)
        await engine.do(cmd)
        assert cmd.result is not None
        for state in cmd.result.states:
            if state.rev > hi:
                return out, examined
            examined += 1
            since = state.rev
            if keep(state):
                out.append(state)
        if not cmd.result.more or not cmd.result.states:
            break
    return out, examined


async def page_back(
    engine: Engine,
    labels: list[dict[str, str]],
    latest_only: bool,
    keep: Callable[[State], bool],
    *,
    before: int | None,
    limit: int,
    budget: int = SCAN_BUDGET,
) -> Page:
    """Up to ``limit`` matching versions with rev < ``before`` (None: up to the head), newest
    first."""
    hi = before - 1 if before is not None else await engine.driver.head_rev()
    found: list[State] = []
    span = max(4 * limit, 256)
    page = Page()
    while hi > 0:
        lo = max(0, hi - span)
        window, examined = await scan(engine, labels, latest_only, lo, hi, keep)
        found = window + found
        page.scanned += examined
        if len(found) > limit:
            break
        hi = lo
        if page.scanned >= budget and hi > 0:
            page.states = found[::-1]
            page.before = hi + 1
            return page
        span *= 4
    page.states = found[: -limit - 1 : -1]
    if len(found) > limit:
        page.before = page.states[-1].rev
    return page


async def states_page(
    engine: Engine, flt: Filter, pending: Collection[str], before: int | None, limit: int
) -> Page:
    """A page of the states view; ``pending`` holds the ids with a delay not yet fired."""
    return await page_back(
        engine,
        flt.label_sets(),
        flt.latest_only,
        lambda s: flt.matches(s, pending),
        before=before,
        limit=limit,
    )
