from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class State(_message.Message):
    __slots__ = ("id", "rev", "annotations", "labels", "committed_at_unix_milli", "transition")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    REV_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_AT_UNIX_MILLI_FIELD_NUMBER: _ClassVar[int]
    TRANSITION_FIELD_NUMBER: _ClassVar[int]
    id: str
    rev: int
    annotations: _containers.ScalarMap[str, str]
    labels: _containers.ScalarMap[str, str]
    committed_at_unix_milli: int
    transition: Transition
    def __init__(self, id: _Optional[str] = ..., rev: _Optional[int] = ..., annotations: _Optional[_Mapping[str, str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., committed_at_unix_milli: _Optional[int] = ..., transition: _Optional[_Union[Transition, _Mapping]] = ...) -> None: ...

class Transition(_message.Message):
    __slots__ = ("to", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    FROM_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    to: str
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, to: _Optional[str] = ..., annotations: _Optional[_Mapping[str, str]] = ..., **kwargs) -> None: ...

class StateCtx(_message.Message):
    __slots__ = ("committed", "current", "transitions", "datas")
    class DatasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Data
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Data, _Mapping]] = ...) -> None: ...
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    DATAS_FIELD_NUMBER: _ClassVar[int]
    committed: State
    current: State
    transitions: _containers.RepeatedCompositeFieldContainer[Transition]
    datas: _containers.MessageMap[str, Data]
    def __init__(self, committed: _Optional[_Union[State, _Mapping]] = ..., current: _Optional[_Union[State, _Mapping]] = ..., transitions: _Optional[_Iterable[_Union[Transition, _Mapping]]] = ..., datas: _Optional[_Mapping[str, Data]] = ...) -> None: ...

class StateCtxRef(_message.Message):
    __slots__ = ("idx",)
    IDX_FIELD_NUMBER: _ClassVar[int]
    idx: int
    def __init__(self, idx: _Optional[int] = ...) -> None: ...

class DelayedState(_message.Message):
    __slots__ = ("state", "offset", "execute_at_sec")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_AT_SEC_FIELD_NUMBER: _ClassVar[int]
    state: State
    offset: int
    execute_at_sec: int
    def __init__(self, state: _Optional[_Union[State, _Mapping]] = ..., offset: _Optional[int] = ..., execute_at_sec: _Optional[int] = ...) -> None: ...

