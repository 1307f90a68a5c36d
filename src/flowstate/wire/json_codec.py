"""JSON codec of flowstate.v1 Commands and StateCtxs (wire.md §9).

Output is the Go server's dialect by default (``getStateByID``, ``flowId``, ``stackedStateRef``,
``sinceTime_usec``, labels as ``[{k: v}]``, ``Result``, ``committed`` only when its rev > 0, Go's
key order, sorted map keys, no whitespace, ``<>&`` and U+2028/2029 escaped), or canonical proto3
JSON (what ``google.protobuf.json_format`` reads) with ``dialect="proto3"``.

Input accepts both dialects: keys match case-insensitively and with or without underscores
(Go's ``encoding/json`` and proto3's original field names), int64 values as strings or
numbers, ``null`` as absent, both spellings of the renamed fields, both forms of the
``get_states`` label sets; a missing ``idx`` means 0. Unknown keys are ignored.
"""

from __future__ import annotations

import binascii
import json
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal

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
from flowstate.data import BINARY, Data
from flowstate.state import State, StateCtx, Transition
from flowstate.wire.errors import WireError
from flowstate.wire.limits import (
    MAX_ANNOTATIONS,
    MAX_COMMIT_COMMANDS,
    MAX_DATAS,
    MAX_JSON_VALUES,
    MAX_PAGE_ITEMS,
    MAX_QUERY_LABEL_SETS,
    MAX_QUERY_LABELS,
    MAX_STATE_CTXS,
    MAX_STATE_LABELS,
    MAX_TRANSITIONS,
    Budget,
    too_many,
)
from flowstate.wire.refs import state_ctxs

__all__ = [
    "Dialect",
    "decode_command",
    "decode_error",
    "decode_state_ctx",
    "encode_command",
    "encode_error",
    "encode_state_ctx",
]

Dialect = Literal["go", "proto3"]
Obj = dict[str, Any]

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1

# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

_GO_ESCAPES = re.compile("[<>&\u2028\u2029]")


def _go_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _dumps(obj: Obj) -> bytes:
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = _GO_ESCAPES.sub(_go_escape, text)
    return text.encode()


def _i64(value: int, where: str) -> str:
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise WireError(where, f"{value} is out of int64 range")
    return str(value)


def _str_map(values: dict[str, str], where: str) -> dict[str, str]:
    for key in values:
        if not key:
            raise WireError(where, "map key cannot be empty")
    return {k: values[k] for k in sorted(values)} if len(values) > 1 else dict(values)


