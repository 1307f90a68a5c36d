"""The ``state_ctxs`` reference scheme of a Command (wire.md §4.1).

Every StateCtx a command touches is listed once per occurrence, depth-first in command order;
consecutive duplicates (the same object) are dropped; a reference is the index of the object's
first occurrence in the resulting list.
"""

from __future__ import annotations

from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    ExecuteCmd,
    GetDataCmd,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.state import StateCtx

CtxCommand = (
    TransitCmd
    | ParkCmd
    | ExecuteCmd
    | DelayCmd
    | StoreDataCmd
    | GetDataCmd
    | GetStateByIdCmd
    | GetStateByLabelsCmd
)
"""Commands whose single state context is ``cmd.ctx``."""


def _collect(cmd: Command, out: list[StateCtx]) -> None:
    if isinstance(cmd, CtxCommand):
        if cmd.ctx is not None:
            out.append(cmd.ctx)
    elif isinstance(cmd, CommitCmd):
        for sub in cmd.commands:
            _collect(sub, out)
    elif isinstance(cmd, StackCmd):
        out.append(cmd.carrier)
        out.append(cmd.stacked)
    elif isinstance(cmd, UnstackCmd):
        out.append(cmd.carrier)
        out.append(cmd.target)


def state_ctxs(cmd: Command) -> tuple[list[StateCtx], dict[int, int]]:
    """The root ``state_ctxs`` list of ``cmd`` and the ref of each object (``id(ctx)`` -> idx)."""
    found: list[StateCtx] = []
    _collect(cmd, found)
    ctxs: list[StateCtx] = []
    refs: dict[int, int] = {}
    last: StateCtx | None = None
    for ctx in found:
        if ctx is last:
            continue
        last = ctx
        refs.setdefault(id(ctx), len(ctxs))
        ctxs.append(ctx)
    return ctxs, refs
