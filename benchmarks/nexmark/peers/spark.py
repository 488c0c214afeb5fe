"""Nexmark on Spark Structured Streaming, the JVM peer of the benchmark.

Every query Spark can run is written here with Spark's own operators, over the
same parquet files as microstream: ``readStream.parquet(<stream dir>)`` with
``maxFilesPerTrigger`` (file ``i`` is micro-batch ``i``, as for microstream),
``withWatermark("date_time", "4 seconds")`` where a query needs event time, and
``trigger(availableNow=True)``. ``run`` has two modes:

- measured (the default): a ``noop`` sink, as ``benchmarks/windowed_aggregation.py``
  times Spark; the seconds run from building the query until it stopped (the
  session's start-up excluded), after one unmeasured warm-up run of the same
  query on the first few files, so the JVM's JIT is warm;
- checking (``check=True``): ``foreachBatch`` collects every micro-batch as a Polars
  frame with the oracle's columns, to compare with the query module's ``batch``.

Settings: Spark's defaults except ``master("local[2]")`` and
``spark.sql.shuffle.partitions`` = 2 (the machine's 2 cores, instead of 200
partitions of a few rows each, as ``windowed_aggregation.py`` does), the web UI
and console progress bar off (neither changes how a query runs) and
``spark.sql.session.timeZone`` = UTC: the data's timestamps are naive UTC as in
Polars, and the session zone decides Spark's ``hour()`` (q14) and
``date_format`` (q17), so it is part of the query's meaning, not a tuning knob.
``spark.driver.memory`` = 4g (default 1g, in local mode the only heap): with 1g, q7's
join state of 2M events ran out of heap (``OutOfMemoryError`` loading its state
store); a user would raise it, and the machine has 24 GiB. More memory only helps Spark.

Two things of the harness, both outside the measured work of the query:

- **File order.** Spark's file source orders new files by modification time (ties
  in listing order, with a millisecond clock), microstream by name. The files are
  copied once per data set to a staging directory with modification times one
  second apart in name order, so every system reads micro-batch ``i`` from file
  ``i``.
- **End of input.** ``availableNow`` stops when the files are read, without the
  final watermark microstream's ``available_now(flush=True)`` applies: windows
  still open would never be emitted. For the queries that emit when the
  watermark passes a window or session (``FLUSH``), one more file holds a single
  row dated 2100-01-01 with ids -1, which moves the watermark past every real
  window; its own window, session or day never closes, so it is never output.

The queries, as Spark runs them (each gives the oracle's rows, checked by
``tests/nexmark/test_peers.py``):

- q0, q1, q2, q14, q21, q22: stateless projections and filters. q14's
  ``count_char`` UDF is a Spark expression (length minus the length without 'c'),
  not a Python UDF, as the oracle's is vectorised; q21 guards ``regexp_extract``
  with ``rlike``, since Spark's gives '' where Flink's and Polars' give null.
- q13: stream-static join with the module's side table (Spark broadcasts it).
- q3: stream-stream inner join, state bounded by Beam's 600 s as a time-range
  condition on both watermarked sides.
- q5 and q7: Spark (3.4+) chains stateful operators in append mode. q5 is the
  sliding-window count per auction, then a second aggregation per window of the
  maximum and the ``(auction, num)`` pairs, keeping those at the maximum. Flink's
  form (the count joined to its maximum per window by a stream-stream join) runs
  too, but about half as fast (1M events: 36-39 s against 16-21 s), as both sides
  of the self-join read and count the bids. q7 is Flink's form, a tumbling-window
  maximum joined back to the bids on price and the window's span: the join keeps
  every bid in its state until the watermark passes its window (the alternative,
  one aggregation collecting each window's bids, runs out of the default 1 GiB
  heap at 1M events).
- q8: the persons semi-joined (``leftsemi``) with the auctions on seller and the
  10 s window start, bounded by a ±10 s time range, as the microstream module does.
- q11: ``session_window`` (Spark merges sessions that touch, as Flink and the oracle).
- q12: processing time is ``current_timestamp()`` (the micro-batch's time) in 10 s
  windows, in update mode (an append-mode window on it would only close when a
  later batch runs 10 s after it); the checking mode keeps each (bidder, window)'s
  last row.
- q17: per auction and one-day ``window``, append mode; ``avg_price`` is ``sum div
  count``, Flink's BIGINT average.
- q4 is refused: see ``SUPPORTED`` (Spark's own errors, which ``refusals``
  reproduces).
"""

