"""The three Nexmark streams as Polars schemas (Flink's DDL, in snake_case).

Event time is ``date_time``, a ``Datetime("ms")`` as Nexmark's ``TIMESTAMP(3)``.
Each stream is written as one directory of parquet files, one file per
micro-batch: ``<root>/person``, ``<root>/auction``, ``<root>/bid``.
"""

from __future__ import annotations

import polars as pl

TIME = pl.Datetime("ms")

PERSON = pl.Schema(
    {
        "id": pl.Int64(),
        "name": pl.String(),
        "email_address": pl.String(),
        "credit_card": pl.String(),
        "city": pl.String(),
        "state": pl.String(),
        "date_time": TIME,
        "extra": pl.String(),
    }
)

AUCTION = pl.Schema(
    {
        "id": pl.Int64(),
        "item_name": pl.String(),
        "description": pl.String(),
        "initial_bid": pl.Int64(),
        "reserve": pl.Int64(),
        "date_time": TIME,
        "expires": TIME,
        "seller": pl.Int64(),
        "category": pl.Int64(),
        "extra": pl.String(),
    }
)

BID = pl.Schema(
    {
        "auction": pl.Int64(),
        "bidder": pl.Int64(),
        "price": pl.Int64(),
        "channel": pl.String(),
        "url": pl.String(),
        "date_time": TIME,
        "extra": pl.String(),
    }
)

SCHEMAS: dict[str, pl.Schema] = {"person": PERSON, "auction": AUCTION, "bid": BID}

# Nexmark's dollar-to-euro rate (q1, q14 and the peers' versions of them).
DOLLAR_TO_EURO = 0.908

# Flink's Nexmark watermark: event time minus 4 s. The generator's out-of-order
# groups stay well inside it, so no row is late unless a test asks for it.
WATERMARK_DELAY = "4s"
