"""The PostgreSQL CDC crash-recovery test's subprocess: three queries, each over its own slot.

Run as::

    python tests/crash/postgres_pipeline.py --input SOURCE.json --output DIR --checkpoint DIR

``SOURCE.json`` names the databases, the slots and the output tables:
``{"source_dsn", "sink_dsn", "slots": {"append": ..., "update": ..., "delta": ...},
"tables": {"append": ..., "update": ...}}``. The source table ``events (id, k, v)``
holds the changes the test made before any run; each query reads them with
``ms.scan_postgres_cdc(max_changes_per_trigger=MAX_CHANGES)`` from its own slot,
created by the test before the changes, under ``Trigger.available_now()``:

- ``append``: every change, as ``(id, k, v, _op, _commit_lsn)``, appended to
  ``tables["append"]`` with ``sink_postgres(mode="append")`` (``COPY``);
- ``update``: per ``k``, the number of changes and the sum of ``v``, upserted into
  ``tables["update"]`` with ``sink_postgres(mode="upsert", output_mode="update")``;
- ``delta``: every change, as in ``append``, into the Delta table ``<output>/delta``.

The queries run one after the other. ``MICROSTREAM_FAULTS`` makes the process SIGKILL
itself at a named point (see ``microstream/runtime/faults.py``). The first line on
stdout is ``ready``, the last ``done``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import polars as pl

MAX_CHANGES = 6
"""``max_changes_per_trigger``: whole transactions until about this many decoded rows."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args(argv)
    config = json.loads(Path(args.input).read_text())

    import microstream as ms

    checkpoint = Path(args.checkpoint)
    trigger = ms.Trigger.available_now()

    def changes(slot: str) -> ms.StreamFrame:
        return ms.scan_postgres_cdc(
            config["source_dsn"],
            tables=["events"],
            slot=slot,
            max_changes_per_trigger=MAX_CHANGES,
            retry_timeout="5s",
        )

    print("ready", flush=True)
    appended = (
        changes(config["slots"]["append"])
        .select("id", "k", "v", "_op", "_commit_lsn")
        .sink_postgres(
            config["sink_dsn"],
            config["tables"]["append"],
            checkpoint=checkpoint / "append",
            trigger=trigger,
        )
    )
    appended.await_termination()
    counted = (
        changes(config["slots"]["update"])
        .group_by("k")
        .agg(pl.len().alias("n"), pl.col("v").sum().alias("v_sum"))
        .sink_postgres(
            config["sink_dsn"],
            config["tables"]["update"],
            mode="upsert",
            output_mode="update",
            checkpoint=checkpoint / "update",
            trigger=trigger,
        )
    )
    counted.await_termination()
    delta = (
        changes(config["slots"]["delta"])
        .select("id", "k", "v", "_op", "_commit_lsn")
        .sink_delta(Path(args.output) / "delta", checkpoint=checkpoint / "delta", trigger=trigger)
    )
    delta.await_termination()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
