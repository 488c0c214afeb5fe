"""A large batch's partials over tumbling windows in one plan (``operators/big_batch.py``):
the same groups and values as the prepared path, taken only where it may be, and the
queries' rows exactly the batch query's either way."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.operators import aggregation, big_batch
from microstream.operators.aggregates import ORDER_S, ORDER_T, AggregateSpec
from microstream.time.windows import END, START, T, WindowSpec, to_us

T0 = datetime(2026, 1, 1)
SCHEMA = {"ts": pl.Datetime("us"), "k": pl.String, "g": pl.Int64, "v": pl.Float64}
MINUTE = 60_000_000


def events(n: int, seconds: int, seed: int = 7) -> pl.DataFrame:
    """``n`` rows over ``seconds`` of event time, in order; values in halves, so every
    order of summing them gives the same bits; a null group key now and then."""
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, seconds, n))],
            "k": [None if i % 11 == 0 else f"k{i % 5}" for i in rng.integers(0, 100, n)],
            "g": rng.integers(0, 3, n),
            "v": rng.integers(-40, 40, n) / 2.0,
        },
        schema=SCHEMA,
    )


def prepared_partials(batch: pl.DataFrame, window: WindowSpec, spec: AggregateSpec) -> pl.DataFrame:
    """The prepared path's group-by, as the operator runs it on a batch without late rows."""
    time_us = to_us("ts")
    seq = pl.int_range(pl.len(), dtype=pl.Int64)
    df = window.assign(
        batch.with_columns(time_us.alias(T), seq.alias(ORDER_S), time_us.alias(ORDER_T))
    )
    keys = ["k", "g", START, END]
    return df.group_by(keys).agg([*spec.partial_exprs(), pl.len().alias("__n")])


def fused(
    batch: pl.DataFrame, window: WindowSpec, spec: AggregateSpec, late: int | None = None
) -> pl.DataFrame | None:
    return big_batch.fused_partials(
        batch, window, pl.Datetime("us"), ["k", "g"], spec, late_watermark_us=late, count="__n"
    )


SUMS = AggregateSpec(
    [
        pl.len().alias("n"),
        pl.col("v").sum().alias("sum"),
        pl.col("v").mean().alias("mean"),
        pl.col("v").min().alias("min"),
        pl.col("v").max().alias("max"),
        pl.col("v").count().alias("count"),
    ]
)


@pytest.mark.parametrize("offset_s", [0, 25, -50])
def test_the_same_groups_and_values_as_the_prepared_path(offset_s: int) -> None:
    batch = events(20_000, 3_600)
    window = WindowSpec(
        "ts", every_us=5 * MINUTE, period_us=5 * MINUTE, offset_us=offset_s * 1_000_000
    )
    got = fused(batch, window, SUMS)
    assert got is not None
    want = prepared_partials(batch, window, SUMS)
    assert got.columns == want.columns and got.schema == want.schema
    key = ["k", "g", START]
    assert_frame_equal(got.sort(key, nulls_last=True), want.sort(key, nulls_last=True))
    assert got.height > 100


