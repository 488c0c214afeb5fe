"""The aggregation's numpy merge of stored and batch partials (``pair_merge``) against the
Polars path it replaces (``_merge_by_position``): the same bits, or a refusal."""

from __future__ import annotations

import math
import random
import struct

import polars as pl

from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.operators.aggregation import _EAGER_ROWS, _group_by, _merge_by_position
from microstream.operators.pair_merge import merge_pairs
from microstream.state.store_rows import POSITION

SPECIAL_FLOATS = [0.0, -0.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan]
SPECIAL_INTS = [0, (1 << 63) - 1, -(1 << 63)]
AGGS = [
    pl.len(),
    pl.col("f").sum(),
    pl.col("f").min().alias("f_min"),
    pl.col("f").max().alias("f_max"),
    pl.col("f").mean().alias("f_mean"),
    pl.col("f").count().alias("f_count"),
    pl.col("f").null_count().alias("f_nulls"),
    pl.col("i").sum().alias("i_sum"),
    pl.col("i").min().alias("i_min"),
    pl.col("i").max().alias("i_max"),
    pl.col("i").mean().alias("i_mean"),
]
INPUT = pl.Schema(
    {
        "k": pl.Int64(),
        "name": pl.String(),
        "f": pl.Float64(),
        "i": pl.Int64(),
        "b": pl.Boolean(),
        ORDER_T: pl.Int64(),
        ORDER_S: pl.Int64(),
    }
)
KEYS = ["k", "name"]


def _spec(aggs: list[pl.Expr]) -> tuple[AggregateSpec, pl.Schema]:
    spec = AggregateSpec(aggs)
    return spec, pl.DataFrame(schema=INPUT).group_by(KEYS).agg(spec.partial_exprs()).schema


def _bits(frame: pl.DataFrame) -> list[tuple[object, ...]]:
    """The rows with every float as its 64 bits (so -0.0, NaN payloads and signs count)."""
    columns = []
    for s in frame.get_columns():
        values = s.to_list()
        if s.dtype.is_float():
            values = [None if v is None else struct.pack(">d", v).hex() for v in values]
        columns.append(values)
    return list(zip(*columns, strict=True))


def _rows(rng: random.Random, keys: list[int], per_key: int, *, special: bool) -> pl.DataFrame:
    """``per_key`` rows for each key of ``keys``; with ``special``, some nulls, zeros,
    NaN, infinities and Int64 extremes."""
    n = len(keys) * per_key

    def f() -> float | None:
        if special and rng.random() < 0.2:
            return rng.choice([None, *SPECIAL_FLOATS])
        return rng.uniform(0.5, 1e6) * rng.choice([1, -1])

    def i() -> int | None:
        if special and rng.random() < 0.2:
            return rng.choice([None, *SPECIAL_INTS])
        # (a mean's sum of ints is a float sum: one that cancels to zero is refused)
        return rng.randint(-1000, 1000) if special else rng.randint(1, 1000)

    ordered = [k for k in keys for _ in range(per_key)]
    return pl.DataFrame(
        {
            "k": ordered,
            "name": [str(k % 7) for k in ordered],
            "f": [f() for _ in range(n)],
            "i": [i() for _ in range(n)],
            "b": [None] * n,
            ORDER_T: [0] * n,
            ORDER_S: list(range(n)),
        },
        schema=INPUT,
    )


def _partials(rows: pl.DataFrame, spec: AggregateSpec, schema: pl.Schema) -> pl.DataFrame:
    """The Polars path's partials of ``rows``, one row per key, in the keys' first order."""
    grouped = _group_by(rows, KEYS, spec.partial_exprs()).select(
        [pl.col(c).cast(t) for c, t in schema.items()]
    )
    order = rows.select(KEYS).unique(maintain_order=True).with_row_index("__at")
    return grouped.join(order, on=KEYS, nulls_equal=True).sort("__at").select(list(schema.names()))


