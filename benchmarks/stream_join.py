"""Stream-stream join throughput and state: impressions x clicks, 1-hour bound (default).

Generates N impressions and N clicks (default 1M each) as parquet files, one
file per side per micro-batch (default 20): impression ``imp_id`` (the join
key; every impression is unique), ``imp_time`` increasing over ten hours with
+-30 s of disorder, ``campaign``; each click refers to a random impression and
comes 0-70 minutes after it (so about one in seven is outside the bound), with
``click_time`` and ``cost``. Then, in one run:

- microstream: ``scan_files(imps, max_files_per_trigger=1).with_watermark("imp_time",
  "1m")`` joined ``how="left"`` with the same over clicks on ``imp_id`` within
  ``("0s", "1h")``, ``Trigger.available_now(flush=True)`` into ``foreach_batch``;
- Polars, once over all files: the same left join (pairs within the bound, plus
  every impression without one, which is what the stream emits once flushed).

The stream's rows are checked equal to Polars' before anything is reported.
Figures: input rows/s (impressions + clicks) end to end, the ratio to Polars,
and the peak of state rows over the run (from progress), next to what a join
without a time bound would keep (all 2N rows). Median of ``--repeat``
interleaved runs.

    python benchmarks/stream_join.py [--rows 1000000] [--files 20] [--repeat 3] [--out FILE]
        [--bound-minutes 60]

The default is the hot-path issue's (14) join case: 1M impressions x 1M clicks of which
~0.86M fall in the bound, a 1-minute watermark delay, 20 files a side, one file per side
per trigger. ``--bound-minutes M`` bounds the join to ``("0s", "Mm")`` and spreads the
clicks over ``7/6 M`` minutes after their impression (the same one-in-seven outside the
bound); ``--rows`` smaller for quick runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from state_scaling import machine_info, source_version  # benchmarks/

import microstream as ms
from microstream.runtime.progress import QueryProgressEvent

START = dt.datetime(2024, 1, 1)
SPAN_US = 10 * 3_600_000_000  # ten hours of impressions
DISORDER_US = 30_000_000
BOUND_MINUTES = 60
DELAY = "1m"


def generate(
    root: Path, rows: int, files: int, bound_minutes: int = BOUND_MINUTES, seed: int = 7
) -> None:
    """``files`` parquet files per side under ``root/imps`` and ``root/clicks``."""
    rng = np.random.default_rng(seed)
    start_us = (START - dt.datetime(1970, 1, 1)) // dt.timedelta(microseconds=1)
    ids = np.arange(rows, dtype=np.int64)
    imp_us = start_us + ids * (SPAN_US // rows) + rng.integers(-DISORDER_US, DISORDER_US, rows)
    imps = pl.DataFrame(
        {
            "imp_id": ids,
            "imp_time": pl.Series(imp_us).cast(pl.Datetime("us")),
            "campaign": rng.integers(0, 1000, rows),
        }
    )
    target = np.sort(rng.integers(0, rows, rows))  # clicks come in impression order
    click_us = imp_us[target] + rng.integers(0, bound_minutes * 70_000_000, rows)
    clicks = pl.DataFrame(
        {
            "click_imp_id": target,
            "click_time": pl.Series(click_us).cast(pl.Datetime("us")),
            "cost": rng.random(rows),
        }
    )
    per_file = rows // files
    for side, frame in (("imps", imps), ("clicks", clicks)):
        directory = root / side
        directory.mkdir(parents=True)
        for f in range(files):
            chunk = frame.slice(f * per_file, per_file if f < files - 1 else None)
            chunk.write_parquet(directory / f"part-{f:05d}.parquet")


def run_polars(root: Path, bound_minutes: int) -> tuple[float, pl.DataFrame]:
    t0 = time.perf_counter()
    imps = pl.scan_parquet(str(root / "imps" / "*.parquet"))
    clicks = pl.scan_parquet(str(root / "clicks" / "*.parquet"))
    pairs = imps.join(clicks, left_on="imp_id", right_on="click_imp_id").filter(
        (pl.col("click_time") - pl.col("imp_time")).is_between(
            dt.timedelta(0), dt.timedelta(minutes=bound_minutes)
        )
    )
    lonely = imps.join(pairs.select("imp_id"), on="imp_id", how="anti")
    result = pl.concat([pairs, lonely], how="diagonal").collect()
    return time.perf_counter() - t0, result


def run_microstream(
    root: Path, checkpoint_root: str | None, bound_minutes: int
) -> tuple[float, pl.DataFrame, dict]:
    frames: list[pl.DataFrame] = []
    peak = 0

    class Peak:
        def on_query_progress(self, event: QueryProgressEvent) -> None:
            nonlocal peak
            operators = event.progress.state_operators
            peak = max(peak, sum(op.num_rows_total for op in operators))

    checkpoint = tempfile.mkdtemp(prefix="ms-join-", dir=checkpoint_root)
    listener = Peak()
    ms.add_listener(listener)
    try:
        t0 = time.perf_counter()
        imps = ms.scan_files(str(root / "imps"), max_files_per_trigger=1).with_watermark(
            "imp_time", DELAY
        )
        clicks = ms.scan_files(str(root / "clicks"), max_files_per_trigger=1).with_watermark(
            "click_time", DELAY
        )
        query = imps.join(
            clicks,
            left_on="imp_id",
            right_on="click_imp_id",
            how="left",
            within=("0s", f"{bound_minutes}m"),
        ).foreach_batch(
            lambda df, _batch_id: frames.append(df),
            trigger=ms.Trigger.available_now(flush=True),
            checkpoint=checkpoint,
        )
        query.await_termination()
        elapsed = time.perf_counter() - t0
    finally:
        ms.remove_listener(listener)
    progress = query.recent_progress
    detail = {
        "batches": len(progress),
        "peak_state_rows": peak,
        "dropped_late": sum(op.num_rows_dropped_late for p in progress for op in p.state_operators),
        "phase_totals_ms": {
            phase: round(sum(getattr(p.durations_ms, phase) for p in progress), 1)
            for phase in ("read", "compute", "sink", "commit", "total")
        },
    }
    return elapsed, pl.concat(frames, how="vertical"), detail


def same_rows(a: pl.DataFrame, b: pl.DataFrame) -> bool:
    columns = sorted(a.columns)
    if sorted(b.columns) != columns:
        return False
    key = ["imp_id", "click_time"]
    return (
        a.select(columns)
        .sort(key, nulls_last=True)
        .equals(b.select(columns).sort(key, nulls_last=True))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="impressions (= clicks)")
    parser.add_argument("--files", type=int, default=20, help="files per side (= batches)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--bound-minutes", type=int, default=BOUND_MINUTES, help="upper bound of the join"
    )
    parser.add_argument("--checkpoint-root", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ms-join-data-"))
    generate(root, args.rows, args.files, args.bound_minutes)
    seconds: dict[str, list[float]] = {"polars": [], "microstream": []}
    details = []
    equal = True
    for _ in range(args.repeat):
        t, reference = run_polars(root, args.bound_minutes)
        seconds["polars"].append(t)
        t, streamed, detail = run_microstream(root, args.checkpoint_root, args.bound_minutes)
        seconds["microstream"].append(t)
        details.append(detail)
        equal = equal and same_rows(streamed, reference)
        if not equal:
            sys.exit("the stream's rows differ from Polars': no figures reported")
    input_rows = 2 * args.rows
    median = {k: statistics.median(v) for k, v in seconds.items()}
    rate = {k: round(input_rows / v) for k, v in median.items()}
    middle = sorted(range(len(details)), key=lambda i: seconds["microstream"][i])[len(details) // 2]
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine_info(),
        "versions": {
            "python": platform.python_version(),
            "polars": pl.__version__,
            "microstream": source_version(),
        },
        "settings": {
            "impressions": args.rows,
            "clicks": args.rows,
            "files_per_side": args.files,
            "bound": ["0s", f"{args.bound_minutes}m"],
            "watermark_delay": DELAY,
            "how": "left",
            "repeat": args.repeat,
        },
        "seconds": seconds,
        "input_rows_per_s (median)": rate,
        "ratio_stream_to_polars": round(rate["microstream"] / rate["polars"], 3),
        "output_rows": reference.height,
        "result_equal_to_polars": equal,
        "peak_state_rows": details[middle]["peak_state_rows"],
        "state_rows_without_bound": input_rows,
        "microstream_detail (median run)": details[middle],
    }
    out = Path(args.out or f"benchmarks/results/{result['date']}-stream-join.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
