"""Read-ahead in an owner that reads its source (``runtime/ray/owner_prefetch.py``).

The file source's splits carry the splits the next batch will take (as far as its
listing and log know); the owner that reads a batch reads those next on a thread of
its own, and the next batch takes them only if its splits are exactly those, at the
same file versions. On Ray: the output equals LocalRuntime's, every batch after the
first takes its file from the read-ahead, and a killed owner loses nothing (the new
one reads its batch itself, then reads ahead again). Without Ray: a guess the log did
not confirm, a file rewritten or deleted after its read-ahead, and a read-ahead that
failed all give what the batch's own read gives (its rows, its error naming the file).
"""

from __future__ import annotations

import os
import pickle
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from fault_pipelines import FaultyRayRuntime, run, write_inputs
from polars.testing import assert_frame_equal

import microstream as ms
from connectors.files import FileSourceSpec
from microstream.checkpoint.storage import Storage
from microstream.exceptions import SourceError
from microstream.protocols import Offset, ReadSplit, Source, SourceContext, SplittableSource
from microstream.runtime.ray.owner_prefetch import OwnerReadAhead, next_splits

pytestmark = pytest.mark.filterwarnings("ignore::microstream.UnboundedStateWarning")

T0 = datetime(2026, 1, 1)
EVENT = pl.Schema({"id": pl.Int64(), "user": pl.String(), "ts": pl.Datetime("us"), "v": pl.Int64()})


def _events(i: int, rows: int = 50, shift: int = 0) -> pl.DataFrame:
    data = [
        (
            i * 1000 + j,
            f"u{(j * 7 + i) % 9}",
            T0 + timedelta(seconds=4 * i, milliseconds=(j * 797) % 5000),
            (j * 13 + i + shift) % 50,
        )
        for j in range(rows)
    ]
    return pl.DataFrame(data, schema=EVENT, orient="row")


