"""The binary codec: our hand-written one against the official protobuf runtime (upb).

    .venv/bin/python -m benchmarks.codec [--rounds 3]

End to end, as the server and the client use it: from our objects to bytes and back. The
runtime variants convert our objects to protobuf messages (keyword constructors, one C call per
message), serialise them, parse the bytes with the generated ``flowstate_pb2`` classes and
convert the messages back to our objects, references resolved through ``state_ctxs`` like
ours. They do only what the measured messages need and check nothing (no error paths, no
field names, no empty map keys, no wrong wire types), so they are lower bounds on what a
runtime-based codec would cost:

* ``upb``: the generated classes both ways (maps from dicts). Not what Go writes: upb writes
  empty map values (``12 00``) and map entries in its own order;
* ``upb_go``: encodes through the same messages with every map declared as its repeated entry
  message (same wire format), which writes exactly our (Go's) bytes: checked before measuring.

Messages (typical of the engine's traffic):

* ``commit``: a Commit of one transit (two labels, three annotations, one transition
  annotation) with its StateCtx, as NetDriver sends it and the server answers it;
* ``get_states``: a GetStates request (labels, since rev, limit 50) and its answer with a
  50-state result;
* ``execute``: the StateCtx body of Flow/Execute.

``measure()`` returns CPU microseconds per encode+decode round trip (``time.process_time``,
best of the rounds, the codecs interleaved), per codec and message: keys
``<message>.<codec>_us`` with codec ``ours``, ``upb`` or ``upb_go``, plus ``<message>.ratio``
= upb / ours and ``<message>.go_ratio`` = upb_go / ours.
"""

from __future__ import annotations

import argparse
import base64
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped]

from flowstate.clock import from_millis, to_millis
from flowstate.commands import (
    Command,
    CommitCmd,
    GetStatesCmd,
    GetStatesResult,
    TransitCmd,
)
from flowstate.data import Data
from flowstate.state import State, StateCtx, Transition
from flowstate.wire import codec
from flowstate.wire import flowstate_pb2 as pb
from flowstate.wire.refs import state_ctxs

# --- the runtime variant ---------------------------------------------------------------------


def _pb_state(s: State) -> pb.State:
    t = s.transition
    return pb.State(
        id=s.id,
        rev=s.rev,
        annotations=s.annotations,
        labels=s.labels,
        committed_at_unix_milli=to_millis(s.committed_at) if s.committed_at is not None else 0,
        transition=pb.Transition(to=t.to, annotations=t.annotations),
    )


def _pb_data(d: Data) -> pb.Data:
    if d.annotations.get("binary") == "true":
        blob = base64.b64encode(d.blob).decode()
    else:
        blob = d.blob.decode()
    return pb.Data(rev=d.rev, blob=blob, annotations=d.annotations)


def _pb_ctx(c: StateCtx) -> pb.StateCtx:
    return pb.StateCtx(
        committed=_pb_state(c.committed),
        current=_pb_state(c.current),
        transitions=[pb.Transition(to=t.to, annotations=t.annotations) for t in c.transitions],
        datas={alias: _pb_data(c.datas[alias]) for alias in sorted(c.datas)},
    )


def _state(m: pb.State) -> State:
    t = m.transition
    ms = m.committed_at_unix_milli
    return State(
        id=m.id,
        rev=m.rev,
        annotations=dict(m.annotations),
        labels=dict(m.labels),
        committed_at=from_millis(ms) if ms else None,
        transition=Transition(t.to, dict(t.annotations)),
    )


def _data(m: pb.Data) -> Data:
    annotations = dict(m.annotations)
    binary = annotations.get("binary") == "true"
    return Data(base64.b64decode(m.blob) if binary else m.blob.encode(), annotations, m.rev)


def _ctx(m: pb.StateCtx) -> StateCtx:
    return StateCtx(
        current=_state(m.current),
        committed=_state(m.committed),
        transitions=[Transition(t.to, dict(t.annotations)) for t in m.transitions],
        datas={alias: _data(d) for alias, d in m.datas.items()},
    )


