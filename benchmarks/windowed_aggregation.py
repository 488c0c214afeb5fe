"""Windowed aggregation throughput: microstream vs one Polars batch query vs Spark.

Generates N events (default 5M) in F parquet files (default 50): ``ts``
Datetime("us") increasing with up to +-3 s of disorder (less than the 10 s
watermark delay, so no row is late and the replay must equal the batch result),
``key`` Int64 with 10k distinct values, ``amount`` Float64. Then, in one run:

- microstream: ``scan_files(dir, max_files_per_trigger=k).with_watermark("ts", "10s")
  .group_by_dynamic("ts", every="1m", group_by="key").agg(len, sum, mean)`` with
  ``Trigger.available_now(flush=True)`` into ``foreach_batch`` (collects the frames);
- Polars, the same aggregation once over all files, two ways: as written
  (``scan_parquet(dir).sort("ts").group_by_dynamic(...)``), and the fastest way
  Polars has for tumbling windows (``group_by("key", col("ts").dt.truncate("1m"))``,
  the same rows): the physical limit;
- Spark Structured Streaming, ``local[2]``: ``readStream.parquet`` with
  ``maxFilesPerTrigger=k``, ``withWatermark("ts", "10 seconds")``,
  ``groupBy(window("ts", "1 minute"), "key").agg(count, sum, avg)``, append mode,
  ``availableNow`` trigger, ``noop`` sink. Spark's defaults, except the master and
  ``spark.sql.shuffle.partitions`` (2 = the cores, instead of 200); one unmeasured
  warm-up query on 5 files first, in the same session, so the JIT is warm.

The microstream result is checked to equal the Polars result (same rows, floats
to 1e-9) before any figure is reported. Every figure is rows/s end to end (query
start until it stopped; Spark's session start-up excluded), the median of
``--repeat`` interleaved runs; the ratios are the comparable numbers, the
machine being shared and noisy.

    python benchmarks/windowed_aggregation.py [--events 5000000] [--files 50]
        [--max-files 1] [--repeat 3] [--skip-spark] [--shuffle-partitions 2]
        [--data DIR] [--checkpoint-root DIR] [--profile] [--out FILE]

``--key-columns 5`` groups by five key columns instead of one (``key`` and four
columns that are functions of it: a String, an Int32, an Int64, a Boolean, so the
groups are the same and only the cost of wider keys shows; the files then carry
those columns, and Spark is not run). ``--max-files 0`` takes every available file
in one trigger (one batch, then the flush).

``--skip-dynamic-reference`` leaves Polars' ``group_by_dynamic`` out (the stream is then
checked against ``truncate`` + ``group_by``): on a loaded machine it takes 10-40 s a run.

``--profile`` adds one untimed microstream run under ``py-spy`` and puts the hot
spots into the JSON (see ``state_scaling.summarize_profile``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from polars.testing import assert_frame_equal
from state_scaling import (
    Profiler,
    machine_info,
    source_version,
    summarize_profile,
    write_result,
)  # benchmarks/

import microstream as ms

START = dt.datetime(2024, 1, 1)
STEP_US = 1_000  # one event per millisecond of event time on average: 60k events per window
DISORDER_US = 3_000_000  # +-3 s, below the 10 s watermark delay: nothing is late
KEYS = 10_000
WATERMARK = "10s"
EVERY = "1m"


CHECKPOINT_ROOT: str | None = None  # --checkpoint-root
GROUP_KEYS: list[str] = ["key"]  # --key-columns: the group keys besides the window
EXTRA_KEYS = {
    "region": lambda key: pl.format("r{}", key % 16),
    "tier": lambda key: (key % 3).cast(pl.Int32),
    "shard": lambda key: key % 97,
    "flag": lambda key: key % 2 == 0,
}


def aggs() -> list[pl.Expr]:
    return [
        pl.len(),
        pl.col("amount").sum().alias("amount_sum"),
        pl.col("amount").mean().alias("amount_mean"),
    ]


# -- data ---------------------------------------------------------------------------------


def generate(directory: Path, events: int, files: int, seed: int = 42) -> None:
    """``files`` parquet files of ``events // files`` rows each, in event-time order."""
    rng = np.random.default_rng(seed)
    per_file = events // files
    start_us = (START - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    for f in range(files):
        i = np.arange(f * per_file, (f + 1) * per_file, dtype=np.int64)
        jitter = rng.integers(-DISORDER_US, DISORDER_US + 1, size=per_file)
        ts = start_us + i * STEP_US + jitter
        frame = pl.DataFrame(
            {
                "ts": pl.Series(ts, dtype=pl.Int64).cast(pl.Datetime("us")),
                "key": rng.integers(0, KEYS, size=per_file, dtype=np.int64),
                "amount": rng.random(per_file) * 100.0,
            }
        ).with_columns(EXTRA_KEYS[k](pl.col("key")).alias(k) for k in GROUP_KEYS[1:])
        tmp = directory / f".part-{f:05d}.parquet"
        frame.write_parquet(tmp)
        tmp.rename(directory / f"part-{f:05d}.parquet")  # files appear atomically, in order


def schema() -> pl.Schema:
    frame = pl.DataFrame(
        schema={"ts": pl.Datetime("us"), "key": pl.Int64(), "amount": pl.Float64()}
    )
    return frame.with_columns(EXTRA_KEYS[k](pl.col("key")).alias(k) for k in GROUP_KEYS[1:]).schema


# -- the three runs ---------------------------------------------------------------------------


def run_polars(directory: Path) -> tuple[float, pl.DataFrame]:
    """The query of the brief, as written: ``group_by_dynamic`` over all files."""
    t0 = time.perf_counter()
    result = (
        pl.scan_parquet(str(directory / "*.parquet"))
        .sort("ts")
        .group_by_dynamic("ts", every=EVERY, group_by=GROUP_KEYS)
        .agg(aggs())
        .collect()
    )
    return time.perf_counter() - t0, result


def run_polars_truncate(directory: Path) -> tuple[float, pl.DataFrame]:
    """The same rows, the fastest way Polars has: tumbling windows are ``dt.truncate`` keys.

    Polars' ``group_by_dynamic(group_by=...)`` is much slower than a hash
    ``group_by`` with this many keys, so this is the physical limit to compare with.
    """
    t0 = time.perf_counter()
    result = (
        pl.scan_parquet(str(directory / "*.parquet"))
        .group_by(*GROUP_KEYS, pl.col("ts").dt.truncate(EVERY))
        .agg(aggs())
        .collect()
    )
    return time.perf_counter() - t0, result


def run_microstream(directory: Path, max_files: int) -> tuple[float, pl.DataFrame, dict]:
    frames: list[pl.DataFrame] = []
    checkpoint = tempfile.mkdtemp(prefix="ms-windowed-", dir=CHECKPOINT_ROOT)
    try:
        t0 = time.perf_counter()
        query = (
            ms.scan_files(
                str(directory),
                format="parquet",
                schema=schema(),
                max_files_per_trigger=max_files or None,
            )
            .with_watermark("ts", WATERMARK)
            .group_by_dynamic("ts", every=EVERY, group_by=GROUP_KEYS)
            .agg(aggs())
            .foreach_batch(
                lambda df, _batch_id: frames.append(df),
                trigger=ms.Trigger.available_now(flush=True),
                checkpoint=checkpoint,
            )
        )
        query.await_termination()
        elapsed = time.perf_counter() - t0
        progress = query.recent_progress
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    phases = {
        phase: round(sum(getattr(p.durations_ms, phase) for p in progress), 1)
        for phase in ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
    }
    detail = {
        "batches": len(progress),
        "input_rows": sum(p.num_input_rows for p in progress),
        "dropped_late": sum(op.num_rows_dropped_late for p in progress for op in p.state_operators),
        "max_state_rows": max(
            (op.num_rows_total for p in progress for op in p.state_operators), default=0
        ),
        "phase_totals_ms": phases,
        "batch_total_median_ms": round(
            statistics.median(p.durations_ms.total for p in progress if p.num_input_rows), 1
        ),
    }
    result = pl.concat(frames) if frames else pl.DataFrame()
    return elapsed, result, detail


def spark_session(shuffle_partitions: int):
    from pyspark.sql import SparkSession

    return (
        SparkSession.builder.master("local[2]")
        .appName("microstream-windowed-benchmark")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        # Quieter, and no web UI; neither changes how the query runs.
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="spark-warehouse-"))
        .getOrCreate()
    )


