"""A keyed operator's several owners read its source in shares (``runtime/ray/shared_reads.py``).

At two and more workers, the owners of the operator after a row-by-row stage read the
batch's splits themselves (split ``k`` by owner ``k % N``), run the stage, cut its rows
by key group and send each other the pieces, actor to actor: no split task, no row
through the driver, each split read once. The output equals LocalRuntime's batch by
batch, the next batch's shares are read ahead, and a worker killed at the new exchange
point (before the shares are read, or after they were cut and before the owners'
calls) is replaced and the batch re-runs from its log entry with the same output.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from event_files import EVENT, write_events

import connectors.files
import microstream as ms
from connectors._file_splits import plan_file_splits

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")

FILES = 9
"""Three files per batch: three batches, then the flush batch."""


@pytest.fixture
def split_per_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file source's batches in one split per file (its splits are ~32 MB, so every
    batch of these small files is otherwise one split)."""
    planned = functools.partial(plan_file_splits, split_bytes=1)
    monkeypatch.setattr(connectors.files, "plan_file_splits", planned)


def _windows(data: Path) -> ms.StreamFrame:
    return (
        ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=3)
        .filter(pl.col("v") > 5)
        .with_watermark("ts", delay="4s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
    )


def _run(runtime: ms.Runtime, data: Path, checkpoint: Path) -> tuple[Any, Any]:
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = _windows(data).foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, sorted(df.rows(), key=repr)),
        checkpoint=checkpoint,
        trigger=ms.Trigger.available_now(flush=True),
        runtime=runtime,
    )
    assert query.await_termination(timeout=120)
    assert query.exception() is None, query.exception()
    rows_read = [p.num_input_rows for p in query.recent_progress]
    return (out, rows_read), query._execution.executor  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_events(tmp_path_factory.mktemp("shares") / "in", FILES)


