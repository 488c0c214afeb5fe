"""A state store's rows in key-group slices: a batch's merge copies one slice, not the
state, and the store's answers, versions and loads are those of a dict model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from microstream.checkpoint.storage import Storage
from microstream.state import sliced_rows
from microstream.state.keyed_rows import KeyedRows
from microstream.state.store import StateStore

SCHEMA = pl.Schema({"k": pl.Int64, "v": pl.Int64})


def new_store(path: Path) -> StateStore:
    return StateStore(
        Storage(path / "state" / "op"),
        operator="op0/sum",
        key_columns=["k"],
        schema=SCHEMA,
        num_key_groups=16,
        spread_snapshots_above=1,
    )


def as_frame(model: dict[int, int]) -> pl.DataFrame:
    return pl.DataFrame({"k": list(model), "v": list(model.values())}, schema=SCHEMA).sort("k")


@pytest.fixture
def small_slices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Slices of at most 3,000 rows and a tail budget of 1,024 rows; returns the rows of
    every merge that copies (a tail or tombstones to merge), as they happen."""
    monkeypatch.setattr(sliced_rows, "SLICE_ROWS", 3_000)
    monkeypatch.setattr(sliced_rows, "TAIL_ROWS", 1_024)
    merged: list[int] = []
    compact = KeyedRows.compact

    def recording(self: KeyedRows) -> None:
        if self.merge_pressure() > 0:
            merged.append(self.height)
        compact(self)

    monkeypatch.setattr(KeyedRows, "compact", recording)
    return merged


def test_merges_stay_within_a_slice_and_the_state_is_exact(
    tmp_path: Path, small_slices: list[int]
) -> None:
    store = new_store(tmp_path)
    store.load(None)
    model: dict[int, int] = {}
    rng = np.random.default_rng(3)
    largest = 0
    for version in range(80):
        new = list(range(version * 500, version * 500 + 400))
        old = sorted(set(rng.integers(0, max(version * 500, 1), 100).tolist())) if version else []
        gone = sorted(set(rng.integers(0, max(version * 500, 1), 20).tolist()) - set(old))
        upserts = pl.DataFrame(
            {"k": new + old, "v": [version] * (len(new) + len(old))}, schema=SCHEMA
        )
        before = len(small_slices)
        assert_frame_equal(
            store.lookup(upserts.select("k")).sort("k"),
            as_frame({k: model[k] for k in new + old if k in model}),
        )
        store.apply(upserts=upserts, deletes=pl.DataFrame({"k": gone}, schema={"k": pl.Int64}))
        store.commit(version)
        largest = max(largest, sum(small_slices[before:]))
        for k in gone:
            model.pop(k, None)
        model.update(dict.fromkeys(new + old, version))
    assert store.rows == len(model) > 30_000
    # a change copies at most one slice (3,000 rows, or one key group: about 2,000 rows
    # here, plus a batch), never the whole state (a single sorted base: 30,000 rows)
    assert 0 < largest <= 3_000 + 500
    assert_frame_equal(store.frame.sort("k"), as_frame(model))
    again = new_store(tmp_path)
    again.load(79)
    assert_frame_equal(again.frame.sort("k"), as_frame(model))
    assert again.rows_per_key_group() == store.rows_per_key_group()


def test_evicting_keys_across_slices(tmp_path: Path, small_slices: list[int]) -> None:
    store = new_store(tmp_path)
    store.load(None)
    store.apply(upserts=pl.DataFrame({"k": range(20_000), "v": range(20_000)}, schema=SCHEMA))
    store.commit(0)
    removed = store.filter_out(pl.col("v") % 3 == 0)
    assert sorted(removed["k"].to_list()) == list(range(0, 20_000, 3))
    store.commit(1)
    again = new_store(tmp_path)
    again.load(1)
    expected = pl.DataFrame({"k": range(20_000), "v": range(20_000)}, schema=SCHEMA)
    assert_frame_equal(again.frame.sort("k"), expected.filter(pl.col("v") % 3 != 0))
