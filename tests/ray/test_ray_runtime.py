"""RayRuntime gives the rows LocalRuntime gives, batch for batch; what it refuses, it
refuses at start with the reason; the CLI runs a job on it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from nexmark.query import QUERIES as NEXMARK_QUERIES
from nexmark.query import assert_same_result, load, run_batch, run_stream, stream_inputs
from stateful_fn_pipeline import SCHEMA as LOGIN_SCHEMA
from stateful_fn_pipeline import login_alerts

import microstream as ms
from microstream.exceptions import CheckpointError, MissingDependencyError, PlanError

T0 = datetime(2026, 1, 1)
EVENT = pl.Schema({"id": pl.Int64(), "user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()})


def _events(batch: int, rows: int = 40) -> pl.DataFrame:
    """Batch ``batch``: 3 s of event time per batch, disorder, repeats, a few late rows."""
    data = []
    for j in range(rows):
        at = T0 + timedelta(seconds=3 * batch, milliseconds=(j * 797) % 5000)
        if j % 17 == 0 and batch > 2:
            at -= timedelta(seconds=30)
        data.append((batch * 1000 + j % 31, f"u{(j * 7 + batch) % 9}", at, (j * 13) % 50))
    return pl.DataFrame(data, schema=EVENT, orient="row")


def _run(
    build: Callable[[list[ms.MemoryStream]], ms.StreamFrame],
    schemas: list[pl.Schema],
    batches: list[list[pl.DataFrame]],
    runtime: ms.Runtime,
    checkpoint: Path,
    output_mode: str = "append",
) -> dict[int, list[tuple[Any, ...]]]:
    """Feed ``batches`` (one frame per stream each) and collect every batch's sorted rows.

    With several streams, a running query could start a batch between two ``add_data``
    calls, so batch boundaries (and with them watermarks and batch ids) would depend on
    timing: each batch's frames are then added while no query runs, and the query is
    restarted from its checkpoint with ``available_now`` to take them as one batch.
    """
    streams = [ms.MemoryStream(schema) for schema in schemas]
    out: dict[int, list[tuple[Any, ...]]] = {}

    def start(trigger: ms.Trigger | None = None) -> ms.StreamingQuery:
        return build(streams).foreach_batch(
            lambda df, batch_id: out.__setitem__(batch_id, sorted(df.iter_rows(), key=repr)),
            checkpoint=checkpoint,
            output_mode=output_mode,  # type: ignore[arg-type]
            runtime=runtime,
            **({} if trigger is None else {"trigger": trigger}),
        )

    if len(streams) > 1:
        for frames in batches:
            for stream, frame in zip(streams, frames):
                stream.add_data(frame)
            query = start(ms.Trigger.available_now())
            query.await_termination()
            assert query.exception() is None, query.exception()
        return out
    query = start()
    try:
        for frames in batches:
            for stream, frame in zip(streams, frames):
                stream.add_data(frame)
            query.process_all_available()
        assert query.exception() is None, query.exception()
    finally:
        query.stop()
    return out


def _same_on_ray(
    tmp_path: Path,
    build: Callable[[list[ms.MemoryStream]], ms.StreamFrame],
    schemas: list[pl.Schema],
    batches: list[list[pl.DataFrame]],
    output_mode: str = "append",
    workers: int = 3,
) -> dict[int, list[tuple[Any, ...]]]:
    local = _run(build, schemas, batches, ms.LocalRuntime(), tmp_path / "local", output_mode)
    ray = _run(
        build, schemas, batches, ms.RayRuntime(num_workers=workers), tmp_path / "ray", output_mode
    )
    assert ray == local
    assert sum(len(rows) for rows in local.values()) > 0
    return local


@pytest.mark.parametrize("output_mode", ["append", "update"])
def test_sliding_window_aggregation_equals_local(
    ray_cluster: Any, tmp_path: Path, output_mode: str
) -> None:
    def build(s: list[ms.MemoryStream]) -> ms.StreamFrame:
        return (
            s[0]
            .lazy()
            .with_watermark("ts", delay="4s")
            .group_by_dynamic("ts", every="5s", period="10s", group_by="user")
            .agg(pl.col("v").sum(), pl.len().alias("n"), pl.col("v").median().alias("med"))
        )

    out = _same_on_ray(tmp_path, build, [EVENT], [[_events(b)] for b in range(8)], output_mode)
    assert len(out) >= 8


def test_keyless_window_aggregation_runs_in_one_worker_and_equals_local(
    ray_cluster: Any, tmp_path: Path
) -> None:
    def build(s: list[ms.MemoryStream]) -> ms.StreamFrame:
        return (
            s[0]
            .lazy()
            .with_watermark("ts", delay="4s")
            .group_by_dynamic("ts", every="5s")
            .agg(pl.col("v").max().alias("top"), pl.len().alias("n"))
        )

    _same_on_ray(tmp_path, build, [EVENT], [[_events(b)] for b in range(8)])


@pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")
def test_deduplication_equals_local(ray_cluster: Any, tmp_path: Path) -> None:
    def build(s: list[ms.MemoryStream]) -> ms.StreamFrame:
        return s[0].lazy().with_watermark("ts", delay="4s").unique(subset=["id"], keep="first")

    batches = [[_events(b)] for b in range(6)]
    batches.append([_events(2)])  # every id seen before: nothing new
    out = _same_on_ray(tmp_path, build, [EVENT], batches, workers=2)
    ids = [row[0] for rows in out.values() for row in rows]
    assert len(ids) == len(set(ids)) > 100


def test_stream_stream_join_equals_local(ray_cluster: Any, tmp_path: Path) -> None:
    clicks = pl.Schema({"user": pl.String(), "click_ts": pl.Datetime("us"), "page": pl.Int64()})

    def click_batch(b: int) -> pl.DataFrame:
        return pl.DataFrame(
            [(f"u{(j * 5 + b) % 9}", T0 + timedelta(seconds=3 * b + j % 4), j) for j in range(15)],
            schema=clicks,
            orient="row",
        )

    def build(s: list[ms.MemoryStream]) -> ms.StreamFrame:
        left = s[0].lazy().with_watermark("ts", delay="4s")
        right = s[1].lazy().with_watermark("click_ts", delay="4s")
        return left.join(
            right,
            left_on="user",
            right_on="user",
            how="full",
            within=("0s", "5s"),
            left_time="ts",
            right_time="click_ts",
        )

    batches = [[_events(b, rows=12), click_batch(b)] for b in range(6)]
    _same_on_ray(tmp_path, build, [EVENT, clicks], batches)


def test_map_groups_with_state_equals_local(ray_cluster: Any, tmp_path: Path) -> None:
    def logins(b: int) -> pl.DataFrame:
        rows = [(T0 + timedelta(seconds=20 * b + j), f"u{j % 4}", j % 5 == 4) for j in range(20)]
        return pl.DataFrame(rows, schema=LOGIN_SCHEMA, orient="row")

    out = _same_on_ray(
        tmp_path,
        lambda s: login_alerts(s[0].lazy(), delay="10s"),
        [LOGIN_SCHEMA],
        [[logins(b)] for b in range(6)],
    )
    assert any(out.values())


def test_a_stateless_query_starts_no_workers(ray_cluster: Any, tmp_path: Path) -> None:
    stream = ms.MemoryStream(EVENT)
    runtime = ms.RayRuntime(num_workers=2)
    query = (
        stream.lazy()
        .filter(pl.col("v") > 10)
        .sink_memory("ray_stateless", checkpoint=tmp_path / "cp", runtime=runtime)
    )
    try:
        stream.add_data(_events(0))
        query.process_all_available()
        assert query._execution.executor.workers == []  # type: ignore[attr-defined]
        assert ms.table("ray_stateless").height == _events(0).filter(pl.col("v") > 10).height
    finally:
        query.stop()


# -- Nexmark: the one-shot oracle, on Ray ------------------------------------------------------


STATEFUL_NEXMARK = ("q3", "q4", "q5", "q7", "q8", "q11", "q12", "q17")
"""The Nexmark queries with stateful operators (joins, windows, sessions, aggregations,
deduplication): the ones whose operators run in Ray actors. q7's window is keyless, so
one actor owns it whole; the rest are spread over both."""


def test_the_stateful_nexmark_queries_are_those_with_stateful_operators(
    nexmark_root: Path,
) -> None:
    stateful = [
        name
        for name in NEXMARK_QUERIES
        if (module := load(name))
        .stream(stream_inputs(nexmark_root, module.INPUTS, 1))
        .plan.stateful_nodes()
    ]
    assert tuple(stateful) == STATEFUL_NEXMARK


def _nexmark_on_ray(name: str, root: Path, tmp_path: Path, max_files: int) -> Any:
    module = load(name)
    _, expected = run_batch(module, root)
    assert expected.height > 0, f"{name}: the data set gives the oracle no rows"
    run = run_stream(
        module,
        root,
        max_files_per_trigger=max_files,
        checkpoint_root=str(tmp_path),
        runtime=ms.RayRuntime(num_workers=2),
    )
    assert run.dropped_late == 0
    assert_same_result(module, run.result, expected)
    return run


@pytest.mark.parametrize("name", STATEFUL_NEXMARK)
def test_nexmark_on_ray_equals_the_batch_oracle(
    ray_cluster: Any, nexmark_root: Path, tmp_path: Path, name: str
) -> None:
    run = _nexmark_on_ray(name, nexmark_root, tmp_path, max_files=3)
    assert run.batches >= 4


@pytest.mark.slow
@pytest.mark.parametrize("max_files", [1, 5])
@pytest.mark.parametrize("name", NEXMARK_QUERIES)
def test_every_nexmark_query_on_ray_equals_the_batch_oracle(
    ray_cluster: Any, nexmark_root: Path, tmp_path: Path, name: str, max_files: int
) -> None:
    """The local oracle suite's matrix (tests/nexmark/test_queries.py), on Ray."""
    run = _nexmark_on_ray(name, nexmark_root, tmp_path, max_files)
    assert run.batches >= 12 // max_files


