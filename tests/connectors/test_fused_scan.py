"""A file source's batch scanned lazily in the plan of the stage reading it.

Each test lowers ``FUSED_SCAN_MIN_BYTES`` so its small files take the path, and
compares with the eager read (the bound raised): the same rows in the same order,
the same errors and messages, the same dead letters. On the code before the path
existed, ``connectors._fused_scan`` and ``FileSource.scan`` do not exist and every
test here fails.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream as ms
from connectors import files
from connectors._fused_scan import scan_parquet_files

SCHEMA = pl.Schema({"id": pl.Int64(), "name": pl.String(), "price": pl.Float64()})


def write(directory: Path, name: str, df: pl.DataFrame, mtime: int, **options: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    df.write_parquet(path, **options)
    os.utime(path, (mtime, mtime))
    return path


def rows(ids: range | list[int]) -> pl.DataFrame:
    ids = list(ids)
    return pl.DataFrame(
        {"id": ids, "name": [f"n{i % 7}/x/{i}" for i in ids], "price": [i * 0.1 for i in ids]},
        schema=SCHEMA,
    )


def query(frame: Any) -> Any:
    """Row-wise steps of the kinds the Nexmark stateless queries use."""
    return frame.filter(pl.col("id") % 3 != 0).select(
        "id",
        (pl.col("price") * 0.908).alias("euros"),
        pl.col("name").str.split_exact("/", 2).struct.field("field_2").alias("tail"),
        pl.col("name").str.extract(r"^n(\d)", 1).alias("digit"),
    )


class Scans:
    """Counts the batches the source handed as a lazy scan."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fused: bool) -> None:
        self.taken: list[bool] = []
        monkeypatch.setattr(files, "FUSED_SCAN_MIN_BYTES", 0 if fused else 1 << 62)
        scan = files.FileSource.scan

        def spy(source: files.FileSource, start: Any, end: Any) -> Any:
            batch = scan(source, start, end)
            self.taken.append(batch is not None)
            return batch

        monkeypatch.setattr(files.FileSource, "scan", spy)


def run(
    data: Path, checkpoint: Path, *, per_trigger: int | None = 1, **options: Any
) -> pl.DataFrame:
    frames: list[pl.DataFrame] = []
    options.setdefault("schema", SCHEMA)
    stream = ms.scan_files(
        str(data), format="parquet", max_files_per_trigger=per_trigger, **options
    )
    handle = query(stream).foreach_batch(
        lambda df, _batch_id: frames.append(df),
        trigger=ms.Trigger.available_now(),
        checkpoint=str(checkpoint),
    )
    handle.await_termination(timeout=60)
    return pl.concat(frames) if frames else query(pl.LazyFrame(schema=SCHEMA)).collect()


