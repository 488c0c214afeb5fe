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
    spec = importlib.util.spec_from_file_location("state_before_lean", FIXTURE / "make_fixture.py")
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
