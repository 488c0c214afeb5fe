"""Event-time windows on an unbounded stream: the Window protocol, assignment, time conversions.

A row at event time ``t`` belongs to every window ``[k*every + offset,
k*every + offset + period)`` that contains it (Spark's ``window(col, period,
every)``), not to windows that start at the first row as Polars' batch
``group_by_dynamic(start_by="window")`` does: a stream has no first row.
Bounds are half-open, ``[start, end)``. Times are handled as microseconds
since the epoch and converted back to the column's dtype on output.

A window kind is a :class:`Window`: the aggregation operator keeps a window's
state under its bounds ``__start``/``__end`` and closes it when the watermark
passes its end, so a new kind (``time/cumulate.py``) only says which windows a
row falls in and how they show in the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import polars as pl

from microstream.exceptions import EventTimeError, PlanError
from microstream.time.duration import format_duration

__all__ = [
    "SessionSpec",
    "Window",
    "WindowSpec",
    "check_window_ends",
    "from_us",
    "max_time_us",
    "time_dtype_check",
    "to_us",
]

START, END = "__start", "__end"
LOWER, UPPER = "_lower_boundary", "_upper_boundary"
_YEAR_10000_US = 253_402_300_800_000_000
T = "__t"


class Window(Protocol):
    """What the aggregation operator needs of a window kind.

    State is keyed by the window's bounds in microseconds (``__start``,
    ``__end``); a window closes when the watermark passes its ``__end``.
    """

    @property
    def column(self) -> str:
        """The event-time column the windows are over."""

    @property
    def max_span_us(self) -> int:
        """The longest window (end minus start), in microseconds: how far an emitted
        row's time (its window start) trails the watermark that emitted it."""

    def assign(self, df: pl.DataFrame, time_dtype: pl.DataType | None = None) -> pl.DataFrame:
        """One row per (row, window) pair of ``df`` (event time in ``__t``, microseconds),
        with ``__start``/``__end``; raises :class:`EventTimeError` for a window that
        would end past what ``time_dtype`` holds."""

    def output_columns(self, dtype: pl.DataType) -> dict[str, pl.DataType]:
        """The output columns that show the window, in order (``dtype``: the time column's)."""

    def output_exprs(self, dtype: pl.DataType) -> list[pl.Expr]:
        """Those columns, computed from ``__start``/``__end``."""

    def key_columns(self) -> tuple[str, ...]:
        """The output columns that identify a window (before the group keys)."""

    def bounds_us(self) -> tuple[pl.Expr, pl.Expr]:
        """``__start`` and ``__end`` recovered from an emitted row's columns."""

    def describe(self) -> str:
        """One line for ``explain()``."""

    def fingerprint(self) -> str:
        """The window in the checkpoint's plan record: a change is a changed plan."""


