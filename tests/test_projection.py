"""Sources read only the columns a query uses (projection pushdown into the file source)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from microstream.plan import scan_projections

SCHEMA = pl.Schema({"k": pl.Int64, "ts": pl.Datetime("ms"), "v": pl.Int64, "padding": pl.String})
T0 = datetime(2024, 1, 1)


def source(root: Path) -> ms.StreamFrame:
    return ms.scan_files(str(root), format="parquet", schema=SCHEMA)


def projections(frame: ms.StreamFrame) -> list[tuple[str, ...] | None]:
    return list(scan_projections(frame.plan).values())


def test_the_columns_each_source_feeds_are_found(tmp_path: Path) -> None:
    events = source(tmp_path)
    # the watermark's column counts even when the query drops it afterwards
    windowed = (
        events.select("k", "ts")
        .with_watermark("ts", "1s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(n=pl.len())
        .drop("ts")
    )
    assert projections(windowed) == [("k", "ts")]
    assert projections(events.filter(pl.col("v") > 0).select("k")) == [("k", "v")]
    assert projections(events) == [None]  # every column
    # concat needs equal columns: its inputs read everything
    assert projections(ms.concat([events.select("k"), events.select("k")])) == [None]

    def fails_on_empty(df: pl.DataFrame) -> pl.DataFrame:
        if df.height == 0:
            raise ValueError("no rows")
        return df

    opaque = events.map_batches(fails_on_empty, schema=SCHEMA).select("k")
    assert projections(opaque) == [None]  # cannot be probed: read everything


def test_planning_never_reads_a_static_table(tmp_path: Path) -> None:
    def explode(df: pl.DataFrame) -> pl.DataFrame:
        raise AssertionError("the static table was read while planning")

    users = pl.LazyFrame({"k": [1], "name": ["a"]}).map_batches(
        explode, schema={"k": pl.Int64, "name": pl.String}
    )
    joined = source(tmp_path).join(users, on="k").select("name", "v")
    assert projections(joined) == [("k", "v")]


def test_a_query_reads_only_its_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        pl.DataFrame(
            {
                "k": [i, i + 1],
                "ts": [T0 + timedelta(seconds=i), T0 + timedelta(seconds=i, milliseconds=5)],
                "v": [10 * i, 10 * i + 1],
                "padding": ["x" * 1000] * 2,
            },
            schema=SCHEMA,
        ).write_parquet(data / f"part-{i}.parquet")
    asked: list[list[str] | None] = []
    read_parquet = pl.read_parquet

    def spy(source: object, *args: object, **kwargs: object) -> pl.DataFrame:
        asked.append(kwargs.get("columns"))  # type: ignore[arg-type]
        return read_parquet(source, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pl, "read_parquet", spy)
    got: list[pl.DataFrame] = []
    query = (
        ms.scan_files(str(data), format="parquet", schema=SCHEMA, max_files_per_trigger=1)
        .select("k", "v")
        .foreach_batch(
            lambda df, _: got.append(df),
            trigger=ms.Trigger.available_now(),
            checkpoint=str(tmp_path / "cp"),
        )
    )
    query.await_termination()
    assert asked == [["k", "v"]] * 3
    assert pl.concat(got).sort("k").rows() == [(0, 0), (1, 1), (1, 10), (2, 11), (2, 20), (3, 21)]
