"""The aggregation's Python path for tiny batches gives Polars' rows, bit for bit.

``TinyFold`` (partials of a batch of one-row groups, their merge with stored partials)
and ``small_stable_hash`` (the key hash of a few rows) replace Polars and numpy calls
on small batches; each is compared here with the path it replaces, on random values:
floats (signed zeros, infinities, NaN, huge), nulls, strings, several keys, integers at
their dtype's edges. A case the Python path cannot reproduce must fall back (return
None), never differ.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import struct
import uuid

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import microstream as ms
from microstream.operators import aggregation, tiny_fold
from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.operators.aggregation import _group_by, _merge_by_position
from microstream.operators.tiny_fold import TinyFold, tumbling_pairs
from microstream.state.key_groups import stable_hash
from microstream.state.small_hash import small_stable_hash
from microstream.state.store_rows import HASH, KG, POSITION, hashed, same_keys
from microstream.time.windows import T, WindowSpec, to_us

FLOATS = [0.0, -0.0, 1.5, -2.25, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan, 0.1, 3.0]
INTS = [0, 1, -1, 7, (1 << 63) - 1, -(1 << 63), 1 << 40]

AGGS = [
    pl.len(),
    pl.col("f").sum(),
    pl.col("f").min(),
    pl.col("f").max(),
    pl.col("f").mean().alias("f_mean"),
    pl.col("f").count().alias("f_count"),
    pl.col("f").null_count().alias("f_nulls"),
    pl.col("i").sum().alias("i_sum"),
    pl.col("i").min().alias("i_min"),
    pl.col("i").max().alias("i_max"),
    pl.col("i").mean().alias("i_mean"),
    pl.col("b").sum().alias("b_sum"),
    pl.col("b").max().alias("b_max"),
    pl.col("s8").sum().alias("s8_sum"),
    pl.col("s8").min().alias("s8_min"),
]
INPUT = pl.Schema(
    {
        "k": pl.Int64(),
        "name": pl.String(),
        "f": pl.Float64(),
        "i": pl.Int64(),
        "b": pl.Boolean(),
        "s8": pl.Int8(),
        ORDER_T: pl.Int64(),
        ORDER_S: pl.Int64(),
    }
)
KEYS = ["k", "name"]


def _setup(aggs: list[pl.Expr]) -> tuple[AggregateSpec, pl.Schema, TinyFold]:
    spec = AggregateSpec(aggs)
    schema = pl.DataFrame(schema=INPUT).group_by(KEYS).agg(spec.partial_exprs()).schema
    tiny = TinyFold(spec, KEYS, schema, INPUT)
    assert tiny.usable
    return spec, schema, tiny


def _bits(frame: pl.DataFrame) -> list[tuple[object, ...]]:
    """The rows with every float as its 64 bits (so -0.0, NaN payloads and signs count)."""
    columns = []
    for s in frame.get_columns():
        values = s.to_list()
        if s.dtype.is_float():
            values = [None if v is None else struct.pack(">d", v).hex() for v in values]
        columns.append(values)
    return list(zip(*columns, strict=True))


def _rows(rng: random.Random, n: int, *, distinct: bool = True) -> pl.DataFrame:
    keys: list[tuple[int | None, str | None]] = []
    while len(keys) < n:
        key = (rng.choice([None, 0, 1, 2, 3]), rng.choice([None, "", "a", "é", "bb"]))
        if not distinct or key not in keys:
            keys.append(key)
    return pl.DataFrame(
        {
            "k": [k for k, _ in keys],
            "name": [s for _, s in keys],
            "f": [rng.choice([None, *FLOATS, rng.uniform(-1e6, 1e6)]) for _ in range(n)],
            "i": [rng.choice([None, *INTS, rng.randint(-1000, 1000)]) for _ in range(n)],
            "b": [rng.choice([None, True, False]) for _ in range(n)],
            "s8": [rng.choice([None, -128, 127, 0, 5]) for _ in range(n)],
            ORDER_T: [0] * n,
            ORDER_S: list(range(n)),
        },
        schema=INPUT,
    )


def _polars_partials(rows: pl.DataFrame, spec: AggregateSpec, schema: pl.Schema) -> pl.DataFrame:
    """The Polars path's partials, in ``rows``' order of keys (for the comparison)."""
    grouped = _group_by(rows, KEYS, spec.partial_exprs()).select(
        [pl.col(c).cast(t) for c, t in schema.items()]
    )
    order = rows.select(KEYS).unique(maintain_order=True).with_row_index("__at")
    return grouped.join(order, on=KEYS, nulls_equal=True).sort("__at").select(list(schema.names()))


def test_partials_equal_polars_on_random_batches() -> None:
    rng = random.Random(14)
    spec, schema, tiny = _setup(AGGS)
    taken = 0
    for _ in range(400):
        rows = _rows(rng, rng.randint(1, 8))
        got = tiny.partials(rows)
        if got is None:
            continue
        taken += 1
        assert _bits(got) == _bits(_polars_partials(rows, spec, schema)), rows
        assert got.schema == schema
    assert taken == 400  # (one value per group: every batch has an exact Python partial)


def test_partials_refuse_a_repeated_key() -> None:
    _, _, tiny = _setup(AGGS)
    rows = _rows(random.Random(1), 3)
    repeated = pl.concat([rows, rows.head(1)])
    assert tiny.partials(repeated) is None
    assert tiny.partials(pl.concat([rows] * 6)) is None  # (over TINY_ROWS, too)


def test_merge_equals_polars_on_random_states() -> None:
    rng = random.Random(15)
    spec, schema, tiny = _setup(AGGS)
    taken = refused = 0
    for _ in range(600):
        fresh_rows = _rows(rng, rng.randint(1, 6))
        fresh = tiny.partials(fresh_rows)
        assert fresh is not None
        # stored partials of some of the groups: partials of other random rows, same keys
        chosen = sorted(rng.sample(range(fresh.height), rng.randint(1, fresh.height)))
        stored_rows = _rows(rng, len(chosen)).with_columns(
            fresh_rows.select(KEYS)[chosen].get_columns()
        )
        old = _polars_partials(stored_rows, spec, schema)
        if rng.random() < 0.5:  # (a state of many rows per group: sums that are not one value)
            doubled = pl.concat([stored_rows, _rows(rng, len(chosen))]).with_columns(
                pl.concat([fresh_rows.select(KEYS)[chosen]] * 2).get_columns()
            )
            old = _polars_partials(doubled, spec, schema)
        positions = pl.Series(POSITION, chosen, dtype=pl.UInt32)
        old = old.with_columns(positions)
        order = list(range(old.height))
        rng.shuffle(order)  # (a store returns its rows in its own order)
        old = old[order]
        expected = _merge_by_position(old, fresh, KEYS, schema, spec)
        got = tiny.merge(old, fresh)
        if got is None:
            refused += 1
            continue
        taken += 1
        assert _bits(got) == _bits(expected), (old, fresh)
        assert got.schema == schema
    assert taken > 50 and refused > 50  # (both paths exercised)


def test_merge_refuses_what_polars_rounds_its_own_way() -> None:
    spec, schema, tiny = _setup([pl.col("f").sum(), pl.col("i").sum().alias("i_sum")])
    fresh = tiny.partials(
        pl.DataFrame(
            {"k": [1], "name": ["a"], "f": [-0.0], "i": [1], "b": [None], "s8": [None],
             ORDER_T: [0], ORDER_S: [0]},
            schema=INPUT,
        )
    )  # fmt: skip
    assert fresh is not None
    old = fresh.with_columns(pl.Series(POSITION, [0], dtype=pl.UInt32))
    # -0.0 + -0.0: Polars' sum gives +0.0
    assert tiny.merge(old, fresh) is None
    assert _bits(_merge_by_position(old, fresh, KEYS, schema, spec))[0][2] == "0" * 16
    # an Int64 sum past its range: Polars wraps around
    big = old.with_columns(
        pl.lit((1 << 63) - 1, pl.Int64).alias(schema.names()[3]),
        pl.lit(1.0).alias(schema.names()[2]),
    )
    assert tiny.merge(big, fresh) is None


def test_unsupported_aggregates_keep_the_polars_path() -> None:
    for aggs in (
        [pl.col("f").std()],
        [pl.col("f").first()],
        [(pl.col("f") * 2).sum()],
        [pl.col("name").min()],
    ):
        spec = AggregateSpec(aggs)
        schema = pl.DataFrame(schema=INPUT).group_by(KEYS).agg(spec.partial_exprs()).schema
        assert not TinyFold(spec, KEYS, schema, INPUT).usable


def test_float_keys_of_several_rows_keep_the_polars_path() -> None:
    schema_in = pl.Schema({"x": pl.Float64(), "v": pl.Int64()})
    spec = AggregateSpec([pl.col("v").sum()])
    schema = pl.DataFrame(schema=schema_in).group_by(["x"]).agg(spec.partial_exprs()).schema
    tiny = TinyFold(spec, ["x"], schema, schema_in)
    # (0.0 and -0.0, or two NaNs, may be one Polars group: Python tuples cannot tell)
    assert tiny.partials(pl.DataFrame({"x": [0.0, -0.0], "v": [1, 2]})) is None
    one = tiny.partials(pl.DataFrame({"x": [math.nan], "v": [1]}))
    assert one is not None and one.get_column(schema.names()[1]).to_list() == [1]


# -- the window assignment -------------------------------------------------------------


def _polars_pairs(
    batch: pl.DataFrame, spec: WindowSpec, dtype: pl.DataType, batch_id: int
) -> pl.DataFrame:
    """The Polars path of ``AggregationOperator._assign`` for a batch without null times."""
    seq = pl.int_range(pl.len(), dtype=pl.Int64) + batch_id * (1 << 31)
    t = to_us(spec.column)
    return spec.assign(batch.with_columns(t.alias(T), seq.alias(ORDER_S), t.alias(ORDER_T)), dtype)


@pytest.mark.parametrize(
    "dtype", [pl.Datetime("us"), pl.Datetime("ms"), pl.Datetime("us", "Asia/Kolkata"), pl.Date()]
)
def test_tumbling_pairs_equal_polars(dtype: pl.DataType) -> None:
    rng = random.Random(17)
    base = dt.datetime(2024, 1, 1)
    for _ in range(60):
        every = rng.choice([1, 7, 1000, 60_000_000, 86_400_000_000, 7 * 86_400_000_000])
        spec = WindowSpec(
            "ts", every_us=every, period_us=every, offset_us=rng.randint(-every, every)
        )
        n = rng.randint(1, 16)
        times = [
            base + dt.timedelta(microseconds=rng.randint(-(6 * 10**16), 10**12)) for _ in range(n)
        ]
        batch = pl.DataFrame(
            {"ts": pl.Series(times).cast(dtype), "v": [rng.random() for _ in range(n)]}
        )
        batch_id = rng.randint(0, 10**6)
        got = tumbling_pairs(batch, spec, dtype, batch_id)
        assert got is not None
        expected = _polars_pairs(batch, spec, dtype, batch_id)
        assert got.schema == expected.schema
        assert got.rows() == expected.rows()


def test_tumbling_pairs_leave_the_rest_to_polars() -> None:
    tumbling = WindowSpec("ts", every_us=60_000_000, period_us=60_000_000)
    rows = pl.DataFrame({"ts": [dt.datetime(2024, 1, 1)]})
    assert tumbling_pairs(rows, tumbling, pl.Datetime("us"), 0) is not None
    sliding = WindowSpec("ts", every_us=10, period_us=30)
    assert tumbling_pairs(rows, sliding, pl.Datetime("us"), 0) is None
    with_null = pl.DataFrame({"ts": [dt.datetime(2024, 1, 1), None]})
    assert tumbling_pairs(with_null, tumbling, pl.Datetime("us"), 0) is None
    ns = rows.with_columns(pl.col("ts").cast(pl.Datetime("ns")))
    assert tumbling_pairs(ns, tumbling, pl.Datetime("ns"), 0) is None
    assert tumbling_pairs(pl.concat([rows] * 17), tumbling, pl.Datetime("us"), 0) is None
    # a window ending past the largest Datetime: Polars' path raises its error
    far = pl.DataFrame({"ts": pl.Series([(1 << 63) - 10], dtype=pl.Datetime("us"))})
    assert tumbling_pairs(far, tumbling, pl.Datetime("us"), 0) is None
    with pytest.raises(ms.EventTimeError):
        _polars_pairs(far, tumbling, pl.Datetime("us"), 0)


# -- the key hash -------------------------------------------------------------------------


def _hash_frame(rng: random.Random, n: int) -> pl.DataFrame:
    def pick(values: list[object]) -> list[object]:
        return [rng.choice(values) for _ in range(n)]

    base = dt.datetime(2024, 1, 1)
    return pl.DataFrame(
        {
            "i64": pick([0, -1, 1, (1 << 63) - 1, -(1 << 63), 12345]),
            "u64": pl.Series(pick([0, 1, (1 << 64) - 1, 1 << 63]), dtype=pl.UInt64),
            "i8": pl.Series(pick([-128, 127, 0, -1]), dtype=pl.Int8),
            "u16": pl.Series(pick([0, 65535, 7]), dtype=pl.UInt16),
            "b": pick([True, False]),
            "s": pick([None, "", "a", "é", "naïve 🦀", "x" * 40, "é" * 64, "y" * 65]),
            "ts": pl.Series(pick([base, base - dt.timedelta(days=40000)]), dtype=pl.Datetime("us")),
            "ns": pl.Series(pick([base]), dtype=pl.Datetime("ns", "Europe/Paris")),
            "d": pl.Series(pick([dt.date(2024, 1, 1), dt.date(1900, 1, 1)]), dtype=pl.Date),
            "dur": pl.Series(pick([dt.timedelta(seconds=-3), dt.timedelta(0)]), dtype=pl.Duration("ms")),
            "with_null": pick([None, 1, 2]),
            "f": pick([0.0, -0.0, math.nan, 1.5]),
        }
    )  # fmt: skip


def test_small_hash_equals_stable_hash() -> None:
    rng = random.Random(16)
    for _ in range(150):
        frame = _hash_frame(rng, rng.randint(0, 20))
        columns = rng.sample(frame.columns, rng.randint(1, 4))
        expected = stable_hash(frame, columns)
        got = small_stable_hash(frame, columns)
        assert got.dtype == np.uint64
        assert got.tolist() == expected.tolist(), columns
        head, rest = columns[:1], columns[1:]
        start = small_stable_hash(frame, head)
        assert small_stable_hash(frame, rest, start=start).tolist() == expected.tolist()


def test_hashed_of_a_few_rows_equals_the_numpy_path() -> None:
    """``hashed`` takes Python integers up to 16 rows: the rows of a small frame get the
    hash and key group they get inside a large frame (numpy's path)."""
    rng = random.Random(18)
    for _ in range(60):
        frame = _hash_frame(rng, 20).select("i64", "s", "d", "b", "with_null")
        small = frame.head(rng.randint(1, 16))
        hash_columns = rng.sample(["i64", "s", "d"], rng.randint(1, 2))
        for key_columns in (None, [*hash_columns, "b"], ["b", *hash_columns], hash_columns):
            seed = rng.getrandbits(64)
            big = hashed(frame, hash_columns, 128, seed, key_columns=key_columns)
            got = hashed(small, hash_columns, 128, seed, key_columns=key_columns)
            assert got.columns == [*small.columns, HASH, KG]
            assert got.schema == big.schema
            assert got.rows() == big.head(small.height).rows()
    # a null in a numeric key (numpy's path there), and an earlier hash replaced
    nulls = _hash_frame(rng, 3).select("with_null", "s")
    again = hashed(hashed(nulls, ["with_null"], 8, 1), ["s"], 8, 1)
    assert again.columns == ["with_null", "s", HASH, KG]
    expected = hashed(pl.concat([nulls] * 6), ["s"], 8, 1).head(3)
    assert again.rows() == expected.rows()


def test_same_keys_of_a_few_rows() -> None:
    a = pl.DataFrame({"k": [1, None, 3], "s": ["x", None, ""], "f": [0.0, 1.0, math.nan]})
    assert same_keys(a, a.clone(), ["k", "s"])
    assert not same_keys(a, a.with_columns(pl.lit(None, pl.Int64).alias("k")), ["k", "s"])
    assert not same_keys(a, a.reverse(), ["k"])
    assert not same_keys(a, a.head(2), ["k"])
    # floats go to Polars' comparison: NaN equals NaN there, -0.0 is not 0.0 bitwise
    assert same_keys(a, a.clone(), ["f"])


# -- the whole operator -----------------------------------------------------------------


@settings(
    max_examples=15,
    deadline=None,
    # (the monkeypatch is undone inside each example: a context, not the fixture's end)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    values=st.lists(
        st.tuples(
            st.integers(0, 90),
            st.sampled_from([None, "a", "", "é"]),
            st.one_of(st.none(), st.sampled_from(FLOATS), st.floats(-1e9, 1e9)),
            st.integers(1, 3),
        ),
        min_size=1,
        max_size=25,
    )
)
def test_stream_results_equal_with_and_without_the_tiny_path(
    values: list[tuple[int, str | None, float | None, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 1-3 rows through a windowed aggregation, once with the Python paths and
    once with them refused (Polars' window assignment, partials and merge): the same
    emitted rows, bit for bit."""
    schema = {"ts": pl.Datetime("us"), "name": pl.String, "v": pl.Float64}
    start = dt.datetime(2024, 1, 1)
    rows = pl.DataFrame(
        {
            "ts": [start + dt.timedelta(seconds=s) for s, _, _, _ in values],
            "name": [n for _, n, _, _ in values],
            "v": [v for _, _, v, _ in values],
        },
        schema=schema,
    )
    sizes = [1, *(size for _, _, _, size in values[1:])]  # (a 1-row batch first: tiny)

    def run() -> list[tuple[object, ...]]:
        source = ms.MemoryStream(schema)
        name = f"tiny_{uuid.uuid4().hex[:8]}"
        query = (
            source.lazy()
            .with_watermark("ts", "5s")
            .group_by_dynamic("ts", every="30s", group_by="name")
            .agg(
                pl.len(),
                pl.col("v").sum(),
                pl.col("v").max().alias("x"),
                pl.col("v").mean().alias("m"),
            )
            .sink_memory(name, output_mode="update")
        )
        try:
            at = 0
            for size in sizes:
                if at >= rows.height:
                    break
                source.add_data(rows.slice(at, size))
                query.process_all_available(timeout=30)
                at += size
        finally:
            query.stop()
        assert query.exception() is None
        return _bits(ms.table(name))

    taken: list[int] = []
    partials = tiny_fold.TinyFold.partials

    def counted(self: TinyFold, rows: pl.DataFrame) -> pl.DataFrame | None:
        out = partials(self, rows)
        taken.append(out is not None)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(tiny_fold.TinyFold, "partials", counted)
        with_tiny = run()
    assert any(taken)  # (the Python path ran)
    with monkeypatch.context() as patch:
        patch.setattr(tiny_fold.TinyFold, "partials", lambda self, rows: None)
        patch.setattr(aggregation, "tumbling_pairs", lambda *args: None)
        without = run()
    assert with_tiny == without
