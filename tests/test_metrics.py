"""Metrics: /metrics scraped over HTTP and OpenTelemetry's reader, checked against progress."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pytest

import microstream as ms
from microstream.cli.main import main
from microstream.metrics.definitions import METRICS, ProgressMetrics
from microstream.runtime.progress import (
    BatchDurations,
    QueryProgress,
    QueryProgressEvent,
    QueryStartedEvent,
    QueryTerminatedEvent,
    SinkProgress,
    SourceProgress,
    StateOperatorProgress,
)

prometheus_parser = pytest.importorskip("prometheus_client.parser")

CSV_SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "k": pl.String(), "v": pl.Int64()})
PHASES = ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Series:
    """Every sample of the page, by name and labels."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in prometheus_parser.text_string_to_metric_families(text)
        for s in family.samples
    }


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def names_of(series: Series) -> set[str]:
    return {name for name, _ in series}


def wait_for(condition: Any, what: str, timeout: float = 10.0) -> Any:
    """Poll ``condition()`` until it returns a true value (the terminated event is posted
    after ``await_termination`` returns, on the query's thread)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def server(session: ms.Session) -> Iterator[ms.MetricsServer]:
    with ms.start_metrics_server(0, session=session) as server:
        yield server


def windowed_query(tmp_path: Path, name: str, session: ms.Session) -> ms.StreamingQuery:
    """File source -> 1-minute windows with a 10 s watermark; file 0 has a bad record, file 1
    a row behind the watermark. Four batches: two with data, two that only close windows."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.csv").write_text(
        "ts,k,v\n2024-01-01T00:00:10,a,1\n2024-01-01T00:00:20,a,2\n"
        "2024-01-01T00:01:10,b,seven\n2024-01-01T00:01:10,b,3\n"
    )
    query = (
        ms.scan_files(
            tmp_path / "in",
            format="csv",
            schema=CSV_SCHEMA,
            on_bad_record="skip",
            max_files_per_trigger=1,
        )
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum())
        .sink_memory(name, session=session)
    )
    query.process_all_available(timeout=30)
    # 00:02:10 moves the watermark on; 00:00:05 is behind the watermark (00:01:00): late.
    (tmp_path / "in" / "1.csv").write_text(
        "ts,k,v\n2024-01-01T00:02:10,a,4\n2024-01-01T00:00:05,a,5\n"
    )
    query.process_all_available(timeout=30)
    return query


# -- Prometheus --------------------------------------------------------------------------------


