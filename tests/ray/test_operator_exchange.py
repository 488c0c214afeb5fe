"""Operator to operator exchange between actors: when an operator's output feeds another
operator's exchange (possibly through row-wise stateless stages), its owners run those
stages and cut the rows by the next owners' key groups; the next owners get the pieces
by reference, so the rows never pass through the driver (``driver_rows`` stays 0). The
rows equal LocalRuntime's; a SIGKILLed (or hung) upstream owner is replaced and the
batch re-run, giving the clean run's output."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fault_pipelines import FaultyRayRuntime
from nexmark.query import assert_same_result, load, run_batch, run_stream

import microstream as ms
from microstream.exceptions import WorkerLostError

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")

T0 = datetime(2026, 1, 1)
EVENT = pl.Schema({"id": pl.Int64(), "user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()})
CLICK = pl.Schema({"user": pl.String(), "page": pl.Int64()})


def _events(i: int, rows: int = 60) -> pl.DataFrame:
    """File ``i``: 4 s of event time, disorder within 5 s, a few rows 30 s late."""
    data = []
    for j in range(rows):
        at = T0 + timedelta(seconds=4 * i, milliseconds=(j * 797) % 5000)
        if j % 17 == 0 and i > 2:
            at -= timedelta(seconds=30)
        data.append((i * 1000 + j, f"u{(j * 7 + i) % 11}", at, (j * 13 + i) % 50))
    return pl.DataFrame(data, schema=EVENT, orient="row")


def _write(directory: Path, files: int, frame: Callable[[int], pl.DataFrame] = _events) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = directory / f"part-{i:04d}.parquet"
        frame(i).write_parquet(path)
        os.utime(path, (1000 + i, 1000 + i))  # the listing orders by (mtime, name)
    return directory


def _clicks(i: int) -> pl.DataFrame:
    return pl.DataFrame(
        [(f"u{(j * 3 + i) % 11}", i * 100 + j) for j in range(5)], schema=CLICK, orient="row"
    )


def _run(
    build: Callable[[], ms.StreamFrame], runtime: ms.Runtime, checkpoint: Path, output_mode: str
) -> tuple[dict[int, list[tuple[Any, ...]]], ms.StreamingQuery]:
    """Every batch's rows (sorted: the owners' pieces come in key-group order, the local
    operator's rows in its own), with ``available_now``."""
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = build().foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, sorted(df.rows(), key=repr)),
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


def _windows(data: Path) -> ms.StreamFrame:
    """Per user, 5-second tumbling windows: the first operator (op0)."""
    return (
        ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1)
        .with_watermark("ts", delay="4s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
    )


def _same_on_ray(
    build: Callable[[], ms.StreamFrame],
    tmp_path: Path,
    output_mode: str,
    runtime: ms.RayRuntime | None = None,
    least: int = 6,
) -> tuple[dict[int, list[tuple[Any, ...]]], Any]:
    local, _ = _run(build, ms.LocalRuntime(), tmp_path / "local", output_mode)
    runtime = runtime or ms.RayRuntime(num_workers=2)
    ray, query = _run(build, runtime, tmp_path / "ray", output_mode)
    assert ray == local
    assert sum(len(rows) for rows in local.values()) >= least
    return local, _executor(query)


def test_chained_aggregation_exchanges_between_actors(ray_cluster: Any, tmp_path: Path) -> None:
    data = _write(tmp_path / "in", 6)

    def build() -> ms.StreamFrame:
        return (
            _windows(data)
            .with_columns(bucket=pl.col("n") % 3)
            .group_by("bucket")
            .agg(pl.col("total").sum(), pl.len().alias("windows"))
        )

    out, executor = _same_on_ray(build, tmp_path, "update", ms.RayRuntime(num_workers=3))
    assert executor.exchange_paths == {"op0": "actors"}
    assert executor.driver_rows == 0  # the windows' rows went from actor to actor
    # and the events from the owners that read them to the others (shared reads)
    assert (executor.split_tasks, executor.shared_reads) == (0, 6)
    assert {row[0] for rows in out.values() for row in rows} == {0, 1, 2}


def test_window_into_a_stream_stream_join_with_columns_between(
    ray_cluster: Any, tmp_path: Path
) -> None:
    events, clicks = _write(tmp_path / "events", 6), _write(tmp_path / "clicks", 6, _clicks)

    def build() -> ms.StreamFrame:
        windows = _windows(events).with_columns(
            user=pl.col("user").str.to_uppercase(), big=pl.col("total") > 100
        )
        pages = ms.scan_files(
            clicks, format="parquet", schema=CLICK, max_files_per_trigger=1
        ).with_columns(pl.col("user").str.to_uppercase())
        return windows.join(pages, on="user", how="inner")

    out, executor = _same_on_ray(build, tmp_path, "append")
    assert executor.exchange_paths == {"op0": "actors"}
    # Only the clicks' rows are routed on the driver (a split task's stage that also
    # feeds nothing else is cut in the task: none here pass the driver either).
    assert executor.driver_rows == 0
    assert sum(len(rows) for rows in out.values()) > 20


