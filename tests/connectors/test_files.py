from __future__ import annotations

import itertools
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import fsspec
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import connectors._file_listing
import connectors._file_reading
import connectors.files
from connectors.files import FileLogEntry, FileOffset, FileSource, FileSourceSpec, LoggedFile
from connectors.rate import RateOffset
from microstream.checkpoint.storage import Storage
from microstream.exceptions import (
    CheckpointCorruptError,
    OffsetError,
    PlanError,
    SchemaMismatchError,
    SourceError,
)
from microstream.protocols import Source, SourceContext

SCHEMA = pl.Schema({"id": pl.Int64(), "name": pl.String()})
EXT = {"parquet": "parquet", "csv": "csv", "ndjson": "ndjson", "ipc": "arrow"}


def rows(*ids: int) -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids), "name": [f"n{i}" for i in ids]}, schema=SCHEMA)


def put(directory: str, name: str, df: pl.DataFrame, fmt: str = "parquet", mtime: float = 0) -> str:
    """Write ``df`` as ``directory/name`` (local or fsspec URL); a local file gets ``mtime``."""
    fs, root = fsspec.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    path = f"{root}/{name}"
    with fs.open(path, "wb") as fh:
        getattr(df, f"write_{fmt}")(fh)
    if mtime:
        os.utime(path, (mtime, mtime))
    return path


def build(ctx: SourceContext, directory: str | Path, **options: Any) -> FileSource:
    options.setdefault("schema", SCHEMA)
    return FileSourceSpec(str(directory), **options).build(ctx)


def off(k: int) -> FileOffset:
    return FileOffset(log_index=k)


# -- offsets, listing and reading ------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "csv", "ndjson", "ipc"])
def test_batches_take_new_files_once_in_mtime_order(
    tmp_path: Path, source_ctx: SourceContext, fmt: str
) -> None:
    data = tmp_path / "in"
    put(str(data), f"b.{EXT[fmt]}", rows(1, 2), fmt, mtime=1000)
    put(str(data), f"a.{EXT[fmt]}", rows(3), fmt, mtime=2000)  # newer, despite its name
    source = build(source_ctx, data, format=fmt)
    assert isinstance(source, Source)

    start = source.initial_offset()
    assert start == off(-1)
    end = source.latest_offset(start, rate_limited=True)
    assert end == off(0)
    assert_frame_equal(source.read(start, end), rows(1, 2, 3))
    assert source.latest_offset(end, rate_limited=True) == end  # nothing new

    put(str(data), f"c.{EXT[fmt]}", rows(4), fmt, mtime=3000)
    nxt = source.latest_offset(end, rate_limited=True)
    assert nxt == off(1)
    assert_frame_equal(source.read(end, nxt), rows(4))
    assert_frame_equal(source.read(start, nxt), rows(1, 2, 3, 4))
    assert_frame_equal(source.read(nxt, nxt), rows())
    entry = source_ctx.storage.read_model("1.json", FileLogEntry)
    assert [f.name for f in entry.files] == [f"c.{EXT[fmt]}"]
    assert entry.files[0].mtime == 3000


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_memory_filesystem(source_ctx: SourceContext, memory_url: str, fmt: str) -> None:
    put(memory_url, f"p0.{fmt}", rows(1), fmt)
    put(memory_url, f"p1.{fmt}", rows(2, 3), fmt)
    source = build(source_ctx, memory_url, format=fmt)
    end = source.latest_offset(source.initial_offset(), rate_limited=True)
    assert_frame_equal(source.read(source.initial_offset(), end), rows(1, 2, 3))
    assert source.description == f"FileSource[{fmt}: memory:///{memory_url[9:]}]"


def test_rate_limit_takes_oldest_first(tmp_path: Path, source_ctx: SourceContext) -> None:
    for i in range(5):
        put(str(tmp_path), f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, tmp_path, max_files_per_trigger=2)
    ends = [source.initial_offset()]
    for _ in range(3):
        ends.append(source.latest_offset(ends[-1], rate_limited=True))
    assert ends[1:] == [off(0), off(1), off(2)]
    got = [source.read(a, b)["id"].to_list() for a, b in itertools.pairwise(ends)]
    assert got == [[0, 1], [2, 3], [4]]
    assert source.latest_offset(ends[-1], rate_limited=True) == ends[-1]


