"""A server whose SQLite store sits on a full disk (a real 2 MiB tmpfs): every write answers
507 ``resource_exhausted`` with a message that says the disk is full, reads keep working, a
NetDriver raises StoreFullError, and once space is freed the next commit succeeds with nothing
acknowledged lost. Skipped where a tmpfs cannot be mounted (failed instead under CI=true).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import flowstate as fs
from flowstate.drivers.sqlite import SqliteDriver
from flowstate.wire import codec
from tests import mounts, netserver


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for this test only."""
    with mounts.tmpfs(tmp_path / "disk", 2) as mnt:
        yield mnt


def fill(mnt: Path) -> Path:
    """Write a file until the disk has no byte left; returns it (remove it to free space)."""
    filler = mnt / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == 28, exc  # ENOSPC
    finally:
        os.close(fd)
    return filler


def ctx_of(state_id: str, payload: int = 0) -> fs.StateCtx:
    return fs.StateCtx(current=fs.State(id=state_id, annotations={"pad": "p" * payload}))


class Client:
    """Raw Driver calls over HTTP in one body kind; answers are (status, code, message)."""

    def __init__(self, http: httpx.Client, kind: str) -> None:
        self.http = http
        self.json = kind == "json"

    def call(self, method: str, cmd: fs.Command) -> tuple[int, str, str]:
        headers = {"content-type": "application/json" if self.json else "application/proto"}
        body = codec.encode_command(cmd, json=self.json)
        r = self.http.post(f"/flowstate.v1.Driver/{method}", content=body, headers=headers)
        if r.status_code == 200:
            return 200, "", ""
        code, message = codec.decode_error(r.content, json=self.json)
        return r.status_code, code, message

    def stored_ids(self) -> list[str]:
        cmd = fs.get_states(limit=10_000)
        body = codec.encode_command(cmd, json=self.json)
        headers = {"content-type": "application/json" if self.json else "application/proto"}
        r = self.http.post("/flowstate.v1.Driver/GetStates", content=body, headers=headers)
        assert r.status_code == 200, r.content
        answer = codec.decode_command(r.content, json=self.json)
        assert isinstance(answer, fs.GetStatesCmd) and answer.result is not None
        assert not answer.result.more
        return [s.id for s in answer.result.states]


def assert_full(answer: tuple[int, str, str]) -> None:
    status, code, message = answer
    assert (status, code) == (507, "resource_exhausted"), answer
    assert "disk is full" in message and "nothing was stored" in message, message


@pytest.mark.parametrize("kind", ["json", "proto"])
async def test_writes_on_a_full_disk_are_507_and_nothing_acknowledged_is_lost(
    small_disk: Path, kind: str
) -> None:
    server = netserver.serve(SqliteDriver(small_disk / "store.db"))
    try:
        await check_full_disk(server.url, small_disk, kind)
    finally:
        server.stop()  # before the disk is unmounted


async def check_full_disk(url: str, small_disk: Path, kind: str) -> None:
    acknowledged: list[str] = []
    with httpx.Client(base_url=url, timeout=60.0) as http:
        client = Client(http, kind)
        for i in range(3):
            assert client.call("Commit", fs.commit(fs.park(ctx_of(f"before-{i}"))))[0] == 200
            acknowledged.append(f"before-{i}")
        filler = fill(small_disk)

        # SQLite may still have room in pages and WAL frames it already owns: commit until the
        # disk refuses (each commit needs ~20 kB; the whole disk is 2 MiB).
        refused = None
        for i in range(200):
            answer = client.call("Commit", fs.commit(fs.park(ctx_of(f"full-{i}", 20_000))))
            if answer[0] != 200:
                refused = answer
                break
            acknowledged.append(f"full-{i}")
        assert refused is not None, "the full disk took 200 commits of 20 kB"
        assert_full(refused)

        # every write is refused the same way, and changes nothing
        assert_full(client.call("Commit", fs.commit(fs.park(ctx_of("again", 20_000)))))
        with_data = ctx_of("data")
        with_data.datas["blob"] = fs.Data(blob=b"b" * 50_000)
        assert_full(client.call("StoreData", fs.store_data(with_data, "blob")))
        delay = fs.delay_until(ctx_of("delayed", 50_000), "later", fs.SystemClock().now())
        assert_full(client.call("Delay", delay))

        # reads still work, and a NetDriver raises the error as StoreFullError
        assert client.stored_ids() == acknowledged
        assert http.get("/health").status_code == 200
        net = fs.NetDriver(url)
        try:
            with pytest.raises(fs.StoreFullError, match="disk is full") as caught:
                await net.commit(fs.commit(fs.park(ctx_of("net", 20_000))))
            assert isinstance(caught.value, fs.StoreUnavailableError)  # retryable, as before
        finally:
            await net.close()

        # space freed: the next commit succeeds, and everything acknowledged is still there
        filler.unlink()
        assert client.call("Commit", fs.commit(fs.park(ctx_of("after", 20_000))))[0] == 200
        assert client.stored_ids() == [*acknowledged, "after"]


