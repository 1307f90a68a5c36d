"""flowstate: a low-level, durable state and workflow engine.

A flow takes a state, does its work and returns a command; the engine carries out the commands,
commits states with optimistic concurrency, and lets anyone watch the stream of changes.
"""

from typing import TYPE_CHECKING

from flowstate import recovery
from flowstate.clock import Clock, ManualClock, SystemClock
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
    commit,
    delay,
    delay_until,
    end,
    execute,
    get_data,
    get_delayed_states,
    get_state_by_id,
    get_state_by_labels,
    get_states,
    get_states_by_labels,
    noop,
    park,
    stack,
    store_data,
    transit,
    unstack,
)
from flowstate.data import Data
from flowstate.delayer import Delayer, DelayerStats
from flowstate.drivers.base import Driver
from flowstate.drivers.memory import MemoryDriver
from flowstate.drivers.postgres import PostgresDriver
from flowstate.drivers.sqlite import SqliteDriver
from flowstate.engine import Engine
from flowstate.errors import (
    CommitUnknownError,
    DataNotFoundError,
    EngineStoppedError,
    FlowNotFoundError,
    FlowstateError,
    NotFoundError,
    RevMismatchError,
    StoreFullError,
    StoreUnavailableError,
    StoreWriteError,
    ValidationError,
)
from flowstate.flow import Flow, FlowRegistry
from flowstate.iterator import StateIterator, Watcher
from flowstate.recovery import Recoverer, RecoveryStats
from flowstate.state import State, StateCtx, Transition, delayed, ended, is_system, parked
from flowstate.urls import open_driver

if TYPE_CHECKING:
    from flowstate.drivers.net import NetDriver

__all__ = [
    "Clock",
    "Command",
    "CommitCmd",
    "CommitUnknownError",
    "Data",
    "DataNotFoundError",
    "DelayCmd",
    "DelayedState",
    "Delayer",
    "DelayerStats",
    "Driver",
    "Engine",
    "EngineStoppedError",
    "ExecuteCmd",
    "Flow",
    "FlowNotFoundError",
    "FlowRegistry",
    "FlowstateError",
    "GetDataCmd",
    "GetDelayedStatesCmd",
    "GetDelayedStatesResult",
    "GetStateByIdCmd",
    "GetStateByLabelsCmd",
    "GetStatesCmd",
    "GetStatesResult",
    "ManualClock",
    "MemoryDriver",
    "NetDriver",
    "NoopCmd",
    "NotFoundError",
    "ParkCmd",
    "PostgresDriver",
    "Recoverer",
    "RecoveryStats",
    "RevMismatchError",
    "SqliteDriver",
    "StackCmd",
    "State",
    "StateCtx",
    "StateIterator",
    "StoreDataCmd",
    "StoreFullError",
    "StoreUnavailableError",
    "StoreWriteError",
    "SystemClock",
    "TransitCmd",
    "Transition",
    "UnstackCmd",
    "ValidationError",
    "Watcher",
    "commit",
    "delay",
    "delay_until",
    "delayed",
    "end",
    "ended",
    "execute",
    "get_data",
    "get_delayed_states",
    "get_state_by_id",
    "get_state_by_labels",
    "get_states",
    "get_states_by_labels",
    "is_system",
    "noop",
    "open_driver",
    "park",
    "parked",
    "recovery",
    "stack",
    "store_data",
    "transit",
    "unstack",
]


def __getattr__(name: str) -> object:
    # NetDriver pulls in the HTTP client: imported on first use, not with flowstate
    if name == "NetDriver":
        from flowstate.drivers.net import NetDriver

        return NetDriver
    raise AttributeError(f"module 'flowstate' has no attribute {name!r}")
