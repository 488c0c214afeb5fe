"""How per-batch time grows with the size of the state (open keys/windows) and of the batch.

For each state size N (default 10k, 100k, 1M keys) a fresh query is started
over a memory source:

- ``--query group_by`` (default): ``group_by("key").agg(pl.col("v").sum(), pl.len())``
  in ``update`` mode: every key stays in the state forever;
- ``--query window``: ``with_watermark("ts", "1000d").group_by_dynamic("ts",
  every="1h", group_by="key").agg(...)`` in ``append`` mode: every window stays
  open (the watermark never reaches its end), so the state is N open windows.

The state is first filled with one batch holding each of the N keys once; a
few warm-up batches follow; then, for every batch size R (default 1k, 10k,
100k rows), ``--batches`` batches of R rows with keys drawn uniformly from
[0, N) are timed one by one (``add_data`` until committed, and the engine's
phases from ``recent_progress``). The sink is a no-op ``foreach_batch``, the
checkpoint a local temp dir (default durability; ``--checkpoint-root /dev/shm``
takes the disk out). Reported per cell: median, p90, max and mean of the batches
(a state store under 100k rows writes a full snapshot every 10th version, which
the p90 and max show and the median does not; a larger one a tenth of its key
groups every version).

The target: per-batch time grows with R, not with N. Next to each figure, the
same process times the Polars work of the batch alone (``group_by(key).agg``
over the R rows), the reference for what a batch must cost.

    python benchmarks/state_scaling.py [--states 10000,100000,1000000]
        [--batch-rows 1000,10000,100000] [--batches 30] [--query group_by|window]
        [--profile N:R] [--checkpoint-root DIR] [--out FILE]

``--grow N`` instead starts one query on an empty state and feeds it batches of
``--batch-rows`` rows (one size; default 10k) until it holds N keys: each batch has
``(1 - --update-share)`` of its rows on keys new to the state, the rest on keys
already in it (uniform). Reported: the engine's per-batch time in the first and the
last tenth of the batches (flat in the state size: their ratio near 1), max / median
(a periodic spike, e.g. a full snapshot, shows here), and the peak RSS over the
batches (Linux ``VmHWM``, reset when the query starts) above the RSS before it,
against the state's Arrow size at the end (``query.state()``'s ``estimated_size``;
the store's in-memory size, with its key hash, is reported too, and what the memory
source holds: it keeps every batch added, ~0.8x the state at the end, inside that peak).

    python benchmarks/state_scaling.py --grow 1000000 --batch-rows 10000

``--profile 1000000:10000`` runs ``py-spy`` on this process during as many
batches again of that cell, after the timed ones (sampling costs CPU), and puts
the query thread's hot spots into the JSON: by part of the engine, by function
(inclusive and self) and by engine line (needs ``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

import microstream as ms

PHASES = ("latest_offset", "wal", "read", "compute", "sink", "commit", "total")
WARM_UP_BATCHES = 3
TS = dt.datetime(2024, 1, 1, 0, 30)  # every event in the window [00:00, 01:00)


CHECKPOINT_ROOT: str | None = None  # --checkpoint-root


def build_query(source, kind: str, checkpoint: str, seen: list[int]):
    frame = source.lazy()
    aggs = [pl.col("v").sum().alias("v_sum"), pl.len()]
    sink = lambda df, _batch_id: seen.append(df.height)  # noqa: E731 - the cheapest sink
    if kind == "group_by":
        return (
            frame.group_by("key")
            .agg(aggs)
            .foreach_batch(sink, output_mode="update", checkpoint=checkpoint)
        )
    return (
        frame.with_watermark("ts", "1000d")
        .group_by_dynamic("ts", every="1h", group_by="key")
        .agg(aggs)
        .foreach_batch(sink, output_mode="append", checkpoint=checkpoint)
    )


def make_batch(kind: str, keys: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    data: dict[str, object] = {"key": keys, "v": rng.random(len(keys))}
    frame = pl.DataFrame(data)
    if kind == "window":
        frame = frame.with_columns(ts=pl.lit(TS, dtype=pl.Datetime("us")))
    return frame


def polars_reference(batch: pl.DataFrame) -> float:
    """The aggregation of the batch alone, in Polars (what the batch has to compute)."""
    t0 = time.perf_counter()
    batch.group_by("key").agg(pl.col("v").sum().alias("v_sum"), pl.len())
    return time.perf_counter() - t0


def source_version() -> dict[str, object]:
    """The commit of the engine measured, and which of its files differ from it."""
    root = Path(ms.__file__).resolve().parent.parent  # the engine imported (PYTHONPATH)

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    changed = git("status", "--porcelain", "--", "microstream", "connectors").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        # "XY path" lines; the first line lost its leading blank to strip()
        "uncommitted_engine_files": [line.split(maxsplit=1)[1] for line in changed],
    }


def machine_info(note: str = "shared, noisy: compare ratios, not absolute figures") -> dict:
    """The machine block of a results JSON (taken when the run ends)."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_end": os.getloadavg(),
        "note": note,
    }


