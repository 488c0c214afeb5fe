"""The interval join slice's second round: the two pieces of a segment buffer's commit it
changed, timed alternately in one process (wall and process CPU µs per call, Polars'
threads included; median of 7 rounds of 200 calls): a q8-sized marks file (220 rows) encoded by Polars and by pyarrow, and the rows
per key group of a q3/q8-sized buffer (15 segments of 1,150 rows, 128 key groups) counted
from every segment and from the per-segment counts; and a buffer's columns picked from
its segments' concatenation (20 segments of 1,000 rows, as q3's whole buffer each batch)
by ``select`` and by ``frame[names]``.

    PYTHONPATH=CHECKOUT python commit_pieces.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import polars as pl

from microstream.state.format import encode_frame

COLUMNS = ["id", "name", "city", "t"]


def per_call_us(fn: Callable[[], object], calls: int = 200) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    return (
        (time.perf_counter() - wall) / calls * 1e6,
        (time.process_time() - cpu) / calls * 1e6,
    )


def main() -> None:
    rng = np.random.default_rng(0)
    marks = pl.DataFrame(
        {
            "row_id": rng.integers(0, 1 << 40, 220),
            "__kg": rng.integers(0, 128, 220).astype(np.uint16),
            "__removed": rng.random(220) < 0.5,
        }
    )
    segments = [rng.integers(0, 128, 1150).astype(np.uint16) for _ in range(15)]
    frames = [pl.DataFrame({"kg": s}) for s in segments]
    cached = [np.bincount(s, minlength=128) for s in segments]

    def recount() -> list[int]:
        counts = np.zeros(128, dtype=np.int64)
        for f in frames:
            counts += np.bincount(f.get_column("kg").to_numpy(), minlength=128)
        return [int(c) for c in counts]

    def summed() -> list[int]:
        counts = np.zeros(128, dtype=np.int64)
        for c in cached:
            counts += c
        return counts.tolist()

    assert recount() == summed()
    rows = pl.DataFrame(
        {
            "id": np.arange(1000),
            "name": [f"n{i}" for i in range(1000)],
            "city": ["c"] * 1000,
            "t": np.arange(1000),
            "__kg": np.zeros(1000, dtype=np.uint16),
        }
    )
    buffer = [rows] * 20

    def by_select() -> pl.DataFrame:
        return pl.concat(buffer, how="vertical", rechunk=False).select(COLUMNS)

    def by_names() -> pl.DataFrame:
        return pl.concat(buffer, how="vertical", rechunk=False)[COLUMNS]

    assert by_select().equals(by_names())
    cases = {
        "marks file, Polars write_ipc": lambda: encode_frame(marks, None, pyarrow_io=False),
        "marks file, pyarrow": lambda: encode_frame(marks, None, pyarrow_io=True),
        "rows per key group, counted": recount,
        "rows per key group, per-segment counts": summed,
        "a buffer's columns, select": by_select,
        "a buffer's columns, frame[names]": by_names,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(7):
        for name, fn in cases.items():
            results[name].append(per_call_us(fn))
    for name, values in results.items():
        wall = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"{name}: {wall:.0f} µs wall, {cpu:.0f} µs CPU per call (medians of 7)")


if __name__ == "__main__":
    main()
