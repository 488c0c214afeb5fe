"""A Kafka source on RayRuntime next to LocalRuntime, in the same run.

Starts a Tansu broker (in memory) and Ray (``--num-cpus``, before any timing), writes
``--events`` JSON events round-robin over ``--partitions`` partitions of one topic with
``kafka_to_delta.py``'s bulk producer (one record per record batch, so Tansu's end
offsets are right), then runs two queries with ``Trigger.available_now(flush=True)``
and ``max_offsets_per_trigger=--max-offsets``, on LocalRuntime and on RayRuntime with
each of ``--workers``, ``--repeats`` times, interleaved:

- ``stateless``: ``kafka_to_delta.transform`` (filter, projection) into the Parquet file
  sink: on Ray each partition's range is read by a task that writes its piece;
- ``windowed``: the same filter, then a 10-second tumbling window per country (sum and
  count) into Delta: on Ray the tasks read and filter, and hand their rows, cut by key
  group, to the window's actors.

Every run's output is checked to equal the first local run's (rows compared as
multisets) before any figure counts. It prints a JSON report: per query and runtime
the median wall-clock seconds (building the query to its end, actors included) and
the median time in batches (the sum of the batches' durations in progress: what steady
streaming costs), events per second over the latter, and the ratios of Ray to local
and of 2 workers to 1, over batch time. Only ratios within one run count on a shared
machine.

    PYTHONPATH=$PWD python benchmarks/ray_kafka.py --events 200000 --max-offsets 100000
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import polars as pl  # noqa: E402
from kafka_to_delta import POLARS_SCHEMA, bulk_produce, generate, json_payloads  # noqa: E402

import microstream as ms  # noqa: E402
from microstream.testing.tansu import TansuBroker  # noqa: E402


def stateless(frame: ms.StreamFrame) -> ms.StreamFrame:
    return frame.filter((pl.col("kind") != "view") & (pl.col("amount") > 1.0)).select(
        "id",
        pl.col("ts").cast(pl.Datetime("ms")).alias("ts"),
        "user",
        "country",
        "kind",
        (pl.col("amount") * 0.92).alias("amount_eur"),
    )


def windowed(frame: ms.StreamFrame) -> ms.StreamFrame:
    return (
        stateless(frame)
        .with_watermark("ts", delay="5s")
        .group_by_dynamic("ts", every="10s", group_by="country")
        .agg(pl.col("amount_eur").sum().round(4).alias("total"), pl.len().alias("n"))
    )


QUERIES: dict[str, tuple[Callable[[ms.StreamFrame], ms.StreamFrame], str]] = {
    "stateless": (stateless, "sink_parquet"),
    "windowed": (windowed, "sink_delta"),
}


def output(kind: str, path: Path) -> list[tuple[Any, ...]]:
    frame = ms.read_file_sink(path) if kind == "sink_parquet" else pl.read_delta(str(path))
    return sorted(frame.iter_rows(), key=repr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--max-offsets", type=int, default=100_000)
    parser.add_argument("--queries", nargs="+", default=list(QUERIES))
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
        "partitions": args.partitions,
        "max_offsets_per_trigger": args.max_offsets,
        "num_cpus": args.num_cpus,
        "queries": {},
    }
    with TansuBroker() as broker, tempfile.TemporaryDirectory(prefix="ray-kafka-") as tmp:
        topic = "events"
        broker.create_topic(topic, partitions=args.partitions)
        took, _ = bulk_produce(
            broker.port, topic, args.partitions, json_payloads(generate(args.events))
        )
        ends = broker.end_offsets(topic)
        assert sum(ends.values()) == args.events, ends
        report["produce_s"] = round(took, 2)
        runtimes: dict[str, Callable[[], ms.Runtime]] = {"local": ms.LocalRuntime}
        for n in args.workers:
            runtimes[f"ray{n}"] = functools.partial(ms.RayRuntime, num_workers=n)
        run = 0
        for name in args.queries:
            build, verb = QUERIES[name]
            seconds: dict[str, list[float]] = {key: [] for key in runtimes}
            batches: dict[str, list[float]] = {key: [] for key in runtimes}
            tasks: dict[str, int] = {}
            expected: list[tuple[Any, ...]] | None = None
            for _ in range(args.repeats):
                for key, make in runtimes.items():
                    run += 1
                    path = Path(tmp) / f"out-{run}"
                    frame = build(
                        ms.scan_kafka(
                            broker.bootstrap_servers,
                            topic=topic,
                            schema=POLARS_SCHEMA,
                            max_offsets_per_trigger=args.max_offsets,
                        )
                    )
                    t0 = time.perf_counter()
                    query = getattr(frame, verb)(
                        path,
                        checkpoint=Path(tmp) / f"cp-{run}",
                        trigger=ms.Trigger.available_now(flush=True),
                        runtime=make(),
                    )
                    query.await_termination()
                    seconds[key].append(time.perf_counter() - t0)
                    if query.exception() is not None:
                        raise query.exception()
                    progress = query.recent_progress
                    batches[key].append(sum(p.durations_ms.total for p in progress) / 1000)
                    executor = getattr(query._execution, "executor", None)
                    if executor is not None and hasattr(executor, "split_tasks"):
                        tasks[key] = executor.split_tasks
                    got = output(verb, path)
                    if expected is None:
                        expected = got
                    assert got == expected, f"{name} on {key} differs from local"
            wall = {k: statistics.median(v) for k, v in seconds.items()}
            medians = {k: statistics.median(v) for k, v in batches.items()}
            entry: dict[str, Any] = {
                "rows_out": len(expected or []),
                "wall_s": {k: round(v, 3) for k, v in wall.items()},
                "batches_s": {k: round(v, 3) for k, v in medians.items()},
                "events_per_s": {k: round(args.events / v) for k, v in medians.items()},
                "split_tasks": tasks,
            }
            for key, value in medians.items():
                if key != "local":
                    entry[f"{key}_vs_local"] = round(medians["local"] / value, 3)
            if "ray1" in medians and "ray2" in medians:
                entry["ray2_vs_ray1"] = round(medians["ray1"] / medians["ray2"], 3)
            report["queries"][name] = entry
            print(json.dumps({name: entry}), file=sys.stderr, flush=True)
    ray.shutdown()
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
