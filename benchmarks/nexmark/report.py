"""Nexmark results: the printed line per query, the README table and the PNG chart.

The table and the chart are generated from a results JSON written by
``nexmark/run.py``; regenerate them with

    python benchmarks/nexmark/report.py benchmarks/results/<date>-<host>-nexmark.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parents[1]
README = BENCHMARKS / "README.md"
CHART = BENCHMARKS / "results" / "nexmark.png"
START, END = "<!-- nexmark-table:start -->", "<!-- nexmark-table:end -->"

# The targets: (min ratio to the Polars batch, min events/s per core) by query.
# q13's stream-static join is stateless per batch; q3, q4, q12 and q17 have peer targets only.
STATELESS_TARGET, WINDOWED_TARGET = (0.7, 1_000_000), (0.4, 250_000)
TARGETS = {
    **dict.fromkeys(("q0", "q1", "q2", "q13", "q14", "q21", "q22"), STATELESS_TARGET),
    **dict.fromkeys(("q5", "q7", "q8", "q11"), WINDOWED_TARGET),
}
PEER_TARGETS = {"spark": 5.0, "python_peer": 10.0}
SYSTEMS = ("polars", "microstream", "spark", "python_peer")
LABELS = {
    "polars": "Polars one-shot batch",
    "microstream": "microstream",
    "spark": "Spark local[2]",
    "python_peer": "Python peer",
}


def verdict(result: dict[str, Any]) -> str:
    """Which targets the query meets ("met", or the list of misses)."""
    misses = []
    ratios = result["microstream_ratios"]
    per_core = result["systems"]["microstream"]["events_per_s_per_core"]
    target = TARGETS.get(result["query"])
    if target is not None:
        if ratios.get("vs_polars", 0) < target[0]:
            misses.append(f"<{target[0]}x batch")
        if per_core < target[1]:
            misses.append(f"<{target[1] / 1e6:g}M ev/s/core")
    for peer, minimum in PEER_TARGETS.items():
        ratio = ratios.get(f"vs_{peer}")
        if ratio is not None and ratio < minimum:
            misses.append(f"<{minimum:g}x {peer.replace('_', ' ')}")
    return "met" if not misses else "missed: " + ", ".join(misses)


def _short(note: str | None) -> str:
    """A peer's note in a table cell; the whole note is listed under the table."""
    if note is None:
        return "—"
    return "failed" if note.startswith("failed") else "cannot run"


def _rate(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def line(result: dict[str, Any]) -> str:
    """One printed line: throughput of each system and microstream's ratios."""
    systems = result["systems"]
    rates = "  ".join(
        f"{system} {_rate(systems[system]['events_per_s'])}/s"
        for system in SYSTEMS
        if system in systems
    )
    ratios = "  ".join(f"{k} {v:.2f}x" for k, v in result["microstream_ratios"].items())
    return f"{result['query']:>4}  {rates}  |  microstream {ratios}  |  {verdict(result)}"


def table(record: dict[str, Any], source: str) -> str:
    """The markdown table of one results JSON."""
    rows = [
        "| query | kind | input events | Polars batch | microstream | per core | vs batch "
        "| Spark local[2] | vs Spark | Python peer | vs peer | peak extra RSS | targets |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in record["queries"]:
        systems, ratios = result["systems"], result["microstream_ratios"]

        def rate(system: str, systems: dict[str, Any] = systems) -> str:
            return _rate(systems[system]["events_per_s"]) + "/s" if system in systems else "—"

        def ratio(key: str, ratios: dict[str, Any] = ratios) -> str:
            return f"{ratios[key]:.2f}x" if key in ratios else "—"

        spark = rate("spark") if "spark" in systems else _short(result["notes"].get("spark"))
        peer = (
            rate("python_peer")
            if "python_peer" in systems
            else _short(result["notes"].get("python_peer"))
        )
        rows.append(
            f"| {result['query']} | {result['kind']} | {result['input_events']:,} "
            f"| {rate('polars')} | {rate('microstream')} "
            f"| {_rate(systems['microstream']['events_per_s_per_core'])}/s "
            f"| {ratio('vs_polars')} | {spark} | {ratio('vs_spark')} "
            f"| {peer} | {ratio('vs_python_peer')} "
            f"| {systems['microstream']['peak_extra_rss_mib']} MiB | {verdict(result)} |"
        )
    notes = [
        f"- {result['query']}, {peer.replace('_', ' ')}: {note}"
        for result in record["queries"]
        for peer, note in result["notes"].items()
    ]
    machine = record["machine"]
    spec, settings = record["settings"]["data"]["spec"], record["settings"]
    header = (
        f"Run of {record['date']} on `{record['host']}` ({machine['cores']} cores, "
        f"Python {machine['python']}, Polars {machine['polars']}, commit "
        f"{record['source'].get('commit')}): {spec['events']:,} events in files of "
        f"{spec['events_per_file']:,}, {settings.get('files_per_trigger')} file(s) per "
        f"trigger, event time at {spec['rate']:,} events/s, out-of-order groups of "
        f"{spec['out_of_order_group_size']}, seed {spec['seed']}; median of "
        f"{settings['repeat']} interleaved runs; `{source}`. Rates are input events/s; "
        "ratios are microstream's throughput over the other system's, in the same run."
    )
    footer = "\n\nWhere a peer has no figure:\n\n" + "\n".join(notes) if notes else ""
    return header + "\n\n" + "\n".join(rows) + footer


def chart(record: dict[str, Any], path: Path = CHART) -> None:
    """Grouped bars: events/s per query per system, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = [r["query"] for r in record["queries"]]
    present = [s for s in SYSTEMS if any(s in r["systems"] for r in record["queries"])]
    width = 0.8 / len(present)
    fig, ax = plt.subplots(figsize=(max(8, len(queries) * 0.9), 4.5))
    for i, system in enumerate(present):
        xs = [q + i * width for q in range(len(queries))]
        ys = [r["systems"].get(system, {}).get("events_per_s", 0) for r in record["queries"]]
        ax.bar(xs, ys, width, label=LABELS[system])
    ax.set_xticks([q + width * (len(present) - 1) / 2 for q in range(len(queries))], queries)
    ax.set_yscale("log")
    ax.set_ylabel("input events / s (2 cores)")
    ax.set_title(f"Nexmark throughput, {record['date'][:10]} ({record['host']})")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def update_readme(record: dict[str, Any], source: Path, readme: Path = README) -> None:
    """Replace the generated table in benchmarks/README.md and redraw the chart."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section to replace")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    try:
        shown = source.resolve().relative_to(BENCHMARKS.parent)
    except ValueError:
        shown = source
    readme.write_text(f"{head}{START}\n{table(record, str(shown))}\n{END}{tail}")
    chart(record)


if __name__ == "__main__":
    path = Path(sys.argv[1])
    update_readme(json.loads(path.read_text()), path)
