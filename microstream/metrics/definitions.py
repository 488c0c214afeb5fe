"""The metrics of a query, declared once and kept from its progress events.

Both exporters (:mod:`microstream.metrics.prometheus`, :mod:`microstream.metrics.otel`) read
this module; neither declares a metric of its own.

1. :data:`METRICS` declares every metric: its Prometheus name, type, unit,
   help text and labels. A query's series carry ``query_name`` and
   ``query_id``; per-operator series add ``operator_id`` and
   ``operator_kind``; per-source series add ``source`` (the source's index in
   the query, ``"0"``, ``"1"``, ...) and ``source_kind``.
2. :class:`ProgressMetrics` is a listener (``on_query_started``,
   ``on_query_progress``, ``on_query_terminated``): it adds each batch's
   counts to counters, keeps the last batch's gauges and buckets the phase
   durations; :meth:`ProgressMetrics.samples` reads them at collection time.
3. When a query terminates, its series are removed except
   ``microstream_query_up`` (0) and ``microstream_query_failed`` (1 when it
   ended with an exception), kept for the last ``keep_terminated`` queries
   so that an alert can see a query that died.

Credentials never reach a label: a source's description can hold a URL with
``user:password@`` or storage options, so a source is labelled by its index
and a *kind* cut from the description (the leading identifier, such as
``KafkaSource``), never by the description itself.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from microstream.runtime.progress import (
        BatchDurations,
        QueryProgress,
        QueryProgressEvent,
        QueryStartedEvent,
        QueryTerminatedEvent,
    )

__all__ = [
    "METRICS",
    "MetricDef",
    "ProgressMetrics",
    "Sample",
    "label_value",
    "phase_durations",
    "source_kind",
]

MetricType = Literal["counter", "gauge", "histogram"]

QUERY_LABELS = ("query_name", "query_id")
OPERATOR_LABELS = (*QUERY_LABELS, "operator_id", "operator_kind")
SOURCE_LABELS = (*QUERY_LABELS, "source", "source_kind")

DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip
"""Upper bounds (seconds) of the batch duration buckets: a millisecond to five minutes."""


@dataclass(frozen=True)
class MetricDef:
    """One metric: its Prometheus name, type, OpenTelemetry unit, help and labels.

    Examples
    --------
    >>> from microstream.metrics.definitions import BATCHES
    >>> BATCHES.name, BATCHES.otel_name, BATCHES.labels
    ('microstream_batches_total', 'microstream_batches', ('query_name', 'query_id'))
    """

    name: str
    """The Prometheus name: ``microstream_`` prefix, ``_total`` on counters, base units."""
    type: MetricType
    unit: str
    """The unit in UCUM (``s``, ``By``, ``{row}``), as OpenTelemetry wants it."""
    help: str
    labels: tuple[str, ...] = QUERY_LABELS
    buckets: tuple[float, ...] = ()

    @property
    def otel_name(self) -> str:
        """The OpenTelemetry instrument name: the Prometheus one without ``_total``
        (an OpenTelemetry-to-Prometheus bridge adds it back to counters)."""
        return self.name.removesuffix("_total")


QUERY_UP = MetricDef(
    "microstream_query_up", "gauge", "1",
    "1 while the query runs, 0 once it has terminated.",
)  # fmt: skip
QUERY_FAILED = MetricDef(
    "microstream_query_failed", "gauge", "1",
    "1 if the query terminated with an exception, else 0.",
)  # fmt: skip
INPUT_ROWS = MetricDef(
    "microstream_input_rows_total", "counter", "{row}",
    "Rows read from all sources (progress num_input_rows, summed over batches).",
)  # fmt: skip
OUTPUT_ROWS = MetricDef(
    "microstream_output_rows_total", "counter", "{row}",
    "Rows handed to the sink (progress num_output_rows, summed over batches).",
)  # fmt: skip
BATCHES = MetricDef(
    "microstream_batches_total", "counter", "{batch}",
    "Micro-batches run (re-runs of a logged batch after a restart included).",
)  # fmt: skip
WORKER_RESTARTS = MetricDef(
    "microstream_worker_restarts_total", "counter", "{restart}",
    "Times a cluster runtime replaced lost workers and re-ran a batch (progress "
    "worker_restarts, summed over batches).",
)  # fmt: skip
INPUT_ROWS_PER_SECOND = MetricDef(
    "microstream_input_rows_per_second", "gauge", "{row}/s",
    "Rows per second arriving, as of the last batch (progress input_rows_per_second).",
)  # fmt: skip
PROCESSED_ROWS_PER_SECOND = MetricDef(
    "microstream_processed_rows_per_second", "gauge", "{row}/s",
    "Rows per second processed by the last batch (progress processed_rows_per_second).",
)  # fmt: skip
BATCH_DURATION = MetricDef(
    "microstream_batch_duration_seconds", "histogram", "s",
    "Time each batch spent per phase (latest_offset, wal, read, compute, sink, commit; "
    "total is the whole batch).",
    (*QUERY_LABELS, "phase"),
    DURATION_BUCKETS,
)  # fmt: skip
WATERMARK = MetricDef(
    "microstream_watermark_seconds", "gauge", "s",
    "The event-time watermark, in seconds since the epoch; absent before the first event "
    "and for a query without a watermark.",
)  # fmt: skip
EVENT_TIME_LAG = MetricDef(
    "microstream_event_time_lag_seconds", "gauge", "s",
    "Wall clock at collection minus the watermark; absent while there is no watermark.",
)  # fmt: skip
ROWS_DROPPED_LATE = MetricDef(
    "microstream_rows_dropped_late_total", "counter", "{row}",
    "Input rows an operator dropped as late (behind the watermark), per operator.",
    OPERATOR_LABELS,
)  # fmt: skip
ROWS_DROPPED_NULL_TIME = MetricDef(
    "microstream_rows_dropped_null_time_total", "counter", "{row}",
    "Input rows an operator dropped because their event time is null, per operator.",
    OPERATOR_LABELS,
)  # fmt: skip
STATE_ROWS = MetricDef(
    "microstream_state_rows", "gauge", "{row}",
    "Rows in an operator's state after the last batch.",
    OPERATOR_LABELS,
)  # fmt: skip
STATE_BYTES = MetricDef(
    "microstream_state_bytes", "gauge", "By",
    "Memory held by an operator's state after the last batch, in bytes.",
    OPERATOR_LABELS,
)  # fmt: skip
SOURCE_INPUT_ROWS = MetricDef(
    "microstream_source_input_rows_total", "counter", "{row}",
    "Rows read from one source, summed over batches.",
    SOURCE_LABELS,
)  # fmt: skip
SOURCE_LAG = MetricDef(
    "microstream_source_lag", "gauge", "1",
    "What a source has available but not yet in a batch, after the last batch, in the "
    "source's units (Kafka: records behind; files: files pending); absent when the "
    "source cannot tell.",
    SOURCE_LABELS,
)  # fmt: skip
SOURCE_EVENTS = MetricDef(
    "microstream_source_events_total", "counter", "1",
    "Source-specific counts by kind, summed over batches: bad records skipped or "
    "dead-lettered, files skipped or dead-lettered, offsets lost, files or new columns "
    "ignored (the keys of the progress's source metrics).",
    (*SOURCE_LABELS, "kind"),
)  # fmt: skip

METRICS: tuple[MetricDef, ...] = (
    QUERY_UP,
    QUERY_FAILED,
    INPUT_ROWS,
    OUTPUT_ROWS,
    BATCHES,
    WORKER_RESTARTS,
    INPUT_ROWS_PER_SECOND,
    PROCESSED_ROWS_PER_SECOND,
    BATCH_DURATION,
    WATERMARK,
    EVENT_TIME_LAG,
    ROWS_DROPPED_LATE,
    ROWS_DROPPED_NULL_TIME,
    STATE_ROWS,
    STATE_BYTES,
    SOURCE_INPUT_ROWS,
    SOURCE_LAG,
    SOURCE_EVENTS,
)
"""Every metric microstream exports, in the order of the README's table."""

