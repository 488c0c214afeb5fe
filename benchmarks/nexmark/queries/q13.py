"""Nexmark q13: bounded side-input join, every bid enriched from a static table.

Flink joins each bid with a filesystem side table ``(key BIGINT, value VARCHAR)``
``FOR SYSTEM_TIME AS OF`` its processing time, on ``MOD(auction, 10000) = key``,
and emits ``auction, bidder, price, dateTime, value``. Here the side table is
built in this module, deterministically (keys 0..9999, ``value-<key>``), so every
bid matches exactly one row, and the stream uses microstream's stream-static
join (the static side read once; a Delta table would be re-read on change).
"""

from __future__ import annotations

from functools import cache
from typing import TypeVar

import polars as pl

import microstream as ms

NAME = "q13"
TITLE = "bounded side-input join: bids with a static table on auction % 10000"
KIND = "join"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

SIDE_KEYS = 10_000

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


@cache
def side_input() -> pl.DataFrame:
    """The side table: ``key`` 0..9999 and ``value`` ``"value-<key>"``."""
    return pl.select(key=pl.int_range(SIDE_KEYS, dtype=pl.Int64)).with_columns(
        value=pl.format("value-{}", pl.col("key"))
    )


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    return (
        bids.with_columns(key=pl.col("auction") % SIDE_KEYS)
        .join(side_input().lazy(), on="key", how="inner")
        .select("auction", "bidder", "price", "date_time", "value")
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
