"""RayRuntime replaces lost workers within a run: a Ray worker process SIGKILLed (or
stopped past ``worker_timeout``) at a fault point of a batch is detected, the lost
actors restart, every owner reloads its key groups as of the last committed version,
and the batch runs again from its log entry; the sink's output equals a clean run's,
nothing lost or doubled. Owners' state files carry the run id and attempt (fencing).

Fault points (the driver's, :mod:`microstream.runtime.faults`): ``batch.after_read``
(before the operators), ``sink.after_data`` / ``batch.after_sink`` (during the sink,
before the state commit), ``batch.before_commit`` (after every owner committed its
state, before ``commits/N``: the loss is found by the next batch).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from fault_pipelines import FaultyRayRuntime, output, run, write_inputs

import microstream as ms
from microstream.exceptions import WorkerRestartsExhaustedError

FILES = 5
"""Input files per stream: 5 batches, then the flush batch."""


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[Any, ...]]]:
    """Each pipeline's output on LocalRuntime, no faults."""
    root = tmp_path_factory.mktemp("clean-faults")
    write_inputs(root, FILES)
    result = {p: run(root, p, ms.LocalRuntime()) for p in ("window_delta", "join_files")}
    assert all(len(rows) > 20 for rows in result.values())
    return result


def _faulty_run(
    root: Path, pipeline: str, runtime: FaultyRayRuntime
) -> tuple[list[tuple[Any, ...]], Any]:
    write_inputs(root, FILES)
    rows = run(root, pipeline, runtime)
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


CASES = [
    ("window_delta", "batch.after_sink", 3, 0),  # before the state commit
    ("join_files", "batch.before_commit", 2, 1),  # after it, before commits/N
    ("join_files", "sink.after_data", 4, 0),  # during the sink
]


@pytest.mark.parametrize(("pipeline", "point", "nth", "victim"), CASES)
def test_a_killed_worker_is_replaced_and_the_batch_re_run_in_the_same_run(
    ray_cluster: Any,
    clean: dict[str, list[tuple[Any, ...]]],
    tmp_path: Path,
    pipeline: str,
    point: str,
    nth: int,
    victim: int,
) -> None:
    runtime = FaultyRayRuntime(point, nth, victim, num_workers=2)
    rows, execution = _faulty_run(tmp_path, pipeline, runtime)
    assert rows == clean[pipeline]
    executor = execution.executor
    assert (executor.restarts, executor.attempt) == (1, 1)
    # Fencing: every file a manifest names carries this run's id and the attempt that
    # wrote it; the versions after the restart only the new attempt's.
    run_part = execution.run_id.split("-")[0]
    checkpoint = tmp_path / ("cp-delta" if pipeline == "window_delta" else "cp-files")
    named = _manifest_files(checkpoint)
    assert named and all(f".{run_part}." in f for files in named.values() for f in files)
    last = max(named)
    assert all(f.endswith(f".{run_part}.1.arrow") for f in named[last])


def test_a_hung_worker_is_treated_as_dead_after_worker_timeout(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    runtime = FaultyRayRuntime(
        "batch.after_read", 4, 1, signal.SIGSTOP, num_workers=2, worker_timeout="3s"
    )
    try:
        rows, execution = _faulty_run(tmp_path, "window_delta", runtime)
    finally:
        for each in runtime.executions:
            for pid in each.faults.sent:  # a stopped worker Ray did not reap
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
    assert rows == clean["window_delta"]
    assert execution.executor.restarts == 1


def test_a_batch_that_loses_workers_too_often_stops_the_query_by_name_and_a_restart_recovers(
    ray_cluster: Any, clean: dict[str, list[tuple[Any, ...]]], tmp_path: Path
) -> None:
    # Killed at the 3rd read and again when the batch re-runs: two losses in one batch.
    runtime = FaultyRayRuntime("batch.after_read", {3, 4}, 0, num_workers=2, max_worker_restarts=1)
    write_inputs(tmp_path, FILES)
    with pytest.raises(WorkerRestartsExhaustedError) as failure:
        run(tmp_path, "join_files", runtime)
    message = str(failure.value)
    assert "batch 2 lost Ray workers 2 times" in message
    assert "max_worker_restarts=1" in message
    assert "restart the query and it re-runs the batch" in message
    assert run(tmp_path, "join_files", ms.RayRuntime(num_workers=2)) == clean["join_files"]


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
    runtime = FaultyRayRuntime(point, nth, victim, num_workers=workers)
    rows, execution = _faulty_run(tmp_path, pipeline, runtime)
    assert rows == clean[pipeline]
    assert execution.executor.restarts == 1
    assert output(tmp_path, pipeline) == rows