def test_without_rate_limit_takes_everything(tmp_path: Path, source_ctx: SourceContext) -> None:
    for i in range(5):
        put(str(tmp_path), f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, tmp_path, max_files_per_trigger=2)
    end = source.latest_offset(off(-1), rate_limited=False)
    assert end == off(0)
    assert source.read(off(-1), end)["id"].to_list() == [0, 1, 2, 3, 4]


def test_latest_first(tmp_path: Path, source_ctx: SourceContext) -> None:
    for i in range(5):
        put(str(tmp_path), f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, tmp_path, max_files_per_trigger=2, latest_first=True)
    first = source.latest_offset(off(-1), rate_limited=True)
    assert source.read(off(-1), first)["id"].to_list() == [4, 3]
    second = source.latest_offset(first, rate_limited=True)
    assert source.read(first, second)["id"].to_list() == [2, 1]


def test_lag_counts_files_left_for_later(tmp_path: Path, source_ctx: SourceContext) -> None:
    for i in range(5):
        put(str(tmp_path), f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, tmp_path, max_files_per_trigger=2)
    end = source.latest_offset(off(-1), rate_limited=True)
    assert source.lag(end) == 3
    assert source.lag(off(-1)) == 5
    assert end.distance(off(-1)) == 1


def test_hidden_files_and_glob(tmp_path: Path, source_ctx: SourceContext) -> None:
    put(str(tmp_path), "a.parquet", rows(1), mtime=1000)
    put(str(tmp_path), ".a.parquet.tmp", rows(2), mtime=1001)
    put(str(tmp_path), "_SUCCESS", rows(3), mtime=1002)
    put(str(tmp_path), "b.data", rows(4), mtime=1003)
    (tmp_path / "sub").mkdir()
    put(str(tmp_path / "sub"), "c.parquet", rows(5), mtime=1004)
    default = build(source_ctx, tmp_path)  # the format's extension: b.data is not parquet
    end = default.latest_offset(off(-1), rate_limited=True)
    assert default.read(off(-1), end)["id"].to_list() == [1]

    ctx = replace(source_ctx, storage=source_ctx.storage.sub("other"))
    everything = build(ctx, tmp_path, glob="*")
    end = everything.latest_offset(off(-1), rate_limited=True)
    assert everything.read(off(-1), end)["id"].to_list() == [1, 4]


def test_recursive_skips_hidden_directories(tmp_path: Path, source_ctx: SourceContext) -> None:
    put(str(tmp_path), "a.parquet", rows(1), mtime=1000)
    put(str(tmp_path / "day=1"), "b.parquet", rows(2), mtime=1001)
    put(str(tmp_path / "_tmp"), "c.parquet", rows(3), mtime=1002)
    source = build(source_ctx, tmp_path, recursive=True)
    end = source.latest_offset(off(-1), rate_limited=True)
    assert source.read(off(-1), end)["id"].to_list() == [1, 2]
    entry = source_ctx.storage.read_model("0.json", FileLogEntry)
    assert [f.name for f in entry.files] == ["a.parquet", "day=1/b.parquet"]


def test_wait_for_path_waits_for_the_directory(
    tmp_path: Path, source_ctx: SourceContext, caplog: pytest.LogCaptureFixture
) -> None:
    source = build(source_ctx, tmp_path / "not-yet", wait_for_path=True)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        assert source.latest_offset(off(-1), rate_limited=True) == off(-1)
        assert source.latest_offset(off(-1), rate_limited=True) == off(-1)
    waiting = [r.getMessage() for r in caplog.records if "waiting for it" in r.getMessage()]
    assert len(waiting) == 1  # logged once, not at every trigger
    assert f"{tmp_path / 'not-yet'} does not exist (yet)" in waiting[0]
    put(str(tmp_path / "not-yet"), "a.parquet", rows(1))
    assert source.latest_offset(off(-1), rate_limited=True) == off(0)


