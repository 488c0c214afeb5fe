"""The RabbitMQ crash-recovery test's subprocess: one stream into another, exactly once.

Run as::

    python tests/crash/rabbitmq_pipeline.py --input SOURCE.json --output DIR --checkpoint DIR

``SOURCE.json`` names the broker and the streams: ``{"url", "input", "output"}``. The
query reads ``input`` (JSON ``{"id", "k"}`` messages, published by the test before any
run) with ``ms.scan_rabbitmq_stream(max_messages_per_trigger=MAX_MESSAGES)`` under
``Trigger.available_now()``, adds ``twice = 2 * id`` and publishes every row to
``output`` with ``sink_rabbitmq_stream``. ``MICROSTREAM_FAULTS`` makes the process
SIGKILL itself at a named point (see ``microstream/runtime/faults.py``). The first line
on stdout is ``ready``, the last ``done``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

MAX_MESSAGES = 150
"""``max_messages_per_trigger``: the input is read in several batches."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.input).read_text())

    import microstream as ms

    print("ready", flush=True)
    query = (
        ms.scan_rabbitmq_stream(
            config["url"],
            config["input"],
            schema={"id": pl.Int64, "k": pl.String},
            max_messages_per_trigger=MAX_MESSAGES,
            retry_timeout="10s",
        )
        .with_columns(twice=pl.col("id") * 2)
        .sink_rabbitmq_stream(
            config["url"],
            config["output"],
            checkpoint=Path(args.checkpoint) / "q",
            trigger=ms.Trigger.available_now(),
        )
    )
    query.await_termination()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
