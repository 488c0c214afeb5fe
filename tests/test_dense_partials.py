"""The batch partials over small integer keys by counting (``dense_partials.py``), against
Polars' group-by: the same groups, counts and integer sums, float sums in row order."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.operators import dense_partials
from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.operators.dense_partials import DensePartials
from microstream.time.windows import END, START

EVERY = 60_000_000
AGGS = [
    pl.len().alias("n"),
    pl.col("v").sum().alias("s"),
    pl.col("v").mean().alias("m"),
    pl.col("v").count().alias("c"),
    pl.col("v").null_count().alias("z"),
    pl.col("i").sum().alias("si"),
    pl.col("i").mean().alias("mi"),
]
INPUT = pl.Schema(
    {
        "k": pl.Int64,
        "b": pl.Boolean,
        "u": pl.UInt8,
        "v": pl.Float64,
        "i": pl.Int64,
        START: pl.Int64,
        END: pl.Int64,
        ORDER_T: pl.Int64,
        ORDER_S: pl.Int64,
    }
)
KEYS = ["k", "b", "u", START, END]


def partial_schema(aggs: list[pl.Expr], keys: list[str] = KEYS) -> pl.Schema:
    spec = AggregateSpec(aggs)
    return pl.DataFrame(schema=INPUT).group_by(keys).agg(spec.partial_exprs()).schema


def dense(aggs: list[pl.Expr] = AGGS, keys: list[str] = KEYS, **kwargs: Any) -> DensePartials:
    return DensePartials(
        AggregateSpec(aggs),
        keys,
        partial_schema(aggs, keys),
        INPUT,
        strides={START: EVERY},
        follows={END: START},
        **kwargs,
    )


def rows(n: int, seed: int, keys: int = 50) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    start = (rng.integers(0, 4, n) * EVERY + 1_700_000_000_000_000).astype(np.int64)
    return pl.DataFrame(
        {
            "k": rng.integers(-keys, keys, n),
            "b": rng.integers(0, 2, n).astype(bool),
            "u": rng.integers(3, 9, n).astype(np.uint8),
            "v": rng.random(n) * 200 - 100,
            "i": rng.integers(-(10**9), 10**9, n),
            START: start,
            END: start + EVERY,
            ORDER_T: start,
            ORDER_S: np.arange(n),
        },
        schema=INPUT,
    )


def polars_partials(frame: pl.DataFrame, aggs: list[pl.Expr] = AGGS) -> pl.DataFrame:
    spec = AggregateSpec(aggs)
    return frame.group_by(KEYS).agg(*spec.partial_exprs(), pl.len().alias("__n"))


def row_order_sums(frame: pl.DataFrame, value: str) -> dict[tuple, float]:
    """Each group's sum of ``value``, added one row after the other in Python."""
    sums: dict[tuple, float] = {}
    for row in frame.select(*KEYS, value).iter_rows():
        key = row[:-1]
        sums[key] = sums.get(key, 0.0) + float(row[-1])
    return sums


@pytest.mark.parametrize("seed", range(8))
def test_dense_partials_are_polars_groups_with_row_order_float_sums(seed: int) -> None:
    frame = rows(3000 + 1000 * seed, seed)
    got = dense().partials(frame)
    assert got is not None
    expected = polars_partials(frame)
    assert got.schema == expected.schema
    got, expected = got.sort(KEYS), expected.sort(KEYS)
    floats = ["__agg1", "__agg2_sum"]  # (sum and mean of the floats; of the ints: 5, 6_sum)
    # keys, counts and integer sums (also as float, below 2**53): Polars' exactly
    assert_frame_equal(got.drop(*floats), expected.drop(*floats), check_exact=True)
    assert got["__agg6_sum"].dtype == pl.Float64
    # float sums: the row-order sum, bit for bit, and Polars' up to the summation order
    by_row = row_order_sums(frame, "v")
    want = [by_row[key] for key in got.select(KEYS).iter_rows()]
    for column in floats:
        assert got[column].to_list() == want
        assert_frame_equal(got.select(column), expected.select(column), rel_tol=1e-12)


