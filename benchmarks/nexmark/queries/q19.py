"""Nexmark q19: the ten highest bids of every auction (Top-N per key).

Flink's q19: ``SELECT * FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY auction ORDER
BY price DESC) AS rank_number FROM bid) WHERE rank_number <= 10``, a Top-N over an
unbounded key: no auction ever closes, so Flink emits updates and retractions. Here
it is a running Top-N, ``group_by("auction").top_k(10, by="price",
rank="rank_number")``, in update mode keyed by ``(auction, rank_number)`` as Flink's
Top-N with the row number in its output: each batch emits the positions whose bid
changed, and the last row per position is the answer over every bid read so far (at
the end, the batch oracle's). Ties on the price keep the bid that came first, as
the oracle's stable sort over the files in order. State: ten bids per auction seen,
kept for the whole run (Flink needs a state TTL there too).

Not in :data:`nexmark.query.QUERIES` (the benchmark's list, which every peer runs);
the SQL test runs it against this module.
"""

from __future__ import annotations

import polars as pl

import microstream as ms

NAME = "q19"
TITLE = "Top-N per key: the ten highest bids of each auction"
KIND = "stateful"
INPUTS = ("bid",)
OUTPUT_MODE = "update"
KEYS = ("auction", "rank_number")

N = 10


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return inputs["bid"].group_by("auction").top_k(N, by="price", rank="rank_number")


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    rank = pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over("auction")
    return (
        inputs["bid"]
        .sort("price", descending=True, maintain_order=True)
        .with_columns(rank.alias("rank_number"))
        .filter(pl.col("rank_number") <= N)
    )
