"""The demo behind ``make demo``: a live file stream into a Delta table.

A producer thread drops a parquet file of payments into ``demo_data/incoming``
every 0.4 s. The query filters and enriches them, joins each payment with a
static Delta table of users (re-read when that table changes: the demo updates
it half way), and appends the result to the Delta table
``demo_data/payments`` with a 1-second processing-time trigger. Each batch's
progress is printed; when the producer is done the query drains and stops,
and the demo checks that every produced payment landed exactly once.

    python -m microstream.demo [--files 12] [--dir demo_data]
"""

from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import polars as pl

import microstream as ms

SCHEMA = {"payment_id": pl.Int64, "user_id": pl.Int64, "amount": pl.Float64, "currency": pl.String}


def produce(incoming: Path, files: int, rows: int, every_s: float) -> None:
    """Write ``files`` parquet files, each under a hidden name first, then renamed."""
    incoming.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        start = i * rows
        df = pl.DataFrame(
            {
                "payment_id": range(start, start + rows),
                "user_id": [(start + k) % 5 for k in range(rows)],
                "amount": [round(((start + k) * 7.3) % 120 - 20, 2) for k in range(rows)],
                "currency": ["EUR" if (start + k) % 3 else "USD" for k in range(rows)],
            },
            schema=SCHEMA,
        )
        tmp = incoming / f".part-{i:04d}.parquet"
        df.write_parquet(tmp)
        tmp.rename(incoming / f"payments-{i:04d}.parquet")  # appears whole, never half-written
        time.sleep(every_s)


class PrintProgress:
    """A listener printing one line per batch."""

    def on_query_progress(self, event: Any) -> None:
        p = event.progress
        files = p.sources[0]
        print(
            f"batch {p.batch_id:>3}: {p.num_input_rows:>4} rows in, {p.num_output_rows:>4} out, "
            f"{p.durations_ms.total:7.1f} ms, files log {files.start_offset} -> "
            f"{files.end_offset}, lag {files.lag}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="microstream demo: files -> Delta, live")
    parser.add_argument("--files", type=int, default=12)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--dir", default="demo_data")
    args = parser.parse_args(argv)

    from deltalake import DeltaTable, write_deltalake

    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    users_path = str(root / "users")
    write_deltalake(
        users_path,
        pl.DataFrame({"user_id": [0, 1, 2, 3, 4], "country": ["NL", "FR", "DE", "NL", "US"]}),
    )

    (root / "incoming").mkdir(parents=True)  # a source directory must exist when the query starts
    payments = (
        ms.scan_files(root / "incoming", format="parquet", schema=SCHEMA)
        .filter(pl.col("amount") > 0)
        .with_columns(
            amount_eur=pl.when(pl.col("currency") == "USD")
            .then(pl.col("amount") * 0.92)
            .otherwise(pl.col("amount"))
            .round(2)
        )
        .join(DeltaTable(users_path), on="user_id", how="left")
    )
    print("plan:")
    payments.explain()

    listener = PrintProgress()
    ms.add_listener(listener)
    producer = threading.Thread(
        target=produce, args=(root / "incoming", args.files, args.rows, 0.4), daemon=True
    )
    producer.start()
    query = payments.sink_delta(
        root / "payments",
        checkpoint=root / "checkpoint",
        trigger=ms.Trigger.every("1s"),
        name="demo_payments",
    )
    try:
        time.sleep(args.files * 0.2)
        # Half way: a user moves; later batches see the new version of the static table.
        write_deltalake(
            users_path, pl.DataFrame({"user_id": [0], "country": ["BE"]}), mode="overwrite",
            predicate="user_id = 0",
        )  # fmt: skip
        producer.join()
        query.process_all_available(timeout=120)
    finally:
        query.stop()
        ms.remove_listener(listener)
    if query.exception() is not None:
        raise query.exception()  # type: ignore[misc]

    table = pl.read_delta(str(root / "payments"))
    produced = pl.read_parquet(root / "incoming" / "*.parquet")
    expected = produced.filter(pl.col("amount") > 0).height
    ids = table["payment_id"]
    print(
        f"\nDelta table {root / 'payments'}: {table.height} rows, "
        f"{DeltaTable(str(root / 'payments')).version() + 1} versions; "
        f"expected {expected} (every positive payment once): "
        f"{'OK' if table.height == expected and ids.n_unique() == ids.len() else 'MISMATCH'}"
    )
    print(table.group_by("country").agg(pl.len(), pl.col("amount_eur").sum()).sort("country"))
    print(f"\nstatus: microstream status {root / 'checkpoint'}")
    return 0 if table.height == expected and ids.n_unique() == ids.len() else 1


if __name__ == "__main__":
    raise SystemExit(main())
