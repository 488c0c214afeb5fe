"""The login pattern of ``stateful_fn_pipeline.py`` as ``match_recognize``, and its crash subprocess.

**Three failed logins of one user, then a success at most one minute after the first
of those three failures** (the three that immediately precede it): the rule that
``tests/stateful_fn_pipeline.py`` writes by hand with ``map_groups_with_state``, here
a pattern, so the two must give the same alerts (its :func:`oracle`).

Run as a script, it is the crash test's subprocess::

    python tests/match_recognize_pipeline.py --input DIR --output DIR --checkpoint DIR

It streams the parquet files of ``--input`` (one file per batch) with
``Trigger.available_now(flush=True)`` into one parquet file per batch id under
``--output`` (replaced whole, so a re-run batch rewrites its file).
``MICROSTREAM_FAULTS`` kills it at a named point (``microstream/runtime/faults.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import polars as pl

__all__ = ["SCHEMA", "login_alerts"]

SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "user": pl.String(), "ok": pl.Boolean()})
"""As ``stateful_fn_pipeline.SCHEMA`` (this script runs without the tests package)."""


def write_batch(directory: Path, df: pl.DataFrame, batch_id: int) -> None:
    """Idempotent ``foreach_batch`` writer: the file of ``batch_id``, replaced whole."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{batch_id:06d}.{os.getpid()}.tmp"
    df.write_parquet(tmp)
    os.replace(tmp, directory / f"{batch_id:06d}.parquet")


def login_alerts(frame: Any, *, delay: str = "2m") -> Any:
    """The login rule as a pattern over a stream of ``SCHEMA`` rows."""
    from microstream import pattern as mp

    return frame.with_watermark("ts", delay).match_recognize(
        partition_by="user",
        order_by="ts",
        pattern="F{3} S",
        define={
            "F": ~pl.col("ok"),
            "S": pl.col("ok") & (pl.col("ts") - mp.first("F.ts") <= timedelta(minutes=1)),
        },
        measures={"first_failure": mp.first("F.ts"), "success_at": mp.last("S.ts")},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args(argv)

    import microstream as ms

    output = Path(args.output)
    stream = ms.scan_files(args.input, format="parquet", schema=SCHEMA, max_files_per_trigger=1)
    print("ready", flush=True)
    query = login_alerts(stream).foreach_batch(
        lambda df, batch_id: write_batch(output, df, batch_id),
        checkpoint=args.checkpoint,
        trigger=ms.Trigger.available_now(flush=True),
        name="login_pattern",
    )
    query.await_termination()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