def upb_encode_command(cmd: Command) -> bytes:
    ctxs, refs = state_ctxs(cmd)
    msg = pb.Command(state_ctxs=[_pb_ctx(c) for c in ctxs])
    if isinstance(cmd, CommitCmd):
        subs = []
        for sub in cmd.commands:
            assert isinstance(sub, TransitCmd)
            subs.append(
                pb.Command(
                    transit=pb.TransitCommand(
                        state_ref=pb.StateCtxRef(idx=refs[id(sub.ctx)]),
                        to=sub.to,
                        annotations=sub.annotations,
                    )
                )
            )
        msg.commit.commands.extend(subs)
    elif isinstance(cmd, GetStatesCmd):
        g = msg.get_states
        g.since_rev = cmd.since_rev
        for labels in cmd.labels:
            g.labels.add(labels=labels)
        g.latest_only = cmd.latest_only
        g.limit = cmd.limit
        if cmd.result is not None:
            g.result.states.extend([_pb_state(s) for s in cmd.result.states])
            g.result.more = cmd.result.more
    else:  # pragma: no cover - only what the benchmark sends
        raise TypeError(cmd)
    return bytes(msg.SerializeToString())


def upb_decode_command(body: bytes) -> Command:
    msg = pb.Command.FromString(body)
    ctxs = [_ctx(c) for c in msg.state_ctxs]
    if msg.HasField("commit"):
        commands: list[Command] = []
        for sub in msg.commit.commands:
            t = sub.transit
            commands.append(TransitCmd(ctxs[t.state_ref.idx], t.to, dict(t.annotations)))
        return CommitCmd(commands)
    if msg.HasField("get_states"):
        g = msg.get_states
        cmd = GetStatesCmd(
            since_rev=g.since_rev,
            labels=[dict(x.labels) for x in g.labels],
            latest_only=g.latest_only,
            limit=g.limit,
        )
        if g.HasField("result"):
            cmd.result = GetStatesResult([_state(s) for s in g.result.states], g.result.more)
        return cmd
    raise TypeError("unexpected command")  # pragma: no cover


def upb_encode_state_ctx(ctx: StateCtx) -> bytes:
    return bytes(_pb_ctx(ctx).SerializeToString())


def upb_decode_state_ctx(body: bytes) -> StateCtx:
    return _ctx(pb.StateCtx.FromString(body))


# --- the runtime, byte for byte what Go writes -----------------------------------------------
#
# The generated map fields cannot write what Go writes: upb writes an empty map value
# (``12 00``, Go omits it) and its own map order (Go keeps none, our encoder keeps the dict's).
# The same messages with every map declared as its repeated entry message (the same wire
# format) can: a proto3 entry omits an empty value, and a list keeps its order. Encoding goes
# through those; decoding through the generated map fields (cheaper, order is irrelevant).


def _entries_pool() -> descriptor_pool.DescriptorPool:
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)

    def unmap(messages: Any) -> None:
        for message in messages:
            for nested in message.nested_type:
                nested.options.map_entry = False
            unmap(message.nested_type)

    unmap(proto.message_type)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


_POOL = _entries_pool()


def _cls(name: str) -> Any:
    return message_factory.GetMessageClass(_POOL.FindMessageTypeByName(f"flowstate.v1.{name}"))


_G_COMMAND = _cls("Command")
_G_COMMIT = _cls("CommitCommand")
_G_TRANSIT = _cls("TransitCommand")
_G_TRANSIT_ANN = _cls("TransitCommand.AnnotationsEntry")
_G_REF = _cls("StateCtxRef")
_G_GET_STATES = _cls("GetStatesCommand")
_G_LABELS = _cls("GetStatesCommand.Labels")
_G_LABELS_ENTRY = _cls("GetStatesCommand.Labels.LabelsEntry")
_G_RESULT = _cls("GetStatesResult")
_G_CTX = _cls("StateCtx")
_G_DATAS_ENTRY = _cls("StateCtx.DatasEntry")
_G_STATE = _cls("State")
_G_STATE_ANN = _cls("State.AnnotationsEntry")
_G_STATE_LABELS = _cls("State.LabelsEntry")
_G_TRANSITION = _cls("Transition")
_G_TRANSITION_ANN = _cls("Transition.AnnotationsEntry")
_G_DATA = _cls("Data")
_G_DATA_ANN = _cls("Data.AnnotationsEntry")


def _g_transition(t: Transition) -> Any:
    return _G_TRANSITION(
        to=t.to, annotations=[_G_TRANSITION_ANN(key=k, value=v) for k, v in t.annotations.items()]
    )


