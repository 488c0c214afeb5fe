"""A file-fed pipeline for the RayRuntime rescale and crash tests.

Parquet files (one per batch, ``max_files_per_trigger=1``) of events with
duplicates, disorder and a few late rows go through deduplication
(``unique(subset=["id", "ts"])``, keyed by id) into a 10-second tumbling window
per user (keyed by user): two operators with different partition keys, one
feeding the other. Every run is ``Trigger.available_now()`` (the last with
``flush=True``) and collects its output by batch id, so a re-run batch replaces
its rows, as an idempotent sink does.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

import microstream as ms

SCHEMA = pl.Schema(
    {"id": pl.Int64(), "user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()}
)
T0 = datetime(2026, 1, 1)


def write_files(directory: Path, first: int, count: int, *, rows: int = 60, seed: int = 1) -> None:
    """Files ``first .. first+count-1``: ``rows`` events each, 4 s of event time per file,
    disorder within 3 s, every 7th row repeated, a few rows 40 s late."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count):
        rnd = random.Random(seed * 1000 + i)
        data = []
        for j in range(rows):
            at = T0 + timedelta(seconds=4 * i, milliseconds=rnd.randrange(0, 7000))
            if j % 29 == 0 and i > 2:
                at -= timedelta(seconds=40)  # late
            data.append((i * rows + j, f"u{rnd.randrange(12)}", at, rnd.randrange(100)))
            if j % 7 == 0:
                data.append(data[-1])
        path = directory / f"part-{i:04d}.parquet"
        pl.DataFrame(data, schema=SCHEMA, orient="row").write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))


def query(
    directory: Path,
    checkpoint: Path,
    out: dict[int, pl.DataFrame],
    runtime: ms.Runtime,
    *,
    flush: bool = False,
    before_operators: Callable[[pl.DataFrame], pl.DataFrame] | None = None,
    on_batch: Callable[[int], Any] | None = None,
) -> ms.StreamingQuery:
    """Start the pipeline over ``directory``; its batches land in ``out`` by batch id."""
    frame = ms.scan_files(directory, format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    if before_operators is not None:
        frame = frame.map_batches(before_operators, schema=SCHEMA)

    def sink(df: pl.DataFrame, batch_id: int) -> None:
        out[batch_id] = df
        if on_batch is not None:
            on_batch(batch_id)

    return (
        frame.with_watermark("ts", delay="5s")
        .unique(subset=["id", "ts"], keep="first")
        .group_by_dynamic("ts", every="10s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"), pl.col("v").max().alias("top"))
        .foreach_batch(
            sink,
            trigger=ms.Trigger.available_now(flush=flush),
            checkpoint=checkpoint,
            runtime=runtime,
        )
    )


def rows(out: dict[int, pl.DataFrame]) -> list[tuple[Any, ...]]:
    """Every output row with its batch id, sorted."""
    return sorted((batch_id, *row) for batch_id, df in out.items() for row in df.iter_rows())
