"""The tail of a KeyedRows / SlicedRows keeps tombstones: replacing or removing rows of the
tail flips their bits instead of filtering a copy of the tail (state-scaling slice 4)."""

from __future__ import annotations

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal

from microstream.state.keyed_rows import KeyedRows
from microstream.state.sliced_rows import SlicedRows

SCHEMA = pl.Schema({"k": pl.Int64, "v": pl.Int64, "h": pl.UInt64})


def rows(keys: list[int], values: list[int]) -> pl.DataFrame:
    # the hash: the key itself (distinct keys, distinct hashes; sorted by key)
    frame = pl.DataFrame({"k": keys, "v": values}, schema={"k": pl.Int64, "v": pl.Int64})
    return frame.with_columns(h=pl.col("k").cast(pl.UInt64))


def keyed(base: pl.DataFrame) -> KeyedRows:
    store = KeyedRows(base, key_columns=["k"], hash_column="h", num_partitions=4, tail_rows=1000)
    return store


def sorted_rows(frame: pl.DataFrame) -> list[tuple[int, int]]:
    return sorted(frame.select("k", "v").rows())


def test_replacing_tail_rows_flips_bits_and_keeps_the_tail() -> None:
    store = keyed(rows([1, 2, 3], [10, 20, 30]))
    store.append(rows([7, 8, 9], [70, 80, 90]))
    tail = store.tail
    store.replace(rows([8, 2], [0, 0]), rows([], []))  # (one tail row, one base row)
    assert store.tail is tail  # no copy of the tail
    assert store.tail_live.tolist() == [True, False, True]
    assert store.height == 4
    assert sorted_rows(store.frame()) == [(1, 10), (3, 30), (7, 70), (9, 90)]
    assert store.rows_of(rows([8, 9, 2], [0, 0, 0])).select("k", "v").rows() == [(9, 90)]
    assert store.rows_per_partition() == [0, 2, 0, 2]  # k % 4 of 1, 9 and of 3, 7


def test_a_key_replaced_in_the_tail_is_found_once_with_its_new_row() -> None:
    store = keyed(rows([1, 2], [10, 20]))
    store.append(rows([5], [50]))
    store.replace(rows([5], [0]), rows([5], [51]))
    store.replace(rows([5], [0]), rows([5], [52]))
    assert store.tail.height == 3  # two tombstones and the live row
    assert store.rows_of(rows([5], [0])).select("k", "v").rows() == [(5, 52)]
    store.compact()
    assert store.tail.height == 0
    assert store.frame().select("k", "v").rows() == [(1, 10), (2, 20), (5, 52)]


def test_remove_where_on_the_tail_returns_the_live_rows_only() -> None:
    store = keyed(rows([1], [10]))
    store.append(rows([4, 5, 6], [40, 50, 60]))
    store.replace(rows([5], [0]), rows([], []))
    removed = store.remove_where(pl.col("v") >= 40)
    assert sorted_rows(removed) == [(4, 40), (6, 60)]
    assert store.frame().select("k", "v").rows() == [(1, 10)]
    assert store.height == 1
    assert store.rows_of(rows([4, 5, 6], [0, 0, 0])).height == 0


def test_the_tails_rechunk_drops_its_tombstones() -> None:
    store = keyed(rows([0], [0]))
    for i in range(1, 10):  # more appends than the tail keeps chunks of
        store.append(rows([i], [i]))
        if i % 2:
            store.replace(rows([i], [0]), rows([], []))
    assert store.tail.n_chunks() == 1
    assert int(np.count_nonzero(~store.tail_live)) == store.tail.height - 4
    assert sorted_rows(store.frame()) == [(0, 0), (2, 2), (4, 4), (6, 6), (8, 8)]


def test_sliced_rows_skip_tombstoned_tail_rows_of_every_slice() -> None:
    # 8 groups, the group in the hash's top bits; two keys per group; slices of 4 rows
    keys = list(range(16))
    frame = rows(keys, [k * 10 for k in keys]).with_columns(g=(pl.col("k") // 2).cast(pl.UInt16))
    frame = frame.with_columns(h=pl.col("g").cast(pl.UInt64) * (1 << 48) + pl.col("h"))
    store = SlicedRows(
        frame, key_columns=["k"], hash_column="h", group_column="g", num_groups=8, slice_rows=4
    )
    assert len(store.slice_ranges()) == 4
    touched = frame.filter(pl.col("k").is_in([1, 6, 13]))
    store.replace(touched, touched.with_columns(v=pl.col("v") + 1))  # into the tails
    store.replace(touched, touched.with_columns(v=pl.col("v") + 2))  # tombstones there
    found = store.rows_of(frame.filter(pl.col("k").is_in([1, 6, 13, 14])))
    assert sorted_rows(found) == [(1, 12), (6, 62), (13, 132), (14, 140)]
    expected = frame.with_columns(
        v=pl.when(pl.col("k").is_in([1, 6, 13])).then(pl.col("v") + 2).otherwise(pl.col("v"))
    )
    store.compact()
    assert_frame_equal(store.frame().select(frame.columns), expected.sort("h"))
