"""Nexmark on Bytewax, the Python streaming peer of the benchmark: q1, q5, q7 and q11.

Bytewax (Rust/Timely dataflow runtime, Python operators, one Python call per item)
runs the queries over the same parquet files as microstream, with its event-time
windowing: ``EventClock`` with a 4 s wait, ``SlidingWindower`` (q5),
``TumblingWindower`` (q7), ``SessionWindower`` (q11).

How it is run, and why:

- **Processes** (``PROCESSES``): ``python -m bytewax.run``, one worker per process.
  Bytewax's guide recommends processes rather than workers in one process (``-w``)
  for CPU-bound Python, since workers in a process share the GIL, and warns that
  items that change worker are pickled and sent over TCP, to be measured. On the
  2 cores here, q1 (stateless, nothing exchanged) runs on two processes (``-i <k>
  -a <addresses>``), about twice as fast as on one; the keyed queries run on one,
  because routing every item to its key's worker exchanges half of them, which
  costs more than the second core gives (1M events, three runs each on the busy
  shared machine: q7 14-21 s on two processes against 5.3-8.3 s on one, q11 17-23 s
  against 7.3-8.7 s, q5 14-16 s against 10-11 s; q1 2.0-4.6 s against 2.9-5.8 s).
  The peer takes the faster: never tuned down.
- **Input**: a ``FixedPartitionedSource`` of one partition per process, each reading
  the files in name order (file ``i`` = micro-batch ``i``), one file per
  ``next_batch``. q1 (stateless) splits the files between the partitions. The
  stateful queries split the rows by key (``bidder`` for q11, ``auction`` for q5
  and q7) as a Kafka topic partitioned by key would be: every key's rows come from
  one partition in file order, so what is late is decided as for a single reader.
- **The clock**: ``EventClock(wait_for_system_duration=4 s)`` with the system clock
  frozen (``now_getter``) and no wake-ups (``to_system_utc`` returns None). Bytewax's
  watermark is otherwise the largest timestamp seen minus the wait *plus the
  system time since then*: replaying files faster or slower than the data's event
  rate would close windows early and drop rows as late depending on the speed of
  the run. Frozen, the watermark is the largest event time minus 4 s, Flink's,
  Spark's and microstream's; what Bytewax's guide calls the batch-replay regime,
  made exact. Bytewax keeps one clock per key, so a window closes when its key sees
  a later timestamp (or at the end of the input), never earlier than with a
  global watermark: no row is late that is not late for the others.
- ``ordered=False`` on the window operators: counts, maxima and session merges do
  not depend on the order the items of a window are folded in, and Bytewax's guide
  names ordering as a cost to skip then.
- **Global windows** (q5's and q7's maximum over all auctions of a window): the
  window operator runs on 8 shards (``auction % 8``, each shard's rows from one
  partition), each folding the window's counts (q5) or its bids at the highest
  price (q7); a second ``stateful`` step keyed by window combines the 8 shards'
  results when all have reported (or at the end of the input). A single key would
  run all windowing on one worker.
- **Sessions** (q11): Bytewax's session contains every item within ``gap`` of it,
  both ends included, as Flink's, Spark's and the oracle's (a bid exactly 10 s
  after the previous one extends the session); ``endtime`` is the last bid + 10 s
  (Flink's ``SESSION_END``), Bytewax's ``close_time`` being the last bid.

Each worker writes its output rows to a parquet file and the times its dataflow
started and ended; ``run`` reports from the first start to the last end (the
processes' interpreter start-up and imports excluded, as Spark's session start-up
is), and returns the rows as a Polars frame with the oracle's columns.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import polars as pl

QUERIES = ("q1", "q5", "q7", "q11")
PROCESSES: dict[str, int] = {"q1": 2, "q5": 1, "q7": 1, "q11": 1}
"""Bytewax processes (of one worker each) per query: the faster of 1 and 2 (the cores)."""
SHARDS = 8  # window-operator keys of q5 and q7; a multiple of the processes
WAIT = timedelta(seconds=4)  # Flink's Nexmark watermark delay, schema.WATERMARK_DELAY
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
REPLAY_NOW = datetime(1970, 1, 1, tzinfo=timezone.utc)  # the frozen system clock
TIMEOUT_S = 3600

TIME_UTC = pl.Datetime("ms", "UTC")
OUTPUT_SCHEMAS: dict[str, pl.Schema] = {
    "q1": pl.Schema(
        {
            "auction": pl.Int64(),
            "bidder": pl.Int64(),
            "price": pl.Float64(),
            "date_time": pl.Datetime("ms"),
            "extra": pl.String(),
        }
    ),
    "q5": pl.Schema({"auction": pl.Int64(), "num": pl.Int64()}),
    "q7": pl.Schema(
        {
            "auction": pl.Int64(),
            "bidder": pl.Int64(),
            "price": pl.Int64(),
            "date_time": TIME_UTC,
            "extra": pl.String(),
        }
    ),
    "q11": pl.Schema(
        {
            "bidder": pl.Int64(),
            "bid_count": pl.Int64(),
            "starttime": TIME_UTC,
            "endtime": TIME_UTC,
        }
    ),
}


def versions() -> dict[str, Any]:
    """Bytewax's version and the way the peer runs it."""
    from importlib.metadata import version

    return {
        "bytewax": version("bytewax"),
        "python": sys.version.split()[0],
        "queries": list(QUERIES),
        "processes": dict(PROCESSES),
        "settings": "python -m bytewax.run, 1 worker per process (processes per query: the "
        "faster of 1 and 2), input partitioned by key (by file for q1), one file per "
        "batch, EventClock wait 4 s with the system clock "
        f"frozen (watermark = max event time - 4 s, per key), ordered=False, {SHARDS} "
        "shards for the global windows of q5/q7; seconds from the first worker's start to "
        "the last worker's end (interpreter start-up excluded)",
    }