def test_scrape_matches_progress_during_a_run(
    tmp_path: Path, name: str, session: ms.Session, server: ms.MetricsServer
) -> None:
    query = windowed_query(tmp_path, name, session)
    progress = query.recent_progress
    before = time.time()
    series = scrape(server.url)
    after = time.time()
    assert query.is_active and query.recent_progress == progress  # no batch ran meanwhile
    last = query.last_progress
    assert last is not None
    q = {"query_name": name, "query_id": query.id}

    assert value(series, "microstream_query_up", **q) == 1.0
    assert value(series, "microstream_query_failed", **q) == 0.0
    # Counters: the sums over the batches; the hand-known totals first.
    assert value(series, "microstream_input_rows_total", **q) == 5  # the bad record is not a row
    assert value(series, "microstream_input_rows_total", **q) == sum(
        p.num_input_rows for p in progress
    )
    assert value(series, "microstream_output_rows_total", **q) == 2
    assert value(series, "microstream_output_rows_total", **q) == sum(
        p.num_output_rows for p in progress
    )
    assert value(series, "microstream_batches_total", **q) == len(progress) == 4
    # Gauges: the last batch's values.
    assert value(series, "microstream_input_rows_per_second", **q) == last.input_rows_per_second
    assert (
        value(series, "microstream_processed_rows_per_second", **q)
        == last.processed_rows_per_second
    )
    assert last.watermark == datetime(2024, 1, 1, 0, 2, tzinfo=timezone.utc)
    watermark = value(series, "microstream_watermark_seconds", **q)
    assert watermark == last.watermark.timestamp() == 1704067320.0
    lag = value(series, "microstream_event_time_lag_seconds", **q)
    assert before - watermark <= lag <= after - watermark
    # The duration histogram: one observation per batch and phase, in seconds.
    for phase in PHASES:
        seconds = [getattr(p.durations_ms, phase) / 1000 for p in progress]
        labels = {**q, "phase": phase}
        assert value(series, "microstream_batch_duration_seconds_count", **labels) == 4
        assert value(series, "microstream_batch_duration_seconds_sum", **labels) == sum(seconds)
        for le in ("0.001", "0.01", "0.1", "+Inf"):
            bound = float(le)
            assert value(
                series, "microstream_batch_duration_seconds_bucket", **labels, le=le
            ) == sum(1 for s in seconds if s <= bound)
    # Per operator.
    [op] = last.state_operators
    o = {**q, "operator_id": op.operator_id, "operator_kind": "window_aggregation"}
    assert op.kind == "window aggregation"
    assert value(series, "microstream_rows_dropped_late_total", **o) == 1
    assert value(series, "microstream_rows_dropped_late_total", **o) == sum(
        p.state_operators[0].num_rows_dropped_late for p in progress
    )
    assert value(series, "microstream_rows_dropped_null_time_total", **o) == 0
    assert value(series, "microstream_state_rows", **o) == op.num_rows_total == 1
    assert value(series, "microstream_state_bytes", **o) == op.memory_bytes > 0
    # Per source.
    s = {**q, "source": "0", "source_kind": "FileSource"}
    assert value(series, "microstream_source_input_rows_total", **s) == 5
    assert value(series, "microstream_source_lag", **s) == last.sources[0].lag == 0
    assert value(series, "microstream_source_events_total", **s, kind="bad_records_skipped") == 1
    assert sum(p.sources[0].metrics.get("bad_records_skipped", 0) for p in progress) == 1

    query.stop()
    series = wait_for(
        lambda: (
            (page := scrape(server.url))[("microstream_query_up", frozenset(q.items()))] == 0
            and page
        ),
        "up = 0",
    )
    assert value(series, "microstream_query_failed", **q) == 0.0
    # A stopped query keeps only up and failed; its other series are gone.
    assert {n for n, labels in series if ("query_id", query.id) in labels} == {
        "microstream_query_up",
        "microstream_query_failed",
    }


def test_a_failed_query_is_marked_failed(
    name: str, session: ms.Session, server: ms.MetricsServer
) -> None:
    stream = ms.MemoryStream({"s": pl.String})
    query = (
        stream.lazy().with_columns(n=pl.col("s").cast(pl.Int64)).sink_memory(name, session=session)
    )
    q = {"query_name": name, "query_id": query.id}
    wait_for(lambda: ("microstream_query_up", frozenset(q.items())) in scrape(server.url), "up")
    assert value(scrape(server.url), "microstream_query_up", **q) == 1.0
    stream.add_data({"s": ["12", "twelve"]})
    with pytest.raises(pl.exceptions.InvalidOperationError):
        query.await_termination(timeout=30)
    series = wait_for(
        lambda: (
            (page := scrape(server.url))[("microstream_query_failed", frozenset(q.items()))] == 1
            and page
        ),
        "failed = 1",
    )
    assert value(series, "microstream_query_up", **q) == 0.0
    assert value(series, "microstream_query_failed", **q) == 1.0


def test_watermark_absent_before_the_first_event_time(
    name: str, session: ms.Session, server: ms.MetricsServer
) -> None:
    stream = ms.MemoryStream(CSV_SCHEMA)
    query = (
        stream.lazy()
        .with_watermark("ts", "0s")
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(pl.col("v").sum())
        .sink_memory(name, session=session)
    )
    q = {"query_name": name, "query_id": query.id}
    stream.add_data(pl.DataFrame({"ts": [None, None], "k": ["a", "b"], "v": [1, 2]}, CSV_SCHEMA))
    query.process_all_available(timeout=30)
    assert query.last_progress is not None and query.last_progress.watermark is None
    series = scrape(server.url)
    assert value(series, "microstream_batches_total", **q) == 1
    assert "microstream_watermark_seconds" not in names_of(series)
    assert "microstream_event_time_lag_seconds" not in names_of(series)
    [op] = query.last_progress.state_operators
    o = {**q, "operator_id": op.operator_id, "operator_kind": "window_aggregation"}
    assert value(series, "microstream_rows_dropped_null_time_total", **o) == 2
    assert op.num_rows_dropped_null_time == 2

    stream.add_data(
        pl.DataFrame({"ts": [datetime(2024, 1, 1, 0, 0, 30)], "k": ["a"], "v": [3]}, CSV_SCHEMA)
    )
    query.process_all_available(timeout=30)
    series = scrape(server.url)
    assert (
        value(series, "microstream_watermark_seconds", **q)
        == datetime(2024, 1, 1, 0, 0, 30, tzinfo=timezone.utc).timestamp()
    )
    query.stop()