class _Encoder:
    """Builds the JSON object of one command, in one dialect."""

    __slots__ = ("go", "refs")

    def __init__(self, dialect: Dialect, refs: dict[int, int]) -> None:
        if dialect not in ("go", "proto3"):
            raise WireError("dialect", f"unknown JSON dialect {dialect!r} (go, proto3)")
        self.go = dialect == "go"
        self.refs = refs

    # --- model --------------------------------------------------------------------------

    def transition(self, t: Transition, where: str) -> Obj:
        obj: Obj = {}
        if t.to:
            obj["to"] = t.to
        if t.annotations:
            obj["annotations"] = _str_map(t.annotations, f"{where}.annotations")
        return obj

    def state(self, s: State, where: str) -> Obj:
        obj: Obj = {}
        if s.id:
            obj["id"] = s.id
        if s.rev:
            obj["rev"] = _i64(s.rev, f"{where}.rev")
        if s.annotations:
            obj["annotations"] = _str_map(s.annotations, f"{where}.annotations")
        if s.labels:
            obj["labels"] = _str_map(s.labels, f"{where}.labels")
        if s.committed_at is not None:
            obj["committedAtUnixMilli"] = str(to_millis(s.committed_at))
        obj["transition"] = self.transition(s.transition, f"{where}.transition")
        return obj

    def data(self, d: Data, where: str) -> Obj:
        obj: Obj = {}
        if d.rev:
            obj["rev"] = _i64(d.rev, f"{where}.rev")
        if d.blob:
            if d.annotations.get(BINARY) == "true":
                obj["blob"] = binascii.b2a_base64(d.blob, newline=False).decode("ascii")
            else:
                # JSON strings are text: invalid UTF-8 becomes U+FFFD, as Go's encoder does.
                obj["blob"] = bytes(d.blob).decode("utf-8", "replace")
        if d.annotations:
            obj["annotations"] = _str_map(d.annotations, f"{where}.annotations")
        return obj

    def state_ctx(self, c: StateCtx, where: str) -> Obj:
        current = self.state(c.current, f"{where}.current")
        if self.go:
            obj: Obj = {"current": current}
            if c.committed.rev > 0:
                obj["committed"] = self.state(c.committed, f"{where}.committed")
        else:
            obj = {"committed": self.state(c.committed, f"{where}.committed"), "current": current}
        if c.transitions:
            obj["transitions"] = [
                self.transition(t, f"{where}.transitions[{i}]") for i, t in enumerate(c.transitions)
            ]
        if c.datas:
            datas: Obj = {}
            for alias in sorted(c.datas):
                if not alias:
                    raise WireError(f"{where}.datas", "map key cannot be empty")
                datas[alias] = self.data(c.datas[alias], f"{where}.datas[{alias!r}]")
            obj["datas"] = datas
        return obj

    def delayed_state(self, d: DelayedState, where: str) -> Obj:
        obj: Obj = {"state": self.state(d.state, f"{where}.state")}
        if d.offset:
            obj["offset"] = _i64(d.offset, f"{where}.offset")
        seconds = to_seconds(d.execute_at)
        if seconds:
            obj["executeAtSec"] = str(seconds)
        return obj

    def ref(self, ctx: StateCtx) -> Obj:
        return {"idx": str(self.refs[id(ctx)])}

    # --- commands -----------------------------------------------------------------------

    def command(self, cmd: Command, where: str) -> tuple[str, Obj]:
        """The envelope key of ``cmd`` and its payload object."""
        go = self.go
        obj: Obj = {}
        if isinstance(cmd, TransitCmd):
            if cmd.ctx is not None:
                obj["stateRef"] = self.ref(cmd.ctx)
            if cmd.to:
                obj["flowId" if go else "to"] = cmd.to
            if cmd.annotations:
                obj["annotations"] = _str_map(cmd.annotations, f"{where}transit.annotations")
            return "transit", obj
        if isinstance(cmd, ParkCmd):
            if cmd.ctx is not None:
                obj["stateRef" if go else "stateRexf"] = self.ref(cmd.ctx)
            if cmd.annotations:
                obj["annotations"] = _str_map(cmd.annotations, f"{where}park.annotations")
            return "park", obj
        if isinstance(cmd, CommitCmd):
            commands = []
            for i, sub in enumerate(cmd.commands):
                at = f"{where}commit.commands[{i}]"
                if type(sub) is CommitCmd:
                    raise WireError(at, "a commit inside a commit is not allowed")
                key, payload = self.command(sub, f"{at}.")
                commands.append({key: payload})
            obj["commands"] = commands
            return "commit", obj
        if isinstance(cmd, NoopCmd):
            return "noop", obj
        if isinstance(cmd, ExecuteCmd):
            if cmd.ctx is not None:
                obj["stateRef"] = self.ref(cmd.ctx)
            return "execute", obj
        if isinstance(cmd, DelayCmd):
            return "delay", self.delay(cmd, where)
        if isinstance(cmd, StackCmd):
            if go:
                obj["stackedStateRef"] = self.ref(cmd.stacked)
                obj["carrierStateRef"] = self.ref(cmd.carrier)
            else:
                obj["carrierStateRef"] = self.ref(cmd.carrier)
                obj["stackStateRef"] = self.ref(cmd.stacked)
            if cmd.annotation:
                obj["annotation"] = cmd.annotation
            return "stack", obj
        if isinstance(cmd, UnstackCmd):
            obj["carrierStateRef"] = self.ref(cmd.carrier)
            if cmd.annotation:
                obj["annotation"] = cmd.annotation
            obj["unstackStateRef"] = self.ref(cmd.target)
            return "unstack", obj
        if isinstance(cmd, StoreDataCmd | GetDataCmd):
            if cmd.ctx is not None:
                obj["stateRef"] = self.ref(cmd.ctx)
            if cmd.alias:
                obj["alias"] = cmd.alias
            return ("storeData" if isinstance(cmd, StoreDataCmd) else "getData"), obj
        if isinstance(cmd, GetStateByIdCmd):
            if cmd.ctx is not None:
                obj["stateRef"] = self.ref(cmd.ctx)
            if cmd.id:
                obj["id"] = cmd.id
            if cmd.rev:
                obj["rev"] = _i64(cmd.rev, f"{where}get_state_by_id.rev")
            return ("getStateByID" if go else "getStateById"), obj
        if isinstance(cmd, GetStateByLabelsCmd):
            if cmd.ctx is not None:
                obj["stateRef"] = self.ref(cmd.ctx)
            if cmd.labels:
                obj["labels"] = _str_map(cmd.labels, f"{where}get_state_by_labels.labels")
            return "getStateByLabels", obj
        if isinstance(cmd, GetStatesCmd):
            return "getStates", self.get_states(cmd, where)
        if isinstance(cmd, GetDelayedStatesCmd):
            return "getDelayedStates", self.get_delayed_states(cmd, where)
        raise WireError("command", f"{type(cmd).__name__} has no flowstate.v1 encoding")

    def delay(self, cmd: DelayCmd, where: str) -> Obj:
        obj: Obj = {}
        if cmd.ctx is not None:
            obj["stateRef"] = self.ref(cmd.ctx)
        if cmd.execute_at is None and cmd.after is not None:
            raise WireError(
                f"{where}delay.execute_at_sec",
                "a delay given only as 'after' has no time yet; set execute_at before encoding",
            )
        if cmd.execute_at is not None:
            obj["executeAtSec"] = str(to_seconds(cmd.execute_at))
        if cmd.commit:
            obj["commit"] = True
        if cmd.to:
            obj["to"] = cmd.to
        if cmd.annotations:
            obj["annotations"] = _str_map(cmd.annotations, f"{where}delay.annotations")
        if cmd.result is not None:
            obj["result"] = self.delayed_state(cmd.result, f"{where}delay.result")
        return obj

    def get_states(self, cmd: GetStatesCmd, where: str) -> Obj:
        obj: Obj = {}
        if cmd.since_rev:
            obj["sinceRev"] = _i64(cmd.since_rev, f"{where}get_states.since_rev")
        if cmd.since_time is not None:
            obj["sinceTime_usec" if self.go else "sinceTimeUsec"] = str(to_millis(cmd.since_time))
        if cmd.labels:
            at = f"{where}get_states.labels"
            sets = [_str_map(s, f"{at}[{i}]") for i, s in enumerate(cmd.labels)]
            obj["labels"] = sets if self.go else [{"labels": s} for s in sets]
        if cmd.latest_only:
            obj["latestOnly"] = True
        if cmd.limit:
            obj["limit"] = _i64(cmd.limit, f"{where}get_states.limit")
        result = cmd.result
        if result is not None:
            res: Obj = {}
            if result.states:
                at = f"{where}get_states.result.states"
                res["states"] = [self.state(s, f"{at}[{i}]") for i, s in enumerate(result.states)]
            if result.more:
                res["more"] = True
            if result.scanned_rev:  # an extension of flowstate.v1 (field 3); Go ignores it
                at = f"{where}get_states.result.scanned_rev"
                res["scannedRev"] = _i64(result.scanned_rev, at)
            obj["result"] = res
        return obj

    def get_delayed_states(self, cmd: GetDelayedStatesCmd, where: str) -> Obj:
        obj: Obj = {}
        if cmd.since is not None:
            obj["sinceTimeSec"] = str(to_seconds(cmd.since))
        if cmd.until is not None:
            obj["untilTimeSec"] = str(to_seconds(cmd.until))
        if cmd.offset:
            obj["offset"] = _i64(cmd.offset, f"{where}get_delayed_states.offset")
        if cmd.limit:
            obj["limit"] = _i64(cmd.limit, f"{where}get_delayed_states.limit")
        result = cmd.result
        if result is not None:
            res: Obj = {}
            if result.delayed_states:
                at = f"{where}get_delayed_states.result.delayed_states"
                res["delayedStates"] = [
                    self.delayed_state(d, f"{at}[{i}]") for i, d in enumerate(result.delayed_states)
                ]
            if result.more:
                res["more"] = True
            obj["Result" if self.go else "result"] = res
        return obj


