"""RayRuntime replaces lost workers within a run: a Ray worker process SIGKILLed (or
stopped past ``worker_timeout``) at a fault point of a batch is detected, the lost
actors restart, every owner reloads its key groups as of the last committed version,
and the batch runs again from its log entry; the sink's output equals a clean run's,
nothing lost or doubled. Owners' state files carry the run id and attempt (fencing).

Fault points (the driver's, :mod:`microstream.runtime.faults`): ``batch.after_read``
(before the operators: the loss is found by the batch's call), ``sink.after_data`` /
``batch.after_sink`` (during the sink, after the owners' one call of the batch, which
wrote their state files: the batch commits, the loss is found by the next call) and
``batch.before_commit`` (after the state's manifests, before ``commits/N``: the loss is
found by the next batch).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from fault_pipelines import FaultyRayRuntime, run, write_inputs

import microstream as ms
from microstream.exceptions import WorkerRestartsExhaustedError
from microstream.metrics.definitions import WORKER_RESTARTS, ProgressMetrics
from microstream.runtime.progress import QueryProgressEvent

FILES = 5
"""Input files per stream: 5 batches, then the flush batch."""


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[Any, ...]]]:
    """Each pipeline's output on LocalRuntime, no faults (``late``: the window's late rows)."""
    root = tmp_path_factory.mktemp("clean-faults")
    write_inputs(root, FILES)
    late: list[tuple[Any, ...]] = []
    result = {
        "window_delta": run(root, "window_delta", ms.LocalRuntime(), late),
        "join_files": run(root, "join_files", ms.LocalRuntime()),
    }
    assert all(len(rows) > 20 for rows in result.values())
    assert {row[0] for row in late} == {3, 4}  # late rows in batches 3 and 4
    return {**result, "late": sorted(late, key=repr)}


def _faulty_run(
    root: Path,
    pipeline: str,
    runtime: FaultyRayRuntime,
    late: list[tuple[Any, ...]] | None = None,
) -> tuple[list[tuple[Any, ...]], Any]:
    write_inputs(root, FILES)
    rows = run(root, pipeline, runtime, late)
    (execution,) = runtime.executions
    assert execution.faults.sent, "the fault point was never reached"
    return rows, execution


def _manifest_files(checkpoint: Path) -> dict[int, list[str]]:
    """Per state version, the data files its manifests name (every operator and store)."""
    files: dict[int, list[str]] = {}
    for manifest in checkpoint.glob("state/*/*/versions/*.json"):
        entry = json.loads(manifest.read_text())
        files.setdefault(entry["version"], []).extend(f["name"] for f in entry["files"])
    return files


@pytest.mark.parametrize("pipeline", ["window_delta", "join_files"])
def test_killed_workers_are_replaced_and_their_batches_re_run_in_the_same_run(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path, pipeline: str
) -> None:
    # Three kills in one run, one per fault point: after the state commit of batch 1,
    # before commits/1 (found by batch 2); in batch 3, after its sink and its late rows
    # (the owners wrote batch 3's state in their call: batch 3 commits, the loss is
    # found by batch 4); during the sink of batch 4's re-run, the 5th visit (batch 4
    # commits, the loss is found by batch 5). Each batch that lost a worker runs again.
    faults = [
        ("batch.before_commit", 2, 1),
        ("batch.after_sink", 4, 0),
        ("sink.after_data", 5, 0),
    ]
    runtime = FaultyRayRuntime(*faults, num_workers=2)
    late: list[tuple[Any, ...]] = []
    rows, execution = _faulty_run(tmp_path, pipeline, runtime, late)
    assert rows == clean[pipeline]
    if pipeline == "window_delta":  # batch 3's late rows routed once, not again in its re-run
        assert sorted(late, key=repr) == clean["late"]
    assert len(execution.faults.sent) == 3
    executor = execution.executor
    assert (executor.restarts, executor.attempt, executor.replaced) == (3, 3, [1, 0, 0])
    # Fencing: every file a manifest names carries this run's id; the last version's
    # files are the last attempt's.
    run_part = execution.run_id.split("-")[0]
    checkpoint = tmp_path / ("cp-delta" if pipeline == "window_delta" else "cp-files")
    named = _manifest_files(checkpoint)
    assert named and all(f".{run_part}." in f for files in named.values() for f in files)
    assert all(f.endswith(f".{run_part}.3.arrow") for f in named[max(named)])
    # Progress: each batch that lost a worker says so, in memory, in the progress JSON
    # and in the metrics counter; every other batch says 0.
    restarted = {2: [1], 4: [0], 5: [0]}
    progress = execution.recent_progress
    assert {p.batch_id: p.replaced_workers for p in progress if p.worker_restarts} == restarted
    assert all(p.worker_restarts == len(p.replaced_workers) for p in progress)
    assert all(p.recovered for p in progress if p.worker_restarts)
    lines = (checkpoint / "progress" / f"{execution.run_id}.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert {p["batch_id"]: (p["worker_restarts"], p["replaced_workers"]) for p in logged} == {
        p.batch_id: (len(restarted.get(p.batch_id, [])), restarted.get(p.batch_id, []))
        for p in progress
    }
    metrics = ProgressMetrics()
    for each in progress:
        metrics.on_query_progress(QueryProgressEvent(progress=each))
    counted = [s.value for s in metrics.samples() if s.metric is WORKER_RESTARTS]
    assert counted == [3.0]


def test_a_hung_worker_is_treated_as_dead_after_worker_timeout(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    runtime = FaultyRayRuntime(
        ("batch.after_read", 4, 1), sig=signal.SIGSTOP, num_workers=2, worker_timeout="5s"
    )
    try:
        rows, execution = _faulty_run(tmp_path, "window_delta", runtime)
    finally:
        for each in runtime.executions:
            for pid in each.faults.sent:  # a stopped worker Ray did not reap
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert rows == clean["window_delta"]
    assert (execution.executor.restarts, execution.executor.replaced) == (1, [1])


def test_a_batch_that_loses_workers_too_often_stops_the_query_by_name(
    ray_cluster: Any, tmp_path: Path
) -> None:
    # Killed at the 3rd read and again when batch 2 re-runs: two losses in one batch.
    runtime = FaultyRayRuntime(
        ("batch.after_read", 3, 0),
        ("batch.after_read", 4, 1),
        num_workers=2,
        max_worker_restarts=1,
    )
    write_inputs(tmp_path, FILES)
    with pytest.raises(WorkerRestartsExhaustedError) as failure:
        run(tmp_path, "join_files", runtime)
    message = str(failure.value)
    assert "Ray worker(s) [1] died during batch 2" in message
    assert "batch 2 lost Ray workers 2 times" in message
    assert "max_worker_restarts=1" in message
    assert "restart the query and it re-runs the batch" in message
    # Batch 2 is logged, not committed: a restart re-runs it (as test_rescale_and_faults).
    assert sorted(p.name for p in (tmp_path / "cp-files" / "commits").iterdir()) == [
        "0.json",
        "1.json",
    ]
    assert (tmp_path / "cp-files" / "offsets" / "2.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("pipeline", ["window_delta", "join_files"])
@pytest.mark.parametrize(
    "point", ["batch.after_read", "sink.after_data", "batch.after_sink", "batch.before_commit"]
)
@pytest.mark.parametrize(("nth", "victim", "workers"), [(1, 0, 2), (3, 1, 2), (5, 2, 3)])
def test_kill_matrix(
    ray_cluster: Any,
    clean: dict[str, list[tuple[Any, ...]]],
    tmp_path: Path,
    pipeline: str,
    point: str,
    nth: int,
    victim: int,
    workers: int,
) -> None:
    runtime = FaultyRayRuntime((point, nth, victim), num_workers=workers)
    rows, execution = _faulty_run(tmp_path, pipeline, runtime)
    assert rows == clean[pipeline]
    assert (execution.executor.restarts, execution.executor.replaced) == (1, [victim])
