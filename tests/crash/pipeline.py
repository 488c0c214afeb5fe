"""The crash-recovery test's subprocess: one file source, two exactly-once sinks.

Run as::

    python tests/crash/pipeline.py --input DIR --delta DIR --files DIR \
        --checkpoint-delta DIR --checkpoint-files DIR [--slow]

It streams the parquet files of ``--input`` (``max_files_per_trigger=2``, or 1
with ``--slow`` so a run has many small batches) through a stateless transform
and a stream-static join, and starts two queries in this process over the same
frame: one into a Delta table, one into a parquet file sink, both with
``Trigger.available_now()``. It waits for both and exits 0.

``MICROSTREAM_FAULTS`` (see ``microstream/runtime/faults.py``) makes the process
SIGKILL itself at a named point; the test then restarts it and compares the
outputs with :func:`transform` applied by plain Polars to all input at once.

The first line on stdout is ``ready`` once the imports are done and the
queries are about to start, so a test that kills the process after a delay can
measure that delay from the start of real work.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import polars as pl

SCHEMA = {"id": pl.Int64, "user": pl.Int64, "amount": pl.Float64}
"""The input files' schema (ids are unique over all files)."""

USERS = pl.DataFrame(
    {
        "user": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        "country": ["NL", "FR", "DE", "NL", "US", "FR", "JP", "BR", "NL", "IN"],
        "tier": [1, 2, 3, 1, 2, 3, 1, 2, 3, 1],
    }
)
"""The static side of the join: users 10 and 11 of the input have no row (dropped)."""


def transform(frame: Any) -> Any:
    """The query, written once for a ``StreamFrame`` and a ``pl.LazyFrame`` alike.

    The stream joins the static ``DataFrame`` itself; Polars' ``LazyFrame.join``
    wants its lazy form.
    """
    users = USERS.lazy() if isinstance(frame, pl.LazyFrame) else USERS
    return (
        frame.filter(pl.col("amount") > 0, pl.col("id") % 7 != 3)
        .with_columns(
            cents=(pl.col("amount") * 100).round().cast(pl.Int64),
            big=pl.col("amount") > 50,
        )
        .join(users, on="user", how="inner")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--delta", required=True)
    parser.add_argument("--files", required=True)
    parser.add_argument("--checkpoint-delta", required=True)
    parser.add_argument("--checkpoint-files", required=True)
    parser.add_argument("--slow", action="store_true", help="one file per batch")
    args = parser.parse_args(argv)

    import microstream as ms

    stream = ms.scan_files(
        args.input,
        format="parquet",
        schema=SCHEMA,
        max_files_per_trigger=1 if args.slow else 2,
    )
    result = transform(stream)
    print("ready", flush=True)
    to_delta = result.sink_delta(
        args.delta,
        checkpoint=args.checkpoint_delta,
        trigger=ms.Trigger.available_now(),
        name="crash_delta",
    )
    try:
        to_files = result.sink_parquet(
            args.files,
            checkpoint=args.checkpoint_files,
            trigger=ms.Trigger.available_now(),
            name="crash_files",
        )
    except BaseException:
        to_delta.stop()  # let the other query finish its batch before the process exits
        raise
    to_delta.await_termination()
    to_files.await_termination()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