def _finish(build: Callable[[], Obj], where: str) -> bytes:
    try:
        return _dumps(build())
    except WireError:
        raise
    except UnicodeEncodeError:
        raise WireError(where, "a string is not valid UTF-8 (lone surrogate)") from None
    except (AttributeError, TypeError, ValueError, OverflowError) as exc:
        raise WireError(where, f"cannot encode: {exc}") from None


def encode_command(cmd: Command, *, dialect: Dialect = "go") -> bytes:
    """Encode ``cmd`` as a JSON Command (Go dialect unless ``dialect="proto3"``)."""

    def build() -> Obj:
        ctxs, refs = state_ctxs(cmd)
        enc = _Encoder(dialect, refs)
        obj: Obj = {}
        if ctxs:
            obj["stateCtxs"] = [enc.state_ctx(c, f"state_ctxs[{i}]") for i, c in enumerate(ctxs)]
        key, payload = enc.command(cmd, "")
        obj[key] = payload
        return obj

    return _finish(build, "command")


def encode_state_ctx(ctx: StateCtx, *, dialect: Dialect = "go") -> bytes:
    """Encode a StateCtx as JSON."""
    return _finish(lambda: _Encoder(dialect, {}).state_ctx(ctx, "state_ctx"), "state_ctx")


def encode_error(code: str, message: str) -> bytes:
    """The Connect-style JSON error body ``{"code": …, "message": …}``."""
    return _dumps({"code": code, "message": message.encode("utf-8", "replace").decode()})


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _fields(value: Any, where: str) -> Obj:
    """A JSON object with its keys normalised (lower case, no underscores); nulls dropped."""
    if not isinstance(value, dict):
        raise WireError(where, f"expected an object, got {_kind(value)}")
    return {key.lower().replace("_", ""): item for key, item in value.items() if item is not None}


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise WireError(where, f"expected a string, got {_kind(value)}")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise WireError(where, "string is not valid UTF-8 (lone surrogate)") from None
    return value


