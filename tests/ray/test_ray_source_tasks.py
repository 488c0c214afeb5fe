"""Sources read in Ray tasks: each split is read by a task that runs the stateless prefix
and hands its rows, cut by key group, straight to the owning actors (or back for the
sink); the rows equal LocalRuntime's, and they do not pass through the driver."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from event_files import EVENT, T0, events, write_events

import microstream as ms
from microstream.exceptions import SourceError

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")


def minus_batch_mean(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns((pl.col("v") - pl.col("v").mean()).alias("dv"))


def _run(
    build: Callable[[], ms.StreamFrame],
    runtime: ms.Runtime,
    checkpoint: Path,
    output_mode: str = "append",
) -> tuple[dict[int, list[tuple[Any, ...]]], ms.StreamingQuery]:
    """Every batch's rows, in the order the sink got them, with ``available_now``."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = build().foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, df.rows()),
        checkpoint=checkpoint,
        output_mode=output_mode,  # type: ignore[arg-type]
        trigger=ms.Trigger.available_now(flush=True),
        runtime=runtime,
    )
    query.await_termination()
    assert query.exception() is None, query.exception()
    return out, query


def _executor(query: ms.StreamingQuery) -> Any:
    return query._execution.executor  # type: ignore[attr-defined]


def _sorted(out: dict[int, list[tuple[Any, ...]]]) -> dict[int, list[tuple[Any, ...]]]:
    return {b: sorted(rows, key=repr) for b, rows in out.items()}


def test_files_filter_with_columns_window_equals_local_and_skips_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 8)

    def build() -> ms.StreamFrame:
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1)
            .filter(pl.col("v") > 5)
            .with_columns((pl.col("v") * 2).alias("v2"), pl.col("user").str.to_uppercase())
            .with_watermark("ts", delay="4s")
            .group_by_dynamic("ts", every="5s", group_by="user")
            .agg(pl.col("v2").sum().alias("total"), pl.len().alias("n"))
        )

    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local")
    # (read_splits="auto" has the two owners read the splits themselves: test_owner_shares.py)
    tasks = ms.RayRuntime(num_workers=2, read_splits="tasks")
    ray, query = _run(build, tasks, tmp_path / "ray")
    assert _sorted(ray) == _sorted(local)
    assert sum(len(rows) for rows in local.values()) > 20
    executor = _executor(query)
    assert executor.split_tasks == 8  # one file (one split) per batch
    assert executor.driver_rows == 0  # the tasks gave the actors the rows themselves
    # Progress counts the rows the tasks read, as locally.
    rows_in = [p.num_input_rows for p in query.recent_progress if p.batch_id < 8]
    assert rows_in == [50] * 8


def test_a_stage_that_needs_the_whole_batch_runs_on_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 4)

    def build() -> ms.StreamFrame:
        # A function of the whole batch: per split it would differ, so the stage is not cut.
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=2)
            .map_batches(minus_batch_mean, schema={**EVENT, "dv": pl.Float64()})
            .group_by("user")
            .agg(pl.col("dv").sum().round(6).alias("dv"))
        )

    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local", "update")
    ray, query = _run(build, ms.RayRuntime(num_workers=2), tmp_path / "ray", "update")
    assert _sorted(ray) == _sorted(local)
    executor = _executor(query)
    assert executor.driver_rows == 200  # read and routed by the driver, as before
    assert executor.split_tasks == 0


def test_delta_source_aggregation_equals_local(ray_cluster: Any, tmp_path: Path) -> None:
    from deltalake import write_deltalake

    table = tmp_path / "table"
    for i in range(5):
        write_deltalake(str(table), events(i).to_arrow(), mode="append", partition_by=["user"])

    def build() -> ms.StreamFrame:
        return (
            ms.scan_delta(str(table), max_files_per_trigger=20)
            .filter(pl.col("v") % 3 != 0)
            .group_by("user")
            .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
        )

    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local", "update")
    tasks = ms.RayRuntime(num_workers=2, read_splits="tasks")  # (auto: test_owner_shares.py)
    ray, query = _run(build, tasks, tmp_path / "ray", "update")
    assert _sorted(ray) == _sorted(local)
    assert len(local) >= 2
    executor = _executor(query)
    assert executor.split_tasks >= 9 * 5  # a data file per user and version
    assert executor.driver_rows == 0


def test_a_stateless_files_query_needs_no_actors(ray_cluster: Any, tmp_path: Path) -> None:
    data = write_events(tmp_path / "in", 6)

    def build() -> ms.StreamFrame:
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=3)
            .filter(pl.col("user") != "u3")
            .with_columns(pl.col("ts").dt.truncate("5s").alias("bucket"))
        )

    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local")
    # (read_splits="auto" would read these one-split batches on the driver)
    ray, query = _run(build, ms.RayRuntime(num_workers=2, read_splits="tasks"), tmp_path / "ray")
    assert ray == local  # the same rows in the same order: splits in log order
    assert [len(rows) for rows in local.values()] == [len(local[0])] * 2
    executor = _executor(query)
    assert executor.workers == []  # no actors
    assert executor.split_tasks == 2  # 3 small files share one split per batch