from __future__ import annotations

import atexit
import datetime as dt
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from nexmark.schema import DOLLAR_TO_EURO, SCHEMAS

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

WATERMARK = "4 seconds"  # Flink's Nexmark watermark, schema.WATERMARK_DELAY
WARM_UP_FILES = 3
SENTINEL_TIME = dt.datetime(2100, 1, 1)

# The queries whose results are emitted when the watermark passes a window or session
# end: they need the end-of-input row (see the module docstring).
FLUSH = frozenset({"q4", "q5", "q7", "q11", "q17"})

OUTPUT_MODE = {"q12": "update"}  # others: append
UPDATE_KEYS = {"q12": ("bidder", "starttime")}

SUPPORTED: dict[str, str | None] = {
    "q0": None,
    "q1": None,
    "q2": None,
    "q3": None,
    "q4": "the average per category is a streaming aggregation with no event-time key, "
    "chained after the maximum per auction (itself after a stream-stream interval join): "
    "in append mode Spark raises [STREAMING_OUTPUT_MODE.UNSUPPORTED_OPERATION] (append is "
    "not supported for streaming aggregations without watermark); in update mode it "
    "refuses the chain of stateful operators ('Detected pattern of possible correctness "
    "issue due to global watermark', a check that can only be switched off at the risk of "
    "wrong results: the first aggregation's updates would all be averaged); complete mode "
    "does not allow stream-stream joins. The first half (the interval join and the "
    "maximum per auction) runs.",
    "q5": None,
    "q7": None,
    "q8": None,
    "q11": None,
    "q12": None,
    "q13": None,
    "q14": None,
    "q17": None,
    "q21": None,
    "q22": None,
}
"""Query name -> why Spark cannot run it as a streaming query (None: it can)."""


# -- the session ---------------------------------------------------------------------------------


def session(shuffle_partitions: int = 2, driver_memory: str = "4g") -> SparkSession:
    """A local Spark session with the benchmark's settings (see the module docstring)."""
    from pyspark.sql import SparkSession

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("microstream-nexmark-peer")
        .config("spark.sql.shuffle.partitions", str(shuffle_partitions))
        .config("spark.driver.memory", driver_memory)
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.warehouse.dir", tempfile.mkdtemp(prefix="spark-warehouse-"))
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def versions(spark: SparkSession | None = None) -> dict[str, Any]:
    """Spark's and Java's versions and the settings the peer runs with."""
    import pyspark
    from pyspark.sql import SparkSession

    spark = spark or SparkSession.getActiveSession()
    info: dict[str, Any] = {
        "pyspark": pyspark.__version__,
        "settings": "local[2], spark.sql.shuffle.partitions = 2 (the cores), session time "
        "zone UTC, otherwise Spark's defaults; readStream.parquet with maxFilesPerTrigger = "
        "the benchmark's files per trigger, withWatermark 4 seconds, availableNow, noop sink; "
        "one unmeasured warm-up run per query on "
        f"{WARM_UP_FILES} files first",
        "unsupported": {name: why for name, why in SUPPORTED.items() if why},
    }
    if spark is not None:
        jvm = spark.sparkContext._jvm
        info["spark"] = spark.version
        info["java"] = jvm.java.lang.System.getProperty("java.version") if jvm else None
        conf = dict(spark.sparkContext.getConf().getAll())
        keys = (
            "spark.master",
            "spark.sql.shuffle.partitions",
            "spark.sql.session.timeZone",
            "spark.sql.streaming.stateStore.providerClass",
            "spark.sql.adaptive.enabled",
            "spark.driver.memory",
        )
        info["conf"] = {key: conf.get(key) or _conf_default(spark, key) for key in keys}
    return info


