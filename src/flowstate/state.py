"""The state model: State, Transition and the StateCtx a flow works on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowstate.data import Data

DELAY_UNTIL = "flowstate.delay.until"
DELAY_COMMIT = "flowstate.delay.commit"
STATE_ANNOTATION = "flowstate.state"
ENDED = "ended"
SYSTEM_PREFIX = "flowstate."


@dataclass(slots=True)
class Transition:
    """Where a state is going: ``to`` a flow id (empty = parked) with per-transition annotations."""

    to: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    def copy(self) -> Transition:
        return Transition(self.to, dict(self.annotations))


@dataclass(slots=True)
class State:
    """One version of a workflow instance. ``rev`` is assigned by the store (0 = never stored)."""

    id: str = ""
    rev: int = 0
    annotations: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    committed_at: datetime | None = None
    transition: Transition = field(default_factory=Transition)

    def copy(self) -> State:
        """A deep copy: maps are copied, never shared."""
        return State(
            self.id,
            self.rev,
            dict(self.annotations),
            dict(self.labels),
            self.committed_at,
            Transition(self.transition.to, dict(self.transition.annotations)),
        )

    def annotation(self, name: str) -> str:
        """Transition annotation ``name`` if present (even empty), else the state annotation."""
        ta = self.transition.annotations
        if name in ta:
            return ta[name]
        return self.annotations.get(name, "")

    def set_annotation(self, name: str, value: str) -> State:
        self.annotations[name] = value
        return self

    def set_label(self, name: str, value: str) -> State:
        self.labels[name] = value
        return self

    def to_ctx(self) -> StateCtx:
        """A ctx loaded from this stored version: current = committed = a copy of it."""
        return StateCtx(current=self.copy(), committed=self.copy() if self.rev > 0 else State())


@dataclass(slots=True, eq=False)
class StateCtx:
    """The working context of one state.

    ``current`` is what flows modify; ``committed`` is the version last read from or written to
    the store, and ``committed.rev`` is the rev the next commit expects. ``transitions`` lists
    the transitions applied since ``committed``; ``datas`` holds attached payloads by alias.
    While executed by an engine, :attr:`done` is set when the engine shuts down.
    """

    current: State = field(default_factory=State)
    committed: State = field(default_factory=State)
    transitions: list[Transition] = field(default_factory=list)
    datas: dict[str, Data] = field(default_factory=dict)
    done: asyncio.Event | None = field(default=None, repr=False)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StateCtx):
            return NotImplemented
        return (
            self.current == other.current
            and self.committed == other.committed
            and self.transitions == other.transitions
            and self.datas == other.datas
        )

    def copy(self) -> StateCtx:
        """Copy current, committed and transitions (not datas); keeps the done signal."""
        return StateCtx(
            self.current.copy(),
            self.committed.copy(),
            [t.copy() for t in self.transitions],
            {},
            self.done,
        )

    def deep_copy(self) -> StateCtx:
        """Copy everything, datas included."""
        c = self.copy()
        c.datas = {k: d.copy() for k, d in self.datas.items()}
        return c

    def new_to(self, state_id: str) -> StateCtx:
        """A ctx for a new state ``state_id`` derived from this one (not yet stored)."""
        c = self.copy()
        c.current.id = state_id
        c.current.rev = 0
        c.current.committed_at = None
        c.committed = State()
        return c

    def set_data(self, alias: str, data: Data) -> StateCtx:
        self.datas[alias] = data
        return self

    def data(self, alias: str) -> Data:
        """The data attached under ``alias`` (KeyError if none)."""
        return self.datas[alias]

    @property
    def stopped(self) -> bool:
        """Whether the engine executing this ctx is shutting down."""
        return self.done is not None and self.done.is_set()

    async def wait_done(self) -> None:
        """Block until the engine executing this ctx shuts down (forever if none)."""
        if self.done is None:
            await asyncio.Event().wait()
        else:
            await self.done.wait()


def parked(state: State) -> bool:
    """A parked state has nothing to execute (``transition.to`` is empty)."""
    return not state.transition.to


def ended(state: State) -> bool:
    """Parked by :func:`flowstate.end` (transition annotation ``flowstate.state`` = ``ended``)."""
    return not state.transition.to and state.transition.annotations.get(STATE_ANNOTATION) == ENDED


def delayed(state: State) -> bool:
    """Fired by the delayer (transition annotation ``flowstate.delay.until`` is set)."""
    return bool(state.transition.annotations.get(DELAY_UNTIL))


def is_system(state_id: str) -> bool:
    """System states (``flowstate.`` prefix) belong to the engine."""
    return state_id.startswith(SYSTEM_PREFIX)
