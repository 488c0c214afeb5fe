"""Stream-stream join, the join-buffer slice: output rows built side by side (inner and
left joins, no Polars join of the pairs) and semi/anti joins letting matched left rows go.

Each test runs the join operator directly, batch by batch, so it can compare every
batch's output and look at the buffers.
"""

from __future__ import annotations

import itertools
import uuid
from datetime import datetime, timedelta
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.operators.stream_join import MATCHED, ROW_ID, StreamJoinNode, StreamJoinOperator
from microstream.plan.nodes import OperatorContext
from microstream.state.format import SegmentVersion, StateVersion, version_file
from microstream.state.store import StateStore

T0 = datetime(2024, 1, 1)
MINUTE = 60_000_000
IMPS = {"ad": pl.Int64, "imp_time": pl.Datetime("us"), "imp": pl.String, "x": pl.Float64}
CLICKS = {"ad": pl.Int64, "click_time": pl.Datetime("us"), "click": pl.String, "x": pl.Float64}


def t(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def us(minutes: float) -> int:
    return int((t(minutes) - datetime(1970, 1, 1)).total_seconds()) * 1_000_000


def node_of(build: Any) -> StreamJoinNode:
    """The join node of ``build(left, right)`` over two memory streams."""
    left = ms.MemoryStream(IMPS).lazy().with_watermark("imp_time", "1m")
    right = ms.MemoryStream(CLICKS).lazy().with_watermark("click_time", "1m")
    node = build(left, right)._plan
    assert isinstance(node, StreamJoinNode)
    return node


def operator(node: StreamJoinNode) -> StreamJoinOperator:
    return node.build_operator("join", Storage(f"memory://join-buffer-{uuid.uuid4().hex}"))


def ctx(batch_id: int, late_wm: float, wm: float) -> OperatorContext:
    return OperatorContext(
        batch_id=batch_id,
        late_watermark_us=us(late_wm),
        watermark_us=us(wm),
        output_mode="append",
    )


def imps(*data: tuple[Any, ...]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=IMPS, orient="row")


def clicks(*data: tuple[Any, ...]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=CLICKS, orient="row")


# Batches with repeated keys, a null key, rows pairing with buffered rows of the other
# side and with new ones, rows outside the bound, and evictions (unmatched left rows).
BATCHES = [
    (
        imps(
            (1, t(0), "a", 0.5), (1, t(1), "b", 1.5), (2, t(2), "c", None), (None, t(2), "n", 9.0)
        ),
        clicks((1, t(1), "k1", 0.25), (3, t(2), "k3", 3.0), (None, t(2), "kn", 8.0)),
    ),
    (
        imps((3, t(3), "d", 2.0), (4, t(4), "e", 4.0)),
        clicks((1, t(4), "k4", 0.125), (2, t(3), "k2", None), (2, t(30), "far", 7.0)),
    ),
    (imps((1, t(9), "f", 6.0)), clicks((4, t(8), "k5", 5.0), (1, t(10), "k6", 1.0))),
    (imps(), clicks((1, t(40), "k7", 2.5))),
]
WATERMARKS = [(-1e9, 1), (1, 3), (3, 9), (9, 39)]

SIDE_BY_SIDE = {
    "left on ad": lambda left, right: left.join(right, on="ad", how="left", within=("0s", "5m")),
    "inner on ad": lambda left, right: left.join(right, on="ad", how="inner", within="5m"),
    "left, own suffix": lambda left, right: left.join(
        right, on="ad", how="left", within=("0s", "5m"), suffix="_c"
    ),
    "join_where (both keys kept)": lambda left, right: left.join_where(
        right,
        pl.col("ad") == pl.col("ad_right"),
        pl.col("click_time") >= pl.col("imp_time"),
        pl.col("click_time") <= pl.col("imp_time") + timedelta(minutes=5),
    ),
    "inner, every right column a key": lambda left, right: left.join(
        right.select("ad", "click_time"),
        left_on=["ad", "imp_time"],
        right_on=["ad", "click_time"],
        how="inner",
        within="5m",
    ),
    "left, every right column a key": lambda left, right: left.join(
        right.select("ad", "click_time"),
        left_on=["ad", "imp_time"],
        right_on=["ad", "click_time"],
        how="left",
        within="5m",
    ),
}


@pytest.mark.parametrize("name", list(SIDE_BY_SIDE))
def test_side_by_side_rows_are_the_polars_join_rows(name: str) -> None:
    node = node_of(SIDE_BY_SIDE[name])
    direct, joined = operator(node), operator(node)
    assert direct._right_out is not None  # (the side-by-side path is the one taken)
    joined._right_out = None  # the Polars join of the pairs, as before this slice
    emitted = 0
    for batch_id, ((left, right), (late_wm, wm)) in enumerate(zip(BATCHES, WATERMARKS)):
        c = ctx(batch_id, late_wm, wm)
        got = direct.process((left, right), c).rows
        want = joined.process((left, right), c).rows
        if node.how == "left":
            assert_frame_equal(got, want)  # same rows in the same order
        else:  # (an inner join's row order is Polars' to choose)
            assert_frame_equal(got.sort(got.columns), want.sort(want.columns))
        emitted += got.height
    assert emitted > 0


def test_side_by_side_left_join_rows_exactly() -> None:
    node = node_of(SIDE_BY_SIDE["left on ad"])
    op = operator(node)
    out = [
        op.process((left, right), ctx(i, lw, w)).rows
        for i, ((left, right), (lw, w)) in enumerate(zip(BATCHES, WATERMARKS))
    ]
    every = pl.concat(out, how="vertical")
    assert every.columns == ["ad", "imp_time", "imp", "x", "click_time", "click", "x_right"]
    assert sorted(every.select("imp", "click").iter_rows(), key=str) == sorted(
        [
            ("a", "k1"),
            ("a", "k4"),
            ("b", "k1"),
            ("b", "k4"),
            ("c", "k2"),
            ("d", None),  # ad 3's click came a minute before it: outside ("0s", "5m")
            ("e", "k5"),
            ("f", "k6"),
            ("n", None),  # a null key never matches
        ],
        key=str,
    )
    # the unmatched left row carries nulls for every right column, of their dtypes
    lonely = every.filter(pl.col("imp") == "d")
    assert lonely.select("click_time", "click", "x_right").row(0) == (None, None, None)
    assert every.schema == node.output_schema()


def test_right_and_full_joins_keep_the_polars_join() -> None:
    for how in ("right", "full"):
        node = node_of(lambda left, right, how=how: left.join(right, on="ad", how=how, within="5m"))
        assert operator(node)._right_out is None


def _run(node: StreamJoinNode, batches: list[tuple[pl.DataFrame, pl.DataFrame]]) -> Any:
    op = operator(node)
    out = []
    for i, ((left, right), (lw, w)) in enumerate(zip(batches, itertools.cycle(WATERMARKS))):
        out.append(op.process((left, right), ctx(i, lw, w)).rows.get_column("imp").to_list())
    return op, out


def test_semi_join_lets_a_matched_left_row_go() -> None:
    node = node_of(lambda left, right: left.join(right, on="ad", how="semi", within="10m"))
    batches = [
        (imps((1, t(0), "a", 0.0), (2, t(0), "b", 0.0)), clicks()),
        (imps((3, t(2), "c", 0.0)), clicks((1, t(2), "k1", 0.0), (3, t(2), "k3", 0.0))),
        (imps(), clicks((1, t(3), "again", 0.0))),
    ]
    wms = [(-1e9, 0), (0, 1), (1, 2)]
    op = operator(node)
    emitted = []
    for i, ((left, right), (lw, w)) in enumerate(zip(batches, wms)):
        out = op.process((left, right), ctx(i, lw, w))
        emitted.append(sorted(out.rows.get_column("imp").to_list()))
        if i == 1:
            # "a" (buffered) and "c" (new) matched: only "b" waits; "a" left the buffer
            assert op.left.frame.get_column("imp").to_list() == ["b"]
            assert op.progress().num_rows_removed == 1
    assert emitted == [[], ["a", "c"], []]  # "a" once, though a second click came


def test_anti_join_lets_a_matched_left_row_go_and_emits_the_others() -> None:
    node = node_of(lambda left, right: left.join(right, on="ad", how="anti", within="5m"))
    batches = [
        (imps((1, t(0), "a", 0.0), (2, t(0), "b", 0.0)), clicks((1, t(1), "k1", 0.0))),
        (imps(), clicks()),
    ]
    op = operator(node)
    first = op.process(batches[0], ctx(0, -1e9, 1))
    assert first.rows.height == 0
    assert op.left.frame.get_column("imp").to_list() == ["b"]
    # the watermark passes both rows' bound: only "b", never matched, is emitted
    second = op.process(batches[1], ctx(1, 1, 6))
    assert second.rows.get_column("imp").to_list() == ["b"]
    assert op.left.rows == 0


def test_semi_join_continues_a_buffer_with_matched_rows_kept() -> None:
    """Buffers written before this slice keep a semi join's matched left rows, flagged:
    such a row is not emitted again, and its next match lets it go."""
    node = node_of(lambda left, right: left.join(right, on="ad", how="semi", within="10m"))
    op = operator(node)
    kept = imps((1, t(0), "a", 0.0), (2, t(0), "b", 0.0)).with_columns(
        pl.Series(ROW_ID, [0, 2], dtype=pl.Int64), pl.Series(MATCHED, [True, False])
    )
    op.left.insert(kept)
    out = op.process((imps(), clicks((1, t(1), "k", 0.0), (2, t(1), "k2", 0.0))), ctx(5, 0, 1))
    assert out.rows.get_column("imp").to_list() == ["b"]
    assert op.left.rows == 0


def test_a_large_buffer_writes_only_its_new_rows_and_restarts() -> None:
    """A buffer of 110k rows writes in each version only the segment of the rows the
    batch added (the keyed store's spread rule snapshotted most of it at once; its full
    snapshots rewrote it every ``snapshot_every`` versions), its manifest lists every
    live segment, and it loads at every committed version."""
    node = node_of(lambda left, right: left.join(right, on="ad", how="left", within="10m"))
    storage = Storage(f"memory://join-buffer-{uuid.uuid4().hex}")
    op = node.build_operator("join", storage)
    n = 110_000
    many = pl.DataFrame(
        {
            "ad": pl.int_range(n, eager=True),
            "imp_time": pl.Series([t(0)] * n),
            "imp": pl.Series(["i"] * n),
            "x": pl.Series([1.0] * n),
        },
        schema=IMPS,
    )
    frames = {}
    for version in range(1, 11):
        left = many if version == 1 else imps((n + version, t(version / 10), "j", 2.0))
        right = clicks((version, t(version / 10), "c", 3.0))
        op.process((left, right), ctx(version, -1e9, -1e8))  # (the watermark evicts nothing)
        op.commit(version)
        frames[version] = op.left.frame.sort(ROW_ID)
        entry = storage.sub("left").read_model(version_file(version), SegmentVersion)
        segments = [f for f in entry.files if f.kind == "segment"]
        assert len(segments) == version
        # (a left row's first match: one row id in a marks file, not the row rewritten)
        assert all(f.rows <= 1 for f in entry.files if f.kind == "marks")
        new = [f for f in segments if f.name.startswith(f"segments/{version}.")]
        assert [f.rows for f in new] == [n if version == 1 else 1]
        assert [f.rows for f in entry.files][:1] == [n]  # (version 1's, never rewritten)
    assert op.left.rows == n + 9
    for version in (1, 5, 9, 10):
        again = node.build_operator("join", storage)
        again.load(version)
        assert_frame_equal(again.left.frame.sort(ROW_ID), frames[version])


def test_a_buffer_with_spread_snapshots_continues() -> None:
    """A checkpoint whose buffers were keyed stores snapshotted by the spread rule (how
    buffers above 100k rows were written before the join buffer slice; written here
    with the keyed store, holding a run's buffers at each version) loads and continues:
    same rows emitted and the same state as a run that never stopped, and every
    version loads."""
    node = node_of(lambda left, right: left.join(right, on="ad", how="left", within="10m"))
    n = 110_000
    batches = [
        (
            pl.DataFrame(
                {
                    "ad": pl.int_range(n, eager=True),
                    "imp_time": pl.Series([t(0)] * n),
                    "imp": pl.Series(["i"] * n),
                    "x": pl.Series([1.0] * n),
                },
                schema=IMPS,
            ),
            clicks((7, t(1), "c7", 3.0)),
        ),
        *[
            (imps((n + v, t(v), "j", 2.0)), clicks((v, t(v), "c", 3.0), (n + v, t(v), "d", 4.0)))
            for v in range(2, 9)
        ],
    ]
    watermarks = [(-1e9, 0), *[(v - 1, v) for v in range(2, 8)], (7, 20)]  # the last evicts

    def run(op: StreamJoinOperator, versions: range) -> list[pl.DataFrame]:
        out = []
        for v in versions:
            lw, w = watermarks[v - 1]
            out.append(op.process(batches[v - 1], ctx(v, lw, w)).rows)
            op.commit(v)
            held[v] = {side: getattr(op, side).frame for side in ("left", "right")}
        return out

    held: dict[int, dict[str, pl.DataFrame]] = {}
    whole = operator(node)
    want = run(whole, range(1, 9))

    storage = Storage(f"memory://join-buffer-{uuid.uuid4().hex}")
    for side, on in (("left", "ad"), ("right", "ad")):
        keyed = StateStore(
            storage.sub(side),
            operator=f"join/{side}",
            key_columns=[on, ROW_ID],
            hash_columns=[on],
            one_row_per_key=True,
            schema=getattr(whole, side).schema,
            spread_snapshots_above=100_000,  # the rule buffers were written with
        )
        keyed.load(None)
        for v in range(1, 4):
            rows, kept = held[v][side], keyed.frame
            gone = kept.join(rows, on=ROW_ID, how="anti").select(on, ROW_ID)
            changed = rows.join(kept, on=rows.columns, how="anti", nulls_equal=True)
            keyed.apply(upserts=changed, deletes=gone)
            keyed.commit(v)
    first = storage.sub("left").read_model(version_file(1), StateVersion)
    # spread slices (every one under pressure at the first version: a full snapshot in
    # slices, no delta beside it; delta versions with spread slices: test_state_rotation)
    assert first.snapshot and len(first.files) > 1
    assert {f.kind for f in first.files} == {"snapshot"}
    after = node.build_operator("join", storage)
    after.load(3)
    got = want[:3] + run(after, range(4, 9))
    for a, b in zip(got, want):
        assert_frame_equal(a.sort(a.columns, nulls_last=True), b.sort(b.columns, nulls_last=True))
    assert sum(f.height for f in got) > n  # the expired impressions, unmatched
    for version in (1, 3, 5, 8):
        again = node.build_operator("join", storage)
        again.load(version)
        if version == 8:
            for side in ("left", "right"):
                assert_frame_equal(
                    getattr(again, side).frame.sort(ROW_ID), getattr(whole, side).frame.sort(ROW_ID)
                )
        assert again.left.rows == (n + version - 1 if version < 8 else whole.left.rows)


def test_anti_join_row_matched_as_it_expires_is_not_emitted() -> None:
    """A buffered left row whose first match comes in the batch that also evicts it leaves
    once, as matched: anti does not emit it, the unmatched one beside it is emitted."""
    node = node_of(lambda left, right: left.join(right, on="ad", how="anti", within="5m"))
    op = operator(node)
    first = op.process((imps((1, t(0), "a", 0.0), (2, t(0), "b", 0.0)), clicks()), ctx(0, -1e9, 1))
    assert first.rows.height == 0 and op.left.rows == 2
    second = op.process((imps(), clicks((1, t(4), "k", 0.0))), ctx(1, 1, 6))
    assert second.rows.get_column("imp").to_list() == ["b"]
    assert op.left.rows == 0
    assert op.progress().num_rows_removed == 2  # a and b (the click waits till t(9))
