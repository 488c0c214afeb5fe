"""The batch oracle: a stateless stream equals the same Polars query run once on all input.

For random inputs split at random points into micro-batches, the concatenation
of the stream's output must equal ``query(all input)`` computed by Polars.
"""

from __future__ import annotations

import itertools
import uuid
from typing import TypeVar

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream as ms

SCHEMA = {"id": pl.Int64, "user": pl.Int64, "amount": pl.Float64, "note": pl.String}
USERS = pl.DataFrame({"user": [0, 1, 2, 3], "tier": ["gold", "silver", "gold", "bronze"]})

Frame = TypeVar("Frame", pl.LazyFrame, ms.StreamFrame)


def query(frame: Frame) -> Frame:
    """One query text, run on a static LazyFrame and on a stream."""
    return (
        frame.filter(pl.col("amount").is_null() | (pl.col("amount") > -50))
        .with_columns(
            doubled=pl.col("amount") * 2,
            words=pl.col("note").str.split(" "),
            big=pl.when(pl.col("amount") > 10).then(pl.lit("big")).otherwise(pl.lit("small")),
        )
        .join(USERS.lazy(), on="user", how="left")
        .explode("words")
        .drop("note")
    )


rows = st.lists(
    st.tuples(
        st.integers(0, 5),
        st.one_of(st.none(), st.floats(-100, 100, allow_nan=False)),
        st.one_of(st.none(), st.sampled_from(["a b", "c", "", "d e f"])),
    ),
    max_size=60,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=rows, cuts=st.lists(st.integers(0, 60), max_size=8))
def test_stream_equals_batch(
    data: list[tuple[int, float | None, str | None]], cuts: list[int]
) -> None:
    full = pl.DataFrame(
        {
            "id": list(range(len(data))),
            "user": [r[0] for r in data],
            "amount": [r[1] for r in data],
            "note": [r[2] for r in data],
        },
        schema=SCHEMA,
    )
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    batches = [full.slice(a, b - a) for a, b in itertools.pairwise(bounds)]

    source = ms.MemoryStream(SCHEMA)
    name = f"oracle_{uuid.uuid4().hex[:8]}"
    q = query(source.lazy()).sink_memory(name)
    try:
        for batch in batches:
            source.add_data(batch)
        q.process_all_available(timeout=30)
    finally:
        q.stop()
    assert q.exception() is None
    got = ms.table(name)
    expected = query(full.lazy()).collect()
    order = ["id", "words"]
    assert_frame_equal(got.sort(order, nulls_last=True), expected.sort(order, nulls_last=True))
    if batches:
        assert q.last_progress is not None
        assert sum(p.num_input_rows for p in q.recent_progress) == full.height
