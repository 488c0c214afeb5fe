"""A source's batch read by the one owner of the operator it feeds (``runtime/ray/owner_reads.py``).

When every row of a stateless stage goes to one actor (one worker, or a keyless
operator), that actor reads the source's splits and runs the stage in its one call of
the batch: no split task, no rows through the driver or Ray's object store. The output
equals LocalRuntime's (late rows, watermarks, closed windows), progress counts the rows
read, and a killed owner's batch re-runs from its log entry as any other.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from event_files import EVENT, write_events
from fault_pipelines import FaultyRayRuntime, run, write_inputs

import microstream as ms
from microstream.exceptions import SourceError
from microstream.plan.physical import compile
from microstream.runtime.ray.owner_reads import owner_stages

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")


@pytest.fixture(autouse=True)
def _by_value(ray_cluster: Any) -> None:
    """The workers cannot import this module: its functions travel by value."""
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def top_per_window(df: pl.DataFrame) -> pl.DataFrame:
    """The batch's rows at the highest ``v`` of their 5 s window (a function of the batch)."""
    window = pl.col("ts").dt.truncate("5s")
    return df.filter(pl.col("v") == pl.col("v").max().over(window))


def minus_batch_mean(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns((pl.col("v") - pl.col("v").mean()).alias("dv"))


def _run(
    frame: ms.StreamFrame, runtime: ms.Runtime, checkpoint: Path, mode: str = "append"
) -> tuple[dict[int, list[tuple[Any, ...]]], Any]:
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = frame.foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, sorted(df.rows(), key=repr)),
        checkpoint=checkpoint,
        output_mode=mode,  # type: ignore[arg-type]
        trigger=ms.Trigger.available_now(flush=True),
        runtime=runtime,
    )
    query.await_termination()
    assert query.exception() is None, query.exception()
    return out, query


def _executor(query: Any) -> Any:
    return query._execution.executor


def _windows(data: Path, per_trigger: int = 1) -> ms.StreamFrame:
    return (
        ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=per_trigger)
        .filter(pl.col("v") > 5)
        .with_columns((pl.col("v") * 2).alias("v2"))
        .with_watermark("ts", delay="4s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v2").sum().alias("total"), pl.len().alias("n"))
    )


def test_one_worker_reads_its_source_itself(ray_cluster: Any, tmp_path: Path) -> None:
    data = write_events(tmp_path / "in", 8)
    local, local_query = _run(_windows(data), ms.LocalRuntime(), tmp_path / "local")
    ray, query = _run(_windows(data), ms.RayRuntime(num_workers=1), tmp_path / "ray")
    assert ray == local
    assert sum(len(rows) for rows in local.values()) > 20
    executor = _executor(query)
    # Every batch of one file was read by the owner: no task, no row through the driver.
    assert (executor.owner_reads, executor.split_tasks, executor.driver_rows) == (8, 0, 0)
    # Progress counts the rows the owner read, as locally; the late rows are dropped
    # by the same watermark (the owner's observation made it).
    progress, expected = query.recent_progress, local_query.recent_progress
    assert [p.num_input_rows for p in progress if p.batch_id < 8] == [50] * 8

    def dropped(records: list[Any]) -> list[int]:
        return [sum(op.num_rows_dropped_late for op in p.state_operators) for p in records]

    assert dropped(progress) == dropped(expected) and sum(dropped(expected)) > 5
    assert [p.watermark for p in progress] == [p.watermark for p in expected]


def test_a_map_batches_stage_is_read_by_its_one_owner_not_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 4)

    def build() -> ms.StreamFrame:
        # A function of the whole batch: the owner reads both files of a batch first.
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=2)
            .map_batches(minus_batch_mean, schema={**EVENT, "dv": pl.Float64()})
            .group_by("user")
            .agg(pl.col("dv").sum().round(6).alias("dv"))
        )

    local, _ = _run(build(), ms.LocalRuntime(), tmp_path / "local", "update")
    ray, query = _run(build(), ms.RayRuntime(num_workers=1), tmp_path / "ray", "update")
    assert ray == local
    executor = _executor(query)
    assert (executor.owner_reads, executor.split_tasks, executor.driver_rows) == (2, 0, 0)
    assert [p.num_input_rows for p in query.recent_progress] == [100, 100]


def test_a_keyless_window_is_read_by_its_owner_at_two_workers(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 6)

    def build() -> ms.StreamFrame:
        # q7's shape: a per-batch combiner, then a window without a key (one owner).
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1)
            .select("user", "ts", "v")
            .with_watermark("ts", delay="4s")
            .map_batches(top_per_window)
            .group_by_dynamic("ts", every="5s")
            .agg(pl.col("v").max().alias("top"), pl.len().alias("n"))
        )

    local, _ = _run(build(), ms.LocalRuntime(), tmp_path / "local")
    ray, query = _run(build(), ms.RayRuntime(num_workers=2), tmp_path / "ray")
    assert ray == local
    assert sum(len(rows) for rows in local.values()) >= 5
    executor = _executor(query)
    assert (executor.owner_reads, executor.split_tasks, executor.driver_rows) == (6, 0, 0)


