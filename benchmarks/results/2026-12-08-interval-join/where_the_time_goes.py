"""The interval join slice's "where the time goes": the join operator's and its buffers'
methods timed (wall ms over a run's batches, the minimum of N runs in one process).

    python where_the_time_goes.py CHECKOUT N DATA BOUND_MINUTES TAG

``CHECKOUT`` is the worktree whose ``benchmarks/stream_join.py`` runs (put it on
``PYTHONPATH`` too), ``DATA`` a directory ``stream_join_cpu.py`` generated; checkpoints go
under ``/tmp/interval-join-data/par`` and are removed after each run. Methods a checkout
does not have (``_buffered`` before, ``_candidates`` after) are skipped.
"""

from __future__ import annotations

import collections
import functools
import glob
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, sys.argv[1] + "/benchmarks")
import stream_join  # (benchmarks/ of CHECKOUT)

from microstream.operators import stream_join as operator
from microstream.state import segment_buffer

CHECKPOINTS = "/tmp/interval-join-data/par"
spent: dict[str, float] = collections.defaultdict(float)


def timed(cls: type, name: str, label: str) -> None:
    method: Callable[..., Any] = getattr(cls, name)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start

    setattr(cls, name, wrapper)


def main() -> None:
    join = operator.StreamJoinOperator
    for name in ("process_sides", "_buffered", "_candidates", "_pairs", "_emit", "_evict"):
        if hasattr(join, name):
            timed(join, name, name)
    for name in ("_arrivals", "commit"):
        timed(join, name, name)
    buffer = segment_buffer.SegmentBuffer
    for name in ("insert", "mark", "evict_through", "drop_through"):
        if hasattr(buffer, name):
            timed(buffer, name, f"buf.{name}")
    root, bound, runs = Path(sys.argv[3]), int(sys.argv[4]), []
    for _ in range(int(sys.argv[2])):
        spent.clear()
        _, _, detail = stream_join.run_microstream(root, CHECKPOINTS, bound)
        for phase in ("compute", "commit", "total"):
            spent[f"phase {phase}"] = detail["phase_totals_ms"][phase] / 1000
        runs.append(dict(spent))
        for path in glob.glob(f"{CHECKPOINTS}/ms-join-*"):
            shutil.rmtree(path)
    keys = sorted(set().union(*runs))
    lows = (f"{k} {min(r.get(k, 0.0) for r in runs) * 1000:.0f}" for k in keys)
    print(sys.argv[5], " | ".join(lows))


if __name__ == "__main__":
    main()
