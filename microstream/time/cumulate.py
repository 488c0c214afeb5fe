"""Cumulative windows (Flink's CUMULATE): windows that grow by a step up to a maximum size.

Time is cut into max-size windows ``[k*max + offset, (k+1)*max + offset)``; each has
``max / step`` cumulative windows, ``[k*max + offset, k*max + offset + j*step)`` for
``j = 1 .. max/step``, sharing its start. A row is in every window of its max-size
window whose end is after it, so the window ending first holds the rows of one
step, and the last one all of the max-size window's rows. Each window closes, and
is emitted in append mode, when the watermark passes its own end: a per-minute
running total of the day is emitted minute by minute, not at midnight.

Windows of a max-size window share their start, so the output shows both bounds:
``_lower_boundary``, ``_upper_boundary`` and the time column holding the start.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from microstream.exceptions import PlanError
from microstream.time.duration import format_duration
from microstream.time.windows import (
    END,
    LOWER,
    START,
    UPPER,
    T,
    check_window_ends,
    from_us,
    to_us,
)

__all__ = ["CumulativeWindow"]


@dataclass(frozen=True)
class CumulativeWindow:
    """Cumulative windows of ``step_us`` steps up to ``max_us`` (a multiple of the step).

    Raises
    ------
    PlanError
        The step is not positive, or the maximum size is not a multiple of it.

    Examples
    --------
    >>> import polars as pl
    >>> window = CumulativeWindow("ts", step_us=10, max_us=30)
    >>> window.assign(pl.DataFrame({"__t": [12, 35]})).rows()
    [(12, 0, 20), (12, 0, 30), (35, 30, 40), (35, 30, 50), (35, 30, 60)]
    >>> window.describe()
    "cumulative window on 'ts' step=10us max=30us offset=0s"
    """

    column: str
    step_us: int
    max_us: int
    offset_us: int = 0

    def __post_init__(self) -> None:
        step, size = format_duration(self.step_us), format_duration(self.max_us)
        if self.step_us <= 0 or self.max_us <= 0 or self.max_us % self.step_us:
            msg = (
                f"group_by_dynamic(cumulative=True) on {self.column!r}: the period ({size}) "
                f"must be a positive multiple of every ({step}), the step by which the "
                "windows grow; e.g. every='1h', period='1d'"
            )
            raise PlanError(msg)

    @property
    def max_span_us(self) -> int:
        return self.max_us

    def describe(self) -> str:
        return (
            f"cumulative window on {self.column!r} step={format_duration(self.step_us)} "
            f"max={format_duration(self.max_us)} offset={format_duration(self.offset_us)}"
        )

    def fingerprint(self) -> str:
        return self.describe()

    def output_columns(self, dtype: pl.DataType) -> dict[str, pl.DataType]:
        return {LOWER: dtype, UPPER: dtype, self.column: dtype}

    def output_exprs(self, dtype: pl.DataType) -> list[pl.Expr]:
        start = from_us(pl.col(START), dtype)
        return [
            start.alias(LOWER),
            from_us(pl.col(END), dtype).alias(UPPER),
            start.alias(self.column),
        ]

    def key_columns(self) -> tuple[str, ...]:
        # The windows of a max-size window share the start: the end tells them apart.
        return (self.column, UPPER)

    def bounds_us(self) -> tuple[pl.Expr, pl.Expr]:
        return to_us(self.column).alias(START), to_us(UPPER).alias(END)

    def assign(self, df: pl.DataFrame, time_dtype: pl.DataType | None = None) -> pl.DataFrame:
        """One row per (row, window) pair, with ``__start``/``__end`` in microseconds.

        Raises
        ------
        EventTimeError
            A row's max-size window would end past the largest time ``time_dtype``
            holds: its last window could never be emitted.
        """
        step, size, offset = self.step_us, self.max_us, self.offset_us
        start = ((pl.col(T) - offset) // size) * size + offset
        check_window_ends(df, self.column, start, size, time_dtype)
        # The first window whose end is after the row, counted in steps from the start.
        first = (pl.col(T) - pl.col(START)) // step + 1
        return (
            df.with_columns(start.alias(START))
            .with_columns(pl.int_ranges(first, size // step + 1).alias("__j"))
            .explode("__j")
            .with_columns((pl.col(START) + pl.col("__j") * step).alias(END))
            .drop("__j")
        )
