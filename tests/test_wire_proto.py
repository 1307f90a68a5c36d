"""proto/flowstate/v1/flowstate.proto (through its generated module) against wire.md §1-§2:
package, message and field names, numbers, types, JSON names, services and their paths."""

from __future__ import annotations

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor as F

from flowstate.wire import flowstate_pb2 as pb

STR, I64, BOOL, MSG = F.TYPE_STRING, F.TYPE_INT64, F.TYPE_BOOL, F.TYPE_MESSAGE
MAP = "map"
REP = "repeated"

# message -> field -> (number, type, JSON name, message type or MAP/REP qualifiers)
MESSAGES: dict[str, dict[str, tuple[int, object, str, str]]] = {
    "State": {
        "id": (1, STR, "id", ""),
        "rev": (2, I64, "rev", ""),
        "annotations": (3, MAP, "annotations", ""),
        "labels": (4, MAP, "labels", ""),
        "committed_at_unix_milli": (5, I64, "committedAtUnixMilli", ""),
        "transition": (6, MSG, "transition", "Transition"),
    },
    "Transition": {
        "from": (1, STR, "from", ""),
        "to": (2, STR, "to", ""),
        "annotations": (3, MAP, "annotations", ""),
    },
    "StateCtx": {
        "committed": (1, MSG, "committed", "State"),
        "current": (2, MSG, "current", "State"),
        "transitions": (3, REP, "transitions", "Transition"),
        "datas": (4, MAP, "datas", "Data"),
    },
    "StateCtxRef": {"idx": (1, I64, "idx", "")},
    "DelayedState": {
        "state": (1, MSG, "state", "State"),
        "offset": (2, I64, "offset", ""),
        "execute_at_sec": (3, I64, "executeAtSec", ""),
    },
    "Data": {
        "rev": (2, I64, "rev", ""),
        "blob": (4, STR, "blob", ""),
        "annotations": (5, MAP, "annotations", ""),
    },
    "Command": {
        "state_ctxs": (1, REP, "stateCtxs", "StateCtx"),
        "transit": (3, MSG, "transit", "TransitCommand"),
        "park": (6, MSG, "park", "ParkCommand"),
        "execute": (7, MSG, "execute", "ExecuteCommand"),
        "delay": (8, MSG, "delay", "DelayCommand"),
        "commit": (9, MSG, "commit", "CommitCommand"),
        "noop": (10, MSG, "noop", "NoopCommand"),
        "stack": (11, MSG, "stack", "StackCommand"),
        "unstack": (12, MSG, "unstack", "UnstackCommand"),
        "get_state_by_id": (17, MSG, "getStateById", "GetStateByIDCommand"),
        "get_state_by_labels": (18, MSG, "getStateByLabels", "GetStateByLabelsCommand"),
        "get_states": (19, MSG, "getStates", "GetStatesCommand"),
        "get_delayed_states": (20, MSG, "getDelayedStates", "GetDelayedStatesCommand"),
        "store_data": (21, MSG, "storeData", "StoreDataCommand"),
        "get_data": (22, MSG, "getData", "GetDataCommand"),
    },
    "TransitCommand": {
        "state_ref": (1, MSG, "stateRef", "StateCtxRef"),
        "to": (2, STR, "to", ""),
        "annotations": (3, MAP, "annotations", ""),
    },
    "ParkCommand": {
        "state_rexf": (1, MSG, "stateRexf", "StateCtxRef"),
        "annotations": (3, MAP, "annotations", ""),
    },
    "ExecuteCommand": {"state_ref": (1, MSG, "stateRef", "StateCtxRef")},
    "DelayCommand": {
        "state_ref": (1, MSG, "stateRef", "StateCtxRef"),
        "result": (2, MSG, "result", "DelayedState"),
        "execute_at_sec": (3, I64, "executeAtSec", ""),
        "commit": (4, BOOL, "commit", ""),
        "to": (5, STR, "to", ""),
        "annotations": (6, MAP, "annotations", ""),
    },
    "CommitCommand": {"commands": (1, REP, "commands", "Command")},
    "NoopCommand": {},
    "StackCommand": {
        "carrier_state_ref": (1, MSG, "carrierStateRef", "StateCtxRef"),
        "stack_state_ref": (2, MSG, "stackStateRef", "StateCtxRef"),
        "annotation": (3, STR, "annotation", ""),
    },
    "UnstackCommand": {
        "carrier_state_ref": (1, MSG, "carrierStateRef", "StateCtxRef"),
        "unstack_state_ref": (2, MSG, "unstackStateRef", "StateCtxRef"),
        "annotation": (3, STR, "annotation", ""),
    },
    "StoreDataCommand": {
        "state_ref": (1, MSG, "stateRef", "StateCtxRef"),
        "alias": (2, STR, "alias", ""),
    },
    "GetDataCommand": {
        "state_ref": (1, MSG, "stateRef", "StateCtxRef"),
        "alias": (2, STR, "alias", ""),
    },
    "GetStateByIDCommand": {
        "id": (1, STR, "id", ""),
        "rev": (2, I64, "rev", ""),
        "state_ref": (3, MSG, "stateRef", "StateCtxRef"),
    },
    "GetStateByLabelsCommand": {
        "labels": (1, MAP, "labels", ""),
        "state_ref": (2, MSG, "stateRef", "StateCtxRef"),
    },
    "GetStatesCommand": {
        "since_rev": (1, I64, "sinceRev", ""),
        "since_time_usec": (2, I64, "sinceTimeUsec", ""),
        "labels": (3, REP, "labels", "GetStatesCommand.Labels"),
        "latest_only": (4, BOOL, "latestOnly", ""),
        "limit": (5, I64, "limit", ""),
        "result": (6, MSG, "result", "GetStatesResult"),
    },
    "GetStatesCommand.Labels": {"labels": (1, MAP, "labels", "")},
    "GetStatesResult": {
        "states": (1, REP, "states", "State"),
        "more": (2, BOOL, "more", ""),
        "scanned_rev": (3, I64, "scannedRev", ""),  # our extension (docs/server.md)
    },
    "GetDelayedStatesCommand": {
        "since_time_sec": (1, I64, "sinceTimeSec", ""),
        "until_time_sec": (2, I64, "untilTimeSec", ""),
        "offset": (3, I64, "offset", ""),
        "limit": (4, I64, "limit", ""),
        "result": (5, MSG, "result", "GetDelayedStatesResult"),
    },
    "GetDelayedStatesResult": {
        "delayed_states": (1, REP, "delayedStates", "DelayedState"),
        "more": (2, BOOL, "more", ""),
    },
}


