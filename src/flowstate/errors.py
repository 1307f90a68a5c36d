"""Errors raised by flowstate. Every one of them is a :class:`FlowstateError`."""

from __future__ import annotations

from collections.abc import Iterable


class FlowstateError(Exception):
    """Base class of every error flowstate raises on purpose."""


class ValidationError(FlowstateError, ValueError):
    """A command or argument is malformed. ``field`` names what was wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class RevMismatchError(FlowstateError):
    """A commit conflicted: another commit changed (or created) these states first.

    ``ids`` lists every conflicting state id the driver could determine, in commit order.
    The message is ``rev mismatch: id1, id2`` (the wire protocol depends on that prefix).
    """

    def __init__(self, ids: Iterable[str]) -> None:
        self.ids: list[str] = list(dict.fromkeys(ids))
        super().__init__("rev mismatch: " + ", ".join(self.ids))

    def contains(self, state_id: str) -> bool:
        """Whether ``state_id`` is one of the conflicting ids."""
        return state_id in self.ids


class NotFoundError(FlowstateError, LookupError):
    """No stored state matches. The message starts with ``state not found``."""

    def __init__(self, details: str = "") -> None:
        super().__init__("state not found" + (f"; {details}" if details else ""))


class DataNotFoundError(FlowstateError, LookupError):
    """No stored data has the requested rev."""

    def __init__(self, rev: int) -> None:
        super().__init__(f"data not found; rev={rev}")
        self.rev = rev


class CommitUnknownError(FlowstateError):
    """The connection to the store broke while a commit was finishing: it may or may not have
    been stored. Reload the states to find out; never assume either outcome."""


class StoreUnavailableError(FlowstateError):
    """The store could not be reached. Nothing was changed by the failed call."""


class FlowNotFoundError(FlowstateError, LookupError):
    """The flow registry has no flow with this id."""

    def __init__(self, flow_id: str) -> None:
        super().__init__(f"flow not found: {flow_id!r}")
        self.flow_id = flow_id


class EngineStoppedError(FlowstateError):
    """The engine was shut down and does not start new executions."""

    def __init__(self) -> None:
        super().__init__("engine stopped")


class StoreWriteError(StoreUnavailableError):
    """The store could not write (its disk is full, an I/O error, its file locked elsewhere for
    too long): the call was rolled back and changed nothing. Retry once the cause is gone."""


class StoreFullError(StoreWriteError):
    """The store has no room for the write: its disk is full, or PostgreSQL refused it for a
    lack of space (``disk_full``, or a configured limit such as ``temp_file_limit``). Nothing
    was stored. Free space (or raise the limit), then retry; a flowstate server answers it with
    HTTP 507 ``resource_exhausted``."""
