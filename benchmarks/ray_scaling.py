"""RayRuntime next to LocalRuntime on Nexmark queries, in the same run.

Generates a Nexmark data set (``--events`` events, ``--events-per-file`` per
file; every file is one micro-batch of bids, ~92% of the events), then runs each
query (``--queries``, default q0 q5 q7) with ``Trigger.available_now(flush=True)``
on LocalRuntime and on RayRuntime with each of ``--workers`` (default 1 and 2),
``--repeats`` times each, interleaved, and prints a JSON report: per query and
runtime the median wall-clock seconds (start of the query, its actors included, to
its end), the median time in batches (the sum of the batches' durations: what
steady streaming costs) and events per second of the latter, the ratio of Ray at 1
worker to local, and the speed-up from 1 to 2 workers, both over batch time. Ray is started once, on this
machine, with ``--num-cpus`` CPUs, before the timings (its start-up is not timed;
each run's actor start is).

    PYTHONPATH=$PWD python benchmarks/ray_scaling.py --events 600000 --events-per-file 100000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

from nexmark.generator import write_files  # noqa: E402
from nexmark.query import assert_same_result, load, run_batch, run_stream  # noqa: E402

import microstream as ms  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--events-per-file", type=int, default=100_000)
    parser.add_argument("--queries", nargs="+", default=["q0", "q5", "q7"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=2)
    args = parser.parse_args(argv)

    import ray

    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT}:{BENCHMARKS}"}},
    )
    report: dict[str, Any] = {
        "events": args.events,
        "events_per_file": args.events_per_file,
        "num_cpus": args.num_cpus,
        "queries": {},
    }
    with tempfile.TemporaryDirectory(prefix="ray-scaling-") as tmp:
        data = Path(tmp) / "data"
        write_files(data, args.events, events_per_file=args.events_per_file, seed=1)
        runtimes: dict[str, Any] = {"local": ms.LocalRuntime}
        for n in args.workers:
            runtimes[f"ray{n}"] = lambda n=n: ms.RayRuntime(num_workers=n)
        for name in args.queries:
            module = load(name)
            _, expected = run_batch(module, data)
            seconds: dict[str, list[float]] = {key: [] for key in runtimes}
            batches: dict[str, list[float]] = {key: [] for key in runtimes}
            for _ in range(args.repeats):
                for key, make in runtimes.items():
                    t0 = time.perf_counter()
                    run = run_stream(
                        module, data, max_files_per_trigger=1, checkpoint_root=tmp, runtime=make()
                    )
                    seconds[key].append(time.perf_counter() - t0)
                    batches[key].append(run.phase_totals_ms["total"] / 1000)
                    assert_same_result(module, run.result, expected)
            wall = {key: statistics.median(values) for key, values in seconds.items()}
            medians = {key: statistics.median(values) for key, values in batches.items()}
            entry: dict[str, Any] = {
                "wall_s": {k: round(v, 3) for k, v in wall.items()},
                "batches_s": {k: round(v, 3) for k, v in medians.items()},
                "events_per_s": {k: round(args.events / v) for k, v in medians.items()},
            }
            if "ray1" in medians:
                entry["ray1_vs_local"] = round(medians["local"] / medians["ray1"], 3)
                if "ray2" in medians:
                    entry["ray2_vs_ray1"] = round(medians["ray1"] / medians["ray2"], 3)
            report["queries"][name] = entry
            print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    ray.shutdown()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
