"""Small parquet files are opened and decoded by pyarrow on the query's thread (one footer
parse): the same frame as Polars' reader (dtypes and values, nulls, NaN, zoned times) or,
for a type whose Polars dtype could differ, Polars' reader as before; larger files, and
files pyarrow cannot open, are Polars' as before (its frame, its errors)."""

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
from connectors._file_reading import read_columns
from connectors._small_files import ARROW_READ_BYTES, open_small_parquet

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
        "ts_off": pa.array([dt.datetime(2024, 1, 1), None], pa.timestamp("us", "+01:00")),
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
    """The column through pyarrow, or ``None`` when the file is left to Polars' reader."""
    small = open_small_parquet(io.BytesIO(data))
    return None if small is None else small.read([column])


def one_column(frame: pl.DataFrame | pa.Table, column: str, **options: object) -> bytes:
    buf = io.BytesIO()
    if isinstance(frame, pl.DataFrame):
        frame.select(column).write_parquet(buf)
    else:
        pq.write_table(frame.select([column]), buf, **options)  # type: ignore[arg-type]
    return buf.getvalue()


# the flat columns pyarrow decodes; the others (dictionaries, nested, decimal, time, duration,
# float16 and view types, dates, int96 times) are left to Polars' reader
ARROW_DECODED = {"i8", "u64", "f32", "f", "b", "s", "bin", "ts_ms", "ts_tz"}


def test_every_polars_dtype_reads_as_polars_reads_it() -> None:
    decoded = set()
    for column in POLARS_WRITTEN.columns:
        data = one_column(POLARS_WRITTEN, column)
        got = arrow_read(data, column)
        if got is not None:
            decoded.add(column)
            assert_frame_equal(got, polars_read(data, column), check_exact=True)
        small = open_small_parquet(io.BytesIO(data))
        assert_frame_equal(
            read_columns(io.BytesIO(data), "parquet", [column], small),
            polars_read(data, column),
            check_exact=True,
        )
    assert decoded == ARROW_DECODED
    buf = io.BytesIO()
    POLARS_WRITTEN.select(sorted(ARROW_DECODED)).write_parquet(buf)
    small = open_small_parquet(buf)
    assert small is not None
    assert small.names == sorted(ARROW_DECODED)
    assert small.read(["s", "i8"]).to_dict(as_series=False) == {
        "s": ["a", None, "ccc"],
        "i8": [1, None, -3],
    }
    # one column the pyarrow path does not take sends the whole file to Polars' reader
    buf = io.BytesIO()
    POLARS_WRITTEN.select("s", "cat").write_parquet(buf)
    assert open_small_parquet(buf) is None


@pytest.mark.parametrize(
    "options",
    [{}, {"use_deprecated_int96_timestamps": True}, {"version": "1.0"}, {"store_schema": False}],
    ids=["default", "int96", "v1", "no-arrow-schema"],
)
def test_other_writers_read_as_polars_reads_them_or_fall_back(options: dict[str, object]) -> None:
    decoded = []
    for column in ARROW_WRITTEN.column_names:
        data = one_column(ARROW_WRITTEN, column, **options)
        got = arrow_read(data, column)
        if got is not None:
            decoded.append(column)
            assert_frame_equal(got, polars_read(data, column), check_exact=True)
    # int96 times are Polars' to read (its unit follows the stored Arrow schema); dates too
    int96 = "use_deprecated_int96_timestamps" in options
    times = [] if int96 else ["ts_utc", "ts_ns", "ts_off"]
    # without the Arrow schema a dictionary is a plain string column to both readers
    plain = ["dict"] if options.get("store_schema") is False else []
    assert decoded == [*times, "large", *plain, "u32"]


def test_a_file_over_the_limit_or_not_parquet_is_left_to_polars() -> None:
    big = pl.DataFrame({"x": range(ARROW_READ_BYTES // 4)}, schema={"x": pl.Int64})
    buf = io.BytesIO()
    big.write_parquet(buf, compression="uncompressed")
    assert buf.getbuffer().nbytes > ARROW_READ_BYTES
    assert open_small_parquet(buf) is None
    assert open_small_parquet(io.BytesIO(b"PAR1 not a parquet file")) is None


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
    footers_by_polars: list[object] = []
    polars_footer = pl.read_parquet_schema

    def footer(source):  # type: ignore[no-untyped-def]
        footers_by_polars.append(source)
        return polars_footer(source)

    monkeypatch.setattr(file_reading.pl, "read_parquet_schema", footer)
    query = (
        ms.scan_files(str(src), format="parquet", schema=rows.schema, max_files_per_trigger=1)
        .select("key", "v")
        .sink_memory("small_parquet_out")
    )
    query.process_all_available(timeout=30)
    query.stop()
    assert query.exception() is None
    assert read_by_polars == [20_000]  # only the large file went through Polars' reader
    assert len(footers_by_polars) == 1  # the small file's footer was parsed once, by pyarrow
    got = ms.table("small_parquet_out")
    assert_frame_equal(got, pl.concat([rows, big]).select("key", "v"), check_exact=True)