def both(
    data: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch, **options: Any
) -> tuple[pl.DataFrame, pl.DataFrame, Scans]:
    """The stream's rows read eagerly, then scanned (a fresh checkpoint each)."""
    Scans(monkeypatch, fused=False)
    eager = run(data, tmp / "eager", **options)
    scans = Scans(monkeypatch, fused=True)
    fused = run(data, tmp / "fused", **options)
    return eager, fused, scans


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=7),
    per_trigger=st.sampled_from([1, 2, 3, None]),
    row_group=st.sampled_from([None, 3]),
)
def test_random_file_splits_give_the_rows_of_one_polars_query(
    sizes: list[int],
    per_trigger: int | None,
    row_group: int | None,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tmp = tmp_path_factory.mktemp("split")
    start = 0
    for n, size in enumerate(sizes):
        write(tmp / "data", f"{n:03d}.parquet", rows(range(start, start + size)), 1000 + n,
              row_group_size=row_group)  # fmt: skip
        start += size
    scans = Scans(monkeypatch, fused=True)
    got = run(tmp / "data", tmp / "ckpt", per_trigger=per_trigger)
    assert scans.taken and all(scans.taken)
    expected = query(rows(range(start)).lazy()).collect()
    assert_frame_equal(got, expected)  # exact rows, in file order


def test_scanned_and_read_batches_are_the_same_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(4):
        write(tmp_path / "data", f"{n}.parquet", rows(range(n * 50, n * 50 + 50)), 1000 + n)
    eager, fused, scans = both(tmp_path / "data", tmp_path, monkeypatch, per_trigger=2)
    assert scans.taken == [True, True]
    assert_frame_equal(fused, eager)
    assert fused.height == 133


def test_a_file_with_bad_pages_fails_with_the_eager_reads_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its footer parses, so the batch is scanned; the scan fails, and the stage runs over
    the source's read, which names the file and the log entry as before."""
    write(tmp_path / "data", "a.parquet", rows(range(100)), 1000)
    bad = write(tmp_path / "data", "b.parquet", rows(range(100, 1100)), 1001, compression="zstd")
    data = bytearray(bad.read_bytes())
    data[20:400] = b"\xab" * 380  # inside the first data page; the footer is intact
    bad.write_bytes(bytes(data))
    os.utime(bad, (1001, 1001))
    assert scan_parquet_files([str(bad)], SCHEMA, SCHEMA) is not None  # the footer passes

    messages = []
    for fused in (False, True):
        scans = Scans(monkeypatch, fused=fused)
        with pytest.raises(ms.SourceError) as info:
            run(tmp_path / "data", tmp_path / f"ckpt-{fused}")
        messages.append(str(info.value).replace(f"ckpt-{fused}", "ckpt"))
        assert scans.taken == [fused, fused]
    assert messages[0] == messages[1]
    assert "b.parquet" in messages[1] and "sources/0/1.json" in messages[1]


@pytest.mark.parametrize(
    ("written", "options"),
    [
        (pl.DataFrame({"id": [1], "name": ["a"]}), {}),  # no price
        (pl.DataFrame({"id": [1], "name": ["a"], "price": ["x"]}), {}),
        (pl.DataFrame({"id": [1], "name": ["a"], "price": [1.0], "more": [1]}), {"extra_columns": "raise"}),
    ],
    ids=["missing-column", "wrong-dtype", "extra-column"],
)  # fmt: skip
def test_a_file_off_the_schema_is_read_eagerly_with_the_same_error(
    written: pl.DataFrame,
    options: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write(tmp_path / "data", "a.parquet", rows(range(10)), 1000)
    write(tmp_path / "data", "b.parquet", written, 1001)
    messages = []
    for fused in (False, True):
        scans = Scans(monkeypatch, fused=fused)
        with pytest.raises(ms.SchemaMismatchError) as info:
            run(tmp_path / "data", tmp_path / f"ckpt-{fused}", **options)
        messages.append(str(info.value).replace(f"ckpt-{fused}", "ckpt"))
        assert scans.taken == [fused, False]  # the file's footer sends it to the read
    assert messages[0] == messages[1]
    assert "b.parquet" in messages[1]


def test_a_file_with_a_column_beyond_the_schema_is_read_eagerly_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    write(tmp_path / "data", "a.parquet", rows(range(10)), 1000)
    write(tmp_path / "data", "b.parquet", rows(range(10, 20)).with_columns(more=pl.lit(1)), 1001)
    eager, fused, scans = both(tmp_path / "data", tmp_path, monkeypatch)
    assert scans.taken == [True, False]
    assert_frame_equal(fused, eager)
    reports = [r.getMessage() for r in caplog.records if "'more'" in r.getMessage()]
    assert len(reports) == 2 and all("b.parquet" in r for r in reports)  # once per run


def test_widened_and_inserted_columns_are_read_eagerly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Int32 ``id`` widened to Int64, a missing ``price`` inserted as nulls: the eager
    read's ``conform``, not the scan."""
    write(tmp_path / "data", "a.parquet", rows(range(10)), 1000)
    narrow = rows(range(10, 20)).with_columns(pl.col("id").cast(pl.Int32)).drop("price")
    write(tmp_path / "data", "b.parquet", narrow, 1001)
    eager, fused, scans = both(tmp_path / "data", tmp_path, monkeypatch, missing_columns="insert")
    assert scans.taken == [True, False]
    assert_frame_equal(fused, eager)
    assert fused["euros"].null_count() == fused.filter(pl.col("id") >= 10).height > 0


def test_a_bad_file_under_dead_letter_is_read_eagerly_and_dead_lettered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "data", "a.parquet", rows(range(10)), 1000)
    (tmp_path / "data" / "b.parquet").write_bytes(b"not parquet")
    os.utime(tmp_path / "data" / "b.parquet", (1001, 1001))
    results, letters = {}, {}
    for fused in (False, True):
        scans = Scans(monkeypatch, fused=fused)
        results[fused] = run(
            tmp_path / "data",
            tmp_path / f"ckpt-{fused}",
            on_bad_file="dead_letter",
            dead_letter=f"fused_scan_dead_{fused}",
        )
        letters[fused] = ms.table(f"fused_scan_dead_{fused}")
        assert scans.taken == [False, False]  # a policy other than "fail": never scanned
    assert_frame_equal(results[True], results[False])
    assert_frame_equal(letters[True], letters[False])
    assert letters[True]["path"].to_list() == [str(tmp_path / "data" / "b.parquet")]


def test_a_stage_without_function_calls_is_read_eagerly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "data", "a.parquet", rows(range(10)), 1000)
    scans = Scans(monkeypatch, fused=True)
    frames: list[pl.DataFrame] = []
    stream = ms.scan_files(str(tmp_path / "data"), format="parquet", schema=SCHEMA)
    handle = (
        stream.filter(pl.col("id") > 4)
        .select("id", pl.col("price") * 2)
        .foreach_batch(
            lambda df, _batch_id: frames.append(df),
            trigger=ms.Trigger.available_now(),
            checkpoint=str(tmp_path / "ckpt"),
        )
    )
    handle.await_termination(timeout=60)
    assert scans.taken == []  # the source was not asked for a scan
    assert frames[0]["id"].to_list() == [5, 6, 7, 8, 9]