# -- the dataflow's connectors (run inside the Bytewax processes) ---------------------------------

_STARTED: list[float] = []  # when this process's dataflow started running


def _started() -> None:
    if not _STARTED:
        _STARTED.append(time.time())


def _source(
    root: str,
    stream: str,
    columns: list[str],
    partitions: int,
    split: str | None,
    *,
    aware: bool = True,
) -> Any:
    """A partitioned source of the rows of ``root/stream`` as tuples, one file per batch.

    ``split=None`` gives partition ``k`` the files ``i`` with ``i % partitions == k``;
    a column name gives it every file's rows with ``column % partitions == k``.
    With ``aware``, timestamps are UTC-aware datetimes, as Bytewax's clocks need them.
    """
    from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

    files = sorted((Path(root) / stream).glob("*.parquet"))

    class Partition(StatefulSourcePartition[tuple, int]):
        def __init__(self, index: int, resume: int | None) -> None:
            _started()
            self._index = index
            self._next = resume or 0
            self._files = files if split is not None else files[index::partitions]

        def next_batch(self) -> list[tuple]:
            if self._next >= len(self._files):
                raise StopIteration
            frame = pl.read_parquet(self._files[self._next], columns=columns)
            self._next += 1
            if split is not None:
                frame = frame.filter(pl.col(split) % partitions == self._index)
            if aware:
                frame = frame.with_columns(pl.col(pl.Datetime).dt.replace_time_zone("UTC"))
            return frame.rows()

        def snapshot(self) -> int:
            return self._next

    class Source(FixedPartitionedSource[tuple, int]):
        def list_parts(self) -> list[str]:
            return [str(k) for k in range(partitions)]

        def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> Partition:
            return Partition(int(for_part), resume_state)

    return Source()


def _sink(out: str, name: str) -> Any:
    """Each worker's rows into ``out/worker-<i>.parquet``, with its times and late items."""
    from bytewax.outputs import DynamicSink, StatelessSinkPartition

    class Partition(StatelessSinkPartition[tuple]):
        def __init__(self, worker: int) -> None:
            _started()
            self._worker = worker
            self._rows: list[tuple] = []
            self._late = 0

        def write_batch(self, items: list[tuple]) -> None:
            for tag, row in items:
                if tag == "row":
                    self._rows.append(row)
                else:
                    self._late += 1

        def close(self) -> None:
            frame = pl.DataFrame(self._rows, schema=OUTPUT_SCHEMAS[name], orient="row")
            frame.write_parquet(Path(out) / f"worker-{self._worker}.parquet")
            record = {"start": _STARTED[0], "end": time.time(), "late": self._late}
            (Path(out) / f"worker-{self._worker}.json").write_text(json.dumps(record))

    class Sink(DynamicSink[tuple]):
        def build(self, step_id: str, worker_index: int, worker_count: int) -> Partition:
            return Partition(worker_index)

    return Sink()


def _clock(ts_index: int) -> Any:
    from bytewax.operators.windowing import EventClock

    return EventClock(
        ts_getter=lambda row: row[ts_index],
        wait_for_system_duration=WAIT,
        now_getter=lambda: REPLAY_NOW,
        to_system_utc=lambda _ts: None,
    )


# -- the queries ----------------------------------------------------------------------------------


def _q1(flow: Any, root: str, partitions: int) -> tuple[Any, Any]:
    import bytewax.operators as op

    columns = ["auction", "bidder", "price", "date_time", "extra"]
    bids = op.input("bids", flow, _source(root, "bid", columns, partitions, None, aware=False))
    euros = op.map("euros", bids, lambda b: ("row", (b[0], b[1], 0.908 * b[2], b[3], b[4])))
    return euros, None