def test_it_leaves_what_it_cannot_do_to_the_prepared_path() -> None:
    batch = events(2_000, 600)
    tumbling = WindowSpec("ts", every_us=MINUTE, period_us=MINUTE)
    assert fused(batch, tumbling, SUMS) is not None
    # sliding windows: a row in several windows
    assert fused(batch, WindowSpec("ts", every_us=MINUTE, period_us=2 * MINUTE), SUMS) is None
    # first/last are ordered by the order columns the prepared path adds
    assert fused(batch, tumbling, AggregateSpec([pl.col("v").first()])) is None
    # buffered rows (median)
    assert fused(batch, tumbling, AggregateSpec([pl.col("v").median()])) is None
    # a null event time: dropped and reported by the prepared path
    nulls = batch.with_columns(
        pl.when(pl.col("g") == 1).then(None).otherwise(pl.col("ts")).alias("ts")
    )
    assert fused(nulls, tumbling, SUMS) is None
    # a row in a window the previous watermark closed (the first window ends at T0 + 1m)
    first_end = int(to_us_value(T0)) + MINUTE
    assert fused(batch, tumbling, SUMS, late=first_end) is None
    assert fused(batch, tumbling, SUMS, late=first_end - 1) is not None
    # a window ending past what the time column holds: the prepared path raises
    assert (
        big_batch.fused_partials(
            batch.with_columns(
                pl.lit(datetime(2262, 4, 11, 23, 47)).cast(pl.Datetime("ns")).alias("ts")
            ),
            WindowSpec("ts", every_us=10 * 86_400_000_000, period_us=10 * 86_400_000_000),
            pl.Datetime("ns"),
            ["k", "g"],
            SUMS,
            late_watermark_us=None,
            count="__n",
        )
        is None
    )


def to_us_value(moment: datetime) -> int:
    return pl.select(pl.lit(moment).cast(pl.Datetime("us")).dt.epoch("us")).item()


def run(frame_fn: Any, batches: list[pl.DataFrame], name: str) -> pl.DataFrame:
    source = ms.MemoryStream(SCHEMA)
    out: list[pl.DataFrame] = []
    query = frame_fn(source.lazy()).foreach_batch(
        lambda df, _: out.append(df), output_mode="append", checkpoint=f"memory://{name}/cp"
    )
    for rows in batches:
        source.add_data(rows)
        query.process_all_available(timeout=30)
    query.stop()
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]
    return pl.concat(out)


@pytest.mark.parametrize("with_first", [False, True])
def test_a_query_of_large_batches_gives_the_batch_querys_rows(
    name: str, with_first: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every batch counts as large here; windows get rows from two batches (folded into the
    # stored partials), a late row comes in the third batch (the prepared path drops it),
    # the last batch closes every window. With first (ordered by the order columns) no
    # batch takes the fused plan; the rows are the batch query's either way, exactly.
    taken: list[bool] = []
    plain = big_batch.fused_partials

    def spy(*args: Any, **kwargs: Any) -> pl.DataFrame | None:
        out = plain(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(aggregation, "BIG_BATCH_ROWS", 1)
    monkeypatch.setattr(aggregation, "fused_partials", spy)
    aggs = [*(item.original for item in SUMS.items)]
    if with_first:
        aggs.append(pl.col("v").first().alias("first"))
    every = events(3_000, 900)
    late = pl.DataFrame({"ts": [T0], "k": ["late"], "g": [0], "v": [1.0]}, schema=SCHEMA)
    closing = pl.DataFrame(
        {"ts": [T0 + timedelta(hours=1)], "k": ["z"], "g": [0], "v": [0.0]}, schema=SCHEMA
    )
    batches = [
        every.slice(0, 1000),
        every.slice(1000, 1000),
        pl.concat([every.slice(2000, 1000), late]),
        closing,
    ]

    def query(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "30s")
            .group_by_dynamic("ts", every="2m", group_by=["k", "g"])
            .agg(aggs)
        )

    got = run(query, batches, name)
    expected = (
        pl.concat([every, closing])
        .sort("ts")
        .group_by_dynamic("ts", every="2m", group_by=["k", "g"])
        .agg(aggs)
        .with_columns(pl.col("n").cast(got.schema["n"]))
        .filter(pl.col("ts") < T0 + timedelta(hours=1))  # (the closing row's window stays open)
    )
    key = ["k", "g", "ts"]
    assert_frame_equal(
        got.sort(key, nulls_last=True), expected.select(got.columns).sort(key, nulls_last=True)
    )
    assert got.height > 20
    if with_first:
        assert taken and not any(taken)
    else:
        # batches 1, 2 and 4 in one plan; batch 3 holds a late row: the prepared path
        assert taken == [True, True, False, True]