def _conf_default(spark: SparkSession, key: str) -> str:
    try:
        return str(spark.conf.get(key))  # a SQL conf: its default
    except Exception:  # not a SQL conf and not set
        return "(default)"


# -- the inputs ----------------------------------------------------------------------------------


def spark_schema(stream: str) -> Any:
    """The Spark schema of a stream: schema.py's, ``Datetime`` as ``TIMESTAMP``.

    Polars writes naive timestamps, which Spark would read as ``TIMESTAMP_NTZ``; its
    watermark needs a ``TIMESTAMP``, and with the session in UTC both are the same instant.
    """
    from pyspark.sql import types as st

    def spark_type(dtype: pl.DataType) -> st.DataType:
        if dtype == pl.Int64:
            return st.LongType()
        if dtype == pl.String:
            return st.StringType()
        if isinstance(dtype, pl.Datetime):
            return st.TimestampType()
        msg = f"no Spark type for {dtype!r} in the {stream!r} schema"
        raise TypeError(msg)

    return st.StructType(
        [st.StructField(name, spark_type(dtype)) for name, dtype in SCHEMAS[stream].items()]
    )


def sentinel(stream: str) -> pl.DataFrame:
    """The end-of-input row: dated 2100-01-01, ids -1, nothing any query keeps."""
    values: dict[str, Any] = {}
    for name, dtype in SCHEMAS[stream].items():
        if isinstance(dtype, pl.Datetime):
            values[name] = [SENTINEL_TIME]
        elif dtype == pl.Int64:
            values[name] = [-1]
        else:
            values[name] = [""]
    return pl.DataFrame(values, schema=SCHEMAS[stream])


_STAGED: dict[tuple[str, str, bool, int | None], Path] = {}
_STAGING_ROOT: list[Path] = []


def _staging_root() -> Path:
    if not _STAGING_ROOT:
        _STAGING_ROOT.append(Path(tempfile.mkdtemp(prefix="nexmark-spark-input-")))
        atexit.register(shutil.rmtree, _STAGING_ROOT[0], ignore_errors=True)
    return _STAGING_ROOT[0]


def staged(root: Path, stream: str, *, flush: bool, limit: int | None = None) -> Path:
    """The files of ``root/stream`` (the first ``limit``), ordered by modification time.

    Copies, once per data set, with modification times one second apart in name
    order (Spark's file source orders by modification time), plus the end-of-input
    row as the last file when ``flush``.
    """
    key = (str(Path(root).resolve()), stream, flush, limit)
    if key in _STAGED:
        return _STAGED[key]
    files = sorted((Path(root) / stream).glob("*.parquet"))[:limit]
    if not files:
        msg = f"no parquet files in {Path(root) / stream}"
        raise FileNotFoundError(msg)
    target = Path(tempfile.mkdtemp(prefix=f"{stream}-", dir=_staging_root()))
    first = int(time.time()) - len(files) - 10
    for i, path in enumerate(files):
        copy = target / path.name
        shutil.copyfile(path, copy)
        os.utime(copy, (first + i, first + i))
    if flush:
        last = target / "zz-end-of-input.parquet"
        sentinel(stream).write_parquet(last)
        os.utime(last, (first + len(files), first + len(files)))
    _STAGED[key] = target
    return target


@dataclass(frozen=True)
class Streams:
    """The query's input streams, read from staged directories."""

    spark: SparkSession
    dirs: dict[str, Path]
    max_files_per_trigger: int | None

    def read(self, stream: str, *, watermark: bool = False) -> DataFrame:
        reader = self.spark.readStream.schema(spark_schema(stream))
        if self.max_files_per_trigger:
            reader = reader.option("maxFilesPerTrigger", self.max_files_per_trigger)
        frame = reader.parquet(str(self.dirs[stream]))
        return frame.withWatermark("date_time", WATERMARK) if watermark else frame