class _Combine:
    """Stage 2 of q5 and q7: a window's shard results, final once every shard reported."""

    def __init__(self, finish: Callable[[list[Any]], Iterable[tuple]]) -> None:
        from bytewax.operators import StatefulLogic

        combine = self

        class Logic(StatefulLogic[Any, tuple, list[Any]]):
            def __init__(self, state: list[Any] | None) -> None:
                self.reports: list[Any] = state or []

            def on_item(self, value: Any) -> tuple[Iterable[tuple], bool]:
                self.reports.append(value)
                if len(self.reports) < SHARDS:
                    return (), StatefulLogic.RETAIN
                return combine.finish(self.reports), StatefulLogic.DISCARD

            def on_eof(self) -> tuple[Iterable[tuple], bool]:
                return combine.finish(self.reports), StatefulLogic.DISCARD

            def snapshot(self) -> list[Any]:
                return list(self.reports)

        self.finish = finish
        self.logic = Logic


def _q5(flow: Any, root: str, partitions: int) -> tuple[Any, Any]:
    """Bids per auction in 10 s windows sliding by 2 s; each window's auctions with the most."""
    import bytewax.operators as op
    from bytewax.operators.windowing import SlidingWindower, fold_window

    bids = op.input(
        "bids", flow, _source(root, "bid", ["auction", "date_time"], partitions, "auction")
    )
    shards = op.key_on("shard", bids, lambda b: str(b[0] % SHARDS))

    def count(counts: dict[int, int], bid: tuple) -> dict[int, int]:
        counts[bid[0]] = counts.get(bid[0], 0) + 1
        return counts

    def merge(a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
        for auction, n in b.items():
            a[auction] = a.get(auction, 0) + n
        return a

    windows = fold_window(
        "counts",
        shards,
        _clock(1),
        SlidingWindower(length=timedelta(seconds=10), offset=timedelta(seconds=2), align_to=EPOCH),
        dict,
        count,
        merge,
        ordered=False,
    )

    def shard_top(item: tuple[str, tuple[int, dict[int, int]]]) -> tuple[str, tuple]:
        _shard, (window_id, counts) = item
        top = max(counts.values())
        return str(window_id), (top, [a for a, n in counts.items() if n == top])

    def finish(reports: list[tuple[int, list[int]]]) -> list[tuple]:
        top = max(n for n, _ in reports)
        return [("row", (a, top)) for n, auctions in reports if n == top for a in auctions]

    per_window = op.map("shard top", windows.down, shard_top)
    rows = op.stateful("top", per_window, _Combine(finish).logic)
    return op.map("unkey", rows, lambda kv: kv[1]), windows.late


def _q7(flow: Any, root: str, partitions: int) -> tuple[Any, Any]:
    """The bids at the highest price of each 10 s tumbling window."""
    import bytewax.operators as op
    from bytewax.operators.windowing import TumblingWindower, fold_window

    columns = ["auction", "bidder", "price", "date_time", "extra"]
    bids = op.input("bids", flow, _source(root, "bid", columns, partitions, "auction"))
    shards = op.key_on("shard", bids, lambda b: str(b[0] % SHARDS))

    def highest(acc: list[Any], bid: tuple) -> list[Any]:
        # acc = [max price, bids at it]
        if bid[2] > acc[0]:
            acc[0], acc[1] = bid[2], [bid]
        elif bid[2] == acc[0]:
            acc[1].append(bid)
        return acc

    def merge(a: list[Any], b: list[Any]) -> list[Any]:
        if b[0] > a[0]:
            return b
        if b[0] == a[0]:
            a[1].extend(b[1])
        return a

    windows = fold_window(
        "highest",
        shards,
        _clock(3),
        TumblingWindower(length=timedelta(seconds=10), align_to=EPOCH),
        lambda: [-1, []],
        highest,
        merge,
        ordered=False,
    )

    def finish(reports: list[list[Any]]) -> list[tuple]:
        top = max(price for price, _ in reports)
        return [("row", bid) for price, bids in reports if price == top for bid in bids]

    per_window = op.map("shard max", windows.down, lambda kv: (str(kv[1][0]), kv[1][1]))
    rows = op.stateful("max", per_window, _Combine(finish).logic)
    return op.map("unkey", rows, lambda kv: kv[1]), windows.late


def _q11(flow: Any, root: str, partitions: int) -> tuple[Any, Any]:
    """Bids per bidder session (gap 10 s): count, first bid, last bid + 10 s."""
    import bytewax.operators as op
    from bytewax.operators.windowing import SessionWindower, fold_window

    gap = timedelta(seconds=10)
    bids = op.input(
        "bids", flow, _source(root, "bid", ["bidder", "date_time"], partitions, "bidder")
    )
    bidders = op.key_on("bidder", bids, lambda b: str(b[0]))

    def add(acc: list[Any], bid: tuple) -> list[Any]:
        # acc = [count, first, last]
        ts = bid[1]
        if acc[0] == 0:
            return [1, ts, ts]
        acc[0] += 1
        if ts < acc[1]:
            acc[1] = ts
        elif ts > acc[2]:
            acc[2] = ts
        return acc

    def merge(a: list[Any], b: list[Any]) -> list[Any]:
        return [a[0] + b[0], min(a[1], b[1]), max(a[2], b[2])]

    sessions = fold_window(
        "sessions",
        bidders,
        _clock(1),
        SessionWindower(gap=gap),
        lambda: [0, None, None],
        add,
        merge,
        ordered=False,
    )
    rows = op.map(
        "row",
        sessions.down,
        lambda kv: ("row", (int(kv[0]), kv[1][1][0], kv[1][1][1], kv[1][1][2] + gap)),
    )
    return rows, sessions.late


BUILDERS: dict[str, Callable[[Any, str, int], tuple[Any, Any]]] = {
    "q1": _q1,
    "q5": _q5,
    "q7": _q7,
    "q11": _q11,
}


def flow(name: str, root: str, out: str, partitions: int = 1) -> Any:
    """The Bytewax dataflow of query ``name`` (what ``python -m bytewax.run`` loads)."""
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow

    dataflow = Dataflow(f"nexmark_{name}")
    rows, late = BUILDERS[name](dataflow, root, partitions)
    if late is not None:
        rows = op.merge("with late", rows, op.map("late", late, lambda _kv: ("late", None)))
    op.output("out", rows, _sink(out, name))
    return dataflow


# -- running --------------------------------------------------------------------------------------


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


last_run: dict[str, Any] = {}
"""Details of the last ``run``: wall seconds with start-up, late items, per-worker times."""


def run(name: str, root: Path, *, processes: int | None = None) -> tuple[float, pl.DataFrame]:
    """Run query ``name`` on Bytewax over the files of ``root``: seconds and its output.

    Parameters
    ----------
    name
        One of ``QUERIES``.
    root
        The data set: ``root/bid`` (and the other streams).
    processes
        Bytewax processes of one worker each (default: the query's ``PROCESSES``).

    Raises
    ------
    ValueError
        The peer does not implement the query.
    RuntimeError
        A Bytewax process failed (its stderr is in the message).
    """
    if name not in BUILDERS:
        msg = f"the Python peer runs {', '.join(QUERIES)}; got {name!r}"
        raise ValueError(msg)
    processes = processes or PROCESSES[name]
    if SHARDS % processes:
        msg = f"processes must divide {SHARDS} (the shards of q5 and q7); got {processes}"
        raise ValueError(msg)
    benchmarks = str(Path(__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([benchmarks, os.environ.get("PYTHONPATH", "")]),
    }
    with tempfile.TemporaryDirectory(prefix=f"bytewax-{name}-") as out:
        target = f"nexmark.peers.python_peer:flow({name!r}, {str(root)!r}, {out!r}, {processes})"
        addresses = ";".join(f"localhost:{port}" for port in _free_ports(processes))
        commands = [
            [sys.executable, "-m", "bytewax.run", target]
            + (["-i", str(k), "-a", addresses] if processes > 1 else [])
            for k in range(processes)
        ]
        t0 = time.perf_counter()
        logs = [Path(out) / f"stderr-{k}.txt" for k in range(processes)]
        children = []
        for command, log in zip(commands, logs):
            with log.open("wb") as output:  # Bytewax logs its start-up retries on stdout
                children.append(
                    subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
                )
        codes = [child.wait(timeout=TIMEOUT_S) for child in children]
        wall = time.perf_counter() - t0
        if any(codes):
            errors = "\n".join(log.read_text()[-3000:] for log in logs)
            msg = f"Bytewax {name} failed with exit codes {codes}:\n{errors}"
            raise RuntimeError(msg)
        records = [json.loads(p.read_text()) for p in sorted(Path(out).glob("worker-*.json"))]
        frames = [pl.read_parquet(p) for p in sorted(Path(out).glob("worker-*.parquet"))]
    seconds = max(r["end"] for r in records) - min(r["start"] for r in records)
    result = pl.concat(frames).with_columns(
        pl.col(pl.Datetime).dt.replace_time_zone(None).dt.cast_time_unit("ms")
    )
    last_run.clear()
    last_run.update(
        query=name,
        processes=processes,
        seconds=seconds,
        wall_seconds_with_start_up=wall,
        late=sum(r["late"] for r in records),
        workers=records,
    )
    return seconds, result
