"""Sources read in parts (``SplittableSource``): the splits' rows, concatenated in order,
are exactly ``read(start, end)``, and a split reads with nothing of the source's process."""

from __future__ import annotations

import pickle
from datetime import date, datetime
from pathlib import Path

import polars as pl
import pytest
from deltalake import DeltaTable, write_deltalake
from polars.testing import assert_frame_equal

from connectors._delta_files import plan_delta_splits
from connectors._file_splits import plan_file_splits
from connectors.delta_source import DeltaSourceSpec
from connectors.files import FileSourceSpec
from microstream.exceptions import SchemaMismatchError, SourceError
from microstream.protocols import Offset, Source, SourceContext, SplittableSource


def split_read(src: Source, start: Offset, end: Offset) -> pl.DataFrame:
    """The concatenation of the splits' reads, each split through pickle (as to a task)."""
    assert isinstance(src, SplittableSource)
    splits = src.plan_splits(start, end)
    assert splits is not None
    frames = [pickle.loads(pickle.dumps(split)).read() for split in splits]
    return pl.concat(frames, how="vertical")


def files_dir(tmp_path: Path, fmt: str) -> Path:
    data = tmp_path / "in"
    data.mkdir()
    for n in range(5):
        df = pl.DataFrame(
            {
                "id": [n * 10 + i for i in range(3)],
                "name": [f"r{n}-{i}" for i in range(3)],
                "ts": [datetime(2024, 1, 1, n, i) for i in range(3)],
            }
        )
        getattr(df, f"write_{fmt}")(data / f"{n}.{'ndjson' if fmt == 'ndjson' else fmt}")
    return data


@pytest.mark.parametrize("fmt", ["parquet", "csv", "ndjson"])
def test_file_splits_give_the_rows_of_read(
    tmp_path: Path, source_ctx: SourceContext, fmt: str
) -> None:
    data = files_dir(tmp_path, fmt)
    schema = {"id": pl.Int64, "name": pl.String, "ts": pl.Datetime("us")}
    spec = FileSourceSpec(str(data), format=fmt, schema=schema, max_files_per_trigger=2)  # type: ignore[arg-type]
    src = spec.build(source_ctx)
    start = src.initial_offset()
    first = src.latest_offset(start, rate_limited=True)  # 2 files
    end = src.latest_offset(first, rate_limited=True)  # 2 more
    end = src.latest_offset(end, rate_limited=True)  # the last
    expected = src.read(first, end)
    assert expected.height == 9
    got = split_read(src, first, end)
    assert_frame_equal(got, expected)
    assert got["id"].to_list() == [20, 21, 22, 30, 31, 32, 40, 41, 42]
    # Small files share a split; a low threshold gives one per file, same rows.
    files = [(f, "k.json") for f in [*src._entry(1).files, *src._entry(2).files]]
    per_file = plan_file_splits(spec, "d", spec.schema, files, split_bytes=1)
    assert per_file is not None and len(per_file) == 3
    assert_frame_equal(pl.concat([s.read() for s in per_file]), expected)


def test_file_splits_read_the_projected_columns(tmp_path: Path, source_ctx: SourceContext) -> None:
    data = files_dir(tmp_path, "parquet")
    schema = {"id": pl.Int64, "name": pl.String, "ts": pl.Datetime("us")}
    src = FileSourceSpec(str(data), schema=schema).build(source_ctx)
    src.project(["id", "ts"])
    start = src.initial_offset()
    end = src.latest_offset(start, rate_limited=False)
    got = split_read(src, start, end)
    assert got.schema == pl.Schema({"id": pl.Int64, "ts": pl.Datetime("us")})
    assert_frame_equal(got, src.read(start, end))