class Data(_message.Message):
    __slots__ = ("rev", "blob", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REV_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    rev: int
    blob: str
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, rev: _Optional[int] = ..., blob: _Optional[str] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("state_ctxs", "transit", "park", "execute", "delay", "commit", "noop", "stack", "unstack", "get_state_by_id", "get_state_by_labels", "get_states", "get_delayed_states", "store_data", "get_data")
    STATE_CTXS_FIELD_NUMBER: _ClassVar[int]
    TRANSIT_FIELD_NUMBER: _ClassVar[int]
    PARK_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_FIELD_NUMBER: _ClassVar[int]
    DELAY_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    NOOP_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    UNSTACK_FIELD_NUMBER: _ClassVar[int]
    GET_STATE_BY_ID_FIELD_NUMBER: _ClassVar[int]
    GET_STATE_BY_LABELS_FIELD_NUMBER: _ClassVar[int]
    GET_STATES_FIELD_NUMBER: _ClassVar[int]
    GET_DELAYED_STATES_FIELD_NUMBER: _ClassVar[int]
    STORE_DATA_FIELD_NUMBER: _ClassVar[int]
    GET_DATA_FIELD_NUMBER: _ClassVar[int]
    state_ctxs: _containers.RepeatedCompositeFieldContainer[StateCtx]
    transit: TransitCommand
    park: ParkCommand
    execute: ExecuteCommand
    delay: DelayCommand
    commit: CommitCommand
    noop: NoopCommand
    stack: StackCommand
    unstack: UnstackCommand
    get_state_by_id: GetStateByIDCommand
    get_state_by_labels: GetStateByLabelsCommand
    get_states: GetStatesCommand
    get_delayed_states: GetDelayedStatesCommand
    store_data: StoreDataCommand
    get_data: GetDataCommand
    def __init__(self, state_ctxs: _Optional[_Iterable[_Union[StateCtx, _Mapping]]] = ..., transit: _Optional[_Union[TransitCommand, _Mapping]] = ..., park: _Optional[_Union[ParkCommand, _Mapping]] = ..., execute: _Optional[_Union[ExecuteCommand, _Mapping]] = ..., delay: _Optional[_Union[DelayCommand, _Mapping]] = ..., commit: _Optional[_Union[CommitCommand, _Mapping]] = ..., noop: _Optional[_Union[NoopCommand, _Mapping]] = ..., stack: _Optional[_Union[StackCommand, _Mapping]] = ..., unstack: _Optional[_Union[UnstackCommand, _Mapping]] = ..., get_state_by_id: _Optional[_Union[GetStateByIDCommand, _Mapping]] = ..., get_state_by_labels: _Optional[_Union[GetStateByLabelsCommand, _Mapping]] = ..., get_states: _Optional[_Union[GetStatesCommand, _Mapping]] = ..., get_delayed_states: _Optional[_Union[GetDelayedStatesCommand, _Mapping]] = ..., store_data: _Optional[_Union[StoreDataCommand, _Mapping]] = ..., get_data: _Optional[_Union[GetDataCommand, _Mapping]] = ...) -> None: ...

class TransitCommand(_message.Message):
    __slots__ = ("state_ref", "to", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    state_ref: StateCtxRef
    to: str
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., to: _Optional[str] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ParkCommand(_message.Message):
    __slots__ = ("state_rexf", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATE_REXF_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    state_rexf: StateCtxRef
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, state_rexf: _Optional[_Union[StateCtxRef, _Mapping]] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ExecuteCommand(_message.Message):
    __slots__ = ("state_ref",)
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    state_ref: StateCtxRef
    def __init__(self, state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ...) -> None: ...

class DelayCommand(_message.Message):
    __slots__ = ("state_ref", "result", "execute_at_sec", "commit", "to", "annotations")
    class AnnotationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EXECUTE_AT_SEC_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    ANNOTATIONS_FIELD_NUMBER: _ClassVar[int]
    state_ref: StateCtxRef
    result: DelayedState
    execute_at_sec: int
    commit: bool
    to: str
    annotations: _containers.ScalarMap[str, str]
    def __init__(self, state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., result: _Optional[_Union[DelayedState, _Mapping]] = ..., execute_at_sec: _Optional[int] = ..., commit: bool = ..., to: _Optional[str] = ..., annotations: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CommitCommand(_message.Message):
    __slots__ = ("commands",)
    COMMANDS_FIELD_NUMBER: _ClassVar[int]
    commands: _containers.RepeatedCompositeFieldContainer[Command]
    def __init__(self, commands: _Optional[_Iterable[_Union[Command, _Mapping]]] = ...) -> None: ...

class NoopCommand(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StackCommand(_message.Message):
    __slots__ = ("carrier_state_ref", "stack_state_ref", "annotation")
    CARRIER_STATE_REF_FIELD_NUMBER: _ClassVar[int]
    STACK_STATE_REF_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    carrier_state_ref: StateCtxRef
    stack_state_ref: StateCtxRef
    annotation: str
    def __init__(self, carrier_state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., stack_state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., annotation: _Optional[str] = ...) -> None: ...

class UnstackCommand(_message.Message):
    __slots__ = ("carrier_state_ref", "unstack_state_ref", "annotation")
    CARRIER_STATE_REF_FIELD_NUMBER: _ClassVar[int]
    UNSTACK_STATE_REF_FIELD_NUMBER: _ClassVar[int]
    ANNOTATION_FIELD_NUMBER: _ClassVar[int]
    carrier_state_ref: StateCtxRef
    unstack_state_ref: StateCtxRef
    annotation: str
    def __init__(self, carrier_state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., unstack_state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., annotation: _Optional[str] = ...) -> None: ...

class StoreDataCommand(_message.Message):
    __slots__ = ("state_ref", "alias")
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    state_ref: StateCtxRef
    alias: str
    def __init__(self, state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., alias: _Optional[str] = ...) -> None: ...

class GetDataCommand(_message.Message):
    __slots__ = ("state_ref", "alias")
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    state_ref: StateCtxRef
    alias: str
    def __init__(self, state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ..., alias: _Optional[str] = ...) -> None: ...

class GetStateByIDCommand(_message.Message):
    __slots__ = ("id", "rev", "state_ref")
    ID_FIELD_NUMBER: _ClassVar[int]
    REV_FIELD_NUMBER: _ClassVar[int]
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    id: str
    rev: int
    state_ref: StateCtxRef
    def __init__(self, id: _Optional[str] = ..., rev: _Optional[int] = ..., state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ...) -> None: ...

class GetStateByLabelsCommand(_message.Message):
    __slots__ = ("labels", "state_ref")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STATE_REF_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.ScalarMap[str, str]
    state_ref: StateCtxRef
    def __init__(self, labels: _Optional[_Mapping[str, str]] = ..., state_ref: _Optional[_Union[StateCtxRef, _Mapping]] = ...) -> None: ...

class GetStatesCommand(_message.Message):
    __slots__ = ("since_rev", "since_time_usec", "labels", "latest_only", "limit", "result")
    class Labels(_message.Message):
        __slots__ = ("labels",)
        class LabelsEntry(_message.Message):
            __slots__ = ("key", "value")
            KEY_FIELD_NUMBER: _ClassVar[int]
            VALUE_FIELD_NUMBER: _ClassVar[int]
            key: str
            value: str
            def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
        LABELS_FIELD_NUMBER: _ClassVar[int]
        labels: _containers.ScalarMap[str, str]
        def __init__(self, labels: _Optional[_Mapping[str, str]] = ...) -> None: ...
    SINCE_REV_FIELD_NUMBER: _ClassVar[int]
    SINCE_TIME_USEC_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LATEST_ONLY_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    since_rev: int
    since_time_usec: int
    labels: _containers.RepeatedCompositeFieldContainer[GetStatesCommand.Labels]
    latest_only: bool
    limit: int
    result: GetStatesResult
    def __init__(self, since_rev: _Optional[int] = ..., since_time_usec: _Optional[int] = ..., labels: _Optional[_Iterable[_Union[GetStatesCommand.Labels, _Mapping]]] = ..., latest_only: bool = ..., limit: _Optional[int] = ..., result: _Optional[_Union[GetStatesResult, _Mapping]] = ...) -> None: ...

class GetStatesResult(_message.Message):
    __slots__ = ("states", "more", "scanned_rev")
    STATES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    SCANNED_REV_FIELD_NUMBER: _ClassVar[int]
    states: _containers.RepeatedCompositeFieldContainer[State]
    more: bool
    scanned_rev: int
    def __init__(self, states: _Optional[_Iterable[_Union[State, _Mapping]]] = ..., more: bool = ..., scanned_rev: _Optional[int] = ...) -> None: ...

class GetDelayedStatesCommand(_message.Message):
    __slots__ = ("since_time_sec", "until_time_sec", "offset", "limit", "result")
    SINCE_TIME_SEC_FIELD_NUMBER: _ClassVar[int]
    UNTIL_TIME_SEC_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    since_time_sec: int
    until_time_sec: int
    offset: int
    limit: int
    result: GetDelayedStatesResult
    def __init__(self, since_time_sec: _Optional[int] = ..., until_time_sec: _Optional[int] = ..., offset: _Optional[int] = ..., limit: _Optional[int] = ..., result: _Optional[_Union[GetDelayedStatesResult, _Mapping]] = ...) -> None: ...

class GetDelayedStatesResult(_message.Message):
    __slots__ = ("delayed_states", "more")
    DELAYED_STATES_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    delayed_states: _containers.RepeatedCompositeFieldContainer[DelayedState]
    more: bool
    def __init__(self, delayed_states: _Optional[_Iterable[_Union[DelayedState, _Mapping]]] = ..., more: bool = ...) -> None: ...