def progress_event(
    query_id: str, descriptions: list[str], metrics: dict[str, int]
) -> QueryProgressEvent:
    """A batch's progress as a connector could report it (descriptions hold credentials)."""
    return QueryProgressEvent(
        progress=QueryProgress(
            id=query_id,
            run_id="run-1",
            name="job",
            batch_id=0,
            timestamp=datetime.now(timezone.utc),
            batch_timestamp_ms=0,
            recovered=False,
            num_input_rows=3,
            num_output_rows=3,
            input_rows_per_second=1.0,
            processed_rows_per_second=1.0,
            durations_ms=BatchDurations(total=1.0),
            state_operators=[
                StateOperatorProgress(
                    operator_id="op0", kind="deduplication", num_rows_total=1, memory_bytes=8
                )
            ],
            sources=[
                SourceProgress(
                    description=d,
                    start_offset=None,
                    end_offset={"0": 3},
                    num_input_rows=1,
                    lag=7,
                    metrics=metrics,
                )
                for d in descriptions
            ],
            sink=SinkProgress(description="KafkaSink[out]", num_output_rows=3),
        )
    )


def test_credentials_in_source_descriptions_never_reach_labels(
    session: ms.Session, server: ms.MetricsServer
) -> None:
    descriptions = [
        "KafkaSource[sasl_ssl://alice:hunter2-kafka@broker.example:9093/events]",
        "FileSource[csv: s3://AKIAEXAMPLEKEY:s3cr3t-aws@bucket/in {'secret': 'opt-pw'}]",
        "s3://bob:naked-url-pw@bucket/raw",
    ]
    session.post(
        "on_query_progress", progress_event("q1", descriptions, {"bad_records_skipped": 2})
    )
    page = urllib.request.urlopen(server.url, timeout=10).read().decode()
    for secret in ("hunter2", "s3cr3t", "AKIAEXAMPLEKEY", "opt-pw", "naked-url-pw", "alice", "@"):
        assert secret not in page
    series = scrape(server.url)
    q = {"query_name": "job", "query_id": "q1"}
    kinds = ["KafkaSource", "FileSource", "s3"]
    for index, kind in enumerate(kinds):
        s = {**q, "source": str(index), "source_kind": kind}
        assert value(series, "microstream_source_lag", **s) == 7
        assert (
            value(series, "microstream_source_events_total", **s, kind="bad_records_skipped") == 2
        )


def test_two_servers_keep_their_sessions_apart(name: str, session: ms.Session) -> None:
    other_session = ms.Session()
    with (
        ms.start_metrics_server(0, session=session) as mine,
        ms.start_metrics_server(0, session=other_session) as other,
    ):
        stream = ms.MemoryStream({"x": pl.Int64})
        query = stream.lazy().sink_memory(name, session=session)
        stream.add_data({"x": [1, 2]})
        query.process_all_available(timeout=30)
        q = {"query_name": name, "query_id": query.id}
        assert value(scrape(mine.url), "microstream_input_rows_total", **q) == 2
        assert not [key for key in scrape(other.url) if ("query_id", query.id) in key[1]]
        query.stop()


def test_stop_frees_the_port_and_a_taken_port_is_named(session: ms.Session) -> None:
    server = ms.start_metrics_server(0, session=session)
    port = server.port
    assert port > 0 and server.url == f"http://127.0.0.1:{port}/metrics"
    with pytest.raises(
        ms.MicrostreamError, match=rf"cannot serve metrics on 127\.0\.0\.1:{port}: "
    ):
        ms.start_metrics_server(port, session=session)
    server.stop()
    server.stop()  # twice is harmless
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server.url, timeout=5)
    again = ms.start_metrics_server(port, session=session)  # the port is free again
    assert again.port == port
    again.stop()


def test_missing_prometheus_client_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, session: ms.Session
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ms.MissingDependencyError, match=r"pip install 'microstream\[metrics\]'"):
        ms.start_metrics_server(0, session=session)