@pytest.mark.parametrize(
    ("where", "recursive"), [("local", False), ("local", True), ("memory", False)]
)
def test_listing_describes_only_new_files(
    tmp_path: Path,
    source_ctx: SourceContext,
    memory_url: str,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
    recursive: bool,
) -> None:
    directory = str(tmp_path / "in") if where == "local" else memory_url
    for i in range(20):
        put(directory, f"f{i}.parquet", rows(i))
    source = build(source_ctx, directory, recursive=recursive)
    first = source.latest_offset(off(-1), rate_limited=True)
    put(directory, "g.parquet", rows(20))
    put(directory, "h.parquet", rows(21))

    described: list[str] = []

    def counting(**fields: Any) -> LoggedFile:
        described.append(fields["name"])
        return LoggedFile(**fields)

    monkeypatch.setattr(connectors._file_listing, "LoggedFile", counting)
    second = source.latest_offset(first, rate_limited=True)
    assert sorted(described) == ["g.parquet", "h.parquet"]  # not the 20 files already taken
    assert source.latest_offset(second, rate_limited=True) == second
    assert sorted(described) == ["g.parquet", "h.parquet"]
    assert sorted(source.read(first, second)["id"].to_list()) == [20, 21]


# -- replay after a restart ------------------------------------------------------------------------