_NOT_LABEL = re.compile(r"[^A-Za-z0-9_]+")
_LEADING_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_MAX_LABEL = 64


def source_kind(description: str) -> str:
    """The label of a source's kind: the leading identifier of its description.

    Nothing past the first character that is not a letter, digit or ``_``
    (a ``[``, ``:`` or ``/``), so no path, URL or option of the description
    reaches a label; ``"unknown"`` if it does not start with a letter.

    Examples
    --------
    >>> source_kind("KafkaSource[events]")
    'KafkaSource'
    >>> source_kind("FileSource[csv: s3://user:secret@bucket/in]")
    'FileSource'
    >>> source_kind("://x")
    'unknown'
    """
    match = _LEADING_IDENTIFIER.match(description)
    return match.group(0)[:_MAX_LABEL] if match else "unknown"


def label_value(name: str) -> str:
    """A name the engine or a connector chose (an operator kind, a count's key) as a label:
    runs of other characters than letters, digits and ``_`` become one ``_``.

    Examples
    --------
    >>> label_value("window aggregation")
    'window_aggregation'
    >>> label_value("bad_records_skipped")
    'bad_records_skipped'
    """
    return _NOT_LABEL.sub("_", name).strip("_")[:_MAX_LABEL] or "unknown"


def phase_durations(durations: BatchDurations) -> dict[str, float]:
    """Seconds per phase of one batch (``total`` included) from its milliseconds.

    Examples
    --------
    >>> from microstream.runtime.progress import BatchDurations
    >>> seconds = phase_durations(BatchDurations(read=12.5, total=20.0))
    >>> seconds["read"], seconds["total"], seconds["sink"]
    (0.0125, 0.02, 0.0)
    """
    return {phase: ms / 1000.0 for phase, ms in durations.model_dump().items()}


