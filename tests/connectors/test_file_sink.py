from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import fsspec
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from connectors.file_sink import (
    FileSink,
    FileSinkManifest,
    FileSinkSpec,
    read_file_sink,
)
from microstream.checkpoint.storage import Storage
from microstream.exceptions import SinkError
from microstream.protocols import Sink, SinkContext

SCHEMA = pl.Schema(
    {"id": pl.Int64(), "name": pl.String(), "ts": pl.Datetime("us"), "score": pl.Float32()}
)


def batch(*ids: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": list(ids),
            "name": [None if i % 3 == 0 else f"n{i}" for i in ids],
            "ts": [datetime(2024, 1, 1, 0, 0, i) for i in ids],
            "score": [i / 2 for i in ids],
        },
        schema=SCHEMA,
    )


def data_files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory))
        for p in directory.rglob("part-*")
        if "_microstream_log" not in p.parts
    )


@pytest.mark.parametrize("fmt", ["parquet", "csv", "ndjson", "ipc"])
def test_batches_read_back_exactly(tmp_path: Path, sink_ctx: SinkContext, fmt: str) -> None:
    out = tmp_path / "out"
    sink = FileSinkSpec(str(out), format=fmt).build(sink_ctx)  # type: ignore[arg-type]
    assert isinstance(sink, Sink)
    sink.add_batch(0, batch(1, 2, 3))
    sink.add_batch(1, batch(4))
    assert_frame_equal(read_file_sink(out), batch(1, 2, 3, 4))
    ext = {"ipc": "arrow"}.get(fmt, fmt)
    names = data_files(out)
    assert len(names) == 2
    assert names[0].startswith("part-00000-") and names[0].endswith(f".{ext}")
    assert names[1].startswith("part-00001-")


def test_manifest_lists_files_rows_and_bytes(tmp_path: Path, sink_ctx: SinkContext) -> None:
    sink = FileSinkSpec(str(tmp_path)).build(sink_ctx)
    sink.add_batch(7, batch(1, 2))
    entry = Storage(str(tmp_path)).read_model("_microstream_log/7.json", FileSinkManifest)
    assert entry.batch_id == 7
    assert entry.query_id == "q"
    assert entry.format == "parquet"
    [listed] = entry.files
    assert listed.rows == 2
    assert listed.bytes == (tmp_path / listed.name).stat().st_size


def test_replayed_batch_is_skipped(tmp_path: Path, sink_ctx: SinkContext) -> None:
    sink = FileSinkSpec(str(tmp_path), format="csv").build(sink_ctx)
    sink.add_batch(0, batch(1))
    sink.add_batch(0, batch(1))
    sink.add_batch(1, batch(2))
    restarted = FileSinkSpec(str(tmp_path), format="csv").build(sink_ctx)
    restarted.add_batch(1, batch(2))
    restarted.add_batch(2, batch(3))
    assert_frame_equal(read_file_sink(tmp_path), batch(1, 2, 3))
    assert len(data_files(tmp_path)) == 3


