"""Writes ``store/``: a format-2 state store as microstream wrote it before snapshots were
spread over key-group slices (full snapshots at versions 0 and 4, deltas 1-3, 5, 6).

Made with the code of main at d1493a1, from this directory::

    PYTHONPATH=<checkout of d1493a1> python make_fixture.py

``tests/test_state_rotation.py`` loads it with today's code and continues it; the
batches are ``batch`` in that test module (repeated here so that this script runs alone).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.state.store import StateStore

SCHEMA = pl.Schema({"k": pl.Int64, "v": pl.Int64})


def batch(version: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    ks = sorted({(version * 7 + j) % 50 for j in range(20)})
    upserts = pl.DataFrame({"k": ks, "v": [version * 100 + k for k in ks]}, schema=SCHEMA)
    deletes = pl.DataFrame({"k": [(version * 3 + 1) % 50]}, schema={"k": pl.Int64})
    return upserts, deletes.filter(~pl.col("k").is_in(ks))


def main() -> None:
    root = Path(__file__).parent / "store"
    shutil.rmtree(root, ignore_errors=True)
    store = StateStore(
        Storage(root),
        operator="op0/counts",
        key_columns=["k"],
        schema=SCHEMA,
        num_key_groups=8,
        snapshot_every=4,
    )
    store.load(None)
    for version in range(7):
        upserts, deletes = batch(version)
        store.apply(upserts=upserts, deletes=deletes)
        store.commit(version)


if __name__ == "__main__":
    main()
