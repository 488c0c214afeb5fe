"""Nexmark q14: calculation, expressions and a UDF over the bids of a price range.

Flink's q14: the price in euros (``0.908 * price``), kept when strictly between
1,000,000 and 50,000,000; ``bidTimeType`` from the hour of ``dateTime`` ('dayTime'
for 8..18, 'nightTime' for 0..6 and 20..23, else 'otherTime'); ``c_counts`` from
the UDF ``count_char(extra, 'c')`` (occurrences of 'c', 0 for a null). The UDF is
the vectorised ``str.count_matches`` here, not Python per row. Deviation as in q1:
the price is a Float64, not a ``DECIMAL(23, 3)``; no integer price lands within
an ulp of either bound, so the filter keeps the same rows.
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

import microstream as ms
from nexmark.schema import DOLLAR_TO_EURO

NAME = "q14"
TITLE = "calculation: CASE on the hour, a price range, a char-count UDF"
KIND = "stateless"
INPUTS = ("bid",)
OUTPUT_MODE = "append"


F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    euros = DOLLAR_TO_EURO * pl.col("price")
    hour = pl.col("date_time").dt.hour()
    bid_time_type = (
        pl.when((hour >= 8) & (hour <= 18))
        .then(pl.lit("dayTime"))
        .when((hour <= 6) | (hour >= 20))
        .then(pl.lit("nightTime"))
        .otherwise(pl.lit("otherTime"))
    )
    c_counts = pl.col("extra").str.count_matches("c", literal=True).fill_null(0).cast(pl.Int64)
    return bids.filter((euros > 1_000_000) & (euros < 50_000_000)).select(
        "auction",
        "bidder",
        euros.alias("price"),
        bid_time_type.alias("bid_time_type"),
        "date_time",
        "extra",
        c_counts.alias("c_counts"),
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