def _write(directory: Path, i: int, mtime: int | None = None, shift: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"part-{i:04d}.parquet"
    _events(i, shift=shift).write_parquet(path)
    at = 1000 + i if mtime is None else mtime
    os.utime(path, (at, at))  # the listing orders by (mtime, name)
    return path


def _windows(data: Path, **options: Any) -> ms.StreamFrame:
    return (
        ms.scan_files(data, format="parquet", schema=EVENT, max_files_per_trigger=1, **options)
        .filter(pl.col("v") > 5)
        .with_watermark("ts", delay="4s")
        .group_by_dynamic("ts", every="5s", group_by="user")
        .agg(pl.col("v").sum().alias("total"), pl.len().alias("n"))
    )


def _run(frame: ms.StreamFrame, runtime: ms.Runtime, checkpoint: Path) -> tuple[Any, Any]:
    out: dict[int, list[tuple[Any, ...]]] = {}
    query = frame.foreach_batch(
        lambda df, batch_id: out.__setitem__(batch_id, sorted(df.rows(), key=repr)),
        checkpoint=checkpoint,
        trigger=ms.Trigger.available_now(flush=True),
        runtime=runtime,
    )
    query.await_termination()
    assert query.exception() is None, query.exception()
    return out, query._execution.executor  # type: ignore[attr-defined]


def test_the_owner_reads_the_next_batchs_file_ahead(ray_cluster: Any, tmp_path: Path) -> None:
    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    data = tmp_path / "in"
    for i in range(6):
        _write(data, i)
    local, _ = _run(_windows(data), ms.LocalRuntime(), tmp_path / "local")
    ahead, executor = _run(_windows(data), ms.RayRuntime(num_workers=1), tmp_path / "ray")
    assert ahead == local and sum(len(rows) for rows in local.values()) > 20
    # Every batch of a file after the first found its file read ahead by the owner.
    assert (executor.owner_reads, executor.owner_read_ahead) == (6, 5)
    assert (executor.split_tasks, executor.driver_rows) == (0, 0)
    # read_ahead_bytes=0 turns it off here too; the output is the same.
    off, executor = _run(
        _windows(data, read_ahead_bytes=0), ms.RayRuntime(num_workers=1), tmp_path / "off"
    )
    assert off == local
    assert (executor.owner_reads, executor.owner_read_ahead) == (6, 0)


def test_a_killed_owner_loses_nothing_read_ahead(ray_cluster: Any, tmp_path: Path) -> None:
    write_inputs(tmp_path / "clean", 5)
    clean = run(tmp_path / "clean", "window_delta", ms.LocalRuntime())
    # Killed after the driver read (planned) batch 1, before the owner's call.
    runtime = FaultyRayRuntime(("batch.after_read", 2, 0), num_workers=1)
    write_inputs(tmp_path / "faulty", 5)
    rows = run(tmp_path / "faulty", "window_delta", runtime)
    (execution,) = runtime.executions
    assert execution.faults.sent, "the fault point was never reached"
    assert rows == clean and len(rows) > 20
    executor = execution.executor
    assert executor.restarts == 1 and executor.replaced == [0]
    assert executor.owner_reads == 5 + 1  # a file per batch, one batch read twice
    # The owner that died held batch 1's file read ahead; its replacement starts with
    # nothing ahead, reads batch 1 itself, and takes batches 2, 3 and 4 from its own.
    assert executor.owner_read_ahead == 3


# -- without Ray: the file source's hints and what the owner's read-ahead takes ----------


def _source(tmp_path: Path, checkpoint: str = "cp", **options: Any) -> Source:
    spec = FileSourceSpec(
        str(tmp_path / "in"), format="parquet", schema=EVENT, max_files_per_trigger=1, **options
    )
    ctx = SourceContext(index=0, storage=Storage(str(tmp_path / checkpoint)), query_id="q")
    return spec.build(ctx)


def _splits(src: Source, start: Offset, end: Offset) -> tuple[ReadSplit, ...]:
    """The batch's splits as an owner gets them (through pickle)."""
    assert isinstance(src, SplittableSource)
    planned = src.plan_splits(start, end)
    assert planned is not None
    return tuple(pickle.loads(pickle.dumps(s)) for s in planned)


def _first_two(tmp_path: Path, files: int = 3) -> tuple[Source, Offset, tuple[ReadSplit, ...]]:
    """A source over ``files`` files; its first batch's end and splits."""
    for i in range(files):
        _write(tmp_path / "in", i)
    src = _source(tmp_path)
    start = src.initial_offset()
    first = src.latest_offset(start, rate_limited=True)
    return src, first, _splits(src, start, first)


def test_the_file_source_names_the_next_batchs_split(tmp_path: Path) -> None:
    src, first, batch0 = _first_two(tmp_path)
    hinted = next_splits(batch0)
    assert [[f[0].name for f in s.files] for s in hinted] == [["part-0001.parquet"]]  # type: ignore[attr-defined]
    ahead = OwnerReadAhead()
    ahead.start(0, hinted)
    second = src.latest_offset(first, rate_limited=True)
    batch1 = _splits(src, first, second)
    assert batch1 == hinted  # exactly the split the log gave batch 1
    frames = ahead.read(0, batch1)
    assert (ahead.hits, ahead.misses) == (1, 0)
    assert_frame_equal(pl.concat(frames), src.read(first, second))
    assert_frame_equal(pl.concat(frames), _events(1))
    # The last file: nothing comes after it.
    assert next_splits(_splits(src, second, src.latest_offset(second, rate_limited=True))) == ()
    # read_ahead_bytes=0: no hints.
    off = _source(tmp_path, "cp-off", read_ahead_bytes=0)
    start = off.initial_offset()
    assert next_splits(_splits(off, start, off.latest_offset(start, rate_limited=True))) == ()


def test_a_guess_the_log_did_not_confirm_is_dropped(tmp_path: Path) -> None:
    src, first, batch0 = _first_two(tmp_path)
    ahead = OwnerReadAhead()
    ahead.start(0, next_splits(batch0))
    # A file older than the guessed one appears: the next listing puts it first.
    _write(tmp_path / "in", 9, mtime=900)
    second = src.latest_offset(first, rate_limited=True)
    batch1 = _splits(src, first, second)
    assert [f[0].name for f in batch1[0].files] == ["part-0009.parquet"]  # type: ignore[attr-defined]
    frames = ahead.read(0, batch1)
    assert (ahead.hits, ahead.misses) == (0, 1)
    assert_frame_equal(pl.concat(frames), _events(9))


def test_a_file_rewritten_after_its_read_ahead_is_read_again(tmp_path: Path) -> None:
    src, first, batch0 = _first_two(tmp_path)
    ahead = OwnerReadAhead()
    ahead.start(0, next_splits(batch0))
    second = src.latest_offset(first, rate_limited=True)
    batch1 = _splits(src, first, second)
    assert_frame_equal(batch1[0].read(), _events(1))  # (the read ahead has the old rows)
    ahead._pending[0].future.result()  # the read ahead is done before the rewrite
    _write(tmp_path / "in", 1, mtime=5000, shift=7)  # rewritten in place: a new version
    frames = ahead.read(0, batch1)
    assert (ahead.hits, ahead.misses) == (0, 1)
    assert_frame_equal(pl.concat(frames), _events(1, shift=7))


def test_a_file_deleted_after_its_read_ahead_fails_the_batch_naming_it(tmp_path: Path) -> None:
    src, first, batch0 = _first_two(tmp_path)
    ahead = OwnerReadAhead()
    ahead.start(0, next_splits(batch0))
    second = src.latest_offset(first, rate_limited=True)
    batch1 = _splits(src, first, second)
    ahead._pending[0].future.result()
    gone = tmp_path / "in" / "part-0001.parquet"
    gone.unlink()
    with pytest.raises(SourceError) as without:
        batch1[0].read()
    with pytest.raises(SourceError) as raised:
        ahead.read(0, batch1)
    assert str(raised.value) == str(without.value)
    assert str(gone) in str(raised.value)


def test_a_failed_read_ahead_is_read_again_by_the_batch(tmp_path: Path) -> None:
    src, first, batch0 = _first_two(tmp_path)
    bad = tmp_path / "in" / "part-0001.parquet"
    good = bad.read_bytes()
    stat = bad.stat()
    bad.write_bytes(b"PAR1 this is not a parquet file")
    ahead = OwnerReadAhead()
    ahead.start(0, next_splits(batch0))
    ahead._pending[0].future.exception()  # it failed on the corrupt file
    bad.write_bytes(good)  # the file as listed again before the batch reads it
    os.utime(bad, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = src.latest_offset(first, rate_limited=True)
    frames = ahead.read(0, _splits(src, first, second))
    assert (ahead.hits, ahead.misses) == (0, 1)
    assert_frame_equal(pl.concat(frames), _events(1))
    # Corrupt for good: the batch's own read raises, naming the file, as without read-ahead.
    third = src.latest_offset(second, rate_limited=True)
    batch2 = _splits(src, second, third)
    corrupt = tmp_path / "in" / "part-0002.parquet"
    corrupt.write_bytes(b"PAR1 not parquet")
    with pytest.raises(SourceError) as without:
        batch2[0].read()
    ahead.start(0, batch2)  # type: ignore[arg-type]
    with pytest.raises(SourceError) as raised:
        ahead.read(0, batch2)
    assert str(raised.value) == str(without.value) and str(corrupt) in str(raised.value)
    assert (ahead.hits, ahead.misses) == (0, 2)
    ahead.close()