def epoch_seconds(moment: datetime) -> float:
    """Seconds since the epoch; the flush watermark (``datetime.max``) is +inf."""
    if moment.replace(tzinfo=None) == datetime.max:
        return math.inf
    if moment.tzinfo is None:  # progress times are UTC; never read one as local time
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


@dataclass(frozen=True)
class Sample:
    """One series' value: the metric, its label values (in ``metric.labels`` order), the value."""

    metric: MetricDef
    labels: tuple[str, ...]
    value: float


@dataclass(frozen=True)
class HistogramSample:
    """One histogram series: cumulative counts per upper bound (``inf`` last), sum and count."""

    metric: MetricDef
    labels: tuple[str, ...]
    buckets: tuple[tuple[float, int], ...]
    sum: float
    count: int


@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int]
    total: float = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1  # the +Inf bucket
        self.total += value


@dataclass
class _Query:
    """What is kept of one query (by id): labels, state, and its series while it runs."""

    id: str
    run_id: str
    name: str
    up: bool = True
    failed: bool = False
    values: dict[tuple[MetricDef, tuple[str, ...]], float] = field(default_factory=dict)
    histograms: dict[tuple[MetricDef, tuple[str, ...]], _Histogram] = field(default_factory=dict)
    watermark: float | None = None

    @property
    def labels(self) -> tuple[str, str]:
        return (self.name, self.id)

    def add(self, metric: MetricDef, labels: tuple[str, ...], value: float) -> None:
        key = (metric, labels)
        self.values[key] = self.values.get(key, 0.0) + value

    def set(self, metric: MetricDef, labels: tuple[str, ...], value: float) -> None:
        self.values[(metric, labels)] = value

    def observe(self, metric: MetricDef, labels: tuple[str, ...], value: float) -> None:
        key = (metric, labels)
        if key not in self.histograms:
            self.histograms[key] = _Histogram(metric.buckets, [0] * (len(metric.buckets) + 1))
        self.histograms[key].observe(value)


