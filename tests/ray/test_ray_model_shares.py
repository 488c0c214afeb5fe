"""benchmarks/ray_model.py with the owners' shared reads (``owner_share``): the wait for
the shares is not the driver's own work, and it divides by the workers only as far as
a batch has splits (no Ray needed)."""

from __future__ import annotations

from typing import Any

from ray_model import fit, main, project

RAY1 = {
    "latest_offset": 10.0, "wal": 10.0, "read": 0.0, "compute": 600.0, "sink": 20.0,
    "commit": 120.0, "other": 0.0, "total": 760.0,
    "actor_process": 560.0, "actor_commit": 0.0, "route": 0.0, "owner_read": 60.0,
}  # fmt: skip
RAY2 = {
    **RAY1, "compute": 420.0, "commit": 100.0, "total": 560.0,
    "actor_process": 300.0, "owner_share": 80.0,
}  # fmt: skip


def test_the_shares_are_their_own_term_and_one_split_does_not_divide() -> None:
    costs = fit(1_000_000, RAY1, RAY2)
    # ray2's driver part: 10 + 10 + 0 + (420 - 300 - 0) + 20 + 100 + 0 = 260, of which
    # 80 ms were the wait for the owners' shares.
    assert (costs.driver, costs.share, costs.parallel) == (180.0, 80.0, 500.0)
    assert sum(costs.terms(2).values()) == RAY2["total"]
    assert sum(costs.terms(1).values()) == RAY1["total"]  # no share term at one worker
    assert costs.terms(1) == {
        "driver": 200.0, "exchange": 0.0, "actors": 560.0, "coordination": 0.0
    }  # fmt: skip
    # One split per batch: the first owner reads it at any count.
    assert [costs.terms(w)["share"] for w in (2, 8, 32)] == [80.0, 80.0, 80.0]
    assert costs.without_coordination().bottleneck(32) == "driver"  # 180 against 80


def test_with_many_splits_the_owners_read_in_parallel() -> None:
    costs = fit(1_000_000, RAY1, RAY2, splits=16)
    assert [costs.terms(w)["share"] for w in (2, 8, 32)] == [80.0, 20.0, 10.0]
    ideal = costs.without_coordination()
    assert round(ideal.events_per_s(8)) == round(1_000_000 / ((180 + 0 + 62.5 + 20) / 1000))


def test_the_command_names_the_share_and_its_remedy(capsys: Any, tmp_path: Any) -> None:
    report = {"events": 1_000_000, "queries": {"q11": {"stages_ms": {"ray1": RAY1, "ray2": {
        **RAY2, "compute": 1220.0, "total": 1360.0, "actor_process": 300.0, "owner_share": 880.0
    }}}}}  # fmt: skip
    out = project(report, workers=(2, 32))
    assert out["q11"]["costs_ms"]["share_at_2"] == 880.0
    assert out["q11"]["workers_without_coordination"]["32"]["bottleneck"] == "share"
    path = tmp_path / "report.json"
    path.write_text(__import__("json").dumps(report))
    assert main([str(path), "--workers", "2", "32"]) == 0
    printed = capsys.readouterr().out
    assert "q11 (with no coordination cost): bound by share; to move it: more splits" in printed
