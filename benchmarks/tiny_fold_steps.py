"""The window operator's own time on 1-row batches, in-process, step by step (target 3).

The operator of ``batch_overhead.py --pipeline files-window-delta`` (tumbling 1-minute
``group_by_dynamic`` on ``ts`` by ``key``, count and sum, append mode) fed N 1-row
batches directly: no source, sink, checkpoint files or driver, so the figures move
with the operator's code only (its state commits go to an in-memory filesystem).
Each step below ``process`` is timed by wrapping the function (~1 us a call);
medians over the second half of the batches.

    python benchmarks/tiny_fold_steps.py [--batches 2000]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import polars as pl

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.operators import aggregation
from microstream.plan.nodes import OperatorContext
from microstream.state import sliced_rows, store

SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "key": pl.Int64(), "v": pl.Float64()})
STEPS: list[tuple[Any, str]] = [
    (aggregation.AggregationOperator, "_prepare"),
    (aggregation.AggregationOperator, "_update_state"),
    (aggregation.AggregationOperator, "_emit"),
    (store.StateStore, "fold"),
    (store.StateStore, "commit"),
    (store, "hashed"),
    (store, "key_positions"),
    (store, "same_keys"),
    (store, "upserted"),
    (store, "_project"),
    (sliced_rows.SlicedRows, "rows_of"),
    (sliced_rows.SlicedRows, "replace"),
    (aggregation, "_group_by"),
    (aggregation, "_merge_by_position"),
    (aggregation, "tumbling_pairs"),  # (where the branch has them)
    (getattr(aggregation, "TinyFold", None), "partials"),
    (getattr(aggregation, "TinyFold", None), "merge"),
]


def wrap(owner: Any, name: str, times: dict[str, list[float]]) -> None:
    if owner is None or not hasattr(owner, name):
        return
    method: Callable[..., Any] = getattr(owner, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            times[name].append(time.perf_counter() - t0)

    setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2000)
    args = parser.parse_args()
    n = args.batches
    times: dict[str, list[float]] = collections.defaultdict(list)
    for owner, name in STEPS:
        wrap(owner, name, times)
    node = (
        ms.MemoryStream(SCHEMA, name="tiny")
        .lazy()
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="key")
        .agg(pl.len(), pl.col("v").sum())
    ).plan
    operator = node.build_operator(  # type: ignore[attr-defined]
        "op0", Storage(f"memory://tiny-fold-{uuid.uuid4().hex}")
    )
    operator.use_key_groups(128)
    operator.load(None)
    start, epoch = dt.datetime(2024, 1, 1), dt.datetime(1970, 1, 1)
    process, commit = [], []
    for i in range(n):
        now = start + dt.timedelta(seconds=i)
        row = pl.DataFrame({"ts": [now], "key": [i % 3], "v": [float(i)]}, schema=SCHEMA)
        wm = int((now - dt.timedelta(seconds=10) - epoch).total_seconds() * 1_000_000)
        ctx = OperatorContext(
            batch_id=i, late_watermark_us=wm - 1_000_000, watermark_us=wm, output_mode="append"
        )
        t0 = time.perf_counter()
        operator.process((row,), ctx)
        t1 = time.perf_counter()
        operator.commit(i)
        process.append(t1 - t0)
        commit.append(time.perf_counter() - t1)

    def median_ms(values: list[float]) -> float:
        return round(statistics.median(values[len(values) // 2 :]) * 1000, 3)

    result = {
        "batches": n,
        "process_median_ms": median_ms(process),
        "commit_median_ms": median_ms(commit),
        "steps (calls per batch, median ms)": {
            name: [round(len(values) / n, 2), median_ms(values)]
            for name, values in sorted(times.items(), key=lambda kv: -median_ms(kv[1]))
        },
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
