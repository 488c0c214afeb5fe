"""Small parquet files are decoded by pyarrow on the query's thread: the same frame as
Polars' reader (dtypes and values, nulls, NaN, nested, zoned times) or, where pyarrow
would give other dtypes, Polars' reader as before; larger files are Polars' as before."""

from __future__ import annotations

import datetime as dt
import decimal
import io
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

import connectors._file_reading as file_reading
import microstream as ms
from connectors._small_files import ARROW_READ_BYTES, read_small_parquet

POLARS_WRITTEN = pl.DataFrame(
    {
        "i8": pl.Series([1, None, -3], dtype=pl.Int8),
        "u64": pl.Series([1, 2**63, None], dtype=pl.UInt64),
        "f32": pl.Series([1.5, float("nan"), None], dtype=pl.Float32),
        "f": [0.1, -0.0, float("inf")],
        "b": [True, None, False],
        "s": ["a", None, "ccc"],
        "bin": [b"x", None, b""],
        "cat": pl.Series(["a", "b", "a"], dtype=pl.Categorical()),
        "enum": pl.Series(["a", "b", "a"], dtype=pl.Enum(["a", "b"])),
        "d": [dt.date(2024, 1, 1), None, dt.date(1970, 1, 1)],
        "ts_ms": pl.Series(
            [dt.datetime(2024, 1, 1), None, dt.datetime(1900, 1, 1)], dtype=pl.Datetime("ms")
        ),
        "ts_tz": pl.Series(
            [dt.datetime(2024, 1, 1), None, dt.datetime(2000, 6, 1)],
            dtype=pl.Datetime("ns", "Europe/Paris"),
        ),
        "t": [dt.time(1, 2, 3, 4), None, dt.time(0)],
        "dur": pl.Series([dt.timedelta(1), None, dt.timedelta(0)], dtype=pl.Duration("us")),
        "dec": pl.Series(
            [decimal.Decimal("1.23"), None, decimal.Decimal("-4.56")], dtype=pl.Decimal(10, 2)
        ),
        "lst": [[1, 2], None, []],
        "st": [{"a": 1, "b": "x"}, None, {"a": None, "b": "y"}],
        "arr": pl.Series([[1, 2], [3, 4], None], dtype=pl.Array(pl.Int32, 2)),
    }
)

ARROW_WRITTEN = pa.table(
    {
        "ts_utc": pa.array([dt.datetime(2024, 1, 1), None], pa.timestamp("us", "UTC")),
        "ts_ns": pa.array([dt.datetime(2024, 1, 1, 0, 0, 0, 1), None], pa.timestamp("ns")),
        "large": pa.array(["a", None], pa.large_string()),
        "dict": pa.array(["a", "b"]).dictionary_encode(),
        "u32": pa.array([1, None], pa.uint32()),
        "d64": pa.array([dt.date(2024, 1, 2), None], pa.date64()),
        "t32": pa.array([dt.time(1, 2, 3), None], pa.time32("ms")),
    }
)


def polars_read(data: bytes, column: str) -> pl.DataFrame:
    return pl.read_parquet(io.BytesIO(data), columns=[column])


def arrow_read(data: bytes, column: str) -> pl.DataFrame | None:
    polars_schema = pl.read_parquet_schema(io.BytesIO(data))
    return read_small_parquet(
        io.BytesIO(data), [column], pl.Schema({column: polars_schema[column]})
    )


def test_every_polars_dtype_reads_as_polars_reads_it() -> None:
    buf = io.BytesIO()
    POLARS_WRITTEN.write_parquet(buf)
    data = buf.getvalue()
    for column in POLARS_WRITTEN.columns:
        got = arrow_read(data, column)
        assert got is not None, column
        assert_frame_equal(got, polars_read(data, column), check_exact=True)
    both = read_small_parquet(
        io.BytesIO(data), ["s", "i8"], pl.Schema({"s": pl.String, "i8": pl.Int8})
    )
    assert both is not None
    assert both.to_dict(as_series=False) == {"s": ["a", None, "ccc"], "i8": [1, None, -3]}


@pytest.mark.parametrize(
    "options",
    [{}, {"use_deprecated_int96_timestamps": True}, {"version": "1.0"}],
    ids=["default", "int96", "v1"],
)
def test_other_writers_read_as_polars_reads_them_or_fall_back(options: dict[str, object]) -> None:
    buf = io.BytesIO()
    pq.write_table(ARROW_WRITTEN, buf, **options)  # type: ignore[arg-type]
    data = buf.getvalue()
    fell_back = []
    for column in ARROW_WRITTEN.column_names:
        got = arrow_read(data, column)
        if got is None:
            fell_back.append(column)
        else:
            assert_frame_equal(got, polars_read(data, column), check_exact=True)
    # date64: Polars reads a Datetime(ms), pyarrow a Date; an int96 time with a zone:
    # Polars follows the stored Arrow schema (us), pyarrow reads ns. Polars' reader runs
    int96 = ["ts_utc"] if "use_deprecated_int96_timestamps" in options else []
    assert fell_back == [*int96, "d64"]


def test_a_file_over_the_limit_is_not_read_here() -> None:
    big = pl.DataFrame({"x": range(ARROW_READ_BYTES // 4)}, schema={"x": pl.Int64})
    buf = io.BytesIO()
    big.write_parquet(buf, compression="uncompressed")
    assert buf.getbuffer().nbytes > ARROW_READ_BYTES
    assert read_small_parquet(buf, ["x"], pl.Schema({"x": pl.Int64})) is None


def test_the_file_source_reads_a_small_file_without_polars_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    rows = pl.DataFrame(
        {"ts": [dt.datetime(2024, 1, 1, 0, 0, 1)], "key": [2], "v": [0.1]},
        schema={"ts": pl.Datetime("us"), "key": pl.Int64, "v": pl.Float64},
    )
    rows.write_parquet(src / "a.parquet")
    big = pl.DataFrame(
        {
            "ts": [dt.datetime(2024, 1, 1)] * 20_000,
            "key": range(20_000),
            "v": [float(i) / 7 for i in range(20_000)],
        },
        schema=rows.schema,
    )
    big.write_parquet(src / "b.parquet", compression="uncompressed")
    assert (src / "b.parquet").stat().st_size > ARROW_READ_BYTES
    read_by_polars: list[int] = []
    polars_reader = pl.read_parquet

    def counted(source, *args, **kwargs):  # type: ignore[no-untyped-def]
        frame = polars_reader(source, *args, **kwargs)
        read_by_polars.append(frame.height)
        return frame

    monkeypatch.setattr(file_reading.pl, "read_parquet", counted)
    query = (
        ms.scan_files(str(src), format="parquet", schema=rows.schema, max_files_per_trigger=1)
        .select("key", "v")
        .sink_memory("small_parquet_out")
    )
    query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    assert read_by_polars == [20_000]  # only the large file went through Polars' reader
    got = ms.table("small_parquet_out")
    assert_frame_equal(got, pl.concat([rows, big]).select("key", "v"), check_exact=True)
