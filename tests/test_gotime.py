"""Go duration strings and the RFC 3339 seconds layout (behaviour.md §1.6, wire.md §5)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowstate.gotime import format_duration, format_rfc3339, parse_duration, parse_rfc3339

# Go's time.Duration range, at timedelta (microsecond) resolution.
GO_MAX_MICROS = ((1 << 63) - 1) // 1000


@pytest.mark.parametrize(
    ("td", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(hours=1), "1h0m0s"),
        (timedelta(minutes=1), "1m0s"),
        (timedelta(minutes=2), "2m0s"),
        (timedelta(minutes=5), "5m0s"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(seconds=45), "45s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(milliseconds=1), "1ms"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(microseconds=1), "1\u00b5s"),
        (timedelta(microseconds=999), "999\u00b5s"),
        (timedelta(milliseconds=100), "100ms"),
        (timedelta(days=1), "24h0m0s"),
        (timedelta(hours=100), "100h0m0s"),
        (timedelta(hours=26, minutes=3, seconds=4, microseconds=5006), "26h3m4.005006s"),
        (timedelta(hours=1, seconds=1), "1h0m1s"),
        (timedelta(seconds=-90), "-1m30s"),
        (timedelta(microseconds=-1), "-1\u00b5s"),
        (timedelta(seconds=-1.5), "-1.5s"),
    ],
)
def test_format_duration(td: timedelta, text: str) -> None:
    assert format_duration(td) == text
    assert parse_duration(text) == td


@pytest.mark.parametrize(
    ("text", "td"),
    [
        ("0", timedelta(0)),
        ("-0", timedelta(0)),
        ("+0", timedelta(0)),
        ("0s", timedelta(0)),
        ("5s", timedelta(seconds=5)),
        ("+5s", timedelta(seconds=5)),
        ("30s", timedelta(seconds=30)),
        ("1478s", timedelta(seconds=1478)),
        ("-5s", timedelta(seconds=-5)),
        ("5.0s", timedelta(seconds=5)),
        ("5.6s", timedelta(seconds=5.6)),
        ("5.s", timedelta(seconds=5)),
        (".5s", timedelta(seconds=0.5)),
        ("1.004s", timedelta(milliseconds=1004)),
        ("100.00100s", timedelta(seconds=100, milliseconds=1)),
        ("1000ns", timedelta(microseconds=1)),
        ("1ns", timedelta(0)),  # below timedelta resolution: truncated
        ("1.5\u00b5s", timedelta(microseconds=1)),
        ("1us", timedelta(microseconds=1)),
        ("1\u00b5s", timedelta(microseconds=1)),
        ("1\u03bcs", timedelta(microseconds=1)),
        ("13ms", timedelta(milliseconds=13)),
        ("3h", timedelta(hours=3)),
        ("10m", timedelta(minutes=10)),
        ("1h0m0s", timedelta(hours=1)),
        ("2h45m", timedelta(hours=2, minutes=45)),
        ("3h30m", timedelta(hours=3, minutes=30)),
        ("10.5s4m", timedelta(minutes=4, seconds=10.5)),
        ("-2m3.4s", -timedelta(minutes=2, seconds=3.4)),
        ("1h2m3s4ms5us6ns", timedelta(hours=1, minutes=2, seconds=3, microseconds=4005)),
        ("39h9m14.425s", timedelta(hours=39, minutes=9, seconds=14.425)),
        ("1h1h", timedelta(hours=2)),
        ("-1.5h", timedelta(hours=-1.5)),
        ("0.3333333333333333333h", timedelta(minutes=20)),
        ("9223372036854775807ns", timedelta(microseconds=GO_MAX_MICROS)),
        ("-9223372036854775808ns", timedelta(microseconds=-GO_MAX_MICROS)),
    ],
)
def test_parse_duration(text: str, td: timedelta) -> None:
    assert parse_duration(text) == td


@pytest.mark.parametrize(
    "text",
    [
        "",
        "-",
        "+",
        "3",
        "-3",
        "s",
        ".",
        "-.",
        ".s",
        "+.s",
        "1x",
        "1d",
        "1.5.5s",
        "1 s",
        " 1s",
        "1s ",
        "1S",
        "1e3s",
        "\u00b5s",
        "1\u00b5",
        "--1s",
        "9223372036854775808ns",
        "2562048h",
        "9223372036854775807ns1ns",
        "-9223372036854775809ns",
        "\u0661s",  # non-ASCII digit
    ],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@given(st.integers(min_value=-GO_MAX_MICROS, max_value=GO_MAX_MICROS))
def test_duration_round_trip(micros: int) -> None:
    td = timedelta(microseconds=micros)
    assert parse_duration(format_duration(td)) == td


@pytest.mark.parametrize(
    ("dt", "text"),
    [
        (datetime(2000, 1, 1, 0, 15, tzinfo=UTC), "2000-01-01T00:15:00Z"),
        (datetime(2000, 1, 1, 0, 15, 0, 999_999, tzinfo=UTC), "2000-01-01T00:15:00Z"),
        (datetime(2000, 1, 1), "2000-01-01T00:00:00Z"),
        (datetime(1, 2, 3, 4, 5, 6, tzinfo=UTC), "0001-02-03T04:05:06Z"),
        (
            datetime(2024, 2, 29, 23, 59, 59, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2024-02-29T23:59:59+05:30",
        ),
        (
            datetime(2024, 12, 31, 1, 2, 3, tzinfo=timezone(timedelta(hours=-8))),
            "2024-12-31T01:02:03-08:00",
        ),
        (
            datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
            "2024-01-01T00:00:00-03:30",
        ),
        (datetime(2024, 1, 1, tzinfo=timezone(timedelta(0))), "2024-01-01T00:00:00Z"),
    ],
)
def test_format_rfc3339(dt: datetime, text: str) -> None:
    assert format_rfc3339(dt) == text


@pytest.mark.parametrize(
    ("text", "dt"),
    [
        ("2000-01-01T00:15:00Z", datetime(2000, 1, 1, 0, 15, tzinfo=UTC)),
        ("2000-01-01T00:15:00.5Z", datetime(2000, 1, 1, 0, 15, 0, 500_000, tzinfo=UTC)),
        (
            "2000-01-01T00:15:00.123456789Z",
            datetime(2000, 1, 1, 0, 15, 0, 123_456, tzinfo=UTC),
        ),
        (
            "2006-01-02T15:04:05-07:00",
            datetime(2006, 1, 2, 22, 4, 5, tzinfo=UTC),
        ),
        ("2006-01-02T15:04:05+00:00", datetime(2006, 1, 2, 15, 4, 5, tzinfo=UTC)),
        ("2006-01-02T15:04:05-00:00", datetime(2006, 1, 2, 15, 4, 5, tzinfo=UTC)),
    ],
)
def test_parse_rfc3339(text: str, dt: datetime) -> None:
    parsed = parse_rfc3339(text)
    assert parsed.tzinfo is not None
    assert parsed == dt


def test_parse_rfc3339_keeps_offset() -> None:
    parsed = parse_rfc3339("2024-02-29T23:59:59+05:30")
    assert parsed.utcoffset() == timedelta(hours=5, minutes=30)
    assert format_rfc3339(parsed) == "2024-02-29T23:59:59+05:30"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2000-01-01",
        "2000-01-01T00:15:00",
        "2000-01-01 00:15:00Z",
        "2000-01-01T00:15Z",
        "2000-1-01T00:15:00Z",
        "2000-01-01T00:15:00+0100",
        "2000-01-01T00:15:00+01",
        "2000-01-01T00:15:00.Z",
        "2000-13-01T00:00:00Z",
        "2000-02-30T00:00:00Z",
        "2000-01-01T24:00:00Z",
        "2000-01-01T00:60:00Z",
        "2000-01-01T00:00:60Z",
        "2000-01-01T00:00:00+24:00",
        "2000-01-01T00:00:00+01:60",
        "0000-01-01T00:00:00Z",
        "2000-01-01T00:15:00Z ",
        "2000-01-01T00:15:00Zjunk",
    ],
)
def test_parse_rfc3339_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rfc3339(text)


aware_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.just(UTC)
    | st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59).map(
        lambda m: timezone(timedelta(minutes=m))
    ),
)


@given(aware_datetimes)
def test_rfc3339_round_trip(dt: datetime) -> None:
    parsed = parse_rfc3339(format_rfc3339(dt))
    assert parsed == dt.replace(microsecond=0)
    assert parsed.utcoffset() == dt.utcoffset()
