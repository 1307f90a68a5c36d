"""Go-compatible time text: ``time.Duration`` strings and the RFC 3339 (seconds) layout.

Annotations written by the Go engine carry durations in Go's ``Duration.String()`` format and
timestamps in the ``2006-01-02T15:04:05Z07:00`` layout; these helpers read and write both.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

__all__ = ["format_duration", "format_rfc3339", "parse_duration", "parse_rfc3339"]

_NS_PER_US = 1_000
_NS_PER_MS = 1_000_000
_NS_PER_S = 1_000_000_000

# Nanoseconds per unit accepted by Go's time.ParseDuration.
_UNITS: dict[str, int] = {
    "ns": 1,
    "us": _NS_PER_US,
    "\u00b5s": _NS_PER_US,  # micro sign
    "\u03bcs": _NS_PER_US,  # Greek small letter mu
    "ms": _NS_PER_MS,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}

# One component: digits with an optional fraction (at least one digit overall), then a unit
# (a run of characters that are neither digits nor '.').
_COMPONENT = re.compile(r"([0-9]*)(?:\.([0-9]*))?([^0-9.]*)")

_INT64_MAX = (1 << 63) - 1


def _with_fraction(value: int, unit: int) -> str:
    """``value / unit`` in decimal without trailing zeros (``unit`` a power of ten)."""
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    width = len(str(unit)) - 1
    return f"{whole}.{str(rest).rjust(width, '0').rstrip('0')}"


def format_duration(td: timedelta) -> str:
    """Format ``td`` like Go's ``time.Duration.String()`` (``"1h0m0s"``, ``"1.5s"``, ``"0s"``).

    Go durations are nanoseconds, a timedelta has microsecond resolution, so ``ns`` never
    appears. Values beyond Go's range (about 292 years) are formatted the same way.
    """
    ns = ((td.days * 86_400 + td.seconds) * 1_000_000 + td.microseconds) * _NS_PER_US
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < _NS_PER_US:
        return f"{sign}{ns}ns"
    if ns < _NS_PER_MS:
        return f"{sign}{_with_fraction(ns, _NS_PER_US)}\u00b5s"
    if ns < _NS_PER_S:
        return f"{sign}{_with_fraction(ns, _NS_PER_MS)}ms"
    secs, frac = divmod(ns, _NS_PER_S)
    hours, rest = divmod(secs, 3600)
    minutes, seconds = divmod(rest, 60)
    text = _with_fraction(seconds * _NS_PER_S + frac, _NS_PER_S) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _fraction_ns(digits: str, scale: int) -> int:
    """Nanoseconds of ``0.<digits>`` units, rounded the way Go does it.

    Go keeps fraction digits while they fit an int64 and multiplies in float64, so e.g.
    ``"0.3333333333333333333h"`` is exactly 20 minutes; exact arithmetic would give 1 ns less.
    """
    value = 0
    divisor = 1.0
    for ch in digits:
        nxt = value * 10 + (ord(ch) - 48)
        if nxt > _INT64_MAX:
            break
        value = nxt
        divisor *= 10
    return int(float(value) * (float(scale) / divisor))


def parse_duration(s: str) -> timedelta:
    """Parse Go ``time.ParseDuration`` syntax (``"1m30s"``, ``"-1.5h"``, ``"300ms"``, ``"0"``).

    Accepts an optional sign and one or more ``<number><unit>`` components with units ``ns``,
    ``us``, ``µs``, ``μs``, ``ms``, ``s``, ``m``, ``h``. Like Go, the total must fit in an int64
    of nanoseconds. Sub-microsecond parts are truncated (timedelta resolution).
    Raises ValueError when ``s`` is not a valid duration.
    """
    rest = s
    negative = False
    if rest[:1] in ("-", "+"):
        negative = rest[0] == "-"
        rest = rest[1:]
    if rest == "0":
        return timedelta(0)
    if not rest:
        raise ValueError(f"invalid duration {s!r}")
    total = 0
    pos = 0
    while pos < len(rest):
        match = _COMPONENT.match(rest, pos)
        # The pattern always matches (possibly empty), the checks below decide validity.
        assert match is not None
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise ValueError(f"invalid duration {s!r}")
        if not unit:
            raise ValueError(f"missing unit in duration {s!r}")
        scale = _UNITS.get(unit)
        if scale is None:
            raise ValueError(f"unknown unit {unit!r} in duration {s!r}")
        ns = int(whole or "0") * scale
        if frac:
            ns += _fraction_ns(frac, scale)
        total += ns
        if total > _INT64_MAX + 1:
            raise ValueError(f"invalid duration {s!r}")
        pos = match.end()
    if total > _INT64_MAX and not negative:
        raise ValueError(f"invalid duration {s!r}")
    micros = total // _NS_PER_US
    return timedelta(microseconds=-micros if negative else micros)


def format_rfc3339(dt: datetime) -> str:
    """Format ``dt`` in Go's ``2006-01-02T15:04:05Z07:00`` layout (seconds precision).

    ``Z`` for a zero UTC offset, else ``±hh:mm``; naive datetimes are taken as UTC and the
    sub-second part is dropped.
    """
    offset = dt.utcoffset()
    base = (
        f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    )
    if not offset:
        return base + "Z"
    seconds = offset.days * 86_400 + offset.seconds
    sign = "-" if seconds < 0 else "+"
    hours, mins = divmod(abs(seconds) // 60, 60)
    return f"{base}{sign}{hours:02d}:{mins:02d}"


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:[.,]([0-9]+))?(?:(Z)|([+-])([0-9]{2}):([0-9]{2}))"
)


def parse_rfc3339(s: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or ``±hh:mm``, optional fractional seconds).

    Returns an aware datetime keeping the given offset; fractions beyond microseconds are
    truncated. Raises ValueError when ``s`` is not valid.
    """
    match = _RFC3339.fullmatch(s)
    if match is None:
        raise ValueError(f"invalid RFC 3339 time {s!r}")
    year, month, day, hour, minute, second = (int(match.group(i)) for i in range(1, 7))
    frac = match.group(7) or ""
    micros = int(frac[:6].ljust(6, "0")) if frac else 0
    if match.group(8):
        tz: timezone = UTC
    else:
        off_h, off_m = int(match.group(10)), int(match.group(11))
        if off_h > 23 or off_m > 59:
            raise ValueError(f"invalid time zone offset in {s!r}")
        offset = timedelta(hours=off_h, minutes=off_m)
        tz = timezone(-offset if match.group(9) == "-" else offset)
    try:
        return datetime(year, month, day, hour, minute, second, micros, tzinfo=tz)
    except ValueError as exc:
        raise ValueError(f"invalid RFC 3339 time {s!r}: {exc}") from None
