"""The ``microstream`` command: run query files, replay them, inspect checkpoints and outputs.

Exit codes: 0 success, 1 a query or checkpoint error (message on stderr),
2 bad usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from microstream.api.session import default_session
from microstream.checkpoint.log import Checkpoint, LockRecord, reset_checkpoint
from microstream.checkpoint.migrate import MigrationPlan, migrate_checkpoint
from microstream.exceptions import CheckpointError, MicrostreamError, OutputError
from microstream.runtime.base import LocalRuntime, Runtime
from microstream.runtime.progress import QueryProgress
from microstream.runtime.progress_bar import ProgressBar
from microstream.runtime.ray import RayRuntime
from microstream.time.trigger import Trigger

if TYPE_CHECKING:
    from microstream.api.query import StreamingQuery
    from microstream.api.session import Session

__all__ = ["main"]

RUNTIMES: dict[str, Callable[[argparse.Namespace], Runtime]] = {
    "local": lambda args: LocalRuntime(),
    "ray": lambda args: RayRuntime(address=args.address, num_workers=args.workers or 2),
}
"""``microstream run --runtime NAME``: the runtimes by name, built from the options."""


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
        description=(
            "Micro-batch structured streaming on Polars: run queries, replay them into a new "
            "version of their output, inspect checkpoints and outputs."
        ),
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
        help="override every query's trigger with Trigger.available_now() (with a progress "
        "bar in a terminal when the file starts one query)",
    )
    _add_runtime_options(run, "every query the file starts")
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the queries' metrics for Prometheus on http://ADDR:PORT/metrics while "
        "they run (0 picks a free port; needs microstream[metrics])",
    )
    run.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="the address of --metrics-port (default: 127.0.0.1, this machine only; 0.0.0.0 "
        "lets other hosts scrape it)",
    )
    run.set_defaults(handler=_run)

    sql = sub.add_parser(
        "sql",
        help="run the statements of a SQL file (CREATE TABLE, views, INSERT INTO), until its "
        "queries stop",
        description=(
            "Run FILE.sql's statements in order, in Flink's SQL dialect: CREATE TABLE declares "
            "sources and sinks, CREATE TEMPORARY VIEW names queries, INSERT INTO starts a query, "
            "EXPLAIN and SELECT print. Needs microstream[sql]."
        ),
    )
    sql.add_argument("file", metavar="FILE.sql", help="SQL file of ;-separated statements")
    sql.add_argument(
        "--available-now",
        action="store_true",
        help="override every query's trigger with Trigger.available_now()",
    )
    _add_runtime_options(sql, "every INSERT INTO")
    sql.set_defaults(handler=_sql)

    replay = sub.add_parser(
        "replay",
        help="reprocess a query's whole input into a new version of a Delta output, then switch",
        description=(
            "Kappa-style reprocessing. Import FUNCTION from FILE.py (or MODULE), call it with "
            "replay=True if it has that parameter, and run the StreamFrame it returns from the "
            "start of its sources' retained history into a new Delta table OUTPUT/v<n> with a new "
            "checkpoint (OUTPUT/_checkpoints/v<n>), with Trigger.available_now() and a progress "
            "bar (share done, lag). When it has finished, OUTPUT/current.json is switched "
            "atomically to the new table; readers resolve it with ms.current_output(OUTPUT) or "
            "ms.read_output(OUTPUT). A failed or interrupted replay leaves the pointer where it "
            "was; running the same command again resumes it."
        ),
        epilog=(
            "example: microstream replay jobs/per_minute.py:per_minute --output tables/per_minute"
        ),
    )
    replay.add_argument(
        "query", metavar="FILE.py:FUNCTION", help="the query function (or MODULE:FUNCTION)"
    )
    replay.add_argument(
        "--output", required=True, help="the output directory (pointer and versions)"
    )
    replay.add_argument(
        "--output-mode",
        choices=["append", "update", "complete"],
        default="append",
        help="as for sink_delta (default: append)",
    )
    replay.add_argument(
        "--checkpoint", help="the replay's checkpoint (default: OUTPUT/_checkpoints/v<n>)"
    )
    replay.add_argument(
        "--version", type=int, help="the version to write (default: the current one + 1)"
    )
    replay.add_argument(
        "--flush",
        action="store_true",
        help="emit every window at the end (available_now(flush=True)); the output then "
        "equals the batch result, but no live job can continue on its checkpoint",
    )
    replay.add_argument(
        "--no-switch",
        action="store_true",
        help="leave readers on the current version (switch later with 'microstream output')",
    )
    replay.add_argument(
        "--partition-by", nargs="+", metavar="COLUMN", help="partition the new table by these"
    )
    replay.add_argument("--name", help="the query's name (default: <output name>-v<n>)")
    bar = replay.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", action="store_true", default=None, help="always show the progress bar"
    )
    bar.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="never show it (default: when stderr is a terminal)",
    )
    replay.set_defaults(handler=_replay)

    output = sub.add_parser(
        "output",
        help="show which version of an output readers use, or switch it (roll back)",
        description=(
            "Print the pointer of a versioned output (OUTPUT/current.json): the version, its "
            "Delta table and checkpoint, and the version before it. --switch points readers at "
            "another table atomically; --rollback at the previous version."
        ),
    )
    output.add_argument("output", metavar="OUTPUT", help="the output directory or URL")
    output.add_argument("--json", action="store_true", help="print JSON instead of text")
    move = output.add_mutually_exclusive_group()
    move.add_argument("--switch", metavar="TABLE", help="switch readers to this Delta table")
    move.add_argument(
        "--rollback", action="store_true", help="switch readers back to the previous version"
    )
    output.add_argument(
        "--checkpoint", help="with --switch: the checkpoint of the query writing TABLE"
    )
    output.set_defaults(handler=_output)

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

    reset = sub.add_parser(
        "reset",
        help="delete a stopped query's checkpoint (never its output)",
        description=(
            "Delete the checkpoint at CHECKPOINT so its query starts over: refused while a "
            "query holds the checkpoint's lock; asks first unless --yes. The query's output "
            "(tables, files, topics) is not in the checkpoint and is never touched."
        ),
    )
    reset.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or URL")
    reset.add_argument("--yes", action="store_true", help="delete without asking")
    reset.set_defaults(handler=_reset)

    migrate = sub.add_parser(
        "migrate",
        help="convert a checkpoint of format 1 (an older microstream) to format 2, in place",
        description=(
            "Convert the format-1 checkpoint at CHECKPOINT to format 2 in place, so its query "
            "continues where it stopped: every state store becomes a key-group snapshot of the "
            "last committed batch, every JSON file gets its checksum, metadata.json is "
            "rewritten last. Refused while a query holds the checkpoint's lock; asks first "
            "unless --yes. Run it again to finish a migration that was interrupted. The "
            "microstream that wrote the checkpoint cannot read it afterwards: back it up first "
            "to be able to go back."
        ),
    )
    migrate.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint directory or URL")
    migrate.add_argument("--yes", action="store_true", help="convert without asking")
    migrate.add_argument(
        "--key-groups",
        type=int,
        metavar="N",
        help="key groups of the converted state (default 128; fixed from then on)",
    )
    migrate.set_defaults(handler=_migrate)

    ui = sub.add_parser(
        "ui",
        help="serve a live, read-only web dashboard of checkpoints' progress and state",
        description=(
            "Serve a dashboard that lists the queries of each CHECKPOINT (read from its "
            "progress log, plan record and state, refreshed every second) until interrupted. "
            "It only reads: no request can stop, reset or change a query. It binds to "
            "127.0.0.1; anyone who can reach another address would see every query's plan, "
            "progress and state, without authentication or TLS."
        ),
        epilog="example: microstream ui --port 8080 checkpoints/payments",
    )
    ui.add_argument(
        "checkpoints", nargs="*", metavar="CHECKPOINT", help="checkpoint directories or URLs"
    )
    ui.add_argument("--port", type=int, default=8080, help="TCP port (8080; 0: any free one)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    ui.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --host other than loopback (unauthenticated, read-only access to "
        "every query's data for anyone who can reach it)",
    )
    ui.set_defaults(handler=_ui)
    return parser


def _reset(args: argparse.Namespace) -> int:
    def confirm(files: list[str]) -> bool:
        groups: dict[str, int] = {}
        for name in files:
            top = name.split("/", 1)[0] + ("/" if "/" in name else "")
            groups[top] = groups.get(top, 0) + 1
        listed = ", ".join(
            top if top.endswith(".json") and n == 1 else f"{top} ({n} file{'s' * (n > 1)})"
            for top, n in groups.items()
        )
        print(f"checkpoint {args.checkpoint}: {len(files)} files: {listed}")
        print(
            "not touched: the query's output (tables, files, topics are not in the checkpoint). "
            "A query started again on this checkpoint gets a new id and reads its sources "
            "from their starting offsets, so it writes that output again: give it a new "
            "output, or clear the old one yourself"
        )
        if args.yes:
            return True
        if not sys.stdin.isatty():
            msg = "not deleting: no terminal to ask for confirmation; pass --yes to delete"
            raise CheckpointError(msg)
        return input(f"delete these {len(files)} files? [y/N] ").strip().lower() in ("y", "yes")

    deleted = reset_checkpoint(args.checkpoint, confirm=confirm)
    if not deleted:
        print("nothing deleted")
        return 1
    print(f"deleted checkpoint {args.checkpoint} ({len(deleted)} files)")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    def confirm(plan: MigrationPlan) -> bool:
        print(plan.describe())
        if args.yes:
            return True
        if not sys.stdin.isatty():
            msg = "not converting: no terminal to ask for confirmation; pass --yes to convert"
            raise CheckpointError(msg)
        return input("convert it? [y/N] ").strip().lower() in ("y", "yes")

    done = migrate_checkpoint(args.checkpoint, confirm=confirm, key_groups=args.key_groups)
    if done is None:
        print("nothing changed")
        return 1
    print(f"checkpoint {args.checkpoint} is in format 2 now: its query can run again")
    return 0


def _run(args: argparse.Namespace) -> int:
    if _runtime_options_misused(args):
        return 2
    session = default_session
    server = None
    if args.metrics_port is not None:
        from microstream.metrics.prometheus import start_metrics_server

        server = start_metrics_server(args.metrics_port, addr=args.metrics_addr, session=session)
        print(f"microstream: serving metrics on {server.url}", file=sys.stderr, flush=True)
    _override(session, args)
    sys.argv = [args.file]
    try:
        runpy.run_path(args.file, run_name="__main__")
        active = list(session.active)
        # One scheduled query working through a backlog: a progress bar in a terminal.
        bar = (
            ProgressBar(active[0])
            if args.available_now and len(active) == 1 and sys.stderr.isatty()
            else None
        )
        for query in active:
            query.await_termination_quietly()
        if bar is not None:
            bar.close()
        failed = _report_failures(session.finished)
    except KeyboardInterrupt:
        for query in session.active:
            query.stop()
        return 130
    finally:
        session.trigger_override = session.runtime_override = None
        if server is not None:
            server.stop()
    return 1 if failed else 0


def _override(session: Session, args: argparse.Namespace) -> None:
    """``--available-now`` and ``--runtime``: what every query the command starts runs with."""
    if args.available_now:
        session.trigger_override = Trigger.available_now()
    if args.runtime is not None:
        session.runtime_override = RUNTIMES[args.runtime](args)


def _report_failures(queries: Iterable[StreamingQuery]) -> bool:
    """Whether any of the ended ``queries`` failed; each failure is said on stderr."""
    failed = False
    for query in queries:
        exc = query.exception()
        if exc is not None:
            failed = True
            print(f"microstream: query {query.name or query.id} failed: {exc}", file=sys.stderr)
    return failed


def _runtime_options_misused(args: argparse.Namespace) -> bool:
    """Whether ``--address``/``--workers`` came without ``--runtime ray`` (said on stderr)."""
    if args.runtime != "ray" and (args.address is not None or args.workers is not None):
        print("microstream: --address and --workers apply to --runtime ray", file=sys.stderr)
        return True
    return False


def _add_runtime_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--runtime``, and ``--address``/``--workers`` for ``--runtime ray``."""
    parser.add_argument(
        "--runtime",
        choices=sorted(RUNTIMES),
        default=None,
        help=f"run {what} on this runtime, whatever its runtime= says "
        "(local: this process, the default; ray: stateful operators in Ray actors, needs "
        "microstream[ray])",
    )
    parser.add_argument(
        "--address",
        default=None,
        metavar="ADDRESS",
        help="with --runtime ray: the Ray cluster to join ('auto', 'ray://host:port'; "
        "default: the one RAY_ADDRESS names, or a new local one)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="with --runtime ray: how many Ray actors share every operator's key groups "
        "(default 2)",
    )