def _repeated(field: F) -> bool:
    if hasattr(field, "is_repeated"):  # protobuf >= 5.29 (``label`` is gone in 7)
        return bool(field.is_repeated)
    return bool(field.label == F.LABEL_REPEATED)


def _message(name: str) -> object:
    head, _, nested = name.partition(".")
    desc = pb.DESCRIPTOR.message_types_by_name[head]
    return desc.nested_types_by_name[nested] if nested else desc


def test_package_and_messages() -> None:
    assert pb.DESCRIPTOR.package == "flowstate.v1"
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    assert proto.syntax == "proto3"
    assert set(pb.DESCRIPTOR.message_types_by_name) == {n for n in MESSAGES if "." not in n}


def test_fields() -> None:
    for name, fields in MESSAGES.items():
        desc: object = _message(name)
        got = {f.name: f for f in desc.fields}  # type: ignore[attr-defined]
        assert set(got) == set(fields), name
        for field_name, (number, kind, json_name, target) in fields.items():
            f = got[field_name]
            where = f"{name}.{field_name}"
            assert f.number == number, where
            assert f.json_name == json_name, where
            is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
            if kind == MAP:
                assert is_map, where
                value = f.message_type.fields_by_name["value"]
                if target:
                    assert value.message_type.name == target, where
                else:
                    assert value.type == STR, where
                assert f.message_type.fields_by_name["key"].type == STR, where
            elif kind == REP:
                assert _repeated(f) and not is_map, where
                assert f.message_type.full_name == f"flowstate.v1.{target}", where
            else:
                assert not _repeated(f), where
                assert f.type == kind, where
                if kind == MSG:
                    assert f.message_type.full_name == f"flowstate.v1.{target}", where


def test_reserved_numbers() -> None:
    command = pb.DESCRIPTOR.message_types_by_name["Command"]
    numbers = {f.number for f in command.fields}
    assert not numbers & {2, 13, 14}
    data = pb.DESCRIPTOR.message_types_by_name["Data"]
    assert not {f.number for f in data.fields} & {1, 3}


def test_idx_has_presence() -> None:
    # wire.md §2.4: idx 0 must be written; `optional` makes standard encoders write it.
    ref = pb.StateCtxRef(idx=0)
    assert ref.HasField("idx")
    assert ref.SerializeToString() == b"\x08\x00"


def test_services_and_paths() -> None:
    driver = pb.DESCRIPTOR.services_by_name["Driver"]
    flow = pb.DESCRIPTOR.services_by_name["Flow"]
    paths = {
        f"/{service.full_name}/{method.name}": (method.input_type.name, method.output_type.name)
        for service in (driver, flow)
        for method in service.methods
    }
    assert paths == {
        "/flowstate.v1.Driver/GetStateByID": ("Command", "Command"),
        "/flowstate.v1.Driver/GetStateByLabels": ("Command", "Command"),
        "/flowstate.v1.Driver/GetStates": ("Command", "Command"),
        "/flowstate.v1.Driver/GetDelayedStates": ("Command", "Command"),
        "/flowstate.v1.Driver/Delay": ("Command", "Command"),
        "/flowstate.v1.Driver/Commit": ("Command", "Command"),
        "/flowstate.v1.Driver/GetData": ("Command", "Command"),
        "/flowstate.v1.Driver/StoreData": ("Command", "Command"),
        "/flowstate.v1.Flow/Execute": ("StateCtx", "Command"),
    }
