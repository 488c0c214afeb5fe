"""benchmarks/ray_model.py's arithmetic: fitted costs, projected throughput and the
bottleneck, exactly, for a given report (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray_model import fit, main, project

RAY1 = {
    "latest_offset": 10.0, "wal": 10.0, "read": 80.0, "compute": 600.0, "sink": 20.0,
    "commit": 120.0, "other": 0.0, "total": 840.0,
    "actor_process": 500.0, "actor_commit": 60.0, "route": 0.0,
}  # fmt: skip
RAY2 = {
    **RAY1, "compute": 410.0, "commit": 100.0, "total": 630.0,
    "actor_process": 290.0, "actor_commit": 40.0, "route": 20.0,
}  # fmt: skip
REPORT: dict[str, Any] = {
    "events": 1_200_000,
    "queries": {
        "q5": {"stages_ms": {"local": {"total": 700.0}, "ray1": RAY1, "ray2": RAY2}},
        "q0": {"stages_ms": {"local": {"total": 50.0}}},  # stateless: no Ray runs to fit
    },
}


def test_the_fit_splits_driver_exchange_actors_and_coordination() -> None:
    costs = fit(REPORT["events"], RAY1, RAY2)
    # driver: 10 + 10 + 80 + (600 - 500 - 0) + 20 + (120 - 60) + 0
    assert (costs.driver, costs.route2, costs.parallel) == (280.0, 20.0, 560.0)
    assert costs.coordination == 50.0  # (290 + 40) - 560 / 2
    # The model gives back both measured runs' batch time.
    assert sum(costs.terms(1).values()) == RAY1["total"]
    assert sum(costs.terms(2).values()) == RAY2["total"]
    assert costs.terms(8) == {
        "driver": 280.0, "exchange": 80.0, "actors": 70.0, "coordination": 350.0
    }  # fmt: skip


def test_projected_throughput_and_bottleneck_per_worker_count() -> None:
    out = project(REPORT)
    assert list(out) == ["q5"]
    workers = out["q5"]["workers"]
    assert {w: workers[w]["events_per_s"] for w in workers} == {
        "1": 1428571.4,  # 1.2M events / 0.84 s
        "2": 1904761.9,  # / 0.63 s
        "8": 1538461.5,  # / (280 + 80 + 70 + 350) ms
        "32": 553633.2,  # / (280 + 320 + 17.5 + 1550) ms
    }
    assert {w: workers[w]["bottleneck"] for w in workers} == {
        "1": "actors",
        "2": "driver",
        "8": "coordination",
        "32": "coordination",
    }
    assert out["q5"]["costs_ms"] == {
        "driver": 280.0,
        "route_at_2": 20.0,
        "actors_at_1": 560.0,
        "coordination_per_worker": 50.0,
    }


def test_without_coordination_cost_the_exchange_bounds_32_workers() -> None:
    # Two workers exactly halve the actors' time: no coordination cost; at 32 workers
    # routing every row through the driver (20 ms * 32 / 2) is the largest part.
    ray2 = {**RAY2, "actor_process": 250.0, "actor_commit": 30.0, "compute": 370.0}
    costs = fit(1_000, RAY1, ray2)
    assert costs.coordination == 0.0
    assert costs.terms(32) == {
        "driver": 280.0,
        "exchange": 320.0,
        "actors": 17.5,
        "coordination": 0.0,
    }
    assert costs.bottleneck(32) == "exchange"
    assert costs.events_per_s(32) == pytest.approx(1_000 / 0.6175)


def test_the_command_prints_the_table_and_the_remedy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    assert main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "A model" in printed
    assert "| q5 | 1,428,571 | 1,904,762 | 1,538,462 | 553,633 | coordination |" in printed
    assert "q5: bound by coordination; to move it: fewer round trips per batch" in printed
