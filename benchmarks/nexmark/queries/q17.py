"""Nexmark q17: auction statistics per auction and day.

Flink's q17 groups the bids by ``auction`` and ``DATE_FORMAT(dateTime,
'yyyy-MM-dd')`` and emits ``auction, day, total_bids, rank1_bids`` (price <
10,000), ``rank2_bids`` (10,000 <= price < 1,000,000), ``rank3_bids`` (price >=
1,000,000), ``min_price, max_price, avg_price, sum_price``. Flink runs it as an
unbounded group aggregation that retracts and updates; here the day is an
event-time tumbling window of one day (``group_by_dynamic(every="1d")``, windows
are aligned to the epoch, so they are calendar days of the naive UTC times), in
append mode under Flink's 4 s watermark: each (auction, day) row is emitted once,
final, when its day closes (or at the end, with ``available_now(flush=True)``),
and the state of a day is dropped then. The batch oracle groups by the formatted
day, as the SQL does. ``avg_price`` is Flink's ``AVG`` of a ``BIGINT``, a
``BIGINT``: the sum divided by the count, truncated.
"""

from __future__ import annotations

import polars as pl

import microstream as ms
from nexmark.schema import WATERMARK_DELAY

NAME = "q17"
TITLE = "auction statistics per auction and day: counts by price range, min/max/avg/sum"
KIND = "windowed"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

DAY_FORMAT = "%Y-%m-%d"  # Flink's 'yyyy-MM-dd'


def aggregates() -> list[pl.Expr]:
    price = pl.col("price")
    return [
        pl.len().cast(pl.Int64).alias("total_bids"),
        (price < 10_000).sum().cast(pl.Int64).alias("rank1_bids"),
        ((price >= 10_000) & (price < 1_000_000)).sum().cast(pl.Int64).alias("rank2_bids"),
        (price >= 1_000_000).sum().cast(pl.Int64).alias("rank3_bids"),
        price.min().alias("min_price"),
        price.max().alias("max_price"),
        (price.sum() // pl.len()).alias("avg_price"),
        price.sum().alias("sum_price"),
    ]


OUTPUT = ["auction", "day", "total_bids", "rank1_bids", "rank2_bids", "rank3_bids",
          "min_price", "max_price", "avg_price", "sum_price"]  # fmt: skip


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return (
        inputs["bid"]
        .with_watermark("date_time", WATERMARK_DELAY)
        .group_by_dynamic("date_time", every="1d", group_by="auction")
        .agg(aggregates())
        # the window start is the day's midnight: the day as Flink formats it
        .with_columns(day=pl.col("date_time").dt.strftime(DAY_FORMAT))
        .select(OUTPUT)
    )


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return (
        inputs["bid"]
        .group_by("auction", pl.col("date_time").dt.strftime(DAY_FORMAT).alias("day"))
        .agg(aggregates())
        .select(OUTPUT)
    )
