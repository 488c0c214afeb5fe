"""SlicedRows with ``group_shift``: the key-group column is the hash's top bits, not held
in memory, and put back into every frame returned (state-scaling slice 4)."""

from __future__ import annotations

import functools
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from microstream.checkpoint.storage import Storage
from microstream.state.sliced_rows import SlicedRows
from microstream.state.store import StateStore
from tests import test_sliced_rows
from tests.test_sliced_rows import _rows, operations, row_values


@settings(max_examples=150, deadline=None)
@given(
    initial=st.lists(row_values, max_size=30),
    ops=operations,
    tail_rows=st.sampled_from([0, 1, 3, 1000]),
    slice_rows=st.sampled_from([1, 2, 5, 1000]),
    collide=st.booleans(),
)
def test_a_derived_group_matches_the_plain_polars_model(
    initial: list, ops: list, tail_rows: int, slice_rows: int, collide: bool
) -> None:
    # test_sliced_rows' model (its hash holds the group in the top 16 bits), every frame
    # compared with the group column: the same answers without holding it
    derived = functools.partial(SlicedRows, group_shift=48)
    with mock.patch.object(test_sliced_rows, "SlicedRows", derived):
        test_sliced_rows.test_matches_a_plain_polars_model.hypothesis.inner_test(  # type: ignore[attr-defined]
            initial=initial, ops=ops, tail_rows=tail_rows, slice_rows=slice_rows, collide=collide
        )


def test_the_group_column_is_not_held_but_returned_in_place() -> None:
    frame = _rows(np.arange(2_000))
    held = SlicedRows(
        frame, key_columns=["k", "s"], hash_column="h", group_column="g", num_groups=8,
        slice_rows=500, group_shift=48,
    )  # fmt: skip
    plain = SlicedRows(
        frame, key_columns=["k", "s"], hash_column="h", group_column="g", num_groups=8,
        slice_rows=500,
    )  # fmt: skip
    assert len(held.slice_ranges()) > 1
    assert held.estimated_size() == plain.estimated_size() - 2 * frame.height  # UInt16 a row
    assert held.frame().columns == frame.columns
    assert_frame_equal(held.frame().sort("h"), frame.sort("h"))
    assert_frame_equal(
        held.rows_in_partitions(2, 5).sort("h"), plain.rows_in_partitions(2, 5).sort("h")
    )
    keys = frame.filter(pl.col("k").is_in([3, 1_500, 1_999]))
    assert_frame_equal(held.rows_of(keys).sort("k"), keys.sort("k"))
    assert held.rows_of(keys.clear()).schema == frame.schema


def test_a_state_store_holds_no_key_group_column(tmp_path: Path) -> None:
    schema = pl.Schema({"k": pl.Int64, "v": pl.Int64})
    store = StateStore(
        Storage(tmp_path / "state" / "op"), operator="op0/sum", key_columns=["k"], schema=schema
    )
    store.load(None)
    rows = pl.DataFrame({"k": range(1_000), "v": range(1_000)}, schema=schema)
    store.apply(upserts=rows)
    assert store.bytes == 1_000 * (8 + 8 + 8)  # key, value, in-memory hash: no key group
    store.commit(1)
    reloaded = StateStore(
        Storage(tmp_path / "state" / "op"), operator="op0/sum", key_columns=["k"], schema=schema
    )
    reloaded.load(1)
    for state in (store, reloaded):
        assert_frame_equal(state.frame.sort("k"), rows)
        found = state.lookup(pl.DataFrame({"k": [5, 999, 1_000]}, schema={"k": pl.Int64}))
        assert found.sort("k").rows() == [(5, 5), (999, 999)]
