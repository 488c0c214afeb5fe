"""The state store's per-batch calls alone, as the join and windowed operators make them.

Two stores, on local files (a temporary directory), no engine:

- *join buffer* (q3's): key columns (join key, row id), hashed on the join key, one row
  per key; per batch: ``insert`` of ``--join-rows`` new rows, ``lookup`` of 1,000 join
  keys (every buffered row of those keys; the same rows as a semi join of
  ``StateStore.frame`` with the keys, also timed: what ``operators/stream_join.py``'s
  ``_buffered`` does today), ``apply`` of 50 found rows with their flag set (the first
  match), ``commit``; 22 batches (q3's), median of ``--repeats`` runs of each phase's
  mean per batch;
- *window state* (the 1-row windowed pipeline's): key columns (key, window start),
  1,000 keys; per batch: ``fold`` of one stored key, ``commit``; 200 batches; and one
  small Polars query per batch (``select`` of one row) as the yardstick of the machine.

    python benchmarks/state_store_ops.py [--repeats 5] [--join-rows 2000] [--out FILE]

Figures are milliseconds per batch; compare runs of two checkouts alternating
(``PYTHONPATH`` at each), the machine's load moves them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime

import numpy as np
import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.state.store import StateStore

JOIN_SCHEMA = pl.Schema(
    {
        "seller": pl.Int64,
        "id": pl.Int64,
        "cat": pl.Int64,
        "ts": pl.Datetime("ms"),
        "__row_id": pl.Int64,
        "__matched": pl.Boolean,
    }
)
WINDOW_SCHEMA = pl.Schema(
    {"key": pl.String, "__start": pl.Datetime("us"), "n": pl.Int64, "s": pl.Float64}
)


def _lap(times: dict[str, float], name: str, start: float) -> float:
    """Add the time since ``start`` to ``times[name]``; returns now."""
    now = time.perf_counter()
    times[name] = times.get(name, 0.0) + now - start
    return now


def join_buffer(root: str, rows: int, batches: int = 22) -> dict[str, float]:
    store = StateStore(
        Storage(root),
        operator="join",
        key_columns=["seller", "__row_id"],
        hash_columns=["seller"],
        one_row_per_key=True,
        schema=JOIN_SCHEMA,
    )
    store.load(None)
    rng = np.random.default_rng(1)
    times: dict[str, float] = {}
    for b in range(batches):
        ids = np.arange(rows) + b * rows
        new = pl.DataFrame(
            {
                "seller": rng.integers(0, 40_000, rows),
                "id": ids,
                "cat": rng.integers(0, 10, rows),
                "ts": pl.Series(ids).cast(pl.Datetime("ms")),
                "__row_id": ids,
                "__matched": np.zeros(rows, dtype=bool),
            },
            schema=JOIN_SCHEMA,
        )
        keys = pl.DataFrame({"seller": rng.integers(0, 40_000, 1_000)})
        t = time.perf_counter()
        store.insert(new)
        t = _lap(times, "insert", t)
        found = store.lookup(keys)
        t = _lap(times, "lookup", t)
        semi = store.frame.join(keys, on="seller", how="semi")
        _lap(times, "semi_join", t)
        assert found.height == semi.height
        first = found.head(50).with_columns(pl.lit(True).alias("__matched"))
        t = time.perf_counter()
        store.apply(upserts=first)
        t = _lap(times, "apply", t)
        store.commit(b)
        _lap(times, "commit", t)
    return {k: v / batches * 1e3 for k, v in times.items()}


def window_state(root: str, batches: int = 200) -> dict[str, float]:
    store = StateStore(
        Storage(root), operator="window", key_columns=["key", "__start"], schema=WINDOW_SCHEMA
    )
    store.load(None)
    base = pl.DataFrame(
        {
            "key": [f"k{i}" for i in range(1_000)],
            "__start": [datetime(2026, 1, 1)] * 1_000,
            "n": [1] * 1_000,
            "s": [1.0] * 1_000,
        },
        schema=WINDOW_SCHEMA,
    )
    store.apply(upserts=base)
    store.commit(0)
    times: dict[str, float] = {}
    for v in range(1, batches + 1):
        one = base.slice(v % 1_000, 1)
        t = time.perf_counter()
        store.fold(one, lambda old, new: new)
        t = _lap(times, "fold", t)
        store.commit(v)
        t = _lap(times, "commit", t)
        one.select(pl.col("n") + 1)
        _lap(times, "polars_query", t)
    return {k: v / batches * 1e3 for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--join-rows", type=int, default=2_000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result: dict[str, dict[str, float]] = {}
    for name, run in (
        ("join_buffer", lambda root: join_buffer(root, args.join_rows)),
        ("window_state", window_state),
    ):
        runs = []
        for _ in range(args.repeats):
            root = tempfile.mkdtemp(prefix="ms-state-ops-")
            try:
                runs.append(run(root))
            finally:
                shutil.rmtree(root, ignore_errors=True)
        result[name] = {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}
    text = json.dumps({"benchmark": "state_store_ops", "ms_per_batch": result}, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
