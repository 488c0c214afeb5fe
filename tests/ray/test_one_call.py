"""One Ray call per owner and batch: each owner processes its rows and writes its state
files of the batch's version in the same call; the driver's commit makes no call to the
owners, it writes each store's manifest over the files they returned, after the sink
committed the batch, then ``commits/N``.

So a worker killed after its call of batch N (at the sink) no longer fails batch N:
its files of version N are written, fenced with the run and attempt, and become the
state only through the manifest and ``commits/N``; the loss is found by the next call,
in batch N+1, and a restart reads the killed worker's files of version N.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fault_pipelines import FaultyRayRuntime, output, run, window_into_delta, write_inputs
from files_pipeline import query, rows, write_files

import microstream as ms
from microstream.exceptions import WorkerRestartsExhaustedError
from microstream.runtime.ray.executor import RayStageExecutor

FILES = 5
"""Input files per stream: 5 batches, then the flush batch."""

NAMED = re.compile(r"\bbatch (\d+) of operator (\S+)$")
"""What ``RayStageExecutor.gather`` is told about a batch's call of an operator's owners
(``"batch 3 of operator op0"``; the old commit call was ``"the commit of batch 3 ..."``)."""

SHARED = re.compile(r"\bthe reads of batch (\d+), stage \d+$")
"""What it is told about the owners' reads of a source in shares, before their batch call
(``runtime/ray/shared_reads.py``): counted as ``("reads", worker)``."""


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Every gather of calls to the actors in this test: what it was, and the worker
    index of each call (every call to the actors goes through ``gather``)."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    gather = RayStageExecutor.gather

    def counted(
        self: RayStageExecutor,
        refs: list[Any],
        workers: Sequence[int],
        what: str,
        timeout: float | None = -1.0,
    ) -> list[Any]:
        seen.append((what, tuple(workers)))
        return gather(self, refs, workers, what, timeout)

    monkeypatch.setattr(RayStageExecutor, "gather", counted)
    yield seen


def _per_batch(seen: list[tuple[str, tuple[int, ...]]]) -> dict[int, Counter[tuple[str, int]]]:
    """Per batch id, how many calls each (operator, worker) got."""
    out: dict[int, Counter[tuple[str, int]]] = {}
    for what, workers in seen:
        shared = SHARED.search(what)
        if shared is not None:
            counter = out.setdefault(int(shared[1]), Counter())
            counter.update(("reads", w) for w in workers)
            continue
        match = NAMED.search(what)
        if match is None:
            assert not re.search(r"\bbatch \d", what), what  # every batch call is named so
            continue
        counter = out.setdefault(int(match[1]), Counter())
        counter.update((match[2], w) for w in workers)
    return out


def test_each_owner_gets_one_call_per_batch_into_foreach_batch(
    ray_cluster: Any, calls: list[tuple[str, tuple[int, ...]]], tmp_path: Path
) -> None:
    # Deduplication by id, then a window per user, into foreach_batch: the first
    # operator's owners cut its rows for the next owners, the second's return theirs.
    write_files(tmp_path / "in", 0, FILES)
    local: dict[int, pl.DataFrame] = {}
    done = query(tmp_path / "in", tmp_path / "cp-local", local, ms.LocalRuntime(), flush=True)
    assert done.await_termination(timeout=120) and done.exception() is None
    out: dict[int, pl.DataFrame] = {}
    q = query(tmp_path / "in", tmp_path / "cp", out, ms.RayRuntime(num_workers=2), flush=True)
    assert q.await_termination(timeout=120) and q.exception() is None, q.exception()
    assert rows(out) == rows(local)
    executor = q._execution.executor  # type: ignore[attr-defined]
    assert executor.exchange_paths == {"op0": "actors"}
    every = {(op, w) for op in ("op0", "op1") for w in (0, 1)}
    batches = _per_batch(calls)
    assert sorted(batches) == [p.batch_id for p in q.recent_progress]  # every batch
    reads = _reads(batches)
    assert all(counted == dict.fromkeys(every, 1) for counted in batches.values()), batches
    assert not [what for what, _ in calls if "commit" in what]
    # Before it, the first operator's owners read the batch's one split in shares: owner 0
    # reads it, in one call (batches with rows; the flush batch reads nothing).
    with_rows = {p.batch_id for p in q.recent_progress if p.num_input_rows}
    assert reads == {b: {("reads", 0): 1} if b in with_rows else {} for b in batches}


def test_each_owner_gets_one_call_per_batch_when_it_writes_the_sink_s_pieces(
    ray_cluster: Any, calls: list[tuple[str, tuple[int, ...]]], tmp_path: Path
) -> None:
    write_inputs(tmp_path / "local", FILES)
    clean = run(tmp_path / "local", "window_delta", ms.LocalRuntime())
    write_inputs(tmp_path / "ray", FILES)
    assert run(tmp_path / "ray", "window_delta", ms.RayRuntime(num_workers=2)) == clean
    batches = _per_batch(calls)
    reads = _reads(batches)
    every = {(op, w) for op in ("op0", "op1") for w in (0, 1)}
    assert sorted(batches) == list(range(len(batches))) and len(batches) > FILES
    assert all(counted == dict.fromkeys(every, 1) for counted in batches.values()), batches
    assert reads == {b: {("reads", 0): 1} if b < FILES else {} for b in batches}  # a file each


def _reads(
    batches: dict[int, Counter[tuple[str, int]]],
) -> dict[int, dict[tuple[str, int], int]]:
    """Per batch, its shared reads' calls, taken out of ``batches`` (the operators' left)."""
    out = {}
    for batch, counted in batches.items():
        out[batch] = {k: n for k, n in counted.items() if k[0] == "reads"}
        for key in out[batch]:
            del counted[key]
    return out


def test_a_worker_killed_after_its_call_leaves_its_batch_committed(
    ray_cluster: Any, tmp_path: Path
) -> None:
    write_inputs(tmp_path / "local", FILES)
    clean = run(tmp_path / "local", "window_delta", ms.LocalRuntime())
    root = tmp_path / "ray"
    write_inputs(root, FILES)
    # Worker 1 dies after the sink of batch 2 (its 3rd visit), its call of the batch done.
    runtime = FaultyRayRuntime(("batch.after_sink", 3, 1), num_workers=2, max_worker_restarts=0)
    query_ = window_into_delta(root, runtime)
    with pytest.raises(WorkerRestartsExhaustedError) as failure:
        query_.await_termination(timeout=120)
    assert "Ray worker(s) [1] died during batch 3 of operator op0" in str(failure.value)
    # Batch 2 is committed (its state files written in the owners' calls), batch 3 only
    # logged: a restart re-runs batch 3 on the state the killed worker wrote.
    checkpoint = root / "cp-delta"
    assert sorted(p.name for p in (checkpoint / "commits").iterdir()) == [
        "0.json",
        "1.json",
        "2.json",
    ]
    assert (checkpoint / "offsets" / "3.json").exists()
    (execution,) = runtime.executions
    fence = f".{execution.run_id.split('-')[0]}.0.arrow"
    named: list[str] = []
    for manifest in (checkpoint / "state" / "op1").glob("*/versions/2.json"):
        files = [f["name"] for f in json.loads(manifest.read_text())["files"]]
        assert all((manifest.parent.parent / name).exists() for name in files)
        named += files
    assert any(name.startswith("deltas/2/64-128.") for name in named)  # worker 1's range
    assert all(name.endswith(fence) for name in named)
    assert run(root, "window_delta", ms.RayRuntime(num_workers=2)) == clean
    assert output(root, "window_delta") == clean