def test_restart_replays_logged_entry_with_the_same_files(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    put(str(data), "a.parquet", rows(1), mtime=1000)
    put(str(data), "b.parquet", rows(2), mtime=1001)
    first = build(source_ctx, data, max_files_per_trigger=1)
    assert first.latest_offset(off(-1), rate_limited=True) == off(0)  # logged, never committed
    first.stop()

    put(str(data), "c.parquet", rows(3), mtime=999)  # older than everything, arrives late
    again = build(source_ctx, data, max_files_per_trigger=1)
    end = again.latest_offset(off(-1), rate_limited=True)
    assert end == off(0)
    assert_frame_equal(again.read(off(-1), end), rows(1))
    nxt = again.latest_offset(end, rate_limited=True)
    assert_frame_equal(again.read(end, nxt), rows(3))  # new listing: oldest first
    last = again.latest_offset(nxt, rate_limited=True)
    assert_frame_equal(again.read(nxt, last), rows(2))
    assert again.latest_offset(last, rate_limited=True) == last


def test_restart_never_retakes_logged_files(tmp_path: Path, source_ctx: SourceContext) -> None:
    put(str(tmp_path), "a.parquet", rows(1), mtime=1000)
    first = build(source_ctx, tmp_path)
    end = first.latest_offset(off(-1), rate_limited=True)
    again = build(source_ctx, tmp_path)
    assert again.latest_offset(end, rate_limited=True) == end
    assert_frame_equal(again.read(off(-1), end), rows(1))


def test_offset_beyond_the_log_is_refused(tmp_path: Path, source_ctx: SourceContext) -> None:
    source = build(source_ctx, tmp_path)
    with pytest.raises(OffsetError, match=r"log_index=3 is beyond the last entry \(-1\)"):
        source.latest_offset(off(3), rate_limited=True)
    with pytest.raises(OffsetError, match=r"cannot read \(-1, 2\]"):
        source.read(off(-1), off(2))


def test_log_with_a_gap_is_an_error(tmp_path: Path, source_ctx: SourceContext) -> None:
    source_ctx.storage.write_model("0.json", FileLogEntry(files=[]))
    source_ctx.storage.write_model("2.json", FileLogEntry(files=[]))
    with pytest.raises(SourceError, match=r"lacks entry 1\.json"):
        build(source_ctx, tmp_path)


def test_corrupt_log_entry_names_the_file(tmp_path: Path, source_ctx: SourceContext) -> None:
    source_ctx.storage.write_bytes("0.json", b'{"files": [{"name": "a.parq')
    with pytest.raises(CheckpointCorruptError, match=r"sources/0/0\.json is corrupt"):
        build(source_ctx, tmp_path)


# -- available now ---------------------------------------------------------------------------------


def test_available_now_stops_at_the_files_present(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    put(str(tmp_path), "a.parquet", rows(1), mtime=1000)
    put(str(tmp_path), "b.parquet", rows(2), mtime=1001)
    source = build(source_ctx, tmp_path, max_files_per_trigger=1)
    source.prepare_for_available_now()
    put(str(tmp_path), "c.parquet", rows(3), mtime=900)
    first = source.latest_offset(off(-1), rate_limited=True)
    second = source.latest_offset(first, rate_limited=True)
    assert source.latest_offset(second, rate_limited=True) == second
    assert source.read(off(-1), second)["id"].to_list() == [1, 2]

    later = build(source_ctx, tmp_path, max_files_per_trigger=1)  # the next scheduled run
    third = later.latest_offset(second, rate_limited=True)
    assert later.read(second, third)["id"].to_list() == [3]


# -- schema ----------------------------------------------------------------------------------------


def test_schema_inferred_from_the_oldest_file(tmp_path: Path) -> None:
    put(str(tmp_path), "new.parquet", pl.DataFrame({"z": ["x"]}), mtime=2000)
    put(str(tmp_path), "old.parquet", pl.DataFrame({"a": [1]}, schema={"a": pl.Int32}), mtime=1000)
    spec = FileSourceSpec(str(tmp_path), format="parquet")
    assert spec.schema == pl.Schema({"a": pl.Int32()})


def test_csv_schema_inferred(memory_url: str) -> None:
    put(memory_url, "a.csv", rows(1), "csv")
    assert FileSourceSpec(memory_url, format="csv").schema == SCHEMA


def test_no_schema_and_no_file_asks_for_schema(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"no file there yet\. Pass schema="):
        FileSourceSpec(str(tmp_path), format="csv")
    with pytest.raises(PlanError, match="Pass schema="):
        FileSourceSpec(str(tmp_path / "missing"), format="csv")


def test_unreadable_file_for_inference(tmp_path: Path) -> None:
    (tmp_path / "a.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match=r"cannot infer the schema from .*a\.parquet"):
        FileSourceSpec(str(tmp_path), format="parquet")


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("fmt", ["parquet", "ipc", "csv"])
def test_missing_column_names_file_and_column(
    tmp_path: Path, source_ctx: SourceContext, memory_url: str, fmt: str, where: str
) -> None:
    directory = str(tmp_path) if where == "local" else memory_url
    put(directory, f"bad.{fmt}", pl.DataFrame({"id": [1]}), fmt)
    source = build(source_ctx, directory, format=fmt)
    end = source.latest_offset(off(-1), rate_limited=True)
    with pytest.raises(
        SchemaMismatchError, match=rf"bad\.{fmt} has no column 'name' \(expected dtype String\)"
    ):
        source.read(off(-1), end)


@pytest.mark.parametrize("fmt", ["parquet", "ipc"])
def test_wrong_dtype_names_file_column_and_dtypes(
    tmp_path: Path, source_ctx: SourceContext, fmt: str
) -> None:
    put(str(tmp_path), f"bad.{fmt}", pl.DataFrame({"id": ["x"], "name": ["a"]}), fmt)
    source = build(source_ctx, tmp_path, format=fmt)
    end = source.latest_offset(off(-1), rate_limited=True)
    with pytest.raises(
        SchemaMismatchError,
        match=rf"bad\.{fmt} has column 'id' as String, but the source schema says Int64",
    ):
        source.read(off(-1), end)


def test_narrowing_is_refused(tmp_path: Path, source_ctx: SourceContext) -> None:
    put(str(tmp_path), "wide.parquet", pl.DataFrame({"id": [1], "name": ["a"]}))
    source = build(source_ctx, tmp_path, schema={"id": pl.Int32, "name": pl.String})
    end = source.latest_offset(off(-1), rate_limited=True)
    with pytest.raises(
        SchemaMismatchError, match="'id' as Int64, but the source schema says Int32"
    ):
        source.read(off(-1), end)


@pytest.mark.parametrize(
    ("found", "expected", "ok"),
    [
        (pl.Int32, pl.Int64, True),
        (pl.UInt32, pl.Int64, True),
        (pl.UInt64, pl.Int64, False),
        (pl.Int16, pl.Float32, True),
        (pl.Int32, pl.Float64, True),
        (pl.Int64, pl.Float64, False),
        (pl.Float32, pl.Float64, True),
        (pl.Float64, pl.Float32, False),
        (pl.Datetime("ms"), pl.Datetime("us"), True),
        (pl.Datetime("ns"), pl.Datetime("us"), False),
        (pl.Datetime("ms", "UTC"), pl.Datetime("us"), False),
        (pl.Int64, pl.String, False),
        (pl.Null, pl.String, True),
    ],
)
def test_only_lossless_widening_is_applied(
    tmp_path: Path, source_ctx: SourceContext, found: Any, expected: Any, ok: bool
) -> None:
    df = pl.DataFrame({"v": [None]}, schema={"v": found})
    put(str(tmp_path), "a.parquet", df)
    source = build(source_ctx, tmp_path, schema={"v": expected})
    end = source.latest_offset(off(-1), rate_limited=True)
    if ok:
        got = source.read(off(-1), end)
        assert_frame_equal(got, pl.DataFrame({"v": [None]}, schema={"v": expected}))
    else:
        with pytest.raises(SchemaMismatchError, match=r"a\.parquet has column 'v' as "):
            source.read(off(-1), end)


def test_matching_frame_is_returned_as_is() -> None:
    df = rows(1, 2)
    assert connectors._file_reading.conform(df, SCHEMA, "a.parquet") is df
    reordered = df.select("name", "id")
    assert_frame_equal(connectors._file_reading.conform(reordered, SCHEMA, "a.parquet"), df)


def test_one_read_pool_per_source_shut_down_on_stop(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    for i in range(4):
        put(str(tmp_path), f"f{i}.parquet", rows(i), mtime=1000 + i)
    source = build(source_ctx, tmp_path, max_files_per_trigger=2)
    first = source.latest_offset(off(-1), rate_limited=True)
    second = source.latest_offset(first, rate_limited=True)
    assert source.read(off(-1), first)["id"].to_list() == [0, 1]
    pool = source._pool
    assert pool is not None
    assert source.read(first, second)["id"].to_list() == [2, 3]
    assert source._pool is pool
    source.stop()
    assert source._pool is None
    assert pool._shutdown
    source.stop()  # idempotent
    assert source.read(off(-1), second)["id"].to_list() == [0, 1, 2, 3]  # a new pool if read again
    source.stop()


def test_widening_and_extra_columns(tmp_path: Path, source_ctx: SourceContext) -> None:
    narrow = pl.DataFrame(
        {"extra": [True], "name": ["n7"], "id": [7]}, schema_overrides={"id": pl.Int16}
    )
    put(str(tmp_path), "narrow.parquet", narrow, mtime=1000)
    put(str(tmp_path), "exact.parquet", rows(8), mtime=1001)
    source = build(source_ctx, tmp_path)
    end = source.latest_offset(off(-1), rate_limited=True)
    assert_frame_equal(source.read(off(-1), end), rows(7, 8))


def test_csv_unparsable_value_is_a_source_error(tmp_path: Path, source_ctx: SourceContext) -> None:
    (tmp_path / "bad.csv").write_text("id,name\nseven,a\n")
    source = build(source_ctx, tmp_path, format="csv")
    end = source.latest_offset(off(-1), rate_limited=True)
    with pytest.raises(
        SourceError, match=r"bad record in file .*bad\.csv line 2: .*`seven`.*on_bad_record='skip'"
    ):
        source.read(off(-1), end)


def test_ndjson_missing_field_is_null(tmp_path: Path, source_ctx: SourceContext) -> None:
    (tmp_path / "a.ndjson").write_text('{"id": 1}\n{"id": 2, "name": "b", "other": 3}\n')
    source = build(source_ctx, tmp_path, format="ndjson")
    end = source.latest_offset(off(-1), rate_limited=True)
    expected = pl.DataFrame({"id": [1, 2], "name": [None, "b"]}, schema=SCHEMA)
    assert_frame_equal(source.read(off(-1), end), expected)


def test_empty_csv_file_has_no_rows(tmp_path: Path, source_ctx: SourceContext) -> None:
    (tmp_path / "empty.csv").write_text("")
    source = build(source_ctx, tmp_path, format="csv")
    end = source.latest_offset(off(-1), rate_limited=True)
    assert_frame_equal(source.read(off(-1), end), rows())


# -- broken and vanished files ---------------------------------------------------------------------


@pytest.mark.parametrize("where", ["local", "memory"])
def test_corrupt_file_names_file_and_log_entry(
    tmp_path: Path, source_ctx: SourceContext, memory_url: str, where: str
) -> None:
    directory = str(tmp_path / "in") if where == "local" else memory_url
    fs, root = fsspec.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/broken.parquet", b"PAR1 garbage")
    source = build(source_ctx, directory)
    end = source.latest_offset(off(-1), rate_limited=True)
    with pytest.raises(
        SourceError,
        match=r"file .*broken\.parquet \(source log entry .*sources/0/0\.json\) as parquet",
    ):
        source.read(off(-1), end)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_deleted_logged_file_cannot_be_replayed(
    tmp_path: Path, source_ctx: SourceContext, memory_url: str, where: str
) -> None:
    directory = str(tmp_path / "in") if where == "local" else memory_url
    path = put(directory, "a.parquet", rows(1))
    source = build(source_ctx, directory)
    end = source.latest_offset(off(-1), rate_limited=True)
    fsspec.url_to_fs(directory)[0].rm_file(path)
    with pytest.raises(SourceError, match=r"a\.parquet .* no longer exists.*cannot be replayed"):
        source.read(off(-1), end)


# -- clean-up --------------------------------------------------------------------------------------


def test_clean_source_delete(tmp_path: Path, source_ctx: SourceContext) -> None:
    data = tmp_path / "in"
    put(str(data), "a.parquet", rows(1), mtime=1000)
    put(str(data), "b.parquet", rows(2), mtime=1001)
    source = build(source_ctx, data, clean_source="delete", max_files_per_trigger=1)
    first = source.latest_offset(off(-1), rate_limited=True)
    second = source.latest_offset(first, rate_limited=True)
    source.commit(off(-1))
    assert sorted(p.name for p in data.iterdir()) == ["a.parquet", "b.parquet"]
    source.commit(first)
    assert sorted(p.name for p in data.iterdir()) == ["b.parquet"]
    source.commit(first)  # idempotent
    again = build(source_ctx, data, clean_source="delete", max_files_per_trigger=1)
    again.commit(second)
    assert list(data.iterdir()) == []


def test_clean_source_archive_keeps_relative_names(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data, archive = tmp_path / "in", tmp_path / "archive"
    put(str(data), "a.parquet", rows(1), mtime=1000)
    put(str(data / "d=1"), "b.parquet", rows(2), mtime=1001)
    source = build(
        source_ctx, data, clean_source="archive", source_archive_dir=str(archive), recursive=True
    )
    end = source.latest_offset(off(-1), rate_limited=True)
    source.commit(end)
    assert sorted(str(p.relative_to(archive)) for p in archive.rglob("*.parquet")) == [
        "a.parquet",
        "d=1/b.parquet",
    ]
    assert list(data.rglob("*.parquet")) == []


def test_clean_source_archive_on_memory(source_ctx: SourceContext, memory_url: str) -> None:
    put(memory_url, "a.csv", rows(1), "csv")
    source = build(
        source_ctx,
        memory_url,
        format="csv",
        clean_source="archive",
        source_archive_dir=memory_url + "-archive",
    )
    source.commit(source.latest_offset(off(-1), rate_limited=True))
    fs, root = fsspec.url_to_fs(memory_url)
    assert fs.ls(root, detail=False) == []
    assert fs.exists(fsspec.url_to_fs(memory_url + "-archive")[1] + "/a.csv")


def test_clean_up_failure_is_a_warning(
    tmp_path: Path,
    source_ctx: SourceContext,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    put(str(tmp_path), "a.parquet", rows(1))
    source = build(source_ctx, tmp_path, clean_source="delete")
    end = source.latest_offset(off(-1), rate_limited=True)

    def refuse(path: str) -> None:
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(source._dir.fs, "rm_file", refuse)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        source.commit(end)
    assert "cannot delete" in caplog.text
    assert "a.parquet" in caplog.text
    assert (tmp_path / "a.parquet").exists()


# -- offsets and options ---------------------------------------------------------------------------


def test_parse_offset(tmp_path: Path, source_ctx: SourceContext) -> None:
    source = build(source_ctx, tmp_path)
    assert source.parse_offset({"log_index": 4}) == off(4)
    assert source.parse_offset(off(2).model_dump(mode="json")) == off(2)
    with pytest.raises(OffsetError, match="is not a file source offset"):
        source.parse_offset({"log_index": -2})
    with pytest.raises(OffsetError, match="is not a file source offset"):
        source.parse_offset({"rows": 3})


def test_offsets_compare_only_with_file_offsets() -> None:
    assert off(2).follows_or_equals(off(2))
    assert not off(1).follows_or_equals(off(2))
    with pytest.raises(OffsetError, match="expected a FileOffset"):
        off(1).follows_or_equals(RateOffset(rows=1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"format": "xlsx"}, "format must be one of"),
        ({"max_files_per_trigger": 0}, "max_files_per_trigger must be a positive int"),
        ({"max_files_per_trigger": True}, "max_files_per_trigger must be a positive int"),
        ({"clean_source": "move"}, "clean_source must be one of"),
        ({"clean_source": "archive"}, "needs source_archive_dir"),
        ({"source_archive_dir": "/tmp/x"}, "only used with clean_source='archive'"),
        ({"glob": ""}, "glob must be a non-empty pattern"),
        ({"schema": {"a": "no-type"}}, "schema must map column names to polars dtypes"),
    ],
)
def test_invalid_options(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    options.setdefault("schema", SCHEMA)
    with pytest.raises(ValueError, match=message):
        FileSourceSpec(str(tmp_path), **options)


def test_archive_dir_inside_the_watched_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must not be inside the watched directory"):
        FileSourceSpec(
            str(tmp_path), schema=SCHEMA, clean_source="archive", source_archive_dir=str(tmp_path)
        )
    with pytest.raises(ValueError, match="must not be inside the watched directory"):
        FileSourceSpec(
            str(tmp_path),
            schema=SCHEMA,
            clean_source="archive",
            source_archive_dir=str(tmp_path / "done"),
            recursive=True,
        )
    with pytest.raises(ValueError, match="same filesystem"):
        FileSourceSpec(
            str(tmp_path), schema=SCHEMA, clean_source="archive", source_archive_dir="memory://x"
        )


def test_spec_identity_and_equality(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    spec = FileSourceSpec("in", format="csv", schema={"id": pl.Int64})
    assert spec.identity() == {"path": str(tmp_path / "in"), "format": "csv"}
    assert spec == FileSourceSpec("in", format="csv", schema=pl.Schema({"id": pl.Int64}))
    assert spec != FileSourceSpec("in", format="csv", schema={"id": pl.Int32})
    assert spec.kind == "files"
    assert spec.describe() == f"FileSource[csv: {tmp_path / 'in'}]"
    with pytest.raises(AttributeError):
        spec.path = "other"  # type: ignore[misc]


def test_storage_is_the_only_log(tmp_path: Path, source_ctx: SourceContext) -> None:
    put(str(tmp_path / "in"), "a.parquet", rows(1))
    source = build(source_ctx, tmp_path / "in", clean_source="delete")
    source.commit(source.latest_offset(off(-1), rate_limited=True))
    storage: Storage = source_ctx.storage
    assert sorted(p.name for p in Path(storage.root).iterdir()) == ["0.json", "cleaned.json"]
