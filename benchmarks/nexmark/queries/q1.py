"""Nexmark q1: currency conversion, every bid's price from dollars to euros.

Flink: ``SELECT auction, bidder, 0.908 * price AS price, dateTime, extra FROM bid``.
Deviation: Flink's price is a ``DECIMAL(23, 3)``; here it is a Float64 (the product
of an integer and 0.908 to within one ulp), which keeps the query Polars-native
and fast; stream and batch compute the same float.
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

import microstream as ms
from nexmark.schema import DOLLAR_TO_EURO

NAME = "q1"
TITLE = "currency conversion: price * 0.908 (dollars to euros)"
KIND = "stateless"
INPUTS = ("bid",)
OUTPUT_MODE = "append"


F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    return bids.select(
        "auction",
        "bidder",
        (DOLLAR_TO_EURO * pl.col("price")).alias("price"),
        "date_time",
        "extra",
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