# -- the queries ---------------------------------------------------------------------------------


def _sf() -> Any:
    from pyspark.sql import functions as sf

    return sf


def _seconds(n: int) -> Column:
    return _sf().expr(f"INTERVAL {n} SECONDS")


def q0(s: Streams) -> DataFrame:
    return s.read("bid").select("auction", "bidder", "price", "date_time", "extra")


def q1(s: Streams) -> DataFrame:
    sf = _sf()
    return s.read("bid").select(
        "auction",
        "bidder",
        (sf.col("price") * 0.908).alias("price"),  # a double, as the oracle's Float64
        "date_time",
        "extra",
    )


def q2(s: Streams) -> DataFrame:
    sf = _sf()
    return s.read("bid").where(sf.col("auction") % 123 == 0).select("auction", "price")


def q3(s: Streams) -> DataFrame:
    """Stream-stream inner join, state bounded by Beam's 600 s (a time-range condition)."""
    sf = _sf()
    auctions = (
        s.read("auction")
        .where(sf.col("category") == 10)
        .select("id", "seller", sf.col("date_time").alias("a_time"))
        .withWatermark("a_time", WATERMARK)
    )
    persons = (
        s.read("person")
        .where(sf.col("state").isin("OR", "ID", "CA"))
        .select(
            sf.col("id").alias("p_id"), "name", "city", "state", sf.col("date_time").alias("p_time")
        )
        .withWatermark("p_time", WATERMARK)
    )
    on = (
        (sf.col("seller") == sf.col("p_id"))
        & (sf.col("p_time") >= sf.col("a_time") - _seconds(600))
        & (sf.col("p_time") <= sf.col("a_time") + _seconds(600))
    )
    return auctions.join(persons, on, "inner").select("name", "city", "state", "id")


def q4(s: Streams) -> DataFrame:
    """Flink's q4 as Spark would run it: refused (``SUPPORTED``, ``refusals``)."""
    sf = _sf()
    auctions = (
        s.read("auction")
        .select("id", "category", sf.col("date_time").alias("a_time"), "expires")
        .withWatermark("a_time", WATERMARK)
    )
    bids = (
        s.read("bid")
        .select("auction", "price", sf.col("date_time").alias("b_time"))
        .withWatermark("b_time", WATERMARK)
    )
    on = (
        (sf.col("id") == sf.col("auction"))
        & (sf.col("b_time") >= sf.col("a_time"))
        & (sf.col("b_time") <= sf.col("a_time") + _seconds(10))
        & (sf.col("b_time") <= sf.col("expires"))
    )
    return (
        auctions.join(bids, on, "inner")
        .groupBy("id", "category", "a_time")
        .agg(sf.max("price").alias("final"))
        .groupBy("category")
        .agg(sf.avg("final").alias("final"))
    )


def q5(s: Streams) -> DataFrame:
    """Two chained windowed aggregations: the counts, then each window's top auctions."""
    sf = _sf()
    counts = (
        s.read("bid", watermark=True)
        .groupBy(sf.window("date_time", "10 seconds", "2 seconds"), "auction")
        .agg(sf.count("*").alias("num"))
    )
    top = sf.filter("counts", lambda c: c["num"] == sf.col("maxn"))
    return (
        counts.groupBy("window")
        .agg(
            sf.max("num").alias("maxn"),
            sf.collect_list(sf.struct("auction", "num")).alias("counts"),
        )
        .select(sf.explode(top).alias("top"))
        .select("top.auction", "top.num")
    )


def q7(s: Streams) -> DataFrame:
    sf = _sf()
    bids = s.read("bid", watermark=True)
    maxima = bids.groupBy(sf.window("date_time", "10 seconds")).agg(
        sf.max("price").alias("maxprice")
    )
    on = (
        (sf.col("price") == sf.col("maxprice"))
        & (sf.col("date_time") >= sf.col("window.start"))
        & (sf.col("date_time") < sf.col("window.end"))
    )
    return bids.join(maxima, on, "inner").select("auction", "bidder", "price", "date_time", "extra")