# -- refusals ---------------------------------------------------------------------------------


def _windowed(stream: ms.MemoryStream) -> ms.StreamFrame:
    return (
        stream.lazy()
        .with_watermark("ts", delay="4s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.len())
    )


def test_a_checkpoint_in_memory_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    with pytest.raises(CheckpointError, match="in this process's memory, where Ray workers"):
        _windowed(ms.MemoryStream(EVENT)).sink_memory(
            "ray_refused", checkpoint="memory://ray-refused", runtime=ms.RayRuntime()
        )


def test_an_unpicklable_stateful_function_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    lock = threading.Lock()

    def count_with_lock(key: Any, rows: pl.DataFrame, state: Any) -> pl.DataFrame:
        with lock:
            return pl.DataFrame({"user": [key[0]], "n": [rows.height]})

    frame = (
        ms.MemoryStream(EVENT)
        .lazy()
        .group_by("user")
        .map_groups_with_state(
            count_with_lock,
            state_schema={"n": pl.Int64},
            output_schema={"user": pl.String, "n": pl.Int64},
        )
    )
    with pytest.raises(PlanError, match=r"function '.*count_with_lock' of .* cannot be pickled"):
        frame.sink_memory("ray_refused_fn", checkpoint=tmp_path / "cp", runtime=ms.RayRuntime())


def test_an_unpicklable_map_batches_function_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    lock = threading.Lock()

    def locked(df: pl.DataFrame) -> pl.DataFrame:
        with lock:
            return df

    frame = ms.MemoryStream(EVENT).lazy().map_batches(locked, schema=EVENT)
    with pytest.raises(PlanError, match=r"function '.*locked' of map_batches.*LocalRuntime"):
        frame.sink_memory("ray_refused_mb", checkpoint=tmp_path / "cp", runtime=ms.RayRuntime())


def test_without_ray_the_error_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'microstream\[ray\]'"):
        _windowed(ms.MemoryStream(EVENT)).sink_memory(
            "ray_missing", checkpoint=tmp_path / "cp", runtime=ms.RayRuntime()
        )


# -- the CLI ----------------------------------------------------------------------------------

JOB = """
import polars as pl
import microstream as ms

frame = ms.scan_files({inp!r}, format="parquet", schema={schema!r}, max_files_per_trigger=1)
(
    frame.with_watermark("ts", delay="4s")
    .group_by_dynamic("ts", every="5s", group_by="user")
    .agg(pl.col("v").sum())
    .sink_parquet({out!r}, checkpoint={cp!r}, trigger=ms.Trigger.available_now(flush=True))
)
"""


def test_microstream_run_with_runtime_ray(ray_cluster: Any, tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    for b in range(3):
        _events(b).write_parquet(inp / f"part-{b}.parquet")
        os.utime(inp / f"part-{b}.parquet", (1000 + b, 1000 + b))
    job = tmp_path / "job.py"
    schema = {name: str(dtype) for name, dtype in EVENT.items()}
    job.write_text(
        JOB.format(inp=str(inp), out=str(tmp_path / "out"), cp=str(tmp_path / "cp"), schema=schema)
        .replace("'Int64'", "pl.Int64")
        .replace("'String'", "pl.String")
        .replace("\"Datetime(time_unit='us', time_zone=None)\"", "pl.Datetime('us')")
    )
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "microstream.cli", "run", str(job), "--runtime", "ray"]
    done = subprocess.run(
        [*cmd, "--workers", "1"], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = ms.read_file_sink(tmp_path / "out")
    expected = (
        pl.concat([_events(b) for b in range(3)])
        .sort("ts")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v").sum())
    )
    key = ["user", "ts"]
    assert result.select(expected.columns).sort(key).equals(expected.sort(key))


@pytest.mark.parametrize("command", ["run", "sql"])
def test_address_and_workers_need_runtime_ray(tmp_path: Path, command: str) -> None:
    job = tmp_path / ("job.py" if command == "run" else "job.sql")
    job.write_text("")
    cmd = [sys.executable, "-m", "microstream.cli", command, str(job), "--workers", "3"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--address and --workers apply to --runtime ray" in done.stderr
