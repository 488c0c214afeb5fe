"""A slice split in two gathers each half into buffers of its own: zero-copy halves of one
merged base kept the whole base alive until both halves had merged (state-scaling slice 4)."""

from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

from microstream.state.keyed_rows import KeyedRows
from microstream.state.sliced_rows import SlicedRows


def rows(keys: list[int]) -> pl.DataFrame:
    # 8 groups of 100 keys; the group in the hash's top bits, as in the state store
    frame = pl.DataFrame(
        {"k": keys, "v": [k * 10 for k in keys]}, schema={"k": pl.Int64, "v": pl.Int64}
    )
    return frame.with_columns(g=(pl.col("k") // 100).cast(pl.UInt16)).with_columns(
        h=pl.col("g").cast(pl.UInt64) * (1 << 48) + pl.col("k").cast(pl.UInt64)
    )


def address(frame: pl.DataFrame) -> int:
    data = frame.get_column("h").to_numpy()
    return int(data.__array_interface__["data"][0])


def test_split_gathers_merged_live_rows_into_pieces() -> None:
    store = KeyedRows(rows([5, 1, 9]), key_columns=["k"], hash_column="h", num_partitions=8)
    store.append(rows([3, 7, 4]))
    store.replace(rows([9, 3]), rows([]))  # a base and a tail row dead
    pieces = store.split([2, 0, 2])
    assert [p.select("k").to_series().to_list() for p in pieces] == [[1, 4], [], [5, 7]]
    assert_frame_equal(pieces[0], rows([1, 4]).select(pieces[0].columns))
    assert store.height == 0
    assert store.frame().height == 0


def test_a_split_slice_holds_no_view_of_the_old_base() -> None:
    store = SlicedRows(
        rows(list(range(0, 800, 2))),  # 400 rows, 50 a group: one slice
        key_columns=["k"], hash_column="h", group_column="g", num_groups=8, slice_rows=500,
        group_shift=48,
    )  # fmt: skip
    assert store.slice_ranges() == [(0, 8)]
    store.append(rows(list(range(1, 400, 2))))  # 600 rows: split in two slices of 300
    assert store.slice_ranges() == [(0, 4), (4, 8)]
    first, second = (s.base for s in store._slices)
    # zero-copy halves: the second starts where the first ends, in one buffer
    assert address(second) != address(first) + 8 * first.height
    expected = rows(sorted([*range(0, 800, 2), *range(1, 400, 2)]))
    assert_frame_equal(store.frame().sort("k"), expected)
    assert store.rows_per_partition() == [100, 100, 100, 100, 50, 50, 50, 50]