def _g_state(s: State) -> Any:
    return _G_STATE(
        id=s.id,
        rev=s.rev,
        annotations=[_G_STATE_ANN(key=k, value=v) for k, v in s.annotations.items()],
        labels=[_G_STATE_LABELS(key=k, value=v) for k, v in s.labels.items()],
        committed_at_unix_milli=to_millis(s.committed_at) if s.committed_at is not None else 0,
        transition=_g_transition(s.transition),
    )


def _g_data(d: Data) -> Any:
    binary = d.annotations.get("binary") == "true"
    return _G_DATA(
        rev=d.rev,
        blob=base64.b64encode(d.blob).decode() if binary else d.blob.decode(),
        annotations=[_G_DATA_ANN(key=k, value=v) for k, v in d.annotations.items()],
    )


def _g_ctx(c: StateCtx) -> Any:
    return _G_CTX(
        committed=_g_state(c.committed),
        current=_g_state(c.current),
        transitions=[_g_transition(t) for t in c.transitions],
        datas=[_G_DATAS_ENTRY(key=a, value=_g_data(c.datas[a])) for a in sorted(c.datas)],
    )


def upb_go_encode_command(cmd: Command) -> bytes:
    ctxs, refs = state_ctxs(cmd)
    msg = _G_COMMAND(state_ctxs=[_g_ctx(c) for c in ctxs])
    if isinstance(cmd, CommitCmd):
        subs = []
        for sub in cmd.commands:
            assert isinstance(sub, TransitCmd)
            transit = _G_TRANSIT(
                state_ref=_G_REF(idx=refs[id(sub.ctx)]),
                to=sub.to,
                annotations=[_G_TRANSIT_ANN(key=k, value=v) for k, v in sub.annotations.items()],
            )
            subs.append(_G_COMMAND(transit=transit))
        msg.commit.CopyFrom(_G_COMMIT(commands=subs))
    elif isinstance(cmd, GetStatesCmd):
        result = None
        if cmd.result is not None:
            states = [_g_state(s) for s in cmd.result.states]
            result = _G_RESULT(states=states, more=cmd.result.more)
        msg.get_states.CopyFrom(
            _G_GET_STATES(
                since_rev=cmd.since_rev,
                labels=[
                    _G_LABELS(labels=[_G_LABELS_ENTRY(key=k, value=v) for k, v in s.items()])
                    for s in cmd.labels
                ],
                latest_only=cmd.latest_only,
                limit=cmd.limit,
                result=result,
            )
        )
    else:  # pragma: no cover - only what the benchmark sends
        raise TypeError(cmd)
    return bytes(msg.SerializeToString())


def upb_go_encode_state_ctx(ctx: StateCtx) -> bytes:
    return bytes(_g_ctx(ctx).SerializeToString())


# --- the messages ----------------------------------------------------------------------------


def _stored(i: int) -> State:
    return State(
        id=f"order-{i:06d}",
        rev=100_000 + i,
        annotations={"flowstate.state.attempt": "1", "owner": "billing", "note": "x" * 20},
        labels={"kind": "order", "tenant": "acme"},
        committed_at=from_millis(1_735_689_600_000 + i),
        transition=Transition("charge", {"flowstate.transition.reason": "next"}),
    )


def _ctx_sample() -> StateCtx:
    committed = _stored(7)
    current = committed.copy()
    current.transition = Transition("ship", {"flowstate.transition.reason": "paid"})
    return StateCtx(current=current, committed=committed, transitions=[committed.transition])


def _commit_sample() -> Command:
    ctx = _ctx_sample()
    return CommitCmd([TransitCmd(ctx, "ship", {"by": "worker-3"})])


def _get_states_request() -> Command:
    return GetStatesCmd(since_rev=123_456, labels=[{"kind": "order"}], latest_only=True, limit=50)


def _get_states_result() -> Command:
    cmd = _get_states_request()
    assert isinstance(cmd, GetStatesCmd)
    cmd.result = GetStatesResult([_stored(i) for i in range(50)], True)
    return cmd


