"""Commands: small data objects that describe an action for the engine and the drivers.

Build them with the constructor functions (``transit``, ``park``, ``commit``…) and run them
with ``engine.do``; a flow returns one to tell the engine what to do next.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flowstate.errors import ValidationError
from flowstate.state import ENDED, STATE_ANNOTATION, State, StateCtx

DEFAULT_STATES_LIMIT = 50
DEFAULT_DELAYED_LIMIT = 500


class Command:
    """Base class of every command."""

    __slots__ = ()


class _Annotated(Command):
    __slots__ = ()
    annotations: dict[str, str]

    def with_annotation(self, name: str, value: str) -> _Annotated:
        self.annotations[name] = value
        return self

    def with_annotations(self, annotations: Mapping[str, str]) -> _Annotated:
        self.annotations.update(annotations)
        return self


@dataclass(slots=True, eq=False)
class TransitCmd(_Annotated):
    """Move ``ctx`` to flow ``to`` (in memory; committable)."""

    ctx: StateCtx
    to: str
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class ParkCmd(_Annotated):
    """Park ``ctx``: nothing more to execute (in memory; committable)."""

    ctx: StateCtx
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class ExecuteCmd(Command):
    """Execute ``ctx`` (in the background when run by ``engine.do``)."""

    ctx: StateCtx
    sync: bool = False


@dataclass(slots=True)
class DelayedState:
    """A snapshot of a state scheduled to run at ``execute_at``; ``offset`` orders the log."""

    state: State
    execute_at: datetime
    offset: int = 0


@dataclass(slots=True, eq=False)
class DelayCmd(_Annotated):
    """Schedule ``ctx`` to run flow ``to`` at ``execute_at`` (or ``after`` from now)."""

    ctx: StateCtx
    to: str
    execute_at: datetime | None = None
    after: timedelta | None = None
    commit: bool = True
    annotations: dict[str, str] = field(default_factory=dict)
    result: DelayedState | None = None

    def with_commit(self, commit: bool) -> DelayCmd:
        self.commit = commit
        return self

    def with_transit(self, to: str) -> DelayCmd:
        self.to = to
        return self


@dataclass(slots=True, eq=False)
class CommitCmd(Command):
    """Persist every committable sub-command atomically, with optimistic concurrency."""

    commands: list[Command]


@dataclass(slots=True, eq=False)
class NoopCmd(Command):
    """Do nothing (a flow that returns it ends the execution)."""


@dataclass(slots=True, eq=False)
class StackCmd(Command):
    """Serialise ``stacked`` into the state annotation ``annotation`` of ``carrier``."""

    carrier: StateCtx
    stacked: StateCtx
    annotation: str


@dataclass(slots=True, eq=False)
class UnstackCmd(Command):
    """Restore ``target`` from the state annotation ``annotation`` of ``carrier``."""

    carrier: StateCtx
    target: StateCtx
    annotation: str


@dataclass(slots=True, eq=False)
class GetStateByIdCmd(Command):
    """Load version ``rev`` of state ``id`` (0 = latest) into ``ctx``."""

    ctx: StateCtx
    id: str
    rev: int = 0


@dataclass(slots=True, eq=False)
class GetStateByLabelsCmd(Command):
    """Load the latest version whose labels contain ``labels`` into ``ctx``."""

    ctx: StateCtx
    labels: dict[str, str]


@dataclass(slots=True)
class GetStatesResult:
    """A page of the log. ``scanned_rev`` (an extension; 0 = unknown) is the rev up to which
    the query looked when ``more`` is False: no matching version with a rev at or below it
    is missing from ``states``, so a reader may resume after it instead of after its last
    match (how filtered iterators and watchers avoid rescanning what they already read)."""

    states: list[State] = field(default_factory=list)
    more: bool = False
    scanned_rev: int = 0


@dataclass(slots=True, eq=False)
class GetStatesCmd(Command):
    """Query the state log. ``labels`` is an OR-list of label sets that must all match.

    ``since_rev`` -1 means "since latest": start at the latest matching version.
    """

    since_rev: int = 0
    since_time: datetime | None = None
    labels: list[dict[str, str]] = field(default_factory=list)
    latest_only: bool = False
    limit: int = DEFAULT_STATES_LIMIT
    result: GetStatesResult | None = None

    def with_since_rev(self, rev: int) -> GetStatesCmd:
        self.since_rev = rev
        return self

    def with_since_latest(self) -> GetStatesCmd:
        self.since_rev = -1
        return self

    def with_since_time(self, when: datetime) -> GetStatesCmd:
        self.since_time = when
        return self

    def with_labels(self, labels: Mapping[str, str]) -> GetStatesCmd:
        """Add one AND-set of labels to the OR-list (ignored when empty)."""
        if labels:
            self.labels.append(dict(labels))
        return self

    with_or_labels = with_labels

    def with_latest_only(self) -> GetStatesCmd:
        self.latest_only = True
        return self

    def with_limit(self, limit: int) -> GetStatesCmd:
        self.limit = limit
        return self

    def copy(self) -> GetStatesCmd:
        return GetStatesCmd(
            self.since_rev,
            self.since_time,
            [dict(s) for s in self.labels],
            self.latest_only,
            self.limit,
        )


@dataclass(slots=True)
class GetDelayedStatesResult:
    delayed_states: list[DelayedState] = field(default_factory=list)
    more: bool = False


@dataclass(slots=True, eq=False)
class GetDelayedStatesCmd(Command):
    """Delayed states with ``since < execute_at <= until`` and offset > ``offset``."""

    since: datetime | None = None
    until: datetime | None = None
    offset: int = 0
    limit: int = DEFAULT_DELAYED_LIMIT
    result: GetDelayedStatesResult | None = None


@dataclass(slots=True, eq=False)
class StoreDataCmd(Command):
    """Store ``ctx.datas[alias]`` if dirty and reference it from the state."""

    ctx: StateCtx
    alias: str


@dataclass(slots=True, eq=False)
class GetDataCmd(Command):
    """Load the data referenced by the state annotation of ``alias`` into ``ctx.datas``."""

    ctx: StateCtx
    alias: str


def transit(ctx: StateCtx, to: str, annotations: Mapping[str, str] | None = None) -> TransitCmd:
    """Move ``ctx`` to flow ``to``."""
    return TransitCmd(ctx, to, dict(annotations) if annotations else {})


def park(ctx: StateCtx, annotations: Mapping[str, str] | None = None) -> ParkCmd:
    """Park ``ctx``: it has nothing more to execute."""
    return ParkCmd(ctx, dict(annotations) if annotations else {})


def end(ctx: StateCtx) -> ParkCmd:
    """Park ``ctx`` and mark it ended (``fs.ended(state)`` is then true)."""
    return ParkCmd(ctx, {STATE_ANNOTATION: ENDED})


def execute(ctx: StateCtx) -> ExecuteCmd:
    """Execute ``ctx``: in the background from ``engine.do``, in place when a flow returns it."""
    return ExecuteCmd(ctx)


def delay(ctx: StateCtx, to: str, after: timedelta | float) -> DelayCmd:
    """Run ``ctx`` in flow ``to`` after ``after`` (seconds or timedelta) from the engine's now."""
    if not isinstance(after, timedelta):
        after = timedelta(seconds=after)
    return DelayCmd(ctx, to, after=after)


