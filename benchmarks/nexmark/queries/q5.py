"""Nexmark q5: hot items, the auctions with the most bids per sliding window.

Flink counts the bids per auction in HOP windows of 10 s sliding by 2 s, takes the
maximum count per window, and joins the counts back to it: ``auction, num`` for
each window's auction(s) with the most bids (all of them on a tie). Here the count
is ``group_by_dynamic("date_time", every="2s", period="10s", group_by="auction")``
in append mode (windows aligned to the epoch, as Flink's; partial counts in state),
and the maximum per window is a per-batch step after it: in append mode a window is
emitted once, final, when the watermark passes its end, and every auction of a
window is emitted in the same batch, so the maximum over the window's rows of that
batch is the window's maximum. The batch oracle assigns each bid to its five
windows and does the same over all bids.

A per-batch combiner in front of the windows counts each batch's bids per auction
and 2 s slice (the slice start stands for its bids: a slice lies in exactly the
windows that hold each of its bids, and is late for the same ones), so the windowed
aggregation sums a few rows per auction instead of assigning every bid to five
windows.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

import microstream as ms
from nexmark.schema import WATERMARK_DELAY

NAME = "q5"
TITLE = "hot items: the auctions with the most bids per sliding window (10 s every 2 s)"
KIND = "windowed"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

SLIDE = timedelta(seconds=2)
SIZE = timedelta(seconds=10)
OUTPUT = ["auction", "num"]


def hottest(counts: pl.DataFrame) -> pl.DataFrame:
    """The auctions with the most bids of each window (``date_time`` holds its start)."""
    top = pl.col("num") == pl.col("num").max().over("date_time")
    return counts.filter(top).select(OUTPUT)


def per_slice(bids: pl.DataFrame) -> pl.DataFrame:
    """A batch's bids counted per auction and slide-aligned slice (at its start)."""
    slice_start = pl.col("date_time").dt.truncate(SLIDE)
    return bids.group_by("auction", slice_start, maintain_order=True).agg(n=pl.len())


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return (
        inputs["bid"]
        .select("auction", "date_time")
        .with_watermark("date_time", WATERMARK_DELAY)
        .map_batches(per_slice)
        .group_by_dynamic("date_time", every=SLIDE, period=SIZE, group_by="auction")
        .agg(num=pl.col("n").sum().cast(pl.Int64))
        .map_batches(hottest)
    )


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    windows = SIZE // SLIDE
    last_start = pl.col("date_time").dt.truncate(SLIDE)
    return (
        inputs["bid"]
        .select("auction", last_start.alias("window"))
        .with_columns(back=pl.int_ranges(0, windows))
        .explode("back")
        .group_by("auction", date_time=pl.col("window") - pl.col("back") * SLIDE)
        .agg(num=pl.len().cast(pl.Int64))
        .pipe(lambda counts: counts.filter(pl.col("num") == pl.col("num").max().over("date_time")))
        .select(OUTPUT)
    )