def _sql(args: argparse.Namespace) -> int:
    import polars as pl

    from microstream.api.frame import StreamFrame
    from microstream.sql.context import SQLContext

    if _runtime_options_misused(args):
        return 2
    with open(args.file, encoding="utf-8") as fh:
        script = fh.read()
    session = default_session
    _override(session, args)
    try:
        started = []
        for result in SQLContext().execute_script(script):
            if isinstance(result, StreamFrame):
                print(
                    "microstream: a SELECT over a stream needs a sink; write INSERT INTO a table "
                    "declared WITH ('connector' = 'print') to see its rows",
                    file=sys.stderr,
                )
                return 1
            if isinstance(result, pl.LazyFrame):
                table = result.collect()
                with pl.Config(tbl_rows=-1):
                    print("\n".join(table["plan"]) if table.columns == ["plan"] else table)
            elif result is not None:
                started.append(result)
        for query in started:
            query.await_termination_quietly()
        failed = _report_failures(started)
    except KeyboardInterrupt:
        for query in session.active:
            query.stop()
        return 130
    finally:
        session.trigger_override = session.runtime_override = None
    return 1 if failed else 0


def _replay(args: argparse.Namespace) -> int:
    from microstream.api.replay import replay

    if os.getcwd() not in sys.path:  # MODULE:FUNCTION from the current directory, as python -m
        sys.path.insert(0, os.getcwd())
    try:
        result = replay(
            args.query,
            args.output,
            output_mode=args.output_mode,
            version=args.version,
            checkpoint=args.checkpoint,
            flush=args.flush,
            switch=not args.no_switch,
            progress=args.progress,
            name=args.name,
            partition_by=args.partition_by,
        )
    except KeyboardInterrupt:
        print("microstream: replay interrupted; readers were not switched", file=sys.stderr)
        return 130
    except OutputError:
        raise  # the message says what to do; main() prints it
    except Exception as exc:  # the query failed: a source, the sink, a bug in its code
        print(
            f"microstream: error: the replay failed; readers were not switched: "
            f"{type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 1
    print(
        f"replayed {args.query} into version {result.version}: {result.num_batches} batches, "
        f"{result.num_input_rows:,} rows in, {result.num_output_rows:,} rows out, "
        f"{result.duration_s:.1f}s"
    )
    print(f"table        {result.table}")
    print(f"checkpoint   {result.checkpoint}")
    was = f"version {result.previous.version}" if result.previous else "no version"
    if result.switched:
        print(f"readers now use version {result.version} (before: {was})")
    else:
        print(
            f"not switched: readers still use {was}; switch with: microstream output "
            f"{args.output} --switch {result.table} --checkpoint {result.checkpoint}"
        )
    return 0


def _output(args: argparse.Namespace) -> int:
    from microstream.api.outputs import current_output, switch_output

    if args.checkpoint and not args.switch:
        print("microstream: error: --checkpoint goes with --switch TABLE", file=sys.stderr)
        return 2
    if args.switch:
        switch_output(args.output, table=args.switch, checkpoint=args.checkpoint)
    elif args.rollback:
        previous = current_output(args.output).previous
        if previous is None:
            print(f"microstream: error: output {args.output} has no previous version", file=sys.stderr)  # fmt: skip
            return 1
        switch_output(args.output, table=previous.table, checkpoint=previous.checkpoint)
    pointer = current_output(args.output)
    if args.json:
        print(pointer.model_dump_json(indent=1))
        return 0
    print(f"output       {args.output}")
    print(f"version      {pointer.version} (since {pointer.switched_at.isoformat()})")
    print(f"table        {pointer.table}")
    print(f"checkpoint   {pointer.checkpoint or '-'}")
    if pointer.query:
        print(f"query        {pointer.query}{' (flushed)' if pointer.flushed else ''}")
    if pointer.previous is not None:
        print(f"previous     version {pointer.previous.version}: {pointer.previous.table}")
    return 0


def _status(args: argparse.Namespace) -> int:
    cp = Checkpoint(args.checkpoint)
    meta = cp.read_metadata()
    latest = cp.latest_offsets()
    commit = cp.latest_commit()
    progress = _recent_progress(cp, limit=10)
    lock = None
    if cp.storage.exists("lock.json"):
        lock = cp.storage.read_model("lock.json", LockRecord, checksum=False)
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

    from microstream.state.read import list_state, read_state

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


def _ui(args: argparse.Namespace) -> int:
    from microstream.ui import start_ui

    for url in args.checkpoints:
        Checkpoint(url).read_metadata()  # a clear error now if it is no checkpoint
    dashboard = start_ui(
        port=args.port,
        host=args.host,
        allow_remote=args.allow_remote,
        checkpoints=args.checkpoints,
    )
    print(f"microstream dashboard on {dashboard.url} (Ctrl-C stops it)", flush=True)
    stopped = threading.Event()
    # SIGTERM (a service manager, a container stopping) is a clean stop, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    try:
        while not stopped.wait(1.0):
            pass
    except KeyboardInterrupt:
        return 130
    finally:
        dashboard.stop()
    return 0


def _recent_progress(cp: Checkpoint, limit: int) -> list[QueryProgress]:
    return cp.recent_progress(limit)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