@dataclass(frozen=True)
class WindowSpec:
    """Tumbling (``period == every``) or sliding (``period > every``) windows.

    The output shows a window by its start in the time column (its end is the start
    plus ``period``), after ``_lower_boundary``/``_upper_boundary`` with
    ``include_boundaries``.
    """

    column: str
    every_us: int
    period_us: int
    offset_us: int = 0
    include_boundaries: bool = False

    @property
    def max_span_us(self) -> int:
        return self.period_us

    def describe(self) -> str:
        kind = "tumbling" if self.period_us == self.every_us else "sliding"
        return (
            f"{kind} window on {self.column!r} every={format_duration(self.every_us)} "
            f"period={format_duration(self.period_us)} offset={format_duration(self.offset_us)}"
        )

    def fingerprint(self) -> str:
        # What checkpoints written before the Window protocol recorded: keep it so.
        return self.describe()

    def output_columns(self, dtype: pl.DataType) -> dict[str, pl.DataType]:
        bounds = {LOWER: dtype, UPPER: dtype} if self.include_boundaries else {}
        return {**bounds, self.column: dtype}

    def output_exprs(self, dtype: pl.DataType) -> list[pl.Expr]:
        start = from_us(pl.col(START), dtype)
        if not self.include_boundaries:
            return [start.alias(self.column)]
        return [
            start.alias(LOWER),
            from_us(pl.col(END), dtype).alias(UPPER),
            start.alias(self.column),
        ]

    def key_columns(self) -> tuple[str, ...]:
        # The start fixes the window: every window is ``period`` long.
        return (self.column,)

    def bounds_us(self) -> tuple[pl.Expr, pl.Expr]:
        start = to_us(self.column)
        return start.alias(START), (start + self.period_us).alias(END)

    def assign(self, df: pl.DataFrame, time_dtype: pl.DataType | None = None) -> pl.DataFrame:
        """One row per (row, window) pair, with ``__start``/``__end`` in microseconds.

        Raises
        ------
        EventTimeError
            A row's window would end past the largest time ``time_dtype`` holds
            (year 2262 for nanoseconds): such a window could never be emitted.

        Examples
        --------
        >>> import polars as pl
        >>> spec = WindowSpec("t", every_us=10, period_us=30)
        >>> spec.assign(pl.DataFrame({"__t": [25]})).sort("__start").rows()
        [(25, 0, 30), (25, 10, 40), (25, 20, 50)]
        """
        every, period, offset = self.every_us, self.period_us, self.offset_us
        last_start = ((pl.col(T) - offset) // every) * every + offset
        check_window_ends(df, self.column, last_start, period, time_dtype)
        if period == every:
            return df.with_columns(last_start.alias(START)).with_columns(
                (pl.col(START) + period).alias(END)
            )
        count = -(-period // every)  # ceil
        return (
            df.with_columns(last_start.alias(START), pl.int_ranges(0, count).alias("__j"))
            .explode("__j")
            .with_columns((pl.col(START) - pl.col("__j") * every).alias(START))
            .with_columns((pl.col(START) + period).alias(END))
            .filter(pl.col(END) > pl.col(T))
            .drop("__j")
        )


def check_window_ends(
    df: pl.DataFrame,
    column: str,
    last_start: pl.Expr,
    span_us: int,
    time_dtype: pl.DataType | None,
) -> None:
    """Refuse rows whose last window, starting at ``last_start`` (an expression of
    ``__t``) and ``span_us`` long, would end past what ``time_dtype`` holds.

    Raises
    ------
    EventTimeError
        Such a window could never be emitted; the message names the first such row.

    Examples
    --------
    >>> import polars as pl
    >>> rows = pl.DataFrame({"__t": [max_time_us(pl.Datetime("ns")) - 5]})
    >>> check_window_ends(rows, "ts", pl.col("__t"), 1, pl.Datetime("us"))  # fits
    >>> check_window_ends(rows, "ts", pl.col("__t"), 10, pl.Datetime("ns"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    microstream.exceptions.EventTimeError: group_by_dynamic on 'ts': ...
    """
    # The last window of a row ends latest; past the dtype's range it would overflow.
    # Window starts grow with the time: only when the latest row's does is there any.
    limit = max_time_us(time_dtype) - span_us
    latest = df.get_column(T).max()
    if latest is None:
        return
    latest_start = pl.DataFrame({T: [latest]}, schema={T: pl.Int64}).select(last_start).item()
    if latest_start <= limit:
        return
    beyond = df.filter(last_start > limit)
    if beyond.height == 0:
        return
    us = beyond.get_column(T).head(1).item()
    # Polars formats times to year 9999 only; further out, the microseconds say it.
    value = (
        beyond.get_column(column).head(1).cast(pl.String).item()
        if column in beyond.columns and us < _YEAR_10000_US
        else f"{us} microseconds since the epoch"
    )
    msg = (
        f"group_by_dynamic on {column!r}: the row with {column}={value} belongs to a window ending after the largest time "
        f"a {time_dtype or pl.Datetime('us')} column holds ({beyond.height} row(s) in this "
        "batch); the window could never be emitted. Filter such rows out before the "
        "aggregation"
    )
    if isinstance(time_dtype, pl.Datetime) and time_dtype.time_unit == "ns":
        msg += f", or cast {column!r} to pl.Datetime('us'), which reaches year 294247"
    raise EventTimeError(msg)


def max_time_us(dtype: pl.DataType | None) -> int:
    """The largest time, in microseconds since the epoch, that ``dtype`` can hold.

    Examples
    --------
    >>> max_time_us(pl.Datetime("ns"))
    9223372036854775
    """
    if isinstance(dtype, pl.Datetime) and dtype.time_unit == "ns":
        return (2**63 - 1) // 1000
    return 2**63 - 1


@dataclass(frozen=True)
class SessionSpec:
    """Session windows: a session closes ``gap`` after its last event."""

    column: str
    gap_us: int

    def describe(self) -> str:
        return f"session window on {self.column!r} gap={format_duration(self.gap_us)}"


def time_dtype_check(schema: pl.Schema, column: str, verb: str) -> pl.DataType:
    """The event-time column's dtype, which must be a Datetime or a Date."""
    if column not in schema:
        msg = f"{verb}: no column {column!r}; columns are {list(schema.names())}"
        raise PlanError(msg)
    dtype = schema[column]
    if not isinstance(dtype, (pl.Datetime, pl.Date)):
        msg = (
            f"{verb}: the event-time column {column!r} must be a Datetime or Date; it is "
            f"{dtype}. Convert it first, e.g. with_columns(pl.from_epoch({column!r}, 'ms'))"
        )
        raise PlanError(msg)
    return dtype


def to_us(column: str) -> pl.Expr:
    """Microseconds since the epoch of a Datetime or Date column."""
    return pl.col(column).dt.epoch("us")


def from_us(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """Microseconds since the epoch back to ``dtype`` (Datetime of any unit/zone, Date)."""
    as_datetime = pl.from_epoch(expr, time_unit="us")
    if isinstance(dtype, pl.Date):
        return as_datetime.cast(pl.Date)
    assert isinstance(dtype, pl.Datetime)
    if dtype.time_zone is not None:
        as_datetime = as_datetime.dt.replace_time_zone("UTC").dt.convert_time_zone(dtype.time_zone)
    return as_datetime.dt.cast_time_unit(dtype.time_unit or "us")
