"""RayRuntime across restarts: a checkpoint moves from LocalRuntime to Ray and between
numbers of workers (key groups move with their state), and with ``max_worker_restarts=0``
a Ray worker killed with SIGKILL fails the batch, which a restart re-runs: the output
equals a clean run's. (Replacing workers within a run: test_worker_faults.py.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from files_pipeline import query, rows, write_files

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.exceptions import WorkerError
from microstream.runtime.ray.assignment import Assignment
from microstream.state.key_groups import key_group_ranges

PHASES = [(0, 4), (4, 4), (8, 5), (13, 4)]
"""Files added before each run: (first, count); 17 batches cross a snapshot (version 10)."""


def _run_phases(root: Path, runtimes: list[ms.Runtime]) -> dict[int, pl.DataFrame]:
    out: dict[int, pl.DataFrame] = {}
    for n, ((first, count), runtime) in enumerate(zip(PHASES, runtimes, strict=True)):
        write_files(root / "in", first, count)
        q = query(root / "in", root / "cp", out, runtime, flush=n == len(PHASES) - 1)
        assert q.await_termination(timeout=120)
        assert q.exception() is None, q.exception()
    return out


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, ...]]:
    """The output of the phases on LocalRuntime, never changed."""
    root = tmp_path_factory.mktemp("clean")
    out = _run_phases(root, [ms.LocalRuntime() for _ in PHASES])
    assert len(out) >= 17 and sum(df.height for df in out.values()) > 50
    return rows(out)


def test_a_local_checkpoint_continues_on_ray_with_1_then_3_then_2_workers(
    ray_cluster: Any, clean_run: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    runtimes: list[ms.Runtime] = [
        ms.LocalRuntime(),
        ms.RayRuntime(num_workers=1),
        ms.RayRuntime(num_workers=3),
        ms.RayRuntime(num_workers=2),
    ]
    assert rows(_run_phases(tmp_path, runtimes)) == clean_run
    assert [a.num_workers for a in _assignments(tmp_path / "cp")] == [1, 3, 2]


def _assignments(checkpoint: Path) -> list[Assignment]:
    """The recorded key-group assignments, checked: each puts every operator's key groups
    on the workers in contiguous ranges, from a later batch than the one before."""
    storage = Storage(str(checkpoint))
    found = [
        storage.read_model(f"assignments/{n}.json", Assignment)
        for n in storage.list_numbered("assignments")
    ]
    for n, record in enumerate(found):
        assert record.id == n
        assert n == 0 or record.since_batch > found[n - 1].since_batch
        expected = [
            (lo, hi, w) for w, (lo, hi) in enumerate(key_group_ranges(128, record.num_workers))
        ]
        assert sorted(record.operators) == ["op0", "op1"]
        for ranges in record.operators.values():
            assert [(r.lo, r.hi, r.worker) for r in ranges] == expected
    assert len({r.run_id for r in found}) == len(found)
    return found


def test_a_ray_checkpoint_continues_on_local(
    ray_cluster: Any, clean_run: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    runtimes: list[ms.Runtime] = [
        ms.RayRuntime(num_workers=2),
        ms.RayRuntime(num_workers=3),
        ms.LocalRuntime(),
        ms.RayRuntime(num_workers=1),
    ]
    assert rows(_run_phases(tmp_path, runtimes)) == clean_run
    # The local run is not recorded: one process owns every key group.
    records = _assignments(tmp_path / "cp")
    assert [(a.num_workers, a.since_batch) for a in records][:1] == [(2, 0)]
    assert [a.num_workers for a in records] == [2, 3, 1]


def _kill_run(
    root: Path, workers: int, victim: int, batch: int, where: str
) -> tuple[dict[int, pl.DataFrame], int]:
    """All files in one run on Ray; worker ``victim`` is SIGKILLed in ``batch`` at ``where``
    (``"before"``: between batches; ``"read"``: after the batch's rows were read, before
    the operators; ``"sink"``: after the operators, before the state commit). Then
    restarts until done; returns the output and the number of failed runs.

    The kill's state is in files under ``root``, not in the closure: the ``map_batches``
    step runs in the one actor when it reads the source (one worker), where a copy of the
    closure was sent at start, and a replaced actor gets a fresh copy."""
    write_files(root / "in", 0, 12)
    out: dict[int, pl.DataFrame] = {}
    pid_file, calls_file, done_file = root / "victim.pid", root / "calls", root / "killed"
    target: dict[str, Any] = {"pid": None}

    def kill() -> None:
        for _ in range(400):  # (the driver writes the pid once the query started)
            if pid_file.exists():
                break
            time.sleep(0.025)
        try:
            os.close(os.open(done_file, os.O_CREAT | os.O_EXCL))  # (once, in any process)
        except FileExistsError:
            return
        os.kill(int(pid_file.read_text()), signal.SIGKILL)

    def before_operators(df: pl.DataFrame) -> pl.DataFrame:
        if df.height and where == "read":
            with calls_file.open("a") as calls:
                calls.write("x")
            if calls_file.stat().st_size == batch + 1:
                kill()
        return df

    def on_batch(batch_id: int) -> None:
        if where == "sink" and batch_id == batch:
            kill()

    class KillAfterCommit:
        """Kills once batch ``batch - 1`` is committed (its progress is published)."""

        def on_query_progress(self, event: Any) -> None:
            if where == "before" and event.progress.batch_id == batch - 1:
                kill()

    listener = KillAfterCommit()
    ms.add_listener(listener)
    try:
        return _restart_until_done(
            root, workers, victim, target, pid_file, out, before_operators, on_batch
        )
    finally:
        ms.remove_listener(listener)


def _restart_until_done(
    root: Path,
    workers: int,
    victim: int,
    target: dict[str, Any],
    pid_file: Path,
    out: dict[int, pl.DataFrame],
    before_operators: Any,
    on_batch: Any,
) -> tuple[dict[int, pl.DataFrame], int]:
    failures = 0
    for _attempt in range(3):
        q = query(
            root / "in",
            root / "cp",
            out,
            ms.RayRuntime(num_workers=workers, max_worker_restarts=0),
            flush=True,
            before_operators=before_operators,
            on_batch=on_batch,
        )
        if target["pid"] is None:
            target["pid"] = q._execution.executor.worker_pids()[victim]  # type: ignore[attr-defined]
            pid_file.with_suffix(".tmp").write_text(str(target["pid"]))
            pid_file.with_suffix(".tmp").replace(pid_file)  # (read whole, or not yet)
        try:
            assert q.await_termination(timeout=120)
            return out, failures
        except WorkerError as exc:
            assert "restart the query and it re-runs the batch" in str(exc)
            failures += 1
    raise AssertionError("the query did not finish after restarts")


@pytest.fixture(scope="module")
def clean_kill_reference(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Any, ...]]:
    root = tmp_path_factory.mktemp("clean-kill")
    write_files(root / "in", 0, 12)
    out: dict[int, pl.DataFrame] = {}
    q = query(root / "in", root / "cp", out, ms.LocalRuntime(), flush=True)
    assert q.await_termination(timeout=120) and q.exception() is None
    return rows(out)


@pytest.mark.parametrize(
    ("where", "batch", "victim"), [("before", 3, 0), ("read", 5, 1), ("sink", 7, 0)]
)
def test_a_killed_worker_fails_the_batch_and_a_restart_gives_the_clean_output(
    ray_cluster: Any,
    clean_kill_reference: list[tuple[Any, ...]],
    tmp_path: Path,
    where: str,
    batch: int,
    victim: int,
) -> None:
    out, failures = _kill_run(tmp_path, 2, victim, batch, where)
    assert failures == 1
    assert rows(out) == clean_kill_reference
    # Restarted with as many workers: the assignment is recorded once.
    assert [a.num_workers for a in _assignments(tmp_path / "cp")] == [2]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("where", ["before", "read", "sink"])
@pytest.mark.parametrize("batch", [1, 4, 10])
def test_kill_matrix(
    ray_cluster: Any,
    clean_kill_reference: list[tuple[Any, ...]],
    tmp_path: Path,
    workers: int,
    where: str,
    batch: int,
) -> None:
    out, failures = _kill_run(tmp_path, workers, workers - 1, batch, where)
    assert failures == 1
    assert rows(out) == clean_kill_reference
