"""Durations as users write them: ``"5s"``, ``"100ms"``, ``"1m30s"``, timedeltas."""

from __future__ import annotations

import re
from datetime import timedelta

__all__ = ["format_duration", "parse_duration"]

_UNITS_US = {
    "us": 1,
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "w": 604_800_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s|m|h|d|w)")


def parse_duration(value: str | timedelta | float, *, name: str = "duration") -> timedelta:
    """Parse a duration string, a timedelta, or a number of seconds.

    Strings use Polars' duration units (``us``, ``ms``, ``s``, ``m``, ``h``, ``d``,
    ``w``), concatenated: ``"1m30s"``.

    Parameters
    ----------
    value
        The duration.
    name
        The argument's name, for the error message.

    Raises
    ------
    ValueError
        If the value is negative or not a duration.

    Examples
    --------
    >>> parse_duration("1m30s")
    datetime.timedelta(seconds=90)
    >>> parse_duration("250ms").total_seconds()
    0.25
    >>> parse_duration(2)
    datetime.timedelta(seconds=2)
    """
    if isinstance(value, timedelta):
        result = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = timedelta(seconds=value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        pos, micros = 0, 0.0
        for match in _PART.finditer(text):
            if match.start() != pos:
                break
            micros += float(match.group(1)) * _UNITS_US[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            msg = (
                f"{name} must be a duration such as '5s', '100ms' or '1m30s' "
                f"(units us, ms, s, m, h, d, w); got {value!r} instead"
            )
            raise ValueError(msg)
        result = timedelta(microseconds=round(micros))
    else:
        msg = f"{name} must be a str, timedelta or number of seconds; got {value!r} instead"
        raise TypeError(msg)
    if result < timedelta(0):
        msg = f"{name} must not be negative; got {value!r} instead"
        raise ValueError(msg)
    return result


def format_duration(micros: int) -> str:
    """A duration in microseconds as the shortest string :func:`parse_duration` reads back.

    Examples
    --------
    >>> format_duration(90_000_000)
    '1m30s'
    >>> format_duration(250_000), format_duration(0)
    ('250ms', '0s')
    """
    if micros == 0:
        return "0s"
    sign, rest, parts = ("-" if micros < 0 else ""), abs(micros), []
    for unit in ("w", "d", "h", "m", "s", "ms", "us"):
        size = _UNITS_US[unit]
        if rest >= size:
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return sign + "".join(parts)