def write_result(result: dict, name: str, out: str | None) -> Path:
    """Print ``result`` and write it to ``out`` or ``results/<date>-<name>.json``."""
    text = json.dumps(result, indent=1, default=str)
    print(text)
    path = Path(out) if out else Path(__file__).parent / "results" / f"{result['date']}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    print(f"written to {path}", file=sys.stderr)
    return path


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Profiler:
    """``py-spy record`` on this process, raw (collapsed) stacks, all threads."""

    def __init__(self, out: Path, rate: int = 250):
        self.out = out
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(os.getpid()),
                "--format",
                "raw",
                "--rate",
                str(rate),
                "--output",
                str(out),
                "--threads",
                "--nonblocking",
                "--idle",  # idle: a thread waiting on Polars' pool still counts
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let it attach

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _frame_name(frame: str, *, line: bool) -> str:
    """``Func (pkg/file.py:123)`` -> ``Func (pkg/file.py)``, or with the line kept."""
    func, _, where = frame.partition(" (")
    path, _, lineno = where.rstrip(")").rpartition(":")
    short = "/".join(path.split("/")[-2:])
    return f"{func} ({short}:{lineno})" if line else f"{func} ({short})"


# Exclusive buckets for the query thread's samples: the first rule whose text is in a
# stack takes it (so the order matters: state-store work before the operator calling it).
PARTS = (
    ("state store commit: file writes", ("StateStore.commit", "Storage.write_bytes")),
    ("state store commit: encode, manifest, clean-up", ("StateStore.commit",)),
    ("state store: _locate (is_in over the hashes of whole partitions)", ("StateStore._locate",)),
    ("state store: _take (copies of whole partitions)", ("_take (",)),
    ("state store: other (concat, split, joins)", ("microstream/state/store.py",)),
    ("operator's own Polars work (batch partials, merge, emit)", ("StatefulNode.execute",)),
    ("sink", ("add_batch",)),
    ("checkpoint (offsets WAL, commit log)", ("microstream/checkpoint/log.py",)),
    ("source (list, read)", ("connectors/",)),
    ("progress record", ("_publish_progress",)),
)


def summarize_profile(path: Path, top: int = 25) -> dict:
    """Shares of the query thread's samples: by function (inclusive, self) and by line.

    py-spy sees Python frames only: time in Polars' Rust code is counted to the
    Python call that entered it (``_LocalEngine.collect``, ``Series.is_in``, ...).
    """
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")[1:]  # drop "thread (id): name"
        # the batches of the query thread (not its idle wait, nor the main thread waiting)
        if any("StreamExecution._trigger_once" in f for f in frames):
            stacks.append((frames, int(count)))
    total = sum(c for _, c in stacks)
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        whole = ";".join(frames)
        label = next(
            (name for name, needles in PARTS if all(n in whole for n in needles)),
            "other (trigger loop, planning)",
        )
        parts[label] += count
        for name in {_frame_name(f, line=False) for f in frames}:
            inclusive[name] += count
        own[_frame_name(frames[-1], line=False)] += count
        for name in {_frame_name(f, line=True) for f in frames if "microstream/" in f}:
            lines[name] += count

    def shares(counter: collections.Counter[str]) -> dict[str, float]:
        return {k: round(100 * v / total, 1) for k, v in counter.most_common(top)} if total else {}

    return {
        "query_thread_samples": total,
        "by_part_pct": shares(parts),
        "inclusive_pct": shares(inclusive),
        "self_pct": shares(own),
        "microstream_lines_inclusive_pct": shares(lines),
    }


