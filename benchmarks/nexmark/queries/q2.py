"""Nexmark q2: selection, the bids of every 123rd auction.

Flink's q2: ``SELECT auction, price FROM bid WHERE MOD(auction, 123) = 0`` (the
original suite's handful of fixed auction ids would select almost nothing).
Auction ids are positive, so Polars' ``%`` (sign of the divisor) equals SQL's MOD.
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

import microstream as ms

NAME = "q2"
TITLE = "selection: bids with auction % 123 = 0"
KIND = "stateless"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    return bids.filter(pl.col("auction") % 123 == 0).select("auction", "price")


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
