"""Nexmark q7: highest bid, the bids with the highest price of each 10 s window.

Flink takes ``MAX(price)`` per 10 s tumbling window and joins it back to the bids
of that price whose ``dateTime`` lies between the window's end minus 10 s and its
end, giving ``auction, bidder, price, dateTime, extra``. Here that is one windowed
aggregation, ``group_by_dynamic("date_time", every="10s")`` in append mode, whose
aggregate keeps the window's bids at its maximum price (a struct filtered by
``price == price.max()``, exploded and unnested when the window closes). That
aggregate does not decompose, so the engine keeps the rows it sees; a per-batch
combiner in front of it (``map_batches``) passes on only each window's
highest-priced bids of the batch, which is exact — a bid below its window's maximum
in its own batch is below the window's maximum — and keeps the state at a few
rows per open window instead of every bid. Deviation: Flink's ``BETWEEN`` includes
both ends, so a bid at exactly a window's end that matches the previous window's
maximum is output for it too; here, as in the batch oracle, a bid belongs to the
one window ``[start, start + 10 s)`` that holds it.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

import microstream as ms
from nexmark.schema import WATERMARK_DELAY

NAME = "q7"
TITLE = "highest bid: the bids at the maximum price of each 10 s window"
KIND = "windowed"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

WINDOW = timedelta(seconds=10)
OUTPUT = ["auction", "bidder", "price", "date_time", "extra"]


def at_window_max(window: pl.Expr) -> pl.Expr:
    return pl.col("price") == pl.col("price").max().over(window)


def combiner(bids: pl.DataFrame) -> pl.DataFrame:
    """A batch's bids at the highest price of their window within the batch."""
    return bids.filter(at_window_max(pl.col("date_time").dt.truncate(WINDOW)))


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    highest = pl.struct(OUTPUT).filter(pl.col("price") == pl.col("price").max())
    return (
        inputs["bid"]
        .select(OUTPUT)
        .with_watermark("date_time", WATERMARK_DELAY)
        .map_batches(combiner)
        .group_by_dynamic("date_time", every=WINDOW)
        .agg(highest.alias("bids"))
        .drop("date_time")  # the window start; the bids keep their own date_time
        .explode("bids")
        .unnest("bids")
    )


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return (
        inputs["bid"].filter(at_window_max(pl.col("date_time").dt.truncate(WINDOW))).select(OUTPUT)
    )
