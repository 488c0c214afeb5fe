"""Export query metrics through OpenTelemetry (OTLP collector, Datadog, Grafana Cloud).

:class:`OpenTelemetryListener` is a query listener that creates, on the
meter provider it is given, one instrument per metric of
:data:`microstream.metrics.METRICS`, under the same names (without the
``_total`` of counters, which an OpenTelemetry-to-Prometheus bridge adds):

- counters and gauges are *observable* instruments whose callbacks read a
  :class:`~microstream.metrics.ProgressMetrics` at each collection, so a
  terminated query's series stop being reported (only ``up``/``failed`` stay);
- the batch duration histogram is a synchronous histogram recorded at each
  progress event (OpenTelemetry has no observable histogram), so the SDK keeps
  reporting a terminated query's histogram until the process ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from microstream.exceptions import MissingDependencyError
from microstream.metrics.definitions import METRICS, MetricDef, ProgressMetrics, phase_durations

if TYPE_CHECKING:
    from microstream.runtime.progress import (
        QueryProgressEvent,
        QueryStartedEvent,
        QueryTerminatedEvent,
    )

__all__ = ["OpenTelemetryListener"]


class OpenTelemetryListener:
    """A query listener that exports microstream's metrics through OpenTelemetry.

    Add it with ``ms.add_listener`` (or ``session.add_listener``); the meter
    provider's readers and exporters decide where the values go. Use one
    listener per meter provider: instruments are created once per name.

    Parameters
    ----------
    meter_provider
        An OpenTelemetry ``MeterProvider``; default: the global one
        (``opentelemetry.metrics.get_meter_provider()``), set by the application
        or by ``opentelemetry-instrument``.

    Raises
    ------
    MissingDependencyError
        The OpenTelemetry API is not installed.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from opentelemetry.sdk.metrics import MeterProvider
    >>> from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    >>> reader = InMemoryMetricReader()
    >>> session = ms.Session()
    >>> session.add_listener(ms.OpenTelemetryListener(MeterProvider(metric_readers=[reader])))
    >>> stream = ms.MemoryStream({"x": pl.Int64})
    >>> query = stream.lazy().sink_memory("doc_otel", session=session)
    >>> _ = stream.add_data({"x": [1, 2, 3]})
    >>> query.process_all_available()
    >>> [metric] = [
    ...     m
    ...     for rm in reader.get_metrics_data().resource_metrics
    ...     for sm in rm.scope_metrics
    ...     for m in sm.metrics
    ...     if m.name == "microstream_input_rows"
    ... ]
    >>> [(p.attributes["query_name"], p.value) for p in metric.data.data_points]
    [('doc_otel', 3)]
    >>> query.stop()
    """

    def __init__(self, meter_provider: Any = None) -> None:
        from microstream import __version__

        otel_metrics = _require_opentelemetry()
        provider = meter_provider or otel_metrics.get_meter_provider()
        meter = provider.get_meter("microstream", __version__)
        self._metrics = ProgressMetrics()
        self._observation = otel_metrics.Observation
        self._histograms: dict[MetricDef, Any] = {}
        for metric in METRICS:
            if metric.type == "histogram":
                self._histograms[metric] = meter.create_histogram(
                    metric.otel_name,
                    unit=metric.unit,
                    description=metric.help,
                    explicit_bucket_boundaries_advisory=list(metric.buckets),
                )
                continue
            create = (
                meter.create_observable_counter
                if metric.type == "counter"
                else meter.create_observable_gauge
            )
            create(
                metric.otel_name,
                callbacks=[partial(self._observe, metric)],
                unit=metric.unit,
                description=metric.help,
            )

    def on_query_started(self, event: QueryStartedEvent) -> None:
        self._metrics.on_query_started(event)

    def on_query_progress(self, event: QueryProgressEvent) -> None:
        self._metrics.on_query_progress(event)
        progress = event.progress
        for metric, histogram in self._histograms.items():
            for phase, seconds in phase_durations(progress.durations_ms).items():
                attributes = dict(zip(metric.labels, (progress.name or "", progress.id, phase)))
                histogram.record(seconds, attributes)

    def on_query_terminated(self, event: QueryTerminatedEvent) -> None:
        self._metrics.on_query_terminated(event)

    def _observe(self, metric: MetricDef, _options: object) -> Iterable[Any]:
        now = time.time()
        counts = metric.type == "counter"  # every counter counts things: report integers
        return [
            self._observation(
                int(s.value) if counts else s.value, dict(zip(metric.labels, s.labels))
            )
            for s in self._metrics.samples(now=now)
            if s.metric is metric
        ]


def _require_opentelemetry() -> Any:
    try:
        from opentelemetry import metrics
    except ImportError as exc:
        msg = (
            "the OpenTelemetry listener needs the opentelemetry-sdk package, which is not "
            "installed: pip install 'microstream[otel]'"
        )
        raise MissingDependencyError(msg) from exc
    return metrics
