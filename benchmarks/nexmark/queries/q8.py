"""Nexmark q8: monitor new users, persons who created an auction in the 10 s window they entered.

Flink groups the persons by ``(id, name)`` and the auctions by ``seller`` per 10 s
tumbling window, and joins the two on ``id = seller`` and the window, giving ``id,
name, starttime`` (the window start). Here that is a windowed stream-stream join:
each side gets its window start (``date_time`` truncated to 10 s; windows are
aligned to the epoch, as Flink's), and the persons are semi-joined with the auctions
on ``(id, starttime) = (seller, starttime)``. The semi join emits a person once, at
its first auction of the window (Flink's ``GROUP BY seller`` of the auction side);
both rows lie in one 10 s window, so ``within="10s"`` bounds the state: each side is
buffered until the watermark is 10 s past it. A per-batch combiner keeps one auction
row per seller and window (the latest), all the semi join needs. Deviation: the person side is not
grouped, which gives the same rows because a person enters the system once (a
person's ``id`` is unique); the batch oracle is Flink's query as written.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

import polars as pl

import microstream as ms
from nexmark.schema import WATERMARK_DELAY

NAME = "q8"
TITLE = "new users: persons with an auction in the 10 s window they entered"
KIND = "join"
INPUTS = ("person", "auction")
OUTPUT_MODE = "append"

WINDOW = timedelta(seconds=10)
OUTPUT = ["id", "name", "starttime"]

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def with_window(frame: F) -> F:
    return frame.with_columns(starttime=pl.col("date_time").dt.truncate(WINDOW))


def sellers(auctions: pl.DataFrame) -> pl.DataFrame:
    """A batch's sellers per window, each with its latest auction time: the one row the
    semi join needs (it is the last of them to be late or to leave the state)."""
    return auctions.group_by("seller", "starttime", maintain_order=True).agg(
        pl.col("date_time").max()
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    persons = inputs["person"].select("id", "name", "date_time")
    auctions = inputs["auction"].select("seller", "date_time")
    return (
        with_window(persons.with_watermark("date_time", WATERMARK_DELAY))
        .join(
            with_window(auctions.with_watermark("date_time", WATERMARK_DELAY)).map_batches(sellers),
            left_on=["id", "starttime"],
            right_on=["seller", "starttime"],
            how="semi",
            within=WINDOW,
        )
        .select(OUTPUT)
    )


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    persons = with_window(inputs["person"]).select("id", "name", "starttime").unique()
    sellers = with_window(inputs["auction"]).select("seller", "starttime").unique()
    return persons.join(
        sellers, left_on=["id", "starttime"], right_on=["seller", "starttime"]
    ).select(OUTPUT)
