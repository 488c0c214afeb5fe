"""Nexmark q3: local item suggestion, who sells in category 10 from OR, ID or CA.

Flink: ``SELECT P.name, P.city, P.state, A.id FROM auction A JOIN person P ON
A.seller = P.id WHERE A.category = 10 AND P.state IN ('OR', 'ID', 'CA')``, an
unbounded join whose state grows forever. Beam's Query3 expires a person's and a
waiting auction's state 600 s of event time after they arrive; here that bound is
the join's ``within="600s"`` (``|person.date_time - auction.date_time| <= 600 s``),
a stream-stream inner join that buffers each side only until the watermark passes
its time plus 600 s. The batch oracle applies the same bound; the generator's
sellers are persons created shortly before their auctions, so it is the plain join.
Both sides are filtered and narrowed to the columns used before the join, which
keeps the buffered rows small.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TypeVar

import polars as pl

import microstream as ms
from nexmark.schema import WATERMARK_DELAY

NAME = "q3"
TITLE = "local item suggestion: category-10 auctions joined to sellers in OR, ID, CA"
KIND = "join"
INPUTS = ("auction", "person")
OUTPUT_MODE = "append"

EXPIRY = timedelta(seconds=600)  # Beam's maxAuctionsWaitingTime
STATES = ("OR", "ID", "CA")
OUTPUT = ["name", "city", "state", "id"]

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def auctions(frame: F) -> F:
    return frame.filter(pl.col("category") == 10).select("id", "seller", "date_time")


def persons(frame: F) -> F:
    return frame.filter(pl.col("state").is_in(STATES)).select(
        "id", "name", "city", "state", "date_time"
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    left = auctions(inputs["auction"].with_watermark("date_time", WATERMARK_DELAY))
    right = persons(inputs["person"].with_watermark("date_time", WATERMARK_DELAY))
    return left.join(right, left_on="seller", right_on="id", within=EXPIRY).select(OUTPUT)


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return (
        auctions(inputs["auction"])
        .join(persons(inputs["person"]), left_on="seller", right_on="id")
        .filter((pl.col("date_time_right") - pl.col("date_time")).abs() <= EXPIRY)
        .select(OUTPUT)
    )
