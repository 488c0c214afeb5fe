"""Nexmark q22: the directories of each bid's URL.

Flink's q22: ``SPLIT_INDEX(url, '/', 3)``, ``.., 4)`` and ``.., 5)`` as ``dir1``,
``dir2``, ``dir3``: the 0-based fields of the URL split on '/', empty fields kept,
null past the last field (``https://www.nexmark.com/a/b/c/item.htm`` gives a, b,
c). ``str.split_exact("/", 5)`` gives the same fields as a struct, in one pass.
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

import microstream as ms

NAME = "q22"
TITLE = "URL directories: split the URL on '/' into dir1, dir2, dir3"
KIND = "stateless"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    fields = pl.col("url").str.split_exact("/", 5)
    return bids.select(
        "auction",
        "bidder",
        "price",
        "channel",
        fields.struct.field("field_3").alias("dir1"),
        fields.struct.field("field_4").alias("dir2"),
        fields.struct.field("field_5").alias("dir3"),
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