def _case(
    rng: random.Random, spec: AggregateSpec, schema: pl.Schema, groups: int, *, special: bool
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A batch's partials of ``groups`` keys and the stored partials of some of them (in
    a store's own order, with their positions)."""
    keys = rng.sample(range(10 * groups), groups)
    fresh = _partials(_rows(rng, keys, rng.randint(1, 3), special=special), spec, schema)
    chosen = sorted(rng.sample(range(groups), rng.randint(0, groups)))
    stored_keys = [keys[c] for c in chosen]
    old = _partials(_rows(rng, stored_keys, rng.randint(1, 3), special=special), spec, schema)
    old = old.with_columns(pl.Series(POSITION, chosen, dtype=pl.UInt32))
    order = list(range(old.height))
    rng.shuffle(order)
    return old[order], fresh


def test_pair_merge_equals_polars_on_random_states() -> None:
    rng = random.Random(14)
    spec, schema = _spec(AGGS)
    taken = refused = 0
    for round_ in range(300):
        special = round_ % 3 == 0
        old, fresh = _case(rng, spec, schema, rng.randint(1, 40), special=special)
        expected = _merge_by_position(old, fresh, KEYS, schema, spec)
        got = merge_pairs(old, fresh, KEYS, schema, spec)
        if got is None:
            refused += 1
            continue
        taken += 1
        assert got.schema == schema
        assert _bits(got) == _bits(expected), (old, fresh)
    assert taken > 100 and refused > 50  # (both paths exercised)


def test_pair_merge_equals_polars_on_batches_of_the_lazy_group_by() -> None:
    # (above _EAGER_ROWS rows the Polars path groups on the lazy engine: its morsels
    # split a group's two rows differently, the sum stays a + b)
    rng = random.Random(3)
    spec, schema = _spec(AGGS)
    for _ in range(2):
        old, fresh = _case(rng, spec, schema, _EAGER_ROWS, special=False)
        assert old.height + fresh.height > _EAGER_ROWS
        got = merge_pairs(old, fresh, KEYS, schema, spec)
        assert got is not None
        assert _bits(got) == _bits(_merge_by_position(old, fresh, KEYS, schema, spec))


def test_pair_merge_refuses_what_polars_rounds_its_own_way() -> None:
    spec, schema = _spec([pl.col("f").sum(), pl.col("i").sum().alias("i_sum")])
    f, i = schema.names()[2:]

    def frame(fs: list[float | None], is_: list[int | None]) -> pl.DataFrame:
        n = len(fs)
        return pl.DataFrame({"k": list(range(n)), "name": ["a"] * n, f: fs, i: is_}, schema=schema)

    def stored(fs: list[float | None], is_: list[int | None]) -> pl.DataFrame:
        positions = pl.Series(POSITION, range(len(fs)), dtype=pl.UInt32)
        return frame(fs, is_).drop(KEYS).with_columns(positions)

    fresh = frame([1.5, 2.0], [1, 2])
    assert merge_pairs(stored([0.25], [3]), fresh, KEYS, schema, spec) is not None
    # -0.0 + -0.0: Polars' sum gives +0.0, numpy -0.0
    minus = frame([-0.0], [1])
    old = stored([-0.0], [1])
    assert _bits(_merge_by_position(old, minus, KEYS, schema, spec))[0][2] == "0" * 16
    assert merge_pairs(old, minus, KEYS, schema, spec) is None
    # a group of one value -0.0 (no stored row): refused as well
    assert merge_pairs(stored([], []), minus, KEYS, schema, spec) is None
    # sums that cancel to zero, NaN, infinities, nulls
    for value in (-1.5, math.nan, math.inf, None):
        assert merge_pairs(stored([value], [1]), fresh, KEYS, schema, spec) is None
    # an Int64 sum past its range: Polars wraps around
    big = stored([1.0], [(1 << 63) - 1])
    assert merge_pairs(big, fresh, KEYS, schema, spec) is None
    assert merge_pairs(stored([1.0], [-(1 << 63)]), frame([1.0], [-1]), KEYS, schema, spec) is None
    assert merge_pairs(stored([1.0], [None]), fresh, KEYS, schema, spec) is None


def test_pair_merge_keeps_the_polars_path_for_other_aggregates() -> None:
    rng = random.Random(5)
    for aggs in (
        [pl.col("f").std()],
        [pl.col("f").first()],
        [pl.col("b").any()],
        [pl.col("b").sum().alias("b_sum"), pl.col("f").sum()],  # (a UInt32 sum)
        [pl.col("i").cast(pl.Int32).sum().alias("i32")],
    ):
        spec, schema = _spec(aggs)
        old, fresh = _case(rng, spec, schema, 5, special=False)
        assert merge_pairs(old, fresh, KEYS, schema, spec) is None, aggs


def test_pair_merge_writes_no_input() -> None:
    spec, schema = _spec([pl.col("i").sum().alias("i_sum")])
    i = schema.names()[2]
    fresh = pl.DataFrame({"k": [1, 2], "name": ["a", "b"], i: [10, 20]}, schema=schema)
    old = pl.DataFrame({i: [5], POSITION: pl.Series([1], dtype=pl.UInt32)})
    got = merge_pairs(old, fresh, KEYS, schema, spec)
    assert got is not None
    assert got.rows() == [(1, "a", 10), (2, "b", 25)]
    assert fresh[i].to_list() == [10, 20] and old[i].to_list() == [5]