def delay_until(ctx: StateCtx, to: str, at: datetime, commit: bool = True) -> DelayCmd:
    """Run ``ctx`` in flow ``to`` at ``at``."""
    return DelayCmd(ctx, to, execute_at=at, commit=commit)


def commit(*cmds: Command) -> CommitCmd:
    """Persist the committable sub-commands (transit, park) atomically."""
    return CommitCmd(list(cmds))


def noop() -> NoopCmd:
    return NoopCmd()


def stack(carrier: StateCtx, stacked: StateCtx, annotation: str) -> StackCmd:
    return StackCmd(carrier, stacked, annotation)


def unstack(carrier: StateCtx, target: StateCtx, annotation: str) -> UnstackCmd:
    return UnstackCmd(carrier, target, annotation)


def get_state_by_id(ctx: StateCtx, id: str, rev: int = 0) -> GetStateByIdCmd:
    return GetStateByIdCmd(ctx, id, rev)


def get_state_by_labels(ctx: StateCtx, labels: Mapping[str, str]) -> GetStateByLabelsCmd:
    return GetStateByLabelsCmd(ctx, dict(labels))


def get_states(
    labels: Mapping[str, str] | None = None,
    *,
    or_labels: list[Mapping[str, str]] | None = None,
    since_rev: int = 0,
    since_latest: bool = False,
    since_time: datetime | None = None,
    latest_only: bool = False,
    limit: int = DEFAULT_STATES_LIMIT,
) -> GetStatesCmd:
    """A query of the state log; the states land in ``cmd.result.states``."""
    sets = [dict(labels)] if labels else []
    sets += [dict(s) for s in or_labels or () if s]
    return GetStatesCmd(-1 if since_latest else since_rev, since_time, sets, latest_only, limit)


def get_states_by_labels(labels: Mapping[str, str] | None = None) -> GetStatesCmd:
    """The Go-style constructor: ``get_states(labels)`` with the builder methods."""
    return get_states(labels)


def get_delayed_states(
    since: datetime | None = None,
    until: datetime | None = None,
    offset: int = 0,
    limit: int = DEFAULT_DELAYED_LIMIT,
) -> GetDelayedStatesCmd:
    return GetDelayedStatesCmd(since, until, offset, limit)


def store_data(ctx: StateCtx, alias: str) -> StoreDataCmd:
    return StoreDataCmd(ctx, alias)


def get_data(ctx: StateCtx, alias: str) -> GetDataCmd:
    return GetDataCmd(ctx, alias)


def require(ok: bool, field_name: str, message: str) -> None:
    """Raise a ValidationError naming ``field_name`` unless ``ok``."""
    if not ok:
        raise ValidationError(field_name, message)
