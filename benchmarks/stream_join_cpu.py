"""The stream-stream join benchmark in CPU seconds, for a shared, loaded machine.

``stream_join.py`` reports wall seconds, which the other processes of a shared
2-core machine stretch by 2-5x (and the Polars reference, a few tenths of a second,
by the most). This runs the same two things, ``stream_join.run_polars`` and
``stream_join.run_microstream`` over the same generated files, and prints for each
its wall seconds and the CPU seconds of the process (every thread) while it ran,
the engine's phase totals, and both ratios. CPU seconds move far less with the
load, so before/after comparisons of the engine hold up; the one-shot Polars
query uses both cores, so its wall time on a quiet machine is about half its CPU
time and the wall ratio of a quiet machine is lower than the CPU ratio.

Usage (the data is generated once into DATA, then reused)::

    PYTHONPATH=$PWD python benchmarks/stream_join_cpu.py --data /tmp/join-data-60 [--bound-minutes 60] [--tag main]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import stream_join  # (benchmarks/)


def timed(run: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and process CPU seconds of ``run()``, and what it returned."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = run()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="generated once, then reused")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--bound-minutes", type=int, default=stream_join.BOUND_MINUTES)
    parser.add_argument("--checkpoint-root", default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    marker = args.data / f"generated-{args.rows}-{args.files}-{args.bound_minutes}"
    if not marker.exists():
        args.data.mkdir(parents=True, exist_ok=True)
        stream_join.generate(args.data, args.rows, args.files, args.bound_minutes)
        marker.write_text("")
    polars_wall, polars_cpu, _ = timed(
        lambda: stream_join.run_polars(args.data, args.bound_minutes)
    )
    stream_wall, stream_cpu, (_, _, detail) = timed(
        lambda: stream_join.run_microstream(args.data, args.checkpoint_root, args.bound_minutes)
    )
    phases = detail["phase_totals_ms"]
    print(
        f"{args.tag} polars wall {polars_wall:.3f} cpu {polars_cpu:.3f} | stream wall "
        f"{stream_wall:.3f} cpu {stream_cpu:.3f} | cpu ratio {polars_cpu / stream_cpu:.3f} "
        f"wall ratio {polars_wall / stream_wall:.3f} | compute {phases['compute']:.0f} "
        f"commit {phases['commit']:.0f}"
    )


if __name__ == "__main__":
    main()