def run_spark(spark, directory: Path, max_files: int) -> tuple[float, dict]:
    from pyspark.sql import functions as sf

    checkpoint = tempfile.mkdtemp(prefix="spark-windowed-")
    try:
        t0 = time.perf_counter()
        reader = spark.readStream.schema("ts TIMESTAMP, key BIGINT, amount DOUBLE")
        if max_files:
            reader = reader.option("maxFilesPerTrigger", max_files)
        stream = (
            reader.parquet(str(directory))
            .withWatermark("ts", "10 seconds")
            .groupBy(sf.window("ts", "1 minute"), "key")
            .agg(sf.count("*").alias("len"), sf.sum("amount"), sf.avg("amount"))
        )
        query = (
            stream.writeStream.format("noop")
            .outputMode("append")
            .trigger(availableNow=True)
            .option("checkpointLocation", checkpoint)
            .start()
        )
        query.awaitTermination()
        elapsed = time.perf_counter() - t0
        progress = query.recentProgress
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    with_rows = [p for p in progress if p["numInputRows"]]
    detail = {
        "batches": len(with_rows),
        "input_rows": sum(p["numInputRows"] for p in progress),
        "batch_trigger_median_ms": statistics.median(
            p["durationMs"]["triggerExecution"] for p in with_rows
        )
        if with_rows
        else None,
    }
    return elapsed, detail


