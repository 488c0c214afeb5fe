"""The stateful crash-recovery test's subprocess: one file source, three stateful queries.

Run as::

    python tests/crash/stateful_pipeline.py --input DIR --output DIR --checkpoint DIR

It streams the parquet files of ``--input`` (``max_files_per_trigger=1``: one
file per batch) and starts three queries in this process, each with its own
checkpoint ``<checkpoint>/<query>`` and one stateful operator:

- ``windows``: ``with_watermark("ts", "10s")`` then one-minute tumbling windows
  per key (``group_by_dynamic``) with a sum and a count (partial aggregates in
  state) and a median (the rows themselves in state), ``output_mode="append"``
  into the Delta table ``<output>/windows``;
- ``sessions``: session windows per key (``group_by_session``, gap 20 s) with
  the same aggregates, ``output_mode="update"``, through ``foreach_batch``
  into ``<output>/sessions/<batch id>.parquet``: one file per batch, empty
  batches included, written to a temporary name and renamed over the file of
  that batch id, so a re-run batch replaces its file (idempotent);
- ``dedup``: ``unique(subset=["k", "ts"])`` under the watermark into the
  parquet file sink ``<output>/dedup``.

All three use ``Trigger.available_now(flush=True)``: once the input is drained
the watermark jumps past every event in one last batch, so every window and
session is emitted and every key expires. The final output is then a function
of the whole state history: a state row lost or doubled by a crash, in any
batch, shows in it. Without ``flush`` the windows still open at the end would
stay in the state, out of the output's sight.

``MICROSTREAM_FAULTS`` (see ``microstream/runtime/faults.py``) makes the process
SIGKILL itself at a named point (each query counts its own visits; the first
query to reach the visit kills the process). The first line on stdout is
``ready`` once the imports are done, the last ``done`` after all three queries
finished.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

SCHEMA = {"k": pl.String, "ts": pl.Datetime("us"), "v": pl.Int64}
"""The input files' schema."""

QUERIES = ("windows", "sessions", "dedup")
"""The queries, in start order; also their checkpoint and output directory names."""

WATERMARK_DELAY = "10s"
SESSION_GAP = "20s"
AGGS = (
    pl.col("v").sum().alias("v_sum"),
    pl.len().alias("n"),
    pl.col("v").median().alias("v_median"),
)
"""Sum and count keep partial aggregates in state; the median keeps the rows."""


def windows(frame: Any) -> Any:
    return (
        frame.with_watermark("ts", WATERMARK_DELAY)
        .group_by_dynamic("ts", every="1m", group_by="k")
        .agg(*AGGS)
    )


def sessions(frame: Any) -> Any:
    return (
        frame.with_watermark("ts", WATERMARK_DELAY)
        .group_by_session("ts", gap=SESSION_GAP, group_by="k")
        .agg(*AGGS)
    )


def dedup(frame: Any) -> Any:
    return frame.with_watermark("ts", WATERMARK_DELAY).unique(subset=["k", "ts"])


def session_file(directory: Path, batch_id: int) -> Path:
    return directory / f"{batch_id:06d}.parquet"


def write_session_batch(directory: Path, df: pl.DataFrame, batch_id: int) -> None:
    """The idempotent ``foreach_batch`` writer: the file of ``batch_id``, replaced whole."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{batch_id:06d}.{os.getpid()}.tmp"
    df.write_parquet(tmp)
    os.replace(tmp, session_file(directory, batch_id))


def run_queries(starts: Sequence[Callable[[], Any]]) -> None:
    """Start the queries in turn (``starts`` each start one) and wait for all of them.

    If one fails to start, those already started are stopped (each finishes
    its batch) and the error propagates. Failures while running are printed to
    stderr once every query ended, and the first is raised.
    """
    queries: list[Any] = []
    try:
        for start in starts:
            queries.append(start())
    except BaseException:
        for query in queries:
            query.stop()  # let the started ones finish their batch before the process exits
        raise
    failed: list[BaseException] = []
    for query in queries:
        try:
            query.await_termination()
        except Exception as exc:
            failed.append(exc)
    if failed:
        for error in failed:
            print(f"query failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise failed[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args(argv)

    import microstream as ms

    output, checkpoint = Path(args.output), Path(args.checkpoint)
    stream = ms.scan_files(args.input, format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    trigger = ms.Trigger.available_now(flush=True)
    session_dir = output / "sessions"
    print("ready", flush=True)

    run_queries(
        [
            lambda: windows(stream).sink_delta(
                output / "windows",
                checkpoint=checkpoint / "windows",
                trigger=trigger,
                name="stateful_windows",
            ),
            lambda: sessions(stream).foreach_batch(
                lambda df, batch_id: write_session_batch(session_dir, df, batch_id),
                output_mode="update",
                checkpoint=checkpoint / "sessions",
                trigger=trigger,
                name="stateful_sessions",
            ),
            lambda: dedup(stream).sink_parquet(
                output / "dedup",
                checkpoint=checkpoint / "dedup",
                trigger=trigger,
                name="stateful_dedup",
            ),
        ]
    )
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
