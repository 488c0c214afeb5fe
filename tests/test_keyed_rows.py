"""KeyedRows (the state store's in-memory index) against a plain-Polars model."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from microstream.state.keyed_rows import KeyedRows

SCHEMA = pl.Schema({"k": pl.Int64, "s": pl.String, "v": pl.Int64, "h": pl.UInt64})
KEYS = ["k", "s"]


def with_hash(frame: pl.DataFrame, *, collide: bool) -> pl.DataFrame:
    # ``collide``: a weak hash (k mod 3) so different keys share hashes and only the key
    # columns can tell them apart.
    h = (pl.col("k").fill_null(-1) % 3).cast(pl.UInt64) if collide else pl.struct(KEYS).hash()
    return frame.with_columns(h.alias("h")).select(SCHEMA.names()).cast(SCHEMA)


def canon(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(SCHEMA.names()).sort(SCHEMA.names(), nulls_last=True)


key_values = st.tuples(st.one_of(st.none(), st.integers(0, 6)), st.sampled_from([None, "a", "b"]))
row_values = st.tuples(key_values, st.integers(-5, 5))
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("replace"), st.lists(key_values, max_size=4), st.lists(row_values, max_size=5)
        ),
        st.tuples(st.just("remove"), st.integers(-5, 5)),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(
    initial=st.lists(row_values, max_size=8),
    ops=operations,
    tail_rows=st.sampled_from([0, 1, 3, 1000]),
    collide=st.booleans(),
)
def test_matches_a_plain_polars_model(
    initial: list[tuple[tuple[int | None, str | None], int]],
    ops: list[tuple],
    tail_rows: int,
    collide: bool,
) -> None:
    def frame_of(rows: list[tuple[tuple[int | None, str | None], int]]) -> pl.DataFrame:
        data = {
            "k": [r[0][0] for r in rows],
            "s": [r[0][1] for r in rows],
            "v": [r[1] for r in rows],
        }
        return with_hash(
            pl.DataFrame(data, schema={"k": pl.Int64, "s": pl.String, "v": pl.Int64}),
            collide=collide,
        )

    model = frame_of(initial)
    data = KeyedRows(
        model, key_columns=KEYS, hash_column="h", num_partitions=4, tail_rows=tail_rows
    )
    for op in ops:
        if op[0] == "replace":
            keys = frame_of([(k, 0) for k in op[1]])
            # upsert rows belong to keys that are replaced, as the state store guarantees
            rows = frame_of([r for r in op[2] if r[0] in op[1]])
            probe = keys.select(KEYS)
            assert_frame_equal(
                canon(data.rows_of(keys)),
                canon(model.join(probe, on=KEYS, how="semi", nulls_equal=True)),
            )
            data.replace(keys, rows)
            model = pl.concat(
                [model.join(probe, on=KEYS, how="anti", nulls_equal=True), rows], how="vertical"
            )
        else:
            predicate = pl.col("v") <= op[1]
            removed = data.remove_where(predicate)
            assert_frame_equal(canon(removed), canon(model.filter(predicate)))
            model = model.filter(~predicate)
        assert data.height == model.height
        assert_frame_equal(canon(data.frame()), canon(model))
        pids = (model.get_column("h") % 4).cast(pl.Int64).to_list()
        assert data.rows_per_partition() == [pids.count(p) for p in range(4)]
    parts = data.partitions()
    assert sum(p.height for p in parts) == model.height
    for p, part in enumerate(parts):
        assert ((part.get_column("h") % 4) == p).all()
    data.compact()
    frame = data.frame()
    assert frame.get_column("h").is_sorted()
    assert_frame_equal(canon(frame), canon(model))