def test_progress_metrics_keeps_the_last_terminated_queries() -> None:
    metrics = ProgressMetrics(keep_terminated=2)
    now = datetime.now(timezone.utc)
    for i in range(3):
        metrics.on_query_started(
            QueryStartedEvent(id=f"q{i}", run_id="r", name=None, timestamp=now)
        )
        metrics.on_query_terminated(
            QueryTerminatedEvent(id=f"q{i}", run_id="r", exception=None, timestamp=now)
        )
    metrics.on_query_started(QueryStartedEvent(id="live", run_id="r", name="n", timestamp=now))
    up = {s.labels: s.value for s in metrics.samples() if s.metric.name == "microstream_query_up"}
    assert up == {("", "q1"): 0.0, ("", "q2"): 0.0, ("n", "live"): 1.0}
    # A terminated event of an older run does not end the newer run of the same query.
    metrics.on_query_terminated(
        QueryTerminatedEvent(id="live", run_id="old", exception="boom", timestamp=now)
    )
    up = {s.labels: s.value for s in metrics.samples() if s.metric.name == "microstream_query_up"}
    assert up[("n", "live")] == 1.0


# -- the command -------------------------------------------------------------------------------

JOB = """
import pathlib, threading, time
import polars as pl
import microstream as ms

query = (
    ms.scan_files("in", format="parquet", max_files_per_trigger=1)
    .sink_parquet("out", checkpoint="cp", trigger=ms.Trigger.every("50ms"), name="job")
)

def stop_when_asked() -> None:
    while not pathlib.Path("stop").exists():
        time.sleep(0.05)
    query.stop()

threading.Thread(target=stop_when_asked, daemon=True).start()
"""


