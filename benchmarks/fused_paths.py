"""In-process timings of the two paths the fused operator slice changed (issue 14).

    python benchmarks/fused_paths.py --part stage      # with_watermark stage + operator input
    python benchmarks/fused_paths.py --part sessions --data /tmp/bench0/nx-data   # q11's operator

``stage``: the stateless stage of ``scan -> with_watermark -> group_by_dynamic`` (the stage
ends at the watermark) and the collect of the operator's input, per batch of 1 and 100k
rows: ``StatelessStage.evaluate`` where the checkout has it, else ``lower`` + collect (the
path before). ``sessions``: ``SessionOperator.process`` over Nexmark's bid files (q11's
operator: ``bidder``, ``date_time``, gap 10 s, ``len``), the watermark of each batch its
largest time minus 10 s, then a flush; the sessions it emits are written to ``--out`` so
two checkouts' rows can be compared. Run each with ``PYTHONPATH`` at the checkout to
measure, alternating; the figures are minima and medians of repeated runs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import polars as pl

import microstream as ms
from microstream.checkpoint.storage import Storage
from microstream.plan.nodes import OperatorContext, declared_width
from microstream.plan.physical import StatelessStage, compile


def stage(repeats: int) -> None:
    schema = pl.Schema({"ts": pl.Datetime("us"), "key": pl.Int64, "amount": pl.Float64})
    frame = (
        ms.MemoryStream(schema, name="x")
        .lazy()
        .with_watermark("ts", "10s")
        .group_by_dynamic("ts", every="1m", group_by="key")
        .agg(pl.len())
    )
    plan = compile(frame.plan)
    first, scan = plan.stages[0], plan.logical.scans()[0]
    assert isinstance(first, StatelessStage)
    ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0, output_mode="append")
    fused = hasattr(StatelessStage, "evaluate")

    def step(df: pl.DataFrame) -> pl.DataFrame:
        if fused:
            out, _ = first.evaluate({scan: declared_width(df, schema)}, [], ctx)
            return out if isinstance(out, pl.DataFrame) else out.collect()
        lf, _ = first.lower({scan: declared_width(df, schema)}, [], ctx)
        return lf.collect()

    for n in (1, 100_000):
        df = pl.DataFrame(
            {"ts": [datetime(2024, 1, 1)] * n, "key": [1] * n, "amount": [1.0] * n}, schema=schema
        )
        calls = 500 if n == 1 else 100
        took = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                step(df)
            took.append((time.perf_counter() - start) / calls * 1e6)
        print(
            f"stage ({'evaluate' if fused else 'lower + collect'}), {n} row(s): "
            f"min {min(took):.0f} us, median {statistics.median(took):.0f} us"
        )


def sessions(data: Path, repeats: int, out: Path | None) -> None:
    files = sorted((data / "bid").glob("*.parquet"))
    batches = [pl.read_parquet(f).select("bidder", "date_time") for f in files]
    schema = dict(batches[0].schema)

    def run() -> tuple[float, pl.DataFrame]:
        node = (
            ms.MemoryStream(schema, name="bids")
            .lazy()
            .with_watermark("date_time", "10s")
            .group_by_session("date_time", gap="10s", group_by="bidder")
            .agg(bid_count=pl.len().cast(pl.Int64))
        ).plan
        operator = node.build_operator("op0", Storage(tempfile.mkdtemp()))  # type: ignore[attr-defined]
        operator.use_key_groups(64)
        operator.load(None)
        wm = late = -(2**62)
        emitted, took = [], 0.0
        for i, batch in enumerate([*batches, batches[0].clear()]):
            flush = i == len(batches)
            ctx = OperatorContext(
                batch_id=i,
                late_watermark_us=late,
                watermark_us=2**62 if flush else wm,
                output_mode="append",
            )
            start = time.perf_counter()
            emitted.append(operator.process((batch,), ctx).rows)
            took += time.perf_counter() - start
            if not flush:
                late, wm = wm, int(batch.get_column("date_time").dt.epoch("us").max()) - 10_000_000
        return took, pl.concat(emitted)

    took, rows = [], pl.DataFrame()
    for _ in range(repeats):
        seconds, rows = run()
        took.append(seconds * 1e3)
    print(
        f"sessions: process() over {len(batches)} files + flush: min {min(took):.0f} ms, "
        f"median {statistics.median(took):.0f} ms, {rows.height} sessions"
    )
    if out is not None:
        rows.sort(rows.columns).write_parquet(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("stage", "sessions"), required=True)
    parser.add_argument("--data", type=Path, default=Path("/tmp/nexmark-bench"))
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="sessions: their rows, parquet")
    args = parser.parse_args()
    if args.part == "stage":
        stage(args.repeat)
    else:
        sessions(args.data, args.repeat, args.out)


if __name__ == "__main__":
    main()