def test_a_keyless_operator_after_gets_the_pieces_by_reference(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = _write(tmp_path / "in", 6)

    def build() -> ms.StreamFrame:
        # SINGLE_PARTITION: the second aggregation has one owner, which gets one piece
        # from each owner of the windows (a window of windows, without keys).
        return (
            _windows(data)
            .group_by_dynamic("ts", every="10s")
            .agg(pl.col("total").sum(), pl.len().alias("windows"))
        )

    _, executor = _same_on_ray(build, tmp_path, "append", least=3)  # 24 s of events
    assert executor.exchange_paths == {"op0": "actors"}
    assert executor.driver_rows == 0


def minus_batch_mean(df: pl.DataFrame) -> pl.DataFrame:
    return df.with_columns((pl.col("total") - pl.col("total").mean()).round(6).alias("dt"))


def test_a_stage_of_the_whole_batch_between_keeps_the_rows_on_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = _write(tmp_path / "in", 6)

    def build() -> ms.StreamFrame:
        return (
            _windows(data)
            .map_batches(minus_batch_mean, schema={**_windows(data).schema, "dt": pl.Float64()})
            .group_by("n")
            .agg(pl.col("dt").sum().round(6))
        )

    _, executor = _same_on_ray(build, tmp_path, "update")
    reason = "stage 3 after it is not row-wise stateless (map_batches)"
    assert executor.exchange_paths == {"op0": reason}
    windows, _ = _run(lambda: _windows(data), ms.LocalRuntime(), tmp_path / "windows", "append")
    # Every window the first operator emitted was routed again by the driver.
    assert executor.driver_rows == sum(len(rows) for rows in windows.values()) > 10


def test_nexmark_q4_chained_operators_exchange_between_actors(
    ray_cluster: Any, nexmark_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # q4: a join of auctions and bids, a filter, the highest bid per auction, the
    # average per category: two operator->operator exchanges after the join.
    from microstream.runtime.ray import executor as executor_module

    routed: list[tuple[Any, int]] = []
    route = executor_module.route

    def counted(frame: pl.DataFrame, keys: Any, *rest: Any) -> list[pl.DataFrame]:
        routed.append((keys, frame.height))
        return route(frame, keys, *rest)

    monkeypatch.setattr(executor_module, "route", counted)
    module = load("q4")
    _, expected = run_batch(module, nexmark_root)
    runtime = ms.RayRuntime(num_workers=2)
    run = run_stream(
        module,
        nexmark_root,
        max_files_per_trigger=3,
        checkpoint_root=str(tmp_path),
        runtime=runtime,
    )
    assert_same_result(module, run.result, expected)
    # The driver routes the bids (a combiner of the whole batch reads them there) and
    # nothing after the join: its owners and the next ones cut their own output.
    assert {keys for keys, _ in routed} <= {("id",), ("auction",)}
    assert ("auction",) in {keys for keys, _ in routed}
    assert run.batches >= 4


def _chained(data: Path) -> ms.StreamFrame:
    return (
        _windows(data)
        .with_columns(bucket=pl.col("n") % 3)
        .group_by("bucket")
        .agg(pl.col("total").sum(), pl.len().alias("windows"))
    )


@pytest.mark.parametrize(
    ("sig", "timeout"), [(signal.SIGKILL, "10m"), (signal.SIGSTOP, "5s")], ids=["kill", "hang"]
)
def test_an_upstream_owner_lost_during_a_batch_re_runs_it(
    ray_cluster: Any, tmp_path: Path, sig: int, timeout: str
) -> None:
    # Worker 1 (an owner of the windows and of the second aggregation) killed, or
    # stopped, after batch 3 read its offsets: the windows' call to it fails (or is not
    # answered within worker_timeout), it is replaced and batch 3 runs again.
    data = _write(tmp_path / "in", 6)
    runtime = FaultyRayRuntime(
        ("batch.after_read", 4, 1), sig=sig, num_workers=2, worker_timeout=timeout
    )
    try:
        _, executor = _same_on_ray(lambda: _chained(data), tmp_path, "update", runtime)
    finally:
        for each in runtime.executions:
            for pid in each.faults.sent:  # a stopped worker Ray did not reap
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert runtime.executions[0].faults.sent
    assert (executor.restarts, executor.replaced) == (1, [1])
    assert executor.exchange_paths == {"op0": "actors"}
    assert executor.driver_rows == 0


def _counter(marker: Path, driver: int) -> Callable[..., pl.DataFrame]:
    """A ``map_groups_with_state`` function: per bucket, the running count of windows,
    emitted every batch. The first Ray worker process to see a window starting at 10 s
    SIGKILLs itself in the call (once: ``marker``)."""

    def count(key: tuple[Any, ...], rows: pl.DataFrame, state: Any) -> pl.DataFrame:
        if os.getpid() != driver and rows["ts"].max() >= T0 + timedelta(seconds=10):
            try:
                marker.touch(exist_ok=False)
            except FileExistsError:
                pass
            else:
                os.kill(os.getpid(), signal.SIGKILL)
        seen = (state.get() or {"n": 0})["n"] + rows.height
        state.update({"n": seen})
        return pl.DataFrame({"bucket": [key[0]], "windows": [seen]})

    return count


def test_a_downstream_owner_killed_in_its_call_re_runs_the_batch(
    ray_cluster: Any, tmp_path: Path
) -> None:
    # The second operator's owner dies while it runs over the pieces the windows' owners
    # cut for it; the batch runs again, the windows' owners cut new pieces.
    data = _write(tmp_path / "in", 6)
    marker = tmp_path / "died"
    count = _counter(marker, os.getpid())

    def build() -> ms.StreamFrame:
        return (
            _windows(data)
            .with_columns(bucket=pl.col("n") % 3)
            .group_by("bucket")
            .map_groups_with_state(
                count,
                state_schema={"n": pl.Int64},
                output_schema={"bucket": pl.UInt32, "windows": pl.Int64},
            )
        )

    _, executor = _same_on_ray(build, tmp_path, "update")
    assert marker.exists()
    assert executor.restarts == 1 and len(executor.replaced) == 1
    assert executor.exchange_paths == {"op0": "actors"}
    assert executor.driver_rows == 0


@pytest.mark.filterwarnings("ignore::polars.exceptions.PolarsInefficientMapWarning")
def test_a_stage_that_cannot_be_sent_keeps_the_rows_on_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    data = _write(tmp_path / "in", 4)

    def parity(n: int) -> int:
        return n % 2

    def build() -> ms.StreamFrame:
        # Polars pickles a Python function in an expression with the ``cloudpickle``
        # package, which Ray does not need: without it the stage stays on the driver.
        return (
            _windows(data)
            .with_columns(m=pl.col("n").map_elements(parity, return_dtype=pl.Int64))
            .group_by("m")
            .agg(pl.col("total").sum())
        )

    _, executor = _same_on_ray(build, tmp_path, "update", least=2)
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        assert executor.exchange_paths["op0"].startswith(
            "the stages after it cannot be sent to the workers"
        )
        assert executor.driver_rows > 0
    else:
        assert executor.exchange_paths == {"op0": "actors"}
        assert executor.driver_rows == 0


def test_an_owner_waiting_on_a_piece_that_never_comes_is_lost_after_the_timeout(
    ray_cluster: Any,
) -> None:
    # The driver gathers the upstream owners' first returns before it calls the next
    # owners, so a piece of a dead owner is never handed on; should a piece still never
    # arrive (its object lost), the owner waiting on it is named after worker_timeout.
    from microstream.checkpoint.storage import Storage
    from microstream.plan.nodes import OperatorContext
    from microstream.runtime.ray.executor import RayStageExecutor, detached
    from microstream.runtime.ray.worker import OperatorWorker

    executor = RayStageExecutor(ray_cluster, lambda: None, 1, worker_timeout_s=2.0)
    worker = ray_cluster.remote(OperatorWorker).options(num_cpus=0).remote(Storage("memory://x"))
    node = detached(ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"]).plan)
    opened = worker.open.remote("op0", node, num_key_groups=4, key_groups=(0, 4), version=None)
    ray_cluster.get(opened, timeout=60)

    def forever() -> None:
        time.sleep(600)

    never = ray_cluster.remote(forever).options(num_cpus=0).remote()
    ctx = OperatorContext(batch_id=3, late_watermark_us=0, watermark_us=0, output_mode="append")
    call = worker.process_pieces.remote("op0", ctx, (1,), never)
    started = time.monotonic()
    with pytest.raises(WorkerLostError, match=r"worker\(s\) \[0\] did not answer within 2 s"):
        executor.gather([call], [0], "batch 3 of operator op0")
    assert time.monotonic() - started < 10
    ray_cluster.cancel(never, force=True)
    ray_cluster.kill(worker)
