"""The Kafka -> Delta crash-recovery test's subprocess: one topic, two windowed queries.

Run as::

    python tests/crash/kafka_pipeline.py --input SOURCE.json --output DIR --checkpoint DIR

``SOURCE.json`` names the broker and the topic:
``{"bootstrap_servers": "127.0.0.1:PORT", "topic": "..."}`` (the interface of
the stateful harness's pipeline, whose runner this test reuses); with
``"break_txn_check": true`` the Delta sink forgets which batches it committed
(see :func:`break_txn_check`: the test that shows a doubled batch is caught). The topic
holds JSON events ``{"key", "ts", "v"}``; they are read with
``ms.scan_kafka(format="json", max_offsets_per_trigger=MAX_OFFSETS)`` and
go through ``with_watermark("ts", "10s")`` and 20-second tumbling windows
per key (``group_by_dynamic``) with a sum and a count (partial aggregates in
state) and a median (the rows themselves in state). Two queries run in this
process over the same frame (each with its own Kafka source, consumer and
checkpoint ``<checkpoint>/<query>``):

- ``append``: ``output_mode="append"`` into the Delta table ``<output>/append``
  (each window once, when the watermark passes its end);
- ``update``: ``output_mode="update"`` into ``<output>/update``: every batch
  MERGEs the windows it changed into the table on ``(key, ts)``.

Both use ``Trigger.available_now(flush=True)``: once the topic is drained the
watermark jumps past every event, so every window is emitted.

``MICROSTREAM_FAULTS`` (see ``microstream/runtime/faults.py``) makes the process
SIGKILL itself at a named point (each query counts its own visits; the first
to reach the visit kills the process). The first line on stdout is ``ready``
once the imports are done, the last ``done`` after both queries finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import polars as pl

SCHEMA = {"key": pl.String, "ts": pl.Datetime("us"), "v": pl.Int64}
"""The events' JSON fields."""

QUERIES = ("append", "update")
"""The queries, in start order: also their output mode, checkpoint and table names."""

MAX_OFFSETS = 12
"""``max_offsets_per_trigger``: a batch reads at most this many records (all partitions)."""

CONSUMER_OPTIONS = {"fetch.wait.max.ms": 100}
"""librdkafka settings of the source, for speed only. A source that assigns its consumer
afresh for every batch waits, in each read, for the consumer's previous fetch, which Tansu
holds up to ``fetch.wait.max.ms`` (librdkafka's default 500 ms: measured ~0.5 s a batch
whatever its size); 100 ms bounds that. Lower values made some reads wait ~1 s (a fetch
backoff)."""

WATERMARK_DELAY = "10s"
EVERY = "20s"
KEY_COLUMNS = ("key", "ts")
"""What update mode MERGEs on: the group key and the window start."""


def windows(frame: Any) -> Any:
    """The query, written once for a ``StreamFrame`` (the watermark) and a ``pl.LazyFrame``."""
    if not isinstance(frame, pl.LazyFrame):
        frame = frame.with_watermark("ts", WATERMARK_DELAY)
    return frame.group_by_dynamic("ts", every=EVERY, group_by="key").agg(
        pl.col("v").sum().alias("v_sum"),
        pl.len().alias("n"),
        pl.col("v").median().alias("v_median"),
    )


def break_txn_check() -> None:
    """Make the Delta sink believe no batch was ever committed (for a negative test only).

    A batch re-run after a crash is then committed a second time: appended
    again in append mode, MERGEd again in update mode.
    """
    from connectors.delta import DeltaSink

    committed = DeltaSink.committed_batch

    def forgetful(self: DeltaSink) -> int | None:
        committed(self)  # still opens and refreshes the table, as the sink expects
        return None

    DeltaSink.committed_batch = forgetful  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSON file naming the broker and topic")
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args(argv)
    source = json.loads(Path(args.input).read_text())
    if source.get("break_txn_check"):
        break_txn_check()

    from stateful_pipeline import run_queries  # this script's directory is on sys.path

    import microstream as ms

    output, checkpoint = Path(args.output), Path(args.checkpoint)
    stream = ms.scan_kafka(
        source["bootstrap_servers"],
        topic=source["topic"],
        format="json",
        schema=SCHEMA,
        max_offsets_per_trigger=MAX_OFFSETS,
        options=CONSUMER_OPTIONS,
    )
    result = windows(stream)
    trigger = ms.Trigger.available_now(flush=True)
    print("ready", flush=True)

    run_queries(
        [
            lambda mode=mode: result.sink_delta(
                output / mode,
                output_mode=mode,
                checkpoint=checkpoint / mode,
                trigger=trigger,
                name=f"kafka_delta_{mode}",
            )
            for mode in QUERIES
        ]
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