def run_state_size(
    kind: str,
    n_keys: int,
    batch_rows: list[int],
    batches: int,
    seed: int,
    profile_rows: int | None,
    profile_out: Path | None,
) -> dict:
    rng = np.random.default_rng(seed)
    schema = {"key": pl.Int64, "v": pl.Float64}
    if kind == "window":
        schema["ts"] = pl.Datetime("us")
    source = ms.MemoryStream(schema)
    seen: list[int] = []
    checkpoint = tempfile.mkdtemp(prefix="ms-state-scaling-", dir=CHECKPOINT_ROOT)
    query = build_query(source, kind, checkpoint, seen)
    cells: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        source.add_data(make_batch(kind, rng.permutation(n_keys).astype(np.int64), rng))
        query.process_all_available(timeout=3600)
        fill_s = time.perf_counter() - t0
        state_rows = query.last_progress.state_operators[0].num_rows_total
        assert state_rows == n_keys, (state_rows, n_keys)
        for _ in range(WARM_UP_BATCHES):
            source.add_data(make_batch(kind, rng.integers(0, n_keys, 10_000), rng))
            query.process_all_available(timeout=600)
        for rows in batch_rows:
            walls, references, ids = [], [], []
            for _ in range(batches):
                batch = make_batch(kind, rng.integers(0, n_keys, rows), rng)
                references.append(polars_reference(batch))
                t = time.perf_counter()
                source.add_data(batch)
                query.process_all_available(timeout=600)
                walls.append(time.perf_counter() - t)
                ids.append(query.last_progress.batch_id)
            by_id = {p.batch_id: p for p in query.recent_progress}
            if profile_rows == rows and profile_out is not None:
                # As many batches again, under py-spy, not timed (sampling costs CPU too).
                profiler = Profiler(profile_out)
                try:
                    for _ in range(batches):
                        source.add_data(make_batch(kind, rng.integers(0, n_keys, rows), rng))
                        query.process_all_available(timeout=600)
                finally:
                    profiler.stop()
            progress = [by_id[i] for i in ids if i in by_id]
            assert all(p.num_input_rows == rows for p in progress), "one add_data, one batch"
            ops = [p.state_operators[0] for p in progress]
            totals = [p.durations_ms.total for p in progress]
            cells[str(rows)] = {
                "batches": len(progress),
                "end_to_end_ms": {
                    "median": round(statistics.median(walls) * 1000, 2),
                    "p90": round(pct(walls, 0.9) * 1000, 2),
                    "max": round(max(walls) * 1000, 2),
                    "mean": round(statistics.fmean(walls) * 1000, 2),
                },
                "engine_total_ms": {
                    "median": round(statistics.median(totals), 2),
                    "p90": round(pct(totals, 0.9), 2),
                    "max": round(max(totals), 2),
                    "mean": round(statistics.fmean(totals), 2),
                },
                "phase_medians_ms": {
                    ph: round(statistics.median(getattr(p.durations_ms, ph) for p in progress), 2)
                    for ph in PHASES
                },
                "phase_max_ms": {
                    ph: round(max(getattr(p.durations_ms, ph) for p in progress), 2)
                    for ph in PHASES
                },
                "state_rows_total": ops[-1].num_rows_total,
                "state_memory_mb": round(ops[-1].memory_bytes / 2**20, 1),
                "rows_updated_median": statistics.median(op.num_rows_updated for op in ops),
                "polars_batch_groupby_median_ms": round(statistics.median(references) * 1000, 3),
                "ratio_engine_median_to_polars_batch": round(
                    statistics.median(totals) / (statistics.median(references) * 1000), 1
                ),
            }
            print(
                f"state {n_keys:>9,} keys, batch {rows:>7,} rows: end to end median "
                f"{cells[str(rows)]['end_to_end_ms']['median']:8.1f} ms, engine "
                f"{cells[str(rows)]['engine_total_ms']['median']:8.1f} ms "
                f"{cells[str(rows)]['phase_medians_ms']}",
                file=sys.stderr,
            )
    finally:
        query.stop()
        shutil.rmtree(checkpoint, ignore_errors=True)
    return {"fill_seconds": round(fill_s, 2), "by_batch_rows": cells}


