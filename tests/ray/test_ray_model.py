"""benchmarks/ray_model.py's arithmetic: fitted costs, projected throughput and the
bottleneck, exactly, for a given report (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ray_model import fit, main, project

RAY1 = {
    "latest_offset": 10.0, "wal": 10.0, "read": 90.0, "compute": 600.0, "sink": 20.0,
    "commit": 120.0, "other": 0.0, "total": 850.0,
    "actor_process": 500.0, "actor_commit": 60.0, "route": 0.0,
}  # fmt: skip
RAY2 = {
    **RAY1, "compute": 410.0, "commit": 100.0, "total": 640.0,
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
    # driver: 10 + 10 + 90 + (600 - 500 - 0) + 20 + (120 - 60) + 0
    assert (costs.driver, costs.route2, costs.parallel) == (290.0, 20.0, 560.0)
    assert costs.coordination == 50.0  # (290 + 40) - 560 / 2
    # The model gives back both measured runs' batch time.
    assert sum(costs.terms(1).values()) == RAY1["total"]
    assert sum(costs.terms(2).values()) == RAY2["total"]
    assert costs.terms(8) == {
        "driver": 290.0, "exchange": 80.0, "actors": 70.0, "coordination": 350.0
    }  # fmt: skip


def test_projected_throughput_and_bottleneck_per_worker_count() -> None:
    out = project(REPORT)
    assert list(out) == ["q5"]
    workers = out["q5"]["workers"]
    assert {w: workers[w]["events_per_s"] for w in workers} == {
        "1": 1411764.7,  # 1.2M events / 0.85 s
        "2": 1875000.0,  # / 0.64 s
        "8": 1518987.3,  # / (290 + 80 + 70 + 350) ms
        "32": 551090.7,  # / (290 + 320 + 17.5 + 1550) ms
    }
    assert {w: workers[w]["bottleneck"] for w in workers} == {
        "1": "actors",
        "2": "driver",
        "8": "coordination",
        "32": "coordination",
    }
    ideal = out["q5"]["workers_without_coordination"]
    assert {w: ideal[w]["events_per_s"] for w in ideal} == {
        "1": 1411764.7,
        "2": 2033898.3,  # / (290 + 20 + 280) ms
        "8": 2727272.7,  # / (290 + 80 + 70) ms
        "32": 1912350.6,  # / (290 + 320 + 17.5) ms
    }
    assert {w: ideal[w]["bottleneck"] for w in ideal} == {
        "1": "actors",
        "2": "driver",
        "8": "driver",
        "32": "exchange",
    }
    assert out["q5"]["costs_ms"] == {
        "driver": 290.0,
        "owner_read_at_1": 0.0,
        "route_at_2": 20.0,
        "actors_at_1": 560.0,
        "coordination_per_worker": 50.0,
    }


def test_without_coordination_cost_the_exchange_bounds_32_workers() -> None:
    # Two workers exactly halve the actors' time: no coordination cost; at 32 workers
    # routing every row through the driver (20 ms * 32 / 2) is the largest part. (The
    # driver's own part of the 2-worker run is 290 ms, as at one worker.)
    ray2 = {**RAY2, "actor_process": 250.0, "actor_commit": 30.0, "compute": 360.0}
    costs = fit(1_000, RAY1, ray2)
    assert costs.coordination == 0.0
    assert costs.terms(32) == {
        "driver": 290.0,
        "exchange": 320.0,
        "actors": 17.5,
        "coordination": 0.0,
    }
    assert costs.bottleneck(32) == "exchange"
    assert costs.events_per_s(32) == pytest.approx(1_000 / 0.6275)


def test_the_command_prints_the_table_and_the_remedy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "report.json"
    path.write_text(json.dumps(REPORT))
    assert main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "A model" in printed
    row = (
        "| q5 | 1,411,765 / 1,411,765 | 1,875,000 / 2,033,898 | 1,518,987 / 2,727,273 "
        "| 551,091 / 1,912,351 | coordination / exchange |"
    )
    assert row in printed
    assert "q5 (as fitted): bound by coordination; to move it: fewer round trips" in printed
    assert "q5 (with no coordination cost): bound by exchange; to move it: split rows" in printed


def test_an_unpartitioned_query_does_not_scale_past_its_one_actor() -> None:
    # A keyless window: every row goes to one actor, at any number of workers.
    report = {**REPORT, "queries": {"q7": {**REPORT["queries"]["q5"], "partitioned": False}}}
    out = project(report)["q7"]
    assert out["partitioned"] is False
    assert {w: out["workers"][w]["events_per_s"] for w in out["workers"]} == {
        w: 1411764.7
        for w in ("1", "2", "8", "32")  # 1.2M events / (290 + 560) ms
    }
    assert out["workers"]["32"]["terms_ms"] == {
        "driver": 290.0, "exchange": 0.0, "single_actor": 560.0
    }  # fmt: skip
    assert out["workers"]["32"]["bottleneck"] == "single_actor"
    assert out["workers_without_coordination"]["32"] == out["workers"]["32"]


def test_rows_cut_by_the_actors_cost_the_driver_no_exchange() -> None:
    # Rows an operator emits for the next operator go from actor to actor: ray_scaling
    # measures no driver routing for them (route 0 at 2 workers), their cut is in the
    # actors' time, and the exchange term stays 0 at any number of workers.
    ray2 = {**RAY2, "route": 0.0, "actor_process": 310.0}
    costs = fit(REPORT["events"], RAY1, ray2)
    assert costs.route2 == 0.0 and costs.parallel == 560.0
    assert [costs.terms(w)["exchange"] for w in (1, 2, 8, 32)] == [0.0] * 4
    assert costs.without_coordination().bottleneck(32) == "driver"  # 290 ms against 17.5


def test_the_one_owner_reading_its_source_is_left_out_of_what_more_workers_divide() -> None:
    # At one worker the owner read the source and ran the stage before its operator in
    # its call (150 ms of its 560, owner_read): the driver read nothing (read 10) and
    # its part is 210 ms. At two workers (keyed: several owners) the driver reads again
    # (ray2's part, 290 ms, which every larger count keeps); the actors' 410 ms of
    # operators are what more workers divide.
    ray1 = {**RAY1, "read": 10.0, "total": 770.0, "owner_read": 150.0}
    costs = fit(REPORT["events"], ray1, RAY2)
    assert (costs.driver, costs.driver_one, costs.parallel) == (290.0, 210.0, 410.0)
    assert (costs.owner_read, costs.coordination) == (150.0, 125.0)  # 330 - 410 / 2
    assert sum(costs.terms(1).values()) == ray1["total"]
    assert sum(costs.terms(2).values()) == RAY2["total"]
    assert costs.terms(1) == {
        "driver": 210.0, "exchange": 0.0, "actors": 560.0, "coordination": 0.0
    }  # fmt: skip
    assert costs.terms(8) == {
        "driver": 290.0, "exchange": 80.0, "actors": 51.25, "coordination": 875.0
    }  # fmt: skip
    # A keyless operator has one owner at any count: it reads at any count, and the
    # driver's part is ray1's.
    single = fit(REPORT["events"], ray1, RAY2, partitioned=False)
    assert (single.driver, single.parallel) == (210.0, 560.0)
    assert sum(single.terms(32).values()) == ray1["total"]
