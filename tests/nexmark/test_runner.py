"""The benchmark runner on the quick data set: figures, ratios, verdicts, the README table."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from nexmark import report
from nexmark.run import Peers, run_query


def test_run_query_reports_checked_figures(nexmark_root: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(repeat=2, files_per_trigger=3, checkpoint_root=str(tmp_path))
    result = run_query("q7", nexmark_root, args, Peers())
    assert result["query"] == "q7"
    # Every bid of the quick data set (46 of 50 events), read once per run.
    assert result["input_events"] == 24_000 * 46 // 50
    ms_fig, polars_fig = result["systems"]["microstream"], result["systems"]["polars"]
    assert len(ms_fig["runs_seconds"]) == 2
    # Seconds are rounded to the microsecond in the record, rates to an event, ratios to 1e-4.
    rate = result["input_events"] / ms_fig["seconds"]
    assert ms_fig["events_per_s"] == pytest.approx(rate, rel=1e-3)
    expected_ratio = polars_fig["seconds"] / ms_fig["seconds"]
    assert result["microstream_ratios"].keys() == {"vs_polars"}
    assert result["microstream_ratios"]["vs_polars"] == pytest.approx(expected_ratio, abs=2e-4)
    assert result["microstream_detail"]["batches"] >= 4  # 12 files, 3 per trigger
    assert set(result["systems"]) == {"polars", "microstream"}  # no peer was given

    record = {
        "date": "2026-11-24T00:00:00+00:00",
        "host": "test",
        "machine": {"cores": 2, "python": "3.11", "polars": "x"},
        "source": {"commit": "abc"},
        "settings": {
            "data": {
                "spec": {
                    "events": 24_000,
                    "events_per_file": 2_000,
                    "rate": 1_000,
                    "out_of_order_group_size": 200,
                    "seed": 7,
                }
            },
            "repeat": 2,
            "files_per_trigger": 3,
        },
        "queries": [result],
    }
    text = report.table(record, "results/x.json")
    assert "| q7 | windowed | 22,080 |" in text
    chart = tmp_path / "chart.png"
    report.chart(record, chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verdict_names_each_missed_target() -> None:
    result = {
        "query": "q5",
        "kind": "windowed",
        "systems": {"microstream": {"events_per_s_per_core": 200_000}},
        "microstream_ratios": {"vs_polars": 0.5, "vs_spark": 4.0, "vs_python_peer": 12.0},
    }
    assert report.verdict(result) == "missed: <0.25M ev/s/core, <5x spark"
    result["systems"]["microstream"]["events_per_s_per_core"] = 300_000
    result["microstream_ratios"]["vs_spark"] = 6.0
    assert report.verdict(result) == "met"
