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
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import polars as pl

from microstream.state.keyed_rows import KeyedRows


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=6_000_000)
    parser.add_argument("--tail", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    for repeat in range(args.repeats):
        result = merge_once(args.rows, args.tail, args.batch, seed=repeat)
        print(json.dumps({"rows": args.rows, "tail": args.tail, **result}))


if __name__ == "__main__":
    main()
