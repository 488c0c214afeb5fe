"""A stream-stream join's keys and time bound, checked from the verb's arguments.

``join(..., on=, left_on=, right_on=, within=)`` of two streams: which columns are
the keys of each side (:func:`stream_join_keys`) and what ``within=`` means as bounds
of ``right_time - left_time`` in microseconds (:func:`stream_join_window`).
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.time.duration import format_duration

__all__ = ["signed_duration", "signed_us", "stream_join_keys", "stream_join_window"]

logger = logging.getLogger("microstream")


def signed_duration(us: int) -> str:
    """A signed bound as a duration: ``-5m``, ``10s``.

    Examples
    --------
    >>> signed_duration(-300_000_000), signed_duration(10_000_000)
    ('-5m', '10s')
    """
    return ("-" if us < 0 else "") + format_duration(abs(us))


def stream_join_keys(
    left: pl.Schema, right: pl.Schema, on: Any, left_on: Any, right_on: Any
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The join key columns of each side, checked: column names, same count, same dtypes."""

    def names(value: Any, what: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, (str, pl.Expr)) else list(value or [])
        out = []
        for item in items:
            if isinstance(item, pl.Expr):
                roots = item.meta.root_names()
                if not item.meta.is_column() or len(roots) != 1:
                    msg = (
                        f"a stream-stream join needs column names as keys ({what}); got the "
                        f"expression {item}: add it as a column with with_columns first"
                    )
                    raise PlanError(msg)
                out.append(roots[0])
            else:
                out.append(str(item))
        return tuple(out)

    if on is not None:
        if left_on is not None or right_on is not None:
            msg = "join: give either on= or left_on= and right_on=, not both"
            raise PlanError(msg)
        keys_left = keys_right = names(on, "on")
    else:
        keys_left, keys_right = names(left_on, "left_on"), names(right_on, "right_on")
    if not keys_left or len(keys_left) != len(keys_right):
        msg = (
            "a stream-stream join needs equality keys on both sides (a cross join of two "
            f"streams has unbounded state); got left keys {list(keys_left)} and right keys "
            f"{list(keys_right)}"
        )
        raise PlanError(msg)
    for side, keys, schema in (("left", keys_left, left), ("right", keys_right, right)):
        missing = [k for k in keys if k not in schema]
        if missing:
            msg = f"join keys {missing} are not columns of the {side} stream {list(schema)}"
            raise PlanError(msg)
    wrong = [
        f"{a} ({left[a]}) vs {b} ({right[b]})"
        for a, b in zip(keys_left, keys_right)
        if left[a] != right[b]
    ]
    if wrong:
        msg = f"join keys must have the same dtype on both sides: {', '.join(wrong)}; cast first"
        raise PlanError(msg)
    return keys_left, keys_right


def stream_join_window(
    within: Any, how: str, left_time: str | None, right_time: str | None
) -> tuple[int | None, int | None]:
    """``within=`` as bounds of ``right_time - left_time`` in microseconds (None: unbounded)."""
    if within is None:
        if how != "inner":
            msg = (
                f"a {how} join of two streams needs a time bound (within=...): its unmatched "
                "rows are emitted when the watermark passes that bound, and without one its "
                "state would grow forever"
            )
            raise PlanError(msg)
        logger.warning(
            "stream-stream inner join without within=: every row of both sides is kept in "
            "state forever; add a time bound to let the watermark evict them"
        )
        return None, None
    if left_time is None or right_time is None:
        side = "left" if left_time is None else "right"
        msg = (
            f"within= needs an event-time column on both sides; the {side} stream has no "
            "with_watermark (or give left_time=/right_time=)"
        )
        raise PlanError(msg)
    if isinstance(within, tuple):
        if len(within) != 2:
            msg = f"within= is a duration or a (lower, upper) pair; got {within!r}"
            raise PlanError(msg)
        lower, upper = (signed_us(v, "within") for v in within)
    else:
        upper = signed_us(within, "within")
        if upper < 0:
            msg = f"within={within!r} as one duration must not be negative"
            raise PlanError(msg)
        lower = -upper
    if lower > upper:
        msg = f"within=({within[0]!r}, {within[1]!r}): the lower bound is above the upper bound"
        raise PlanError(msg)
    return lower, upper


def signed_us(value: Any, name: str) -> int:
    """A duration argument, maybe negative (``"-5m"``), in microseconds.

    Examples
    --------
    >>> signed_us("-5m", "within"), signed_us("1s", "tolerance")
    (-300000000, 1000000)
    """
    from microstream.time.duration import parse_duration

    negative = isinstance(value, str) and value.strip().startswith("-")
    if negative:
        value = value.strip()[1:]
    try:
        delta = parse_duration(value, name=name)
    except ValueError as exc:
        raise PlanError(str(exc)) from None
    us = delta // _ONE_US
    return -us if negative else us


_ONE_US = timedelta(microseconds=1)
