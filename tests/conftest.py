"""Shared fixtures: every driver-agnostic test runs once per available driver.

Adding a driver is one entry in :data:`DRIVERS`: a name and a factory that builds a fresh, empty
store (or calls ``pytest.skip`` when its backing service is not available).
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import flowstate as fs

DriverFactory = Callable[[], fs.Driver]


def _memory(tmp_path: Path, n: int) -> fs.Driver:
    return fs.MemoryDriver()


def _sqlite(tmp_path: Path, n: int) -> fs.Driver:
    from flowstate.drivers.sqlite import SqliteDriver

    return SqliteDriver(tmp_path / f"flowstate-{n}.db")


def _postgres(tmp_path: Path, n: int) -> fs.Driver:
    from flowstate.drivers.postgres import PostgresDriver
    from tests import pgutil

    pgutil.require()  # skips (or fails under CI=true) without a server
    return PostgresDriver(pgutil.dsn_for(pgutil.new_schema()))  # a fresh schema: an empty store


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


#: name -> factory(tmp_path, n) of a fresh, empty driver. The factory may call pytest.skip.
DRIVERS: dict[str, Callable[[Path, int], fs.Driver]] = {"memory": _memory}
if _importable("flowstate.drivers.sqlite"):
    DRIVERS["sqlite"] = _sqlite
if _importable("flowstate.drivers.postgres") and _importable("asyncpg"):
    DRIVERS["postgres"] = _postgres


def _net_over(backing: str) -> Callable[[Path, int], fs.Driver]:
    """engine -> NetDriver -> a server on a real socket -> a fresh store of kind ``backing``."""

    def make(tmp_path: Path, n: int) -> fs.Driver:
        from tests import netserver

        return netserver.net_driver(DRIVERS[backing](tmp_path, n))

    return make


if _importable("flowstate.server") and _importable("flowstate.drivers.net"):
    for _backing in list(DRIVERS):
        DRIVERS[f"net-over-{_backing}"] = _net_over(_backing)


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_schemas() -> Iterator[None]:
    """Drop the PostgreSQL schemas this test process created (if it used PostgreSQL at all)."""
    yield
    pgutil = sys.modules.get("tests.pgutil")
    if pgutil is not None and pgutil.unavailable.cache_info().currsize:
        pgutil.drop_schemas()


@pytest.fixture(autouse=True)
def _stop_net_servers() -> Iterator[None]:
    """Stop the servers the network driver entries started for this test."""
    yield
    netserver = sys.modules.get("tests.netserver")
    if netserver is not None:
        netserver.stop_all()


@pytest.fixture
def schema() -> str:
    """A PostgreSQL schema no other test uses (the driver creates it on open; dropped at the
    end of the session). Tests using it call ``pgutil.require()`` first."""
    from tests import pgutil

    return pgutil.new_schema()


@pytest.fixture
def dsn(schema: str) -> str:
    """The DSN of the store in :func:`schema`."""
    from tests import pgutil

    return pgutil.dsn_for(schema)


@pytest.fixture(params=list(DRIVERS))
def driver_name(request: pytest.FixtureRequest) -> str:
    """The name of the driver this test instance runs on."""
    name: str = request.param
    return name


@pytest.fixture
def driver_factory(driver_name: str, tmp_path: Path) -> DriverFactory:
    """A callable returning a fresh, empty driver of the parametrized kind on every call."""
    make = DRIVERS[driver_name]
    counter = itertools.count()
    return lambda: make(tmp_path, next(counter))


class _ErrorLog(logging.Handler):
    """Collects what the ``flowstate`` logger reports as gone wrong: ERROR records (failed
    background executions) and the shutdown warning about executions that had to be cancelled.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.getMessage().startswith("shutdown"):
            self.records.append(record)


class EngineFactory:
    """Builds started engines on fresh drivers and shuts them all down after the test.

    Background executions only log their errors; the factory fails the test if any was logged
    (set ``allow_errors`` for a test that expects some).
    """

    def __init__(self, driver_factory: DriverFactory) -> None:
        self._driver_factory = driver_factory
        self.engines: list[fs.Engine] = []
        self.allow_errors = False
        self.errors = _ErrorLog()

    async def __call__(self, registry: fs.FlowRegistry, **kwargs: Any) -> fs.Engine:
        kwargs.setdefault("recovery", False)  # as in Go's suite: a delayer, no recoverer
        engine = fs.Engine(self._driver_factory(), registry, **kwargs)
        self.engines.append(engine)
        await engine.start()
        return engine

    async def shutdown_all(self) -> None:
        for engine in reversed(self.engines):
            await engine.shutdown(timeout=5.0)


async def _tasks_left(grace: float) -> list[asyncio.Task[Any]]:
    """Tasks other than the caller's still pending ``grace`` seconds from now.

    The grace lets client libraries finish their own clean-up (asyncpg cancels an interrupted
    query in a task of its own).
    """
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=grace)
    return [t for t in others if not t.done()]


@pytest.fixture
async def engine_factory(driver_factory: DriverFactory) -> AsyncIterator[EngineFactory]:
    """``await engine_factory(registry)`` → a started engine on a fresh driver."""
    factory = EngineFactory(driver_factory)
    logger = logging.getLogger("flowstate")
    logger.addHandler(factory.errors)
    try:
        yield factory
        await factory.shutdown_all()
        leaked = await _tasks_left(grace=2.0)
    finally:
        logger.removeHandler(factory.errors)
    if leaked:  # like the Go suite's goroutine leak check
        pytest.fail(f"tasks still running after the engine shut down: {leaked}")
    if factory.errors.records and not factory.allow_errors:
        details = "\n".join(
            f"{r.getMessage()}\n{logging.Formatter().formatException(r.exc_info)}"
            if r.exc_info
            else r.getMessage()
            for r in factory.errors.records
        )
        pytest.fail(f"the engine logged errors:\n{details}")


@pytest.fixture
def store(driver_name: str, tmp_path: Path) -> Callable[[], fs.Driver]:
    """A callable returning a new driver on ONE store, shared by every driver it returns: the
    same MemoryDriver, the same SQLite file, the same PostgreSQL schema. For tests of several
    engines (a cluster) on one store, and of restarts."""
    if driver_name.startswith("net-over-"):
        from flowstate.drivers.net import NetDriver
        from tests import netserver

        first = netserver.net_driver(DRIVERS[driver_name.removeprefix("net-over-")](tmp_path, 0))
        drivers = iter([first])
        return lambda: next(drivers, None) or NetDriver(first.url)
    if driver_name == "memory":
        shared = fs.MemoryDriver()
        return lambda: shared
    if driver_name == "postgres":
        from flowstate.drivers.postgres import PostgresDriver
        from tests import pgutil

        pgutil.require()
        dsn = pgutil.dsn_for(pgutil.new_schema())
        return lambda: PostgresDriver(dsn)
    make = DRIVERS[driver_name]
    return lambda: make(tmp_path, 0)
