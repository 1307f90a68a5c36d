"""The error raised for anything the wire codecs cannot encode or decode."""

from __future__ import annotations

from flowstate.errors import ValidationError


class WireError(ValidationError):
    """A message is malformed (or an object cannot be put on the wire).

    ``field`` is the path of the offending field, e.g. ``commit.commands[1].transit.state_ref``
    or ``state_ctxs[0].current.rev``; ``reason`` says what is wrong with it.
    """
