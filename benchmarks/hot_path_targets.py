"""Every target of the hot-path issue (14) from one run: run the benchmarks, print the table.

Each target is measured by its own benchmark, run here one after the other as
subprocesses of the same interpreter (so one machine state, one checkout, one
``PYTHONPATH``), each writing its JSON into ``--out``; then the table
(measured, target, met?) is printed as Markdown and written to
``<out>/targets.json``. Every ratio is the benchmark's own: microstream against a
reference measured in the same process (Polars' one-shot query over the same
data, or one small Polars query), because the machine is shared and noisy.

    python benchmarks/hot_path_targets.py --out results/DIR            # the issue's sizes (~15 min quiet)
    python benchmarks/hot_path_targets.py --out /tmp/t --quick         # smaller sizes, a smoke run
    python benchmarks/hot_path_targets.py --out DIR --only windowed,nexmark
    python benchmarks/hot_path_targets.py --out DIR --table-only       # re-print from DIR's JSON
    python benchmarks/hot_path_targets.py --out DIR --spark            # with Spark local[2] (needs java)

Spark runs only with ``--spark`` (target 2's "50x Spark local[2]": the Nexmark step
then runs each query on Spark Structured Streaming, ``local[2]``, in the same process
as microstream and Polars, one or two minutes more); without it that row says
"not run".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

STATELESS = ("q0", "q1", "q2", "q14", "q21", "q22")
WINDOWED = ("q5", "q7", "q11")
JOINS = ("q3", "q8")


@dataclass(frozen=True)
class Step:
    """One benchmark run: its name (and JSON file), its command, and whether it prints
    its JSON on stdout instead of writing ``--out``."""

    name: str
    args: tuple[str, ...]
    stdout_json: bool = False


def steps(quick: bool, data: Path, *, spark: bool = False) -> list[Step]:
    events = "500000" if quick else "5000000"
    files = "5" if quick else "50"
    windowed = [
        Step(
            f"windowed-mf{mf}-k{k}",
            (
                "windowed_aggregation.py",
                "--skip-spark",
                "--skip-dynamic-reference",
                "--repeat", "1" if quick else "3",
                "--events", events,
                "--files", files,
                "--max-files", mf,
                "--key-columns", k,
                "--data", str(data / f"windowed-k{k}"),
            ),
        )
        for k in ("1", "5")
        for mf in ("1", "0")
    ]  # fmt: skip
    return [
        *windowed,
        Step(
            "nexmark",
            (
                "nexmark/run.py",
                "--events", "400000" if quick else "2000000",
                "--repeat", "1",
                *(() if spark else ("--skip-spark",)),
                "--skip-python-peer",
                "--queries", ",".join(STATELESS + WINDOWED + JOINS),
                "--data", str(data / ("nexmark-quick" if quick else "nexmark")),
            ),
        ),
        Step(
            "stream-join",
            (
                "stream_join.py",
                "--rows", "100000" if quick else "1000000",
                "--files", "5" if quick else "20",
                "--bound-minutes", "1",
                "--repeat", "1",
            ),
        ),
        Step(
            "batch-overhead",
            (
                "batch_overhead.py",
                "--pipeline", "files-window-delta",
                "--batches", "200" if quick else "1000",
            ),
            stdout_json=True,
        ),
        Step(
            "latency",
            (
                "nexmark/latency.py",
                "--trigger-ms", "0",
                "--loads", "0.5",
                "--seconds", "2" if quick else "5",
                "--probe-seconds", "1" if quick else "2",
            ),
        ),
        Step(
            "state-scaling",
            (
                "state_scaling.py",
                "--grow", "300000" if quick else "10000000",
                "--batch-rows", "10000",
            ),
        ),
    ]  # fmt: skip


def run(step: Step, out: Path) -> None:
    target = out / f"{step.name}.json"
    args = [sys.executable, str(HERE / step.args[0]), *step.args[1:]]
    if not step.stdout_json:
        args += ["--out", str(target)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    started = time.perf_counter()
    print(f"-- {step.name}: {' '.join(step.args)}", file=sys.stderr, flush=True)
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        (out / f"{step.name}.err").write_text(done.stdout + done.stderr)
        print(f"   failed (exit {done.returncode}): {out / step.name}.err", file=sys.stderr)
        return
    if step.stdout_json:
        target.write_text(done.stdout[done.stdout.index("{") :])
    print(f"   {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Row:
    target: str
    measured: str
    goal: str
    met: bool | None  # None: not measured


def _load(out: Path, name: str) -> Any:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _ratio_row(label: str, value: float | None, at_least: float, unit: str = "x") -> Row:
    if value is None:
        return Row(label, "not measured", f">= {at_least}{unit}", None)
    return Row(label, f"{value:.2f}{unit}", f">= {at_least}{unit}", value >= at_least)


def windowed_rows(out: Path) -> list[Row]:
    rows = []
    for k, keys in (("1", "1 key"), ("5", "5 keys")):
        for mf, goal, how in (("1", 0.5, "1 file/trigger"), ("0", 0.9, "all files/trigger")):
            data = _load(out, f"windowed-mf{mf}-k{k}")
            value = None if data is None else data["ratio_stream_to_polars_truncate_group_by"]
            rows.append(_ratio_row(f"1. windowed, {how}, {keys}", value, goal))
    return rows


def nexmark_rows(out: Path) -> list[Row]:
    data = _load(out, "nexmark")
    ratios: dict[str, float] = {}
    if data is not None:
        ratios = {q["query"]: q["microstream_ratios"]["vs_polars"] for q in data["queries"]}
    rows = []
    for group, goal in ((STATELESS, 0.8), (WINDOWED, 0.5), (JOINS, 0.3)):
        for query in group:
            rows.append(_ratio_row(f"2. Nexmark {query}, 1 file/trigger", ratios.get(query), goal))
    join = _load(out, "stream-join")
    rows.append(
        _ratio_row(
            "2. interval join (1-minute bound)",
            None if join is None else join["ratio_stream_to_polars"],
            0.3,
        )
    )
    rows.append(spark_row(data))
    return rows


def spark_row(data: Any) -> Row:
    """microstream's throughput over Spark's, per query, from the same Nexmark run."""
    label, goal = "2. every query vs Spark local[2]", ">= 50x"
    ratios = {} if data is None else {
        q["query"]: q["microstream_ratios"]["vs_spark"]
        for q in data["queries"]
        if q["microstream_ratios"].get("vs_spark") is not None
    }  # fmt: skip
    if not ratios:
        return Row(label, "not run (pass --spark)", goal, None)
    slowest = min(ratios, key=ratios.__getitem__)
    each = ", ".join(f"{q} {r:.0f}x" for q, r in ratios.items())
    return Row(
        label, f"lowest {ratios[slowest]:.1f}x ({slowest}); {each}", goal, ratios[slowest] >= 50
    )


def overhead_rows(out: Path) -> list[Row]:
    data = _load(out, "batch-overhead")
    if data is None:
        return [Row("3. fixed per-batch cost (files -> window -> Delta)", "not measured", "", None)]
    total = data["batch_engine_total_median_ms"]
    reference = data["polars_one_small_query_ms"]
    return [
        Row(
            "3. fixed per-batch cost, engine total median",
            f"{total:.2f} ms ({total / reference:.1f}x a Polars query of {reference:.2f} ms)",
            "<= 3 ms and <= 2x",
            total <= 3.0 and total <= 2 * reference,
        )
    ]


def latency_rows(out: Path) -> list[Row]:
    data = _load(out, "latency")
    loads = [] if data is None else [load for load in data["loads"] if load["load"] == 0.5]
    if not loads:
        return [Row("4. latency p99 at 50% of the max rate", "not measured", "<= 50 ms", None)]
    load = loads[0]
    p99 = load["latency_ms"]["p99"]
    rate = data["max_rate"]["max_rate_rows_per_s"]
    return [
        Row(
            "4. latency p99 at 50% of the max rate",
            f"{p99:.0f} ms (p50 {load['latency_ms']['p50']:.0f}; max rate {rate:,.0f} rows/s)",
            "<= 50 ms",
            p99 <= 50 and bool(load.get("sustainable")),
        )
    ]


def state_rows(out: Path) -> list[Row]:
    data = _load(out, "state-scaling")
    if data is None:
        return [Row("5. state scaling", "not measured", "", None)]
    result = data["result"]
    keys = f"{result['state_rows']:,} keys"
    flat = result["last_over_first_tenth"]
    spike = result["max_over_median"]
    memory = result["peak_extra_over_state_plus_batch"]
    return [
        Row(f"5. per-batch time, last / first tenth, {keys}", f"{flat:.2f}x", "flat (<= 1.25x)", flat <= 1.25),
        Row(f"5. max / median batch, {keys}", f"{spike:.1f}x", "no spike (<= 5x)", spike <= 5),
        Row(f"5. peak memory / (state + batch), {keys}", f"{memory:.2f}x", "<= 3x", memory <= 3),
    ]  # fmt: skip


TABLE: tuple[Callable[[Path], list[Row]], ...] = (
    windowed_rows,
    nexmark_rows,
    overhead_rows,
    latency_rows,
    state_rows,
)


def table(out: Path) -> list[Row]:
    return [row for part in TABLE for row in part(out)]


def markdown(rows: list[Row]) -> str:
    lines = ["| target | measured | goal | met? |", "|---|---|---|---|"]
    for row in rows:
        met = "not measured" if row.met is None else ("yes" if row.met else "no")
        lines.append(f"| {row.target} | {row.measured} | {row.goal} | {met} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for every JSON")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--only", default=None, help="comma-separated step name prefixes")
    parser.add_argument("--data", type=Path, default=None, help="generated data, kept between runs")
    parser.add_argument("--table-only", action="store_true", help="print the table of --out")
    parser.add_argument("--spark", action="store_true", help="run Nexmark on Spark local[2] too")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        data = args.data or args.out / "data"
        wanted = None if args.only is None else tuple(args.only.split(","))
        for step in steps(args.quick, data, spark=args.spark):
            if wanted is None or step.name.startswith(wanted):
                run(step, args.out)
    rows = table(args.out)
    (args.out / "targets.json").write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
