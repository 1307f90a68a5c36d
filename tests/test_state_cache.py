"""The server's cache of encoded stored versions (flowstate.wire.state_cache)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

import flowstate as fs
from flowstate.wire.binary import close_message, open_message, write_state
from flowstate.wire.state_cache import EncodedStates

T0 = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def _state(i: int, *, big: int = 0, at: datetime = T0) -> fs.State:
    return fs.State(
        id=f"s-{i:04d}",
        rev=i + 1,
        labels={"k": str(i % 3)},
        annotations={"n": f"{i:04d}", "big": "x" * big},
        committed_at=at,
        transition=fs.Transition("to", {"a": "b"}),
    )


def _plain(state: fs.State) -> bytes:
    """The entry of ``state`` in a GetStates answer, by the plain encoder."""
    out = bytearray()
    start = open_message(out, 0x0A)
    write_state(out, state)
    close_message(out, start)
    return bytes(out)


TEXT = st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=8)
KEY = TEXT.filter(bool)


@settings(max_examples=200)
@given(
    st.builds(
        fs.State,
        id=TEXT,
        rev=st.integers(0, 2**40),
        annotations=st.dictionaries(KEY, TEXT, max_size=3),
        labels=st.dictionaries(KEY, TEXT, max_size=3),
        committed_at=st.none() | st.just(T0),
        transition=st.builds(fs.Transition, TEXT, st.dictionaries(KEY, TEXT, max_size=2)),
    )
)
def test_cached_bytes_are_the_plain_encoding(state: fs.State) -> None:
    cache = EncodedStates()
    for _ in range(2):  # a miss, then (for a stored version) a hit
        out = bytearray(b"prefix")
        cache.write_entry(out, state)
        assert bytes(out) == b"prefix" + _plain(state)
        assert cache.size(state) == len(_plain(state))


def test_a_second_read_is_a_hit_and_a_new_version_a_miss() -> None:
    cache = EncodedStates()
    out = bytearray()
    cache.write_entry(out, _state(1))
    cache.write_entry(out, _state(1))
    assert (cache.hits, cache.misses) == (1, 1)
    # the same id and rev committed at another time: another store, or the store recreated
    other = _state(1, at=T0 + timedelta(milliseconds=1))
    other.annotations["n"] = "changed"
    out = bytearray()
    cache.write_entry(out, other)
    assert bytes(out) == _plain(other)
    assert cache.misses == 2


def test_versions_never_stored_are_not_kept() -> None:
    cache = EncodedStates()
    cache.write_entry(bytearray(), fs.State(id="new"))
    assert len(cache) == 0 and cache.nbytes == 0


def test_bounded_in_bytes_oldest_out_first() -> None:
    entry = len(_plain(_state(0, big=1000)))
    cache = EncodedStates(max_bytes=10 * entry, max_entry=2 * entry)
    for i in range(100):
        cache.write_entry(bytearray(), _state(i, big=1000))
        assert cache.nbytes <= cache.max_bytes
    assert len(cache) == 10
    hits = cache.hits
    cache.write_entry(bytearray(), _state(99, big=1000))  # among the newest: kept
    cache.write_entry(bytearray(), _state(0, big=1000))  # the oldest: evicted
    assert cache.hits == hits + 1


def test_a_big_version_is_encoded_each_time_and_not_kept() -> None:
    cache = EncodedStates(max_bytes=1 << 20, max_entry=4096)
    big = _state(1, big=10_000)
    for _ in range(2):
        out = bytearray()
        cache.write_entry(out, big)
        assert bytes(out) == _plain(big)
    assert len(cache) == 0 and cache.hits == 0


async def test_the_server_answers_repeated_pages_from_its_cache_byte_for_byte() -> None:
    from tests.netserver import serve

    backing = fs.MemoryDriver()
    server = serve(backing)
    net = fs.NetDriver(server.url)
    await net.open()
    try:
        for i in range(5):
            await net.commit(fs.commit(fs.park(fs.StateCtx(current=_state(i)))))
        first = await net.get_states(fs.get_states())
        second = await net.get_states(fs.get_states())
        assert [s.id for s in first.states] == [f"s-{i:04d}" for i in range(5)]
        assert first.states == second.states
        assert first.states == (await backing.get_states(fs.get_states())).states
        cache = server.app.rpc.encoded
        assert cache.hits >= 5
    finally:
        await net.close()
