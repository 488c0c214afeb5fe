"""The charts of the documentation site's benchmarks page, drawn from the results JSON.

    python benchmarks/docs_charts.py            # rewrites docs/images/benchmarks/*.svg

Each chart reads one committed results file (:data:`SOURCES`) and draws what the page's
table next to it shows, so a new run is published by pointing :data:`SOURCES` at its
file and running this script. The SVGs are written without a date and with a fixed id
salt, so the same JSON gives the same bytes (with the same matplotlib).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "images" / "benchmarks"

SOURCES = {
    "nexmark": "2026-11-24-vm-nexmark.json",
    "nexmark_5_files": "2026-11-24-vm-nexmark-5-files-per-trigger.json",
    "latency": "2026-11-24-nexmark-latency.json",
    "ray": "2026-12-07-ray-scaling-2.json",
    "state": "2026-11-24-state-group_by-keyed-rows-quiet.json",
}
"""Chart name -> the results file under ``benchmarks/results/`` it is drawn from."""

SYSTEMS = {
    "polars": ("Polars, one batch", "#9e9e9e"),
    "microstream": ("microstream", "#3f51b5"),
    "spark": ("Spark local[2]", "#e65100"),
    "python_peer": ("Bytewax", "#2e7d32"),
}


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / SOURCES[name]).read_text())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("svg")
    matplotlib.rcParams["svg.hashsalt"] = "microstream-docs"
    matplotlib.rcParams["font.size"] = 9
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.svg"
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight")
    fig.clf()
    return path


def nexmark_throughput(out: Path) -> Path:
    """Input events/s per Nexmark query and system (log scale), one file per trigger."""
    plt = _pyplot()
    record = _load("nexmark")
    queries = record["queries"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.2
    for i, (system, (label, color)) in enumerate(SYSTEMS.items()):
        xs, ys = [], []
        for j, query in enumerate(queries):
            result = query["systems"].get(system)
            if result and result.get("events_per_s"):
                xs.append(j + (i - 1.5) * width)
                ys.append(result["events_per_s"])
        ax.bar(xs, ys, width, label=label, color=color)
    ax.set_yscale("log")
    ax.set_xticks(range(len(queries)), [q["query"] for q in queries])
    ax.set_ylabel("input events/s")
    ax.set_title(
        f"Nexmark, {record['settings']['data']['spec']['events']:,} events, "
        f"{record['settings']['files_per_trigger']} file per trigger "
        f"({record['date'][:10]}, {record['machine']['cores']} cores)"
    )
    ax.legend(ncols=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    ax.grid(axis="y", which="major", alpha=0.3)
    return _save(fig, out, "nexmark-throughput")


def nexmark_vs_batch(out: Path) -> Path:
    """microstream's throughput over the one-shot Polars query, at 1 and 5 files per trigger."""
    plt = _pyplot()
    one = {q["query"]: q["microstream_ratios"]["vs_polars"] for q in _load("nexmark")["queries"]}
    five = {
        q["query"]: q["microstream_ratios"]["vs_polars"]
        for q in _load("nexmark_5_files")["queries"]
    }
    queries = [q for q in one if q in five]
    fig, ax = plt.subplots(figsize=(9, 3))
    xs = range(len(queries))
    ax.bar(
        [x - 0.2 for x in xs],
        [one[q] for q in queries],
        0.4,
        label="1 file per trigger",
        color="#9fa8da",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [five[q] for q in queries],
        0.4,
        label="5 files per trigger",
        color="#3f51b5",
    )
    ax.axhline(1.0, color="#444", linewidth=0.8)
    ax.set_xticks(list(xs), queries)
    ax.set_ylabel("microstream / Polars batch")
    ax.set_title("Throughput as a share of one Polars query over all the files")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "nexmark-vs-batch")


def latency(out: Path) -> Path:
    """Event-to-sink latency percentiles at 25, 50 and 75% of the sustainable rate."""
    plt = _pyplot()
    record = _load("latency")
    loads = record["loads"]
    fig, ax = plt.subplots(figsize=(6, 3))
    labels = [
        f"{int(load['load'] * 100)}%\n{load['rate_rows_per_s'] / 1e6:.2f}M rows/s" for load in loads
    ]
    for key, color in (("p50", "#9fa8da"), ("p95", "#3f51b5"), ("p99", "#1a237e")):
        ax.plot(
            labels, [load["latency_ms"][key] for load in loads], marker="o", label=key, color=color
        )
    ax.axhline(
        record["target"]["p95_ms"],
        color="#c62828",
        linestyle="--",
        linewidth=0.8,
        label=f"target p95 ({record['target']['p95_ms']:.0f} ms)",
    )
    ax.set_ylim(bottom=0)
    ax.set_ylabel("ms, event to sink")
    ax.set_title("Nexmark q1, trigger every 100 ms: latency by load")
    ax.legend(frameon=False, ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "latency")


def ray_scaling(out: Path) -> Path:
    """Events/s on LocalRuntime and RayRuntime with 1 and 2 workers, per query."""
    plt = _pyplot()
    record = _load("ray")
    queries = list(record["queries"])
    fig, ax = plt.subplots(figsize=(7, 3))
    runs = (
        ("local", "LocalRuntime", "#9e9e9e"),
        ("ray1", "Ray, 1 worker", "#9fa8da"),
        ("ray2", "Ray, 2 workers", "#3f51b5"),
    )
    for i, (key, label, color) in enumerate(runs):
        ax.bar(
            [j + (i - 1) * 0.27 for j in range(len(queries))],
            [record["queries"][q]["events_per_s"][key] / 1e6 for q in queries],
            0.27,
            label=label,
            color=color,
        )
    ax.set_xticks(range(len(queries)), queries)
    ax.set_ylabel("M events/s (batch time)")
    ax.set_title(f"{record['events']:,} Nexmark events, {record['num_cpus']} CPUs for Ray")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, "ray-scaling")


def state_scaling(out: Path) -> Path:
    """Median engine time per batch against the state's size, one line per batch size."""
    plt = _pyplot()
    record = _load("state")
    fig, ax = plt.subplots(figsize=(6, 3))
    for rows, color in zip(record["settings"]["batch_rows"], ("#9fa8da", "#3f51b5", "#1a237e")):
        points = [
            (int(state), cell["by_batch_rows"][str(rows)]["engine_total_ms"]["median"])
            for state, cell in record["results"].items()
            if str(rows) in cell["by_batch_rows"]
        ]
        if points:
            ax.plot(*zip(*points), marker="o", label=f"{rows:,} rows per batch", color=color)
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    ax.set_xlabel("state (keys)")
    ax.set_ylabel("ms per batch (median)")
    ax.set_title(f"{record['settings']['query']}, {record['settings']['output_mode']} mode")
    ax.legend(frameon=False)
    ax.grid(which="major", alpha=0.3)
    return _save(fig, out, "state-scaling")


CHARTS = (nexmark_throughput, nexmark_vs_batch, latency, ray_scaling, state_scaling)


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory of the SVGs")
    args = parser.parse_args(argv)
    written = [chart(args.out) for chart in CHARTS]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
