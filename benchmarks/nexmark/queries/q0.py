"""Nexmark q0: pass-through, every bid as it arrives.

Flink's q0 projects the bid to ``auction, bidder, price, dateTime, extra`` (the
sink has no ``channel`` nor ``url``); so does this module, with schema.py's
names. It measures the fixed cost of reading and handing rows to the sink.
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

import microstream as ms

NAME = "q0"
TITLE = "pass-through: every bid, projected as Flink's q0"
KIND = "stateless"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

COLUMNS = ["auction", "bidder", "price", "date_time", "extra"]

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    return bids.select(COLUMNS)


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
