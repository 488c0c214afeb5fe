"""Projected RayRuntime throughput at 1, 2, 8 and 32 workers, from ray_scaling.py's
measured per-stage costs. A model (Amdahl's law with an exchange and a coordination
cost that grow with the workers), not a measurement: it says which part would bound
the throughput, and what would move that bound.

For each query it reads the ``stages_ms`` of the ``ray1`` and ``ray2`` runs (milliseconds
summed over the run's batches) and splits a run's batch time ``T(W)`` at ``W`` workers
into:

- ``driver``: what the driver does alone, the same at any ``W >= 2`` (taken from
  ``ray2``, whose placement every larger count keeps): offsets and the write-ahead log
  (``latest_offset``, ``wal``), reading the sources (``read``), the stateless stages
  (``compute`` minus the actor calls and the routing), the sink, the manifest and
  ``commits/N`` (``commit`` minus the owners' state writes), and the rest of the batch
  (``other``). At one worker the one owner reads the source and runs the stage before
  its operator in its call (``runtime/ray/owner_reads.py``: ``owner_read``, inside
  ``actor_process``), which several owners of a keyed operator do in a call of their
  own before the operators' (next item), so ``T(1)`` is ``ray1``'s own driver part plus
  its actors' time, as measured;
- ``share``: at ``W >= 2`` the owners of a keyed operator read the batch's splits in
  shares, split ``k`` by owner ``k % W``, and cut the rows for each other
  (``runtime/ray/shared_reads.py``; ``owner_share`` of ``ray2``: the driver's wait for
  those calls, inside ``compute`` and outside ``actor_process``, so not in ``driver``).
  The owners read in parallel only as far as the batch has splits:
  ``share(W) = owner_share(ray2) * ceil(S / W) / ceil(S / 2)`` for ``S`` splits per batch
  (``--splits-per-batch``, default 1: ray_scaling.py's batches are one file, one split,
  read by the first owner at any ``W``, a serial part). The cut into ``W`` pieces grows
  with ``W`` and is not modelled (one filter per owner, ~0.1 ms per 100k rows each);
- ``exchange``: routing the rows to their key groups' owners on the driver, one pass
  over the batch per owner: ``route(ray2) * W / 2`` (nothing at one worker). These are
  the rows the driver still routes: a source read on the driver, a stage of the whole
  batch (q5's and q4's combiners). Rows an operator emits for the next operator are
  not: its owners cut them by the next owners' key groups and the pieces go from
  actor to actor (``runtime/ray/operator_exchange.py``), so that cut is in ``actors``
  (it shrinks with ``W`` there, which is optimistic: each owner makes one pass over
  its rows per next owner) and never in ``route``;
- ``actors``: the operators' and state writes' time in the actors at one worker
  (``actor_process + actor_commit - owner_read`` of ``ray1``), split evenly: ``P / W``; when the
  query's exchanges never split rows over several actors (``partitioned`` false in the
  report: a keyless window lives whole in one actor), ``P`` at any ``W`` (its owner
  reads the source at any ``W``: ``owner_read`` stays in, and the driver is ``ray1``'s),
  and the bottleneck it makes is called ``single_actor``;
- ``coordination``: what two workers cost beyond a perfect halving of ``P``
  (``actor_process + actor_commit`` of ``ray2`` minus ``P / 2``, at least 0), charged
  per extra worker: ``c * (W - 1)`` (a call per owner and operator, waiting for the
  slowest owner, the driver serialising each owner's rows, the owners waiting for the
  split tasks that read for them).

``T(W) = driver + exchange(W) + P / W + c * (W - 1)`` reproduces both measurements up
to the serial part's noise; the projected events per second are ``events / T(W)``, and
the bottleneck is the largest of the four terms.

On a machine with fewer cores than the driver and the workers need (the benchmark's
2-core machine), the 2-worker run also pays CPU contention, which the fit takes for
coordination: that projection is a lower bound. The projection is therefore also given
with ``c = 0`` (two workers halve the actors' time, as they would with a core each),
an upper bound whose bottleneck is the driver's serial work or the exchange.

    python benchmarks/ray_model.py benchmarks/results/2026-12-07-ray-scaling-2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORKERS = (1, 2, 8, 32)

REMEDY = {
    "driver": "less of the driver's own work per event: its fixed work per batch (planning "
    "splits, offsets and the WAL, the manifest and commits/N) spread over larger batches, "
    "and no rows through it (splits read in tasks or by the owners, sink files written "
    "by the workers: both exist; a whole-batch combiner, map_batches, still keeps a "
    "source's rows on the driver)",
    "exchange": "split rows by key group where they are read (in the source tasks) instead "
    "of routing every row through the driver: a combiner of the whole batch (map_batches) "
    "keeps a source's rows on the driver; operator to operator rows already go actor to actor",
    "actors": "more workers (the part that scales)",
    "share": "more splits per batch (several files per trigger, or smaller splits) so every "
    "owner reads a share: a batch of one split is read and cut by one owner at any count",
    "single_actor": "partition the operator (a key besides the window: a keyless "
    "operator lives whole in one actor, more workers do not help it)",
    "coordination": "fewer round trips per batch (one call per owner and batch, process "
    "and state write together, is done: what is left is the workers sharing cores with "
    "the driver, and the rows copied through Ray's object store)",
}
"""What would move each bottleneck."""


@dataclass(frozen=True)
class Costs:
    """One query's fitted costs (ms summed over the run's batches) and its events."""

    events: int
    driver: float
    route2: float
    parallel: float
    coordination: float
    partitioned: bool = True
    driver_one: float | None = None
    """The driver's part at one worker (None: ``driver``)."""
    owner_read: float = 0.0
    """What the one owner spent reading its source at one worker (inside its call)."""
    share: float = 0.0
    """At two workers, the driver's wait for the owners to read their shares of the
    batch's splits and cut the rows for each other (``owner_share``)."""
    splits: int = 1
    """Splits per batch: how many owners can read a batch's shares at once."""

    def without_coordination(self) -> Costs:
        """The same costs with ``c = 0``: the upper bound."""
        return dataclasses.replace(self, coordination=0.0)

    def terms(self, workers: int) -> dict[str, float]:
        """The four parts of the batch time at ``workers`` workers, in ms."""
        if not self.partitioned:  # one actor does all of it; the others idle
            return {"driver": self.driver, "exchange": 0.0, "single_actor": self.parallel}
        if workers == 1:  # as measured: the one owner read the source in its call
            return {
                "driver": self.driver if self.driver_one is None else self.driver_one,
                "exchange": 0.0,
                "actors": self.parallel + self.owner_read,
                "coordination": 0.0,
            }
        terms = {
            "driver": self.driver,
            "exchange": 0.0 if workers == 1 else self.route2 * workers / 2,
            "actors": self.parallel / workers,
            "coordination": self.coordination * (workers - 1),
        }
        if self.share:  # the owners' shared reads (a query whose owners read them)
            terms["share"] = self.share * -(-self.splits // workers) / -(-self.splits // 2)
        return terms

    def events_per_s(self, workers: int) -> float:
        return self.events / (sum(self.terms(workers).values()) / 1000)

    def bottleneck(self, workers: int) -> str:
        terms = self.terms(workers)
        return max(terms, key=lambda name: terms[name])


def fit(
    events: int,
    ray1: dict[str, float],
    ray2: dict[str, float],
    partitioned: bool = True,
    splits: int = 1,
) -> Costs:
    """The model's costs from the ``stages_ms`` of the 1- and 2-worker runs
    (``partitioned``: whether the exchanges split rows over several actors; ``splits``:
    per batch, how many owners can read its shares at once).

    Examples
    --------
    >>> ray1 = {"latest_offset": 5, "wal": 5, "read": 40, "compute": 300, "sink": 10,
    ...         "commit": 60, "other": 0, "actor_process": 250, "actor_commit": 30, "route": 0}
    >>> ray2 = {**ray1, "compute": 202, "actor_process": 150, "actor_commit": 20, "route": 12}
    >>> costs = fit(600_000, ray1, ray2)
    >>> costs.driver, costs.parallel, costs.coordination
    (140, 280.0, 30.0)
    >>> round(costs.events_per_s(2)), costs.bottleneck(2)
    (1863354, 'driver')
    >>> round(costs.events_per_s(8)), costs.bottleneck(8)
    (1385681, 'coordination')
    >>> shared = fit(600_000, ray1, {**ray2, "owner_share": 30}, splits=4)
    >>> shared.driver, shared.terms(2)["share"], shared.terms(8)["share"]
    (110, 30.0, 15.0)
    """
    actors1 = ray1["actor_process"] + ray1["actor_commit"]
    actors2 = ray2["actor_process"] + ray2["actor_commit"]
    if not partitioned:  # one owner at any count: it reads the source at any count too
        return Costs(events, _serial(ray1), ray2["route"], actors1, 0.0, partitioned=False)
    owner_read = ray1.get("owner_read", 0.0)
    parallel = actors1 - owner_read
    share = ray2.get("owner_share", 0)
    return Costs(
        events=events,
        driver=_serial(ray2) - share,
        route2=ray2["route"],
        parallel=parallel,
        coordination=max(0.0, actors2 - parallel / 2),
        driver_one=_serial(ray1),
        owner_read=owner_read,
        share=share,
        splits=splits,
    )


def _serial(run: dict[str, float]) -> float:
    """The driver's own part of a run's batch time (module docstring: ``driver``)."""
    return (
        run["latest_offset"]
        + run["wal"]
        + run["read"]
        + (run["compute"] - run["actor_process"] - run["route"])
        + run["sink"]
        + (run["commit"] - run["actor_commit"])
        + run["other"]
    )


def project(
    report: dict[str, Any], workers: tuple[int, ...] = WORKERS, splits: int = 1
) -> dict[str, Any]:
    """Per query of a ray_scaling.py report: the fitted costs and, per worker count, the
    projected events per second, the four terms and the bottleneck, as fitted
    (``workers``) and with no coordination cost (``workers_without_coordination``).

    Examples
    --------
    >>> stages = {"latest_offset": 1, "wal": 1, "read": 8, "compute": 50, "sink": 0,
    ...           "commit": 10, "other": 0, "actor_process": 40, "actor_commit": 5, "route": 0}
    >>> report = {"events": 1000, "queries": {"q5": {"stages_ms": {
    ...     "ray1": stages, "ray2": {**stages, "actor_process": 20, "route": 4}}}}}
    >>> out = project(report, workers=(1, 32))
    >>> out["q5"]["workers"]["1"]["events_per_s"], out["q5"]["workers"]["32"]["bottleneck"]
    (14285.7, 'coordination')
    >>> out["q5"]["workers_without_coordination"]["32"]["bottleneck"]
    'exchange'
    """
    out: dict[str, Any] = {}
    for name, entry in report["queries"].items():
        stages = entry.get("stages_ms", {})
        if "ray1" not in stages or "ray2" not in stages:
            continue
        partitioned = bool(entry.get("partitioned", True))
        costs = fit(report["events"], stages["ray1"], stages["ray2"], partitioned, splits)

        def per_worker(costs: Costs) -> dict[str, Any]:
            return {
                str(w): {
                    "events_per_s": round(costs.events_per_s(w), 1),
                    "terms_ms": {k: round(v, 1) for k, v in costs.terms(w).items()},
                    "bottleneck": costs.bottleneck(w),
                }
                for w in workers
            }

        out[name] = {
            "partitioned": partitioned,
            "costs_ms": {
                "driver": round(costs.driver, 1),
                "owner_read_at_1": round(costs.owner_read, 1),
                **({"share_at_2": round(costs.share, 1)} if costs.share else {}),
                "route_at_2": round(costs.route2, 1),
                "actors_at_1": round(costs.parallel, 1),
                "coordination_per_worker": round(costs.coordination, 1),
            },
            "workers": per_worker(costs),
            "workers_without_coordination": per_worker(costs.without_coordination()),
        }
    return out


def table(projection: dict[str, Any]) -> str:
    """A markdown table: projected events/s per worker count as fitted / with ``c = 0``,
    and the bottleneck at the largest count in both."""
    counts = list(next(iter(projection.values()))["workers"]) if projection else []
    head = "| query | " + " | ".join(f"{w} worker{'s' * (w != '1')}" for w in counts)
    lines = [head + " | bottleneck at " + (counts[-1] if counts else "-") + " |"]
    lines.append("|---" * (len(counts) + 2) + "|")
    for name, entry in projection.items():
        fitted, ideal = entry["workers"], entry["workers_without_coordination"]
        cells = [
            f"{fitted[w]['events_per_s']:,.0f} / {ideal[w]['events_per_s']:,.0f}" for w in counts
        ]
        last = f"{fitted[counts[-1]]['bottleneck']} / {ideal[counts[-1]]['bottleneck']}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("report", type=Path, help="a JSON report of benchmarks/ray_scaling.py")
    parser.add_argument("--workers", nargs="+", type=int, default=list(WORKERS))
    parser.add_argument("--json", action="store_true", help="print the projection as JSON")
    parser.add_argument(
        "--splits-per-batch", type=int, default=1, help="splits per batch the owners share"
    )
    args = parser.parse_args(argv)
    report = json.loads(args.report.read_text())
    projection = project(report, tuple(args.workers), args.splits_per_batch)
    if args.json:
        print(json.dumps(projection, indent=1))
        return 0
    print(
        "A model (Amdahl with the exchange and coordination growing with workers), "
        "projected events/s as fitted / with no coordination cost:"
    )
    print(table(projection))
    last = str(args.workers[-1])
    for name, entry in projection.items():
        for fit_name in ("workers", "workers_without_coordination"):
            bound = entry[fit_name][last]["bottleneck"]
            how = "as fitted" if fit_name == "workers" else "with no coordination cost"
            print(f"{name} ({how}): bound by {bound}; to move it: {REMEDY[bound]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
