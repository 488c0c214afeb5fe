"""Nexmark latency: event-to-sink latency at a fixed arrival rate, with a 100 ms trigger
or an as-fast-as-possible one (``--trigger-ms 0``).

The issue: "with a processing-time trigger of 100 ms and events arriving at a
fixed rate, report p50/p95/p99 of event-to-sink latency at 25%, 50% and 75% of
the maximum sustainable rate, and the fixed per-batch overhead (tiny batches)".
Target: p95 <= 200 ms at 50% load. Issue 14's target 4: with an as-fast-as-possible
trigger (``--trigger-ms 0``: the next batch starts as soon as the previous one
finished and a file is there; the engine polls an idle source every 10 ms), p99
<= 50 ms at 50% of the maximum sustainable rate.

How one measurement runs (:func:`measure`):

- A **producer** makes parquet files of bid rows (the Nexmark ``BID`` schema
  plus ``id``, a sequence number, and ``emitted_at``) appear in a landing
  directory at a fixed rate: one file every ``file_interval_ms`` (20 ms) on an
  absolute schedule, ``rate * interval`` rows each. The files are written
  beforehand into a staging directory beside the landing one, each stamped with
  the wall-clock time it is due (``emitted_at``, and ``date_time`` in ms); a
  thread then renames each into place at that time (an atomic rename, as the
  file source asks of producers). Writing parquet on the fly would take a core
  of the two the query runs on at high rates; renaming costs nothing, and a
  rename that comes late counts against the latency, never for it.
- The **query** is Nexmark q1 with a filter (:func:`q1`: bids not from one
  channel, price in euros ``price * 0.908``) over ``ms.scan_files``, with
  ``Trigger.every("100ms")`` into ``foreach_batch``. The sink function reads the
  wall clock once when called and computes, per row and vectorised,
  ``(now - emitted_at).dt.total_microseconds()``.
- The source deletes each file once its batch committed (``clean_source=
  "delete"``, ``--clean-source off`` keeps them): the file source lists the
  whole directory every trigger, at about 20 µs per file, so a landing
  directory that keeps 50 files a second costs a trigger 1 ms more every
  second of the run (55 ms per trigger after a minute); a 10-second run would
  hide that, a live pipeline would not.
- The first ``warm_up_s`` of rows and batches are left out of the figures.
  Every run checks, before any figure counts, that the sink received exactly
  the rows the same query text gives on the written rows as a static Polars
  ``LazyFrame``, each once.

Figures per run: latency p50/p95/p99/max, split into the wait until the batch
that took the row started (its logged batch timestamp) and the batch's own
time up to the sink; batches, rows per batch, batch duration (mean, p95) and
its phases, the gap between batch starts, and the producer's achieved rate.

**Maximum sustainable rate** (:func:`find_max_rate`): the highest rate at which
the query keeps the trigger's pace, searched live with the same producer:
short probes at doubling rates until one is not sustainable, then a few
geometric bisection steps. A probe is sustainable when, after its warm-up,
90% of its batches take at most the trigger interval (so batches start every
interval and no backlog builds up; a mean under the interval is not enough:
on this machine a few slow batches start a backlog that larger batches then
carry) and the producer achieved its rate (otherwise it is the limit, and the
result says so). With an as-fast-as-possible trigger there is no interval to
keep: a batch takes whatever arrived while the previous one ran, so batches grow
with the rate and their duration diverges near the engine's throughput limit;
the bound is then ``--pace-ms`` (default 100 ms, the 100 ms trigger's bound): 90%
of the batches within it. A probe the query failed is run once more before it counts
(the machine is shared). ``--max-rate`` skips the search. Each load run
reports whether it kept the pace by the same rule over its whole length.

**Per-batch overhead** (:func:`per_batch_overhead`): one row per file, a file every 50 ms (2 files per 100 ms batch): the median batch
duration and its phases are the fixed cost of a batch, and the latency the
floor any rate pays. Next to it, one small Polars reference in the same run:
read one such file and run the query on it.

``--profile`` adds one more run at 50% load under ``py-spy`` and reports where
the query thread's time in a trigger goes, and the reader threads' (after the
measured runs: sampling takes CPU).

    python benchmarks/nexmark/latency.py [--seconds 10] [--probe-seconds 3]
        [--max-rate ROWS_PER_S] [--trigger-ms 100] [--file-interval-ms 20]
        [--clean-source delete|off] [--work-dir DIR] [--profile] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

if __package__ in (None, ""):  # run as a script: make ``nexmark`` and the helpers importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import polars as pl
from state_scaling import Profiler, source_version  # benchmarks/

import microstream as ms
from microstream.runtime.progress import QueryProgress, QueryProgressEvent
from nexmark.schema import BID, DOLLAR_TO_EURO

RESULTS = Path(__file__).resolve().parents[1] / "results"
PHASES = ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
TARGET = {"load": 0.5, "p95_ms": 200.0}
TARGET_ASAP = {"load": 0.5, "p99_ms": 50.0}
"""Issue 14's target 4, for an as-fast-as-possible trigger (``trigger_ms=0``)."""


def target_of(settings: Settings) -> dict[str, float]:
    """The latency target of a trigger: 200 ms p95 with an interval, 50 ms p99 without."""
    return TARGET_ASAP if settings.trigger_ms == 0 else TARGET


LOADS = (0.25, 0.5, 0.75)

INPUT_SCHEMA = pl.Schema({"id": pl.Int64(), **BID, "emitted_at": pl.Datetime("us")})
"""The landing files: a sequence number, the Nexmark bid, the producer's wall clock."""

