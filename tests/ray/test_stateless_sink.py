"""A stateless query on RayRuntime into the file or Delta sink: each split task writes its
rows as its piece of the batch (``<run>.<attempt>-s<split>``), the driver commits the
pieces once (one Delta version, one manifest entry) in split order, and no row passes
through the driver. A task whose worker dies, retried by Ray or re-run by the driver,
never makes a piece visible twice."""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import polars as pl
import pytest
from files_pipeline import SCHEMA, write_files

import microstream as ms
from connectors.file_sink import FileSink, FileSinkPart, FileSinkPartWriter, FileSinkSpec
from microstream.protocols import SinkContext

SPLIT_PIECE = re.compile(r"part-(\d{5})-[0-9a-f]+\.(\d+)-s(\d+)-[0-9a-f]{12}\.parquet$")
"""A data file a split task wrote: batch, attempt, split."""


def _rows(root: Path, files: int = 4) -> ms.StreamFrame:
    write_files(root / "in", 0, files, rows=30)
    return (
        ms.scan_files(root / "in", format="parquet", schema=SCHEMA, max_files_per_trigger=1)
        .filter(pl.col("v") % 3 != 0)
        .with_columns((pl.col("v") * 10).alias("v10"), pl.col("user").str.to_uppercase())
    )


def _run(frame: ms.StreamFrame, verb: str, path: Path, runtime: ms.Runtime) -> Any:
    query = getattr(frame, verb)(
        path,
        checkpoint=path.parent / f"cp-{path.name}",
        trigger=ms.Trigger.available_now(),
        runtime=runtime,
    )
    assert query.await_termination(timeout=120) and query.exception() is None, query.exception()
    return query._execution.executor  # type: ignore[attr-defined]


def _piece(name: str) -> tuple[int, int, int]:
    match = SPLIT_PIECE.search(name)
    assert match, f"{name} was not written by a split task"
    return int(match[1]), int(match[2]), int(match[3])


def test_files_into_delta_each_version_holds_the_tasks_pieces(
    ray_cluster: Any, tmp_path: Path
) -> None:
    frame = _rows(tmp_path)
    _run(frame, "sink_delta", tmp_path / "local", ms.LocalRuntime())
    executor = _run(frame, "sink_delta", tmp_path / "ray", ms.RayRuntime(num_workers=2))

    def table(name: str) -> list[tuple[Any, ...]]:
        return sorted(pl.read_delta(str(tmp_path / name)).iter_rows(), key=repr)

    assert table("ray") == table("local") and len(table("local")) > 60
    assert executor.workers == [] and executor.split_tasks == 4
    assert executor.sink_tail is not None and executor.sink_tail.stages == ()
    assert executor.driver_rows == 0  # the tasks wrote the rows; the driver only committed
    logs = sorted((tmp_path / "ray" / "_delta_log").glob("*.json"), key=lambda p: int(p.stem))
    assert len(logs) == 4  # one version per batch (one file, one split each)
    for version, log in enumerate(logs):
        actions = [json.loads(line) for line in log.read_text().splitlines()]
        assert [a["txn"]["version"] for a in actions if "txn" in a] == [version]
        adds = [a["add"]["path"] for a in actions if "add" in a]
        assert [_piece(p) for p in adds] == [(version, 0, 0)]


def _delta_source(root: Path) -> ms.StreamFrame:
    """Three versions of a table partitioned by user: about 12 data files (splits) each."""
    from deltalake import write_deltalake

    write_files(root / "src", 0, 3, rows=40)
    for path in sorted((root / "src").glob("*.parquet")):
        frame = pl.read_parquet(path)
        write_deltalake(str(root / "table"), frame.to_arrow(), mode="append", partition_by="user")
    return (
        ms.scan_delta(str(root / "table"), max_files_per_trigger=12)
        .filter(pl.col("v") > 20)
        .with_columns(half=pl.col("v") / 2)
    )


def test_delta_source_into_the_file_sink_one_piece_per_split_in_split_order(
    ray_cluster: Any, tmp_path: Path
) -> None:
    frame = _delta_source(tmp_path)
    _run(frame, "sink_parquet", tmp_path / "local", ms.LocalRuntime())
    executor = _run(frame, "sink_parquet", tmp_path / "ray", ms.RayRuntime(num_workers=2))
    local = ms.read_file_sink(tmp_path / "local")
    # The same rows in the same order: a batch's pieces are listed in split order, and
    # the driver's local batch is its splits' rows concatenated in that order.
    assert ms.read_file_sink(tmp_path / "ray").rows() == local.rows() and len(local) > 40
    assert executor.driver_rows == 0 and executor.split_tasks > 3 * 9
    entries = sorted((tmp_path / "ray" / "_microstream_log").glob("*.json"))
    assert [int(p.stem) for p in entries] == [0, 1, 2]
    splits = 0
    for batch, entry in enumerate(entries):
        names = [f["name"] for f in json.loads(entry.read_text())["files"]]
        pieces = [_piece(n) for n in names]
        assert [(b, a) for b, a, _ in pieces] == [(batch, 0)] * len(names)
        # Every split with rows wrote one file, listed in split order (a split whose rows
        # the filter removed writes none).
        numbers = [s for _, _, s in pieces]
        assert numbers == sorted(set(numbers)) and len(numbers) > 6
        splits += len(numbers)
    on_disk = sorted(p.name for p in (tmp_path / "ray").glob("*.parquet"))
    assert len(on_disk) == splits  # nothing unlisted: no attempt was lost


