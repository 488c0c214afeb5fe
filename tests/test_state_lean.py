"""The state store's lean per-batch path: one hash per row, no copy of a conforming
frame, and state written before these changes loading and continuing."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from microstream.checkpoint.storage import Storage
from microstream.exceptions import SchemaMismatchError
from microstream.state.key_groups import key_groups, stable_hash
from microstream.state.store import StateStore
from microstream.state.store_checks import conform
from microstream.state.store_rows import HASH, KG, hashed

FIXTURE = Path(__file__).parent / "data" / "state_before_lean"


def _fixture_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "state_before_lean", FIXTURE / "make_lean_fixture.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fixture = _fixture_module()


def canon(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(frame.columns, nulls_last=True)


def fresh(make: Callable[[Storage], StateStore], batch: Any, versions: range) -> StateStore:
    """The same history written from scratch by this checkout (in memory)."""
    store = make(Storage(f"memory://state-lean-{id(versions)}-{make.__name__}/s"))
    store.load(None)
    for v in versions:
        batch(store, v)
        store.commit(v)
    return store


STORES = [
    ("store_join", fixture.join_store, fixture.join_batch),
    ("store_agg", fixture.agg_store, fixture.agg_batch),
]


@pytest.mark.parametrize(("name", "make", "batch"), STORES)
def test_state_written_before_loads_and_continues(
    name: str, make: Callable[[Storage], StateStore], batch: Any, tmp_path: Path
) -> None:
    # Written by main before the in-memory hash came from the stable hash: every retained
    # version loads with the rows this checkout builds for the same history, and the
    # store continues from it (upserts replace the loaded rows, never duplicate them).
    shutil.copytree(FIXTURE / name, tmp_path / name)
    storage = Storage(tmp_path / name)
    for version in (9, 6, 3):
        store = make(storage)
        store.load(version)
        expected = fresh(make, batch, range(version + 1)).frame
        assert store.rows == expected.height > 0
        assert_frame_equal(canon(store.frame), canon(expected))
    store = make(storage)
    store.load(9)
    for v in range(10, 15):
        batch(store, v)
        store.commit(v)
    expected = fresh(make, batch, range(15))
    assert_frame_equal(canon(store.frame), canon(expected.frame))
    assert store.rows_per_key_group() == expected.rows_per_key_group()
    again = make(storage)
    again.load(14)
    assert_frame_equal(canon(again.frame), canon(expected.frame))
    again.load(11)
    assert_frame_equal(canon(again.frame), canon(fresh(make, batch, range(12)).frame))


def test_the_in_memory_hash_is_the_stable_hash() -> None:
    frame = pl.DataFrame({"k": [1, 2, None, 1], "s": ["a", "b", "c", "d"]})
    out = hashed(frame, ["k"], 8, seed=0x6D73)
    assert out.columns == ["k", "s", HASH, KG]
    assert out[KG].to_list() == key_groups(frame, ["k"], 8).tolist()
    stable = stable_hash(frame, ["k"])
    low = (stable >> np.uint64(16)) ^ np.uint64(0x6D73)
    assert out[HASH].to_numpy().tolist() == ((stable % 8 << 48) | low).tolist()
    assert out[HASH][0] == out[HASH][3] != out[HASH][1]
    # (an earlier hash and key group, e.g. of rows read back, are replaced)
    again = hashed(out.with_columns(pl.lit(7, pl.UInt16).alias(KG)), ["k"], 8, seed=0x6D73)
    assert_frame_equal(again, out)


def test_a_batch_never_calls_polars_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    # One hash per row: the stable hash gives the key group and the in-memory hash.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Polars' hash was called")

    monkeypatch.setattr(pl.Expr, "hash", refuse)
    monkeypatch.setattr(pl.Series, "hash", refuse)
    monkeypatch.setattr(pl.DataFrame, "hash_rows", refuse)
    storage = Storage("memory://state-lean-no-polars-hash/s")
    store = fixture.join_store(storage)
    store.load(None)
    for v in range(6):
        fixture.join_batch(store, v)
        store.commit(v)
    agg = fixture.agg_store(Storage("memory://state-lean-no-polars-hash/a"))
    agg.load(None)
    for v in range(6):
        fixture.agg_batch(agg, v)
        agg.commit(v)
    monkeypatch.undo()
    assert_frame_equal(
        canon(store.frame), canon(fresh(fixture.join_store, fixture.join_batch, range(6)).frame)
    )
    assert_frame_equal(
        canon(agg.frame), canon(fresh(fixture.agg_store, fixture.agg_batch, range(6)).frame)
    )


def test_reload_never_calls_polars_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    storage = Storage("memory://state-lean-reload/s")
    store = fixture.join_store(storage)
    store.load(None)
    for v in range(7):
        fixture.join_batch(store, v)
        store.commit(v)
    monkeypatch.setattr(pl.Expr, "hash", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    again = fixture.join_store(storage)
    again.load(6)
    assert_frame_equal(canon(again.frame), canon(store.frame))


SCHEMA = pl.Schema({"k": pl.Int64, "s": pl.String})


def test_conform_returns_a_conforming_frame_itself() -> None:
    frame = pl.DataFrame({"k": [1], "s": ["a"]})
    assert conform(SCHEMA, "op", frame, "rows", ["k", "s"], exact=True) is frame
    reordered = conform(SCHEMA, "op", frame.select("s", "k"), "rows", ["k", "s"], exact=True)
    assert reordered.columns == ["k", "s"]
    assert_frame_equal(reordered, frame)
    nulls = conform(
        SCHEMA, "op", pl.DataFrame({"k": [None], "s": ["a"]}), "rows", ["k", "s"], exact=True
    )
    assert nulls.schema == SCHEMA
    with pytest.raises(SchemaMismatchError, match=r"wrong dtypes \(k: Int32 instead of Int64\)"):
        conform(SCHEMA, "op", frame.cast({"k": pl.Int32}), "rows", ["k", "s"], exact=True)
    with pytest.raises(SchemaMismatchError, match=r"unexpected columns \['x'\]"):
        conform(SCHEMA, "op", frame.with_columns(x=1), "rows", ["k", "s"], exact=True)


# -- a few keys without query plans ---------------------------------------------------------


def count_query_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every eager Polars call that builds and runs a query plan."""
    calls = [0]
    collect = pl.LazyFrame._collect_eager

    def counting(self: pl.LazyFrame, *args: Any, **kwargs: Any) -> pl.DataFrame:
        calls[0] += 1
        return collect(self, *args, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "_collect_eager", counting)
    return calls