def test_store_full_maps_to_507_and_back() -> None:
    """The mapping both ways: the server's answer, and the client's exception for it."""
    from flowstate.server import connect

    err = connect.error_of(fs.StoreFullError("the disk is full"))
    assert (err.code, err.status) == ("resource_exhausted", 507)
    back = connect.exception_of(
        connect.decode_error(connect.encode_error(err, json_body=False), json_body=False)
    )
    assert isinstance(back, fs.StoreFullError) and str(back) == "the disk is full"
    # other write failures stay 503, and a body over the size limit (413) is no full store
    assert connect.error_of(fs.StoreWriteError("I/O error")).status == 503
    too_big = connect.WireErrorBody("resource_exhausted", "request body exceeds the limit", 413)
    assert not isinstance(connect.exception_of(too_big), fs.StoreUnavailableError)


# ---------------------------------------------------------------------------------------------
# PostgreSQL: SQLSTATE class 53 (insufficient resources). The shared server's disk cannot be
# filled; temp_file_limit=0 with the smallest work_mem makes any statement that needs a
# temporary file fail for real with 53400 (configuration_limit_exceeded).


def test_postgres_insufficient_resources_are_store_errors() -> None:
    """53100 disk_full and 53400 configuration_limit_exceeded: no room, 507; 53000 and 53200
    out_of_memory pass: 503, retryable."""
    asyncpg = pytest.importorskip("asyncpg")
    from flowstate.drivers.postgres import _resource_error
    from flowstate.server import connect

    cases = [
        (asyncpg.exceptions.DiskFullError, "write", fs.StoreFullError, 507),
        (asyncpg.exceptions.DiskFullError, "read", fs.StoreFullError, 507),
        (asyncpg.exceptions.ConfigurationLimitExceededError, "read", fs.StoreFullError, 507),
        (asyncpg.exceptions.OutOfMemoryError, "write", fs.StoreWriteError, 503),
        (asyncpg.exceptions.OutOfMemoryError, "read", fs.StoreUnavailableError, 503),
        (asyncpg.exceptions.InsufficientResourcesError, "write", fs.StoreWriteError, 503),
    ]
    for cls, what, expected, status in cases:
        error = _resource_error(cls("could not extend file: No space left on device"), what)
        assert type(error) is expected, (cls, what, error)
        assert cls.sqlstate in str(error) and "No space left" in str(error)
        assert connect.error_of(error).status == status
        if what == "write":
            assert "nothing was stored" in str(error)


@pytest.mark.parametrize("kind", ["json", "proto"])
async def test_postgres_temp_file_limit_is_507_and_stores_nothing(kind: str) -> None:
    pytest.importorskip("asyncpg")
    from flowstate.drivers.postgres import PostgresDriver
    from tests import pgutil

    pgutil.require()
    schema = pgutil.new_schema()
    seed = PostgresDriver(pgutil.dsn_for(schema))
    async with fs.Engine(seed, fs.FlowRegistry(), recovery=False, delayer=False) as engine:
        ctxs = [ctx_of(f"s{i}", 200) for i in range(1000)]
        await engine.do(fs.commit(*[fs.park(c) for c in ctxs]))
        head = await seed.head_rev()

    limited = pgutil.dsn_for(schema) + "&temp_file_limit=0&work_mem=64"  # server settings
    server = netserver.serve(PostgresDriver(limited))
    with httpx.Client(base_url=server.url, timeout=60.0) as http:
        client = Client(http, kind)
        read = client.call("GetStates", fs.get_states(limit=10_000))
        big = fs.commit(*[fs.park(ctx_of(f"t{i}", 200)) for i in range(1000)])
        write = client.call("Commit", big)
    for status, code, message in (read, write):
        assert (status, code) == (507, "resource_exhausted"), (status, code, message)
        assert "temp_file_limit" in message and "53400" in message, message
    assert "nothing was stored" in write[2]

    check = PostgresDriver(pgutil.dsn_for(schema))
    await check.open()
    try:
        assert await check.head_rev() == head
    finally:
        await check.close()