def test_a_watermarked_window_over_scanned_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stage ending at its watermark before an operator: collected in the scan's plan,
    the same windows and watermark as the eager read."""
    schema = pl.Schema({"ts": pl.Datetime("us"), "k": pl.Int64(), "v": pl.Float64()})
    for n in range(5):
        frame = pl.DataFrame(
            {
                "ts": pl.datetime_range(
                    pl.datetime(2026, 1, 1, 0, n), pl.datetime(2026, 1, 1, 0, n, 59), "7s",
                    eager=True,
                ),
            }
        ).with_columns(k=pl.int_range(pl.len()) % 3, v=pl.int_range(pl.len()) * 0.5)  # fmt: skip
        write(tmp_path / "data", f"{n}.parquet", frame, 1000 + n)
    results = {}
    for fused in (False, True):
        scans = Scans(monkeypatch, fused=fused)
        out: list[pl.DataFrame] = []
        stream = ms.scan_files(
            str(tmp_path / "data"), format="parquet", schema=schema, max_files_per_trigger=1
        )
        windows = (
            stream.filter(pl.col("v").abs() != 1.0)
            .with_watermark("ts", "30s")
            .group_by_dynamic("ts", every="1m", group_by="k")
            .agg(pl.col("v").sum())
        )
        handle = windows.foreach_batch(
            lambda df, _id, out=out: out.append(df),
            trigger=ms.Trigger.available_now(flush=True),
            checkpoint=str(tmp_path / f"ckpt-{fused}"),
        )
        handle.await_termination(timeout=60)
        results[fused] = pl.concat(out)
        assert scans.taken == [fused] * 5
    assert_frame_equal(results[True], results[False])
    assert results[True].height == 15
