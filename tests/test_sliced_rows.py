"""SlicedRows (the state store's rows in key-group slices) against a plain-Polars model,
and the bound it puts on a merge."""

from __future__ import annotations

import numpy as np
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from microstream.state import sliced_rows
from microstream.state.keyed_rows import KeyedRows
from microstream.state.sliced_rows import SlicedRows

GROUPS = 8
SCHEMA = pl.Schema({"k": pl.Int64, "s": pl.String, "v": pl.Int64, "h": pl.UInt64, "g": pl.UInt16})
KEYS = ["k", "s"]


def with_hash(frame: pl.DataFrame, *, collide: bool) -> pl.DataFrame:
    # The store's layout: the key group in the top 16 bits of the hash. ``collide``: a
    # weak low part (k mod 2) so different keys of a group share hashes and only the key
    # columns tell them apart.
    k = pl.col("k").fill_null(-1)
    group = ((k * 7 + pl.col("s").fill_null("").str.len_bytes()) % GROUPS).cast(pl.UInt16)
    low = (k % 2).cast(pl.UInt64) if collide else pl.struct(KEYS).hash() // (1 << 16)
    return (
        frame.with_columns(group.alias("g"))
        .with_columns((pl.col("g").cast(pl.UInt64) * (1 << 48) + low).alias("h"))
        .select(SCHEMA.names())
        .cast(SCHEMA)
    )


def canon(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(SCHEMA.names()).sort(SCHEMA.names(), nulls_last=True)


def frame_of(rows: list[tuple[tuple[int | None, str | None], int]], collide: bool) -> pl.DataFrame:
    data = {"k": [r[0][0] for r in rows], "s": [r[0][1] for r in rows], "v": [r[1] for r in rows]}
    return with_hash(
        pl.DataFrame(data, schema={"k": pl.Int64, "s": pl.String, "v": pl.Int64}),
        collide=collide,
    )


key_values = st.tuples(st.one_of(st.none(), st.integers(0, 30)), st.sampled_from([None, "a", "bb"]))
row_values = st.tuples(key_values, st.integers(-5, 5))
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("replace"), st.lists(key_values, max_size=8), st.lists(row_values, max_size=10)
        ),
        st.tuples(st.just("append"), st.lists(row_values, max_size=10)),
        st.tuples(st.just("remove"), st.integers(-5, 5)),
        st.tuples(st.just("compact")),
    ),
    max_size=14,
)


@settings(max_examples=200, deadline=None)
@given(
    initial=st.lists(row_values, max_size=30),
    ops=operations,
    tail_rows=st.sampled_from([0, 1, 3, 1000]),
    slice_rows=st.sampled_from([1, 2, 5, 1000]),
    collide=st.booleans(),
)
def test_matches_a_plain_polars_model(
    initial: list[tuple[tuple[int | None, str | None], int]],
    ops: list[tuple],
    tail_rows: int,
    slice_rows: int,
    collide: bool,
) -> None:
    model = frame_of(initial, collide)
    data = SlicedRows(
        model,
        key_columns=KEYS,
        hash_column="h",
        group_column="g",
        num_groups=GROUPS,
        tail_rows=tail_rows,
        slice_rows=slice_rows,
    )
    for op in ops:
        if op[0] == "replace":
            keys = frame_of([(k, 0) for k in op[1]], collide)
            # upsert rows belong to keys that are replaced, as the state store guarantees
            rows = frame_of([r for r in op[2] if r[0] in op[1]], collide)
            probe = keys.select(KEYS)
            assert_frame_equal(
                canon(data.rows_of(keys)),
                canon(model.join(probe, on=KEYS, how="semi", nulls_equal=True)),
            )
            data.replace(keys, rows)
            model = pl.concat(
                [model.join(probe, on=KEYS, how="anti", nulls_equal=True), rows], how="vertical"
            )
        elif op[0] == "append":
            # keys new to the state, as the caller of append guarantees
            present = set(zip(model["k"].to_list(), model["s"].to_list(), strict=True))
            fresh, seen = [], set()
            for key, v in op[1]:
                if key not in present and key not in seen:
                    fresh.append((key, v))
                    seen.add(key)
            rows = frame_of(fresh, collide)
            data.append(rows)
            model = pl.concat([model, rows], how="vertical")
        elif op[0] == "remove":
            predicate = pl.col("v") <= op[1]
            removed = data.remove_where(predicate)
            assert_frame_equal(canon(removed), canon(model.filter(predicate)))
            model = model.filter(~predicate)
        else:
            data.compact()
            assert data.frame().get_column("h").is_sorted()
        assert data.height == model.height
        assert_frame_equal(canon(data.frame()), canon(model))
        groups = model.get_column("g").cast(pl.Int64).to_list()
        assert data.rows_per_partition() == [groups.count(g) for g in range(GROUPS)]
        ranges = data.slice_ranges()
        assert [a for a, _ in ranges[1:]] == [b for _, b in ranges[:-1]]
        assert ranges[0][0] == 0 and ranges[-1][1] == GROUPS
        for lo, hi in [(0, GROUPS), (0, 3), (2, 5), (5, 8)]:
            in_range = model.filter((pl.col("g") >= lo) & (pl.col("g") < hi))
            assert_frame_equal(canon(data.rows_in_partitions(lo, hi)), canon(in_range))
    data.compact()
    frame = data.frame()
    assert frame.get_column("h").is_sorted()
    assert_frame_equal(canon(frame), canon(model))


