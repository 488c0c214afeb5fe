"""Sources read only the columns a query uses (projection pushdown into the file source)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from unittest import mock

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import connectors._file_reading as file_reading
import microstream as ms
from microstream.plan.nodes import scan_projections

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
    read_columns = file_reading.read_columns

    def spy(*args: Any) -> pl.DataFrame:
        frame = read_columns(*args)
        asked.append(frame.columns)  # the columns decoded, by whichever reader
        return frame

    monkeypatch.setattr(file_reading, "read_columns", spy)
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


# -- the plan that runs resolves every column it names (issue 17) ---------------------------------

ABC = pl.Schema({"a": pl.Int64, "b": pl.String, "c": pl.Float64})


def _write(df: pl.DataFrame, path: Path, fmt: str) -> None:
    if fmt == "parquet":
        df.write_parquet(path)
    else:
        df.write_ipc(path)


def _read_spy() -> tuple[list[list[str] | None], Callable[[], AbstractContextManager[None]]]:
    """Records the columns of every parquet/ipc file the file source decodes.

    ``read_columns`` is where the source decodes a file's data, through Polars'
    reader or (a small parquet file) pyarrow's; the spy records the columns of
    the frame it returns, so a reader that decodes more than it was asked for
    shows too.
    """
    asked: list[list[str] | None] = []
    read_columns = file_reading.read_columns

    def spy(*args: Any) -> pl.DataFrame:
        frame = read_columns(*args)
        asked.append(frame.columns)
        return frame

    @contextmanager
    def installed() -> Iterator[None]:
        with mock.patch.object(file_reading, "read_columns", spy):
            yield

    return asked, installed


def _run_files(frame: ms.StreamFrame, checkpoint: Path) -> pl.DataFrame:
    got: list[pl.DataFrame] = []
    query = frame.foreach_batch(
        lambda df, _: got.append(df),
        trigger=ms.Trigger.available_now(),
        checkpoint=str(checkpoint),
    )
    query.await_termination()
    exc = query.exception()
    if exc is not None:
        raise exc
    return pl.concat(got) if got else pl.DataFrame()


def _polars_reads(chain: Callable[[Any], Any], schema: pl.Schema) -> set[str]:
    """The columns Polars' own optimizer reads for ``chain`` over a LazyFrame of ``schema``."""
    from polars.io.plugins import register_io_source

    read: set[str] = set()

    def source(with_columns: list[str] | None, *_: Any) -> Iterator[pl.DataFrame]:
        read.update(schema.names() if with_columns is None else with_columns)
        yield pl.DataFrame(schema=schema).select(with_columns or schema.names())

    chain(register_io_source(source, schema=schema)).collect()
    return read


SHAPES: dict[str, Callable[[Any], Any]] = {
    "rename": lambda f: f.rename({"b": "bb", "c": "cc"}).select("a", "bb"),
    "drop": lambda f: f.drop("c").select("a"),
    "cast": lambda f: f.cast({"c": pl.Float32}).select("a"),
    "strict rename then drop": lambda f: f.rename({"c": "c2"}, strict=True).drop("c2", "b"),
}


