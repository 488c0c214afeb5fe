"""Exactly-once across SIGKILL: RabbitMQ stream -> ``with_columns`` -> RabbitMQ stream.

The session's broker (``rabbitmq_server``) holds an input stream of ``ROWS`` JSON
messages, published before any run. ``tests/crash/rabbitmq_pipeline.py`` reads it in
batches of ``MAX_MESSAGES`` (a logged offset range each) and publishes every row to an
output stream of the scenario's own, under ``Trigger.available_now()``. A scenario
kills the process by SIGKILL at a fault point (``MICROSTREAM_FAULTS``) or after a
seeded random fraction of a clean run's time, then runs it again without faults; the
rerun must exit 0 and the output stream must hold every input row exactly once, in
input order: the source re-read the logged range of the batch that was cut, and the
broker dropped the messages the sink had already stored (same producer, same
publishing ids). ``sink.after_data`` falls between the two halves of a batch's
publishing, so a kill there leaves half a batch in the stream.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pytest

from connectors.rabbitmq import RabbitMQStreamSourceSpec
from connectors.rabbitmq.client import StreamConnection, StreamUrl, encode_messages
from microstream.checkpoint.storage import Storage
from microstream.protocols import SourceContext
from microstream.testing.rabbitmq import RabbitMQServer

from .test_stateful_crash import Dirs, run_pipeline

pytestmark = pytest.mark.integration

PIPELINE = Path(__file__).with_name("rabbitmq_pipeline.py")
ROWS = 700
SCENARIOS = [
    "sink.after_data@1",
    "sink.after_data@3",
    "batch.after_sink@2",
    "batch.after_wal@4",
    "random",
]


@pytest.fixture(scope="module")
def input_stream(rabbitmq_server: RabbitMQServer) -> str:
    """``ROWS`` messages ``{"id": i, "k": "k<i % 7>"}`` in a stream of this module's own."""
    stream = "crash-input"
    conn = StreamConnection(StreamUrl.parse(rabbitmq_server.url), retry_timeout_s=10, name="t")
    try:
        conn.create_stream(stream, {})
        bodies = [json.dumps({"id": i, "k": f"k{i % 7}"}).encode() for i in range(ROWS)]
        ids = list(range(1, ROWS + 1))
        assert conn.publish(stream, "crash-input", ids, encode_messages(bodies, {})) == []
    finally:
        conn.close()
    return stream


def output_rows(server: RabbitMQServer, stream: str, tmp_path: Path) -> list[tuple[int, int]]:
    spec = RabbitMQStreamSourceSpec(
        server.url, stream, schema={"id": pl.Int64, "k": pl.String, "twice": pl.Int64}
    )
    source = spec.build(
        SourceContext(index=0, storage=Storage(str(tmp_path / "read")), query_id="read")
    )
    try:
        start = source.initial_offset()
        frame = source.read(start, source.latest_offset(start, rate_limited=False))
    finally:
        source.stop()
    return frame.select("id", "twice").rows()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rabbitmq_stream_pipeline_is_exactly_once_across_sigkill(
    rabbitmq_server: RabbitMQServer, input_stream: str, scenario: str, tmp_path: Path
) -> None:
    output = f"crash-out-{scenario.replace('@', '-').replace('.', '-')}"
    config = tmp_path / "source.json"
    config.write_text(
        json.dumps({"url": rabbitmq_server.url, "input": input_stream, "output": output})
    )
    dirs = Dirs(tmp_path / "run")
    if scenario == "random":
        clean = Dirs(tmp_path / "clean")
        clean_config = tmp_path / "clean.json"
        clean_config.write_text(
            json.dumps({"url": rabbitmq_server.url, "input": input_stream, "output": output + "-c"})
        )
        timed = run_pipeline(clean, clean_config, script=PIPELINE, log_name="clean")
        assert timed.returncode == 0, timed.stderr[-3000:]
        killed = run_pipeline(
            dirs,
            config,
            script=PIPELINE,
            kill_after_s=random.Random(11).uniform(0.2, 0.8) * timed.seconds,
            log_name="killed",
        )
    else:
        killed = run_pipeline(dirs, config, script=PIPELINE, fault=scenario, log_name="killed")
        assert killed.returncode == -9, killed.stderr[-3000:]  # it reached the point
    rerun = run_pipeline(dirs, config, script=PIPELINE, log_name="rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert output_rows(rabbitmq_server, output, tmp_path) == [(i, 2 * i) for i in range(ROWS)]
