"""Nexmark throughput: microstream vs the one-shot Polars batch vs Spark vs a Python peer.

One run generates the three streams once (``nexmark.generator.write_files``, one
parquet file per micro-batch), then for every query, interleaved ``--repeat`` times:

- **polars**: the query's ``batch()`` over every file at once (the physical limit
  and the oracle);
- **microstream**: the query's ``stream()`` over the files, ``--files-per-trigger``
  files per batch, ``Trigger.available_now(flush=True)``, into ``foreach_batch``;
  its output is checked to equal the batch result before any figure counts;
- **spark**: Structured Streaming, ``local[2]`` (``nexmark.peers.spark``), the
  same files per trigger, ``availableNow``, a ``noop`` sink;
- **python peer** (``nexmark.peers.python_peer``) for the queries it runs.

Figures are events/s of input (all events the query reads, as Nexmark counts),
events/s per core (2 cores), the ratios microstream / each other system (only
ratios within one run compare: the machine is shared and noisy), and peak RSS
of each system's processes during each run, above their RSS before it. Results go to
``benchmarks/results/<date>-<host>-nexmark.json``; ``--readme`` rewrites the
table in benchmarks/README.md and draws ``benchmarks/results/nexmark.png``
from it (``nexmark.report``).

    python benchmarks/nexmark/run.py [--events 2000000] [--events-per-file 100000]
        [--queries q0,q5] [--repeat 3] [--skip-spark] [--skip-python-peer]
        [--data DIR] [--out FILE] [--readme]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as a script: make ``nexmark`` and the helpers importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl
import psutil
from state_scaling import source_version  # benchmarks/

from nexmark import generator, report
from nexmark.query import QUERIES, assert_same_result, load, run_batch, run_stream

CORES = 2
T = TypeVar("T")
RESULTS = Path(__file__).resolve().parents[1] / "results"


class PeakRss:
    """Peak resident memory of the processes a system runs in, above what they held before.

    Sampled every ``interval`` seconds; ``extra`` is the peak minus the resident
    memory at the start, so what earlier queries left allocated in this process
    (or Spark's idle JVM) does not count against the next one.

    ``which``: ``"self"`` (Polars and microstream run in this process), ``"tree"``
    (this process and every child: Spark's JVM), ``"new_children"`` (the processes
    started while measuring: the Python peer's workers; not the idle JVM).
    """

    def __init__(self, which: str = "self", interval: float = 0.05) -> None:
        self._which = which
        self._interval = interval
        self._stop = threading.Event()
        self._process = psutil.Process()
        self._before = {child.pid for child in self._process.children(recursive=True)}
        self.peak = 0
        self.baseline = 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _processes(self) -> list[psutil.Process]:
        if self._which == "self":
            return [self._process]
        children = self._process.children(recursive=True)
        if self._which == "tree":
            return [self._process, *children]
        return [child for child in children if child.pid not in self._before]

    def _rss(self) -> int:
        total = 0
        for process in self._processes():
            with contextlib.suppress(psutil.Error):  # a child that just exited
                total += process.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            self._stop.wait(self._interval)

    @property
    def extra(self) -> int:
        return max(self.peak - self.baseline, 0)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measured(fn: Callable[[], T], which: str = "self") -> tuple[T, int]:
    """What ``fn`` returned and the peak extra RSS (MiB) of ``which`` processes (PeakRss)."""
    with PeakRss(which) as rss:
        value = fn()
    return value, rss.extra // 2**20


def input_events(root: Path, inputs: tuple[str, ...]) -> int:
    return sum(
        pl.scan_parquet(str(root / name / "*.parquet")).select(pl.len()).collect().item()
        for name in inputs
    )


def ensure_data(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Generate the data set unless ``root`` already holds this very one."""
    spec = {
        "events": args.events,
        "events_per_file": args.events_per_file,
        "rate": args.rate,
        "seed": args.seed,
        "out_of_order_group_size": args.ooo,
    }
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()).get("spec") == spec:
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    counts = generator.write_files(
        root,
        args.events,
        events_per_file=args.events_per_file,
        seed=args.seed,
        rate=args.rate,
        out_of_order_group_size=args.ooo,
    )
    info = {"spec": spec, "rows": counts, "write_seconds": round(time.perf_counter() - t0, 2)}
    marker.write_text(json.dumps(info))
    return info


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


@dataclass
class Peers:
    spark: Any = None  # the nexmark.peers.spark module
    spark_session: Any = None
    python: Any = None  # the nexmark.peers.python_peer module

    def spark_refusal(self, name: str) -> str | None:
        """Why Spark cannot run query ``name``, or None when it can."""
        return self.spark.SUPPORTED.get(name) if self.spark is not None else "skipped"


def peer_run(
    peer: str, fn: Callable[[], float], which: str, notes: dict[str, str]
) -> dict[str, Any] | None:
    """One timed run of a peer; a failure (Spark out of memory, say) is noted, not fatal."""
    try:
        seconds, peak = measured(fn, which)
    except Exception as exc:  # the peer's own error, reported in the results
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        notes[peer] = f"failed: {type(exc).__name__}: {first}"
        print(f"{peer} failed: {notes[peer]}", flush=True)
        return None
    return {"seconds": seconds, "peak_extra_rss_mib": peak}


def run_query(name: str, root: Path, args: argparse.Namespace, peers: Peers) -> dict[str, Any]:
    module = load(name)
    events = input_events(root, module.INPUTS)
    systems: dict[str, list[dict[str, Any]]] = {"polars": [], "microstream": []}
    notes: dict[str, str] = {}
    refusal = peers.spark_refusal(name)
    if peers.spark is not None and refusal is not None:
        notes["spark"] = refusal
    peer_ok = peers.python is not None and name in peers.python.QUERIES
    expected: pl.DataFrame | None = None
    detail: dict[str, Any] = {}
    for _ in range(args.repeat):
        (seconds, expected), peak = measured(lambda: run_batch(module, root))
        systems["polars"].append({"seconds": seconds, "peak_extra_rss_mib": peak})
        run, peak = measured(
            lambda: run_stream(
                module,
                root,
                max_files_per_trigger=args.files_per_trigger,
                checkpoint_root=args.checkpoint_root,
            )
        )
        assert_same_result(module, run.result, expected)  # a figure only counts when correct
        systems["microstream"].append({"seconds": run.seconds, "peak_extra_rss_mib": peak})
        detail = {
            "batches": run.batches,
            "dropped_late": run.dropped_late,
            "max_state_rows": run.max_state_rows,
            "phase_totals_ms": run.phase_totals_ms,
            "output_rows": run.result.height,
        }
        if refusal is None and "spark" not in notes:
            timed = peer_run(
                "spark",
                lambda: peers.spark.run(peers.spark_session, name, root, args.files_per_trigger)[0],
                "tree",
                notes,
            )
            if timed is not None:
                systems.setdefault("spark", []).append(timed)
        if peer_ok and "python_peer" not in notes:
            timed = peer_run(
                "python_peer", lambda: peers.python.run(name, root)[0], "new_children", notes
            )
            if timed is not None:
                systems.setdefault("python_peer", []).append(timed)

    for failed in notes:  # a peer that failed in any run has no figure, only its note
        systems.pop(failed, None)
    figures: dict[str, Any] = {}
    for system, runs in systems.items():
        seconds = median_of(runs, "seconds")
        figures[system] = {
            "seconds": round(seconds, 6),
            "events_per_s": round(events / seconds),
            "events_per_s_per_core": round(events / seconds / CORES),
            "peak_extra_rss_mib": max(r["peak_extra_rss_mib"] for r in runs),
            "runs_seconds": [round(r["seconds"], 3) for r in runs],
        }
    ms_seconds = figures["microstream"]["seconds"]
    ratios = {
        f"vs_{system}": round(figures[system]["seconds"] / ms_seconds, 4)
        for system in figures
        if system != "microstream"
    }
    return {
        "query": name,
        "title": module.TITLE,
        "kind": module.KIND,
        "inputs": list(module.INPUTS),
        "input_events": events,
        "systems": figures,
        "microstream_ratios": ratios,
        "microstream_detail": detail,
        "notes": notes,
        "output_rows": None if expected is None else expected.height,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2_000_000)
    parser.add_argument("--events-per-file", type=int, default=100_000)
    parser.add_argument("--files-per-trigger", type=int, default=1)
    parser.add_argument("--rate", type=int, default=100_000, help="events/s of event time")
    parser.add_argument("--ooo", type=int, default=1_000, help="out-of-order group size")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--queries", default=",".join(QUERIES))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-spark", action="store_true")
    parser.add_argument("--skip-python-peer", action="store_true")
    parser.add_argument("--data", type=Path, default=Path("/tmp/nexmark-bench"))
    parser.add_argument("--checkpoint-root", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--readme", action="store_true", help="rewrite README table + chart")
    args = parser.parse_args()

    args.data.mkdir(parents=True, exist_ok=True)
    data = ensure_data(args.data, args)
    print(f"data: {data}", flush=True)

    peers = Peers()
    if not args.skip_spark:
        from nexmark.peers import spark

        peers.spark, peers.spark_session = spark, spark.session()
    if not args.skip_python_peer:
        try:
            from nexmark.peers import python_peer

            peers.python = python_peer
        except ImportError as exc:  # the bench extra is not installed
            print(f"python peer skipped: {exc}", flush=True)

    # Every query module is imported before the first run: an edit to one mid-run can
    # then not fail the run after an hour of measuring.
    modules = [load(name) for name in args.queries.split(",")]
    record: dict[str, Any] = {
        "benchmark": "nexmark",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "polars": pl.__version__,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        },
        "source": source_version(),
        "settings": {
            "data": data,
            "files_per_trigger": args.files_per_trigger,
            "repeat": args.repeat,
            "cores_for_per_core_figures": CORES,
        },
        "peers": {
            "spark": None if peers.spark is None else peers.spark.versions(),
            "python_peer": None if peers.python is None else peers.python.versions(),
        },
        "queries": [],
    }
    out = args.out or RESULTS / f"{dt.date.today()}-{socket.gethostname()}-nexmark.json"
    for module in modules:
        result = run_query(module.NAME, args.data, args, peers)
        record["queries"].append(result)
        print(report.line(result), flush=True)
        out.write_text(json.dumps(record, indent=2) + "\n")  # what was measured so far
    print(f"wrote {out}")
    if args.readme:
        report.update_readme(record, out)


if __name__ == "__main__":
    main()