def _window_start(column: str, seconds: int) -> Column:
    """The start of the epoch-aligned tumbling window holding ``column`` (Polars' truncate)."""
    sf = _sf()
    return sf.timestamp_seconds(sf.floor(sf.unix_seconds(sf.col(column)) / seconds) * seconds)


def q8(s: Streams) -> DataFrame:
    """Persons semi-joined with their auctions in the same 10 s window."""
    sf = _sf()
    persons = (
        s.read("person")
        .select("id", "name", sf.col("date_time").alias("p_time"))
        .withWatermark("p_time", WATERMARK)
        .withColumn("starttime", _window_start("p_time", 10))
    )
    auctions = (
        s.read("auction")
        .select("seller", sf.col("date_time").alias("a_time"))
        .withWatermark("a_time", WATERMARK)
        .withColumn("a_start", _window_start("a_time", 10))
    )
    on = (
        (sf.col("id") == sf.col("seller"))
        & (sf.col("starttime") == sf.col("a_start"))
        & (sf.col("a_time") >= sf.col("p_time") - _seconds(10))
        & (sf.col("a_time") <= sf.col("p_time") + _seconds(10))
    )
    return persons.join(auctions, on, "leftsemi").select("id", "name", "starttime")


def q11(s: Streams) -> DataFrame:
    sf = _sf()
    return (
        s.read("bid", watermark=True)
        .groupBy(sf.session_window("date_time", "10 seconds"), "bidder")
        .agg(sf.count("*").alias("bid_count"))
        .select(
            "bidder",
            "bid_count",
            sf.col("session_window.start").alias("starttime"),
            sf.col("session_window.end").alias("endtime"),
        )
    )


def q12(s: Streams) -> DataFrame:
    """Processing-time windows: ``current_timestamp()`` is the micro-batch's time."""
    sf = _sf()
    return (
        s.read("bid")
        .withColumn("p_time", sf.current_timestamp())
        .groupBy(sf.window("p_time", "10 seconds"), "bidder")
        .agg(sf.count("*").alias("bid_count"))
        .select(
            "bidder",
            "bid_count",
            sf.col("window.start").alias("starttime"),
            sf.col("window.end").alias("endtime"),
        )
    )


def q13(s: Streams) -> DataFrame:
    """Stream-static join with the query module's side table (Spark broadcasts it)."""
    from nexmark.queries.q13 import SIDE_KEYS, side_input

    sf = _sf()
    side = s.spark.createDataFrame(side_input().to_arrow())
    return (
        s.read("bid")
        .withColumn("key", sf.col("auction") % SIDE_KEYS)
        .join(side, "key", "inner")
        .select("auction", "bidder", "price", "date_time", "value")
    )


def q14(s: Streams) -> DataFrame:
    sf = _sf()
    euros = sf.col("price") * DOLLAR_TO_EURO
    hour = sf.hour("date_time")
    bid_time_type = (
        sf.when((hour >= 8) & (hour <= 18), "dayTime")
        .when((hour <= 6) | (hour >= 20), "nightTime")
        .otherwise("otherTime")
    )
    # count_char(extra, 'c') as a Spark expression, not a Python UDF (the oracle's is
    # vectorised too): the characters removed by deleting every 'c'.
    c_counts = sf.coalesce(
        sf.length("extra") - sf.length(sf.replace(sf.col("extra"), sf.lit("c"), sf.lit(""))),
        sf.lit(0),
    )
    return (
        s.read("bid")
        .where((euros > 1_000_000) & (euros < 50_000_000))
        .select(
            "auction",
            "bidder",
            euros.alias("price"),
            bid_time_type.alias("bid_time_type"),
            "date_time",
            "extra",
            c_counts.cast("bigint").alias("c_counts"),
        )
    )