@pytest.mark.parametrize("fmt", ["parquet", "ipc"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_verbs_naming_an_unused_column_run_as_on_a_lazyframe(
    tmp_path: Path, fmt: str, shape: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        part = pl.DataFrame({"a": [i, i + 10], "b": ["x", "y"], "c": [0.5, 1.5]}, schema=ABC)
        _write(part, data / f"part-{i}.{fmt}", fmt)
    chain = SHAPES[shape]
    asked, spying = _read_spy()
    with spying():
        got = _run_files(chain(ms.scan_files(str(data), format=fmt, schema=ABC)), tmp_path / "cp")
    scan = pl.scan_parquet if fmt == "parquet" else pl.scan_ipc
    want = chain(scan(str(data / f"*.{fmt}"))).collect()
    assert_frame_equal(got, want, check_row_order=False)
    assert got.height == 4
    # the projection is kept: only what the result needs is read
    assert {tuple(c or ()) for c in asked} == {tuple(sorted(_polars_reads(chain, ABC)))}


# Random chains of stateless verbs over random schemas, checked against Polars itself.

_DTYPES = [pl.Int64, pl.Float64, pl.String, pl.Boolean]
_CASTS: dict[Any, list[Any]] = {
    pl.Int64: [pl.Float64, pl.String, pl.Int32],
    pl.Int32: [pl.Int64, pl.String],
    pl.Float64: [pl.Float32, pl.String],
    pl.Float32: [pl.Float64],
    pl.String: [pl.String],
    pl.Boolean: [pl.Int64, pl.String],
}


@st.composite
def _schemas(draw: st.DrawFn) -> pl.Schema:
    n = draw(st.integers(min_value=1, max_value=6))
    return pl.Schema({f"col{i}": draw(st.sampled_from(_DTYPES)) for i in range(n)})


def _column_data(dtype: Any, rows: int, draw: st.DrawFn) -> list[Any]:
    values: dict[Any, st.SearchStrategy[Any]] = {
        pl.Int64: st.integers(-100, 100),
        pl.Float64: st.floats(-100, 100, allow_nan=False),
        pl.String: st.text(alphabet="abc", max_size=3),
        pl.Boolean: st.booleans(),
    }
    return draw(st.lists(st.none() | values[dtype], min_size=rows, max_size=rows))


@st.composite
def _chains(draw: st.DrawFn, schema: pl.Schema) -> list[tuple[str, Any]]:
    """Verbs valid on the schema each step produces, with the names that step resolves."""
    current = dict(schema)
    fresh = iter(f"new{i}" for i in range(100))
    steps: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(min_value=1, max_value=5))):
        names = list(current)
        verb = draw(st.sampled_from(["rename", "drop", "cast", "with_columns", "select", "filter"]))
        if verb == "rename":
            picked = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
            mapping = {old: next(fresh) for old in picked}
            current = {mapping.get(k, k): v for k, v in current.items()}
            steps.append(("rename", mapping))
        elif verb == "drop" and len(names) > 1:
            gone = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names) - 1))
            current = {k: v for k, v in current.items() if k not in gone}
            steps.append(("drop", sorted(set(gone))))
        elif verb == "cast":
            name = draw(st.sampled_from(names))
            to = draw(st.sampled_from(_CASTS[current[name]]))
            current[name] = to
            steps.append(("cast", {name: to}))
        elif verb == "with_columns":
            source = draw(st.sampled_from(names))
            target = draw(st.sampled_from([*names, next(fresh)]))
            current[target] = pl.Boolean
            steps.append(("with_columns", pl.col(source).is_null().alias(target)))
        elif verb == "select":
            kept = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
            current = {k: current[k] for k in kept}
            steps.append(("select", kept))
        else:
            steps.append(("filter", pl.col(draw(st.sampled_from(names))).is_not_null()))
    return steps


def _apply(frame: Any, steps: list[tuple[str, Any]]) -> Any:
    for verb, arg in steps:
        frame = getattr(frame, verb)(arg)
    return frame


@settings(max_examples=40, deadline=None)
@given(data=st.data(), fmt=st.sampled_from(["parquet", "ipc"]))
def test_random_verb_chains_match_polars_and_keep_the_projection(
    data: st.DataObject, fmt: str
) -> None:
    schema = data.draw(_schemas(), label="schema")
    steps = data.draw(_chains(schema), label="steps")
    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "data"
        folder.mkdir()
        for i in range(data.draw(st.integers(min_value=1, max_value=3), label="files")):
            rows = data.draw(st.integers(min_value=0, max_value=4), label="rows")
            columns = {name: _column_data(dtype, rows, data.draw) for name, dtype in schema.items()}
            part = pl.DataFrame(columns, schema=schema)
            _write(part, folder / f"part-{i}.{fmt}", fmt)
        asked, spying = _read_spy()
        with spying():
            got = _run_files(
                _apply(ms.scan_files(str(folder), format=fmt, schema=schema), steps), root / "cp"
            )
        scan = pl.scan_parquet if fmt == "parquet" else pl.scan_ipc
        want = _apply(scan(str(folder / f"*.{fmt}")), steps).collect()
        if got.width == 0:  # no batch reached the sink: every file was empty
            assert want.height == 0
        else:
            assert_frame_equal(got, want, check_row_order=False)
        needed = _polars_reads(lambda f: _apply(f, steps), schema)
        expected = tuple(c for c in schema.names() if c in needed) if needed else ()
        for columns in asked:
            assert tuple(columns or schema.names()) == (expected or tuple(schema.names()))