@pytest.mark.integration
def test_run_serves_metrics_while_the_queries_run(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    for i in range(3):
        pl.DataFrame({"x": [i, i]}).write_parquet(tmp_path / "in" / f"{i}.parquet")
    (tmp_path / "job.py").write_text(JOB)
    child = subprocess.Popen(
        [sys.executable, "-m", "microstream.cli", "run", "job.py", "--metrics-port", "0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stderr is not None
        line = child.stderr.readline()
        assert line.startswith("microstream: serving metrics on http://127.0.0.1:"), line
        url = line.split(" on ", 1)[1].strip()
        series = wait_for(
            lambda: (
                (page := scrape(url))
                and any(
                    name == "microstream_batches_total" and v == 3 for (name, _), v in page.items()
                )
                and page
            ),
            "three batches",
            timeout=60,
        )
        [(labels, rows)] = [
            (dict(lb), v) for (n, lb), v in series.items() if n == "microstream_input_rows_total"
        ]
        assert labels["query_name"] == "job" and rows == 6
        assert value(series, "microstream_query_up", **labels) == 1.0
        (tmp_path / "stop").touch()
        _, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def test_run_with_a_taken_metrics_port_fails_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["run", str(tmp_path / "job.py"), "--metrics-port", str(port)])
    assert code == 1
    assert f"cannot serve metrics on 127.0.0.1:{port}" in capsys.readouterr().err


# -- OpenTelemetry -----------------------------------------------------------------------------


def otel_points(reader: Any) -> dict[str, list[Any]]:
    """Data points by instrument name, from one collection."""
    data = reader.get_metrics_data()
    return {
        m.name: list(m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }


def point(points: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    [found] = [p for p in points[name] if dict(p.attributes) == attributes]
    return found


@pytest.fixture
def reader(session: ms.Session) -> Iterator[Any]:
    sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = sdk_metrics.MeterProvider(metric_readers=[reader])
    session.add_listener(ms.OpenTelemetryListener(meter_provider=provider))
    yield reader
    provider.shutdown()


def test_opentelemetry_values_match_progress(
    tmp_path: Path, name: str, session: ms.Session, reader: Any
) -> None:
    query = windowed_query(tmp_path, name, session)
    progress = query.recent_progress
    before = time.time()
    points = otel_points(reader)
    after = time.time()
    last = query.last_progress
    assert last is not None and last.watermark is not None
    q = {"query_name": name, "query_id": query.id}

    assert {m.otel_name for m in METRICS} <= set(points)
    assert point(points, "microstream_query_up", **q).value == 1
    assert point(points, "microstream_query_failed", **q).value == 0
    assert point(points, "microstream_input_rows", **q).value == 5
    assert point(points, "microstream_output_rows", **q).value == 2
    assert point(points, "microstream_batches", **q).value == len(progress) == 4
    assert (
        point(points, "microstream_processed_rows_per_second", **q).value
        == last.processed_rows_per_second
    )
    watermark = point(points, "microstream_watermark_seconds", **q).value
    assert watermark == last.watermark.timestamp()
    lag = point(points, "microstream_event_time_lag_seconds", **q).value
    assert before - watermark <= lag <= after - watermark
    for phase in PHASES:
        seconds = [getattr(p.durations_ms, phase) / 1000 for p in progress]
        hist = point(points, "microstream_batch_duration_seconds", **q, phase=phase)
        assert hist.count == 4
        assert hist.sum == pytest.approx(sum(seconds), rel=1e-12)
        assert list(hist.explicit_bounds)[:3] == [0.001, 0.0025, 0.005]
        assert hist.bucket_counts[0] == sum(1 for s in seconds if s <= 0.001)
    o = {**q, "operator_id": "op0", "operator_kind": "window_aggregation"}
    assert point(points, "microstream_rows_dropped_late", **o).value == 1
    assert (
        point(points, "microstream_state_rows", **o).value == last.state_operators[0].num_rows_total
    )
    assert (
        point(points, "microstream_state_bytes", **o).value == last.state_operators[0].memory_bytes
    )
    s = {**q, "source": "0", "source_kind": "FileSource"}
    assert point(points, "microstream_source_input_rows", **s).value == 5
    assert point(points, "microstream_source_lag", **s).value == 0
    assert point(points, "microstream_source_events", **s, kind="bad_records_skipped").value == 1

    query.stop()
    wait_for(lambda: point(otel_points(reader), "microstream_query_up", **q).value == 0, "up = 0")
    points = otel_points(reader)
    assert point(points, "microstream_query_failed", **q).value == 0
    # Observable instruments stop reporting a stopped query's series.
    for gone in (
        "microstream_input_rows",
        "microstream_state_rows",
        "microstream_watermark_seconds",
    ):
        assert not [p for p in points.get(gone, []) if p.attributes.get("query_id") == query.id]


def test_opentelemetry_marks_a_failed_query(name: str, session: ms.Session, reader: Any) -> None:
    stream = ms.MemoryStream({"s": pl.String})
    query = (
        stream.lazy().with_columns(n=pl.col("s").cast(pl.Int64)).sink_memory(name, session=session)
    )
    stream.add_data({"s": ["x"]})
    with pytest.raises(pl.exceptions.InvalidOperationError):
        query.await_termination(timeout=30)
    q = {"query_name": name, "query_id": query.id}
    wait_for(
        lambda: point(otel_points(reader), "microstream_query_failed", **q).value == 1,
        "failed = 1",
    )
    assert point(otel_points(reader), "microstream_query_up", **q).value == 0


def test_missing_opentelemetry_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(ms.MissingDependencyError, match=r"pip install 'microstream\[otel\]'"):
        ms.OpenTelemetryListener()


def test_a_server_started_late_picks_a_query_up_at_its_next_batch(
    name: str, session: ms.Session
) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    query = stream.lazy().sink_memory(name, session=session)
    stream.add_data({"x": [1, 2]})
    query.process_all_available(timeout=30)
    with ms.start_metrics_server(0, session=session) as server:
        q = {"query_name": name, "query_id": query.id}
        assert ("microstream_query_up", frozenset(q.items())) not in scrape(server.url)
        stream.add_data({"x": [3, 4, 5]})
        query.process_all_available(timeout=30)
        series = scrape(server.url)
        assert value(series, "microstream_query_up", **q) == 1
        assert value(series, "microstream_input_rows_total", **q) == 3  # counted from then on
        assert value(series, "microstream_batches_total", **q) == 1
        query.stop()


def test_the_flush_watermark_is_infinite_and_has_no_lag() -> None:
    metrics = ProgressMetrics()
    event = progress_event("q1", ["MemoryStream"], {})
    flushed = event.progress.model_copy(
        update={"watermark": datetime.max.replace(tzinfo=timezone.utc)}
    )
    metrics.on_query_progress(QueryProgressEvent(progress=flushed))
    names = {s.metric.name: s.value for s in metrics.samples()}
    assert names["microstream_watermark_seconds"] == float("inf")
    assert "microstream_event_time_lag_seconds" not in names


def test_the_readme_table_lists_every_metric() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = re.split(r"\n##+ ", readme.split("\n### Metrics\n", 1)[1], maxsplit=1)[0]
    rows = {line.split("`")[1] for line in table.splitlines() if line.startswith("| `")}
    assert rows == {m.name for m in METRICS}
