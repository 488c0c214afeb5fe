"""The interval join slice's second round: Nexmark q3 and q8 in one process, per query
one warm-up run then N runs; prints the medians of the process's CPU seconds and of the
engine's phase totals, and writes every run to OUT.

    PYTHONPATH=CHECKOUT python nexmark_cpu_pairs.py CHECKOUT TAG N OUT

``CHECKOUT`` is the worktree whose ``benchmarks/nexmark`` runs; the events are read from
``/tmp/interval-join-data/nx`` (``benchmarks/nexmark/run.py --data`` generated them).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, sys.argv[1] + "/benchmarks")
from nexmark.query import load, run_stream  # (benchmarks/ of CHECKOUT)

import microstream

DATA = Path("/tmp/interval-join-data/nx")


def main() -> None:
    root, tag, n, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    assert str(microstream.__file__).startswith(root), microstream.__file__
    results: dict[str, list[dict[str, object]]] = {}
    for query in ("q3", "q8"):
        module = load(query)
        run_stream(module, DATA, checkpoint_root="/tmp/interval-join-data")
        runs: list[dict[str, object]] = []
        cpu, phases = [], []
        for _ in range(n):
            wall, start = time.perf_counter(), time.process_time()
            result = run_stream(module, DATA, checkpoint_root="/tmp/interval-join-data")
            cpu.append(time.process_time() - start)
            phases.append(result.phase_totals_ms)
            runs.append(
                {
                    "wall_s": time.perf_counter() - wall,
                    "cpu_s": cpu[-1],
                    "phases_ms": result.phase_totals_ms,
                }
            )
        results[query] = runs

        def median(phase: str, of: list[dict[str, float]] = phases) -> float:
            return statistics.median(p[phase] for p in of)

        print(
            f"{tag} {query}: cpu med {statistics.median(cpu):.3f} s, phases total med "
            f"{median('total'):.1f} ms (compute {median('compute'):.1f}, "
            f"commit {median('commit'):.1f})",
            flush=True,
        )
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