def test_a_batch_of_one_key_runs_no_query_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    # The windowed pipeline's batch: fold one key (stored), look it up, commit a delta.
    # Main ran ~24 query plans here (hash, casts, selects, eq_missing, filter, sort), each
    # ~50-100 us on a loaded 2-core machine.
    store = fixture.agg_store(Storage("memory://state-lean-plans/a"))
    store.load(None)
    start = pl.datetime(2026, 1, 1, time_unit="us")
    names = [f"n{i}" for i in range(300)]
    base = pl.select(name=pl.Series(names), w=start, n=pl.lit(1, pl.Int64))
    store.apply(upserts=base)
    store.commit(1)
    one = base.slice(7, 1)
    plus = one.with_columns(pl.col("n") + 1)
    calls = count_query_plans(monkeypatch)
    for version in range(2, 9):  # (no version divisible by snapshot_every: deltas only)
        merged = store.fold(one, lambda old, new: plus)
        found = store.lookup(pl.DataFrame([one["name"], one["w"]]))
        store.commit(version)
        assert merged is plus
        assert found.rows() == plus.rows()
    store.insert(pl.DataFrame({"name": ["new"], "w": one["w"], "n": [5]}))
    store.commit(9)
    assert calls[0] == 0
    monkeypatch.undo()
    expected = pl.concat(
        [
            base.filter(pl.col("name") != "n7"),
            plus,
            store.lookup(pl.DataFrame({"name": ["new"], "w": one["w"]})),
        ]
    )
    assert_frame_equal(canon(store.frame), canon(expected))
    again = fixture.agg_store(Storage("memory://state-lean-plans/a"))
    again.load(9)
    assert_frame_equal(canon(again.frame), canon(expected))


