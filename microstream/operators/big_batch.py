"""A large batch's partial aggregates over tumbling windows in one Polars plan.

A window aggregation prepares a batch (event time, order columns, window bounds: five
new columns of every row), then groups it by the keys and the window. For a batch of
millions of rows (a trigger that takes every available file: reprocessing history)
the prepared frame is the cost: at 5M rows, ~200 MB of new columns written and read
once. Here the window's start is a key expression of the group-by itself, in one lazy
plan, so the streaming engine computes it per morsel and no column of the whole batch
is materialized; the end is the start plus the period, added to the groups.

Taken only where the prepared frame adds nothing the group-by reads: tumbling windows
(:class:`~microstream.time.windows.WindowSpec` with ``period == every``), partial
aggregates that read the batch's own columns only (not the order columns: first/last
keep the prepared path), no buffered rows, no event time null, no window past what
the time column's dtype holds, and no row that can be late (no window the previous
watermark closed): otherwise :func:`fused_partials` returns ``None`` and the operator
prepares the batch as for any other. The values are Polars' group-by of the same rows,
as on the prepared path (a float sum's last bits follow the streaming engine's
morsels on either path, as they already did from run to run).
"""

from __future__ import annotations

from typing import Final

import polars as pl

from microstream.operators.aggregates import AggregateSpec
from microstream.time.windows import END, START, T, WindowSpec, max_time_us, to_us

__all__ = ["BIG_BATCH_ROWS", "fused_partials"]

BIG_BATCH_ROWS: Final = 1_000_000
"""From this many rows a batch's partials are computed by :func:`fused_partials` (below,
the per-batch path: its frames are small, and its group-by was measured as it is)."""


def fused_partials(
    batch: pl.DataFrame,
    window: WindowSpec,
    time_dtype: pl.DataType,
    keys: list[str],
    spec: AggregateSpec,
    *,
    late_watermark_us: int | None,
    count: str,
) -> pl.DataFrame | None:
    """``batch``'s partial aggregates per group key and tumbling window, with the group's
    row count in column ``count``; ``None`` where the prepared path must run.

    The columns are those of the prepared path's group-by: ``keys``, ``__start``,
    ``__end``, the partials, ``count`` (one row per group, order unspecified).

    Parameters
    ----------
    late_watermark_us
        The watermark that judges late rows, ``None`` when no row can be late
        (complete mode, no eviction): with a row in a window it closed, ``None`` is
        returned (the prepared path drops and reports it).
    """
    every, period, offset = window.every_us, window.period_us, window.offset_us
    if period != every or spec.needs_rows or not spec.primitives:
        return None
    partials = [*spec.partial_exprs(), pl.len().alias(count)]
    read = {name for expr in partials for name in expr.meta.root_names()}
    if not read <= set(batch.columns) or T in batch.columns:
        return None  # (e.g. first/last: ordered by the order columns the prepared path adds)
    column = batch.get_column(window.column)
    if column.null_count():
        return None  # (rows without a window: dropped and reported by the prepared path)
    time_us = to_us(window.column)
    bounds = batch.select(time_us.min().alias("lo"), time_us.max().alias("hi"))
    lo, hi = bounds.row(0)
    if lo is None:
        return None

    def start_of(us: int) -> int:
        return ((us - offset) // every) * every + offset

    if start_of(hi) + period > max_time_us(time_dtype):
        return None  # (the prepared path raises, naming the row)
    if late_watermark_us is not None and start_of(lo) + period <= late_watermark_us:
        return None  # (a row may be late; allowed lateness only widens what is late)
    start = ((time_us - offset) // every * every + offset).alias(START)
    grouped = (
        batch.lazy()
        .group_by(*keys, start)
        .agg(partials)
        .with_columns((pl.col(START) + period).alias(END))
        .select(*keys, START, END, *(e.meta.output_name() for e in partials))
    )
    return grouped.collect()