_INT_TEXT = re.compile(r"-?[0-9]+")


def _int64(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise WireError(where, "expected an int64 (string or number), got a boolean")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        if not _INT_TEXT.fullmatch(value):
            if value == "":
                return 0
            raise WireError(where, f"{value[:40]!r} is not an integer")
        number = int(value)
    elif isinstance(value, float):
        if not value.is_integer():
            raise WireError(where, f"{value!r} is not an integer")
        number = int(value)
    else:
        raise WireError(where, f"expected an int64 (string or number), got {_kind(value)}")
    if not _INT64_MIN <= number <= _INT64_MAX:
        raise WireError(where, f"{number} is out of int64 range")
    return number


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise WireError(where, f"expected true or false, got {_kind(value)}")
    return value


def _map(value: Any, where: str, cap: int = MAX_ANNOTATIONS) -> dict[str, str]:
    if not isinstance(value, dict):
        raise WireError(where, f"expected an object, got {_kind(value)}")
    if len(value) > cap:
        raise too_many(where, cap, "entries")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not key:
            raise WireError(where, "map key cannot be empty")
        _text(key, where)
        out[key] = _text(item, f"{where}[{key!r}]")  # null too: Go would store "" unasked
    return out


def _list(value: Any, where: str, cap: int, what: str = "items") -> list[Any]:
    if not isinstance(value, list):
        raise WireError(where, f"expected an array, got {_kind(value)}")
    if len(value) > cap:
        raise too_many(where, cap, what)
    return value


def _time_ms(value: Any, where: str) -> datetime:
    ms = _int64(value, where)
    try:
        return from_millis(ms)
    except OverflowError:
        raise WireError(where, f"{ms} ms is out of range") from None


def _time_sec(value: Any, where: str) -> datetime:
    seconds = _int64(value, where)
    try:
        return from_seconds(seconds)
    except OverflowError:
        raise WireError(where, f"{seconds} s is out of range") from None


def _transition(value: Any, where: str) -> Transition:
    f = _fields(value, where)
    t = Transition()
    if "to" in f:
        t.to = _text(f["to"], f"{where}.to")
    if "annotations" in f:
        t.annotations = _map(f["annotations"], f"{where}.annotations")
    return t


def _state(value: Any, where: str) -> State:
    f = _fields(value, where)
    s = State()
    if "id" in f:
        s.id = _text(f["id"], f"{where}.id")
    if "rev" in f:
        s.rev = _int64(f["rev"], f"{where}.rev")
    if "annotations" in f:
        s.annotations = _map(f["annotations"], f"{where}.annotations")
    if "labels" in f:
        s.labels = _map(f["labels"], f"{where}.labels", MAX_STATE_LABELS)
    if "committedatunixmilli" in f:
        s.committed_at = _time_ms(f["committedatunixmilli"], f"{where}.committed_at_unix_milli")
    if "transition" in f:
        s.transition = _transition(f["transition"], f"{where}.transition")
    return s


def _data(value: Any, where: str) -> Data:
    f = _fields(value, where)
    d = Data()
    if "rev" in f:
        d.rev = _int64(f["rev"], f"{where}.rev")
    if "annotations" in f:
        d.annotations = _map(f["annotations"], f"{where}.annotations")
    if "blob" in f:
        blob = _text(f["blob"], f"{where}.blob")
        if d.annotations.get(BINARY) == "true":
            try:
                d.blob = binascii.a2b_base64(blob.encode("ascii"), strict_mode=True)
            except (binascii.Error, UnicodeEncodeError) as exc:
                raise WireError(f"{where}.blob", f"invalid base64: {exc}") from None
        else:
            d.blob = blob.encode()
    return d


def _state_ctx(value: Any, where: str) -> StateCtx:
    f = _fields(value, where)
    c = StateCtx()
    if "current" in f:
        c.current = _state(f["current"], f"{where}.current")
    if "committed" in f:
        c.committed = _state(f["committed"], f"{where}.committed")
    if "transitions" in f:
        items = _list(f["transitions"], f"{where}.transitions", MAX_TRANSITIONS, "transitions")
        c.transitions = [_transition(t, f"{where}.transitions[{i}]") for i, t in enumerate(items)]
    if "datas" in f:
        datas = f["datas"]
        if not isinstance(datas, dict):
            raise WireError(f"{where}.datas", f"expected an object, got {_kind(datas)}")
        if len(datas) > MAX_DATAS:
            raise too_many(f"{where}.datas", MAX_DATAS, "datas")
        for alias, item in datas.items():
            if not alias:
                raise WireError(f"{where}.datas", "map key cannot be empty")
            at = f"{where}.datas[{_text(alias, f'{where}.datas')!r}]"
            c.datas[alias] = Data() if item is None else _data(item, at)
    return c


def _delayed_state(value: Any, where: str) -> DelayedState:
    f = _fields(value, where)
    state = _state(f["state"], f"{where}.state") if "state" in f else State()
    offset = _int64(f["offset"], f"{where}.offset") if "offset" in f else 0
    at = _time_sec(f.get("executeatsec", 0), f"{where}.execute_at_sec")
    return DelayedState(state, at, offset)


class _Decoder:
    """Resolves references into the root ``state_ctxs`` of one command."""

    __slots__ = ("ctxs",)

    def __init__(self, ctxs: list[StateCtx]) -> None:
        self.ctxs = ctxs

    def ref(self, f: Obj, keys: tuple[str, ...], where: str) -> StateCtx:
        for key in keys:
            if key in f:
                break
        else:
            raise WireError(where, "missing state context reference")
        ref = _fields(f[key], where)
        idx = _int64(ref.get("idx", 0), f"{where}.idx")
        if not 0 <= idx < len(self.ctxs):
            raise WireError(
                f"{where}.idx",
                f"{idx} does not refer to a state context (state_ctxs has {len(self.ctxs)})",
            )
        return self.ctxs[idx]

    def command(self, key: str, value: Any, where: str, nested: bool) -> Command:
        f = _fields(value, where)
        if key == "transit":
            to = f.get("flowid", f.get("to", ""))
            return TransitCmd(
                self.ref(f, ("stateref",), f"{where}.state_ref"),
                _text(to, f"{where}.to"),
                _map(f.get("annotations", {}), f"{where}.annotations"),
            )
        if key == "park":
            return ParkCmd(
                self.ref(f, ("stateref", "staterexf"), f"{where}.state_rexf"),
                _map(f.get("annotations", {}), f"{where}.annotations"),
            )
        if key == "commit":
            if nested:
                raise WireError(where, "a commit inside a commit is not allowed")
            commands: list[Command] = []
            items = _list(
                f.get("commands", []), f"{where}.commands", MAX_COMMIT_COMMANDS, "commands"
            )
            for i, item in enumerate(items):
                at = f"{where}.commands[{i}]"
                commands.append(self.envelope(_fields(item, at), at, nested=True))
            return CommitCmd(commands)
        if key == "noop":
            return NoopCmd()
        if key == "execute":
            return ExecuteCmd(self.ref(f, ("stateref",), f"{where}.state_ref"))
        if key == "delay":
            return self.delay(f, where)
        if key in ("stack", "unstack"):
            carrier = self.ref(f, ("carrierstateref",), f"{where}.carrier_state_ref")
            annotation = _text(f.get("annotation", ""), f"{where}.annotation")
            if key == "stack":
                keys = ("stackedstateref", "stackstateref")
                return StackCmd(carrier, self.ref(f, keys, f"{where}.stack_state_ref"), annotation)
            target = self.ref(f, ("unstackstateref",), f"{where}.unstack_state_ref")
            return UnstackCmd(carrier, target, annotation)
        if key in ("storedata", "getdata"):
            ctx = self.ref(f, ("stateref",), f"{where}.state_ref")
            alias = _text(f.get("alias", ""), f"{where}.alias")
            return StoreDataCmd(ctx, alias) if key == "storedata" else GetDataCmd(ctx, alias)
        if key == "getstatebyid":
            return GetStateByIdCmd(
                self.ref(f, ("stateref",), f"{where}.state_ref"),
                _text(f.get("id", ""), f"{where}.id"),
                _int64(f.get("rev", 0), f"{where}.rev"),
            )
        if key == "getstatebylabels":
            return GetStateByLabelsCmd(
                self.ref(f, ("stateref",), f"{where}.state_ref"),
                _map(f.get("labels", {}), f"{where}.labels", MAX_STATE_LABELS),
            )
        if key == "getstates":
            return _get_states(f, where)
        return _get_delayed_states(f, where)

    def delay(self, f: Obj, where: str) -> DelayCmd:
        ctx = self.ref(f, ("stateref",), f"{where}.state_ref")
        execute_at = None
        if "executeatsec" in f:
            execute_at = _time_sec(f["executeatsec"], f"{where}.execute_at_sec")
        result = None
        if "result" in f:
            result = _delayed_state(f["result"], f"{where}.result")
        return DelayCmd(
            ctx,
            _text(f.get("to", ""), f"{where}.to"),
            execute_at=execute_at,
            commit=_bool(f.get("commit", False), f"{where}.commit"),
            annotations=_map(f.get("annotations", {}), f"{where}.annotations"),
            result=result,
        )

    def envelope(self, f: Obj, where: str, *, nested: bool) -> Command:
        if nested and "statectxs" in f:
            raise WireError(
                f"{where}.state_ctxs", "a command inside a commit must not carry state_ctxs"
            )
        for key, value in f.items():
            name = _COMMANDS.get(key)
            if name is not None:
                return self.command(key, value, f"{where}.{name}" if where else name, nested)
        raise WireError(where or "command", "no command")


# Normalised envelope keys -> proto field names (for error paths).
_COMMANDS = {
    "transit": "transit",
    "park": "park",
    "execute": "execute",
    "delay": "delay",
    "commit": "commit",
    "noop": "noop",
    "stack": "stack",
    "unstack": "unstack",
    "getstatebyid": "get_state_by_id",
    "getstatebylabels": "get_state_by_labels",
    "getstates": "get_states",
    "getdelayedstates": "get_delayed_states",
    "storedata": "store_data",
    "getdata": "get_data",
}


def _label_set(value: Any, where: str) -> dict[str, str]:
    """One OR-item of get_states labels: proto3 ``{"labels": {…}}`` or Go ``{k: v}``."""
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        if key.lower() == "labels" and (isinstance(inner, dict) or inner is None):
            return _map(inner or {}, f"{where}.labels", MAX_QUERY_LABELS)
    return _map(value, where, MAX_QUERY_LABELS)


def _get_states(f: Obj, where: str) -> GetStatesCmd:
    cmd = GetStatesCmd(limit=0)
    if "sincerev" in f:
        cmd.since_rev = _int64(f["sincerev"], f"{where}.since_rev")
    if "sincetimeusec" in f:
        cmd.since_time = _time_ms(f["sincetimeusec"], f"{where}.since_time_usec")
    if "labels" in f:
        items = _list(f["labels"], f"{where}.labels", MAX_QUERY_LABEL_SETS, "label sets")
        cmd.labels = [_label_set(s, f"{where}.labels[{i}]") for i, s in enumerate(items)]
        if sum(len(labels) for labels in cmd.labels) > MAX_QUERY_LABELS:
            raise too_many(f"{where}.labels", MAX_QUERY_LABELS, "labels in all sets")
    if "latestonly" in f:
        cmd.latest_only = _bool(f["latestonly"], f"{where}.latest_only")
    if "limit" in f:
        cmd.limit = _int64(f["limit"], f"{where}.limit")
    if "result" in f:
        at = f"{where}.result"
        r = _fields(f["result"], at)
        result = GetStatesResult()
        if "states" in r:
            items = _list(r["states"], f"{at}.states", MAX_PAGE_ITEMS, "states")
            result.states = [_state(s, f"{at}.states[{i}]") for i, s in enumerate(items)]
        if "more" in r:
            result.more = _bool(r["more"], f"{at}.more")
        if "scannedrev" in r:
            result.scanned_rev = _int64(r["scannedrev"], f"{at}.scanned_rev")
        cmd.result = result
    return cmd


def _get_delayed_states(f: Obj, where: str) -> GetDelayedStatesCmd:
    cmd = GetDelayedStatesCmd(limit=0)
    if "sincetimesec" in f:
        cmd.since = _time_sec(f["sincetimesec"], f"{where}.since_time_sec")
    if "untiltimesec" in f:
        cmd.until = _time_sec(f["untiltimesec"], f"{where}.until_time_sec")
    if "offset" in f:
        cmd.offset = _int64(f["offset"], f"{where}.offset")
    if "limit" in f:
        cmd.limit = _int64(f["limit"], f"{where}.limit")
    if "result" in f:
        at = f"{where}.result"
        r = _fields(f["result"], at)
        result = GetDelayedStatesResult()
        if "delayedstates" in r:
            items = _list(
                r["delayedstates"], f"{at}.delayed_states", MAX_PAGE_ITEMS, "delayed states"
            )
            result.delayed_states = [
                _delayed_state(d, f"{at}.delayed_states[{i}]") for i, d in enumerate(items)
            ]
        if "more" in r:
            result.more = _bool(r["more"], f"{at}.more")
        cmd.result = result
    return cmd


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Repeated fields -> (proto name, cap) for the structure scan, by normalised key. Arrays:
_ARRAY_CAPS = {
    "statectxs": ("state_ctxs", MAX_STATE_CTXS, "state contexts"),
    "commands": ("commands", MAX_COMMIT_COMMANDS, "commands"),
    "transitions": ("transitions", MAX_TRANSITIONS, "transitions"),
    "labels": ("labels", MAX_QUERY_LABEL_SETS, "label sets"),
    "states": ("states", MAX_PAGE_ITEMS, "states"),
    "delayedstates": ("delayed_states", MAX_PAGE_ITEMS, "delayed states"),
}
# … and maps (objects): labels of a state or a query (the larger cap), annotations, datas.
_OBJECT_CAPS = {
    "labels": ("labels", max(MAX_STATE_LABELS, MAX_QUERY_LABELS), "labels"),
    "annotations": ("annotations", MAX_ANNOTATIONS, "entries"),
    "datas": ("datas", MAX_DATAS, "datas"),
}
_STRING = rb'"[^"\\]*(?:\\.[^"\\]*)*"'
_TOKEN = re.compile(_STRING + rb"(\s*:)?|[\[\]{},]")


def _check_structure(raw: bytes, where: str) -> None:
    """Refuse a body that would make ``json.loads`` build more than MAX_JSON_VALUES values,
    or whose repeated fields exceed their caps, before anything is built.

    A value is a container or follows a comma (or opens the body), so commas plus opening
    brackets bound the count: at C speed, and exact enough for any body with few punctuation
    marks inside its strings. Past the bound, a scan over the structure (strings skipped, one
    token at a time: nothing is built) counts exactly and names the first repeated field over
    its cap.
    """
    bound = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if bound < MAX_JSON_VALUES:
        return
    # (path, cap, what it holds, items so far) of each open container
    stack: list[tuple[str, int, str, int]] = []
    key = ""
    values = 1
    for match in _TOKEN.finditer(raw):
        token = match.group()
        first = token[0]
        if first == 0x22:  # a string: a key when a colon follows
            key = (
                token[: token.rindex(b'"') + 1].decode("utf-8", "replace") if match.group(1) else ""
            )
            continue
        if first == 0x2C:  # ,
            key = ""
            values += 1
            if stack:
                path, cap, what, count = stack[-1]
                stack[-1] = (path, cap, what, count + 1)
                if count + 2 > cap:
                    raise too_many(path, cap, what)
            if values > MAX_JSON_VALUES:
                break
        elif first in (0x5B, 0x7B):  # [ {
            values += 1
            parent = stack[-1][0] if stack else ""
            if stack and key == "":
                path = f"{parent}[{stack[-1][3]}]"
                cap, what = MAX_JSON_VALUES, "items"
            else:
                norm = key.strip('"').lower().replace("_", "")
                caps = _ARRAY_CAPS if first == 0x5B else _OBJECT_CAPS
                name, cap, what = caps.get(norm, (key.strip('"'), MAX_JSON_VALUES, "items"))
                path = f"{parent}.{name}" if parent else name
            stack.append((path, cap, what, 0))
            key = ""
        else:  # ] }
            if stack:
                stack.pop()
            key = ""
    if values > MAX_JSON_VALUES:
        raise WireError(
            where, f"more than {MAX_JSON_VALUES:,} JSON values; that many are not allowed"
        )


def _loads(body: bytes | bytearray | memoryview | str, where: str) -> Any:
    try:
        raw = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else bytes(body)
        _check_structure(raw, where)
        text = body if isinstance(body, str) else raw.decode()
    except UnicodeDecodeError as exc:
        raise WireError(
            where, f"body is not valid UTF-8: {exc.reason} at byte {exc.start}"
        ) from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise WireError(where, "JSON nested too deeply") from None
    except ValueError as exc:
        raise WireError(where, f"invalid JSON: {exc}") from None


def decode_command(body: bytes | bytearray | memoryview | str) -> Command:
    """Decode a JSON Command (Go dialect or proto3 JSON), references resolved."""
    root = _fields(_loads(body, "command"), "command")
    ctxs: list[StateCtx] = []
    if "statectxs" in root:
        items = _list(root["statectxs"], "state_ctxs", MAX_STATE_CTXS, "state contexts")
        budget = Budget()
        for i, item in enumerate(items):
            where = f"state_ctxs[{i}]"
            ctx = _state_ctx(item, where)
            _charge(budget, ctx, where)
            ctxs.append(ctx)
    try:
        return _Decoder(ctxs).envelope(root, "", nested=False)
    except RecursionError:
        raise WireError("command", "JSON nested too deeply") from None


def _charge(budget: Budget, ctx: StateCtx, where: str) -> None:
    """Charge a decoded ctx to the message's budget, as the binary decoder does."""
    budget.state(ctx.current, f"{where}.current")
    budget.state(ctx.committed, f"{where}.committed")
    for i, t in enumerate(ctx.transitions):
        budget.transition(len(t.annotations), f"{where}.transitions[{i}]")
    for alias, data in ctx.datas.items():
        budget.take(1 + len(data.annotations), f"{where}.datas[{alias!r}]")


def decode_state_ctx(body: bytes | bytearray | memoryview | str) -> StateCtx:
    """Decode a JSON StateCtx."""
    return _state_ctx(_loads(body, "state_ctx"), "state_ctx")


def decode_error(body: bytes | bytearray | memoryview | str) -> tuple[str, str]:
    """Decode a JSON error body into ``(code, message)``."""
    f = _fields(_loads(body, "error"), "error")
    return _text(f.get("code", ""), "error.code"), _text(f.get("message", ""), "error.message")