class ProgressMetrics:
    """A query listener that turns progress events into metric values.

    Register it with ``session.add_listener``; read it with :meth:`samples`
    and :meth:`histograms`. A query whose start was missed (the listener
    came later) appears at its next batch.

    Parameters
    ----------
    keep_terminated
        How many terminated queries keep their ``up``/``failed`` series.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> session = ms.Session()
    >>> metrics = ProgressMetrics()
    >>> session.add_listener(metrics)
    >>> stream = ms.MemoryStream({"x": pl.Int64})
    >>> query = stream.lazy().sink_memory("doc_metrics", session=session)
    >>> _ = stream.add_data({"x": [1, 2, 3]})
    >>> query.process_all_available()
    >>> values = {s.metric.name: s.value for s in metrics.samples()}
    >>> values["microstream_input_rows_total"], values["microstream_query_up"]
    (3.0, 1.0)
    >>> query.stop()
    """

    def __init__(self, *, keep_terminated: int = 100) -> None:
        self._lock = threading.Lock()
        self._queries: OrderedDict[str, _Query] = OrderedDict()
        self._keep_terminated = keep_terminated

    # -- listener callbacks (on the query's thread) ---------------------------------------

    def on_query_started(self, event: QueryStartedEvent) -> None:
        with self._lock:
            self._start(event.id, event.run_id, event.name)

    def on_query_progress(self, event: QueryProgressEvent) -> None:
        progress = event.progress
        with self._lock:
            query = self._queries.get(progress.id)
            if query is None or query.run_id != progress.run_id:
                query = self._start(progress.id, progress.run_id, progress.name)
            _apply(query, progress)

    def on_query_terminated(self, event: QueryTerminatedEvent) -> None:
        with self._lock:
            query = self._queries.get(event.id)
            if query is None or query.run_id != event.run_id:
                return  # a run this listener never saw, or replaced by a newer run
            # Its series go; up/failed stay (marked) so that a dead query can be alerted on.
            query.up = False
            query.failed = event.exception is not None
            query.values.clear()
            query.histograms.clear()
            query.watermark = None
            self._queries.move_to_end(event.id)
            ended = [q for q in self._queries.values() if not q.up]
            for old in ended[: max(0, len(ended) - self._keep_terminated)]:
                del self._queries[old.id]

    # -- reading (on the collector's thread) ------------------------------------------------

    def samples(self, *, now: float | None = None) -> list[Sample]:
        """The counters' and gauges' current values (``now``: the wall clock for the lag)."""
        now = time.time() if now is None else now
        out: list[Sample] = []
        with self._lock:
            for query in self._queries.values():
                out.append(Sample(QUERY_UP, query.labels, 1.0 if query.up else 0.0))
                out.append(Sample(QUERY_FAILED, query.labels, 1.0 if query.failed else 0.0))
                out.extend(Sample(m, labels, v) for (m, labels), v in query.values.items())
                if query.watermark is not None:
                    out.append(Sample(WATERMARK, query.labels, query.watermark))
                    if math.isfinite(query.watermark):
                        out.append(Sample(EVENT_TIME_LAG, query.labels, now - query.watermark))
        return out

    def histograms(self) -> list[HistogramSample]:
        """The histograms' cumulative buckets (upper bound, count), sums and counts."""
        out: list[HistogramSample] = []
        with self._lock:
            for query in self._queries.values():
                for (metric, labels), hist in query.histograms.items():
                    cumulative, running = [], 0
                    for bound, count in zip((*hist.bounds, math.inf), hist.counts):
                        running += count
                        cumulative.append((bound, running))
                    out.append(
                        HistogramSample(metric, labels, tuple(cumulative), hist.total, running)
                    )
        return out

    def _start(self, query_id: str, run_id: str, name: str | None) -> _Query:
        query = _Query(id=query_id, run_id=run_id, name=name or "")
        # Initialised at zero (Prometheus' advice): a rate over a fresh query is 0, not absent.
        query.set(INPUT_ROWS, query.labels, 0.0)
        query.set(OUTPUT_ROWS, query.labels, 0.0)
        query.set(BATCHES, query.labels, 0.0)
        self._queries[query_id] = query
        self._queries.move_to_end(query_id)
        return query


def _apply(query: _Query, progress: QueryProgress) -> None:
    """Add one batch's progress to a query's values."""
    q = query.labels
    query.add(INPUT_ROWS, q, progress.num_input_rows)
    query.add(OUTPUT_ROWS, q, progress.num_output_rows)
    query.add(BATCHES, q, 1)
    query.add(WORKER_RESTARTS, q, progress.worker_restarts)
    query.set(INPUT_ROWS_PER_SECOND, q, progress.input_rows_per_second)
    query.set(PROCESSED_ROWS_PER_SECOND, q, progress.processed_rows_per_second)
    for phase, seconds in phase_durations(progress.durations_ms).items():
        query.observe(BATCH_DURATION, (*q, phase), seconds)
    query.watermark = None if progress.watermark is None else epoch_seconds(progress.watermark)
    for op in progress.state_operators:
        labels = (*q, label_value(op.operator_id), label_value(op.kind))
        query.add(ROWS_DROPPED_LATE, labels, op.num_rows_dropped_late)
        query.add(ROWS_DROPPED_NULL_TIME, labels, op.num_rows_dropped_null_time)
        query.set(STATE_ROWS, labels, op.num_rows_total)
        query.set(STATE_BYTES, labels, op.memory_bytes)
    for index, source in enumerate(progress.sources):
        labels = (*q, str(index), source_kind(source.description))
        query.add(SOURCE_INPUT_ROWS, labels, source.num_input_rows)
        if source.lag is None:
            query.values.pop((SOURCE_LAG, labels), None)
        else:
            query.set(SOURCE_LAG, labels, source.lag)
        for kind, count in source.metrics.items():
            query.add(SOURCE_EVENTS, (*labels, label_value(kind)), count)