def q17(s: Streams) -> DataFrame:
    sf = _sf()
    price = sf.col("price")
    return (
        s.read("bid", watermark=True)
        .groupBy("auction", sf.window("date_time", "1 day"))
        .agg(
            sf.count("*").alias("total_bids"),
            sf.count_if(price < 10_000).alias("rank1_bids"),
            sf.count_if((price >= 10_000) & (price < 1_000_000)).alias("rank2_bids"),
            sf.count_if(price >= 1_000_000).alias("rank3_bids"),
            sf.min(price).alias("min_price"),
            sf.max(price).alias("max_price"),
            sf.expr("sum(price) div count(1)").alias("avg_price"),  # Flink's BIGINT AVG
            sf.sum(price).alias("sum_price"),
        )
        .select(
            "auction",
            sf.date_format("window.start", "yyyy-MM-dd").alias("day"),
            "total_bids",
            "rank1_bids",
            "rank2_bids",
            "rank3_bids",
            "min_price",
            "max_price",
            "avg_price",
            "sum_price",
        )
    )


CHANNEL_ID_PATTERN = r"(&|^)channel_id=([^&]*)"


def q21(s: Streams) -> DataFrame:
    sf = _sf()
    channel = sf.lower("channel")
    # Flink's REGEXP_EXTRACT is null without a match; Spark's gives '' then: hence rlike.
    from_url = sf.when(
        sf.col("url").rlike(CHANNEL_ID_PATTERN),
        sf.regexp_extract("url", CHANNEL_ID_PATTERN, 2),
    )
    channel_id = (
        sf.when(channel == "apple", "0")
        .when(channel == "google", "1")
        .when(channel == "facebook", "2")
        .when(channel == "baidu", "3")
        .otherwise(from_url)
    )
    return (
        s.read("bid")
        .withColumn("channel_id", channel_id)
        .where(sf.col("channel_id").isNotNull())
        .select("auction", "bidder", "price", "channel", "channel_id")
    )


def q22(s: Streams) -> DataFrame:
    sf = _sf()
    parts = sf.split("url", "/")  # keeps empty fields, as SPLIT_INDEX
    return s.read("bid").select(
        "auction",
        "bidder",
        "price",
        "channel",
        sf.get(parts, 3).alias("dir1"),  # 0-based, null past the end
        sf.get(parts, 4).alias("dir2"),
        sf.get(parts, 5).alias("dir3"),
    )


QUERIES: dict[str, Callable[[Streams], DataFrame]] = {  # the supported ones
    "q0": q0,
    "q1": q1,
    "q2": q2,
    "q3": q3,
    "q5": q5,
    "q7": q7,
    "q8": q8,
    "q11": q11,
    "q12": q12,
    "q13": q13,
    "q14": q14,
    "q17": q17,
    "q21": q21,
    "q22": q22,
}
REFUSED: dict[str, Callable[[Streams], DataFrame]] = {"q4": q4}
"""The queries Spark refuses, as written for it: ``refusals`` shows Spark's errors."""

INPUTS: dict[str, tuple[str, ...]] = {
    "q3": ("auction", "person"),
    "q4": ("auction", "bid"),
    "q8": ("person", "auction"),
}  # others: ("bid",)


# -- running -------------------------------------------------------------------------------------


def _to_polars(frame: DataFrame) -> pl.DataFrame:
    """A micro-batch as Polars, timestamps naive milliseconds as the oracle's."""
    result = pl.from_arrow(frame.toArrow())
    assert isinstance(result, pl.DataFrame)
    return result.with_columns(
        pl.col(name).dt.replace_time_zone(None).dt.cast_time_unit("ms")
        for name, dtype in result.schema.items()
        if isinstance(dtype, pl.Datetime)
    )


