"""A complex-event pattern on ``map_groups_with_state``, and its crash-test subprocess.

The pattern: **three failed logins of one user within one minute, followed by
a success** — the success at most one minute after the first of the three
failures that immediately precede it (no success in between). Events at the
same instant are taken failures first.

Out-of-order input is handled the CEP way: the function buffers a user's
events in its state and consumes them in event-time order only once the
watermark has passed them (an event-time timer at the oldest buffered event),
when no earlier event can still arrive. So the alerts do not depend on how the
input is split into batches, nor on its order, as long as no row is late; the
tests compare them with :func:`oracle`, the pattern run over all input at once.

Run as a script, it is the crash test's subprocess::

    python tests/stateful_fn_pipeline.py --input DIR --output DIR --checkpoint DIR

It streams the parquet files of ``--input`` (one file per batch) through the
detector with ``Trigger.available_now(flush=True)`` into one parquet file per
batch id under ``--output`` (written to a temporary name and renamed, so a
re-run batch replaces its file). ``MICROSTREAM_FAULTS`` kills it at a named
point (see ``microstream/runtime/faults.py``). It prints ``ready`` once the imports are
done and ``done`` at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from pydantic import BaseModel

SCHEMA = pl.Schema({"ts": pl.Datetime("us"), "user": pl.String(), "ok": pl.Boolean()})
ALERT_SCHEMA = pl.Schema(
    {
        "user": pl.String(),
        "first_failure": pl.Datetime("us"),
        "success_at": pl.Datetime("us"),
    }
)
WITHIN = timedelta(minutes=1)
FAILURES = 3


class Login(BaseModel):
    ts: datetime
    ok: bool


class LoginState(BaseModel):
    pending: list[Login] = []
    """Events the watermark has not passed yet: an earlier one may still come."""
    failures: list[datetime] = []
    """The last (up to three) failures since the user's last success, oldest first."""


def detect_logins(key: tuple[Any, ...], rows: pl.DataFrame, state: Any) -> pl.DataFrame:
    """``map_groups_with_state`` function: buffer, then match in event-time order."""
    current: LoginState = state.get() or LoginState()
    current.pending += [Login(ts=ts, ok=ok) for ts, ok in rows.select("ts", "ok").iter_rows()]
    watermark: datetime = state.watermark
    ready = sorted((e for e in current.pending if e.ts <= watermark), key=lambda e: (e.ts, e.ok))
    current.pending = [e for e in current.pending if e.ts > watermark]
    alerts = []
    for event in ready:
        if not event.ok:
            current.failures = [*current.failures, event.ts][-FAILURES:]
            continue
        first = current.failures[0] if current.failures else None
        if len(current.failures) == FAILURES and first is not None and event.ts - first <= WITHIN:
            alerts.append({"user": key[0], "first_failure": first, "success_at": event.ts})
        current.failures = []
    # A failure at or before watermark - WITHIN can start no match: every success still
    # to come is after the watermark, more than WITHIN later.
    current.failures = [f for f in current.failures if f > watermark - WITHIN]
    if current.pending or current.failures:
        state.update(current)
        wake = min(e.ts for e in current.pending) if current.pending else None
        if current.failures:  # forget the oldest failure when it can no longer match
            prune = current.failures[0] + WITHIN
            wake = prune if wake is None else min(wake, prune)
        state.set_event_time_timer(wake)
    else:
        state.remove()
    return pl.DataFrame(alerts, schema=ALERT_SCHEMA)


def login_alerts(frame: Any, *, delay: str = "2m") -> Any:
    """The detector on a stream of ``SCHEMA`` rows."""
    return (
        frame.with_watermark("ts", delay)
        .group_by("user")
        .map_groups_with_state(
            detect_logins,
            state_schema=LoginState,
            output_schema=ALERT_SCHEMA,
            timeout="event_time",
        )
    )


def oracle(events: pl.DataFrame) -> list[tuple[Any, ...]]:
    """The alerts of the pattern over all ``events`` at once, sorted."""
    found = []
    for (user,), rows in events.sort("ts", "ok").partition_by("user", as_dict=True).items():
        failures: list[datetime] = []
        for ts, ok in rows.select("ts", "ok").iter_rows():
            if not ok:
                failures = [*failures, ts][-FAILURES:]
                continue
            if len(failures) == FAILURES and ts - failures[0] <= WITHIN:
                found.append((user, failures[0], ts))
            failures = []
    return sorted(found)


def write_batch(directory: Path, df: pl.DataFrame, batch_id: int) -> None:
    """Idempotent ``foreach_batch`` writer: the file of ``batch_id``, replaced whole."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{batch_id:06d}.{os.getpid()}.tmp"
    df.write_parquet(tmp)
    os.replace(tmp, directory / f"{batch_id:06d}.parquet")


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
        name="login_alerts",
    )
    query.await_termination()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
