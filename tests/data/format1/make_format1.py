"""Make the format-1 checkpoint of ``tests/test_migrate.py`` with microstream 82ba171.

Run from a checkout of commit 82ba171 (the last one writing checkpoint format 1)::

    git worktree add --detach /work/wt-old 82ba171
    PYTHONPATH=/work/wt-old python tests/data/format1/make_format1.py tests/data/format1

It writes ``in/part-0..2.parquet`` (the input the old run read), ``rest/part-3..4.parquet``
(the input a migrated query reads next; mtimes 1000 + i), and runs a dedup and a
tumbling-window aggregation over ``in/``, one file per batch, with
``Trigger.available_now()`` into ``out/`` (file sink) with checkpoint ``cp/``.
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

SCHEMA = {"id": pl.Int64, "user": pl.String, "ts": pl.Datetime("us"), "amount": pl.Int64}
T0 = datetime(2026, 1, 1)


def part(i: int) -> pl.DataFrame:
    """File i: ids repeat within the file (the dedup drops them), event time only moves on."""
    rows = [
        (10 * i + j % 3, "ab"[j % 2], T0 + timedelta(seconds=7 * i + j), 100 * i + j)
        for j in range(4)
    ]
    rows.append(rows[0])
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def main(root: Path) -> None:
    import microstream as ms

    for name in ("in", "rest", "out", "cp"):
        shutil.rmtree(root / name, ignore_errors=True)
    for i in range(5):
        directory = root / ("in" if i < 3 else "rest")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"part-{i}.parquet"
        part(i).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))
    frame = ms.scan_files(root / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    query = (
        frame.with_watermark("ts", delay="5s")
        .unique(subset=["id", "ts"], keep="first")
        .group_by_dynamic("ts", every="10s", group_by="user")
        .agg(pl.col("amount").sum().alias("total"), pl.len().alias("n"))
        .sink_parquet(root / "out", checkpoint=root / "cp", trigger=ms.Trigger.available_now())
    )
    assert query.await_termination(timeout=60)
    print(ms.__file__)
    print(ms.read_file_sink(root / "out"))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
