"""The ``microstream`` command: run query files, inspect checkpoints.

Exit codes: 0 success, 1 a query or checkpoint error (message on stderr),
2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from collections.abc import Sequence
from typing import Any

from microstream.checkpoint import Checkpoint, LockRecord
from microstream.exceptions import MicrostreamError
from microstream.progress import QueryProgress
from microstream.session import default_session
from microstream.trigger import Trigger

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``microstream`` command.

    Examples
    --------
    >>> main(["status", "memory://no-such-checkpoint"])
    1
    """
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except MicrostreamError as exc:
        print(f"microstream: error: {exc}", file=sys.stderr)
        return 1
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microstream",
        description="Micro-batch structured streaming on Polars: run queries, inspect checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the queries a Python file starts, until they stop",
        description=(
            "Execute FILE.py; every query it starts runs until it stops. With --available-now "
            "each query processes what is available at start and exits (the scheduled-job mode)."
        ),
    )
    run.add_argument("file", metavar="FILE.py", help="Python file that starts queries")
    run.add_argument(
        "--available-now",
        action="store_true",
        help="override every query's trigger with Trigger.available_now()",
    )
    run.set_defaults(handler=_run)

    status = sub.add_parser(
        "status",
        help="show a checkpoint's last batch, offsets, lag and throughput",
        description="Read a query's checkpoint (any fsspec URL) and summarise it.",
    )
    status.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or URL")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(handler=_status)

    state = sub.add_parser(
        "state",
        help="show the state of a checkpoint's stateful operators as tables",
        description=(
            "Read the state of each stateful operator (or one, with --operator) as of the "
            "last committed batch, and print it as a table."
        ),
    )
    state.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or URL")
    state.add_argument("--operator", help="only this operator (op0, op1, ...)")
    state.add_argument("--store", help="only this store of the operator (partials, rows, ...)")
    state.add_argument("--version", type=int, help="a batch id (default: the last committed)")
    state.add_argument("--limit", type=int, default=20, help="rows to print per store (20)")
    state.add_argument("--csv", action="store_true", help="print all rows as CSV instead")
    state.set_defaults(handler=_state)
    return parser


def _run(args: argparse.Namespace) -> int:
    session = default_session
    if args.available_now:
        session.trigger_override = Trigger.available_now()
    sys.argv = [args.file]
    try:
        runpy.run_path(args.file, run_name="__main__")
        failed = False
        for query in list(session.active):
            query.await_termination_quietly()
        for query in session.finished:
            exc = query.exception()
            if exc is not None:
                failed = True
                print(f"microstream: query {query.name or query.id} failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        for query in session.active:
            query.stop()
        return 130
    finally:
        session.trigger_override = None
    return 1 if failed else 0


def _status(args: argparse.Namespace) -> int:
    cp = Checkpoint(args.checkpoint)
    meta = cp.read_metadata()
    latest = cp.latest_offsets()
    commit = cp.latest_commit()
    progress = _recent_progress(cp, limit=10)
    lock = None
    if cp.storage.exists("lock.json"):
        lock = cp.storage.read_model("lock.json", LockRecord)
    report: dict[str, Any] = {
        "checkpoint": cp.display(),
        "id": meta.id,
        "name": meta.name,
        "created": meta.created.isoformat(),
        "sources": [s.get("kind", "?") for s in meta.plan.sources],
        "sink": meta.plan.sink,
        "output_mode": meta.plan.output_mode,
        "last_batch": latest.batch_id if latest else None,
        "last_committed_batch": commit.batch_id if commit else None,
        "pending_batch": (
            latest.batch_id
            if latest and (commit is None or commit.batch_id < latest.batch_id)
            else None
        ),
        "offsets": [
            {"source": s.description, "start": s.start, "end": s.end}
            for s in (latest.sources if latest else [])
        ],
        "lag": [s.lag for s in progress[-1].sources] if progress else None,
        "recent_batches": len(progress),
        "recent_input_rows": sum(p.num_input_rows for p in progress),
        "recent_rows_per_second": (
            sum(p.processed_rows_per_second for p in progress) / len(progress) if progress else None
        ),
        "last_batch_duration_ms": progress[-1].durations_ms.total if progress else None,
        "running": (lock is not None and time.time() - lock.heartbeat_at < lock.timeout_s),
        "owner": f"pid {lock.pid} on {lock.host}" if lock else None,
    }
    if args.json:
        print(json.dumps(report, indent=1, default=str))
        return 0
    print(f"checkpoint   {report['checkpoint']}")
    print(f"query        {meta.name or '-'} (id {meta.id})")
    print(
        f"plan         {', '.join(report['sources'])} -> {meta.plan.sink} ({meta.plan.output_mode})"
    )
    print(f"running      {'yes, ' + str(report['owner']) if report['running'] else 'no'}")
    print(f"last batch   {report['last_batch']} (committed: {report['last_committed_batch']})")
    if report["pending_batch"] is not None:
        print(f"pending      batch {report['pending_batch']} is logged but not committed; "
              "it re-runs on the next start")  # fmt: skip
    for off in report["offsets"]:
        print(f"offsets      {off['source']}: {off['start']} -> {off['end']}")
    if progress:
        lag = ", ".join("?" if x is None else str(x) for x in report["lag"])
        print(f"lag          {lag}")
        print(
            f"throughput   {report['recent_rows_per_second']:.0f} rows/s over the last "
            f"{len(progress)} batches ({report['recent_input_rows']} rows); last batch took "
            f"{report['last_batch_duration_ms']:.1f} ms"
        )
    return 0


def _state(args: argparse.Namespace) -> int:
    import polars as pl

    from microstream.inspect_state import list_state, read_state

    Checkpoint(args.checkpoint).read_metadata()  # a clear error if it is no checkpoint
    operators = list_state(args.checkpoint)
    if args.operator:
        operators = {args.operator: operators.get(args.operator, [])}
    if not any(operators.values()):
        print("no state: the query has no stateful operator, or no batch committed yet")
        return 0
    for operator, stores in operators.items():
        for store in stores:
            if args.store and store != args.store:
                continue
            frame = read_state(
                args.checkpoint, operator=operator, store=store, version=args.version
            )
            if args.csv:
                print(frame.write_csv(), end="")
                continue
            print(f"{operator}/{store}: {frame.height} rows")
            with pl.Config(tbl_rows=args.limit, tbl_cols=-1, tbl_width_chars=160):
                print(frame.head(args.limit))
    return 0


def _recent_progress(cp: Checkpoint, limit: int) -> list[QueryProgress]:
    fs = cp.storage.fs
    try:
        files = fs.ls(cp.storage.path("progress"), detail=True)
    except FileNotFoundError:
        return []
    records: list[QueryProgress] = []
    for info in sorted(files, key=lambda f: f.get("mtime") or f.get("LastModified") or 0):
        for line in fs.cat_file(info["name"]).decode().splitlines():
            if line.strip():
                try:
                    records.append(QueryProgress.model_validate_json(line))
                except ValueError:
                    continue  # a torn last line of a killed run
    records.sort(key=lambda p: (p.batch_id, p.timestamp))
    return records[-limit:]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
