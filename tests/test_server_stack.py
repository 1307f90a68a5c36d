"""The HTTP stack under the server: one h2c connection carries many streams, and a request
answered before its body was read (401, 413, 404, 405, 400) ends only its own stream, never
the connection and the other requests on it (issue 14, item 4)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

import flowstate as fs
from flowstate.drivers.net import NetDriver
from flowstate.wire import codec
from tests import netserver

DRIVER = "/flowstate.v1.Driver/"
SMALL = 200  # concurrent small requests beside the refused one


def _commit_body(i: int) -> bytes:
    return codec.encode_command(fs.commit(fs.park(fs.StateCtx(current=fs.State(f"h2-{i}")))))


async def _burst(
    url: str, refused: tuple[str, str, dict[str, str], bytes], auth: dict[str, str]
) -> tuple[list[int], int]:
    """SMALL commits and one refused request, all at once on one h2c connection."""
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(
        base_url=url, http1=False, http2=True, limits=limits, timeout=60.0
    ) as http:
        method, path, headers, body = refused

        async def small(i: int) -> int:
            r = await http.post(DRIVER + "Commit", content=_commit_body(i), headers=auth)
            assert r.http_version == "HTTP/2"
            return r.status_code

        async def bad() -> int:
            await asyncio.sleep(0)
            r = await http.request(method, path, content=body, headers=headers)
            return r.status_code

        results = await asyncio.gather(
            *(small(i) for i in range(SMALL // 2)),
            bad(),
            *(small(i) for i in range(SMALL // 2, SMALL)),
        )
        refused_status = results[SMALL // 2]
        oks = list(results[: SMALL // 2]) + list(results[SMALL // 2 + 1 :])
        # the connection still serves afterwards
        r = await http.post(
            DRIVER + "GetStates", content=codec.encode_command(fs.get_states()), headers=auth
        )
        oks.append(r.status_code)
        return oks, refused_status


BIG = b"\x00" * (256 * 1024)  # over the 64 KiB cap below, more than one h2 window


@pytest.mark.parametrize(
    ("refused", "status"),
    [
        (("POST", DRIVER + "Commit", {}, BIG), 413),
        (("POST", DRIVER + "Commit", {"content-type": "text/plain"}, BIG[:1000]), 415),
        (("POST", DRIVER + "NoSuchMethod", {}, BIG[:50_000]), 404),
        (("PUT", DRIVER + "Commit", {}, BIG[:50_000]), 405),
        (("POST", "/nothing/here", {}, BIG[:50_000]), 404),
        (("POST", DRIVER + "Commit", {}, b"\xff" * 50_000), 400),
    ],
    ids=["413", "415", "404-method", "405", "404-path", "400"],
)
async def test_an_early_refusal_ends_only_its_own_h2_stream(
    refused: tuple[str, str, dict[str, str], bytes], status: int
) -> None:
    server = netserver.serve(fs.MemoryDriver(), max_body=64 * 1024)
    oks, got = await _burst(server.url, refused, {})
    assert got == status
    assert oks == [200] * (SMALL + 1)


async def test_a_refused_token_ends_only_its_own_h2_stream() -> None:
    server = netserver.serve(fs.MemoryDriver(), token="t")
    auth = {"authorization": "Bearer t"}
    refused = ("POST", DRIVER + "Commit", {"authorization": "Bearer wrong"}, BIG[:50_000])
    oks, got = await _burst(server.url, refused, auth)
    assert got == 401
    assert oks == [200] * (SMALL + 1)


async def test_net_driver_h2_commits_survive_an_oversize_commit() -> None:
    """The report of issue 14: one oversize commit among many concurrent small ones over
    ``NetDriver(http2=True)`` must fail alone (413), not turn the others into
    CommitUnknownError."""
    server = netserver.serve(fs.MemoryDriver(), max_body=64 * 1024)
    net = NetDriver(server.url, http2=True)
    async with fs.Engine(net, recovery=False, delayer=False) as engine:

        async def small(i: int) -> None:
            await engine.do(fs.commit(fs.park(fs.StateCtx(current=fs.State(f"s{i}")))))

        async def big() -> None:
            ctx = fs.StateCtx(current=fs.State("big", annotations={"blob": "x" * 100_000}))
            await engine.do(fs.commit(fs.park(ctx)))

        results = await asyncio.gather(
            *(small(i) for i in range(150)),
            big(),
            *(small(i) for i in range(150, 300)),
            return_exceptions=True,
        )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1, failed[:3]
    assert not isinstance(failed[0], fs.CommitUnknownError), failed[0]