def test_orphans_of_a_failed_attempt_are_invisible(
    tmp_path: Path, sink_ctx: SinkContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = FileSinkSpec(str(tmp_path)).build(sink_ctx)
    sink.add_batch(0, batch(1))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(sink._manifest, "write_model", crash)
    with pytest.raises(SinkError, match=r"cannot write manifest entry .*1\.json for batch 1"):
        sink.add_batch(1, batch(2, 3))
    assert len(data_files(tmp_path)) == 2  # the orphan is on disk ...
    assert_frame_equal(read_file_sink(tmp_path), batch(1))  # ... but not visible
    monkeypatch.undo()

    retry = FileSinkSpec(str(tmp_path)).build(sink_ctx)  # the re-run after the crash
    retry.add_batch(1, batch(2, 3))
    assert_frame_equal(read_file_sink(tmp_path), batch(1, 2, 3))
    assert len(data_files(tmp_path)) == 3


def test_empty_batch_writes_only_a_manifest_entry(tmp_path: Path, sink_ctx: SinkContext) -> None:
    sink = FileSinkSpec(str(tmp_path), format="csv").build(sink_ctx)
    sink.add_batch(0, batch())
    assert data_files(tmp_path) == []
    assert (tmp_path / "_microstream_log" / "0.json").exists()
    assert_frame_equal(read_file_sink(tmp_path), batch())  # keeps the schema
    sink.add_batch(1, batch(5))
    assert_frame_equal(read_file_sink(tmp_path), batch(5))


def test_memory_filesystem(sink_ctx: SinkContext, memory_url: str) -> None:
    sink = FileSinkSpec(memory_url, format="ndjson").build(sink_ctx)
    sink.add_batch(0, batch(1, 2))
    sink.add_batch(0, batch(1, 2))
    sink.add_batch(1, batch(3))
    assert_frame_equal(read_file_sink(memory_url), batch(1, 2, 3))
    fs, root = fsspec.url_to_fs(memory_url)
    assert len(fs.glob(f"{root}/part-*.ndjson")) == 2


def test_partition_by(tmp_path: Path, sink_ctx: SinkContext) -> None:
    sink = FileSinkSpec(str(tmp_path), partition_by=["name"]).build(sink_ctx)
    df = pl.DataFrame({"name": ["a b", None, "a b", "c"], "v": [1, 2, 3, 4]})
    sink.add_batch(0, df)
    dirs = sorted({name.split("/")[0] for name in data_files(tmp_path)})
    assert dirs == ["name=__HIVE_DEFAULT_PARTITION__", "name=a%20b", "name=c"]
    expected = pl.DataFrame({"name": ["a b", "a b", None, "c"], "v": [1, 3, 2, 4]})
    assert_frame_equal(read_file_sink(tmp_path), expected)


def test_missing_partition_column(tmp_path: Path, sink_ctx: SinkContext) -> None:
    sink = FileSinkSpec(str(tmp_path), partition_by=["day"]).build(sink_ctx)
    with pytest.raises(SinkError, match=r"batch 3 has no partition column\(s\) \['day'\]"):
        sink.add_batch(3, batch(1))


def test_write_failure_names_path_and_batch(tmp_path: Path, sink_ctx: SinkContext) -> None:
    sink = FileSinkSpec(str(tmp_path), format="csv").build(sink_ctx)
    nested = pl.DataFrame({"xs": [[1, 2]]})  # csv cannot hold a list column
    with pytest.raises(
        SinkError, match=rf"cannot write {tmp_path}/part-00004-\w+\.csv for batch 4"
    ):
        sink.add_batch(4, nested)
    assert not (tmp_path / "_microstream_log" / "4.json").exists()


def test_directory_belongs_to_one_query(tmp_path: Path, sink_ctx: SinkContext) -> None:
    FileSinkSpec(str(tmp_path)).build(sink_ctx).add_batch(0, batch(1))
    other = replace(sink_ctx, query_id="other")
    with pytest.raises(SinkError, match="already holds the output of query q"):
        FileSinkSpec(str(tmp_path)).build(other)


def test_only_append_mode(tmp_path: Path, sink_ctx: SinkContext) -> None:
    spec = FileSinkSpec(str(tmp_path))
    assert spec.output_modes == frozenset({"append"})
    assert spec.durable
    with pytest.raises(SinkError, match="supports output_mode 'append' only; got 'complete'"):
        spec.build(replace(sink_ctx, output_mode="complete"))


def test_read_file_sink_errors(tmp_path: Path, sink_ctx: SinkContext) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(SinkError, match="is not the output of a microstream file sink"):
        read_file_sink(tmp_path / "plain")
    with pytest.raises(SinkError, match="is not the output of a microstream file sink"):
        read_file_sink(tmp_path / "missing")
    (tmp_path / "fresh" / "_microstream_log").mkdir(parents=True)
    assert_frame_equal(read_file_sink(tmp_path / "fresh"), pl.DataFrame())

    out = tmp_path / "out"
    FileSinkSpec(str(out)).build(sink_ctx).add_batch(0, batch(1))
    (out / data_files(out)[0]).unlink()
    with pytest.raises(SinkError, match=r"listed in the manifest of batch 0, is gone"):
        read_file_sink(out)


def test_spec_validation_and_normalisation(tmp_path: Path) -> None:
    spec = FileSinkSpec(tmp_path, partition_by=["a", "b"])  # type: ignore[arg-type]
    assert spec.path == str(tmp_path)
    assert spec.partition_by == ("a", "b")
    assert spec == FileSinkSpec(str(tmp_path), partition_by=("a", "b"))
    assert spec.describe() == f"FileSink[parquet: {tmp_path}]"
    with pytest.raises(ValueError, match="format must be one of"):
        FileSinkSpec(str(tmp_path), format="xlsx")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="partition_by must be a non-empty list"):
        FileSinkSpec(str(tmp_path), partition_by=[])


def test_runtime_type(tmp_path: Path, sink_ctx: SinkContext) -> None:
    assert isinstance(FileSinkSpec(str(tmp_path)).build(sink_ctx), FileSink)


def test_fsync_mode_syncs_data_before_the_manifest(
    tmp_path: Path, sink_ctx: SinkContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICROSTREAM_FSYNC", "1")
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sink = FileSinkSpec(str(tmp_path)).build(sink_ctx)
    sink.add_batch(0, batch(1))
    data = [i for i, name in enumerate(synced) if name.startswith("part-00000-")]
    manifest = [i for i, name in enumerate(synced) if "0.json" in name]
    assert data and manifest and data[0] < manifest[0], synced
    assert_frame_equal(read_file_sink(tmp_path), batch(1))
