"""Nexmark q12: bids per bidder per 10 s processing-time window.

Flink's q12 adds ``PROCTIME()`` to each bid and counts the bids per ``bidder`` in
tumbling 10 s windows of it, emitting ``bidder, bid_count, starttime, endtime``.
Here the processing time is ``with_processing_time``: the batch's timestamp logged
in the WAL (every row of a batch has it; a batch re-run after a crash gets the
same), windowed with ``group_by_dynamic`` in append mode under a watermark of 0 s
on that column: a window is emitted once, final, by the first batch after one
processed at or past its end (or at the end, with ``available_now(flush=True)``),
and its state is dropped then. No row is ever late: a batch's timestamp is at or
after the previous one's, so its window is never closed yet. Unlike Flink, a
window waits for the next batch rather than a timer at its end (a micro-batch
engine emits in batches), which changes when a window is emitted, not what.

Processing time is not in the data, so the result depends on how fast the batches
ran: ``compare`` checks that the counts summed over each bidder's windows equal
the batch oracle's count of the bidder's bids, and that windows are aligned 10 s
spans with one row per (bidder, window).
"""

from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

import microstream as ms

NAME = "q12"
TITLE = "bids per bidder per 10 s processing-time window"
KIND = "windowed"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

WINDOW = "10s"
WINDOW_MS = 10_000
P_TIME = "p_time"


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return (
        inputs["bid"]
        .with_processing_time(P_TIME)
        .with_watermark(P_TIME, "0s")
        .group_by_dynamic(P_TIME, every=WINDOW, group_by="bidder")
        .agg(pl.len().cast(pl.Int64).alias("bid_count"))
        .select(
            "bidder",
            "bid_count",
            pl.col(P_TIME).alias("starttime"),
            pl.col(P_TIME).dt.offset_by(WINDOW).alias("endtime"),
        )
    )


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    """All the bids per bidder: what the windows of any run must add up to."""
    return inputs["bid"].group_by("bidder").agg(pl.len().cast(pl.Int64).alias("bid_count"))


def compare(stream: pl.DataFrame, batch: pl.DataFrame) -> None:
    """The stream's windows partition each bidder's bids, in aligned 10 s windows."""
    assert stream.columns == ["bidder", "bid_count", "starttime", "endtime"], stream.columns
    start_ms = stream["starttime"].dt.epoch("ms")
    misaligned = stream.filter(start_ms % WINDOW_MS != 0)
    assert misaligned.is_empty(), f"windows not aligned on {WINDOW}:\n{misaligned}"
    span = (stream["endtime"] - stream["starttime"]).dt.total_milliseconds()
    assert (span == WINDOW_MS).all(), f"windows not {WINDOW} long: {span.unique().to_list()}"
    repeated = stream.filter(pl.struct("bidder", "starttime").is_duplicated())
    assert repeated.is_empty(), f"a (bidder, window) emitted twice:\n{repeated}"
    totals = stream.group_by("bidder").agg(pl.col("bid_count").sum())
    assert_frame_equal(totals, batch, check_row_order=False, check_dtypes=False)
