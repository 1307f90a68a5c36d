"""open_driver: a driver from a store URL."""

from __future__ import annotations

from urllib.parse import urlparse

from flowstate.drivers.base import Driver
from flowstate.errors import ValidationError


def open_driver(url: str) -> Driver:
    """A driver for ``memory://``, ``sqlite:///path/to/file.db`` or ``postgresql://...``."""
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        from flowstate.drivers.memory import MemoryDriver

        return MemoryDriver()
    if parsed.scheme == "sqlite":
        from flowstate.drivers.sqlite import SqliteDriver

        path = parsed.path or "flowstate.db"
        if parsed.netloc:
            path = parsed.netloc + path
        return SqliteDriver(path)
    if parsed.scheme in ("postgres", "postgresql"):
        from flowstate.drivers.postgres import PostgresDriver

        return PostgresDriver(url)
    raise ValidationError(
        "url", f"unsupported store url {url!r} (memory://, sqlite:///path, postgresql://...)"
    )
