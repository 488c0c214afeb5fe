"""The file source's policies: bad and missing files, bad records, paths, new and missing columns.

Each test here failed on the source before these policies existed: a bad file
blocked the stream for good, a ragged csv row was padded or truncated, a glob
or a missing directory ran forever with no rows, a new column was dropped
without a word.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from connectors.files import (
    DEAD_LETTER_SCHEMA,
    FileOffset,
    FileSource,
    FileSourceSpec,
    SkippedFiles,
)
from microstream.checkpoint.storage import Storage
from microstream.exceptions import SchemaMismatchError, SourceError
from microstream.protocols import SideOutputTarget, SourceContext

SCHEMA = pl.Schema({"id": pl.Int64(), "name": pl.String()})


def rows(*ids: int) -> pl.DataFrame:
    return pl.DataFrame({"id": list(ids), "name": [f"n{i}" for i in ids]}, schema=SCHEMA)


def write(directory: Path, name: str, df: pl.DataFrame, mtime: int, fmt: str = "parquet") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    getattr(df, f"write_{fmt}")(path)
    os.utime(path, (mtime, mtime))
    return path


def write_text(directory: Path, name: str, text: str | bytes, mtime: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    os.utime(path, (mtime, mtime))
    return path


class Collected:
    """A side output that keeps what a source emits (the engine's, without a query)."""

    def __init__(self) -> None:
        self.declared: dict[str, pl.Schema] = {}
        self.rows: list[pl.DataFrame] = []

    def declare(self, target: SideOutputTarget, schema: pl.Schema) -> None:
        self.declared[str(target)] = schema

    def emit(self, target: SideOutputTarget, rows: pl.DataFrame) -> None:
        self.rows.append(rows)

    def frame(self) -> pl.DataFrame:
        return pl.concat(self.rows) if self.rows else pl.DataFrame(schema=DEAD_LETTER_SCHEMA)


def build(ctx: SourceContext, directory: str | Path, **options: Any) -> FileSource:
    options.setdefault("schema", SCHEMA)
    return FileSourceSpec(str(directory), **options).build(ctx)


def off(k: int) -> FileOffset:
    return FileOffset(log_index=k)


def read_all(source: FileSource) -> pl.DataFrame:
    end = source.latest_offset(off(-1), rate_limited=False)
    return source.read(off(-1), end)


def files_query(
    tmp_path: Path, name: str, **options: Any
) -> tuple[ms.StreamingQuery, pl.DataFrame | None]:
    """Run a memory-sink query over ``tmp_path/in`` to the end of the files there."""
    options.setdefault("schema", SCHEMA)
    frame = ms.scan_files(tmp_path / "in", **options)
    query = frame.sink_memory(name, checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now())
    with contextlib.suppress(ms.MicrostreamError):  # the caller looks at query.exception()
        query.await_termination(timeout=60)
    return query, ms.table(name)


# -- item 4: a bad file ----------------------------------------------------------------------------


def test_bad_file_fails_and_the_advised_restart_skips_it(tmp_path: Path) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1, 2), 1000)
    write_text(data, "b.parquet", b"PAR1 not parquet at all", 1001)

    frame = ms.scan_files(data, schema=SCHEMA)
    query = frame.sink_memory("pol_bad", checkpoint=tmp_path / "cp", trigger=ms.Trigger.once())
    with pytest.raises(ms.SourceError) as info:
        query.await_termination(timeout=60)
    message = str(info.value)
    assert "b.parquet" in message and "sources/0/0.json" in message
    assert "restart the query with on_bad_file='skip' or 'dead_letter'" in message

    # The advice works: the same checkpoint, on_bad_file="skip", re-runs batch 0 without b.
    query, table = files_query(tmp_path, "pol_bad", on_bad_file="skip")
    assert query.exception() is None
    assert table is not None
    assert_frame_equal(table, rows(1, 2))
    progress = query.recent_progress[0]
    assert progress.recovered
    assert progress.sources[0].metrics == {"files_skipped_bad": 1}
    assert progress.sources[0].skipped_files == [str(data / "b.parquet")]
    # Read as the source reads it: the file's checksum checked, then its record.
    record = Storage(str(tmp_path / "cp")).read_model("sources/0/skipped/0.json", SkippedFiles)
    assert [(f.name, f.size, f.missing, f.dead_letter) for f in record.files] == [
        ("b.parquet", 23, False, False)
    ]
    assert "cannot read it as parquet" in record.files[0].reason

    # Later files are read as usual (the memory table keeps the earlier batch).
    write(data, "c.parquet", rows(3), 1002)
    query, table = files_query(tmp_path, "pol_bad", on_bad_file="skip")
    assert table is not None
    assert_frame_equal(table, rows(1, 2, 3))


