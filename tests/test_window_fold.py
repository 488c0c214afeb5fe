"""The window fold's per-batch path: an in-memory hash of whole keys for an aggregation's
stores, the fold's merge grouped by position (no second hash of the merged keys), the
pending delta's replaced rows matched per key, and the results these give."""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.state.key_groups import key_groups, stable_hash
from microstream.state.store import StateStore
from microstream.state.store_rows import (
    DELETED,
    HASH,
    KG,
    POSITION,
    hashed,
    key_positions,
    record,
    same_keys,
)
from tests.test_state_lean import FIXTURE, _fixture_module

T0 = datetime(2026, 1, 1)
SCHEMA = pl.Schema({"k": pl.String, "w": pl.Int64, "n": pl.Int64, "x": pl.Float64})


def canon(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


def window_store(storage: Storage, *, prefix_lookups: bool) -> StateStore:
    # An aggregation's partials: keyed by group key and window, hashed on the group key.
    return StateStore(
        storage,
        operator="fold",
        key_columns=["k", "w"],
        hash_columns=["k"],
        schema=SCHEMA,
        num_key_groups=8,
        one_row_per_key=True,
        snapshot_every=3,
        prefix_lookups=prefix_lookups,
    )


def add(old: pl.DataFrame, fresh: pl.DataFrame) -> pl.DataFrame:
    """A merge by key columns (the order the merged rows come in is the join's)."""
    both = fresh.join(old, on=["k", "w"], how="left", suffix="_old", nulls_equal=True)
    return both.select(
        "k",
        "w",
        (pl.col("n") + pl.col("n_old").fill_null(0)).alias("n"),
        (pl.col("x") + pl.col("x_old").fill_null(0.0)).alias("x"),
    )


def batch(store: StateStore, v: int) -> None:
    """Version ``v``: a fold over three windows of six group keys (a null among them),
    then the oldest window evicted."""
    keys = [None if i == 5 else f"k{(v + i) % 7}" for i in range(6)]
    rows = pl.DataFrame(
        {
            "k": keys * 3,
            "w": [v + d for d in range(3) for _ in keys],
            "n": list(range(18)),
            "x": [0.5 * i for i in range(18)],
        },
        schema=SCHEMA,
    )
    store.fold(rows, add)
    store.filter_out(pl.col("w") <= v - 2)


def history(prefix_lookups: bool, versions: range, root: str) -> StateStore:
    store = window_store(Storage(f"memory://{root}/s"), prefix_lookups=prefix_lookups)
    store.load(None)
    for v in versions:
        batch(store, v)
        store.commit(v)
    return store


# -- the in-memory hash of whole keys ---------------------------------------------------------


def test_stable_hash_continues_a_prefix() -> None:
    frame = pl.DataFrame({"k": ["a", None, "a"], "w": [1, 2, 3], "f": [0.5, None, -0.0]})
    head = stable_hash(frame, ["k"])
    whole = stable_hash(frame, ["w", "f"], start=head)
    assert whole.tolist() == stable_hash(frame, ["k", "w", "f"]).tolist()
    assert head.tolist() == stable_hash(frame, ["k"]).tolist()  # (the start is not changed)


def test_the_hash_of_whole_keys_keeps_the_key_group_of_the_hash_columns() -> None:
    frame = pl.DataFrame({"k": ["a", "a", "b", None], "w": [0, 60, 0, 0]})
    out = hashed(frame, ["k"], 8, seed=0x6D73, key_columns=["k", "w"])
    assert out[KG].to_list() == key_groups(frame, ["k"], 8).tolist()
    whole = stable_hash(frame, ["k", "w"])
    low = (whole >> np.uint64(16)) ^ np.uint64(0x6D73)
    groups = key_groups(frame, ["k"], 8).astype(np.uint64)
    assert out[HASH].to_numpy().tolist() == ((groups << np.uint64(48)) | low).tolist()
    # two windows of one group key: one key group, two hashes (by the prefix: one hash)
    assert out[KG][0] == out[KG][1] and out[HASH][0] != out[HASH][1]
    prefix = hashed(frame, ["k"], 8, seed=0x6D73)
    assert prefix[HASH][0] == prefix[HASH][1]
    # key columns not starting with the hash columns: hashed whole, the group the same
    other = hashed(frame, ["k"], 8, seed=0x6D73, key_columns=["w", "k"])
    assert other[KG].to_list() == out[KG].to_list()
    assert other[HASH][0] != other[HASH][1]


def test_a_store_of_whole_key_hashes_finds_the_same_rows() -> None:
    whole = history(False, range(8), "fold-whole-a")
    prefix = history(True, range(8), "fold-prefix-a")
    assert whole.rows == prefix.rows > 0
    assert_frame_equal(canon(whole.frame), canon(prefix.frame))
    assert whole.rows_per_key_group() == prefix.rows_per_key_group()
    keys = pl.DataFrame({"k": ["k3", None, "k3", "nope"], "w": [7, 8, 6, 7]})
    found = whole.lookup(keys)
    assert found.height == 3
    assert_frame_equal(canon(found), canon(prefix.lookup(keys)))
    # a lookup of the hash columns alone (every window of a group key) is a scan, with
    # the same rows
    for group_keys in (pl.DataFrame({"k": ["k3"]}), pl.DataFrame({"k": [None, "k1", None]})):
        by_prefix = whole.lookup(group_keys)
        assert by_prefix.height > 1
        assert_frame_equal(canon(by_prefix), canon(prefix.lookup(group_keys)))
    assert whole.lookup(pl.DataFrame({"k": ["nope"]})).height == 0


def test_state_written_with_prefix_hashes_loads_with_whole_key_hashes(tmp_path: Path) -> None:
    # The in-memory hash is never written: a store of either kind loads the other's
    # versions and continues them (an aggregation's checkpoint written before this change).
    storage = Storage(tmp_path / "agg")
    store = window_store(storage, prefix_lookups=True)
    store.load(None)
    for v in range(7):
        batch(store, v)
        store.commit(v)
    for version in (6, 4, 2):
        loaded = window_store(storage, prefix_lookups=False)
        loaded.load(version)
        expected = history(True, range(version + 1), f"fold-load-{version}")
        assert_frame_equal(canon(loaded.frame), canon(expected.frame))
    loaded = window_store(storage, prefix_lookups=False)
    loaded.load(6)
    for v in range(7, 11):
        batch(loaded, v)
        loaded.commit(v)
    expected = history(True, range(11), "fold-load-all")
    assert_frame_equal(canon(loaded.frame), canon(expected.frame))
    back = window_store(storage, prefix_lookups=True)
    back.load(10)
    assert_frame_equal(canon(back.frame), canon(expected.frame))
    back.load(8)
    assert_frame_equal(canon(back.frame), canon(history(True, range(9), "fold-load-8").frame))


def test_a_join_buffer_written_by_main_loads_with_whole_key_hashes(tmp_path: Path) -> None:
    # The join buffer fixture was written by main (hashed on the join key, looked up by
    # it): with whole-key hashes its prefix lookups scan, and give the same rows.
    fixture = _fixture_module()
    shutil.copytree(FIXTURE / "store_join", tmp_path / "store_join")

    store = fixture.join_store(Storage(tmp_path / "store_join"), prefix_lookups=False)
    store.load(9)
    reference = fixture.join_store(Storage(tmp_path / "store_join"))
    reference.load(9)
    assert_frame_equal(canon(store.frame), canon(reference.frame))
    for v in range(10, 13):
        fixture.join_batch(store, v)
        store.commit(v)
    expected = fixture.join_store(Storage("memory://fold-join-expected/s"))
    expected.load(None)
    for v in range(13):
        fixture.join_batch(expected, v)
        expected.commit(v)
    assert_frame_equal(canon(store.frame), canon(expected.frame))


# -- the fold by position ---------------------------------------------------------------------


def test_a_fold_by_position_gives_each_stored_row_its_row_of_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = window_store(Storage("memory://fold-position/s"), prefix_lookups=False)
    store.load(None)
    stored = pl.DataFrame(
        {"k": ["a", "a", None, "b"], "w": [0, 1, 0, 0], "n": [1, 2, 3, 4], "x": [0.5] * 4},
        schema=SCHEMA,
    )
    store.apply(upserts=stored)
    store.commit(0)
    rows = pl.DataFrame(
        {"k": ["c", "b", "a", None], "w": [0, 0, 1, 0], "n": [10, 20, 30, 40], "x": [1.0] * 4},
        schema=SCHEMA,
    )
    seen: list[pl.DataFrame] = []

    def merge(old: pl.DataFrame, fresh: pl.DataFrame) -> pl.DataFrame:
        seen.append(old)
        assert fresh.equals(rows)
        plus = fresh.join(old.drop(POSITION), on=["k", "w"], how="left", nulls_equal=True)
        n = pl.col("n") + pl.col("n_right").fill_null(0)
        x = pl.col("x") + pl.col("x_right").fill_null(0.0)
        return plus.select("k", "w", n, x)  # (the join keeps ``fresh``'s order)

    hashes = []
    original = StateStore._hashed

    def counted(self: StateStore, frame: pl.DataFrame) -> pl.DataFrame:
        hashes.append(frame.height)
        return original(self, frame)

    monkeypatch.setattr(StateStore, "_hashed", counted)
    merged = store.fold(rows, merge, positions=True)
    monkeypatch.undo()
    (old,) = seen
    assert old.columns == [*SCHEMA.names(), POSITION]
    assert old.schema[POSITION] == pl.UInt32
    # each stored row with the row of ``rows`` holding its key ("c" is new)
    assert sorted(old.select("k", "w", POSITION).rows(), key=str) == sorted(
        [("b", 0, 1), ("a", 1, 2), (None, 0, 3)], key=str
    )
    assert merged.rows() == [
        ("c", 0, 10, 1.0),
        ("b", 0, 24, 1.5),
        ("a", 1, 32, 1.5),
        (None, 0, 43, 1.5),
    ]
    assert hashes == [4]  # the batch's keys only: the merged rows kept their hashes
    expected = pl.concat([stored.filter(pl.col("k") == "a", pl.col("w") == 0), merged])
    assert_frame_equal(canon(store.frame), canon(expected))
    store.commit(1)
    again = window_store(Storage("memory://fold-position/s"), prefix_lookups=False)
    again.load(1)
    assert_frame_equal(canon(again.frame), canon(expected))


def test_merged_rows_in_another_order_are_hashed_again() -> None:
    store = window_store(Storage("memory://fold-other-order/s"), prefix_lookups=False)
    store.load(None)
    store.apply(upserts=pl.DataFrame({"k": ["a"], "w": [0], "n": [1], "x": [1.0]}, schema=SCHEMA))
    rows = pl.DataFrame({"k": ["a", "b"], "w": [0, 0], "n": [2, 3], "x": [2.0, 3.0]}, schema=SCHEMA)
    merged = store.fold(rows, lambda old, fresh: add(old, fresh).reverse())
    assert merged.rows() == [("b", 0, 3, 3.0), ("a", 0, 3, 3.0)]
    assert store.lookup(pl.DataFrame({"k": ["a", "b"], "w": [0, 0]})).sort("k").rows() == [
        ("a", 0, 3, 3.0),
        ("b", 0, 3, 3.0),
    ]
    store.fold(pl.DataFrame({"k": ["b"], "w": [0], "n": [1], "x": [0.5]}, schema=SCHEMA), add)
    assert store.lookup(pl.DataFrame({"k": ["b"], "w": [0]})).rows() == [("b", 0, 4, 3.5)]


def with_hash(frame: pl.DataFrame, hashes: list[int]) -> pl.DataFrame:
    return frame.with_columns(pl.Series(HASH, hashes, dtype=pl.UInt64))


def test_key_positions_tell_keys_sharing_a_hash_apart() -> None:
    keys = with_hash(pl.DataFrame({"k": ["a", "b", "c", None]}), [7, 7, 9, 7])
    found = with_hash(pl.DataFrame({"k": [None, "c", "b", "a"]}), [7, 9, 7, 7])
    assert key_positions(keys, found, ["k"]).tolist() == [3, 2, 1, 0]
    distinct = with_hash(pl.DataFrame({"k": ["a", "b", "c"]}), [1, 2, 3])
    assert key_positions(distinct, distinct.reverse(), ["k"]).tolist() == [2, 1, 0]


def test_same_keys_compares_in_order_with_nulls_equal() -> None:
    a = pl.DataFrame({"k": ["a", None, "c"], "w": [1, 2, None], "v": [1, 2, 3]})
    assert same_keys(a, a.with_columns(pl.col("v") * 2), ["k", "w"])
    assert not same_keys(a, a.reverse(), ["k", "w"])
    assert not same_keys(a, a.head(2), ["k", "w"])
    assert not same_keys(a, a.with_columns(pl.lit(1).alias("w")), ["k", "w"])


def test_the_pending_delta_drops_only_the_changed_keys_sharing_a_hash() -> None:
    pending = with_hash(
        pl.DataFrame({"k": ["a", "b", None, "c"], "n": [1, 2, 3, 4], DELETED: [False] * 4}),
        [7, 7, 7, 9],
    )
    keys = with_hash(pl.DataFrame({"k": ["b", None]}), [7, 7])
    changes = with_hash(pl.DataFrame({"k": ["b"], "n": [20], DELETED: [False]}), [7])
    out = record(pending, keys, changes, ["k"])
    assert out.rows() == [("a", 1, False, 7), ("c", 4, False, 9), ("b", 20, False, 7)]
    # a key whose hash matches a pending row's but is another key keeps that row
    other = with_hash(pl.DataFrame({"k": ["z"]}), [9])
    assert record(pending, other, changes.clear(), ["k"]).rows() == pending.rows()


# -- the results ------------------------------------------------------------------------------


def run(frame_fn: Any, batches: list[pl.DataFrame], name: str, schema: dict) -> list[tuple]:
    source = ms.MemoryStream(schema)
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
    return pl.concat(out).rows() if out else []


def test_windows_of_many_keys_fold_across_batches_to_exact_rows(name: str) -> None:
    # Group keys of several columns (a string, a null), windows that get rows in three
    # batches, every kind of partial: the emitted rows are the batch query's, exactly
    # (values in halves, so every order of summing them gives the same bits).
    schema = {"ts": pl.Datetime("us"), "k": pl.String, "g": pl.Int64, "v": pl.Float64}
    rng = np.random.default_rng(7)
    n = 3000
    every = pl.DataFrame(
        {
            "ts": [T0 + timedelta(seconds=int(s)) for s in np.sort(rng.integers(0, 600, n))],
            "k": [None if i % 11 == 0 else f"k{i % 5}" for i in rng.integers(0, 100, n)],
            "g": rng.integers(0, 3, n),
            "v": rng.integers(-40, 40, n) / 2.0,
        },
        schema=schema,
    )
    aggs = [
        pl.len().alias("n"),
        pl.col("v").sum().alias("sum"),
        pl.col("v").mean().alias("mean"),
        pl.col("v").min().alias("min"),
        pl.col("v").max().alias("max"),
        pl.col("v").first().alias("first"),
        pl.col("v").last().alias("last"),
    ]

    def query(frame: ms.StreamFrame) -> ms.StreamFrame:
        return (
            frame.with_watermark("ts", "30s")
            .group_by_dynamic("ts", every="2m", group_by=["k", "g"])
            .agg(aggs)
        )

    # a batch spans ~200 s: windows get rows from two batches; the last row closes them all
    batches = [every.slice(i, 1000) for i in range(0, n, 1000)]
    closing = pl.DataFrame(
        {"ts": [T0 + timedelta(hours=1)], "k": ["z"], "g": [0], "v": [0.0]}, schema=schema
    )
    got = pl.DataFrame(
        run(query, [*batches, closing], name, schema),
        schema=["k", "g", "ts", *(a.meta.output_name() for a in aggs)],
        orient="row",
    )
    expected = (
        every.sort("ts")
        .group_by_dynamic("ts", every="2m", group_by=["k", "g"])
        .agg(aggs)
        .with_columns(pl.col("n").cast(got.schema["n"]))
    )
    key = ["k", "g", "ts"]
    assert_frame_equal(
        got.sort(key, nulls_last=True), expected.select(got.columns).sort(key, nulls_last=True)
    )
    assert got.height == expected.height > 20