def test_keyed_operators_at_two_workers_share_the_reads_and_read_splits_tasks_keeps_tasks(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 4)
    local, _ = _run(_windows(data), ms.LocalRuntime(), tmp_path / "local")
    two, query2 = _run(_windows(data), ms.RayRuntime(num_workers=2), tmp_path / "two")
    tasks, query1 = _run(
        _windows(data), ms.RayRuntime(num_workers=1, read_splits="tasks"), tmp_path / "tasks"
    )
    assert two == local and tasks == local
    # Several owners read in shares (runtime/ray/shared_reads.py, test_owner_shares.py),
    # not as the one owner; read_splits="tasks" keeps the split tasks.
    two_ = _executor(query2)
    assert (two_.owner_reads, two_.shared_reads, two_.split_tasks, two_.driver_rows) == (
        0,
        4,
        0,
        0,
    )
    one = _executor(query1)
    assert (one.owner_reads, one.shared_reads, one.split_tasks, one.driver_rows) == (0, 0, 4, 0)


def test_which_stages_an_owner_reads() -> None:
    stream = ms.MemoryStream({"k": pl.String, "n": pl.Int64})

    def stages(frame: ms.StreamFrame, single: bool = True) -> list[int]:
        plan = compile(frame.plan)
        return sorted(owner_stages(plan, lambda exchange: single, lambda x: b""))

    keyed = stream.lazy().filter(pl.col("n") > 0).group_by("k").agg(pl.col("n").sum())
    assert stages(keyed) == [0]
    assert stages(keyed, single=False) == []  # several owners: they read in shares
    batchwise = stream.lazy().map_batches(lambda df: df.head(3)).group_by("k").agg(pl.len())
    assert stages(batchwise) == [0]
    static = pl.DataFrame({"k": ["a"], "w": [1]}).lazy()
    joined = stream.lazy().join(static, on="k").group_by("k").agg(pl.col("w").sum())
    assert stages(joined) == []  # a static side stays with the driver


def test_unpicklable_stage_stays_on_the_driver() -> None:
    stream = ms.MemoryStream({"k": pl.String, "n": pl.Int64})
    plan = compile(stream.lazy().filter(pl.col("n") > 0).group_by("k").agg(pl.len()).plan)

    def refuse(value: Any) -> bytes:
        raise TypeError("cannot pickle")

    assert owner_stages(plan, lambda exchange: True, refuse) == frozenset()


def test_a_corrupt_file_fails_the_query_naming_it_as_locally(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = write_events(tmp_path / "in", 3)
    (data / "part-0001.parquet").write_bytes(b"PAR1 this is not a parquet file")

    def start(runtime: ms.Runtime, checkpoint: Path) -> str:
        query = _windows(data).foreach_batch(
            lambda df, batch_id: None,
            checkpoint=checkpoint,
            trigger=ms.Trigger.available_now(),
            runtime=runtime,
        )
        with pytest.raises(SourceError) as raised:
            query.await_termination()
        return str(raised.value).replace(str(checkpoint), "CHECKPOINT")

    local = start(ms.LocalRuntime(), tmp_path / "local")
    ray = start(ms.RayRuntime(num_workers=1), tmp_path / "ray")
    assert ray == local
    assert f"cannot read file {data / 'part-0001.parquet'}" in ray


@pytest.mark.parametrize(
    ("point", "visit"),
    [("batch.after_read", 2), ("sink.after_data", 3)],
)
def test_a_killed_owner_re_reads_the_batch_and_the_output_equals_a_clean_run(
    ray_cluster: Any, tmp_path: Path, point: str, visit: int
) -> None:
    write_inputs(tmp_path / "clean", 5)
    late_clean: list[tuple[Any, ...]] = []
    clean = run(tmp_path / "clean", "window_delta", ms.LocalRuntime(), late_clean)
    runtime = FaultyRayRuntime((point, visit, 0), num_workers=1)
    write_inputs(tmp_path / "faulty", 5)
    late: list[tuple[Any, ...]] = []
    rows = run(tmp_path / "faulty", "window_delta", runtime, late)
    (execution,) = runtime.executions
    assert execution.faults.sent, "the fault point was never reached"
    assert rows == clean and len(rows) > 20
    assert sorted(late, key=repr) == sorted(late_clean, key=repr)
    executor = execution.executor
    assert executor.restarts == 1 and executor.replaced == [0]
    assert executor.split_tasks == 0 and executor.driver_rows == 0
    assert executor.owner_reads == 5 + 1  # a file per batch, one batch read twice


def test_a_function_the_workers_cannot_import_leaves_the_read_on_the_driver(
    ray_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A map_batches function of a module only the driver's path has: the owner cannot
    # unpickle the stage, so the driver reads and runs it, as before (and says why).
    helpers = tmp_path / "driver_only"
    helpers.mkdir()
    (helpers / "driver_only_udf.py").write_text(
        textwrap.dedent(
            """
            import polars as pl

            def halve(df: pl.DataFrame) -> pl.DataFrame:
                return df.with_columns(pl.col("v") // 2)
            """
        )
    )
    monkeypatch.syspath_prepend(str(helpers))
    import driver_only_udf

    data = write_events(tmp_path / "in", 3)

    def build() -> ms.StreamFrame:
        return (
            ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1)
            .map_batches(driver_only_udf.halve)
            .group_by("user")
            .agg(pl.col("v").sum())
        )

    local, _ = _run(build(), ms.LocalRuntime(), tmp_path / "local", "update")
    ray, query = _run(build(), ms.RayRuntime(num_workers=1), tmp_path / "ray", "update")
    assert ray == local
    executor = _executor(query)
    assert (executor.owner_reads, executor.split_tasks, executor.driver_rows) == (0, 0, 150)
