"""``RayRuntime(read_splits="auto")``: a stateless stage whose rows all come back to the
driver for the sink (``foreach_batch`` here) reads a batch of one split on the driver,
which would only wait for the one task's rows, and a batch of several splits in tasks,
in parallel; ``"tasks"`` reads every split in a task. The rows, their order and the
rows counted as read equal LocalRuntime's either way."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

import microstream as ms

T0 = datetime(2026, 1, 1)
EVENT = pl.Schema({"id": pl.Int64(), "user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()})


def _events(i: int, rows: int = 40) -> pl.DataFrame:
    data = [
        (i * 1000 + j, f"u{(j * 7 + i) % 9}", T0 + timedelta(seconds=4 * i, milliseconds=j * 90), j)
        for j in range(rows)
    ]
    return pl.DataFrame(data, schema=EVENT, orient="row")


def _run(
    build: Callable[[], ms.StreamFrame], runtime: ms.Runtime, checkpoint: Path
) -> tuple[dict[int, list[tuple[Any, ...]]], list[int], Any]:
    """Every batch's rows in the order the sink got them, the rows read per batch, and
    the query's stage executor."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = build().foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, df.rows()),
        checkpoint=checkpoint,
        trigger=ms.Trigger.available_now(),
        runtime=runtime,
    )
    assert query.await_termination(timeout=120) and query.exception() is None, query.exception()
    read = [p.num_input_rows for p in query.recent_progress]
    return out, read, query._execution.executor  # type: ignore[attr-defined]


def test_a_batch_of_one_split_for_the_driver_is_read_on_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = tmp_path / "in"
    data.mkdir()
    for i in range(4):
        path = data / f"part-{i:04d}.parquet"
        _events(i).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))

    def build() -> ms.StreamFrame:
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1)
            .filter(pl.col("v") % 3 != 0)
            .with_columns((pl.col("v") * 10).alias("v10"))
        )

    local, local_read = _run(build, ms.LocalRuntime(), tmp_path / "local")[:2]
    auto, auto_read, executor = _run(build, ms.RayRuntime(num_workers=2), tmp_path / "auto")
    assert auto == local and len(local) == 4 and all(len(rows) == 26 for rows in local.values())
    assert auto_read == local_read == [40] * 4
    assert executor.split_tasks == 0 and executor.workers == []
    tasks, tasks_read, executor = _run(
        build, ms.RayRuntime(num_workers=2, read_splits="tasks"), tmp_path / "tasks"
    )
    assert tasks == local and tasks_read == local_read
    assert executor.split_tasks == 4  # one task per batch: its one split


def test_a_batch_of_several_splits_is_read_in_tasks(ray_cluster: Any, tmp_path: Path) -> None:
    from deltalake import write_deltalake

    table = tmp_path / "table"
    for i in range(3):  # a data file per user (9) and version
        write_deltalake(str(table), _events(i).to_arrow(), mode="append", partition_by=["user"])

    def build() -> ms.StreamFrame:
        return ms.scan_delta(str(table), max_files_per_trigger=9).filter(pl.col("v") > 3)

    local, local_read = _run(build, ms.LocalRuntime(), tmp_path / "local")[:2]
    ray, ray_read, executor = _run(build, ms.RayRuntime(num_workers=2), tmp_path / "ray")
    assert ray == local and len(local) == 3
    assert ray_read == local_read == [40] * 3
    assert executor.split_tasks == 3 * 9  # one task per data file, every batch