def test_sliding_window_starts_on_the_grid_and_an_offset_end() -> None:
    frame = rows(5000, 11).with_columns(
        (pl.col(START) + 7).alias(START), (pl.col(START) + 7 + 3 * EVERY).alias(END)
    )
    got = dense().partials(frame)
    assert got is not None
    assert_frame_equal(
        got.select(*KEYS, "__n").sort(KEYS),
        polars_partials(frame).select(*KEYS, "__n").sort(KEYS),
        check_exact=True,
    )


def refused(frame: pl.DataFrame, partials: DensePartials | None = None) -> bool:
    return (partials or dense()).partials(frame) is None


def test_dense_partials_refuse_what_they_cannot_give_exactly() -> None:
    frame = rows(2000, 3)
    assert not refused(frame)
    at = pl.int_range(pl.len()) == 17
    for column, value in [
        ("k", None),  # a null key
        (START, None),
        ("v", None),  # a null value: counts and sums skip it
        ("i", None),
        ("v", float("nan")),
        ("v", float("inf")),
        ("v", 0.0),  # a zero's sign
        ("v", -0.0),
        ("i", 2**62),  # a sum past 2**53
        ("k", 10**12),  # too many cells
        (START, 1_700_000_000_000_001),  # off the grid
        (END, 1),  # not the start plus a constant
    ]:
        changed = frame.with_columns(
            pl.when(at).then(pl.lit(value, INPUT[column])).otherwise(pl.col(column)).alias(column)
        )
        assert refused(changed), (column, value)
    # a group whose values cancel to zero
    pair = frame.head(2).with_columns(pl.col(c).first() for c in ("k", "b", "u", START, END))
    cancel = pl.concat([pair.with_columns(v=pl.Series([1.5, -1.5])), frame.slice(2)])
    assert refused(cancel)
    assert not refused(pl.concat([pair, frame.slice(2)]))


@pytest.mark.parametrize(
    "aggs",
    [
        [pl.col("v").min()],
        [pl.col("v").first()],
        [pl.col("v").std()],
        [(pl.col("v") * 2).sum()],
        [pl.col("u").sum()],
    ],
)
def test_other_aggregates_keep_the_polars_group_by(aggs: list[pl.Expr]) -> None:
    assert not dense(aggs).usable
    assert refused(rows(100, 1), dense(aggs))


@pytest.mark.parametrize("dtypes", [[pl.String], [pl.UInt64], [pl.Float64], [pl.Int64, pl.Float32]])
def test_keys_without_an_integer_to_count_by_keep_the_polars_group_by(
    dtypes: list[pl.DataType],
) -> None:
    keys = [f"k{i}" for i in range(len(dtypes))]
    schema = pl.Schema({**dict(zip(keys, dtypes, strict=True)), "v": pl.Float64})
    spec = AggregateSpec([pl.col("v").sum()])
    partials = pl.DataFrame(schema=schema).group_by(keys).agg(spec.partial_exprs()).schema
    assert not DensePartials(spec, keys, partials, schema).usable


def with_names(frame: pl.DataFrame) -> pl.DataFrame:
    """``frame`` with key columns that are functions of ``k`` (a string with nulls, an
    int too wide to count by with ``k``, a datetime)."""
    return frame.with_columns(
        pl.when(pl.col("k") % 5 == 0)
        .then(None)
        .otherwise(pl.format("n{}", pl.col("k")))
        .alias("name"),
        (pl.col("k") * 1_000_003).alias("wide"),
        pl.from_epoch(pl.col("k"), time_unit="s").alias("when"),
    )


