"""The cost of one merge of a state store's tail into its sorted rows (``KeyedRows.compact``).

A store appends each batch's new rows to an unsorted tail (one chunk per batch) and,
once the tail is large, merges it into the sorted base: the spike in
``state_scaling.py --grow``'s max column. This times that merge alone: a sorted base of
``--rows`` rows (a state store's columns: key, sum, count, key hash, key group) and a
tail of ``--tail`` rows appended in batches of ``--batch`` rows, then one ``compact()``;
reported: seconds and the peak memory above the start of the merge (Linux ``VmHWM``,
reset before it), against the state's in-memory size.

    python benchmarks/keyed_rows_merge.py [--rows 6000000] [--tail 1000000]
        [--batch 10000] [--repeats 2]

``--grow N`` instead grows the rows a state store keeps from empty to N keys, batch by
batch as a ``group_by`` in update mode does (``--batch`` keys per batch: 80% new, 20%
already there; each batch looks its keys up, then replaces them), once as one
``KeyedRows`` (the store before its rows were sliced) and once as ``SlicedRows`` (the
store's rows now), and reports per batch: the median in the first and the last tenth,
the max, and the whole time.

    python benchmarks/keyed_rows_merge.py --grow 10000000
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import polars as pl

from microstream.state.keyed_rows import KeyedRows
from microstream.state.sliced_rows import SlicedRows


def _rows(rng: np.random.Generator, n: int) -> pl.DataFrame:
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64)
    return pl.DataFrame(
        {
            "key": rng.integers(0, 10**9, n),
            "v_sum": rng.integers(0, 100, n),
            "len": rng.integers(0, 100, n).astype(np.uint32),
            "__key_hash": hashes,
            "__key_group": (hashes >> np.uint64(57)).astype(np.uint16),
        }
    )


def _peak_mb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) // 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def merge_once(rows: int, tail: int, batch: int, seed: int) -> dict[str, float]:
    """Build the store's rows, append the tail batch by batch, time one merge."""
    rng = np.random.default_rng(seed)
    store = KeyedRows(
        _rows(rng, rows),
        key_columns=["key"],
        hash_column="__key_hash",
        num_partitions=128,
        group_column="__key_group",
        sorted_by_group=True,
        tail_rows=10**12,  # (no merge before the timed one)
    )
    for _ in range(tail // batch):
        store.append(_rows(rng, batch))
    gc.collect()
    _reset_peak()
    start_mb = _peak_mb()
    started = time.perf_counter()
    store.compact()
    seconds = time.perf_counter() - started
    return {
        "seconds": round(seconds, 3),
        "peak_above_start_mb": _peak_mb() - start_mb,
        "state_mb": store.estimated_size() // 2**20,
    }


def _keyed_rows(keys: np.ndarray) -> pl.DataFrame:
    """A state store's rows of ``keys`` (its hash: the key group in the top 16 bits)."""
    hashes = pl.Series(keys).hash(seed=1).to_numpy()
    groups = (hashes % np.uint64(128)).astype(np.uint16)
    return pl.DataFrame(
        {
            "key": keys,
            "v_sum": np.ones(keys.size, dtype=np.int64),
            "len": np.ones(keys.size, dtype=np.uint32),
            "__key_hash": groups.astype(np.uint64) * np.uint64(1 << 48) + (hashes >> np.uint64(16)),
            "__key_group": groups,
        }
    )


def grow(kind: str, keys: int, batch: int, seed: int) -> dict[str, object]:
    """Per-batch time of lookup + replace while the rows grow to ``keys`` keys."""
    rng = np.random.default_rng(seed)
    empty = _keyed_rows(np.arange(0))
    store: KeyedRows | SlicedRows
    if kind == "keyed":
        store = KeyedRows(
            empty,
            key_columns=["key"],
            hash_column="__key_hash",
            num_partitions=128,
            group_column="__key_group",
            sorted_by_group=True,
        )
    else:
        store = SlicedRows(
            empty,
            key_columns=["key"],
            hash_column="__key_hash",
            group_column="__key_group",
            num_groups=128,
        )
    new_per_batch = batch * 4 // 5
    times, held = [], 0
    while held < keys:
        old = np.unique(rng.integers(0, held, batch - new_per_batch)) if held else np.arange(0)
        rows = _keyed_rows(np.concatenate([np.arange(held, held + new_per_batch), old]))
        held += new_per_batch
        started = time.perf_counter()
        found = rows.select("key", "__key_hash", "__key_group")
        store.rows_of(found)
        store.replace(found, rows)
        times.append((time.perf_counter() - started) * 1000)
    ms = np.asarray(times)
    tenth = max(ms.size // 10, 1)
    return {
        "rows": kind,
        "keys": store.height,
        "batches": ms.size,
        "first_tenth_median_ms": round(float(np.median(ms[:tenth])), 2),
        "last_tenth_median_ms": round(float(np.median(ms[-tenth:])), 2),
        "median_ms": round(float(np.median(ms)), 2),
        "max_ms": round(float(ms.max()), 1),
        "seconds": round(float(ms.sum()) / 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--tail", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--grow", type=int, default=0, help="keys: time batches, not a merge")
    args = parser.parse_args()
    if args.grow:
        for repeat in range(args.repeats):
            for kind in ("keyed", "sliced"):
                print(json.dumps(grow(kind, args.grow, args.batch, seed=repeat)))
        return
    for repeat in range(args.repeats):
        result = merge_once(args.rows, args.tail, args.batch, seed=repeat)
        print(json.dumps({"rows": args.rows, "tail": args.tail, **result}))


if __name__ == "__main__":
    main()