def test_union_of_two_file_streams_into_a_join_equals_local(
    ray_cluster: Any, tmp_path: Path
) -> None:
    a = write_events(tmp_path / "a", 4)
    b = write_events(tmp_path / "b", 4, first=10)
    clicks_schema = pl.Schema({"user": pl.String(), "click_ts": pl.Datetime("us")})
    clicks = tmp_path / "clicks"
    clicks.mkdir()
    for i in range(4):
        rows = [(f"u{(j * 5 + i) % 9}", T0 + timedelta(seconds=4 * i + j % 4)) for j in range(12)]
        path = clicks / f"c-{i}.parquet"
        pl.DataFrame(rows, schema=clicks_schema, orient="row").write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))

    def build() -> ms.StreamFrame:
        def scan(path: Path) -> ms.StreamFrame:
            return ms.scan_files(path, format="parquet", schema=EVENT, max_files_per_trigger=1)

        events = ms.concat([scan(a), scan(b)]).with_watermark("ts", delay="4s")
        right = ms.scan_files(
            clicks, format="parquet", schema=clicks_schema, max_files_per_trigger=1
        ).with_watermark("click_ts", delay="4s")
        return events.join(
            right,
            on="user",
            how="inner",
            within=("0s", "5s"),
            left_time="ts",
            right_time="click_ts",
        )

    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local")
    tasks = ms.RayRuntime(num_workers=2, read_splits="tasks")  # (auto: the owners read clicks)
    ray, query = _run(build, tasks, tmp_path / "ray")
    assert _sorted(ray) == _sorted(local)
    assert sum(len(rows) for rows in local.values()) > 10
    executor = _executor(query)
    # The union runs on the driver (it reads its splits); the clicks' prefix is cut.
    assert executor.driver_rows == 8 * 50
    assert executor.split_tasks == 4


def test_a_corrupt_file_fails_the_query_naming_it_as_locally(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 3)
    (data / "part-0001.parquet").write_bytes(b"PAR1 this is not a parquet file")

    def start(runtime: ms.Runtime, checkpoint: Path) -> str:
        query = (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1)
            .with_watermark("ts", delay="4s")
            .group_by_dynamic("ts", every="5s", group_by="user")
            .agg(pl.len())
            .foreach_batch(
                lambda df, batch_id: None,
                checkpoint=checkpoint,
                trigger=ms.Trigger.available_now(),
                runtime=runtime,
            )
        )
        with pytest.raises(SourceError) as raised:
            query.await_termination()
        assert query.exception() is raised.value
        # The message names the checkpoint's source log entry: the same but for the root.
        return str(raised.value).replace(str(checkpoint), "CHECKPOINT")

    local = start(ms.LocalRuntime(), tmp_path / "local")
    ray = start(ms.RayRuntime(num_workers=2), tmp_path / "ray")
    assert ray == local
    assert f"cannot read file {data / 'part-0001.parquet'}" in ray


@pytest.mark.parametrize("workers", [1, 3])
def test_watermarks_combine_over_the_splits_of_a_batch(
    ray_cluster: Any, tmp_path: Path, workers: int
) -> None:
    """A Delta version of 9 data files is 9 splits: the batch's watermark is the largest
    event time over all of them, so late rows and closed windows are those of LocalRuntime."""
    from deltalake import write_deltalake

    table = tmp_path / "table"
    for i in range(6):
        write_deltalake(str(table), events(i).to_arrow(), mode="append", partition_by=["user"])

    def build() -> ms.StreamFrame:
        return (
            ms.scan_delta(str(table), max_files_per_trigger=9)
            .with_watermark("ts", delay="2s")
            .group_by_dynamic("ts", every="4s", group_by="user")
            .agg(pl.col("v").max().alias("top"), pl.len().alias("n"))
        )

    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local")
    ray, query = _run(build, ms.RayRuntime(num_workers=workers), tmp_path / "ray")
    assert _sorted(ray) == _sorted(local)
    assert len(local) >= 6 and sum(len(r) for r in local.values()) > 20
    assert _executor(query).driver_rows == 0


def test_which_stateless_stages_tasks_run_per_split() -> None:
    from microstream.plan.physical import compile
    from microstream.runtime.ray.scan_tasks import cuttable

    def stages(frame: ms.StreamFrame) -> list[str]:
        plan = compile(frame.plan)
        return [plan.stages[i].describe() for i in sorted(cuttable(plan))]

    a = ms.MemoryStream(EVENT, name="a")
    b = ms.MemoryStream(EVENT, name="b")
    row_wise = a.lazy().filter(pl.col("v") > 1).with_columns(pl.col("v") * 2)
    windowed = row_wise.with_watermark("ts", delay="1s").group_by_dynamic("ts", every="5s")
    assert stages(windowed.agg(pl.len())) == [
        'Scan MemoryStream[a] -> filter([(col("v")) > (dyn int: 1)]) -> '
        "with_columns([(col(\"v\")) * (dyn int: 2)]) -> with_watermark('ts', delay=1s)"
    ]
    assert stages(row_wise) != []  # straight to the sink
    assert (
        stages(a.lazy().map_batches(minus_batch_mean, schema={**EVENT, "dv": pl.Float64()})) == []
    )
    assert stages(a.lazy().select(pl.lit(1).alias("one"))) == []  # one row per batch
    assert stages(ms.concat([a.lazy(), b.lazy()])) == []  # two sources in one stage
    static = pl.LazyFrame({"user": ["u1"], "name": ["one"]})
    assert stages(a.lazy().join(static, on="user")) == []  # the side is read per batch
