"""The HTTP/1.1 transport wrapper that sends a response's head and body in one write."""

from __future__ import annotations

import asyncio
from typing import Any

from flowstate.server.run import CoalescedWrites


class _Recorder:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str) -> Any:
        return f"info:{name}"


async def _turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_turn_leave_as_one() -> None:
    inner = _Recorder()
    t = CoalescedWrites(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"HTTP/1.1 200 OK\r\n\r\n")
    t.write(b"body")
    assert inner.writes == []
    await _turn()
    assert inner.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
    t.write(b"next")
    await _turn()
    assert inner.writes[-1] == b"next"
    assert t.get_extra_info("peername") == "info:peername"  # the rest is the transport's


async def test_close_sends_what_is_pending_first_and_abort_drops_it() -> None:
    inner = _Recorder()
    t = CoalescedWrites(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"408 answer")
    t.close()
    assert inner.writes == [b"408 answer"] and inner.closed
    await _turn()  # the scheduled flush finds nothing more to send
    assert inner.writes == [b"408 answer"]

    inner = _Recorder()
    t = CoalescedWrites(inner, asyncio.get_running_loop())  # type: ignore[arg-type]
    t.write(b"never sent")
    t.abort()
    await _turn()
    assert inner.writes == [] and inner.aborted
