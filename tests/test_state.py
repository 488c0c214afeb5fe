"""The keyed state store: semantics, persistence, recovery, retention, corruption."""

from __future__ import annotations

import json
import logging
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

import microstream.state.store as state_module
from microstream.checkpoint.storage import Storage
from microstream.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    PlanChangedError,
    SchemaMismatchError,
)
from microstream.state.key_groups import key_groups
from microstream.state.keyed_rows import KeyedRows
from microstream.state.read import read_store as read_state
from microstream.state.store import StateStore

SCHEMA = pl.Schema({"k1": pl.Int64, "k2": pl.String, "t": pl.Int64, "v": pl.Int64})
KEYS = ["k1", "k2"]


def canon(frame: pl.DataFrame) -> pl.DataFrame:
    """Row order of the state is unspecified: compare sorted."""
    return frame.sort(frame.columns, nulls_last=True)


def assert_same_rows(left: pl.DataFrame, right: pl.DataFrame) -> None:
    assert_frame_equal(canon(left), canon(right))


def rows(*data: tuple[int | None, str | None, int | None, int | None]) -> pl.DataFrame:
    return pl.DataFrame(data, schema=SCHEMA, orient="row")


def keys(*data: tuple[int | None, str | None]) -> pl.DataFrame:
    return pl.DataFrame(data, schema={"k1": pl.Int64, "k2": pl.String}, orient="row")


