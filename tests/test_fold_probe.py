"""A fold's probe: the batch's key hashes sorted once, shared by the search and the
placing of the rows found (``key_positions``), with the same rows and positions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microstream.checkpoint.storage import Storage
from microstream.state import keyed_rows
from microstream.state.sliced_rows import SlicedRows
from microstream.state.store import StateStore
from microstream.state.store_rows import HASH, KG, POSITION, hashed, key_positions

SCHEMA = pl.Schema({"k": pl.String, "w": pl.Int64, "n": pl.Int64})


def count_probes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one per :class:`KeyProbe` built."""
    built: list[int] = []
    original = keyed_rows.KeyProbe.__init__

    def counted(self: keyed_rows.KeyProbe, *args: object, **kwargs: object) -> None:
        built.append(1)
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(keyed_rows.KeyProbe, "__init__", counted)
    return built


def test_a_fold_by_position_sorts_the_batch_hashes_once_and_places_every_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = StateStore(
        Storage("memory://fold-probe-once/s"),
        operator="fold",
        key_columns=["k", "w"],
        hash_columns=["k"],
        schema=SCHEMA,
        num_key_groups=8,
        one_row_per_key=True,
    )
    store.load(None)
    rng = np.random.default_rng(7)
    windows = rng.integers(0, 3, 3000).tolist()
    stored = pl.DataFrame(
        {"k": [f"k{i}" for i in range(3000)], "w": windows, "n": range(3000)}, schema=SCHEMA
    )
    store.apply(upserts=stored)
    store.commit(0)
    picked = rng.permutation(6000)[:2500]  # half of them stored, half new
    batch = pl.DataFrame(
        {
            "k": [f"k{i}" for i in picked],
            "w": [windows[i] if i < stored.height else 0 for i in picked],
            "n": [1] * picked.size,
        },
        schema=SCHEMA,
    )
    seen: list[pl.DataFrame] = []

    def merge(old: pl.DataFrame, fresh: pl.DataFrame) -> pl.DataFrame:
        seen.append(old)
        return fresh

    built = count_probes(monkeypatch)
    store.fold(batch, merge, positions=True)
    monkeypatch.undo()
    assert len(built) == 1  # (main: a second probe of the same keys in key_positions)
    (old,) = seen
    row_of = {(k, w): i for i, (k, w) in enumerate(batch.select("k", "w").rows())}
    assert old.height == int((picked < stored.height).sum())
    for k, w, at in old.select("k", "w", POSITION).rows():
        assert row_of[(k, w)] == at


def frame_of(keys: list[tuple[int, int]]) -> pl.DataFrame:
    frame = pl.DataFrame(keys, schema={"k": pl.Int64, "w": pl.Int64}, orient="row")
    return hashed(frame.with_columns(v=pl.col("k") * 10 + pl.col("w")), ["k"], 16, 0, ["k", "w"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stored=st.sets(st.tuples(st.integers(0, 60), st.integers(0, 2)), max_size=120),
    wanted=st.sets(st.tuples(st.integers(0, 80), st.integers(0, 2)), min_size=1, max_size=60),
    slice_rows=st.sampled_from([4, 16, 1_000]),
)
def test_sliced_rows_share_their_probe_with_key_positions(
    stored: set[tuple[int, int]], wanted: set[tuple[int, int]], slice_rows: int
) -> None:
    rows = SlicedRows(
        frame_of(sorted(stored)),
        key_columns=["k", "w"],
        hash_column=HASH,
        group_column=KG,
        num_groups=16,
        slice_rows=slice_rows,
        group_shift=48,
    )
    keys = frame_of(sorted(wanted)).drop("v")
    found = rows.rows_of(keys)
    probe = rows.probe(keys)
    assert rows.probe(keys) is probe  # (the memo: the same frame, the same probe)
    assert sorted(found.select("k", "w").rows()) == sorted(stored & wanted)
    at = key_positions(keys, found, ["k", "w"], probe)
    assert at.tolist() == key_positions(keys, found, ["k", "w"]).tolist()
    key_rows = keys.select("k", "w").rows()
    assert [key_rows[i] for i in at] == found.select("k", "w").rows()
