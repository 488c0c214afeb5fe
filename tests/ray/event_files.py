"""Parquet files of events for the Ray source tests: disorder within 5 s, a few rows late."""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

T0 = datetime(2026, 1, 1)
EVENT = pl.Schema({"id": pl.Int64(), "user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()})


def events(i: int, rows: int = 50) -> pl.DataFrame:
    """File ``i``: 4 s of event time, disorder within 5 s, a few rows 30 s late."""
    data = []
    for j in range(rows):
        at = T0 + timedelta(seconds=4 * i, milliseconds=(j * 797) % 5000)
        if j % 17 == 0 and i > 2:
            at -= timedelta(seconds=30)
        data.append((i * 1000 + j, f"u{(j * 7 + i) % 9}", at, (j * 13 + i) % 50))
    return pl.DataFrame(data, schema=EVENT, orient="row")


def write_events(directory: Path, files: int, first: int = 0) -> Path:
    """Files ``first`` .. ``first + files - 1`` of :func:`events`, listed in that order."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + files):
        path = directory / f"part-{i:04d}.parquet"
        events(i).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))  # the listing orders by (mtime, name)
    return directory
