"""The interval join slice's second round: Nexmark q3's and q8's join, timed per method in
thread CPU ms over a run's batches (the query thread; the minimum of N runs in one
process, after one warm-up run), with the engine's phase totals of the same runs.

    PYTHONPATH=CHECKOUT python nexmark_buffers.py CHECKOUT N DATA TAG

``CHECKOUT`` is the worktree whose ``benchmarks/nexmark`` runs, ``DATA`` the Nexmark
events ``benchmarks/nexmark/run.py --data DATA`` generated; checkpoints go to a temporary
directory under ``/tmp/interval-join-data``.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, sys.argv[1] + "/benchmarks")
from nexmark.query import load, run_stream  # (benchmarks/ of CHECKOUT)

from microstream.operators import stream_join as operator
from microstream.state import segment_buffer

spent: dict[str, float] = collections.defaultdict(float)


def timed(cls: type, name: str, label: str) -> None:
    method: Callable[..., Any] = getattr(cls, name)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            spent[label] += time.thread_time() - start

    setattr(cls, name, wrapper)


def main() -> None:
    timed(operator.StreamJoinOperator, "process_sides", "operator (process_sides)")
    timed(segment_buffer.SegmentBuffer, "insert", "buffer insert")
    timed(segment_buffer.SegmentBuffer, "mark", "buffer mark")
    timed(segment_buffer.SegmentBuffer, "commit", "buffer commit (both sides)")
    data, tag = Path(sys.argv[3]), sys.argv[4]
    for query in ("q3", "q8"):
        module = load(query)
        run_stream(module, data, checkpoint_root="/tmp/interval-join-data")
        runs: list[dict[str, float]] = []
        for _ in range(int(sys.argv[2])):
            spent.clear()
            result = run_stream(module, data, checkpoint_root="/tmp/interval-join-data")
            runs.append({**{k: v * 1e3 for k, v in spent.items()}, **result.phase_totals_ms})
        keys = list(runs[0])
        line = ", ".join(f"{k} {min(r.get(k, 0.0) for r in runs):.1f}" for k in keys)
        print(f"{tag} {query} (ms, min of {len(runs)}): {line}", flush=True)


if __name__ == "__main__":
    main()