NS = pl.Datetime("ns")


@pytest.mark.parametrize(
    ("dtype", "values"),
    [
        (NS, [1, 2, None]),  # Python's datetimes would make 1 ns and 2 ns equal
        (pl.Float64, [float("nan"), 0.0, -0.0]),  # Python: nan != nan
        (pl.Time, [1, 2, None]),
        (pl.String, ["a", "b", None]),
        (pl.Datetime("ms"), [1, 2, None]),
        (pl.Int16, [-1, 1, None]),
    ],
)
def test_a_few_keys_sharing_a_hash_are_told_apart_as_polars_does(
    dtype: pl.DataType, values: list[Any]
) -> None:
    from microstream.state.keyed_rows import KeyProbe

    column = (
        pl.Series("k", values).cast(pl.Int64).cast(dtype)
        if dtype in (NS, pl.Time, pl.Datetime("ms"))
        else pl.Series("k", values, dtype=dtype)
    )
    rows = pl.DataFrame([column, pl.Series("h", [9, 9, 9], dtype=pl.UInt64)])
    hashes = rows["h"].to_numpy()
    for i in range(3):
        probe = KeyProbe(rows.slice(i, 1), ["k"], "h")
        found = probe.confirm(rows, hashes, np.arange(3)).tolist()
        # (Polars: NaN equals NaN, 0.0 equals -0.0, null equals null)
        expected = [
            j for j in range(3) if rows["k"].slice(j, 1).eq_missing(rows["k"].slice(i, 1)).item()
        ]
        assert found == expected
        assert i in found


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("height", [40, 9_000])  # (slices of a small frame; a filter)
def test_rows_without_positions(seed: int, height: int) -> None:
    from microstream.state.keyed_rows import _without

    rng = np.random.default_rng(seed)
    frame = pl.DataFrame({"a": np.arange(height), "b": [str(i) for i in range(height)]})
    for removed in (0, 1, 2, 16, 17, 39, 40):
        at = rng.choice(height, size=removed, replace=False)
        keep = np.setdiff1d(np.arange(height), at)
        out = _without(frame, at)
        assert_frame_equal(out, frame[pl.Series(keep)] if keep.size else frame.clear())
        assert height <= 8_192 or out.n_chunks() == 1


@pytest.mark.parametrize(
    "dtype",
    [
        pl.Int8,
        pl.Int16,
        pl.Int32,
        pl.Int64,
        pl.UInt8,
        pl.UInt16,
        pl.UInt32,
        pl.UInt64,
        pl.Boolean,
        pl.Date,
        pl.Datetime("ns"),
        pl.Datetime("us", "Europe/Paris"),
        pl.Datetime("ms"),
        pl.Duration("us"),
        pl.Duration("ns"),
        pl.Time,
    ],
)
def test_the_stable_hash_of_values_without_nulls_is_unchanged(dtype: pl.DataType) -> None:
    # Values without nulls are read straight from numpy; with a null, the general path
    # (Polars' cast and fill_null). The values' hashes must agree: the key group is on disk.
    raw = pl.Series("k", [0, 1, 2, 3, 100, 2**31 - 1], dtype=pl.Int64)
    if dtype == pl.Boolean:
        values = pl.Series("k", [True, False, True, False, True, True])
    elif dtype.is_integer():
        values = raw.cast(dtype, strict=False).fill_null(7)
        values = (
            values if not dtype.is_signed_integer() else values * -1 if dtype != pl.Int8 else values
        )
    else:
        values = raw.cast(dtype)
    with_null = values.extend_constant(None, 1)
    plain = stable_hash(pl.DataFrame([values]), ["k"])
    general = stable_hash(pl.DataFrame([with_null]), ["k"])[:-1]
    assert plain.tolist() == general.tolist()