def test_file_split_of_a_corrupt_file_fails_as_read_does(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = files_dir(tmp_path, "parquet")
    (data / "2.parquet").write_bytes(b"not parquet at all")
    schema = {"id": pl.Int64, "name": pl.String, "ts": pl.Datetime("us")}
    src = FileSourceSpec(str(data), schema=schema).build(source_ctx)
    start = src.initial_offset()
    end = src.latest_offset(start, rate_limited=False)
    with pytest.raises(SourceError) as local:
        src.read(start, end)
    with pytest.raises(SourceError) as split:
        split_read(src, start, end)
    assert str(split.value) == str(local.value)
    assert str(data / "2.parquet") in str(split.value)


def test_file_split_of_a_bad_record_and_a_mismatch_fail_as_read_does(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.csv").write_text("id,name\n1,x\nnot-a-number,y\n")
    src = FileSourceSpec(str(data), format="csv", schema={"id": pl.Int64, "name": pl.String}).build(
        source_ctx
    )
    start = src.initial_offset()
    end = src.latest_offset(start, rate_limited=False)
    with pytest.raises(SourceError) as local:
        src.read(start, end)
    with pytest.raises(SourceError) as split:
        split_read(src, start, end)
    assert str(split.value) == str(local.value)
    assert "line 3" in str(split.value)

    other = tmp_path / "in2"
    other.mkdir()
    pl.DataFrame({"id": ["a"]}).write_parquet(other / "a.parquet")
    ctx = SourceContext(index=1, storage=source_ctx.storage.sub("../1"), query_id="q")
    src2 = FileSourceSpec(str(other), schema={"id": pl.Int64}).build(ctx)
    end2 = src2.latest_offset(src2.initial_offset(), rate_limited=False)
    with pytest.raises(SchemaMismatchError) as local_mismatch:
        src2.read(src2.initial_offset(), end2)
    with pytest.raises(SchemaMismatchError) as split_mismatch:
        split_read(src2, src2.initial_offset(), end2)
    assert str(split_mismatch.value) == str(local_mismatch.value)


def test_file_ranges_with_driver_side_effects_are_not_split(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = files_dir(tmp_path, "parquet")
    (data / "2.parquet").write_bytes(b"corrupt")
    schema = {"id": pl.Int64, "name": pl.String, "ts": pl.Datetime("us")}
    skipping = FileSourceSpec(str(data), schema=schema, on_bad_file="skip").build(source_ctx)
    start = skipping.initial_offset()
    end = skipping.latest_offset(start, rate_limited=False)
    assert skipping.plan_splits(start, end) is None  # skips are recorded by the driver
    assert skipping.read(start, end).height == 12
    assert skipping.skipped_files() == [str(data / "2.parquet")]
    # The same range read again under "fail" policies: the skip recorded in the log
    # must still apply, so it is read on the driver too.
    failing = FileSourceSpec(str(data), schema=schema).build(source_ctx)
    assert failing.plan_splits(start, end) is None
    assert failing.read(start, end).height == 12


def write(table: Path, df: pl.DataFrame, **options: object) -> None:
    write_deltalake(str(table), df.to_arrow(), mode="append", **options)  # type: ignore[call-overload]


def test_delta_splits_give_the_rows_of_read(tmp_path: Path, source_ctx: SourceContext) -> None:
    table = tmp_path / "t"
    df = pl.DataFrame(
        {
            "id": [1, 2, 3, 4],
            "day": [date(2024, 1, 1), date(2024, 1, 2), None, date(2024, 1, 1)],
            "v": [0.5, 1.5, 2.5, 3.5],
        }
    )
    write(table, df.head(2), partition_by=["day"])  # version 0 (the snapshot): 2 files
    src = DeltaSourceSpec(str(table)).build(source_ctx)
    write(table, df.tail(2), partition_by=["day"])  # version 1, from the commit log: 2 files
    start = src.initial_offset()
    end = src.latest_offset(start, rate_limited=False)
    expected = src.read(start, end)
    assert sorted(expected["id"].to_list()) == [1, 2, 3, 4]
    assert_frame_equal(split_read(src, start, end), expected)
    splits = src.plan_splits(start, end)
    assert splits is not None and len(splits) == 4  # a file each
    # Grouped a few files per split: the same rows.
    files = [f for s in splits for f in s.files]  # type: ignore[attr-defined]
    grouped = plan_delta_splits(src.spec, src.description, files, max_splits=3)
    assert [len(s.files) for s in grouped] == [2, 2]
    assert_frame_equal(pl.concat([s.read() for s in grouped]), expected)


def test_delta_change_feed_versions_are_read_on_the_driver(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    table = tmp_path / "t"
    rows = pl.DataFrame({"id": [1, 2], "part": ["a", "a"]})
    write(table, rows, configuration={"delta.enableChangeDataFeed": "true"})
    src = DeltaSourceSpec(str(table), read_change_feed=True, max_files_per_trigger=1).build(
        source_ctx
    )
    DeltaTable(str(table)).delete("id = 1")  # version 1: changes, read with load_cdf
    start = src.initial_offset()
    end = src.latest_offset(start, rate_limited=False)
    assert src.plan_splits(start, end) is None
    # The initial snapshot alone is data files: split, with the change columns.
    first = src.latest_offset(start, rate_limited=True)
    got = split_read(src, start, first)
    assert_frame_equal(got, src.read(start, first))
    assert got["_change_type"].to_list() == ["insert", "insert"]