def test_file_removed_after_the_failure_is_skipped_with_on_missing_file(tmp_path: Path) -> None:
    # What the old message advised (remove the corrupt file) blocked every restart.
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    bad = write_text(data, "b.parquet", b"garbage", 1001)
    query, _ = files_query(tmp_path, "pol_gone")
    assert isinstance(query.exception(), ms.SourceError)
    bad.unlink()

    query, _ = files_query(tmp_path, "pol_gone")
    error = query.exception()
    assert isinstance(error, ms.SourceError)
    assert "b.parquet" in str(error) and "no longer exists" in str(error)
    assert "restart the query with on_missing_file='skip'" in str(error)

    query, table = files_query(tmp_path, "pol_gone", on_missing_file="skip")
    assert query.exception() is None
    assert table is not None
    assert_frame_equal(table, rows(1))
    assert query.recent_progress[0].sources[0].metrics == {"files_skipped_missing": 1}
    assert query.recent_progress[0].sources[0].skipped_files == [str(data / "b.parquet")]


def test_dead_lettered_file_goes_to_the_table_with_path_size_reason_batch(tmp_path: Path) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    write(data, "b.parquet", rows(2), 2000)
    write_text(data, "c.parquet", b"PAR1 broken", 2001)
    frame = ms.scan_files(
        data,
        schema=SCHEMA,
        on_bad_file="dead_letter",
        dead_letter="pol_dead",
        max_files_per_trigger=1,
    )
    query = frame.sink_memory("pol_dl_out", trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    assert_frame_equal(ms.table("pol_dl_out"), rows(1, 2))
    dead = ms.table("pol_dead")
    assert dead.drop("reason").to_dicts() == [
        {"path": str(data / "c.parquet"), "size": 11, "line": None, "value": None, "batch_id": 2}
    ]
    assert dead["reason"][0].startswith("cannot read it as parquet")
    assert query.recent_progress[-1].sources[0].metrics == {"files_dead_lettered": 1}


def test_a_recorded_skip_is_replayed_even_if_the_file_was_repaired(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    write_text(data, "b.parquet", b"PAR1 broken", 1001)
    source = build(source_ctx, data, on_bad_file="skip")
    assert_frame_equal(read_all(source), rows(1))
    assert source.metrics() == {"files_skipped_bad": 1}
    assert source.skipped_files() == [str(data / "b.parquet")]
    assert source.metrics() == {} and source.skipped_files() == []  # since the last call

    write(data, "b.parquet", rows(2), 1001)  # repaired before the batch committed
    again = build(source_ctx, data, on_bad_file="fail")  # a restart, even with another policy
    assert_frame_equal(again.read(off(-1), off(0)), rows(1))  # the same rows as the first run
    assert again.metrics() == {"files_skipped_bad": 1}


def test_a_missing_file_is_recorded_as_missing(tmp_path: Path, source_ctx: SourceContext) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    gone = write(data, "b.parquet", rows(2), 1001)
    source = build(source_ctx, data, on_missing_file="skip")
    end = source.latest_offset(off(-1), rate_limited=True)
    gone.unlink()
    assert_frame_equal(source.read(off(-1), end), rows(1))
    record = source_ctx.storage.read_model("skipped/0.json", SkippedFiles)
    assert [(f.name, f.missing, f.reason) for f in record.files] == [
        ("b.parquet", True, "the file no longer exists")
    ]
    assert source.metrics() == {"files_skipped_missing": 1}


def test_schema_mismatch_is_a_bad_file(tmp_path: Path, source_ctx: SourceContext) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    write(data, "b.parquet", pl.DataFrame({"id": ["x"], "name": ["y"]}), 1001)
    with pytest.raises(SchemaMismatchError) as info:
        read_all(build(source_ctx, data))
    assert "b.parquet has column 'id' as String" in str(info.value)
    assert "on_bad_file='skip' or 'dead_letter'" in str(info.value)

    ctx = replace(source_ctx, storage=source_ctx.storage.sub("other"), side_output=Collected())
    source = build(ctx, data, on_bad_file="dead_letter", dead_letter="dl")
    assert_frame_equal(read_all(source), rows(1))
    dead = ctx.side_output.frame()  # type: ignore[attr-defined]
    assert dead["path"].to_list() == [str(data / "b.parquet")]
    assert "has column 'id' as String" in dead["reason"][0]


def test_clean_source_leaves_a_skipped_bad_file_in_place(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    bad = write_text(data, "b.parquet", b"PAR1 broken", 1001)
    source = build(source_ctx, data, on_bad_file="skip", clean_source="delete")
    end = source.latest_offset(off(-1), rate_limited=True)
    source.read(off(-1), end)
    source.commit(end)
    assert not (data / "a.parquet").exists()
    assert bad.exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"on_bad_file": "ignore"}, "on_bad_file must be one of 'fail', 'skip', 'dead_letter'"),
        ({"on_missing_file": "dead_letter"}, "on_missing_file must be one of 'fail', 'skip'"),
        ({"extra_columns": "drop"}, "extra_columns must be one of 'ignore', 'raise'"),
        ({"missing_columns": "null"}, "missing_columns must be one of 'insert', 'raise'"),
        ({"on_bad_record": "skip"}, "on_bad_record applies to csv and ndjson"),
        ({"on_bad_file": "dead_letter"}, "needs dead_letter= a memory table name"),
        ({"dead_letter": "t"}, "dead_letter= is used only with"),
        ({"wait_for_path": "yes"}, "wait_for_path must be a bool"),
    ],
)
def test_invalid_policies(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FileSourceSpec(str(tmp_path), schema=SCHEMA, **options)


# -- item 4: bad records in csv and ndjson ---------------------------------------------------------

RAGGED_CSV = "id,name\n1,a\n2\n3,c,extra\nfour,d\n5,e\n"


def test_ragged_csv_row_fails_naming_file_and_line(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    write_text(tmp_path, "r.csv", "id,name\n1,a\n2\n3,c\n", 1000)  # polars pads row 2 with null
    with pytest.raises(SourceError) as info:
        read_all(build(source_ctx, tmp_path, format="csv"))
    message = str(info.value)
    assert message.endswith(
        "restart the query with on_bad_record='skip' or 'dead_letter' to leave such records out"
    )
    assert f"file {tmp_path / 'r.csv'} line 3: 1 fields where the header has 2" in message


def test_csv_too_many_fields_is_not_truncated(tmp_path: Path, source_ctx: SourceContext) -> None:
    write_text(tmp_path, "r.csv", "name,id,other\na,1,x\nb,2,y,z\n", 1000)
    with pytest.raises(SourceError, match=r"r\.csv line 3: 4 fields where the header has 3"):
        read_all(build(source_ctx, tmp_path, format="csv"))


def test_csv_bad_records_skipped(tmp_path: Path, source_ctx: SourceContext) -> None:
    write_text(tmp_path, "r.csv", RAGGED_CSV, 1000)
    source = build(source_ctx, tmp_path, format="csv", on_bad_record="skip")
    assert_frame_equal(read_all(source), pl.DataFrame({"id": [1, 5], "name": ["a", "e"]}))
    assert source.metrics() == {"bad_records_skipped": 3}


def test_csv_bad_records_dead_lettered_with_line_and_text(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    write_text(tmp_path, "r.csv", RAGGED_CSV, 1000)
    ctx = replace(source_ctx, side_output=Collected())
    source = build(ctx, tmp_path, format="csv", on_bad_record="dead_letter", dead_letter="dl")
    assert_frame_equal(read_all(source), pl.DataFrame({"id": [1, 5], "name": ["a", "e"]}))
    collected: Collected = ctx.side_output  # type: ignore[assignment]
    assert collected.declared == {"dl": DEAD_LETTER_SCHEMA}
    dead = collected.frame()
    path = str(tmp_path / "r.csv")
    assert dead.drop("reason").rows() == [
        (path, len(RAGGED_CSV), 3, "2"),
        (path, len(RAGGED_CSV), 4, "3,c,extra"),
        (path, len(RAGGED_CSV), 5, "four,d"),
    ]
    reasons = dead["reason"].to_list()
    assert reasons[:2] == [
        "1 fields where the header has 2",
        "3 fields where the header has 2",
    ]
    assert "four" in reasons[2]
    assert source.metrics() == {"bad_records_dead_lettered": 3}


def test_csv_quoted_separators_and_line_breaks(tmp_path: Path, source_ctx: SourceContext) -> None:
    text = 'id,name\n1,"a, b"\n2,"two\nlines"\n3\n4,"say ""hi"""\n'
    write_text(tmp_path, "q.csv", text, 1000)
    source = build(source_ctx, tmp_path, format="csv", on_bad_record="skip")
    expected = pl.DataFrame({"id": [1, 2, 4], "name": ["a, b", "two\nlines", 'say "hi"']})
    assert_frame_equal(read_all(source), expected)
    assert source.metrics() == {"bad_records_skipped": 1}


def test_csv_quoted_separator_on_a_good_file_is_read_in_bulk(
    tmp_path: Path, source_ctx: SourceContext
) -> None:
    write_text(tmp_path, "q.csv", 'id,name\n1,"a, b"\n2,""\n3,\n', 1000)
    source = build(source_ctx, tmp_path, format="csv")
    expected = pl.DataFrame({"id": [1, 2, 3], "name": ["a, b", "", None]})
    assert_frame_equal(read_all(source), expected)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('id,name\n1,"a,b"\n2\n', 3),  # quoted separator, then a short row
        ("id,name\r\n1,a\r\n2,b,c\r\n", 3),  # CRLF line ends
        ("id,name\n1,a\n2,b\n3\n", 4),  # no quote char: counted on the raw bytes
    ],
)
def test_csv_ragged_row_found_in_every_layout(
    tmp_path: Path, source_ctx: SourceContext, text: str, line: int
) -> None:
    write_text(tmp_path, "r.csv", text.encode(), 1000)
    with pytest.raises(SourceError, match=rf"r\.csv line {line}: \d fields where the header has 2"):
        read_all(build(source_ctx, tmp_path, format="csv"))


def test_csv_blank_lines_are_no_records(tmp_path: Path, source_ctx: SourceContext) -> None:
    # Polars makes a blank line a row of nulls; a blank line holds no record.
    write_text(tmp_path, "b.csv", b"id,name\r\n1,a\r\n\r\n2,b\r\n\r\n", 1000)
    assert_frame_equal(
        read_all(build(source_ctx, tmp_path, format="csv")),
        rows(1, 2).with_columns(name=pl.Series(["a", "b"])),
    )


def test_ndjson_bad_records(tmp_path: Path, source_ctx: SourceContext) -> None:
    text = '{"id": 1, "name": "a"}\n{"id": oops\n\n{"id": "seven"}\n{"id": 4}\n'
    write_text(tmp_path, "e.ndjson", text, 1000)
    with pytest.raises(SourceError, match=r"bad record in file .*e\.ndjson line 2: .*\(and 1 more"):
        read_all(build(source_ctx, tmp_path, format="ndjson"))

    ctx = replace(source_ctx, storage=source_ctx.storage.sub("dl"), side_output=Collected())
    source = build(ctx, tmp_path, format="ndjson", on_bad_record="dead_letter", dead_letter="dl")
    expected = pl.DataFrame({"id": [1, 4], "name": ["a", None]}, schema=SCHEMA)
    assert_frame_equal(read_all(source), expected)
    dead = ctx.side_output.frame()  # type: ignore[attr-defined]
    assert dead.select("line", "value").rows() == [(2, '{"id": oops'), (4, '{"id": "seven"}')]


# -- item 5: paths ---------------------------------------------------------------------------------


def test_glob_in_path(tmp_path: Path) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    write(data, "b.csv", rows(2), 1001, "csv")
    write(data / "day=1", "c.parquet", rows(3), 1002)
    frame = ms.scan_files(f"{data}/*.parquet", schema=SCHEMA)
    query = frame.sink_memory("pol_glob", trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    assert_frame_equal(ms.table("pol_glob"), rows(1))

    frame = ms.scan_files(f"{data}/**/*.parquet", schema=SCHEMA)
    query = frame.sink_memory("pol_glob_deep", trigger=ms.Trigger.available_now())
    query.await_termination(timeout=60)
    assert_frame_equal(ms.table("pol_glob_deep"), rows(1, 3))


def test_glob_in_path_is_part_of_the_identity(tmp_path: Path) -> None:
    spec = FileSourceSpec(f"{tmp_path}/in/*.parquet", schema=SCHEMA, wait_for_path=True)
    assert spec.identity() == {"path": f"{tmp_path}/in/*.parquet", "format": "parquet"}
    assert spec.directory == f"{tmp_path}/in"
    with pytest.raises(ValueError, match="use '\\*\\*' in the glob"):
        FileSourceSpec(f"{tmp_path}/in/*.parquet", schema=SCHEMA, recursive=True)


def test_missing_path_is_an_error_at_start(tmp_path: Path) -> None:
    frame = ms.scan_files(tmp_path / "does_not_exist", schema=SCHEMA)
    with pytest.raises(SourceError) as info:
        frame.sink_memory("pol_missing")
    message = str(info.value)
    assert f"the source directory {tmp_path / 'does_not_exist'} does not exist" in message
    assert "wait_for_path=True" in message

    frame = ms.scan_files(f"{tmp_path}/nope/*.parquet", schema=SCHEMA)
    with pytest.raises(SourceError, match="does not exist"):
        frame.sink_memory("pol_missing_glob")


def test_path_to_a_file_is_an_error(tmp_path: Path, source_ctx: SourceContext) -> None:
    path = write(tmp_path, "a.parquet", rows(1), 1000)
    with pytest.raises(SourceError, match=r"a\.parquet is a file, not a directory"):
        build(source_ctx, path)


def test_no_schema_and_no_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(ms.PlanError, match="the directory does not exist"):
        ms.scan_files(tmp_path / "nothing")


def test_non_data_file_is_ignored_and_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    write_text(data, "upload.tmp", b"half a file", 1001)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        query, table = files_query(tmp_path, "pol_tmp")
        write(data, "b.parquet", rows(2), 1002)
        query, table = files_query(tmp_path, "pol_tmp")
    assert query.exception() is None
    assert table is not None
    assert_frame_equal(table, rows(1, 2))
    warnings = [r.getMessage() for r in caplog.records if "upload.tmp" in r.getMessage()]
    assert len(warnings) == 2  # once per run (two runs), not at every trigger
    assert "does not match *.parquet" in warnings[0] and "Pass glob=" in warnings[0]


def test_ignored_file_counted_in_progress(tmp_path: Path, source_ctx: SourceContext) -> None:
    write(tmp_path, "a.parquet", rows(1), 1000)
    write_text(tmp_path, "upload.tmp", b"x", 1001)
    source = build(source_ctx, tmp_path)
    assert_frame_equal(read_all(source), rows(1))
    source.latest_offset(off(0), rate_limited=True)  # listed again: not counted again
    assert source.metrics() == {"files_ignored": 1}


# -- item 6: new and missing columns ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "ext"), [("parquet", "parquet"), ("csv", "csv"), ("ndjson", "ndjson"), ("ipc", "arrow")]
)
def test_new_column_is_reported_once(
    tmp_path: Path, source_ctx: SourceContext, caplog: pytest.LogCaptureFixture, fmt: str, ext: str
) -> None:
    write(tmp_path, f"a.{ext}", rows(1), 1000, fmt)
    write(tmp_path, f"b.{ext}", rows(2).with_columns(score=pl.lit(9)), 1001, fmt)
    write(tmp_path, f"c.{ext}", rows(3).with_columns(score=pl.lit(8)), 1002, fmt)
    source = build(source_ctx, tmp_path, format=fmt, max_files_per_trigger=2)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        first = source.latest_offset(off(-1), rate_limited=True)
        assert_frame_equal(source.read(off(-1), first), rows(1, 2))
        second = source.latest_offset(first, rate_limited=True)
        assert_frame_equal(source.read(first, second), rows(3))
    assert source.metrics() == {"new_columns_ignored": 1}
    warnings = [r.getMessage() for r in caplog.records if "'score'" in r.getMessage()]
    assert len(warnings) == 1
    assert (
        f"column 'score' of file {tmp_path / f'b.{ext}'} is not in the source schema" in warnings[0]
    )


@pytest.mark.parametrize(
    ("fmt", "ext"), [("parquet", "parquet"), ("csv", "csv"), ("ndjson", "ndjson")]
)
def test_extra_columns_raise(tmp_path: Path, source_ctx: SourceContext, fmt: str, ext: str) -> None:
    write(tmp_path, f"b.{ext}", rows(2).with_columns(score=pl.lit(9)), 1001, fmt)
    source = build(source_ctx, tmp_path, format=fmt, extra_columns="raise")
    with pytest.raises(
        SchemaMismatchError,
        match=rf"b\.{ext} has column\(s\) \['score'\] that the source schema lacks",
    ):
        read_all(source)


@pytest.mark.parametrize(("fmt", "ext"), [("parquet", "parquet"), ("csv", "csv"), ("ipc", "arrow")])
def test_missing_columns_insert_or_raise(
    tmp_path: Path, source_ctx: SourceContext, fmt: str, ext: str
) -> None:
    write(tmp_path, f"a.{ext}", rows(1), 1000, fmt)
    write(tmp_path, f"b.{ext}", pl.DataFrame({"id": [2]}), 1001, fmt)
    with pytest.raises(
        SchemaMismatchError, match=rf"b\.{ext} has no column 'name'.*missing_columns='insert'"
    ):
        read_all(build(source_ctx, tmp_path, format=fmt))

    ctx = replace(source_ctx, storage=source_ctx.storage.sub("insert"))
    source = build(ctx, tmp_path, format=fmt, missing_columns="insert")
    expected = pl.DataFrame({"id": [1, 2], "name": ["n1", None]}, schema=SCHEMA)
    assert_frame_equal(read_all(source), expected)


def test_new_column_reaches_delta_after_declaring_it(tmp_path: Path) -> None:
    """The documented way to keep a new column: declare it and let the Delta sink merge it."""
    pytest.importorskip("deltalake")
    data = tmp_path / "in"
    write(data, "a.parquet", rows(1), 1000)
    table = tmp_path / "table"

    def run(frame: ms.StreamFrame, **options: Any) -> None:
        query = frame.sink_delta(
            table, checkpoint=tmp_path / "cp", trigger=ms.Trigger.available_now(), **options
        )
        query.await_termination(timeout=60)
        assert query.exception() is None

    run(ms.scan_files(data, schema=SCHEMA))
    write(data, "b.parquet", rows(2).with_columns(score=pl.lit(9)), 1001)
    wider = pl.Schema({**SCHEMA, "score": pl.Int32()})
    run(ms.scan_files(data, schema=wider, missing_columns="insert"), merge_schema=True)
    got = pl.read_delta(str(table)).sort("id")
    assert got.to_dicts() == [
        {"id": 1, "name": "n1", "score": None},
        {"id": 2, "name": "n2", "score": 9},
    ]