def _rows(keys: np.ndarray) -> pl.DataFrame:
    frame = pl.DataFrame({"k": keys, "s": ["x"] * keys.size, "v": keys})
    return with_hash(frame, collide=False)


def test_rows_of_a_key_prefix_across_slices() -> None:
    # ``on``: the hash covers fewer columns than the key (every row of a key prefix)
    frame = pl.DataFrame({"k": [1, 1, 2, 3, 3, 9], "w": [0, 1, 0, 0, 1, 0], "v": range(6)})
    frame = frame.with_columns(g=(pl.col("k") % 4).cast(pl.UInt16)).with_columns(
        h=pl.col("g").cast(pl.UInt64) * (1 << 48) + pl.col("k").cast(pl.UInt64)
    )
    data = SlicedRows(
        frame,
        key_columns=["k", "w"],
        hash_column="h",
        group_column="g",
        num_groups=4,
        slice_rows=1,
    )
    assert len(data.slice_ranges()) == 4
    keys = frame.filter(pl.col("k").is_in([1, 3]) & (pl.col("w") == 0)).select("k", "h", "g")
    assert sorted(data.rows_of(keys, on=["k"])["v"].to_list()) == [0, 1, 3, 4]
    assert sorted(data.rows_of(keys.with_columns(w=pl.lit(1, pl.Int64)))["v"].to_list()) == [1, 4]


def test_a_merge_copies_one_slice_not_the_state(monkeypatch) -> None:
    # Keys spread evenly: every slice's tail fills at the same rate, and yet no change
    # merges more than about one slice (a single KeyedRows merges the whole state).
    merged: list[int] = []
    compact = KeyedRows.compact

    def recording(self: KeyedRows) -> None:
        if self.merge_pressure() > 0:  # (a tail or tombstones to merge: a copy)
            merged.append(self.height)
        compact(self)

    monkeypatch.setattr(KeyedRows, "compact", recording)
    data = SlicedRows(
        _rows(np.arange(0)),
        key_columns=KEYS,
        hash_column="h",
        group_column="g",
        num_groups=GROUPS,
        tail_rows=512,
        slice_rows=2_000,
    )
    model = _rows(np.arange(0))
    rng = np.random.default_rng(7)
    largest_change = 0
    for batch in range(60):
        new = np.arange(batch * 400, batch * 400 + 400)
        old = rng.integers(0, max(batch * 400, 1), 100) if batch else np.arange(0)
        keys = _rows(np.unique(np.concatenate([new, old])))
        before = len(merged)
        data.rows_of(keys)
        data.replace(keys, keys)
        largest_change = max(largest_change, sum(merged[before:]))
        model = pl.concat([model.join(keys, on=KEYS, how="anti"), keys])
    assert data.height == model.height == 24_000
    assert len(data.slice_ranges()) == GROUPS  # 3,000 rows per group > slice_rows
    # one slice at most (slice_rows, or one key group: 3,000 rows here, plus a batch's
    # rows), never the state's 24,000
    assert 0 < largest_change <= 3_000 + 500
    assert_frame_equal(canon(data.frame()), canon(model))


def test_slice_rows_default_is_read_when_built(monkeypatch) -> None:
    monkeypatch.setattr(sliced_rows, "SLICE_ROWS", 3)
    data = SlicedRows(
        _rows(np.arange(40)),
        key_columns=KEYS,
        hash_column="h",
        group_column="g",
        num_groups=GROUPS,
    )
    assert data.slice_rows == 3
    assert len(data.slice_ranges()) == GROUPS


def test_a_large_batch_into_an_empty_store_is_sorted_once(monkeypatch) -> None:
    """An empty store filled by one batch of more rows than its tail budget (the first
    batch of a reprocessing) is sorted once and cut into slices: no merge of a tail and
    split after it (two copies of every row), the same rows in the same order as the
    tail's merge gives (stable by hash: keys sharing a hash keep the batch's order)."""
    merges: list[int] = []
    compact = KeyedRows.compact

    def recording(self: KeyedRows) -> None:
        if self.merge_pressure() > 0:
            merges.append(self.height)
        compact(self)

    rng = np.random.default_rng(3)
    keys = rng.permutation(3_000)
    rows = frame_of([((int(k), "x"), int(k) * 2) for k in keys], collide=True)

    def store(tail_rows: int) -> SlicedRows:
        return SlicedRows(
            rows.clear(),
            key_columns=KEYS,
            hash_column="h",
            group_column="g",
            num_groups=GROUPS,
            tail_rows=tail_rows,
            slice_rows=1_000,
        )

    through_tail = store(10_000)  # (the batch fits the tail: the old way, merged below)
    through_tail.replace(rows, rows)
    through_tail.compact()
    monkeypatch.setattr(KeyedRows, "compact", recording)
    filled = store(512)
    filled.replace(rows, rows)
    assert merges == []
    assert_frame_equal(filled.frame(), through_tail.frame())  # (order too)
    # 375 rows a group: cut into slices of at most 1,000 rows at once, as a load cuts
    assert filled.slice_ranges() == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert filled.rows_per_partition() == through_tail.rows_per_partition()
    # and it goes on as any store: a replace of some keys, a removal
    some = rows.head(700)
    filled.replace(some, some.with_columns(v=pl.lit(-1, pl.Int64)))
    removed = filled.remove_where(pl.col("v") < 0)
    assert_frame_equal(canon(removed), canon(some.with_columns(v=pl.lit(-1, pl.Int64))))
    assert_frame_equal(canon(filled.frame()), canon(rows.tail(2_300)))