@pytest.fixture(scope="module")
def local(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    (out, rows_read), _ = _run(ms.LocalRuntime(), data, tmp_path_factory.mktemp("local"))
    assert sum(len(rows) for rows in out.values()) > 20
    assert sum(rows_read) == 50 * FILES
    return out, rows_read


@pytest.mark.usefixtures("split_per_file")
def test_the_owners_read_their_shares_and_send_each_other_the_rows(
    ray_cluster: Any, data: Path, local: Any, tmp_path: Path
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result, executor = _run(ms.RayRuntime(num_workers=2), data, tmp_path / "ray")
    assert result == local  # every batch's rows, and the rows each batch read
    # No split task and no row through the driver: the owners read every batch.
    assert (executor.split_tasks, executor.driver_rows, executor.owner_reads) == (0, 0, 0)
    assert executor.shared_reads == 3
    # Owner 0 reads files 0 and 2 of each batch, owner 1 file 1; both read their share
    # of the next batch ahead: batches 1 and 2 take their 3 files from the read-ahead.
    assert executor.owner_read_ahead == 4


@pytest.mark.usefixtures("split_per_file")
def test_three_workers_one_split_each(
    ray_cluster: Any, data: Path, local: Any, tmp_path: Path
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result, executor = _run(ms.RayRuntime(num_workers=3), data, tmp_path / "ray3")
    assert result == local
    assert (executor.split_tasks, executor.driver_rows, executor.shared_reads) == (0, 0, 3)
    assert executor.owner_read_ahead == 6  # three shares ahead, batches 1 and 2


def test_one_split_per_batch_is_read_by_the_first_owner(
    ray_cluster: Any, data: Path, local: Any, tmp_path: Path
) -> None:
    # The file source's default: a batch of small files is one split (the benchmark's
    # shape); owner 0 reads it, ahead too, and cuts it for both owners.
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    result, executor = _run(ms.RayRuntime(num_workers=2), data, tmp_path / "one")
    assert result == local
    assert (executor.split_tasks, executor.driver_rows, executor.shared_reads) == (0, 0, 3)
    assert executor.owner_read_ahead == 2


def test_read_splits_tasks_keeps_the_split_tasks(
    ray_cluster: Any, data: Path, local: Any, tmp_path: Path
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runtime = ms.RayRuntime(num_workers=2, read_splits="tasks")
    result, executor = _run(runtime, data, tmp_path / "tasks")
    assert result == local
    assert (executor.split_tasks, executor.shared_reads) == (3, 0)


class _KilledAtShares(ms.RayRuntime):
    """RayRuntime that SIGKILLs worker ``victim`` at the ``nth`` batch's shared reads:
    ``before`` the owners are asked to read, or ``after`` they read and cut the rows
    (the pieces in Ray's object store) and before their calls that process them."""

    def __init__(self, when: str, nth: int, victim: int, **options: Any) -> None:
        super().__init__(**options)
        self.when, self.nth, self.victim = when, nth, victim
        self.executions: list[Any] = []
        self.killed: list[int] = []

    def prepare(self, config: Any) -> Any:
        execution = super().prepare(config)
        executor = execution.executor
        share_reads = executor._share_reads
        visits = [0]

        def killing(*args: Any) -> Any:
            visits[0] += 1
            strike = visits[0] == self.nth
            if strike and self.when == "before":
                self._kill(executor)
            out = share_reads(*args)
            if strike and self.when == "after":
                self._kill(executor)
            return out

        executor._share_reads = killing
        self.executions.append(execution)
        return execution

    def _kill(self, executor: Any) -> None:
        pid = executor.worker_pids()[self.victim]
        os.kill(pid, signal.SIGKILL)
        self.killed.append(pid)


def _killed_run(
    when: str, victim: int, ray_cluster: Any, data: Path, local: Any, tmp_path: Path
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runtime = _KilledAtShares(when, 2, victim, num_workers=2, worker_timeout=60)
    result, executor = _run(runtime, data, tmp_path / "killed")
    assert runtime.killed, "the exchange point was never reached"
    assert result == local  # nothing lost or doubled, each batch read its rows once
    assert (executor.restarts, executor.replaced) == (1, [victim])
    # The re-run reads batch 1's shares again; the attempt killed before the shares
    # were read failed in their gather (the reader was named there) and counts none.
    assert executor.shared_reads == (3 if when == "before" else 3 + 1)
    assert (executor.split_tasks, executor.driver_rows) == (0, 0)


@pytest.mark.usefixtures("split_per_file")
@pytest.mark.parametrize(("when", "victim"), [("before", 0), ("after", 1)])
def test_a_worker_killed_at_the_shared_reads_is_replaced_and_the_batch_re_runs(
    ray_cluster: Any, data: Path, local: Any, tmp_path: Path, when: str, victim: int
) -> None:
    _killed_run(when, victim, ray_cluster, data, local, tmp_path)


@pytest.mark.slow
@pytest.mark.usefixtures("split_per_file")
@pytest.mark.parametrize(("when", "victim"), [("before", 1), ("after", 0)])
def test_kill_matrix_at_the_shared_reads(
    ray_cluster: Any, data: Path, local: Any, tmp_path: Path, when: str, victim: int
) -> None:
    _killed_run(when, victim, ray_cluster, data, local, tmp_path)


def test_delta_versions_in_many_splits_are_shared_by_the_owners(
    ray_cluster: Any, tmp_path: Path
) -> None:
    # A Delta source's batch is a split per data file (here a file per user and version):
    # each owner reads every second one, and the aggregation equals LocalRuntime's.
    from deltalake import write_deltalake
    from event_files import events

    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    table = tmp_path / "table"
    for i in range(5):
        write_deltalake(str(table), events(i).to_arrow(), mode="append", partition_by=["user"])

    def run(runtime: ms.Runtime, checkpoint: Path) -> tuple[Any, Any]:
        out: dict[int, list[tuple[Any, ...]]] = {}
        query = (
            ms.scan_delta(str(table), max_files_per_trigger=20)
            .filter(pl.col("v") % 3 != 0)
            .group_by("user")
            .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
            .foreach_batch(
                lambda df, batch_id: out.__setitem__(batch_id, sorted(df.rows(), key=repr)),
                checkpoint=checkpoint,
                output_mode="update",
                trigger=ms.Trigger.available_now(flush=True),
                runtime=runtime,
            )
        )
        assert query.await_termination(timeout=120)
        assert query.exception() is None, query.exception()
        return out, query._execution.executor  # type: ignore[attr-defined]

    local, _ = run(ms.LocalRuntime(), tmp_path / "local")
    ray, executor = run(ms.RayRuntime(num_workers=2), tmp_path / "ray")
    assert ray == local and sum(len(rows) for rows in local.values()) >= 9
    assert executor.shared_reads >= 3  # 45 data files, 20 per batch
    assert (executor.split_tasks, executor.driver_rows) == (0, 0)