def test_a_sink_without_pieces_gathers_the_tasks_rows_on_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    got: dict[int, list[tuple[Any, ...]]] = {}
    query = _rows(tmp_path).foreach_batch(
        lambda df, batch_id: got.__setitem__(batch_id, df.rows()),
        checkpoint=tmp_path / "cp",
        trigger=ms.Trigger.available_now(),
        # (a batch of one split is read on the driver by default: test_driver_reads.py)
        runtime=ms.RayRuntime(num_workers=2, read_splits="tasks"),
    )
    assert query.await_termination(timeout=120) and query.exception() is None
    executor = query._execution.executor  # type: ignore[attr-defined]
    assert executor.sink_tail is None and executor.split_tasks == 4
    assert executor.driver_rows == sum(map(len, got.values())) > 60


# -- a task's worker dies while it writes its piece ------------------------------------


@dataclass(frozen=True)
class DyingWriter:
    """The file sink's writer, but the task writing split 0 of batch 1 writes its piece and
    then its process dies, ``deaths`` times in all (counted in files under ``markers``)."""

    inner: FileSinkPartWriter
    markers: str
    deaths: int

    def write_part(self, batch_id: int, piece: str, data: pl.DataFrame) -> FileSinkPart:
        part = self.inner.write_part(batch_id, piece, data)
        died = len(os.listdir(self.markers))
        if batch_id == 1 and piece.endswith("-s0") and died < self.deaths:
            Path(self.markers, f"{died}-{piece}").touch()
            os._exit(1)  # the worker process is gone, its piece's file on disk
        return part


class _DyingFileSink(FileSink):
    def __init__(self, spec: FileSinkSpec, context: SinkContext, dying: DyingSinkSpec) -> None:
        super().__init__(spec, context)
        self._dying = dying

    def part_writer(self) -> DyingWriter:
        return DyingWriter(super().part_writer(), self._dying.markers, self._dying.deaths)


@dataclass(frozen=True)
class DyingSinkSpec:
    """A file sink (``inner``) whose pieces are written by :class:`DyingWriter`."""

    kind: ClassVar[str] = "file_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append"})
    durable: ClassVar[bool] = True

    inner: FileSinkSpec
    markers: str
    deaths: int

    def describe(self) -> str:
        return self.inner.describe()

    def build(self, context: SinkContext) -> _DyingFileSink:
        return _DyingFileSink(self.inner, context, self)


@pytest.mark.parametrize(
    ("deaths", "committed", "restarts"),
    [
        (1, 0, 0),  # Ray retries the task (same attempt, same piece name, a new file)
        (4, 1, 1),  # past Ray's 3 retries: the driver re-runs the batch as attempt 1
    ],
)
def test_a_task_that_dies_after_writing_its_piece_never_makes_it_visible(
    ray_cluster: Any, tmp_path: Path, deaths: int, committed: int, restarts: int
) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    frame = _rows(tmp_path, files=3)
    _run(frame, "sink_parquet", tmp_path / "local", ms.LocalRuntime())
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = DyingSinkSpec(FileSinkSpec(str(tmp_path / "ray")), str(markers), deaths)
    query = frame.sink(
        spec,
        checkpoint=tmp_path / "cp-ray",
        trigger=ms.Trigger.available_now(),
        runtime=ms.RayRuntime(num_workers=2),
    )
    assert query.await_termination(timeout=180) and query.exception() is None, query.exception()
    executor = query._execution.executor  # type: ignore[attr-defined]
    assert len(os.listdir(markers)) == deaths
    assert (executor.restarts, executor.replaced) == (restarts, [])
    listed = {
        f["name"]
        for p in (tmp_path / "ray" / "_microstream_log").glob("*.json")
        for f in json.loads(p.read_text())["files"]
    }
    assert sorted(_piece(n)[:2] for n in listed) == [(0, 0), (1, committed), (2, committed)]
    orphans = {p.name for p in (tmp_path / "ray").glob("*.parquet")} - listed
    assert sorted(_piece(n) for n in orphans) == [(1, 0, 0)] * deaths
    # Reading every file on disk would double batch 1; the sink's rows are the local ones.
    assert (
        ms.read_file_sink(tmp_path / "ray").rows() == ms.read_file_sink(tmp_path / "local").rows()
    )


def test_a_file_sink_in_this_process_memory_is_written_by_the_driver(
    ray_cluster: Any, tmp_path: Path
) -> None:
    """Tasks run in other processes, whose ``memory://`` is not this one's."""
    frame = _rows(tmp_path, files=2)
    _run(frame, "sink_parquet", tmp_path / "local", ms.LocalRuntime())
    url = f"memory://ray-stateless-sink-{tmp_path.name}"
    query = frame.sink_parquet(
        url,
        checkpoint=f"{url}-cp",
        trigger=ms.Trigger.available_now(),
        runtime=ms.RayRuntime(num_workers=2, read_splits="tasks"),  # (else the driver reads)
    )
    assert query.await_termination(timeout=120) and query.exception() is None, query.exception()
    executor = query._execution.executor  # type: ignore[attr-defined]
    assert executor.sink_tail is None and executor.split_tasks == 2
    assert ms.read_file_sink(url).rows() == ms.read_file_sink(tmp_path / "local").rows()
