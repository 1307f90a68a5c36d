"""The Connect unary protocol as flowstate.v1 uses it (wire.md §1, §7): paths, content types,
error codes and their HTTP statuses, the error bodies, and the mapping between error codes and
flowstate's exceptions. Shared by the server and the network driver; no web framework here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from flowstate.commands import NoopCmd
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
    ValidationError,
)
from flowstate.wire import codec

PROTO = "application/proto"
JSON = "application/json"

DRIVER_SERVICE = "/flowstate.v1.Driver/"
FLOW_EXECUTE = "/flowstate.v1.Flow/Execute"

#: Connect error code -> HTTP status (the standard Connect mapping). An error may carry a
#: status of its own (:attr:`WireErrorBody.http_status`): a full store is ``resource_exhausted``
#: with 507, a body over the size limit ``resource_exhausted`` with 413.
STATUS: dict[str, int] = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "permission_denied": 403,
    "not_found": 404,
    "aborted": 409,
    "resource_exhausted": 429,
    "unimplemented": 501,
    "unknown": 500,
    "internal": 500,
    "unavailable": 503,
}

REV_MISMATCH = "rev mismatch: "
COMMIT_UNKNOWN = "commit outcome unknown: "
#: The message prefix of a write refused because the store has no room (HTTP 507).
STORE_FULL = "store full: "
#: HTTP 507 Insufficient Storage: the store cannot hold what the request would write.
INSUFFICIENT_STORAGE = 507


@dataclass(frozen=True, slots=True)
class WireErrorBody:
    """An error as it travels: a Connect code, a message and, when it is not the code's
    usual one (:data:`STATUS`), the HTTP status to answer with."""

    code: str
    message: str
    http_status: int = 0

    @property
    def status(self) -> int:
        """The HTTP status of this error."""
        return self.http_status or STATUS.get(self.code, 500)


def error_of(exc: BaseException) -> WireErrorBody:
    """The code and message a server answers for ``exc`` (wire.md §7.2).

    Validation errors anywhere (inside a commit too) are the client's fault: 400, where the
    Go server answers 500 for those raised inside a commit.
    """
    if isinstance(exc, ValidationError):
        return WireErrorBody("invalid_argument", str(exc))
    if isinstance(exc, NotFoundError | DataNotFoundError | FlowNotFoundError):
        return WireErrorBody("not_found", str(exc))
    if isinstance(exc, RevMismatchError):
        return WireErrorBody("aborted", str(exc))
    if isinstance(exc, StoreFullError):
        # Not the client's fault, and not over by retrying at once: the operator must free
        # space. The code is Connect's for an exhausted resource ("the entire file system is
        # out of space"), the status HTTP's for exactly this.
        return WireErrorBody("resource_exhausted", STORE_FULL + str(exc), INSUFFICIENT_STORAGE)
    if isinstance(exc, StoreUnavailableError | EngineStoppedError):
        return WireErrorBody("unavailable", str(exc))
    if isinstance(exc, CommitUnknownError):
        return WireErrorBody("unknown", COMMIT_UNKNOWN + str(exc))
    if _refused_value(exc):
        return WireErrorBody("invalid_argument", f"the store refused a value: {exc}")
    return WireErrorBody("unknown", str(exc) or type(exc).__name__)


def _refused_value(exc: BaseException) -> bool:
    """A store error caused by a value of the request (a NUL character for PostgreSQL, an
    integer beyond 64 bits), not by the store."""
    if isinstance(exc, OverflowError):
        return True
    asyncpg = sys.modules.get("asyncpg")
    return asyncpg is not None and isinstance(exc, asyncpg.exceptions.DataError)


def exception_of(err: WireErrorBody) -> FlowstateError:
    """The exception a client raises for an error answer (the Go client's mapping, extended)."""
    code, message = err.code, err.message
    if code == "not_found":
        if "state not found" in message:
            details = message.split("state not found", 1)[1].removeprefix("; ")
            return NotFoundError(details)
        if message.startswith("data not found; rev="):
            rev = message.removeprefix("data not found; rev=")
            if rev.lstrip("-").isdigit():
                return DataNotFoundError(int(rev))
        if message.startswith("flow not found: "):
            return FlowNotFoundError(message.removeprefix("flow not found: ").strip("'\""))
    if code == "aborted" and message.startswith(REV_MISMATCH):
        ids = [i.strip() for i in message.removeprefix(REV_MISMATCH).split(",")]
        return RevMismatchError(i for i in ids if i)
    if code == "invalid_argument":
        field, sep, reason = message.partition(": ")
        if sep and field and " " not in field:
            return ValidationError(field, reason)
        return ValidationError("request", message)
    if code == "unavailable":
        return StoreUnavailableError(f"{code}: {message}")
    if code == "resource_exhausted" and message.startswith(STORE_FULL):
        return StoreFullError(message.removeprefix(STORE_FULL))
    if code == "unknown" and message.startswith(COMMIT_UNKNOWN):
        return CommitUnknownError(message.removeprefix(COMMIT_UNKNOWN))
    return FlowstateError(f"{code}: {message}")


def encode_error(err: WireErrorBody, *, json_body: bool) -> bytes:
    """The error body: the binary ``Error`` message (field 1 code, 2 message) or Connect's JSON."""
    return codec.encode_error(err.code, err.message, json=json_body)


def decode_error(body: bytes, *, json_body: bool) -> WireErrorBody:
    """Parse an error body; ValidationError if it is neither shape."""
    code, message = codec.decode_error(body, json=json_body)
    return WireErrorBody(code, message)


def noop_body(*, json_body: bool) -> bytes:
    """A Command holding only an empty noop (the Flow service's answer): ``52 00``."""
    return codec.encode_command(NoopCmd(), json=json_body)
