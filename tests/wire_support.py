"""Helpers of the wire tests: hypothesis strategies for states and commands, an independent
converter to the generated protobuf classes, and a structural view of commands.

``to_pb`` is written from wire.md alone (the Go presence rules and the §4.1 reference scheme),
separately from the codec, so that comparing the runtime's reading of our bytes with it checks
the codec against the spec rather than against itself.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

from hypothesis import strategies as st

from flowstate.clock import from_millis, from_seconds, to_millis, to_seconds
from flowstate.commands import (
    Command,
    CommitCmd,
    DelayCmd,
    DelayedState,
    ExecuteCmd,
    GetDataCmd,
    GetDelayedStatesCmd,
    GetDelayedStatesResult,
    GetStateByIdCmd,
    GetStateByLabelsCmd,
    GetStatesCmd,
    GetStatesResult,
    NoopCmd,
    ParkCmd,
    StackCmd,
    StoreDataCmd,
    TransitCmd,
    UnstackCmd,
)
from flowstate.data import Data
from flowstate.state import State, StateCtx, Transition
from flowstate.wire import flowstate_pb2 as pb
from flowstate.wire.binary import put_varint

INT64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
# Any Unicode text the wire can carry (no lone surrogates).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
KEYS = TEXT.filter(bool)
SMALL_MAP = st.dictionaries(KEYS, TEXT, max_size=3)
MILLIS = st.integers(min_value=-(10**12), max_value=10**13)
SECONDS = st.integers(min_value=-(10**9), max_value=10**10)
TIMES_MS = MILLIS.map(from_millis)
TIMES_S = SECONDS.map(from_seconds)


@st.composite
def transitions(draw: st.DrawFn) -> Transition:
    return Transition(draw(TEXT), draw(SMALL_MAP))


@st.composite
def states(draw: st.DrawFn, *, min_rev: int | None = None) -> State:
    rev = draw(INT64 if min_rev is None else st.integers(min_rev, (1 << 63) - 1))
    return State(
        id=draw(TEXT),
        rev=rev,
        annotations=draw(SMALL_MAP),
        labels=draw(SMALL_MAP),
        committed_at=draw(st.none() | TIMES_MS),
        transition=draw(transitions()),
    )


@st.composite
def datas(draw: st.DrawFn) -> Data:
    annotations = draw(SMALL_MAP)
    if draw(st.booleans()):
        annotations["binary"] = "true"
        blob = draw(st.binary(max_size=24))
    else:
        annotations.pop("binary", None)
        blob = draw(TEXT).encode()
    return Data(blob, annotations, draw(INT64))


@st.composite
def state_ctxs(draw: st.DrawFn) -> StateCtx:
    """Contexts as the engine makes them: ``committed`` is empty or a stored version."""
    committed = draw(st.just(State()) | states(min_rev=1))
    return StateCtx(
        current=draw(states()),
        committed=committed,
        transitions=draw(st.lists(transitions(), max_size=2)),
        datas=draw(st.dictionaries(KEYS, datas(), max_size=2)),
    )


@st.composite
def delayed_states(draw: st.DrawFn) -> DelayedState:
    return DelayedState(draw(states()), draw(TIMES_S), draw(INT64))


@st.composite
def commands(draw: st.DrawFn, pool: list[StateCtx], *, top: bool = True) -> Command:
    """A command whose contexts are drawn from ``pool`` (so objects repeat, as in real use)."""
    ctx = st.sampled_from(pool)
    kinds = [
        "transit",
        "park",
        "execute",
        "delay",
        "noop",
        "stack",
        "unstack",
        "get_state_by_id",
        "get_state_by_labels",
        "get_states",
        "get_delayed_states",
        "store_data",
        "get_data",
    ]
    if top:
        kinds.append("commit")
    kind = draw(st.sampled_from(kinds))
    if kind == "transit":
        return TransitCmd(draw(ctx), draw(TEXT), draw(SMALL_MAP))
    if kind == "park":
        return ParkCmd(draw(ctx), draw(SMALL_MAP))
    if kind == "execute":
        return ExecuteCmd(draw(ctx))
    if kind == "delay":
        return DelayCmd(
            draw(ctx),
            draw(TEXT),
            execute_at=draw(st.none() | TIMES_S),
            commit=draw(st.booleans()),
            annotations=draw(SMALL_MAP),
            result=draw(st.none() | delayed_states()),
        )
    if kind == "noop":
        return NoopCmd()
    if kind == "stack":
        return StackCmd(draw(ctx), draw(ctx), draw(TEXT))
    if kind == "unstack":
        return UnstackCmd(draw(ctx), draw(ctx), draw(TEXT))
    if kind == "get_state_by_id":
        return GetStateByIdCmd(draw(ctx), draw(TEXT), draw(INT64))
    if kind == "get_state_by_labels":
        return GetStateByLabelsCmd(draw(ctx), draw(SMALL_MAP))
    if kind == "get_states":
        result = None
        if draw(st.booleans()):
            result = GetStatesResult(
                draw(st.lists(states(), max_size=3)),
                draw(st.booleans()),
                draw(st.just(0) | INT64),  # scanned_rev: an extension, mostly absent
            )
        return GetStatesCmd(
            since_rev=draw(INT64),
            since_time=draw(st.none() | TIMES_MS),
            labels=draw(st.lists(SMALL_MAP, max_size=3)),
            latest_only=draw(st.booleans()),
            limit=draw(INT64),
            result=result,
        )
    if kind == "get_delayed_states":
        delayed_result = None
        if draw(st.booleans()):
            delayed_result = GetDelayedStatesResult(
                draw(st.lists(delayed_states(), max_size=3)), draw(st.booleans())
            )
        return GetDelayedStatesCmd(
            since=draw(st.none() | TIMES_S),
            until=draw(st.none() | TIMES_S),
            offset=draw(INT64),
            limit=draw(INT64),
            result=delayed_result,
        )
    if kind == "store_data":
        return StoreDataCmd(draw(ctx), draw(TEXT))
    if kind == "get_data":
        return GetDataCmd(draw(ctx), draw(TEXT))
    subs = draw(st.lists(commands(pool, top=False), max_size=4))
    return CommitCmd(subs)


@st.composite
def any_command(draw: st.DrawFn) -> Command:
    pool = draw(st.lists(state_ctxs(), min_size=1, max_size=3))
    return draw(commands(pool))


# --- the reference scheme and the expected protobuf message, from wire.md --------------------


def _touched(cmd: Command) -> list[StateCtx]:
    if isinstance(cmd, CommitCmd):
        return [c for sub in cmd.commands for c in _touched(sub)]
    if isinstance(cmd, StackCmd):
        return [cmd.carrier, cmd.stacked]
    if isinstance(cmd, UnstackCmd):
        return [cmd.carrier, cmd.target]
    ctx = getattr(cmd, "ctx", None)
    return [ctx] if ctx is not None else []


def ctx_list(cmd: Command) -> list[StateCtx]:
    """wire.md §4.1: occurrences depth-first, consecutive duplicates removed."""
    out: list[StateCtx] = []
    for ctx in _touched(cmd):
        if not out or out[-1] is not ctx:
            out.append(ctx)
    return out


def _ref(ctxs: list[StateCtx], ctx: StateCtx) -> pb.StateCtxRef:
    idx = next(i for i, c in enumerate(ctxs) if c is ctx)
    return pb.StateCtxRef(idx=idx)


def _pb_transition(t: Transition) -> pb.Transition:
    return pb.Transition(to=t.to, annotations=t.annotations)


def pb_state(s: State) -> pb.State:
    msg = pb.State(id=s.id, rev=s.rev, annotations=s.annotations, labels=s.labels)
    if s.committed_at is not None:
        msg.committed_at_unix_milli = to_millis(s.committed_at)
    msg.transition.CopyFrom(_pb_transition(s.transition))  # always present
    return msg


def _pb_data(d: Data) -> pb.Data:
    if d.annotations.get("binary") == "true":
        blob = base64.b64encode(d.blob).decode()
    else:
        blob = d.blob.decode()
    return pb.Data(rev=d.rev, blob=blob, annotations=d.annotations)


def pb_state_ctx(c: StateCtx) -> pb.StateCtx:
    msg = pb.StateCtx()
    msg.committed.CopyFrom(pb_state(c.committed))
    msg.current.CopyFrom(pb_state(c.current))
    msg.transitions.extend(_pb_transition(t) for t in c.transitions)
    for alias, data in c.datas.items():
        msg.datas[alias].CopyFrom(_pb_data(data))
    return msg


def _pb_delayed(d: DelayedState) -> pb.DelayedState:
    msg = pb.DelayedState(offset=d.offset, execute_at_sec=to_seconds(d.execute_at))
    msg.state.CopyFrom(pb_state(d.state))
    return msg


def _fill(msg: pb.Command, cmd: Command, ctxs: list[StateCtx]) -> None:
    if isinstance(cmd, TransitCmd):
        msg.transit.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
        msg.transit.to = cmd.to
        msg.transit.annotations.update(cmd.annotations)
    elif isinstance(cmd, ParkCmd):
        msg.park.state_rexf.CopyFrom(_ref(ctxs, cmd.ctx))
        msg.park.annotations.update(cmd.annotations)
    elif isinstance(cmd, ExecuteCmd):
        msg.execute.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
    elif isinstance(cmd, DelayCmd):
        d = msg.delay
        d.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
        if cmd.result is not None:
            d.result.CopyFrom(_pb_delayed(cmd.result))
        if cmd.execute_at is not None:
            d.execute_at_sec = to_seconds(cmd.execute_at)
        d.commit = cmd.commit
        d.to = cmd.to
        d.annotations.update(cmd.annotations)
    elif isinstance(cmd, CommitCmd):
        msg.commit.SetInParent()
        for sub in cmd.commands:
            _fill(msg.commit.commands.add(), sub, ctxs)
    elif isinstance(cmd, NoopCmd):
        msg.noop.SetInParent()
    elif isinstance(cmd, StackCmd):
        msg.stack.carrier_state_ref.CopyFrom(_ref(ctxs, cmd.carrier))
        msg.stack.stack_state_ref.CopyFrom(_ref(ctxs, cmd.stacked))
        msg.stack.annotation = cmd.annotation
    elif isinstance(cmd, UnstackCmd):
        msg.unstack.carrier_state_ref.CopyFrom(_ref(ctxs, cmd.carrier))
        msg.unstack.unstack_state_ref.CopyFrom(_ref(ctxs, cmd.target))
        msg.unstack.annotation = cmd.annotation
    elif isinstance(cmd, GetStateByIdCmd):
        g = msg.get_state_by_id
        g.id, g.rev = cmd.id, cmd.rev
        g.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
    elif isinstance(cmd, GetStateByLabelsCmd):
        msg.get_state_by_labels.labels.update(cmd.labels)
        msg.get_state_by_labels.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
    elif isinstance(cmd, GetStatesCmd):
        g2 = msg.get_states
        g2.SetInParent()
        g2.since_rev = cmd.since_rev
        if cmd.since_time is not None:
            g2.since_time_usec = to_millis(cmd.since_time)
        for labels in cmd.labels:
            g2.labels.add().labels.update(labels)
        g2.latest_only = cmd.latest_only
        g2.limit = cmd.limit
        if cmd.result is not None:
            g2.result.SetInParent()
            g2.result.states.extend(pb_state(s) for s in cmd.result.states)
            g2.result.more = cmd.result.more
            g2.result.scanned_rev = cmd.result.scanned_rev
    elif isinstance(cmd, GetDelayedStatesCmd):
        g3 = msg.get_delayed_states
        g3.SetInParent()
        if cmd.since is not None:
            g3.since_time_sec = to_seconds(cmd.since)
        if cmd.until is not None:
            g3.until_time_sec = to_seconds(cmd.until)
        g3.offset, g3.limit = cmd.offset, cmd.limit
        if cmd.result is not None:
            g3.result.SetInParent()
            g3.result.delayed_states.extend(_pb_delayed(d) for d in cmd.result.delayed_states)
            g3.result.more = cmd.result.more
    elif isinstance(cmd, StoreDataCmd):
        msg.store_data.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
        msg.store_data.alias = cmd.alias
    elif isinstance(cmd, GetDataCmd):
        msg.get_data.state_ref.CopyFrom(_ref(ctxs, cmd.ctx))
        msg.get_data.alias = cmd.alias
    else:  # pragma: no cover
        raise AssertionError(cmd)


def to_pb(cmd: Command) -> pb.Command:
    """The protobuf message a Go client would send for ``cmd``."""
    ctxs = ctx_list(cmd)
    msg = pb.Command()
    msg.state_ctxs.extend(pb_state_ctx(c) for c in ctxs)
    _fill(msg, cmd, ctxs)
    return msg


# --- structural view ------------------------------------------------------------------------


def _time(value: datetime | None) -> Any:
    return None if value is None else to_millis(value)


def shape(cmd: Command) -> Any:
    """Plain data describing ``cmd``: contents plus which contexts are the same object."""
    seen: list[StateCtx] = []

    def ctx(c: StateCtx) -> Any:
        for i, known in enumerate(seen):
            if known is c:
                return ("ctx", i)
        seen.append(c)
        return ("ctx", len(seen) - 1, ctx_shape(c))

    def walk(c: Command) -> Any:
        if isinstance(c, CommitCmd):
            return ("commit", [walk(s) for s in c.commands])
        if isinstance(c, DelayCmd):
            result = c.result
            return (
                "delay",
                ctx(c.ctx),
                c.to,
                _time(c.execute_at),
                c.commit,
                c.annotations,
                None if result is None else (result.state, _time(result.execute_at), result.offset),
            )
        if isinstance(c, GetStatesCmd):
            r = c.result
            return (
                "get_states",
                c.since_rev,
                _time(c.since_time),
                c.labels,
                c.latest_only,
                c.limit,
                None if r is None else (r.states, r.more, r.scanned_rev),
            )
        if isinstance(c, GetDelayedStatesCmd):
            r2 = c.result
            return (
                "get_delayed_states",
                _time(c.since),
                _time(c.until),
                c.offset,
                c.limit,
                None
                if r2 is None
                else (
                    [(d.state, _time(d.execute_at), d.offset) for d in r2.delayed_states],
                    r2.more,
                ),
            )
        if isinstance(c, StackCmd):
            return ("stack", ctx(c.carrier), ctx(c.stacked), c.annotation)
        if isinstance(c, UnstackCmd):
            return ("unstack", ctx(c.carrier), ctx(c.target), c.annotation)
        if isinstance(c, TransitCmd):
            return ("transit", ctx(c.ctx), c.to, c.annotations)
        if isinstance(c, ParkCmd):
            return ("park", ctx(c.ctx), c.annotations)
        if isinstance(c, ExecuteCmd):
            return ("execute", ctx(c.ctx))
        if isinstance(c, NoopCmd):
            return ("noop",)
        if isinstance(c, GetStateByIdCmd):
            return ("get_state_by_id", ctx(c.ctx), c.id, c.rev)
        if isinstance(c, GetStateByLabelsCmd):
            return ("get_state_by_labels", ctx(c.ctx), c.labels)
        if isinstance(c, StoreDataCmd):
            return ("store_data", ctx(c.ctx), c.alias)
        if isinstance(c, GetDataCmd):
            return ("get_data", ctx(c.ctx), c.alias)
        raise AssertionError(c)  # pragma: no cover

    return walk(cmd)


def ctx_shape(c: StateCtx) -> Any:
    return (
        c.current,
        c.committed,
        c.transitions,
        {k: (d.blob, d.annotations, d.rev) for k, d in c.datas.items()},
    )


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint (for hand-built hostile bodies)."""
    out = bytearray()
    put_varint(out, value)
    return bytes(out)
