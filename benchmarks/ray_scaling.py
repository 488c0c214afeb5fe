"""RayRuntime next to LocalRuntime on Nexmark queries, in the same run.

Generates a Nexmark data set (``--events`` events, ``--events-per-file`` per
file; every file is one micro-batch of bids, ~92% of the events), then runs each
query (``--queries``, default q0 q5 q7 q11 q3) with ``Trigger.available_now(flush=True)``
on LocalRuntime and on RayRuntime with each of ``--workers`` (default 1 and 2),
``--repeats`` times each, interleaved, and prints a JSON report: per query and
runtime the median wall-clock seconds (start of the query, its actors included, to
its end), the median time in batches (the sum of the batches' durations: what
steady streaming costs) and events per second of the latter, the ratio of Ray at 1
worker to local, and the speed-up from 1 to 2 workers, both over batch time. Ray is started once, on this
machine, with ``--num-cpus`` CPUs, before the timings (its start-up is not timed;
each run's actor start is).

``stages_ms`` splits each runtime's batch time (the median run's, summed over its
batches) by phase, from the progress records (``latest_offset``, ``wal``, ``read``,
``compute``, ``sink``, ``commit``, ``other``: the rest of ``total``), and for Ray the
driver's waits on the actors (``actor_process``: inside compute, the operators' calls,
which also write the owners' state files; ``actor_commit``: inside commit, calls to the
owners, none since each owner writes its state in its one call of the batch) and the driver's
routing at exchanges (``route``), timed around ``RayStageExecutor.gather`` and
``route`` in this process, and ``owner_read``: inside ``actor_process``, the time the one
owner of an operator spent reading its source and running the stage before it
(``runtime/ray/owner_reads.py``; its reports' ``read_ms``; ``owner_read_ahead`` counts the
reads whose rows the owner had read ahead, ``runtime/ray/owner_prefetch.py``), and
``owner_share``: inside ``compute``, before ``actor_process``, the driver's wait for the
several owners of a keyed operator to read their shares of the source's splits, run the
stage and cut the rows for each other (``runtime/ray/shared_reads.py``; their reads
ahead count in ``owner_read_ahead`` too); ``partitioned`` says whether an exchange split rows over
several actors (false for a stateless query, and for a keyless window: one actor owns
it). ``benchmarks/ray_model.py`` projects 8 and 32 workers from them.

    PYTHONPATH=$PWD python benchmarks/ray_scaling.py --events 600000 --events-per-file 100000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

from nexmark.generator import write_files  # noqa: E402
from nexmark.query import assert_same_result, load, run_batch, run_stream  # noqa: E402

import microstream as ms  # noqa: E402

PHASES = ("latest_offset", "wal", "read", "compute", "sink", "commit")


class StageTimer:
    """Milliseconds this process spends waiting on Ray actors and routing rows, by kind.

    Installed around ``RayStageExecutor.gather`` (every call to the actors goes through
    it; ``what`` names a batch's operator call or its state commit) and the executor's
    ``route``, for the duration of a ``with timer.installed():`` block.
    """

    def __init__(self) -> None:
        self.ms: dict[str, float] = {
            "actor_process": 0.0,
            "actor_commit": 0.0,
            "route": 0.0,
            "owner_read": 0.0,
            "owner_share": 0.0,
        }
        self.read_ahead = 0
        """Owner reads whose rows the owner had read ahead (``runtime/ray/owner_prefetch.py``)."""
        self.partitioned = False
        """Whether an exchange split rows over more than one owner (a keyless operator
        lives whole in one actor)."""

    @contextmanager
    def installed(self) -> Iterator[StageTimer]:
        from microstream.runtime.ray import executor

        gather, route = executor.RayStageExecutor.gather, executor.route

        def timed(kind: Callable[[tuple[Any, ...]], str | None], function: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return function(*args, **kwargs)
                finally:
                    key = kind(args)
                    if key is not None:
                        self.ms[key] += (time.perf_counter() - t0) * 1000

            return call

        def gather_kind(args: tuple[Any, ...]) -> str | None:
            what = str(args[3])
            if what.startswith("batch "):
                return "actor_process"
            if what.startswith("the commit of batch "):
                return "actor_commit"
            if what.startswith("the reads of batch "):
                return "owner_share"
            return None  # opening the owners at start, pids: not a batch's time

        def gathered(*args: Any, **kwargs: Any) -> Any:
            results = timed(gather_kind, gather)(*args, **kwargs)
            if gather_kind(args) == "owner_share":  # the shares' reports
                self.read_ahead += sum(r.read_ahead for r in results)
            return results

        executor.RayStageExecutor.gather = gathered  # type: ignore[method-assign]

        def route_kind(args: tuple[Any, ...]) -> str:
            self.partitioned = self.partitioned or len(args[2]) > 1
            return "route"

        executor.route = timed(route_kind, route)
        note_reads = executor._note_reads

        def noted(*args: Any) -> None:
            note_reads(*args)
            if args[3]:  # the owner read a source in its call: the reports' read time
                self.ms["owner_read"] += sum(r.read_ms for r in args[2].reports)
                self.read_ahead += sum(r.read_ahead for r in args[2].reports)

        executor._note_reads = noted
        try:
            yield self
        finally:
            executor.RayStageExecutor.gather = gather  # type: ignore[method-assign]
            executor.route = route
            executor._note_reads = note_reads


def stages(phase_totals_ms: dict[str, float], timer: StageTimer | None) -> dict[str, float]:
    """One run's batch time by phase (and, for Ray, actor waits and routing), in ms."""
    out = {phase: phase_totals_ms[phase] for phase in PHASES}
    out["other"] = phase_totals_ms["total"] - sum(out.values())
    out["total"] = phase_totals_ms["total"]
    if timer is not None:
        out.update(timer.ms)
    return {key: round(value, 1) for key, value in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=600_000)
    parser.add_argument("--events-per-file", type=int, default=100_000)
    parser.add_argument("--queries", nargs="+", default=["q0", "q5", "q7", "q11", "q3"])
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
            split: dict[str, list[dict[str, float]]] = {key: [] for key in runtimes}
            read_ahead: dict[str, int] = {}
            num_batches = 0
            partitioned = False
            for _ in range(args.repeats):
                for key, make in runtimes.items():
                    timer = None if key == "local" else StageTimer()
                    t0 = time.perf_counter()
                    if timer is None:
                        run = run_stream(
                            module,
                            data,
                            max_files_per_trigger=1,
                            checkpoint_root=tmp,
                            runtime=make(),
                        )
                    else:
                        with timer.installed():
                            run = run_stream(
                                module,
                                data,
                                max_files_per_trigger=1,
                                checkpoint_root=tmp,
                                runtime=make(),
                            )
                    seconds[key].append(time.perf_counter() - t0)
                    batches[key].append(run.phase_totals_ms["total"] / 1000)
                    split[key].append(stages(run.phase_totals_ms, timer))
                    partitioned = partitioned or (timer is not None and timer.partitioned)
                    if timer is not None:
                        read_ahead[key] = timer.read_ahead
                    num_batches = run.batches
                    assert_same_result(module, run.result, expected)
            wall = {key: statistics.median(values) for key, values in seconds.items()}
            medians = {key: statistics.median(values) for key, values in batches.items()}
            entry: dict[str, Any] = {
                "wall_s": {k: round(v, 3) for k, v in wall.items()},
                "batches_s": {k: round(v, 3) for k, v in medians.items()},
                "events_per_s": {k: round(args.events / v) for k, v in medians.items()},
                "batches": num_batches,
                "partitioned": partitioned,
                "owner_read_ahead": read_ahead,  # (the last run's, per Ray runtime)
                # the stages of the run whose batch time is the median (the lower of two)
                "stages_ms": {
                    k: min(runs, key=lambda r: abs(r["total"] - medians[k] * 1000))
                    for k, runs in split.items()
                },
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