@pytest.fixture(params=["file", "memory"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    if request.param == "file":
        yield Storage(tmp_path / "state" / "op")
        return
    store = Storage(f"memory://test-state-{uuid.uuid4().hex}/state/op")
    yield store
    remove(store)


def remove(storage: Storage) -> None:
    if storage.fs.exists(storage.root):
        storage.fs.rm(storage.root, recursive=True)


def new_store(storage: Storage, **options: int) -> StateStore:
    return StateStore(storage, operator="op", key_columns=KEYS, schema=SCHEMA, **options)


def files(storage: Storage, partition: int | str) -> list[str]:
    try:
        names = storage.fs.ls(storage.path(str(partition)), detail=False)
    except FileNotFoundError:
        return []
    return sorted(str(n).rsplit("/", 1)[-1] for n in names if not str(n).endswith(".tmp"))


# -- semantics --------------------------------------------------------------------------


def test_upsert_replaces_every_row_of_a_key(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=4)
    store.apply(upserts=rows((1, "a", 0, 1), (1, "a", 1, 2), (1, "a", 2, 3), (2, "a", 0, 9)))
    store.apply(upserts=rows((1, "a", 5, 50), (3, "b", 0, 7)))
    assert_same_rows(store.frame, rows((1, "a", 5, 50), (2, "a", 0, 9), (3, "b", 0, 7)))
    # a single-row key becomes a multi-row key and back
    store.apply(upserts=rows((2, "a", 1, 10), (2, "a", 2, 11)))
    store.apply(upserts=rows((1, "a", 6, 60)))
    expected = rows((1, "a", 6, 60), (2, "a", 1, 10), (2, "a", 2, 11), (3, "b", 0, 7))
    assert_same_rows(store.frame, expected)
    assert store.rows == 4
    assert sum(store.rows_per_key_group()) == 4
    assert len(store.rows_per_key_group()) == 4
    assert store.bytes > 0
    assert store.frame.columns == list(SCHEMA)


def test_keys_are_compared_on_every_key_column(storage: Storage) -> None:
    store = new_store(storage)
    store.apply(upserts=rows((1, "a", 0, 1), (1, "b", 0, 2), (2, "a", 0, 3)))
    store.apply(upserts=rows((1, "b", 0, 20)))
    assert_same_rows(store.frame, rows((1, "a", 0, 1), (1, "b", 0, 20), (2, "a", 0, 3)))


def test_null_keys_are_keys(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=3)
    store.apply(
        upserts=rows((None, None, 0, 1), (None, "a", 0, 2), (1, None, 0, 3), (1, None, 1, 4))
    )
    store.apply(upserts=rows((None, None, 0, 10), (1, None, 5, 30)))
    assert_same_rows(store.frame, rows((None, None, 0, 10), (None, "a", 0, 2), (1, None, 5, 30)))
    store.apply(deletes=keys((None, "a"), (None, None)))
    assert_same_rows(store.frame, rows((1, None, 5, 30)))
    store.commit(0)
    again = new_store(storage, num_key_groups=3)
    again.load(0)
    assert_same_rows(again.frame, rows((1, None, 5, 30)))


def test_deletes_and_upsert_wins(storage: Storage) -> None:
    store = new_store(storage)
    store.apply(upserts=rows((1, "a", 0, 1), (1, "a", 1, 2), (2, "b", 0, 3), (3, "c", 0, 4)))
    store.apply(deletes=keys((1, "a"), (9, "z")))  # an unknown key is no error
    assert_same_rows(store.frame, rows((2, "b", 0, 3), (3, "c", 0, 4)))
    # deleted and upserted in one call: the upsert wins
    store.apply(upserts=rows((2, "b", 7, 70)), deletes=keys((2, "b"), (3, "c")))
    assert_same_rows(store.frame, rows((2, "b", 7, 70)))
    # deletes may carry other columns (the rows to delete)
    store.apply(deletes=rows((2, "b", 0, 0)))
    assert store.rows == 0
    store.commit(0)
    again = new_store(storage)
    again.load(0)
    assert again.rows == 0


def test_deleted_then_upserted_before_a_commit(storage: Storage) -> None:
    store = new_store(storage)
    store.apply(upserts=rows((1, "a", 0, 1)))
    store.commit(1)
    store.apply(deletes=keys((1, "a")))
    store.apply(upserts=rows((1, "a", 0, 2), (1, "a", 1, 3)))
    store.apply(upserts=rows((2, "a", 0, 4)))
    store.apply(deletes=keys((2, "a")))
    store.commit(2)
    again = new_store(storage)
    again.load(2)
    assert_same_rows(again.frame, rows((1, "a", 0, 2), (1, "a", 1, 3)))


def test_filter_out_with_keys_on_both_sides(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=2)
    store.apply(
        upserts=rows(
            (1, "a", 1, 10),  # key (1, a) keeps t=5
            (1, "a", 5, 11),
            (2, "b", 1, 20),  # key (2, b) is evicted whole
            (2, "b", 2, 21),
            (3, "c", 9, 30),  # untouched
            (None, None, None, 40),  # null predicate: kept
        )
    )
    store.commit(0)
    removed = store.filter_out(pl.col("t") <= 2)
    assert_same_rows(removed, rows((1, "a", 1, 10), (2, "b", 1, 20), (2, "b", 2, 21)))
    remaining = rows((1, "a", 5, 11), (3, "c", 9, 30), (None, None, None, 40))
    assert_same_rows(store.frame, remaining)
    assert store.filter_out(pl.col("t") <= 2).height == 0
    assert store.filter_out(pl.col("t") <= 2).columns == list(SCHEMA)
    store.commit(1)
    again = new_store(storage, num_key_groups=2)
    again.load(1)
    assert_same_rows(again.frame, remaining)
    # a later upsert of the kept key still replaces all its rows
    again.apply(upserts=rows((1, "a", 8, 12)))
    assert_same_rows(again.frame, rows((1, "a", 8, 12), (3, "c", 9, 30), (None, None, None, 40)))
    everything = again.frame
    assert_same_rows(again.filter_out(pl.lit(True)), everything)
    assert again.rows == 0


def test_filter_out_everything_and_non_boolean_predicate(storage: Storage) -> None:
    store = new_store(storage)
    store.apply(upserts=rows((1, "a", 1, 10), (2, "b", 2, 20)))
    with pytest.raises(TypeError, match="boolean"):
        store.filter_out(pl.col("t") + 1)
    assert_same_rows(store.filter_out(pl.lit(True)), rows((1, "a", 1, 10), (2, "b", 2, 20)))
    assert store.rows == 0


def test_schema_of_changes_is_checked(storage: Storage) -> None:
    store = new_store(storage)
    with pytest.raises(SchemaMismatchError, match=r"missing columns \['v'\]"):
        store.apply(upserts=rows((1, "a", 0, 1)).drop("v"))
    with pytest.raises(SchemaMismatchError, match=r"unexpected columns \['x'\]"):
        store.apply(upserts=rows((1, "a", 0, 1)).with_columns(x=1))
    with pytest.raises(SchemaMismatchError, match="v: Int32 instead of Int64"):
        store.apply(upserts=rows((1, "a", 0, 1)).with_columns(pl.col("v").cast(pl.Int32)))
    with pytest.raises(SchemaMismatchError, match=r"missing columns \['k2'\]"):
        store.apply(deletes=pl.DataFrame({"k1": [1]}))
    # columns in another order, and all-null columns, are fine
    store.apply(upserts=pl.DataFrame({"v": [1], "t": [None], "k2": ["a"], "k1": [1]}))
    assert_same_rows(store.frame, rows((1, "a", None, 1)))
    store.apply(upserts=None, deletes=None)
    store.apply(upserts=rows())


def test_lookup_reads_rows_of_keys(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=4)
    store.apply(upserts=rows((1, "a", 0, 1), (1, "a", 1, 2), (None, "b", 0, 3), (4, "c", 0, 4)))
    found = store.lookup(keys((1, "a"), (None, "b"), (7, "x"), (1, "a")))
    assert_same_rows(found, rows((1, "a", 0, 1), (1, "a", 1, 2), (None, "b", 0, 3)))
    assert store.lookup(keys()).columns == list(SCHEMA)


def test_constructor_arguments_are_checked(storage: Storage) -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        StateStore(storage, operator="op", key_columns=[], schema=SCHEMA)
    with pytest.raises(ValueError, match=r"\['nope'\]"):
        StateStore(storage, operator="op", key_columns=["nope"], schema=SCHEMA)
    with pytest.raises(ValueError, match="reserved"):
        StateStore(
            storage,
            operator="op",
            key_columns=["k1"],
            schema={"k1": pl.Int64, "__deleted": pl.Boolean},
        )
    with pytest.raises(
        ValueError, match="num_key_groups must be an integer from 1 to 65536; got 0 instead"
    ):
        new_store(storage, num_key_groups=0)


def test_rows_keyed_by_a_prefix_are_inserted_found_and_recovered(storage: Storage) -> None:
    # A stream join's layout: one key per row (k1, t), hashed on k1 only, so a lookup by
    # k1 finds all of k1's rows and new rows go in without rewriting the old ones.
    def store() -> StateStore:
        return StateStore(
            storage,
            operator="op",
            key_columns=["k1", "t"],
            hash_columns=["k1"],
            one_row_per_key=True,
            schema=SCHEMA,
            num_key_groups=4,
        )

    first = store()
    first.load(None)
    first.insert(rows((1, "a", 1, 10), (2, "b", 2, 20), (1, "c", 3, 30), (None, "n", 4, 40)))
    first.commit(0)
    first.insert(rows((1, "d", 5, 50)))
    first.apply(upserts=rows((1, "a", 1, 11)))  # one row, by its whole key
    by_k1 = pl.DataFrame({"k1": [1, None]}, schema={"k1": pl.Int64})
    expected = rows((1, "a", 1, 11), (1, "c", 3, 30), (1, "d", 5, 50), (None, "n", 4, 40))
    assert_same_rows(first.lookup(by_k1), expected)
    assert_same_rows(first.lookup(rows((1, None, 3, None))), rows((1, "c", 3, 30)))
    assert_same_rows(
        first.filter_out(pl.col("t") <= 3), rows((1, "a", 1, 11), (2, "b", 2, 20), (1, "c", 3, 30))
    )
    first.commit(1)
    # The delta holds only what changed: the row inserted, and deletion markers for the
    # three keys evicted (t 1's upsert included): no row of k1 that stayed is rewritten.
    delta = pl.read_ipc(storage.read_bytes("deltas/1.arrow"))  # one file for every key group
    assert sorted(delta.select("t", "__deleted").rows()) == [
        (1, True), (2, True), (3, True), (5, False)
    ]  # fmt: skip
    second = store()
    second.load(1)
    assert_same_rows(second.frame, rows((None, "n", 4, 40), (1, "d", 5, 50)))
    second.load(0)
    assert_same_rows(
        second.lookup(by_k1), rows((1, "a", 1, 10), (1, "c", 3, 30), (None, "n", 4, 40))
    )
    assert_same_rows(read_state(storage, version=0), second.frame)
    with pytest.raises(PlanChangedError, match=r"hash_columns \['k1'\] -> \['k1', 't'\]"):
        StateStore(
            storage, operator="op", key_columns=["k1", "t"], schema=SCHEMA, num_key_groups=4
        ).load(0)
    with pytest.raises(ValueError, match=r"hash_columns .* must be some of its key_columns"):
        StateStore(storage, operator="op", key_columns=["k1"], hash_columns=["v"], schema=SCHEMA)


def test_fold_merges_the_rows_of_keys_sharing_a_hash_and_records_them(storage: Storage) -> None:
    # An aggregation's partials: one row per (k1, t), hashed on k1 only, so one hash holds
    # several keys (windows); fold finds their rows once, merges, writes back, records.
    def store() -> StateStore:
        return StateStore(
            storage,
            operator="op",
            key_columns=["k1", "t"],
            hash_columns=["k1"],
            one_row_per_key=True,
            schema=SCHEMA,
            num_key_groups=4,
        )

    def add(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
        seen.append(old)
        both = pl.concat([old, new])
        return (
            both.group_by("k1", "t")
            .agg(pl.col("k2").last(), pl.col("v").sum())
            .select(SCHEMA.names())
        )

    seen: list[pl.DataFrame] = []
    first = store()
    first.load(None)
    first.fold(rows((1, "a", 1, 10), (1, "a", 2, 20), (None, "n", 1, 5)), add)
    assert seen[-1].height == 0  # nothing stored yet
    first.commit(0)
    merged = first.fold(
        rows((1, "b", 2, 1), (1, "b", 3, 3), (None, "m", 1, 1), (2, "c", 1, 7)), add
    )
    # the stored rows of exactly the keys folded: (1, 2) and (None, 1), not (1, 1)
    assert_same_rows(seen[-1], rows((1, "a", 2, 20), (None, "n", 1, 5)))
    expected = rows((1, "b", 2, 21), (1, "b", 3, 3), (None, "m", 1, 6), (2, "c", 1, 7))
    assert_same_rows(merged, expected)
    assert_same_rows(first.frame, pl.concat([rows((1, "a", 1, 10)), expected]))
    first.commit(1)
    delta = pl.read_ipc(storage.read_bytes("deltas/1.arrow"))
    assert sorted(delta.select("k1", "t", "__deleted").rows(), key=str) == sorted(
        [(1, 2, False), (1, 3, False), (None, 1, False), (2, 1, False)], key=str
    )
    second = store()
    second.load(1)
    assert_same_rows(second.frame, first.frame)
    # a merge returning new rows for the keys (hashed again): found, recovered alike
    kept = second.fold(
        rows((2, "c", 1, 1), (None, "m", 1, 1)),
        lambda old, new: new.with_columns(pl.col("v") + old.sort("k1", nulls_last=True)["v"]),
    )
    assert_same_rows(kept, rows((2, "c", 1, 8), (None, "m", 1, 7)))
    second.commit(2)
    third = store()
    third.load(2)
    assert_same_rows(third.frame, second.frame)
    assert_same_rows(third.lookup(rows((None, None, 1, None))), rows((None, "m", 1, 7)))
    assert third.rows_per_key_group() == second.rows_per_key_group()
    # a merge that loses or invents a key is refused, and changes nothing
    with pytest.raises(ValueError, match=r"fold of operator 'op': 1 key\(s\) merged into 2 rows"):
        third.fold(rows((2, "c", 1, 1)), lambda old, new: pl.concat([new, new]))
    assert_same_rows(third.frame, second.frame)
    assert not third.has_pending_changes


def test_lookup_by_a_prefix_hash_with_repeated_keys_is_exact(storage: Storage) -> None:
    # Several keys per hash (hashed on k1): the probe checks candidates against a hash of the
    # whole key; a lookup naming a key twice falls back to a join, with the same answer.
    store = StateStore(
        storage, operator="op", key_columns=["k1", "t"], hash_columns=["k1"], schema=SCHEMA
    )
    store.load(None)
    store.apply(upserts=rows((1, "a", 1, 1), (1, "b", 2, 2), (1, "c", 3, 3), (None, "n", 1, 4)))
    wanted = rows((1, None, 1, None), (1, None, 3, None), (None, None, 1, None), (1, None, 9, None))
    expected = rows((1, "a", 1, 1), (1, "c", 3, 3), (None, "n", 1, 4))
    assert_same_rows(store.lookup(wanted), expected)
    assert_same_rows(store.lookup(pl.concat([wanted, wanted])), expected)
    store.apply(deletes=wanted.select("k1", "t"))
    assert_same_rows(store.frame, rows((1, "b", 2, 2)))


def test_hash_collisions_never_remove_other_keys(storage: Storage) -> None:
    # Force every row onto one hash value: only the key columns may decide.
    same_hash = pl.lit(7, dtype=pl.UInt64).alias("__key_hash")
    data = KeyedRows(
        rows((1, "a", 0, 1), (2, "b", 0, 2), (1, "a", 1, 3)).with_columns(same_hash),
        key_columns=KEYS,
        hash_column="__key_hash",
        num_partitions=1,
        tail_rows=1,  # the second replace merges the tail into the base
    )
    wanted = keys((1, "a")).with_columns(same_hash)
    assert_same_rows(data.rows_of(wanted).drop("__key_hash"), rows((1, "a", 0, 1), (1, "a", 1, 3)))
    data.replace(wanted, rows((1, "a", 9, 9)).with_columns(same_hash))
    assert_same_rows(data.frame().drop("__key_hash"), rows((2, "b", 0, 2), (1, "a", 9, 9)))
    data.replace(
        keys((2, "b")).with_columns(same_hash), rows((2, "b", 5, 5)).with_columns(same_hash)
    )
    assert_same_rows(data.frame().drop("__key_hash"), rows((2, "b", 5, 5), (1, "a", 9, 9)))
    assert data.rows_per_partition() == [2]
    removed = data.remove_where(pl.col("v") == 9)
    assert_same_rows(removed.drop("__key_hash"), rows((1, "a", 9, 9)))
    assert_same_rows(data.frame().drop("__key_hash"), rows((2, "b", 5, 5)))


def test_categorical_keys_partition_by_their_strings(storage: Storage) -> None:
    schema = pl.Schema({"user": pl.Categorical(), "n": pl.Int64})
    store = StateStore(storage, operator="op", key_columns=["user"], schema=schema)
    frame = pl.DataFrame({"user": ["z", "y", "x", "w"], "n": [1, 2, 3, 4]}, schema=schema)
    store.apply(upserts=frame)
    store.commit(0)
    again = StateStore(storage, operator="op", key_columns=["user"], schema=schema)
    again.load(0)
    again.apply(upserts=pl.DataFrame({"user": ["x"], "n": [30]}, schema=schema))
    assert sorted(again.frame.iter_rows()) == [("w", 4), ("x", 30), ("y", 2), ("z", 1)]


# -- persistence ------------------------------------------------------------------------


def test_recovery_to_any_version(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=4, snapshot_every=3)
    store.load(None)
    expected: dict[int, pl.DataFrame] = {}
    for version in range(12):
        store.apply(
            upserts=rows(*[(i % 5, "k", version, version * 10 + i) for i in range(version % 4)]),
            deletes=keys((version % 7, "k")) if version % 3 == 2 else None,
        )
        if version % 4 == 3:
            store.filter_out(pl.col("t") < version - 4)
        store.commit(version)
        expected[version] = store.frame
    for version, frame in expected.items():
        again = new_store(storage, num_key_groups=4, snapshot_every=3)
        again.load(version)
        assert again.version == version
        assert_same_rows(again.frame, frame)
        assert_same_rows(read_state(storage, version=version), frame)
    assert_same_rows(read_state(storage), expected[11])


def test_continue_after_load(storage: Storage) -> None:
    store = new_store(storage, snapshot_every=4)
    store.apply(upserts=rows((1, "a", 0, 1)))
    store.commit(0)
    store.apply(upserts=rows((2, "a", 0, 2)))
    store.commit(1)
    again = new_store(storage, snapshot_every=4)
    again.load(1)
    again.apply(upserts=rows((1, "a", 0, 10)))
    again.commit(2)
    third = new_store(storage, snapshot_every=4)
    third.load(2)
    assert_same_rows(third.frame, rows((1, "a", 0, 10), (2, "a", 0, 2)))


def test_snapshot_cadence_one_delta_per_version_and_key_group_ranges(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=4, snapshot_every=3, snapshot_files=2)
    store.load(None)
    one_key = rows((1, "a", 0, 1))
    group = int(key_groups(one_key, KEYS, 4)[0])
    for version in range(7):
        store.apply(upserts=one_key.with_columns(v=pl.lit(version, dtype=pl.Int64)))
        store.commit(version)
    assert files(storage, "deltas") == ["1.arrow", "2.arrow", "4.arrow", "5.arrow"]
    assert files(storage, "snapshots") == ["0", "3", "6"]
    for v in (0, 3, 6):  # each snapshot: two files, contiguous key-group ranges
        assert files(storage, f"snapshots/{v}") == ["0-2.arrow", "2-4.arrow"]
    manifest = json.loads(storage.read_bytes("versions/5.json"))
    assert manifest == {
        "format_version": 2,
        "version": 5,
        "parent": 4,
        "snapshot": False,
        "files": [
            {
                "name": "deltas/5.arrow",
                "kind": "delta",
                "key_groups": [group, group + 1],
                "rows": 1,
                # the CRC-32 of the file, verified on load
                "crc32": zlib.crc32(storage.read_bytes("deltas/5.arrow")),
            }
        ],
        "rows_per_key_group": [1 if g == group else 0 for g in range(4)],
    }
    snapshot = json.loads(storage.read_bytes("versions/6.json"))
    assert [(f["name"], f["key_groups"]) for f in snapshot["files"]] == [
        ("snapshots/6/0-2.arrow", [0, 2]),
        ("snapshots/6/2-4.arrow", [2, 4]),
    ]
    metadata = json.loads(storage.read_bytes("_metadata.json"))
    assert metadata["schema"] == {"k1": "Int64", "k2": "String", "t": "Int64", "v": "Int64"}
    assert metadata["key_columns"] == KEYS
    assert metadata["num_key_groups"] == 4
    assert metadata["hash_algorithm"] == "ms-poly-fmix64-v1"
    # a version that changed nothing writes only its manifest; a forced snapshot writes all
    store.commit(7)
    assert "7.arrow" not in files(storage, "deltas")
    assert json.loads(storage.read_bytes("versions/7.json"))["files"] == []
    store.commit(8, snapshot=True)
    assert files(storage, "snapshots/8") == ["0-2.arrow", "2-4.arrow"]
    delta = pl.read_ipc(storage.read_bytes("deltas/5.arrow"))
    assert delta.schema == pl.Schema({**SCHEMA, "__deleted": pl.Boolean, "__key_group": pl.UInt16})
    assert delta["__key_group"].to_list() == [group]


def test_load_a_range_of_key_groups(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=16, snapshot_every=3, snapshot_files=4)
    for version in range(5):  # a snapshot at 3, then a delta at 4
        store.apply(
            upserts=rows(*[(k, "a", version, k * 10 + version) for k in range(version, 40, 3)]),
            deletes=keys((version + 1, "a")),
        )
        store.commit(version)
    whole = store.frame
    groups = key_groups(whole, KEYS, 16)
    for lo, hi in ((0, 16), (0, 7), (7, 16), (5, 6), (3, 11)):
        part = new_store(storage, num_key_groups=16)
        part.load(4, key_groups=range(lo, hi))
        assert_same_rows(part.frame, whole.filter(pl.Series((groups >= lo) & (groups < hi))))
    halves = [new_store(storage, num_key_groups=16) for _ in range(2)]
    halves[0].load(4, key_groups=range(0, 9))
    halves[1].load(4, key_groups=range(9, 16))
    assert_same_rows(pl.concat([h.frame for h in halves]), whole)
    halves[0].apply(upserts=rows((99, "z", 0, 0)))
    with pytest.raises(CheckpointError, match="loaded for key groups 0-8 only"):
        halves[0].commit(5)
    with pytest.raises(ValueError, match=r"key_groups must be a non-empty range"):
        new_store(storage, num_key_groups=16).load(4, key_groups=range(3, 20))


def test_delta_files_hold_upserts_and_deletion_markers(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=1, snapshot_every=100)
    store.apply(upserts=rows((1, "a", 0, 1), (2, "b", 0, 2), (2, "b", 1, 3)))
    store.commit(1)
    store.apply(upserts=rows((1, "a", 5, 5)), deletes=keys((2, "b")))
    store.commit(2)
    delta = pl.read_ipc(storage.read_bytes("deltas/2.arrow"))
    expected = pl.DataFrame(
        {
            "k1": [1, 2],
            "k2": ["a", "b"],
            "t": [5, None],
            "v": [5, None],
            "__deleted": [False, True],
            "__key_group": [0, 0],
        },
        schema={**SCHEMA, "__deleted": pl.Boolean, "__key_group": pl.UInt16},
    )
    assert_same_rows(delta, expected)


def test_evicting_most_of_the_state_commits_a_snapshot_not_a_delta(storage: Storage) -> None:
    store = new_store(storage, snapshot_every=100)
    store.load(None)
    store.apply(upserts=rows(*[(i, "a", i, i) for i in range(1, 31)]))
    store.commit(1)
    store.apply(upserts=rows((1, "a", 0, 9)))
    store.commit(2)  # one changed row: a delta
    evicted = store.filter_out(pl.col("t") > 3)  # 27 deletion markers for 3 rows left
    assert evicted.height == 27
    store.commit(3)
    manifests = [json.loads(storage.read_bytes(f"versions/{v}.json")) for v in (1, 2, 3)]
    assert [m["snapshot"] for m in manifests] == [False, False, True]
    assert not storage.exists("deltas/3.arrow")
    assert sum(f["rows"] for f in manifests[2]["files"]) == 3
    again = new_store(storage, snapshot_every=100)
    again.load(3)
    assert_same_rows(again.frame, rows((1, "a", 0, 9), (2, "a", 2, 2), (3, "a", 3, 3)))
    again.load(2)
    assert again.rows == 30


def test_version_gaps_and_bounded_replay(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=1, snapshot_every=3)
    for version in (1, 2, 4, 5, 7, 8, 10):  # none divisible by 3 except 6 and 9, skipped
        store.apply(upserts=rows((version, "a", 0, version)))
        store.commit(version)
    kinds = {
        v: json.loads(storage.read_bytes(f"versions/{v}.json"))["snapshot"]
        for v in (1, 2, 4, 5, 7, 8, 10)
    }
    # at most two deltas to replay after the empty state or a snapshot (at 4 and at 8)
    assert kinds == {1: False, 2: False, 4: True, 5: False, 7: False, 8: True, 10: False}
    again = new_store(storage, num_key_groups=1, snapshot_every=3)
    again.load(7)
    assert sorted(again.frame["k1"].to_list()) == [1, 2, 4, 5, 7]
    with pytest.raises(CheckpointCorruptError, match=r"versions/6\.json: version 6 is missing"):
        again.load(6)


def test_retention_keeps_what_retained_versions_need(storage: Storage) -> None:
    store = new_store(storage, num_key_groups=2, snapshot_every=3, min_versions_to_retain=4)
    expected = {}
    for version in range(15):
        store.apply(upserts=rows((version % 5, "a", version, version)))
        store.commit(version)
        expected[version] = store.frame
    # retained: 11..14; 11 needs the snapshot at 9 and the deltas 10, 11
    assert storage.list_numbered("versions") == list(range(9, 15))
    assert all(int(name.split(".")[0]) >= 9 for name in files(storage, "deltas"))
    assert files(storage, "snapshots") == ["12", "9"]
    for version in range(9, 15):
        again = new_store(storage, num_key_groups=2)
        again.load(version)
        assert_same_rows(again.frame, expected[version])
    with pytest.raises(
        CheckpointCorruptError, match=r"version 8 is no longer retained \(oldest on disk: 9\)"
    ):
        new_store(storage, num_key_groups=2).load(8)
    with pytest.raises(
        CheckpointCorruptError, match=r"version 15 was never committed \(newest on disk: 14\)"
    ):
        new_store(storage, num_key_groups=2).load(15)


def test_commit_versions_only_go_forward(storage: Storage) -> None:
    store = new_store(storage)
    store.apply(upserts=rows((1, "a", 0, 1)))
    store.commit(3)
    store.commit(3)  # the same version again, nothing changed: no-op
    assert store.version == 3
    store.apply(upserts=rows((2, "a", 0, 1)))
    with pytest.raises(CheckpointError, match="at version 3 with uncommitted changes"):
        store.commit(3)
    with pytest.raises(CheckpointError, match="versions only go forward"):
        store.commit(2)
    with pytest.raises(ValueError, match="non-negative integer"):
        store.commit(-1)
    assert store.has_pending_changes
    store.commit(4)
    assert not store.has_pending_changes


def test_rerun_batch_after_restart_is_idempotent(storage: Storage) -> None:
    def run(store: StateStore, version: int) -> None:
        store.apply(upserts=rows((version, "a", 0, version), (version, "b", 0, version)))
        store.apply(deletes=keys((version - 2, "a")))
        store.commit(version)

    store = new_store(storage, num_key_groups=4, snapshot_every=5)
    for version in range(4):
        run(store, version)
    first = {p: {n: storage.read_bytes(f"{p}/{n}") for n in files(storage, p)} for p in range(4)}
    manifest = storage.read_bytes("versions/3.json")
    expected = store.frame
    # the process died after committing state 3 but before commits/3: batch 3 runs again
    again = new_store(storage, num_key_groups=4, snapshot_every=5)
    again.load(2)
    run(again, 3)
    assert storage.read_bytes("versions/3.json") == manifest
    assert {
        p: {n: storage.read_bytes(f"{p}/{n}") for n in files(storage, p)} for p in range(4)
    } == first
    assert_same_rows(again.frame, expected)
    third = new_store(storage, num_key_groups=4, snapshot_every=5)
    third.load(3)
    assert_same_rows(third.frame, expected)


def test_stale_versions_above_the_loaded_one_are_dropped(storage: Storage) -> None:
    store = new_store(storage)
    for version in range(4):
        store.apply(upserts=rows((version, "a", 0, version)))
        store.commit(version)
    again = new_store(storage)
    again.load(1)
    again.apply(upserts=rows((9, "z", 0, 9)))
    again.commit(2)  # the run that wrote 2 and 3 never committed them
    assert storage.list_numbered("versions") == [0, 1, 2]
    assert_same_rows(read_state(storage), rows((0, "a", 0, 0), (1, "a", 0, 1), (9, "z", 0, 9)))


def test_commit_without_load_over_existing_state_is_refused(storage: Storage) -> None:
    store = new_store(storage)
    store.apply(upserts=rows((1, "a", 0, 1)))
    store.commit(0)
    fresh = new_store(storage)
    fresh.apply(upserts=rows((2, "a", 0, 1)))
    with pytest.raises(CheckpointError, match=r"call load\(\)"):
        fresh.commit(1)
    fresh.load(None)  # explicitly starting over is allowed
    fresh.apply(upserts=rows((2, "a", 0, 1)))
    fresh.commit(0)
    assert storage.list_numbered("versions") == [0]
    assert_same_rows(read_state(storage), rows((2, "a", 0, 1)))


# -- corruption and mismatches ----------------------------------------------------------


def committed_store(storage: Storage) -> StateStore:
    """Versions 0 (a snapshot, one file), 1 and 2 (deltas)."""
    store = new_store(storage, num_key_groups=1, snapshot_every=3, snapshot_files=1)
    for version in range(3):
        store.apply(upserts=rows((version, "a", 0, version)))
        store.commit(version)
    return store


def rewrite(storage: Storage, name: str, data: bytes, version: int) -> None:
    """Replace a state file and record its new CRC-32 in its version's manifest: a
    rewrite the checksum cannot see, so that the checks behind it (decoding, columns,
    row counts) are what the damaged file meets."""
    storage.write_bytes(name, data)
    entry = json.loads(storage.read_bytes(f"versions/{version}.json"))
    for file in entry["files"]:
        if file["name"] == name:
            file["crc32"] = zlib.crc32(data)
    storage.write_bytes(f"versions/{version}.json", json.dumps(entry).encode())


def test_a_changed_bit_in_a_state_file_is_named_never_loaded(storage: Storage) -> None:
    committed_store(storage)
    original = storage.read_bytes("deltas/1.arrow")
    one = (1).to_bytes(8, "little")  # version 1 wrote the row (1, "a", 0, 1)
    position = original.rindex(one)
    flipped = original[:position] + bytes([original[position] ^ 0x04]) + original[position + 1 :]
    storage.write_bytes("deltas/1.arrow", flipped)
    with pytest.raises(
        CheckpointCorruptError,
        match=r"deltas/1\.arrow of operator 'op' is corrupt: its CRC-32 is [0-9a-f]{8}, the "
        r"version that wrote it recorded [0-9a-f]{8}",
    ):
        new_store(storage, num_key_groups=1).load(1)
    # a file rewritten whole (a valid file of another version) is caught the same way
    storage.write_bytes("deltas/1.arrow", original)
    storage.write_bytes("deltas/2.arrow", original)
    with pytest.raises(CheckpointCorruptError, match=r"deltas/2\.arrow .* CRC-32"):
        new_store(storage, num_key_groups=1).load(2)


def test_without_its_checksum_a_changed_bit_loads_silently(storage: Storage) -> None:
    """What the checksums prevent: the same flip, with the manifest's CRC-32 made to
    match, decodes to other state, with no error."""
    committed_store(storage)
    original = storage.read_bytes("deltas/1.arrow")
    position = original.rindex((1).to_bytes(8, "little"))
    flipped = original[:position] + bytes([original[position] ^ 0x04]) + original[position + 1 :]
    rewrite(storage, "deltas/1.arrow", flipped, 1)
    store = new_store(storage, num_key_groups=1)
    store.load(1)
    assert store.frame.rows() != [(0, "a", 0, 0), (1, "a", 0, 1)]


def test_truncated_file_is_named(storage: Storage) -> None:
    committed_store(storage)
    data = storage.read_bytes("deltas/1.arrow")
    rewrite(storage, "deltas/1.arrow", data[: len(data) // 2], 1)
    with pytest.raises(CheckpointCorruptError, match=r"deltas/1\.arrow is corrupt or truncated"):
        new_store(storage, num_key_groups=1).load(2)
    rewrite(storage, "snapshots/0/0-1.arrow", b"not arrow", 0)
    with pytest.raises(CheckpointCorruptError, match=r"snapshots/0/0-1\.arrow is corrupt"):
        new_store(storage, num_key_groups=1).load(0)


def test_missing_file_is_named(storage: Storage) -> None:
    committed_store(storage)
    storage.delete("deltas/2.arrow")
    with pytest.raises(
        CheckpointCorruptError, match=r"deltas/2\.arrow of operator 'op' is missing"
    ):
        new_store(storage, num_key_groups=1).load(2)
    storage.delete("versions/1.json")
    with pytest.raises(
        CheckpointCorruptError, match=r"versions/1\.json: it is needed to rebuild version 2"
    ):
        new_store(storage, num_key_groups=1).load(2)


def test_file_with_other_columns_is_named(storage: Storage) -> None:
    committed_store(storage)
    other = pl.DataFrame(
        {"k1": [1], "k2": ["a"], "t": [0], "v": [1.5], "__deleted": [False], "__key_group": [0]},
        schema_overrides={"__key_group": pl.UInt16},
    )
    rewrite(storage, "deltas/1.arrow", other.write_ipc(None).getvalue(), 1)
    with pytest.raises(
        CheckpointCorruptError,
        match=r"deltas/1\.arrow does not hold .* 'v' is Float64 instead of Int64",
    ):
        new_store(storage, num_key_groups=1).load(1)


def test_corrupt_manifest_and_wrong_row_count(storage: Storage) -> None:
    committed_store(storage)
    # a valid delta file of another version: row counts no longer add up
    rewrite(storage, "deltas/2.arrow", storage.read_bytes("deltas/1.arrow"), 2)
    with pytest.raises(
        CheckpointCorruptError, match=r"key group 0 has 2 rows .*/versions/2\.json records 3"
    ):
        new_store(storage, num_key_groups=1).load(2)
    storage.write_bytes("versions/2.json", b'{"format_version": 2, "vers')
    with pytest.raises(CheckpointCorruptError, match=r"versions/2\.json is corrupt or truncated"):
        new_store(storage, num_key_groups=1).load(2)
    entry = json.loads(storage.read_bytes("versions/1.json"))
    storage.write_bytes("versions/1.json", json.dumps({**entry, "version": 7}).encode())
    with pytest.raises(
        CheckpointCorruptError, match=r"versions/1\.json is corrupt: it describes version 7"
    ):
        new_store(storage, num_key_groups=1).load(1)


def test_metadata_mismatch_is_refused(storage: Storage) -> None:
    committed_store(storage)
    with pytest.raises(PlanChangedError, match=r"_metadata\.json .*num_key_groups 1 -> 4"):
        new_store(storage, num_key_groups=4).load(2)
    with pytest.raises(PlanChangedError, match=r"key_columns \['k1', 'k2'\] -> \['k1'\]"):
        StateStore(
            storage, operator="op", key_columns=["k1"], schema=SCHEMA, num_key_groups=1
        ).load(2)
    schema = pl.Schema({**SCHEMA, "v": pl.Float64})
    with pytest.raises(PlanChangedError, match="column 'v' is Float64 instead of Int64"):
        StateStore(storage, operator="op", key_columns=KEYS, schema=schema, num_key_groups=1).load(
            2
        )
    storage.delete("_metadata.json")
    with pytest.raises(CheckpointCorruptError, match=r"no .*_metadata\.json"):
        new_store(storage, num_key_groups=1).load(2)


def test_new_snapshot_every_is_accepted(storage: Storage) -> None:
    committed_store(storage)
    store = new_store(storage, num_key_groups=1, snapshot_every=2)
    store.load(2)
    store.commit(3)
    assert json.loads(storage.read_bytes("_metadata.json"))["snapshot_every"] == 2
    assert_same_rows(read_state(storage), rows((0, "a", 0, 0), (1, "a", 0, 1), (2, "a", 0, 2)))


def test_a_changed_in_memory_hash_changes_nothing_on_disk(
    storage: Storage, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Written by a "Polars" whose hash differs (simulated by another seed): the in-memory
    # hash is never written, key groups come from the stable hash, so nothing changes.
    monkeypatch.setattr(state_module, "_HASH_SEED", 12345)
    old = new_store(storage, num_key_groups=4, snapshot_every=100)
    old.apply(upserts=rows(*[(i, "a", 0, i) for i in range(40)]))
    old.commit(1)
    old.apply(upserts=rows(*[(i, "a", 1, -i) for i in range(0, 40, 2)]))
    old.commit(2)
    monkeypatch.undo()

    store = new_store(storage, num_key_groups=4, snapshot_every=100)
    with caplog.at_level(logging.WARNING, logger="microstream"):
        store.load(2)
    assert caplog.text == ""
    expected = rows(*[(i, "a", 1, -i) if i % 2 == 0 else (i, "a", 0, i) for i in range(40)])
    assert_same_rows(store.frame, expected)
    assert store.rows_per_key_group() == old.rows_per_key_group()
    store.apply(upserts=rows(*[(i, "a", 2, 0) for i in range(40)]))  # no duplicates
    assert store.rows == 40
    store.commit(3)
    assert json.loads(storage.read_bytes("versions/3.json"))["snapshot"] is False
    again = new_store(storage, num_key_groups=4, snapshot_every=100)
    again.load(3)
    assert_same_rows(again.frame, rows(*[(i, "a", 2, 0) for i in range(40)]))


def test_another_hash_algorithm_is_refused(storage: Storage) -> None:
    committed_store(storage)
    meta = json.loads(storage.read_bytes("_metadata.json"))
    storage.write_bytes(
        "_metadata.json", json.dumps({**meta, "hash_algorithm": "other-v0"}).encode()
    )
    with pytest.raises(PlanChangedError, match=r"hash_algorithm 'other-v0' -> 'ms-poly-fmix64-v1'"):
        new_store(storage, num_key_groups=1).load(2)


def test_read_state_without_state(storage: Storage) -> None:
    with pytest.raises(CheckpointError, match=r"_metadata\.json is missing"):
        read_state(storage)


def test_read_state_of_any_dtype(storage: Storage) -> None:
    schema = pl.Schema(
        {
            "user": pl.Enum(["a", "b"]),
            "ts": pl.Datetime("us", "UTC"),
            "amount": pl.Decimal(10, 2),
            "items": pl.List(pl.Int32),
        }
    )
    store = StateStore(
        storage, operator="op", key_columns=["user", "ts"], schema=schema, snapshot_every=2
    )
    frame = pl.DataFrame(
        {"user": ["a", "b"], "ts": [0, 1], "amount": ["1.50", "2.25"], "items": [[1], []]},
    ).with_columns(
        pl.col("user").cast(schema["user"]),
        pl.col("ts").cast(schema["ts"]),
        pl.col("amount").str.to_decimal(scale=2).cast(schema["amount"]),
        pl.col("items").cast(schema["items"]),
    )
    store.apply(upserts=frame)
    store.commit(1)
    result = read_state(storage)
    assert result.schema == schema
    assert_same_rows(result, frame)


def test_dtypes_pyarrow_cannot_write_use_polars_ipc(storage: Storage) -> None:
    schema = pl.Schema({"id": pl.Int128, "v": pl.Int64})
    store = StateStore(storage, operator="op", key_columns=["id"], schema=schema, snapshot_every=2)
    assert not store._pyarrow_io
    store.apply(upserts=pl.DataFrame({"id": [1, 2], "v": [1, 2]}, schema=schema))
    store.commit(1)
    store.apply(deletes=pl.DataFrame({"id": [1]}, schema={"id": pl.Int128}))
    store.commit(2)
    store.apply(upserts=pl.DataFrame({"id": [3], "v": [3]}, schema=schema))
    store.commit(3)
    assert_same_rows(read_state(storage), pl.DataFrame({"id": [2, 3], "v": [2, 3]}, schema=schema))
    assert_same_rows(
        read_state(storage, version=1), pl.DataFrame({"id": [1, 2], "v": [1, 2]}, schema=schema)
    )


# -- the model: random histories against a plain Polars reference ---------------------

KEY_VALUES = st.tuples(st.sampled_from([0, 1, 2, None]), st.sampled_from(["x", "y", None]))
ROW = st.tuples(KEY_VALUES, st.one_of(st.none(), st.integers(0, 5)), st.integers(-9, 9))
OPERATION = st.one_of(
    st.tuples(st.just("apply"), st.lists(ROW, max_size=6), st.lists(KEY_VALUES, max_size=3)),
    st.tuples(st.just("filter_out"), st.integers(0, 5)),
    st.tuples(st.just("commit"), st.integers(1, 2), st.booleans()),
    st.tuples(st.just("reload")),
)


def model_apply(model: pl.DataFrame, upserts: pl.DataFrame, deletes: pl.DataFrame) -> pl.DataFrame:
    touched = pl.concat([upserts.select(KEYS), deletes])
    kept = model.join(touched, on=KEYS, how="anti", nulls_equal=True)
    return pl.concat([kept, upserts])


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    operations=st.lists(OPERATION, min_size=1, max_size=25),
    num_partitions=st.integers(1, 4),
    snapshot_every=st.integers(1, 4),
    retain=st.integers(1, 6),
    data=st.data(),
)
def test_random_histories_recover_like_the_model(
    operations: list[tuple],
    num_partitions: int,
    snapshot_every: int,
    retain: int,
    data: st.DataObject,
) -> None:
    storage = Storage(f"memory://test-state-model-{uuid.uuid4().hex}/op")
    options = {
        "num_key_groups": num_partitions,
        "snapshot_every": snapshot_every,
        "min_versions_to_retain": retain,
    }
    try:
        store = new_store(storage, **options)
        store.load(None)
        model = pl.DataFrame(schema=SCHEMA)
        expected: dict[int, pl.DataFrame] = {}
        version = -1
        for operation in operations:
            if operation[0] == "apply":
                upserts = rows(*[(k1, k2, t, v) for (k1, k2), t, v in operation[1]])
                deletes = keys(*operation[2])
                store.apply(upserts=upserts, deletes=deletes)
                model = model_apply(model, upserts, deletes)
            elif operation[0] == "filter_out":
                predicate = pl.col("t") <= operation[1]
                removed = store.filter_out(predicate)
                assert_same_rows(removed, model.filter(predicate))
                model = model.filter(~predicate.fill_null(False))
            elif operation[0] == "commit":
                version += operation[1]
                store.commit(version, snapshot=operation[2])
                expected[version] = model
            elif version >= 0:  # reload: a restart from the last commit
                store = new_store(storage, **options)
                store.load(version)
                model = expected[version]
            assert_same_rows(store.frame, model)
        version += 1
        store.commit(version)
        expected[version] = model
        retained = [v for v in expected if v > version - retain]
        for wanted in data.draw(st.lists(st.sampled_from(retained), min_size=1, max_size=4)):
            again = new_store(storage, **options)
            again.load(wanted)
            assert_same_rows(again.frame, expected[wanted])
        # stale or discarded versions never outlive a commit
        assert storage.list_numbered("versions")[-1] == version
    finally:
        remove(storage)
