"""The batch oracle for stateful queries, over random out-of-order input and batch splits.

- complete mode: the final table == the same Polars aggregation over all input;
- append mode after ``available_now(flush=True)``: the emitted rows == Polars over
  all input minus the (row, window) pairs the query reported late;
- update mode: the last row emitted per window == the same.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime, timedelta
from typing import Any

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream as ms

T0 = datetime(2024, 1, 1)
SCHEMA = {"ts": pl.Datetime("us"), "k": pl.String, "v": pl.Float64}
AGGS = [
    pl.col("v").sum().alias("sum"),
    pl.len().alias("n"),
    pl.col("v").mean().alias("mean"),
    pl.col("v").min().alias("min"),
    pl.col("v").max().alias("max"),
    pl.col("v").std().alias("std"),
    pl.col("v").first().alias("first"),
    pl.col("v").last().alias("last"),
    (pl.col("v").max() - pl.col("v").min()).alias("range"),
    pl.col("v").median().alias("median"),
    pl.col("v").n_unique().alias("distinct"),
]

events = st.lists(
    st.tuples(
        st.integers(0, 400),  # seconds after T0: out of order across and within batches
        st.sampled_from(["a", "b", "c"]),
        st.one_of(st.none(), st.integers(-5, 5).map(float)),
    ),
    min_size=1,
    max_size=50,
)
splits = st.lists(st.integers(0, 50), max_size=6)
delays = st.sampled_from(["0s", "15s", "1m"])


def frame_of(data: list[tuple[int, str, float | None]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=s) for s, _, _ in data],
            "k": [k for _, k, _ in data],
            "v": [v for *_, v in data],
        },
        schema=SCHEMA,
    ).with_row_index("id")


def batches_of(full: pl.DataFrame, cuts: list[int]) -> list[pl.DataFrame]:
    bounds = sorted({0, full.height, *(c for c in cuts if c < full.height)})
    return [full.slice(a, b - a) for a, b in itertools.pairwise(bounds)]


def run_stream(
    full: pl.DataFrame, cuts: list[int], query_fn: Any, output_mode: str
) -> tuple[list[tuple[int, pl.DataFrame]], pl.DataFrame]:
    name = f"oracle_{uuid.uuid4().hex[:8]}"
    source = ms.MemoryStream(full.schema)
    emitted: list[tuple[int, pl.DataFrame]] = []

    def start(trigger: ms.Trigger | None) -> ms.StreamingQuery:
        return query_fn(source.lazy(), f"{name}_late").foreach_batch(
            lambda df, batch_id: emitted.append((batch_id, df)),
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=f"memory://{name}",
        )

    # One micro-batch per slice (a source given everything at once reads it as one
    # batch), then a restart that drains and flushes every window.
    query = start(None)
    try:
        for batch in batches_of(full, cuts):
            source.add_data(batch)
            query.process_all_available(timeout=30)
    finally:
        query.stop()
    assert query.exception() is None
    query = start(ms.Trigger.available_now(flush=True))
    assert query.await_termination(timeout=60)
    assert query.exception() is None
    late = ms.table(f"{name}_late")  # registered when the query starts
    if late.width == 0:  # no late rows at all
        late = pl.DataFrame(schema={**full.schema, "window_start": pl.Datetime("us")})
    assert late.height == 0 or late["batch_id"].min() >= 1  # batch 0 has nothing to be late for
    return emitted, late


def tumbling(delay: str) -> Any:
    def query_fn(frame: Any, late_table: str) -> Any:
        if isinstance(frame, ms.StreamFrame):
            frame = frame.with_watermark("ts", delay, on_late=late_table)
        return frame.group_by_dynamic("ts", every="1m", group_by="k").agg(AGGS)

    return query_fn


def batch_oracle(rows: pl.DataFrame) -> pl.DataFrame:
    return (
        rows.sort("ts", maintain_order=True)
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(AGGS)
        .sort("ts", "k")
    )


def check(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert_frame_equal(
        got.sort("ts", "k"), expected.sort("ts", "k"), check_dtypes=True, rel_tol=1e-9, abs_tol=1e-9
    )


SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(data=events, cuts=splits, delay=delays)
def test_append_with_flush_equals_batch_minus_late(data: Any, cuts: list[int], delay: str) -> None:
    full = frame_of(data)
    emitted, late = run_stream(full, cuts, tumbling(delay), "append")
    got = pl.concat([df for _, df in emitted])
    kept = full.join(late.select("id"), on="id", how="anti")
    # each late row misses exactly its one tumbling window: removing it is the oracle
    assert late.height + kept.height == full.height
    check(got, batch_oracle(kept) if kept.height else got.clear())
    # every window is emitted exactly once
    assert got.select("k", "ts").is_duplicated().sum() == 0


@SETTINGS
@given(data=events, cuts=splits, delay=delays)
def test_complete_mode_equals_batch(data: Any, cuts: list[int], delay: str) -> None:
    full = frame_of(data)
    emitted, late = run_stream(full, cuts, tumbling(delay), "complete")
    assert late.height == 0  # complete mode keeps every group: nothing is late
    last_batch_with_rows = [df for _, df in emitted][-1]
    check(last_batch_with_rows, batch_oracle(full))


@SETTINGS
@given(data=events, cuts=splits, delay=delays)
def test_update_mode_last_row_per_window_equals_batch(
    data: Any, cuts: list[int], delay: str
) -> None:
    full = frame_of(data)
    emitted, late = run_stream(full, cuts, tumbling(delay), "update")
    got = (
        pl.concat([df.with_columns(pl.lit(b).alias("__b")) for b, df in emitted])
        .sort("__b", maintain_order=True)
        .group_by("k", "ts", maintain_order=True)
        .last()
        .drop("__b")
    )
    kept = full.join(late.select("id"), on="id", how="anti")
    check(got, batch_oracle(kept) if kept.height else got.clear())


@SETTINGS
@given(data=events, cuts=splits)
def test_sliding_windows_equal_reference_assignment(data: Any, cuts: list[int]) -> None:
    full = frame_of(data)

    def query_fn(frame: Any, late_table: str) -> Any:
        return (
            frame.with_watermark("ts", "20s", on_late=late_table)
            .group_by_dynamic("ts", every="30s", period="90s", group_by="k")
            .agg(pl.col("v").sum(), pl.len(), pl.col("id").sort().alias("ids"))
        )

    emitted, late = run_stream(full, cuts, query_fn, "append")
    got = pl.concat([df for _, df in emitted]).sort("ts", "k")
    # reference: every window [k*30s, k*30s + 90s) containing the row, minus late pairs
    pairs = (
        full.with_columns(
            start=pl.int_ranges(
                (pl.col("ts").dt.epoch("s") // 30 - 2) * 30,
                (pl.col("ts").dt.epoch("s") // 30 + 1) * 30,
                30,
            )
        )
        .explode("start")
        .with_columns(start=pl.from_epoch("start", time_unit="s").cast(pl.Datetime("us")))
        .filter(pl.col("start") + timedelta(seconds=90) > pl.col("ts"))
    )
    if late.height:
        pairs = pairs.join(
            late.select("id", pl.col("window_start").alias("start")), on=["id", "start"], how="anti"
        )
    expected = (
        pairs.group_by("k", "start")
        .agg(pl.col("v").sum(), pl.len(), pl.col("id").sort().alias("ids"))
        .rename({"start": "ts"})
        .select(got.columns)
        .sort("ts", "k")
    )
    assert_frame_equal(got, expected, check_dtypes=False)


@SETTINGS
@given(
    data=events,
    cuts=splits,
    shape=st.sampled_from([(1, 3), (2, 3), (1, 2), (3, 7), (2, 2)]),  # (every, period) minutes
)
def test_sliding_windows_equal_polars_with_the_documented_offset(
    data: Any, cuts: list[int], shape: tuple[int, int]
) -> None:
    """The recipe in the README and the docstring: Polars with an earlier offset."""
    every, period = shape

    def sliding(frame: Any, late_table: str) -> Any:
        if isinstance(frame, ms.StreamFrame):
            frame = frame.with_watermark("ts", "10m", on_late=late_table)  # nothing late
        return frame.group_by_dynamic(
            "ts", every=f"{every}m", period=f"{period}m", group_by="k"
        ).agg(pl.len().alias("n"), pl.col("v").sum())

    full = frame_of(data)
    emitted, late = run_stream(full, cuts, sliding, "append")
    assert late.height == 0
    got = pl.concat([df for _, df in emitted])
    offset = -(-(period // -every) - 1) * every  # -(ceil(period / every) - 1) * every
    expected = (
        full.sort("ts")
        .group_by_dynamic(
            "ts", every=f"{every}m", period=f"{period}m", offset=f"{offset}m", group_by="k"
        )
        .agg(pl.len().alias("n"), pl.col("v").sum())
    )
    check(got, expected)
