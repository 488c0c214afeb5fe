"""Nexmark q11: user sessions, the bids of each bidder per session (10 s gap).

Flink: ``SELECT bidder, count(*) AS bid_count, SESSION_START(dateTime, INTERVAL '10'
SECOND) AS starttime, SESSION_END(...) AS endtime FROM bid GROUP BY bidder,
SESSION(dateTime, INTERVAL '10' SECOND)``. Here ``group_by_session("date_time",
gap="10s", group_by="bidder")`` in append mode: a session is emitted once, when the
watermark passes its end (last bid + 10 s, Flink's ``SESSION_END``), and leaves the
state then. Flink merges session windows that touch (a bid exactly 10 s after the
previous one), and so do microstream and the oracle. The batch oracle sorts the bids
per bidder and starts a session wherever the gap to the previous bid exceeds 10 s.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl

import microstream as ms
from nexmark.schema import WATERMARK_DELAY

NAME = "q11"
TITLE = "user sessions: bids per bidder and session (gap 10 s)"
KIND = "windowed"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

GAP = timedelta(seconds=10)
OUTPUT = ["bidder", "bid_count", "starttime", "endtime"]


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return (
        inputs["bid"]
        .select("bidder", "date_time")
        .with_watermark("date_time", WATERMARK_DELAY)
        .group_by_session("date_time", gap=GAP, group_by="bidder")
        .agg(bid_count=pl.len().cast(pl.Int64))
        .rename({"session_start": "starttime", "session_end": "endtime"})
        .select(OUTPUT)
    )


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    bids = inputs["bid"].select("bidder", "date_time").sort("bidder", "date_time")
    starts = (pl.col("bidder") != pl.col("bidder").shift()) | (pl.col("date_time").diff() > GAP)
    return (
        bids.with_columns(session=starts.fill_null(True).cum_sum())
        .group_by("session")
        .agg(
            pl.col("bidder").first(),
            bid_count=pl.len().cast(pl.Int64),
            starttime=pl.col("date_time").min(),
            endtime=pl.col("date_time").max() + GAP,
        )
        .select(OUTPUT)
    )
