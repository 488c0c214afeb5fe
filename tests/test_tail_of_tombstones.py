"""A KeyedRows tail that is mostly tombstones drops them when rows are added, also when
each batch adds one chunk (before: only every eight chunks)."""

from __future__ import annotations

import polars as pl

from microstream.state.keyed_rows import KeyedRows


def rows(keys: range, value: int) -> pl.DataFrame:
    frame = pl.DataFrame(
        {"k": list(keys), "v": [value] * len(keys)}, schema={"k": pl.Int64, "v": pl.Int64}
    )
    return frame.with_columns(h=pl.col("k").cast(pl.UInt64))  # (distinct keys: distinct hashes)


def test_batches_replacing_the_same_keys_keep_the_tail_to_about_one_batch() -> None:
    # Each batch replaces the 10k keys the previous one added (a window aggregation's
    # fold, its partials in one chunk): the replaced rows die in the tail; once they are
    # most of it they are dropped, so the tail never grows to the merge limit.
    store = KeyedRows(rows(range(0), 0), key_columns=["k"], hash_column="h", num_partitions=4)
    keys = rows(range(10_000), 0).select("k", "h")
    for batch in range(1, 12):
        store.replace(keys, rows(range(10_000), batch))
        assert store.tail.height <= 20_000, batch
        assert store.tail.n_chunks() <= 2
        assert store.base.height == 0  # (no merge of the tail into the base)
        assert store.height == 10_000
    assert store.frame()["v"].unique().to_list() == [11]
    assert store.rows_of(rows(range(5, 7), 0).select("k", "h"))["v"].to_list() == [11, 11]


def test_a_tail_with_few_tombstones_keeps_them() -> None:
    store = KeyedRows(rows(range(0), 0), key_columns=["k"], hash_column="h", num_partitions=4)
    store.append(rows(range(20_000), 1))
    store.replace(rows(range(100), 0).select("k", "h"), rows(range(100), 2))
    assert store.tail.height == 20_100  # (100 tombstones: not worth a copy of the tail)
    assert sorted(store.frame()["v"].to_list()) == [1] * 19_900 + [2] * 100
