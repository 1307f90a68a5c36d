"""The ``flowstate`` command: run a server, list and follow states, migrate a database.

Every command but ``serve`` works on ``--store URL``: a store URL (``sqlite:///file.db``,
``postgresql://…``) or the URL of a flowstate server (``http://host:8080``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn
from rich.table import Table

from flowstate.commands import GetStatesCmd, get_state_by_id
from flowstate.drivers.base import Driver
from flowstate.engine import Engine
from flowstate.errors import FlowstateError, NotFoundError, ValidationError
from flowstate.state import State, StateCtx, ended, parked
from flowstate.urls import open_driver

DEFAULT_STORE = "sqlite:///flowstate.db"

app = typer.Typer(
    name="flowstate",
    help="flowstate: a durable state and workflow engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _Out(Console):
    """stdout: a reader that goes away (``| head``) ends the command quietly (see
    :func:`broken_pipe`) instead of rich's exit status 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        broken_pipe()


# Off a terminal (a pipe, a file) rich would wrap tables at 80 columns: give them room.
out = _Out(highlight=False, width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, highlight=False)

T = TypeVar("T")

# --- shared options -------------------------------------------------------------------------

Store = Annotated[
    str,
    typer.Option(
        "--store",
        "-s",
        envvar="FLOWSTATE_STORE",
        help="Store URL (sqlite:///file.db, postgresql://…) or server URL (http://host:8080).",
    ),
]
Token = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FLOWSTATE_TOKEN",
        help="Bearer token for a server URL.",
        show_default=False,
    ),
]
Labels = Annotated[
    list[str] | None,
    typer.Option(
        "--label", "-l", help="Only states with this label (key=value); repeatable, all must match."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per line, for scripts.")]


#: Exit status after a broken pipe (the reader went away, as with ``| head``): what a shell
#: reports for a program killed by SIGPIPE (128 + 13), without the signal's side effects.
BROKEN_PIPE = 141


def fail(message: str, code: int = 1) -> NoReturn:
    # soft_wrap: one line however long (rich would fold it at the terminal's width)
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def broken_pipe() -> NoReturn:
    """End quietly once stdout's reader has gone: later writes (and the flush at exit) go to
    /dev/null instead of raising again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(BROKEN_PIPE)


def show(*renderables: Any) -> None:
    """Print to stdout through rich, ending quietly on a broken pipe."""
    try:
        out.print(*renderables)
        sys.stdout.flush()
    except BrokenPipeError:
        broken_pipe()


def redact(url: str) -> str:
    """A store URL without its password."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def check_store_url(url: str) -> None:
    """Refuse (status 2) a database or server URL whose port is not a port."""
    scheme = url.partition("://")[0].lower()
    if scheme not in ("postgres", "postgresql", "http", "https"):
        return
    parts = urlsplit(url)
    if "," in parts.netloc:  # several PostgreSQL hosts: the driver reads them
        return
    try:
        parts.port  # noqa: B018 (parsing is the check)
    except ValueError as exc:
        fail(f"--store {redact(url)}: bad port ({exc})", 2)


def check_sqlite_path(url: str, path: str | None, *, must_exist: bool) -> None:
    """Refuse a SQLite URL naming a directory, or a missing file when it must exist."""
    if not url.startswith("sqlite:") or not path:
        return
    if Path(path).is_dir():
        fail(f"--store {url}: {path} is a directory, not a SQLite file")
    if must_exist and not Path(path).exists():
        fail(f"no SQLite store at {path} (check --store)")


def store_problem(url: str, exc: BaseException) -> str | None:
    """One line saying what is wrong with the store at ``url``; None: ``exc`` is not about the
    store."""
    where = f"store {redact(url)}"
    if isinstance(exc, FlowstateError):
        return f"{where}: {exc}"
    if isinstance(exc, sqlite3.Error):
        return f"{where}: SQLite: {exc}"
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        return f"{where}: PostgreSQL: {exc}"
    if isinstance(exc, socket.gaierror):
        host = urlsplit(url).hostname or url
        return f"{where}: cannot resolve host {host!r}: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"{where}: connection refused"
    if isinstance(exc, TimeoutError):
        return f"{where}: timed out"
    if isinstance(exc, OSError):
        return f"{where}: {exc.strerror or exc}"
    return None


def raised_in(exc: BaseException, func: Callable[..., Any]) -> bool:
    """Whether ``exc`` was raised from inside the Python function ``func``."""
    code = getattr(func, "__code__", None)
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return True
        tb = tb.tb_next
    return False


def parse_labels(values: list[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"{item!r}: expected key=value", param_hint="--label")
        labels[key] = value
    return labels


def open_store(url: str, token: str | None, *, must_exist: bool = True) -> Driver:
    """The driver for ``url``; a SQLite file must already exist unless told otherwise (so that a
    mistyped path is an error rather than a new, empty store)."""
    check_store_url(url)
    try:
        driver = open_driver(url)
    except ValidationError as exc:
        fail(str(exc), 2)
    check_sqlite_path(url, getattr(driver, "path", None), must_exist=must_exist)
    if token and hasattr(driver, "token"):
        driver.token = token  # a server URL: NetDriver
    return driver


def run(driver: Driver, work: Callable[[Engine], Awaitable[T]], store: str = "") -> T:
    """Run ``work`` with a read-only engine (no recoverer, no delayer) over ``driver``."""

    async def main() -> T:
        async with Engine(driver, recovery=False, delayer=False) as engine:
            return await work(engine)

    return _run(main(), store)


def _run(coro: Coroutine[Any, Any, T], store: str = "") -> T:
    try:
        return asyncio.run(coro)
    except BrokenPipeError:
        broken_pipe()
    except NotFoundError as exc:
        fail(str(exc))
    except Exception as exc:
        problem = store_problem(store, exc) if store else None
        if problem is None and isinstance(exc, FlowstateError | OSError | sqlite3.Error):
            problem = f"{exc}"
        if problem is None:
            raise
        fail(problem)


# --- rendering ------------------------------------------------------------------------------


def iso(when: datetime | None) -> str:
    if when is None:
        return ""
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def state_dict(state: State) -> dict[str, Any]:
    """A state as plain JSON: revs as numbers, times as RFC 3339 (UTC, milliseconds)."""
    return {
        "id": state.id,
        "rev": state.rev,
        "committed_at": iso(state.committed_at) or None,
        "transition": {"to": state.transition.to, "annotations": state.transition.annotations},
        "annotations": state.annotations,
        "labels": state.labels,
    }


def print_json(state: State) -> None:
    try:
        sys.stdout.write(json.dumps(state_dict(state), ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        broken_pipe()


def where(state: State) -> str:
    if ended(state):
        return "[dim]ended[/dim]"
    if parked(state):
        return "[dim]parked[/dim]"
    return f"→ {escape(state.transition.to)}"


def pairs(values: dict[str, str]) -> str:
    return escape(" ".join(f"{k}={v}" for k, v in sorted(values.items())))


def states_table(states: list[State]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("REV", justify="right", style="cyan", no_wrap=True)
    table.add_column("ID", no_wrap=True)
    table.add_column("FLOW")
    table.add_column("LABELS")
    table.add_column("COMMITTED AT", no_wrap=True)
    for s in states:
        table.add_row(str(s.rev), escape(s.id), where(s), pairs(s.labels), iso(s.committed_at))
    return table


def state_line(state: State) -> str:
    labels = pairs(state.labels)
    return (
        f"[cyan]{state.rev}[/cyan]  {escape(state.id)}  {where(state)}"
        + (f"  [dim]{labels}[/dim]" if labels else "")
        + f"  [dim]{iso(state.committed_at)}[/dim]"
    )


def query(labels: list[str] | None, since_rev: int, latest_only: bool, page: int) -> GetStatesCmd:
    cmd = GetStatesCmd(since_rev=since_rev, latest_only=latest_only, limit=page)
    return cmd.with_labels(parse_labels(labels))


# --- commands -------------------------------------------------------------------------------


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flowstate-engine")
    except PackageNotFoundError:  # run from a source tree
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        show(f"flowstate {package_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version, exit."
        ),
    ] = False,
) -> None:
    """flowstate: a durable state and workflow engine."""


@app.command()
def serve(
    store: Annotated[
        str,
        typer.Option("--store", "-s", help="Store URL (sqlite:///…, postgresql://…, memory://)."),
    ] = DEFAULT_STORE,
    addr: Annotated[str, typer.Option("--addr", help="Listen address host:port.")] = (
        "127.0.0.1:8080"
    ),
    token: Annotated[
        str | None,
        typer.Option(
            "--token", help="Require this bearer token (or FLOWSTATE_TOKEN).", show_default=False
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option("--cors-origin", help="Allow browser requests from this origin; repeatable."),
    ] = None,
    max_body: Annotated[int, typer.Option("--max-body", help="Largest request body, bytes.")] = (
        16 * 2**20
    ),
    remote_host: Annotated[
        list[str] | None,
        typer.Option(
            "--remote-host",
            help="Call remote flows (and send the token) only on this HOST[:PORT]; repeatable "
            "(or FLOWSTATE_REMOTE_HOSTS; default: loopback hosts only).",
            show_default=False,
        ),
    ] = None,
    allowed_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            help="Also answer requests sent to this host name (*.example.com: its subdomains, "
            "*: any); repeatable (or FLOWSTATE_ALLOWED_HOSTS). Loopback names and IP "
            "addresses are always allowed.",
            show_default=False,
        ),
    ] = None,
    body_timeout: Annotated[
        float | None,
        typer.Option(
            "--body-timeout",
            help="Seconds a request may send nothing while its head or body is due "
            "(or FLOWSTATE_BODY_TIMEOUT; default 30).",
            show_default=False,
        ),
    ] = None,
    max_connections: Annotated[
        int | None,
        typer.Option(
            "--max-connections",
            help="Open connections at most; more are closed at once (or "
            "FLOWSTATE_MAX_CONNECTIONS; default 1000, at most half the open-file limit).",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[bool, typer.Option("--demo", help="Run a demo workflow.")] = False,
    recoverer: Annotated[
        bool | None,
        typer.Option(
            "--recoverer/--no-recoverer",
            help="Run a recoverer (default: yes, unless FLOWSTATE_NO_RECOVERER=1).",
            show_default=False,
        ),
    ] = None,
    delayer: Annotated[
        bool | None,
        typer.Option(
            "--delayer/--no-delayer",
            help="Run a delayer (default: yes, unless FLOWSTATE_NO_DELAYER=1).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the flowstate server (Driver and Flow services, wire-compatible with flowstate.v1).

    Options left at their defaults give way to FLOWSTATE_STORE (or the Go app's FLOWSTATE_DRIVER
    settings), FLOWSTATE_ADDR, FLOWSTATE_TOKEN, FLOWSTATE_CORS_ORIGINS, FLOWSTATE_MAX_BODY,
    FLOWSTATE_NO_RECOVERER and FLOWSTATE_NO_DELAYER; FLOWSTATE_HTTP_HOST is the address
    advertised for remote flows. With --no-recoverer --no-delayer the server is a pure store,
    for clients that run their own recoverer and delayer (docs/serving.md).
    """
    from flowstate.netflow import parse_remote_hosts
    from flowstate.server import serve as serve_forever
    from flowstate.server.run import listen, settings

    try:
        url = settings(store, addr).store  # as the server will read it (environment included)
    except ValidationError as exc:
        fail(str(exc), 2)
    check_store_url(url)
    try:
        parse_remote_hosts(remote_host or (), "--remote-host")
    except ValidationError as exc:
        fail(str(exc), 2)
    if url.startswith("sqlite:///"):
        check_sqlite_path(url, url.removeprefix("sqlite:///"), must_exist=False)
    try:
        serve_forever(
            store,
            addr,
            token=token,
            cors_origins=cors_origin or (),
            max_body=max_body,
            remote_hosts=remote_host or (),
            demo=demo,
            recoverer=recoverer,
            delayer=delayer,
            allowed_hosts=allowed_host or (),
            body_timeout=body_timeout,
            max_connections=max_connections,
        )
    except ValidationError as exc:
        fail(str(exc), 2)
    except Exception as exc:
        if isinstance(exc, OSError) and raised_in(exc, listen):
            fail(f"cannot serve on {addr}: {exc.strerror or exc}")
        problem = store_problem(url, exc)
        if problem is None:
            raise
        fail(problem)


@app.command()
def states(
    store: Store = DEFAULT_STORE,
    label: Labels = None,
    since_rev: Annotated[
        int, typer.Option("--since-rev", help="Only revisions after this one (-1: the latest).")
    ] = 0,
    latest_only: Annotated[
        bool, typer.Option("--latest-only", help="Only the latest revision of each state.")
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", "-n", min=0, help="At most this many states (0: all).")
    ] = 100,
    as_json: AsJson = False,
    token: Token = None,
) -> None:
    """List states in revision order."""
    driver = open_store(store, token)
    cmd = query(label, since_rev, latest_only, min(limit or 500, 500))

    async def work(engine: Engine) -> list[State]:
        found: list[State] = []
        with Progress(
            SpinnerColumn(),
            TextColumn("reading states… {task.completed} so far"),
            console=err,
            transient=True,
            disable=not err.is_terminal,
        ) as progress:
            task = progress.add_task("read", total=None)
            count = 0
            async for state in engine.iter(cmd):
                if as_json:
                    print_json(state)
                else:
                    found.append(state)
                count += 1
                progress.advance(task)
                if count == limit:
                    break
        return found

    found = run(driver, work, store)
    if not as_json:
        if found:
            show(states_table(found))
        else:
            err.print("[dim]no states[/dim]")


@app.command()
def state(
    id: Annotated[str, typer.Argument(help="State id.")],
    rev: Annotated[int, typer.Option("--rev", min=0, help="This revision (0: the latest).")] = 0,
    store: Store = DEFAULT_STORE,
    as_json: Annotated[bool, typer.Option("--json", help="Print the state as JSON.")] = False,
    token: Token = None,
) -> None:
    """Show one state (its latest revision, or --rev N)."""
    if not id:
        raise typer.BadParameter("state id is empty", param_hint="ID")
    driver = open_store(store, token)

    async def work(engine: Engine) -> State:
        ctx = StateCtx()
        await engine.do(get_state_by_id(ctx, id, rev))
        return ctx.current

    found = run(driver, work, store)
    if as_json:
        print_json(found)
        return
    table = Table(box=None, show_header=False, pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    table.add_row("id", escape(found.id))
    table.add_row("rev", str(found.rev))
    table.add_row("committed at", iso(found.committed_at))
    table.add_row("flow", where(found))
    for name, values in (
        ("transition", found.transition.annotations),
        ("annotations", found.annotations),
        ("labels", found.labels),
    ):
        for i, (key, value) in enumerate(sorted(values.items())):
            table.add_row(name if i == 0 else "", f"{escape(key)} = {escape(value)}")
    show(table)


@app.command()
def watch(
    store: Store = DEFAULT_STORE,
    label: Labels = None,
    since_rev: Annotated[
        int | None,
        typer.Option(
            "--since-rev",
            help="Replay revisions after this one first (0: the whole log); default: only new.",
            show_default=False,
        ),
    ] = None,
    latest_only: Annotated[
        bool, typer.Option("--latest-only", help="Skip revisions superseded while catching up.")
    ] = False,
    as_json: AsJson = False,
    token: Token = None,
) -> None:
    """Print every new revision as it is committed, until interrupted (Ctrl-C)."""
    driver = open_store(store, token)

    async def work(engine: Engine) -> None:
        start = since_rev if since_rev is not None else await engine.driver.head_rev()
        cmd = query(label, start, latest_only, 100)
        if not as_json and err.is_terminal:
            err.print(f"[dim]watching {escape(store)} from rev {start} (Ctrl-C to stop)[/dim]")
        async with engine.watch(cmd) as watcher:
            async for found in watcher:
                if as_json:
                    print_json(found)
                else:
                    show(state_line(found))
                    sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a watch ends
        run(driver, work, store)


@app.command()
def migrate(
    store: Store = DEFAULT_STORE,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List pending migrations, apply nothing.")
    ] = False,
) -> None:
    """Create or upgrade a PostgreSQL store's schema (SQLite stores do this when opened)."""
    scheme = store.partition("://")[0].lower()
    if scheme in ("http", "https"):
        fail("migrate works on the database itself; a server migrates its store when it starts", 2)
    if scheme == "sqlite":
        driver = open_store(store, None, must_exist=False)
        path = getattr(driver, "path", "")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        _run(_open_close(driver))
        show(f"SQLite store ready: {escape(str(getattr(driver, 'path', store)))}")
        return
    if scheme not in ("postgres", "postgresql"):
        fail(f"{store!r}: migrate applies to postgresql:// stores", 2)
    _run(_migrate_postgres(store, dry_run))


async def _open_close(driver: Driver) -> None:
    await driver.open()
    await driver.close()


async def _migrate_postgres(url: str, dry_run: bool) -> None:
    import asyncpg

    from flowstate.drivers.postgres import PostgresDriver, migrations

    try:
        driver = PostgresDriver(url)
    except ValidationError as exc:
        fail(str(exc), 2)
    try:
        conn = await asyncpg.connect(driver.dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        fail(f"cannot connect to PostgreSQL: {exc}")
    try:
        table = await conn.fetchval(
            "SELECT to_regclass(quote_ident($1) || '.flowstate_migrations')", driver.schema
        )
        applied: set[int] = set()
        if table is not None:
            rows = await conn.fetch(f'SELECT version FROM "{driver.schema}".flowstate_migrations')
            applied = {row[0] for row in rows}
    finally:
        await conn.close()
    pending = [(version, name) for version, name, _ in migrations() if version not in applied]
    if not pending:
        show(f"schema {escape(driver.schema)} is up to date (version {max(applied)})")
        return
    if dry_run:
        show(f"pending in schema {escape(driver.schema)}:")
        for version, name in pending:
            show(f"  {version}  {escape(name)}")
        return
    with err.status(f"applying {len(pending)} migration(s) to schema {driver.schema}…"):
        try:
            await driver.open()
        except (OSError, asyncpg.PostgresError) as exc:
            fail(f"migration failed: {exc}")
        await driver.close()
    for version, name in pending:
        show(f"applied {version}  {escape(name)}")


def main() -> None:
    """Entry point of the ``flowstate`` console script: whatever goes wrong ends in one
    ``error:`` line, never a traceback."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # a failure no command anticipated: still one line
        with contextlib.suppress(Exception):
            err.print(f"[red]error:[/red] {escape(f'{type(exc).__name__}: {exc}')}", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