CHANNELS = ("Google", "Facebook", "Baidu", "Apple")
DROPPED_CHANNEL = "Baidu"

Frame = TypeVar("Frame", ms.StreamFrame, pl.LazyFrame)


# -- the query -------------------------------------------------------------------------------------


def q1(bids: Frame) -> Frame:
    """Nexmark q1 with a filter: bids in euros, without one channel's.

    The same text runs on the stream and on a static ``pl.LazyFrame`` (the
    oracle the sink's rows are checked against).

    Parameters
    ----------
    bids
        Rows of :data:`INPUT_SCHEMA`, a ``StreamFrame`` or a ``LazyFrame``.

    Returns
    -------
    StreamFrame or LazyFrame
        ``id``, ``auction``, ``bidder``, ``price`` (euros), ``date_time``, ``emitted_at``.

    Examples
    --------
    >>> import polars as pl
    >>> bids = bid_pool(4, seed=1).with_columns(
    ...     id=pl.int_range(4, dtype=pl.Int64), emitted_at=pl.lit(0).cast(pl.Datetime("us"))
    ... )
    >>> q1(bids.lazy()).collect().columns
    ['id', 'auction', 'bidder', 'price', 'date_time', 'emitted_at']
    """
    return bids.filter(pl.col("channel") != DROPPED_CHANNEL).select(
        "id",
        "auction",
        "bidder",
        (pl.col("price") * DOLLAR_TO_EURO).alias("price"),
        "date_time",
        "emitted_at",
    )


# -- the input: bid rows and the producer ----------------------------------------------------------


def bid_pool(rows: int, *, seed: int = 0) -> pl.DataFrame:
    """``rows`` bid-shaped rows (``BID`` columns; ``date_time`` is set by the producer).

    Prices are Nexmark's cents in ``[100, 100_000)``, channels four names
    (one of which q1 drops), urls and ``extra`` of a few dozen characters, so a
    row is about Nexmark's 100 bytes.

    Examples
    --------
    >>> pool = bid_pool(3)
    >>> pool.height, pool.columns == list(BID)
    (3, True)
    """
    rng = np.random.default_rng(seed)
    channel = np.array(CHANNELS)[rng.integers(0, len(CHANNELS), rows)]
    return pl.DataFrame(
        {
            "auction": 1000 + rng.integers(0, 10_000, rows),
            "bidder": 1000 + rng.integers(0, 100_000, rows),
            "price": rng.integers(100, 100_000, rows),
            "channel": channel,
            "url_id": rng.integers(0, 1_000_000, rows),
            "extra_len": rng.integers(0, 40, rows),
        }
    ).select(
        "auction",
        "bidder",
        "price",
        "channel",
        pl.format("https://www.nexmark.com/{}/item.htm?query=1", pl.col("url_id")).alias("url"),
        pl.lit(None, pl.Datetime("ms")).alias("date_time"),
        pl.lit("x" * 40).str.slice(0, pl.col("extra_len")).alias("extra"),
    )


@dataclass(frozen=True)
class PlannedFile:
    """One file of the producer's schedule."""

    index: int
    first_id: int
    rows: int
    pool_offset: int
    due_s: float
    """When it must appear in the landing directory, seconds after the producer's start."""