def test_key_columns_that_are_functions_of_the_counted_ones_are_carried_along() -> None:
    keys = ["k", "name", "wide", "b", "when", START, END]
    frame = with_names(rows(20_000, 9))
    schema = pl.Schema({**frame.schema})
    spec = AggregateSpec(AGGS)
    partials = frame.group_by(keys).agg(spec.partial_exprs()).schema
    dense = DensePartials(
        spec, keys, partials, schema, strides={START: EVERY}, follows={END: START}
    )
    got = dense.partials(frame)
    assert got is not None
    expected = frame.group_by(keys).agg(*spec.partial_exprs(), pl.len().alias("__n"))
    floats = ["__agg1", "__agg2_sum"]
    assert_frame_equal(
        got.drop(floats).sort(keys, nulls_last=True),
        expected.drop(floats).sort(keys, nulls_last=True),
        check_exact=True,
    )
    # a key column that is not a function of the counted ones: Polars' group-by, then on
    mixed = frame.with_columns(pl.col("name").shuffle(seed=1))
    assert dense.partials(mixed) is None
    assert dense.partials(frame) is None
    assert (
        DensePartials(
            spec, keys, partials, schema, strides={START: EVERY}, follows={END: START}
        ).partials(frame)
        is not None
    )


def test_the_dense_array_stays_within_its_bound() -> None:
    frame = rows(1000, 5, keys=20_000)  # (~1.9M cells)
    assert refused(frame, dense(max_cells=1))
    assert not refused(frame, dense(max_cells=10_000))


def test_a_windowed_query_of_large_batches_takes_the_dense_path_to_exact_rows(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 12k rows (the lazy group-by's size), an int and a Boolean key, values
    # in halves (every order of summing gives the same bits): the rows of the batch
    # query exactly, and every batch's partials were counted.
    taken: list[int] = []
    counted = DensePartials.partials

    def spy(self: DensePartials, frame: pl.DataFrame) -> pl.DataFrame | None:
        out = counted(self, frame)
        taken.append(0 if out is None else frame.height)
        return out

    monkeypatch.setattr(dense_partials.DensePartials, "partials", spy)
    t0 = datetime(2026, 1, 1)
    schema = {"ts": pl.Datetime("us"), "k": pl.Int64, "f": pl.Boolean, "v": pl.Float64}
    rng = np.random.default_rng(2)
    n = 36_000
    data = pl.DataFrame(
        {
            "ts": [
                t0 + timedelta(milliseconds=int(s)) for s in np.sort(rng.integers(0, 900_000, n))
            ],
            "k": rng.integers(0, 500, n),
            "f": rng.integers(0, 2, n).astype(bool),
            "v": rng.integers(1, 80, n) / 2.0,
        },
        schema=schema,
    )
    aggs = [pl.len().alias("n"), pl.col("v").sum().alias("sum"), pl.col("v").mean().alias("mean")]
    source = ms.MemoryStream(schema)
    out: list[pl.DataFrame] = []
    query = (
        source.lazy()
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by=["k", "f"])
        .agg(aggs)
        .foreach_batch(
            lambda df, _: out.append(df), output_mode="append", checkpoint=f"memory://{name}/cp"
        )
    )
    closing = pl.DataFrame(
        {"ts": [t0 + timedelta(hours=1)], "k": [0], "f": [True], "v": [1.0]}, schema=schema
    )
    for batch in [*(data.slice(i, 12_000) for i in range(0, n, 12_000)), closing]:
        source.add_data(batch)
        query.process_all_available(timeout=30)
    query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    got = pl.concat(out)
    expected = (
        data.sort("ts")
        .group_by_dynamic("ts", every="1m", group_by=["k", "f"])
        .agg(aggs)
        .with_columns(pl.col("n").cast(got.schema["n"]))
    )
    key = ["k", "f", "ts"]
    assert_frame_equal(got.sort(key), expected.select(got.columns).sort(key), check_exact=True)
    assert got.height == expected.height > 1000
    assert taken == [12_000, 12_000, 12_000]