# -- main -------------------------------------------------------------------------------------


def canonical(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select(*GROUP_KEYS, "ts", "len", "amount_sum", "amount_mean").sort("key", "ts")


def median_index(values: list[float]) -> int:
    return values.index(sorted(values)[len(values) // 2])


def spark_warm_up(spark, directory: Path, max_files: int, files: int) -> float:
    """One unmeasured run over a few of the files, so the JVM's JIT is warm for the measured runs."""
    warm = Path(tempfile.mkdtemp(prefix="spark-warm-up-"))
    try:
        for path in sorted(directory.glob("*.parquet"))[: min(files, 5)]:
            os.symlink(path, warm / path.name)
        seconds, _ = run_spark(spark, warm, max_files)
    finally:
        shutil.rmtree(warm, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument(
        "--max-files", type=int, default=1, help="max files per trigger (0: no limit, one batch)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; medians reported")
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument(
        "--skip-dynamic-reference",
        action="store_true",
        help="leave out Polars' group_by_dynamic (10-30x slower than truncate+group_by here); "
        "the stream is then checked against truncate+group_by",
    )
    parser.add_argument(
        "--key-columns",
        type=int,
        choices=(1, 5),
        default=1,
        help="group keys besides the window: 1 (key) or 5 (key and four functions of it)",
    )
    parser.add_argument("--shuffle-partitions", type=int, default=2)
    parser.add_argument(
        "--data", default=None, help="data dir, kept (default: a temp dir, removed)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more microstream run under py-spy (not timed); hot spots go into the JSON",
    )
    parser.add_argument(
        "--checkpoint-root",
        default=None,
        help="where microstream's checkpoints go (default: the temp dir; /dev/shm to take the "
        "disk out of the figures)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON output (default: benchmarks/results/<date>-windowed.json)"
    )
    args = parser.parse_args()
    global CHECKPOINT_ROOT, GROUP_KEYS
    CHECKPOINT_ROOT = args.checkpoint_root
    GROUP_KEYS = ["key", *list(EXTRA_KEYS)[: args.key_columns - 1]]
    if args.key_columns > 1:
        args.skip_spark = True  # (the Spark query is written for one key)

    events = args.events // args.files * args.files
    own_data = args.data is None
    directory = Path(args.data or tempfile.mkdtemp(prefix="ms-windowed-data-"))
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(directory.glob("*.parquet"))
    if existing:
        found = pl.scan_parquet(str(directory / "*.parquet")).select(pl.len()).collect().item()
        found_schema = pl.read_parquet_schema(existing[0])
        if (len(existing), found) != (args.files, events) or found_schema != dict(schema()):
            sys.exit(
                f"{directory} holds {found} rows in {len(existing)} files; "
                f"expected {events} in {args.files} with columns {list(schema())}: use another --data"
            )
    else:
        t0 = time.perf_counter()
        generate(directory, events, args.files)
        print(
            f"generated {events:,} events in {args.files} files in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )

    seconds: dict[str, list[float]] = {
        "polars_group_by_dynamic": [],
        "polars_truncate_group_by": [],
        "microstream": [],
        "spark": [],
    }
    stream_details: list[dict] = []
    spark_details: list[dict] = []
    spark_conf: dict[str, str] = {}
    spark_version = None
    spark_cold = None
    profile = None
    try:
        for r in range(args.repeat):
            # Interleaved, so a burst of load on the shared machine hits all of them alike.
            t, truncated = run_polars_truncate(directory)
            reference = truncated
            if not args.skip_dynamic_reference:
                t_dynamic, reference = run_polars(directory)
                seconds["polars_group_by_dynamic"].append(t_dynamic)
            seconds["polars_truncate_group_by"].append(t)
            t, streamed, detail = run_microstream(directory, args.max_files)
            seconds["microstream"].append(t)
            stream_details.append(detail)
            # The replay must equal the batch result, row for row, before any figure counts.
            assert detail["input_rows"] == events, detail
            assert detail["dropped_late"] == 0, detail
            assert_frame_equal(
                canonical(streamed), canonical(reference), check_exact=False, rel_tol=1e-9
            )
            assert_frame_equal(
                canonical(truncated), canonical(reference), check_exact=False, rel_tol=1e-9
            )
            dynamic = seconds["polars_group_by_dynamic"]
            print(
                f"run {r + 1}: polars group_by_dynamic {dynamic[-1] if dynamic else float('nan'):.2f}s, "
                f"polars truncate+group_by {seconds['polars_truncate_group_by'][-1]:.2f}s, "
                f"microstream {seconds['microstream'][-1]:.2f}s "
                f"(equal to polars: {reference.height:,} rows)",
                file=sys.stderr,
            )

        if args.profile:
            raw = Path(tempfile.mkdtemp(prefix="ms-windowed-profile-")) / "py-spy.txt"
            profiler = Profiler(raw)
            try:
                run_microstream(directory, args.max_files)
            finally:
                profiler.stop()
            profile = summarize_profile(raw)
            profile["raw_stacks"] = str(raw)

        if not args.skip_spark:
            spark = spark_session(args.shuffle_partitions)
            spark.sparkContext.setLogLevel("ERROR")
            spark_version = spark.version
            try:
                spark_cold = spark_warm_up(spark, directory, args.max_files, args.files)
                print(f"spark warm-up (5 files, not counted): {spark_cold:.2f}s", file=sys.stderr)
                for r in range(args.repeat):
                    t, detail = run_spark(spark, directory, args.max_files)
                    assert detail["input_rows"] == events, detail
                    seconds["spark"].append(t)
                    spark_details.append(detail)
                    print(f"run {r + 1}: spark {t:.2f}s", file=sys.stderr)
                hidden = (
                    "spark.driver.host",
                    "spark.driver.port",
                    "spark.app.id",
                    "spark.app.startTime",
                    "spark.app.submitTime",
                    "spark.executor.id",
                    "spark.driver.extraJavaOptions",
                    "spark.executor.extraJavaOptions",
                )
                spark_conf = {
                    k: v
                    for k, v in sorted(spark.sparkContext.getConf().getAll())
                    if not k.startswith(hidden)
                }
                for key in (
                    "spark.sql.shuffle.partitions",
                    "spark.sql.streaming.stateStore.providerClass",
                    "spark.sql.adaptive.enabled",
                    "spark.driver.memory",
                ):
                    try:
                        spark_conf[key] = spark.conf.get(key)
                    except Exception:  # not a SQL conf and not set: the default
                        spark_conf.setdefault(key, "(default)")
            finally:
                spark.stop()
    finally:
        if own_data:
            shutil.rmtree(directory, ignore_errors=True)

    rps = {k: round(events / statistics.median(v)) if v else None for k, v in seconds.items()}
    stream = rps["microstream"]
    result: dict = {
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "polars": pl.__version__,
            "microstream": ms.__version__,
            "source": source_version(),
            "spark": spark_version,
        },
        "settings": {
            "events": events,
            "files": args.files,
            "keys": KEYS,
            "group_keys": GROUP_KEYS,
            "max_files_per_trigger": args.max_files,
            "window": EVERY,
            "watermark": WATERMARK,
            "disorder_s": DISORDER_US / 1e6,
            "repeat": args.repeat,
            "microstream": "Trigger.available_now(flush=True), foreach_batch collecting the "
            "frames, local checkpoint (default durability)",
            "checkpoint_root": args.checkpoint_root or tempfile.gettempdir(),
            "spark": None
            if args.skip_spark
            else (
                f"local[2], availableNow, append, noop sink, shuffle partitions "
                f"{args.shuffle_partitions}, otherwise defaults; one unmeasured warm-up run "
                f"on 5 files first"
            ),
        },
        "seconds": {k: [round(t, 3) for t in v] for k, v in seconds.items()},
        "rows_per_s (median)": rps,
        "ratio_stream_to_polars_group_by_dynamic": round(stream / rps["polars_group_by_dynamic"], 3)
        if rps["polars_group_by_dynamic"]
        else None,
        "ratio_stream_to_polars_truncate_group_by": round(
            stream / rps["polars_truncate_group_by"], 3
        ),
        "ratio_stream_to_spark": round(stream / rps["spark"], 2) if rps["spark"] else None,
        "result_equal_to_polars": True,
        "microstream_detail (median run)": stream_details[median_index(seconds["microstream"])],
        "spark_detail (median run)": spark_details[median_index(seconds["spark"])]
        if spark_details
        else None,
        "spark_warm_up_seconds": None if spark_cold is None else round(spark_cold, 3),
        "spark_conf": spark_conf or None,
        "microstream_profile": profile,
    }
    write_result(result, "windowed", args.out)


if __name__ == "__main__":
    main()