def _execute(
    spark: SparkSession,
    name: str,
    dirs: dict[str, Path],
    max_files_per_trigger: int | None,
    *,
    check: bool,
) -> tuple[float, pl.DataFrame | None]:
    mode = OUTPUT_MODE.get(name, "append")
    frames: list[pl.DataFrame] = []
    checkpoint = tempfile.mkdtemp(prefix=f"spark-nexmark-{name}-")
    try:
        t0 = time.perf_counter()
        result = QUERIES[name](Streams(spark, dirs, max_files_per_trigger))
        writer = result.writeStream.outputMode(mode).trigger(availableNow=True)
        if check:

            def collect(batch: DataFrame, batch_id: int) -> None:
                frames.append(_to_polars(batch).with_columns(_batch=pl.lit(batch_id)))

            writer = writer.foreachBatch(collect)
        else:
            writer = writer.format("noop")
        query = writer.option("checkpointLocation", checkpoint).start()
        query.awaitTermination()
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(checkpoint, ignore_errors=True)
    if not check:
        return seconds, None
    output = pl.concat(frames, how="vertical_relaxed") if frames else result_schema_frame(result)
    if mode == "update":  # the last row of each key is its final value
        keys = list(UPDATE_KEYS[name])
        output = output.sort("_batch", maintain_order=True).unique(
            keys, keep="last", maintain_order=True
        )
    return seconds, output.drop("_batch", strict=False)


def result_schema_frame(result: DataFrame) -> pl.DataFrame:
    """An empty frame with the query's columns (no micro-batch had a row)."""
    return pl.DataFrame(schema=list(result.columns))


_WARMED: set[tuple[int, str]] = set()


def run(
    spark: SparkSession,
    name: str,
    root: Path,
    max_files_per_trigger: int | None,
    *,
    check: bool = False,
    warm_up: bool | None = None,
) -> tuple[float, pl.DataFrame | None]:
    """Run query ``name`` over the files of ``root``; its seconds and, with ``check``, output.

    Parameters
    ----------
    spark
        The session (``session()``).
    name
        The query, ``"q5"``.
    root
        The data set: ``root/person``, ``root/auction``, ``root/bid``.
    max_files_per_trigger
        Files per micro-batch (``None`` or 0: all in one).
    check
        Collect the output (``foreachBatch``) instead of the ``noop`` sink.
    warm_up
        Run the query once, unmeasured, on the first files before the first measured run
        of it in this session (default: when not ``check``).

    Raises
    ------
    ValueError
        Spark cannot run the query (``SUPPORTED`` says why).
    """
    why = SUPPORTED.get(name, f"no query {name!r}")
    if why is not None:
        raise ValueError(f"Spark cannot run {name}: {why}")
    inputs = INPUTS.get(name, ("bid",))
    flush = name in FLUSH
    if warm_up if warm_up is not None else not check:
        key = (id(spark), name)
        if key not in _WARMED:
            dirs = {s: staged(root, s, flush=flush, limit=WARM_UP_FILES) for s in inputs}
            _execute(spark, name, dirs, max_files_per_trigger, check=False)
            _WARMED.add(key)
    dirs = {s: staged(root, s, flush=flush) for s in inputs}
    return _execute(spark, name, dirs, max_files_per_trigger, check=check)


def refusals(spark: SparkSession, name: str, root: Path) -> dict[str, str]:
    """Spark's error for a refused query in each output mode (its first line).

    Raises
    ------
    AssertionError
        Spark ran the query in some mode after all (``SUPPORTED`` is out of date).
    """
    errors: dict[str, str] = {}
    inputs = INPUTS.get(name, ("bid",))
    dirs = {s: staged(root, s, flush=True) for s in inputs}
    for mode in ("append", "update", "complete"):
        checkpoint = tempfile.mkdtemp(prefix=f"spark-nexmark-{name}-")
        try:
            query = (
                REFUSED[name](Streams(spark, dirs, 1))
                .writeStream.format("noop")
                .outputMode(mode)
                .trigger(availableNow=True)
                .option("checkpointLocation", checkpoint)
                .start()
            )
            query.awaitTermination()
        except Exception as exc:  # Spark's AnalysisException, through py4j
            errors[mode] = str(exc).strip().splitlines()[0]
        else:
            msg = f"Spark ran {name} in {mode} mode: update SUPPORTED"
            raise AssertionError(msg)
        finally:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return errors
