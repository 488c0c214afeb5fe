"""Serve a session's query metrics to Prometheus on ``/metrics``.

:func:`start_metrics_server` starts one :class:`MetricsServer`: a
:class:`~microstream.metrics.ProgressMetrics` listener registered on the
session, a ``prometheus_client`` registry of its own holding one collector
that reads that listener at each scrape, and an HTTP server thread. Nothing is
registered in ``prometheus_client``'s global default registry, so two servers
(two sessions, or tests) never see each other's series.

The metrics and their labels are declared in :mod:`microstream.metrics.definitions`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from microstream.api.session import Session, default_session
from microstream.exceptions import MicrostreamError, MissingDependencyError
from microstream.metrics.definitions import METRICS, ProgressMetrics

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["MetricsServer", "start_metrics_server"]


def start_metrics_server(
    port: int = 9108, *, addr: str = "127.0.0.1", session: Session | None = None
) -> MetricsServer:
    """Serve the metrics of the session's queries for Prometheus at ``http://ADDR:PORT/metrics``.

    Every query of the session is exported from its next event on (see the
    README's "Operating a query" for the names). Stop the server with
    :meth:`MetricsServer.stop` or a ``with`` block.

    Parameters
    ----------
    port
        The TCP port; ``0`` picks a free one (read it from ``.port``).
    addr
        The address to bind. The default, ``127.0.0.1``, is reachable from this
        machine only; ``"0.0.0.0"`` lets any host that reaches this one read the
        metrics (query names and ids, row counts: no data, no credentials).
    session
        Whose queries to export (default: the process's session, ``ms.add_listener``'s).

    Returns
    -------
    MetricsServer

    Raises
    ------
    MissingDependencyError
        ``prometheus_client`` is not installed.
    MicrostreamError
        The address cannot be bound (the port is taken, or the address is not this host's).

    Examples
    --------
    >>> import urllib.request
    >>> import microstream as ms
    >>> with ms.start_metrics_server(0) as server:
    ...     page = urllib.request.urlopen(server.url).read().decode()
    >>> "# TYPE microstream_input_rows_total counter" in page
    True
    """
    return MetricsServer(port=port, addr=addr, session=session or default_session)


class MetricsServer:
    """A running ``/metrics`` endpoint (see :func:`start_metrics_server`).

    Attributes
    ----------
    port
        The port it listens on (the one picked when started with ``port=0``).
    addr
        The address it is bound to.
    registry
        Its own ``prometheus_client`` ``CollectorRegistry``.
    metrics
        The listener that feeds it.
    """

    def __init__(self, *, port: int, addr: str, session: Session) -> None:
        prometheus_client = _require_prometheus_client()
        from prometheus_client.registry import CollectorRegistry

        self.metrics = ProgressMetrics()
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self.metrics))
        try:
            self._httpd, self._thread = prometheus_client.start_http_server(
                port, addr=addr, registry=self.registry
            )
        except OSError as exc:
            msg = (
                f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}; pass another "
                "port (0 picks a free one) or stop what holds this one"
            )
            raise MicrostreamError(msg) from exc
        self.addr = addr
        self.port: int = self._httpd.server_address[1]
        self._session = session
        self._stopped = threading.Event()
        session.add_listener(self.metrics)

    @property
    def url(self) -> str:
        """``http://ADDR:PORT/metrics``."""
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        """Stop listening and unregister from the session; calling it again does nothing."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._session.remove_listener(self.metrics)
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else "serving"
        return f"MetricsServer({self.url}, {state})"


class _Collector:
    """A ``prometheus_client`` collector: each scrape reads the listener's values."""

    def __init__(self, metrics: ProgressMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        samples = self._metrics.samples()
        histograms = self._metrics.histograms()
        for metric in METRICS:
            family: Any
            if metric.type == "counter":
                family = CounterMetricFamily(metric.name, metric.help, labels=metric.labels)
            elif metric.type == "gauge":
                family = GaugeMetricFamily(metric.name, metric.help, labels=metric.labels)
            else:
                family = HistogramMetricFamily(metric.name, metric.help, labels=metric.labels)
                for h in histograms:
                    if h.metric is metric:
                        buckets = [(_le(bound), count) for bound, count in h.buckets]
                        family.add_metric(list(h.labels), buckets, h.sum)
                yield family
                continue
            for s in samples:
                if s.metric is metric:
                    family.add_metric(list(s.labels), s.value)
            yield family


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else repr(bound)


def _require_prometheus_client() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        msg = (
            "the metrics server needs the prometheus_client package, which is not installed: "
            "pip install 'microstream[metrics]'"
        )
        raise MissingDependencyError(msg) from exc
    return prometheus_client