def _rss_kb(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in kB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_growth(kind: str, n_keys: int, rows: int, update_share: float, seed: int) -> dict:
    """One query from the empty state up to ``n_keys`` keys, batch by batch."""
    rng = np.random.default_rng(seed)
    schema = {"key": pl.Int64, "v": pl.Float64}
    if kind == "window":
        schema["ts"] = pl.Datetime("us")
    source = ms.MemoryStream(schema)
    seen: list[int] = []
    checkpoint = tempfile.mkdtemp(prefix="ms-state-growth-", dir=CHECKPOINT_ROOT)
    query = build_query(source, kind, checkpoint, seen)
    order = rng.permutation(n_keys).astype(np.int64)
    fresh_rows = max(1, int(rows * (1 - update_share)))
    totals: list[float] = []
    commits: list[float] = []
    computes: list[float] = []
    batch_bytes = make_batch(kind, order[:rows], rng).estimated_size()
    source_bytes = 0  # what the memory source holds: every batch added (it never drops one)
    try:
        rss_before_kb = _rss_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        done = 0
        while done < n_keys:
            fresh = order[done : done + fresh_rows]
            old_pool = done if done else fresh.size
            old = order[rng.integers(0, old_pool, rows - fresh.size)]
            done += fresh.size
            batch = make_batch(kind, np.concatenate([fresh, old]), rng)
            source_bytes += batch.estimated_size()
            source.add_data(batch)
            del batch
            query.process_all_available(timeout=600)
            progress = query.last_progress
            totals.append(progress.durations_ms.total)
            commits.append(progress.durations_ms.commit)
            computes.append(progress.durations_ms.compute)
        run_s = time.perf_counter() - t0
        peak_kb = _rss_kb("VmHWM")
        op = query.last_progress.state_operators[0]
        assert op.num_rows_total == n_keys, (op.num_rows_total, n_keys)
        state_bytes = query.state().estimated_size()
    finally:
        query.stop()
        shutil.rmtree(checkpoint, ignore_errors=True)
    tenth = max(1, len(totals) // 10)
    first, last = totals[:tenth], totals[-tenth:]
    median = statistics.median(totals)
    extra = (peak_kb - rss_before_kb) * 1024
    return {
        "batches": len(totals),
        "batch_rows": rows,
        "new_keys_per_batch": fresh_rows,
        "seconds": round(run_s, 1),
        "engine_total_ms": {
            "median": round(median, 2),
            "p99": round(pct(totals, 0.99), 2),
            "max": round(max(totals), 2),
            "first_tenth_median": round(statistics.median(first), 2),
            "last_tenth_median": round(statistics.median(last), 2),
        },
        "last_over_first_tenth": round(statistics.median(last) / statistics.median(first), 2),
        "max_over_median": round(max(totals) / median, 1),
        "commit_ms": {
            "median": round(statistics.median(commits), 2),
            "max": round(max(commits), 2),
        },
        "compute_ms": {
            "median": round(statistics.median(computes), 2),
            "max": round(max(computes), 2),
        },
        "slowest_batches": [
            {
                "batch": i,
                "total_ms": round(totals[i], 1),
                "compute_ms": round(computes[i], 1),
                "commit_ms": round(commits[i], 1),
            }
            for i in sorted(range(len(totals)), key=totals.__getitem__)[-5:][::-1]
        ],
        "state_rows": op.num_rows_total,
        "state_arrow_mb": round(state_bytes / 2**20, 1),
        "store_memory_mb": round(op.memory_bytes / 2**20, 1),
        "batch_mb": round(batch_bytes / 2**20, 2),
        "rss_before_mb": round(rss_before_kb / 1024, 1),
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "peak_extra_rss_mb": round(extra / 2**20, 1),
        "peak_extra_over_state_plus_batch": round(extra / (state_bytes + batch_bytes), 2),
        # the input the memory source keeps (part of the peak above, not the engine's)
        "source_held_mb": round(source_bytes / 2**20, 1),
        "peak_extra_without_source_over_state_plus_batch": round(
            (extra - source_bytes) / (state_bytes + batch_bytes), 2
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--states", default="10000,100000,1000000")
    parser.add_argument("--batch-rows", default="1000,10000,100000")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per cell")
    parser.add_argument("--query", choices=("group_by", "window"), default="group_by")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--profile",
        default=None,
        metavar="N:R",
        help="py-spy the timed batches of state N, batch rows R",
    )
    parser.add_argument(
        "--checkpoint-root",
        default=None,
        help="where microstream's checkpoints go (default: the temp dir; /dev/shm to take the "
        "disk out of the figures)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON output (default: benchmarks/results/<date>-state-<query>.json)",
    )
    parser.add_argument(
        "--grow",
        type=int,
        default=None,
        metavar="N",
        help="one query from the empty state to N keys (batch size: the first --batch-rows)",
    )
    parser.add_argument(
        "--update-share",
        type=float,
        default=0.2,
        help="--grow: the share of a batch's rows on keys already in the state",
    )
    args = parser.parse_args()
    global CHECKPOINT_ROOT
    CHECKPOINT_ROOT = args.checkpoint_root
    if args.grow:
        rows = int(args.batch_rows.split(",")[0]) if "--batch-rows" in sys.argv else 10_000
        growth_result = {
            "date": dt.date.today().isoformat(),
            "machine": machine_info("shared, noisy: compare within a run"),
            "versions": {
                "python": platform.python_version(),
                "polars": pl.__version__,
                "microstream": ms.__version__,
                "source": source_version(),
            },
            "settings": {
                "query": args.query,
                "grow_to_keys": args.grow,
                "update_share": args.update_share,
                "checkpoint_root": args.checkpoint_root or tempfile.gettempdir(),
            },
            "result": run_growth(args.query, args.grow, rows, args.update_share, args.seed),
        }
        print(json.dumps(growth_result["result"]), file=sys.stderr)
        write_result(growth_result, f"state-growth-{args.query}-{args.grow}", args.out)
        return
    states = [int(s) for s in args.states.split(",")]
    batch_rows = [int(r) for r in args.batch_rows.split(",")]
    profile_n = profile_r = None
    if args.profile:
        profile_n, profile_r = (int(x) for x in args.profile.split(":"))

    results: dict[str, dict] = {}
    profile_summary = None
    for n in states:
        profile_out = None
        if n == profile_n:
            profile_out = Path(tempfile.mkdtemp(prefix="ms-state-profile-")) / "py-spy.txt"
        results[str(n)] = run_state_size(
            args.query,
            n,
            batch_rows,
            args.batches,
            args.seed,
            profile_r if n == profile_n else None,
            profile_out,
        )
        if profile_out is not None and profile_out.exists():
            profile_summary = summarize_profile(profile_out)
            profile_summary["raw_stacks"] = str(profile_out)

    # Growth factors: the same batch size at the largest vs the smallest state,
    # and the largest vs the smallest batch at the same state.
    small, large = str(states[0]), str(states[-1])
    lo, hi = str(batch_rows[0]), str(batch_rows[-1])
    med = lambda n, r: results[n]["by_batch_rows"][r]["engine_total_ms"]["median"]  # noqa: E731
    growth = {
        f"state x{states[-1] // states[0]} at {r} rows/batch": round(
            med(large, r) / med(small, r), 2
        )
        for r in map(str, batch_rows)
    }
    growth.update(
        {
            f"batch x{batch_rows[-1] // batch_rows[0]} at {n} keys": round(
                med(n, hi) / med(n, lo), 2
            )
            for n in map(str, states)
        }
    )
    result = {
        "date": dt.date.today().isoformat(),
        "machine": machine_info("shared, noisy: compare within a run"),
        "versions": {
            "python": platform.python_version(),
            "polars": pl.__version__,
            "microstream": ms.__version__,
            "source": source_version(),
        },
        "settings": {
            "query": args.query,
            "states": states,
            "batch_rows": batch_rows,
            "timed_batches_per_cell": args.batches,
            "warm_up_batches": WARM_UP_BATCHES,
            "sink": "foreach_batch no-op",
            "checkpoint": "local, default durability",
            "checkpoint_root": args.checkpoint_root or tempfile.gettempdir(),
            "output_mode": "update" if args.query == "group_by" else "append",
        },
        "growth_of_engine_median": growth,
        "results": results,
        "profile": profile_summary,
    }
    write_result(result, f"state-{args.query}", args.out)


if __name__ == "__main__":
    main()
