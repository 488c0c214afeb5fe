"""A Delta sink commit's cost against the table's number of versions.

Three tables are written side by side, one 1-row batch (one commit with its
``txn``) to each in turn, so all three see the same machine load at each
version:

- ``write_deltalake``: what the sink did per batch before 2026-12-07
  (``write_deltalake`` on the table's handle with the batch's transaction and
  delta-rs' default post-commit hooks: the expired-log cleanup, which lists all
  of ``_delta_log``, after every commit);
- ``sink``: ``DeltaSink.add_batch`` with the default log retention (30 days):
  the cleanup only with a checkpoint;
- ``sink, log_retention=0s``: the same with ``log_retention`` (the log files
  before the latest checkpoint are deleted when it is written, so
  ``_delta_log`` holds at most ``delta.checkpointInterval`` commits);
- ``... + optimize_delta every 100``: the same, compacted by
  ``ms.optimize_delta`` every 100 versions (timed apart: a commit's cost also
  grows with the table's data files, whose actions delta-rs keeps in its
  snapshot and rewrites into every checkpoint).

Reported: the median commit time over the versions around 50, 500 and 1000
(and each step of 100), and the files in ``_delta_log`` at the end.

    python benchmarks/delta_commit_cost.py [--versions 1100] [--retention 0s]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from connectors.delta import DeltaSinkSpec, optimize_delta
from microstream.api.session import Session
from microstream.checkpoint.storage import Storage
from microstream.protocols import SinkContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=1100)
    parser.add_argument("--retention", default="0s", help="log_retention of the third table")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ms-delta-commit-"))
    try:
        ctx = SinkContext(
            query_id="q",
            query_name=None,
            output_mode="append",
            storage=Storage(str(work / "cp")),
            session=Session(),
        )
        raw_path = work / "write_deltalake"
        sinks = {
            "sink": DeltaSinkSpec(str(work / "sink")).build(ctx),
            f"sink, log_retention={args.retention}": DeltaSinkSpec(
                str(work / "retention"), log_retention=args.retention
            ).build(ctx),
            f"sink, log_retention={args.retention} + optimize_delta every 100": DeltaSinkSpec(
                str(work / "optimized"), log_retention=args.retention
            ).build(ctx),
        }
        optimize_ms: list[float] = []
        names = ["write_deltalake", *sinks]
        times: dict[str, list[float]] = {name: [] for name in names}
        raw: DeltaTable | None = None
        for version in range(args.versions):
            row = pl.DataFrame({"v": [version]})
            commit = CommitProperties(app_transactions=[Transaction(app_id="q", version=version)])
            t0 = time.perf_counter()
            write_deltalake(raw if raw is not None else str(raw_path), row.to_arrow(),
                            mode="append", commit_properties=commit)  # fmt: skip
            times["write_deltalake"].append(time.perf_counter() - t0)
            if raw is None:
                raw = DeltaTable(str(raw_path))
            for name, sink in sinks.items():
                t0 = time.perf_counter()
                sink.add_batch(version, row)
                times[name].append(time.perf_counter() - t0)
            if version % 100 == 99:
                t0 = time.perf_counter()
                optimize_delta(str(work / "optimized"))
                optimize_ms.append((time.perf_counter() - t0) * 1000)

        def around(name: str, version: int) -> float:
            window = times[name][max(version - 25, 1) : version + 25]
            return round(statistics.median(window) * 1000, 2)

        at = [v for v in (50, 500, 1000) if v < args.versions]
        steps = list(range(100, args.versions, 100))
        dirs = {
            "write_deltalake": raw_path,
            names[1]: work / "sink",
            names[2]: work / "retention",
            names[3]: work / "optimized",
        }
        result = {
            "versions": args.versions,
            "median commit ms around version": {n: {v: around(n, v) for v in at} for n in names},
            "median commit ms per 100 versions": {
                n: {v: around(n, v) for v in steps} for n in names
            },
            "optimize_delta ms (median, every 100 versions)": round(
                statistics.median(optimize_ms), 1
            )
            if optimize_ms
            else None,
            "_delta_log files at the end": {
                n: sum(1 for _ in (d / "_delta_log").iterdir()) for n, d in dirs.items()
            },
            "rows": {n: pl.read_delta(str(d)).height for n, d in dirs.items()},
        }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