class Producer(threading.Thread):
    """Makes bid files appear in ``landing`` at a fixed rate for ``seconds``.

    File ``k`` is due ``k * file_interval_s`` after the start ``t0`` (an
    absolute schedule: a late file does not shift the later ones) and holds
    the rows ``round(rate * interval * k) .. round(rate * interval * (k + 1))``,
    so the total is exact even when a file's share is fractional (a file with
    no rows is skipped).

    :meth:`prepare` writes every file beforehand into ``staging`` (outside the
    landing directory), stamped with ``emitted_at = t0 + due``, choosing ``t0``
    far enough ahead that the writing ends before it; the thread then only
    renames each file into place at its due time. So the producer costs the
    query no CPU while it runs (it shares two cores with it), and a rename
    that comes late counts against the latency, never for it.
    """

    def __init__(
        self,
        landing: Path,
        staging: Path,
        pool: pl.DataFrame,
        *,
        rate: float,
        seconds: float,
        file_interval_s: float,
    ) -> None:
        super().__init__(name="nexmark-latency-producer", daemon=True)
        self.landing = landing
        self.staging = staging
        self.pool = pool
        self.rate = rate
        self.seconds = seconds
        self.file_interval_s = file_interval_s
        self.plan = self._plan()
        self.t0_us = 0
        """Wall clock (µs since the epoch) of the schedule's start, fixed by :meth:`prepare`."""
        self.renamed_us: list[int] = []
        """Wall clock of each file's rename, in schedule order."""
        self.prepare_s = 0.0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def _plan(self) -> list[PlannedFile]:
        n_files = max(1, round(self.seconds / self.file_interval_s))
        per_file = self.rate * self.file_interval_s
        plan, offset = [], 0
        for k in range(n_files):
            first, after = round(per_file * k), round(per_file * (k + 1))
            if after == first:
                continue
            if offset + after - first > self.pool.height:
                offset = 0
            plan.append(PlannedFile(k, first, after - first, offset, k * self.file_interval_s))
            offset += after - first
        return plan

    def emitted_us(self, planned: PlannedFile) -> int:
        return self.t0_us + round(planned.due_s * 1e6)

    def frame(self, planned: PlannedFile) -> pl.DataFrame:
        """The rows of one file, as written (``emitted_at`` needs ``t0`` fixed)."""
        emitted_us = self.emitted_us(planned)
        first = planned.first_id
        return (
            self.pool.slice(planned.pool_offset, planned.rows)
            .select(
                pl.int_range(first, first + planned.rows, dtype=pl.Int64).alias("id"),
                *(pl.col(c) for c in BID if c != "date_time"),
                pl.lit(emitted_us // 1_000).cast(pl.Datetime("ms")).alias("date_time"),
                pl.lit(emitted_us).cast(pl.Datetime("us")).alias("emitted_at"),
            )
            .select(list(INPUT_SCHEMA))
        )

    def prepare(self, *, lead_s: float = 0.3) -> None:
        """Write every file into ``staging``, with ``t0`` chosen after the writing ends.

        ``t0`` is set to now plus twice the estimated writing time (from timing
        the largest file) plus ``lead_s``; if the writing overran it anyway, it
        is done again with a larger margin. The written files are flushed to
        disk (``os.sync``) before ``t0``: otherwise the kernel writes back the
        hundreds of MB staged for a high rate while the query runs, an artefact
        of producing on the measured machine (a real producer writes elsewhere).
        """
        started = time.perf_counter()
        largest = max(self.plan, key=lambda f: f.rows)
        probe = self.staging / ".probe.parquet"
        t = time.perf_counter()
        self.frame(largest).write_parquet(probe)
        estimate = (time.perf_counter() - t) * len(self.plan)
        probe.unlink()
        for margin in (2.0, 4.0, 8.0):
            self.t0_us = time.time_ns() // 1_000 + round((margin * estimate + lead_s) * 1e6)
            for planned in self.plan:
                self.frame(planned).write_parquet(self._staged(planned))
            if hasattr(os, "sync"):
                os.sync()
            if time.time_ns() // 1_000 < self.t0_us - round(lead_s / 2 * 1e6):
                self.prepare_s = time.perf_counter() - started
                return
        msg = f"could not write {len(self.plan)} files ahead of their schedule"
        raise RuntimeError(msg)

    def _staged(self, planned: PlannedFile) -> Path:
        return self.staging / f"part-{planned.index:07d}.parquet"

    def run(self) -> None:
        try:
            # perf_counter for the schedule, anchored once to the wall clock of t0.
            t0 = time.perf_counter() + (self.t0_us - time.time_ns() // 1_000) / 1e6
            for planned in self.plan:
                delay = t0 + planned.due_s - time.perf_counter()
                if delay > 0 and self._stop_event.wait(delay):
                    break
                os.replace(self._staged(planned), self.landing / self._staged(planned).name)
                self.renamed_us.append(time.time_ns() // 1_000)
        except BaseException as exc:  # reported by the harness, which joins the thread
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()

    @property
    def files(self) -> list[PlannedFile]:
        """The files made visible so far."""
        return self.plan[: len(self.renamed_us)]

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def lateness_ms(self) -> list[float]:
        """How late each rename came after its due time."""
        return [
            (renamed - self.emitted_us(f)) / 1000 for f, renamed in zip(self.files, self.renamed_us)
        ]

    def achieved_rate(self) -> float:
        """Rows per second made visible, over the schedule's span up to the last rename."""
        if not self.renamed_us:
            return 0.0
        span_s = (self.renamed_us[-1] - self.t0_us) / 1e6 + self.file_interval_s
        return self.rows / span_s


@functools.lru_cache(maxsize=2)
def _pool_of(size: int) -> pl.DataFrame:
    return bid_pool(size)


def shared_pool(rows: int) -> pl.DataFrame:
    """A pool of at least ``rows`` rows (and 50k), generated once per power of two."""
    return _pool_of(max(50_000, 1 << max(rows - 1, 1).bit_length()))


# -- the sink and the progress log ------------------------------------------------------------------


@dataclass(frozen=True)
class SinkBatch:
    """What the sink function saw of one batch."""

    batch_id: int
    sink_us: int
    """Wall clock when the sink function was called (µs since the epoch)."""
    ids: np.ndarray
    latency_us: np.ndarray


class LatencySink:
    """The ``foreach_batch`` function: per row, sink time minus ``emitted_at`` (vectorised)."""

    def __init__(self) -> None:
        self.batches: list[SinkBatch] = []

    def __call__(self, df: pl.DataFrame, batch_id: int) -> None:
        sink_us = time.time_ns() // 1_000
        now = pl.lit(sink_us, pl.Int64).cast(pl.Datetime("us"))
        out = df.select(
            "id", (now - pl.col("emitted_at")).dt.total_microseconds().alias("latency_us")
        )
        self.batches.append(
            SinkBatch(batch_id, sink_us, out["id"].to_numpy(), out["latency_us"].to_numpy())
        )

    def ids(self) -> np.ndarray:
        """The ids of every row received, in arrival order."""
        return np.concatenate([b.ids for b in self.batches] or [np.empty(0, np.int64)])

    def latency_us(self) -> np.ndarray:
        """The latency of every row received, in µs, in the order of :meth:`ids`."""
        return np.concatenate([b.latency_us for b in self.batches] or [np.empty(0, np.int64)])

    def rows(self) -> pl.DataFrame:
        """Every row received: ``id``, ``batch_id``, ``sink_us``, ``latency_us``."""
        if not self.batches:
            return pl.DataFrame(
                schema={
                    "id": pl.Int64,
                    "batch_id": pl.Int64,
                    "sink_us": pl.Int64,
                    "latency_us": pl.Int64,
                }
            )
        sizes = [len(b.ids) for b in self.batches]
        return pl.DataFrame(
            {
                "id": np.concatenate([b.ids for b in self.batches]),
                "batch_id": np.repeat([b.batch_id for b in self.batches], sizes),
                "sink_us": np.repeat([b.sink_us for b in self.batches], sizes),
                "latency_us": np.concatenate([b.latency_us for b in self.batches]),
            },
            schema_overrides={"batch_id": pl.Int64, "sink_us": pl.Int64},
        )


class ProgressLog:
    """A listener keeping every progress record of one query (``recent_progress`` keeps 100)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.progress: list[QueryProgress] = []

    def on_query_progress(self, event: QueryProgressEvent) -> None:
        if event.progress.name == self.name:
            self.progress.append(event.progress)


# -- one measurement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """How every run of one benchmark is set up.

    Attributes
    ----------
    trigger_ms
        The query's ``Trigger.every`` interval; 0: as fast as possible.
    file_interval_ms
        One landing file every this many ms.
    warm_up_s
        Rows emitted and batches started in the first seconds are not counted.
    clean_source
        The file source's ``clean_source``: ``"delete"`` keeps the landing
        directory small, as a live pipeline must (see the module docstring).
    """

    trigger_ms: float = 100.0
    file_interval_ms: float = 20.0
    warm_up_s: float = 1.0
    clean_source: Literal["off", "delete"] = "delete"
    pace_ms: float = 100.0
    """With ``trigger_ms=0``: a rate is sustainable when 90% of batches take at most this."""

    @property
    def batch_bound_ms(self) -> float:
        """What a batch may take for the query to keep pace (the trigger's interval)."""
        return self.trigger_ms or self.pace_ms


@dataclass
class Measurement:
    """One run at one rate: the figures (:meth:`summary`) and, on request, every sink row."""

    rate: float
    seconds: float
    settings: Settings
    figures: dict[str, Any]
    rows: pl.DataFrame | None = field(default=None, repr=False)
    """``id``, ``batch_id``, ``sink_us``, ``latency_us`` of every row (``keep_rows=True``)."""
    landing: Path | None = None
    """The landing directory, when kept (``keep_files=True``)."""

    @property
    def sustainable(self) -> bool:
        return bool(self.figures["sustainable"])

    def summary(self) -> dict[str, Any]:
        return {"rate_rows_per_s": round(self.rate, 1), "seconds": self.seconds, **self.figures}


def measure(
    rate: float,
    seconds: float,
    *,
    settings: Settings | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    keep_rows: bool = False,
    keep_files: bool = False,
    profile: Path | None = None,
) -> Measurement:
    """Run :func:`q1` on files arriving at ``rate`` rows/s for ``seconds``; latency figures.

    The query is started (and its first, empty trigger has run) before the
    producer starts; after the producer's last file the query drains, then
    stops. Raises ``AssertionError`` unless the sink received exactly the rows
    the same query text gives on the written rows as a static Polars
    ``LazyFrame``, each once (:func:`check_exactly_once`).

    Parameters
    ----------
    rate
        Rows per second; a file every ``settings.file_interval_ms``.
    seconds
        How long the producer writes.
    settings
        Trigger, file interval, warm-up, ``clean_source``.
    work_dir
        Where the landing directory and the checkpoint go (a new temp dir
        inside it, removed afterwards unless ``keep_files``).
    keep_rows
        Keep every sink row in :attr:`Measurement.rows`.
    keep_files
        Keep the landing directory and checkpoint (:attr:`Measurement.landing`).
    profile
        Sample this process with ``py-spy`` while the producer runs, write the
        raw stacks there and add their summary (:func:`summarize_profile`) to
        the figures as ``"profile"`` (sampling takes CPU: the figures of such
        a run are not the clean ones).

    Returns
    -------
    Measurement
    """
    settings = settings or Settings()
    run_dir = Path(tempfile.mkdtemp(prefix=f"latency-{round(rate)}-", dir=work_dir))
    landing, staging = run_dir / "landing", run_dir / "staging"
    landing.mkdir()
    staging.mkdir()
    interval_s = settings.file_interval_ms / 1000
    pool = shared_pool(math.ceil(rate * interval_s) + 1)
    producer = Producer(
        landing, staging, pool, rate=rate, seconds=seconds, file_interval_s=interval_s
    )
    sink = LatencySink()
    name = f"nexmark-latency-{uuid.uuid4().hex[:8]}"
    log = ProgressLog(name)
    ms.add_listener(log)
    try:
        bids = ms.scan_files(
            str(landing), format="parquet", schema=INPUT_SCHEMA, clean_source=settings.clean_source
        )
        query = q1(bids).foreach_batch(
            sink,
            trigger=ms.Trigger.every(dt.timedelta(milliseconds=settings.trigger_ms)),
            checkpoint=str(run_dir / "checkpoint"),
            name=name,
        )
        try:
            query.process_all_available(timeout=60)  # started, first (empty) trigger done
            producer.prepare()  # the query idles meanwhile, at its trigger's pace
            profiler = None if profile is None else Profiler(profile, rate=200)
            producer.start()
            producer.join(timeout=seconds + 120)
            if producer.is_alive():
                producer.stop()
                producer.join()
                msg = f"the producer at {rate:,.0f} rows/s did not finish in {seconds + 120} s"
                raise RuntimeError(msg)
            if producer.error is not None:
                raise producer.error
            stopped_us = time.time_ns() // 1_000
            query.process_all_available(timeout=120)
        finally:
            query.stop()
            producer.stop()
            if profile is not None and profiler is not None:
                profiler.stop()
        exception = query.exception()
        if exception is not None:
            raise exception
    finally:
        ms.remove_listener(log)
    check_exactly_once(producer, sink)
    figures = _figures(producer, sink, log.progress, settings, stopped_us)
    if profile is not None:
        figures["profile"] = summarize_profile(profile)
    if not keep_files:
        shutil.rmtree(run_dir, ignore_errors=True)
    return Measurement(
        rate=rate,
        seconds=seconds,
        settings=settings,
        figures=figures,
        rows=sink.rows() if keep_rows else None,
        landing=landing if keep_files else None,
    )


def check_exactly_once(producer: Producer, sink: LatencySink) -> None:
    """The sink got exactly the ids of :func:`q1` over every row made visible, each once.

    The expected ids come from running the same query text on each file's rows
    as a static Polars ``LazyFrame``.

    Raises
    ------
    AssertionError
        Naming how many rows were missing, duplicated or unexpected.
    """
    total = producer.rows
    wanted = np.zeros(total, dtype=bool)
    for planned in producer.files:
        wanted[q1(producer.frame(planned).lazy()).select("id").collect()["id"].to_numpy()] = True
    ids = sink.ids()
    if ids.size and (ids.min() < 0 or ids.max() >= total):
        msg = f"the sink received ids outside 0..{total - 1} (the ids written)"
        raise AssertionError(msg)
    counts = np.bincount(ids, minlength=total)
    missing = int(np.count_nonzero(counts[wanted] == 0))
    duplicated = int(np.count_nonzero(counts > 1))
    unexpected = int(np.count_nonzero(counts[~wanted]))
    if missing or duplicated or unexpected:
        msg = (
            f"the sink received {ids.size} rows for {int(wanted.sum())} expected (of {total} "
            f"written): {missing} missing, {duplicated} duplicated, {unexpected} unexpected"
        )
        raise AssertionError(msg)


def _pct(values: np.ndarray | list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else 0.0


def _ms(values_us: np.ndarray) -> dict[str, float]:
    if values_us.size == 0:
        return {}
    return {
        "p50": round(_pct(values_us, 50) / 1000, 1),
        "p95": round(_pct(values_us, 95) / 1000, 1),
        "p99": round(_pct(values_us, 99) / 1000, 1),
        "max": round(float(values_us.max()) / 1000, 1),
        "mean": round(float(values_us.mean()) / 1000, 1),
    }


def _figures(
    producer: Producer,
    sink: LatencySink,
    progress: list[QueryProgress],
    settings: Settings,
    stopped_us: int,
) -> dict[str, Any]:
    """Latency, batch and producer figures, leaving out the warm-up."""
    if not progress:
        msg = f"no batch ran at {producer.rate:,.1f} rows/s ({producer.rows} rows written)"
        raise RuntimeError(msg)
    warm_up_us = producer.t0_us + int(settings.warm_up_s * 1e6)
    first_id = next(
        (f.first_id for f in producer.files if producer.emitted_us(f) >= warm_up_us), None
    )
    ids, latency = sink.ids(), sink.latency_us()
    counted = ids >= first_id if first_id is not None else np.zeros(ids.size, dtype=bool)
    # Split each row's latency at its batch's logged timestamp: the wait for the trigger
    # (and the listing that formed the batch) before it, the batch's own work after it.
    batch_us = {p.batch_id: p.batch_timestamp_ms * 1000 for p in progress}
    in_batch = np.repeat(
        np.array([b.sink_us - batch_us[b.batch_id] for b in sink.batches], dtype=np.int64),
        [b.ids.size for b in sink.batches],
    )
    steady = [
        p for p in progress if warm_up_us <= p.batch_timestamp_ms * 1000 <= stopped_us
    ] or progress
    totals = [p.durations_ms.total for p in steady]
    starts = [p.batch_timestamp_ms for p in steady]
    gaps = np.diff(np.asarray(starts, dtype=np.float64))
    mean_batch = statistics.fmean(totals) if totals else 0.0
    achieved = producer.achieved_rate()
    lateness = producer.lateness_ms()
    producer_ok = (
        achieved >= 0.95 * producer.rate and _pct(lateness, 50) < settings.file_interval_ms
    )
    keeps_pace = _pct(totals, 90) <= settings.batch_bound_ms
    limited_by = None if keeps_pace and producer_ok else "query" if producer_ok else "producer"
    phases = {
        "median": {
            k: round(statistics.median(getattr(p.durations_ms, k) for p in steady), 2)
            for k in PHASES
        },
        "mean": {
            k: round(statistics.fmean(getattr(p.durations_ms, k) for p in steady), 2)
            for k in PHASES
        },
    }
    last_sink_us = max((b.sink_us for b in sink.batches), default=stopped_us)
    return {
        "sustainable": limited_by is None,
        "limited_by": limited_by,
        "latency_ms": _ms(latency[counted]),
        "waiting_for_batch_ms": _ms(latency[counted] - in_batch[counted]),
        "batch_start_to_sink_ms": _ms(in_batch[counted]),
        "rows_measured": int(counted.sum()),
        "rows_written": producer.rows,
        "rows_received": int(ids.size),
        "batches": len(steady),
        "rows_per_batch_mean": round(statistics.fmean(p.num_input_rows for p in steady), 1),
        "batch_ms": {
            "mean": round(mean_batch, 1),
            "p50": round(_pct(totals, 50), 1),
            "p90": round(_pct(totals, 90), 1),
            "p95": round(_pct(totals, 95), 1),
            "max": round(max(totals, default=0.0), 1),
        },
        "phase_ms_median": phases["median"],
        "phase_ms_mean": phases["mean"],
        "batch_start_gap_ms": {
            "mean": round(float(gaps.mean()), 1) if gaps.size else 0.0,
            "p95": round(_pct(gaps, 95), 1),
        },
        "max_source_lag_files": max((s.lag or 0 for p in steady for s in p.sources), default=0),
        "drain_ms": round(max(0, last_sink_us - stopped_us) / 1000, 1),
        "producer": {
            "files": len(producer.files),
            "achieved_rows_per_s": round(achieved, 1),
            "prepare_s": round(producer.prepare_s, 2),
            "rename_lateness_ms": {
                "p50": round(_pct(lateness, 50), 2),
                "p95": round(_pct(lateness, 95), 2),
                "max": round(max(lateness, default=0.0), 2),
            },
        },
    }


# -- where a batch's time goes ---------------------------------------------------------------------

# Exclusive buckets for the query thread's samples while it runs a trigger: the first
# rule whose needles are all in a stack takes it (the order matters).
PROFILE_PARTS = (
    ("source: list the directory (latest_offset)", ("FileSource.latest_offset", "_list_files")),
    ("source: write its log entry (latest_offset)", ("FileSource.latest_offset", "write_")),
    ("source: other latest_offset", ("FileSource.latest_offset",)),
    ("read: start the reader threads", ("FileSource.read", "ThreadPoolExecutor.submit")),
    ("read: join the reader threads", ("FileSource.read", "shutdown")),
    ("read: concat the files' frames", ("FileSource.read", "concat")),
    ("read: wait for the reader threads (parquet decoding)", ("FileSource.read",)),
    ("WAL: offsets/N", ("write_offsets",)),
    ("sink (the benchmark's foreach_batch function)", ("add_batch",)),
    ("commit log: commits/N", ("write_commit",)),
    ("source clean-up (clean_source)", ("FileSource.commit",)),
    ("progress record and events", ("_publish_progress",)),
    ("compute (the query's Polars plan)", ("_run_batch", "collect")),
)
# The reader threads' samples (stacks through FileSource._read_file), by step.
READER_PARTS = (
    ("read_parquet_schema (a second open of each file)", ("read_parquet_schema",)),
    ("_conform (select/cast even when the schema matches)", ("_conform",)),
    ("read_parquet (decoding)", ("read_parquet",)),
)


def _buckets(
    stacks: list[tuple[str, int]], rules: tuple[tuple[str, tuple[str, ...]], ...]
) -> dict[str, float]:
    total = sum(count for _, count in stacks)
    shares: dict[str, int] = {}
    for stack, count in stacks:
        label = next((name for name, needles in rules if all(n in stack for n in needles)), None)
        shares[label or "other"] = shares.get(label or "other", 0) + count
    ordered = sorted(shares.items(), key=lambda kv: -kv[1])
    return {name: round(100 * count / total, 1) for name, count in ordered} if total else {}


def summarize_profile(path: Path) -> dict[str, Any]:
    """Shares of the samples of ``py-spy record --format raw --idle``, by part of a batch.

    ``query_thread_pct``: the query thread while it runs a trigger (waiting
    for the next trigger is left out), in :data:`PROFILE_PARTS`;
    ``reader_threads_pct``: the file source's reader threads, in
    :data:`READER_PARTS`. py-spy sees Python frames only: time in Polars is
    counted to the Python call that entered it.
    """
    query: list[tuple[str, int]] = []
    readers: list[tuple[str, int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "FileSource._read_file" in stack:
            readers.append((stack, int(count)))
        elif "StreamExecution._trigger_once" in stack:
            query.append((stack, int(count)))
    return {
        "samples": {
            "query_thread": sum(c for _, c in query),
            "readers": sum(c for _, c in readers),
        },
        "query_thread_pct": _buckets(query, PROFILE_PARTS),
        "reader_threads_pct": _buckets(readers, READER_PARTS),
    }


# -- the maximum sustainable rate ------------------------------------------------------------------


def find_max_rate(
    *,
    settings: Settings,
    probe_seconds: float = 3.0,
    start_rate: float = 25_000,
    ceiling: float = 50_000_000,
    refine_steps: int = 3,
    work_dir: str | os.PathLike[str] | None = None,
    log: bool = True,
) -> dict[str, Any]:
    """The highest rate (rows/s) at which the query keeps the trigger's pace.

    Probes of ``probe_seconds`` (warm-up: a sixth of it) at ``start_rate``,
    doubling until a probe is not sustainable (see :attr:`Measurement.sustainable`),
    then ``refine_steps`` geometric bisections between the last sustainable
    rate and the first that was not. If ``start_rate`` already fails, the
    search halves down instead. A probe that fails because of the query is
    run a second time before the rate counts as unsustainable (the machine is
    shared; one slow second is not a limit).

    Returns
    -------
    dict
        ``max_rate_rows_per_s``, ``limited_by`` (what the first failing probe
        ran out of: ``"query"`` or ``"producer"``), and every probe's summary.
    """
    probe = dataclasses.replace(settings, warm_up_s=probe_seconds / 6)
    probes: list[Measurement] = []

    def attempt(rate: float) -> bool:
        for _ in range(2):  # a probe the query failed is tried again: the machine is shared
            m = measure(rate, probe_seconds, settings=probe, work_dir=work_dir)
            probes.append(m)
            if log:
                f = m.figures
                verdict = "ok" if m.sustainable else f"NOT sustainable ({f['limited_by']})"
                print(
                    f"  probe {rate:>12,.0f} rows/s: p90 batch {f['batch_ms']['p90']:7.1f} ms,"
                    f" p95 latency {f['latency_ms'].get('p95', 0):8.1f} ms -> {verdict}",
                    flush=True,
                )
            if m.sustainable or m.figures["limited_by"] != "query":
                return m.sustainable
        return False

    good: float | None = None
    bad: float | None = None
    rate = start_rate
    if attempt(rate):
        good = rate
        while rate * 2 <= ceiling:
            rate *= 2
            if not attempt(rate):
                bad = rate
                break
            good = rate
    else:
        bad = rate
        while rate / 2 >= 100:
            rate /= 2
            if attempt(rate):
                good = rate
                break
            bad = rate
    if good is not None and bad is not None:
        for _ in range(refine_steps):
            mid = math.sqrt(good * bad)
            if attempt(mid):
                good = mid
            else:
                bad = mid
    first_failure = next((m for m in probes if m.rate == bad), None)
    return {
        "max_rate_rows_per_s": round(good or 0.0),
        "first_unsustainable_rows_per_s": None if bad is None else round(bad),
        "limited_by": None if first_failure is None else first_failure.figures["limited_by"],
        "definition": (
            "highest probed rate at which 90% of the batches (after warm-up) take at most "
            "the trigger interval, with the producer achieving its rate"
        ),
        "probe_seconds": probe_seconds,
        "probes": [m.summary() for m in probes],
    }


# -- the per-batch overhead -------------------------------------------------------------------------


def polars_reference(directory: Path, repeats: int = 200) -> float:
    """Median ms to read one 1-row landing file and run :func:`q1` on it with Polars alone."""
    path = directory / "one-row.parquet"
    pool = shared_pool(1)
    pool.head(1).with_columns(
        id=pl.lit(0, pl.Int64), emitted_at=pl.lit(0).cast(pl.Datetime("us"))
    ).select(list(INPUT_SCHEMA)).write_parquet(path)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        q1(pl.read_parquet(path).lazy()).collect()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def per_batch_overhead(
    seconds: float,
    *,
    settings: Settings,
    file_interval_ms: float = 50.0,
    work_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Tiny batches: one row per file, a file every ``file_interval_ms``.

    Returns the run's figures (median batch duration and phases are the fixed
    cost of a batch; latency is the floor) and the Polars reference.
    """
    tiny = dataclasses.replace(settings, file_interval_ms=file_interval_ms)
    m = measure(1000 / file_interval_ms, seconds, settings=tiny, work_dir=work_dir)
    scratch = Path(tempfile.mkdtemp(prefix="latency-ref-", dir=work_dir))
    try:
        reference = polars_reference(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {
        "rows_per_file": 1,
        "file_interval_ms": file_interval_ms,
        **m.summary(),
        "polars_read_one_file_and_query_ms": round(reference, 3),
        "trigger_only_latency_floor_ms": {
            "mean": settings.trigger_ms / 2,
            "p95": settings.trigger_ms * 0.95,
        },
    }


# -- the whole benchmark ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Host, cores, Python and Polars versions, and the engine's commit."""
    return {
        "host": socket.gethostname(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "polars": pl.__version__,
        "numpy": np.__version__,
        "source": source_version(),
    }


def run(
    seconds: float = 10.0,
    *,
    max_rate: float | None = None,
    probe_seconds: float = 3.0,
    loads: Iterable[float] = LOADS,
    overhead_seconds: float | None = None,
    settings: Settings | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    profile: bool = False,
    log: bool = True,
) -> dict[str, Any]:
    """The latency benchmark: max sustainable rate, runs at ``loads`` of it, tiny batches.

    Parameters
    ----------
    seconds
        Length of each run at a load (its first ``settings.warm_up_s`` not counted).
    max_rate
        Rows/s taken as the maximum sustainable rate; searched with
        :func:`find_max_rate` when ``None``.
    probe_seconds
        Length of each probe of the search.
    loads
        Shares of the maximum rate to measure latency at.
    overhead_seconds
        Length of the tiny-batch run (default: ``seconds``).
    settings
        Trigger, file interval, warm-up and ``clean_source`` of every run.
    work_dir
        Where landing directories and checkpoints go (default: a temp dir).
    profile
        After the measured runs, one more at the target's load under
        ``py-spy`` (:func:`summarize_profile`), reported as ``"profile"``.
    log
        Print each step as it finishes.

    Returns
    -------
    dict
        ``machine``, ``settings``, ``max_rate``, ``loads`` (one summary per
        load), ``per_batch_overhead``, ``target`` (and whether it is met).
    """
    settings = settings or Settings()
    target = target_of(settings)
    own_dir = work_dir is None
    root = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="ms-latency-"))
    try:
        started = time.perf_counter()
        if max_rate is None:
            if log:
                print("searching the maximum sustainable rate...", flush=True)
            search = find_max_rate(
                settings=settings, probe_seconds=probe_seconds, work_dir=root, log=log
            )
        else:
            search = {"max_rate_rows_per_s": round(max_rate), "given": True}
        top = float(search["max_rate_rows_per_s"])
        if top <= 0:
            msg = "no probed rate was sustainable; pass --max-rate to measure anyway"
            raise RuntimeError(msg)
        results = []
        for load in loads:
            m = measure(top * load, seconds, settings=settings, work_dir=root)
            results.append({"load": load, **m.summary()})
            if log:
                print(f"  {_row(f'{load:.0%} load', results[-1])}", flush=True)
        overhead = per_batch_overhead(overhead_seconds or seconds, settings=settings, work_dir=root)
        if log:
            print(f"  {_row('tiny batches', overhead)}", flush=True)
        profiled = None
        if profile:
            stacks = root / "py-spy.txt"
            m = measure(
                top * target["load"], seconds, settings=settings, work_dir=root, profile=stacks
            )
            profiled = {"load": target["load"], **m.summary()}
    finally:
        if own_dir:
            shutil.rmtree(root, ignore_errors=True)
    at_target = next((r for r in results if r["load"] == target["load"]), None)
    pct = "p99" if "p99_ms" in target else "p95"
    measured = None if at_target is None else at_target["latency_ms"].get(pct)
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "settings": {
            "trigger_ms": settings.trigger_ms,
            "trigger": "as fast as possible" if settings.trigger_ms == 0 else "every trigger_ms",
            "pace_ms": settings.batch_bound_ms,
            "file_interval_ms": settings.file_interval_ms,
            "warm_up_s": settings.warm_up_s,
            "clean_source": settings.clean_source,
            "seconds_per_load": seconds,
            "query": "q1 with a filter: bids not from one channel, price * 0.908 (nexmark.latency.q1)",
            "sink": "foreach_batch: per row, wall clock at the call minus emitted_at",
            "producer": (
                "parquet files written beforehand into a staging dir, renamed into the "
                "landing dir at their due time by a thread (emitted_at = due time)"
            ),
        },
        "max_rate": search,
        "loads": results,
        "per_batch_overhead": overhead,
        "target": {
            **target,
            f"measured_{pct}_ms": measured,
            "met": None if measured is None else measured <= target[f"{pct}_ms"],
        },
        **({"profile": profiled} if profiled is not None else {}),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


# -- output ----------------------------------------------------------------------------------------


def _row(label: str, r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"{label:<14} {r['rate_rows_per_s']:>12,.0f} {lat.get('p50', 0):>7.1f} "
        f"{lat.get('p95', 0):>7.1f} {lat.get('p99', 0):>7.1f} {lat.get('max', 0):>7.1f} "
        f"{r['batches']:>7} {r['rows_per_batch_mean']:>10,.0f} {r['batch_ms']['mean']:>8.1f} "
        f"{r['batch_ms']['p90']:>8.1f} {'yes' if r['sustainable'] else 'NO':>5}"
    )


def table(result: dict[str, Any]) -> str:
    """The printed summary: one line per load and the tiny batches, then the target."""
    header = (
        f"{'run':<14} {'rows/s':>12} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'batches':>7} {'rows/batch':>10} {'batch ms':>8} {'p90 b ms':>8} {'pace':>5}"
    )
    lines = [header, "-" * len(header)]
    lines += [_row(f"{r['load']:.0%} load", r) for r in result["loads"]]
    overhead = result["per_batch_overhead"]
    lines.append(_row("tiny batches", overhead))
    search = result["max_rate"]
    lines.append("")
    lines.append(
        f"max sustainable rate: {search['max_rate_rows_per_s']:,} rows/s"
        + (
            f" (first unsustainable {search['first_unsustainable_rows_per_s']:,}, "
            f"limited by the {search['limited_by']})"
            if search.get("first_unsustainable_rows_per_s")
            else ""
        )
    )
    phases = ", ".join(f"{k} {v}" for k, v in overhead["phase_ms_median"].items())
    lines.append(f"per-batch overhead (median ms): {phases}")
    lines.append(
        f"Polars alone, read one 1-row file + q1: {overhead['polars_read_one_file_and_query_ms']} ms"
    )
    profiled = result.get("profile")
    if profiled is not None:
        shares = profiled["profile"]["query_thread_pct"]
        top = ", ".join(f"{name} {pct}%" for name, pct in list(shares.items())[:6])
        lines.append(f"profile at {profiled['load']:.0%} load (query thread, in a trigger): {top}")
        readers = profiled["profile"]["reader_threads_pct"]
        lines.append("  reader threads: " + ", ".join(f"{k} {v}%" for k, v in readers.items()))
    target = result["target"]
    verdict = "met" if target["met"] else "MISSED"
    pct = "p99" if "p99_ms" in target else "p95"
    lines.append(
        f"target {pct} <= {target[f'{pct}_ms']:.0f} ms at {target['load']:.0%} load: "
        f"{target[f'measured_{pct}_ms']} ms -> {verdict}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load run")
    parser.add_argument("--probe-seconds", type=float, default=3.0)
    parser.add_argument("--max-rate", type=float, default=None, help="skip the search")
    parser.add_argument(
        "--trigger-ms", type=float, default=100.0, help="0: as fast as possible (target 4)"
    )
    parser.add_argument(
        "--pace-ms",
        type=float,
        default=100.0,
        help="with --trigger-ms 0: the batch duration 90%% of batches keep to at a sustainable rate",
    )
    parser.add_argument(
        "--loads", default=",".join(str(x) for x in LOADS), help="shares of the max rate, e.g. 0.5"
    )
    parser.add_argument("--file-interval-ms", type=float, default=20.0)
    parser.add_argument("--warm-up", type=float, default=1.0, help="seconds not counted")
    parser.add_argument("--clean-source", choices=("off", "delete"), default="delete")
    parser.add_argument(
        "--profile", action="store_true", help="one more run at 50%% load under py-spy"
    )
    parser.add_argument("--work-dir", default=None, help="landing dirs + checkpoints")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    settings = Settings(
        trigger_ms=args.trigger_ms,
        file_interval_ms=args.file_interval_ms,
        warm_up_s=args.warm_up,
        clean_source=args.clean_source,
        pace_ms=args.pace_ms,
    )
    result = run(
        args.seconds,
        loads=[float(x) for x in args.loads.split(",")],
        max_rate=args.max_rate,
        probe_seconds=args.probe_seconds,
        settings=settings,
        work_dir=args.work_dir,
        profile=args.profile,
    )
    print()
    print(table(result))
    out = args.out or RESULTS / f"{dt.date.today()}-{socket.gethostname()}-nexmark-latency.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
