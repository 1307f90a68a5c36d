"""open_driver: a driver from a store URL."""

from __future__ import annotations

from urllib.parse import urlparse

from flowstate.drivers.base import Driver
from flowstate.errors import ValidationError


def open_driver(url: str) -> Driver:
    """A driver for a store URL.

    ``memory://``; ``sqlite:///relative/file.db`` or ``sqlite:////absolute/file.db`` (three
    slashes and a relative path, four for an absolute one, as in SQLAlchemy);
    ``postgresql://user@host:5432/db?schema=name``; ``http://host:8080`` (a flowstate server,
    through :class:`~flowstate.drivers.net.NetDriver`).
    """
    parsed = urlparse(url)
    if parsed.scheme == "memory":
        from flowstate.drivers.memory import MemoryDriver

        return MemoryDriver()
    if parsed.scheme == "sqlite":
        from flowstate.drivers.sqlite import SqliteDriver

        if parsed.netloc:
            raise ValidationError(
                "url", f"{url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        path = parsed.path[1:] if parsed.path.startswith("/") else parsed.path
        if not path:
            raise ValidationError("url", f"{url!r}: the SQLite URL names no file")
        return SqliteDriver(path)
    if parsed.scheme in ("postgres", "postgresql"):
        from flowstate.drivers.postgres import PostgresDriver

        return PostgresDriver(url)
    if parsed.scheme in ("http", "https"):
        from flowstate.drivers.net import NetDriver

        return NetDriver(url)
    raise ValidationError(
        "url",
        f"unsupported store url {url!r} (memory://, sqlite:///path, postgresql://..., http://host:port)",
    )
