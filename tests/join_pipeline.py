"""The stream-join crash test's subprocess: impressions x clicks -> a full join -> files.

Run as::

    python tests/join_pipeline.py --imps DIR --clicks DIR --output DIR --checkpoint DIR

Both sides are parquet files, one per side per batch; the join (``how="full"``,
``within=("0s", "5m")``, watermark delay 1 minute) runs with
``Trigger.available_now(flush=True)`` into ``foreach_batch``, which writes each
batch to ``<output>/<batch id>.parquet`` (a temporary name, then renamed over the
batch's file: a re-run batch replaces it). ``MICROSTREAM_FAULTS`` kills the
process at a named point (see ``microstream/runtime/faults.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import polars as pl


def write_batch(directory: Path, df: pl.DataFrame, batch_id: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{batch_id:06d}.{os.getpid()}.tmp"
    df.write_parquet(tmp)
    os.replace(tmp, directory / f"{batch_id:06d}.parquet")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("imps", "clicks", "output", "checkpoint"):
        parser.add_argument(f"--{name}", required=True)
    args = parser.parse_args(argv)

    import microstream as ms

    imps = ms.scan_files(args.imps, max_files_per_trigger=1).with_watermark("imp_time", "1m")
    clicks = ms.scan_files(args.clicks, max_files_per_trigger=1).with_watermark("click_time", "1m")
    output = Path(args.output)
    query = imps.join(clicks, on="ad", how="full", within=("0s", "5m")).foreach_batch(
        lambda df, batch_id: write_batch(output, df, batch_id),
        checkpoint=args.checkpoint,
        trigger=ms.Trigger.available_now(flush=True),
    )
    query.await_termination()
    return 0


if __name__ == "__main__":
    sys.exit(main())