def _round_trips() -> dict[str, dict[str, Callable[[], Any]]]:
    commit = _commit_sample()
    request = _get_states_request()
    result = _get_states_result()
    ctx = _ctx_sample()
    ours_cmd, ours_dec = codec.encode_command, codec.decode_command
    return {
        "commit": {
            "ours": lambda: ours_dec(ours_cmd(commit)),
            "upb": lambda: upb_decode_command(upb_encode_command(commit)),
            "upb_go": lambda: upb_decode_command(upb_go_encode_command(commit)),
        },
        "get_states_request": {
            "ours": lambda: ours_dec(ours_cmd(request)),
            "upb": lambda: upb_decode_command(upb_encode_command(request)),
            "upb_go": lambda: upb_decode_command(upb_go_encode_command(request)),
        },
        "get_states_result50": {
            "ours": lambda: ours_dec(ours_cmd(result)),
            "upb": lambda: upb_decode_command(upb_encode_command(result)),
            "upb_go": lambda: upb_decode_command(upb_go_encode_command(result)),
        },
        "execute": {
            "ours": lambda: codec.decode_state_ctx(codec.encode_state_ctx(ctx)),
            "upb": lambda: upb_decode_state_ctx(upb_encode_state_ctx(ctx)),
            "upb_go": lambda: upb_decode_state_ctx(upb_go_encode_state_ctx(ctx)),
        },
    }


def _view(cmd: Command) -> Any:
    """What a command carries, map order aside (upb does not keep it; neither does Go)."""
    if isinstance(cmd, CommitCmd):
        return [(s.ctx, s.to, s.annotations) for s in cmd.commands if isinstance(s, TransitCmd)]
    assert isinstance(cmd, GetStatesCmd)
    result = None if cmd.result is None else (cmd.result.states, cmd.result.more)
    return (cmd.since_rev, cmd.labels, cmd.latest_only, cmd.limit, result)


def _check() -> None:
    """Both variants write bytes the other reads back to the same objects."""
    for cmd in (_commit_sample(), _get_states_request(), _get_states_result()):
        ours = codec.encode_command(cmd)
        theirs = upb_encode_command(cmd)
        for got in (codec.decode_command(theirs), upb_decode_command(ours)):
            assert _view(got) == _view(cmd), type(cmd)
        assert upb_go_encode_command(cmd) == ours, type(cmd)
    ctx = _ctx_sample()
    assert upb_go_encode_state_ctx(ctx) == codec.encode_state_ctx(ctx)
    assert codec.decode_state_ctx(upb_encode_state_ctx(ctx)) == ctx
    assert upb_decode_state_ctx(codec.encode_state_ctx(ctx)) == ctx


def _cpu_us(fn: Callable[[], Any], budget: float) -> float:
    """CPU microseconds per call of ``fn`` over about ``budget`` seconds of CPU."""
    n = 1
    while True:
        start = time.process_time()
        for _ in range(n):
            fn()
        spent = time.process_time() - start
        if spent >= budget:
            return spent / n * 1e6
        n *= 2 if spent < budget / 8 else max(2, int(budget / max(spent, 1e-6)) + 1)


def measure(rounds: int = 3, budget: float = 0.2) -> dict[str, float]:
    """CPU µs per encode+decode of each message with each codec (best of ``rounds``,
    interleaved so both codecs see the same load)."""
    _check()
    cases = _round_trips()
    best: dict[str, float] = {}
    for _ in range(rounds):
        for message, variants in cases.items():
            for name, fn in variants.items():
                key = f"{message}.{name}_us"
                us = _cpu_us(fn, budget)
                best[key] = min(us, best.get(key, us))
    out: dict[str, float] = {}
    for message in cases:
        ours = best[f"{message}.ours_us"]
        for name in ("ours", "upb", "upb_go"):
            out[f"{message}.{name}_us"] = round(best[f"{message}.{name}_us"], 2)
        out[f"{message}.ratio"] = round(best[f"{message}.upb_us"] / ours, 3)
        out[f"{message}.go_ratio"] = round(best[f"{message}.upb_go_us"] / ours, 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.2, help="CPU seconds per sample")
    args = parser.parse_args()
    result = measure(args.rounds, args.budget)
    print(
        f"{'message':<22} {'ours µs':>9} {'upb µs':>9} {'upb/ours':>9} "
        f"{'upb_go µs':>10} {'upb_go/ours':>12}"
    )
    for m in ("commit", "get_states_request", "get_states_result50", "execute"):
        print(
            f"{m:<22} {result[m + '.ours_us']:>9.1f} {result[m + '.upb_us']:>9.1f} "
            f"{result[m + '.ratio']:>9.2f} {result[m + '.upb_go_us']:>10.1f} "
            f"{result[m + '.go_ratio']:>12.2f}"
        )


if __name__ == "__main__":
    main()
