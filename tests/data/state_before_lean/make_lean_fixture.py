"""Write the fixture: two state stores' versions 0-9, by the code of the checkout on PYTHONPATH.

``store_join`` and ``store_agg`` were written by main at ``cda1677`` (the in-memory hash
was Polars' hash then); ``tests/test_state_lean.py`` loads them and continues them.
Run from the repository root: ``PYTHONPATH=$PWD python tests/data/state_before_lean/make_lean_fixture.py``.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.state.store import StateStore

HERE = Path(__file__).parent
START = datetime(2026, 1, 1)
JOIN_SCHEMA = pl.Schema(
    {"k": pl.Int64, "row": pl.Int64, "s": pl.String, "t": pl.Datetime("us"), "m": pl.Boolean}
)
AGG_SCHEMA = pl.Schema({"name": pl.String, "w": pl.Datetime("us"), "n": pl.Int64})


def join_store(storage: Storage, **options: Any) -> StateStore:
    """The join buffer the fixture was written with (``options``: more store options)."""
    return StateStore(
        storage,
        operator="join",
        key_columns=["k", "row"],
        hash_columns=["k"],
        one_row_per_key=True,
        schema=JOIN_SCHEMA,
        num_key_groups=8,
        snapshot_every=4,
        **options,
    )


def agg_store(storage: Storage) -> StateStore:
    return StateStore(
        storage, operator="agg", key_columns=["name", "w"], schema=AGG_SCHEMA, num_key_groups=8
    )


def join_batch(store: StateStore, v: int) -> None:
    """Version ``v``'s changes to a join buffer: inserts, a few rows flagged, an eviction."""
    rows = pl.DataFrame(
        {
            "k": [(v * 7 + i) % 13 for i in range(20)],
            "row": [v * 100 + i for i in range(20)],
            "s": [f"s{v}-{i}" for i in range(20)],
            "t": [START + timedelta(seconds=10 * v + i) for i in range(20)],
            "m": [False] * 20,
        },
        schema=JOIN_SCHEMA,
    )
    store.insert(rows)
    flagged = store.lookup(pl.DataFrame({"k": [v % 13]})).sort("row").head(3)
    store.apply(upserts=flagged.with_columns(pl.lit(True).alias("m")))
    store.filter_out(pl.col("t") < START + timedelta(seconds=10 * (v - 3)))


def agg_batch(store: StateStore, v: int) -> None:
    """Version ``v``'s changes to a window aggregation: a fold of counts, a deletion."""
    rows = pl.DataFrame(
        {
            "name": [f"n{(v + i) % 9}" for i in range(6)],
            "w": [START + timedelta(minutes=v // 3)] * 6,
            "n": list(range(1, 7)),
        },
        schema=AGG_SCHEMA,
    )

    def merge(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
        both = new.join(old, on=["name", "w"], how="left", suffix="_old")
        total = pl.col("n") + pl.col("n_old").fill_null(0)
        return both.select("name", "w", total.alias("n"))

    store.fold(rows, merge)
    if v % 3 == 2:
        store.apply(deletes=pl.DataFrame({"name": [f"n{v % 9}"], "w": [rows["w"][0]]}))


def write(root: Path, versions: range) -> None:
    for name, make, batch in (
        ("store_join", join_store, join_batch),
        ("store_agg", agg_store, agg_batch),
    ):
        store = make(Storage(root / name))
        store.load(None)
        for v in versions:
            batch(store, v)
            store.commit(v)


if __name__ == "__main__":
    for name in ("store_join", "store_agg"):
        shutil.rmtree(HERE / name, ignore_errors=True)
    write(HERE, range(10))
