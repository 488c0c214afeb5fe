"""One batch's bookkeeping of the sources RayRuntime reads in tasks or in the owners,
and the small helpers :mod:`~microstream.runtime.ray.executor` uses over it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microstream.plan.physical import ExchangeStage

if TYPE_CHECKING:
    import polars as pl

    from microstream.plan.nodes import ScanNode
    from microstream.plan.physical import OperatorStage, PhysicalPlan
    from microstream.runtime.ray.operator_exchange import ExchangeTail
    from microstream.runtime.ray.remote_operator import RemoteOperator, Routed
    from microstream.runtime.ray.scan_tasks import SplitReport

__all__: list[str] = []


@dataclass
class _Reads:
    """One batch's bookkeeping of the sources read in tasks."""

    offsets: dict[tuple[int, int], int] = dataclasses.field(default_factory=dict)
    """(stage, consumer) -> the first of the consumer's returns of the stage's tasks."""
    scans: dict[int, ScanNode] = dataclasses.field(default_factory=dict)
    reports: dict[int, list[Any]] = dataclasses.field(default_factory=dict)
    """Stage -> the references of its split tasks' reports."""
    known: dict[int, list[SplitReport]] = dataclasses.field(default_factory=dict)
    """Stage -> the reports of the owner that read its source (already here)."""
    rows: dict[ScanNode, int] = dataclasses.field(default_factory=dict)


def _note_reads(
    plan: PhysicalPlan,
    stage: OperatorStage,
    operator: RemoteOperator,
    owned: Mapping[int, list[Any]],
    reads: _Reads,
) -> None:
    """The reports of the reads the operator's owner made in its call, by stage: one per
    input whose stage it read, in input order."""
    read = [s for i in stage.inputs if (s := _input_of(plan, i)) in owned]
    if read:
        assert len(read) == len(operator.reports), (read, operator.reports)
        for index, report in zip(read, operator.reports):
            reads.known[index] = [report]


def _input_of(plan: PhysicalPlan, index: int) -> int:
    exchange = plan.stages[index]
    assert isinstance(exchange, ExchangeStage)
    return exchange.input


def _by_target(tail: ExchangeTail, pieces: list[list[Any]]) -> dict[int, list[Routed]]:
    """Per exchange of ``tail``, per owner of its consumer, the references of the pieces
    every owner of the operator cut for it (``pieces``: per owner of the operator, in
    owner order, its returns): in the operator's owner order, so each next owner's input
    is in the same order every run."""
    out: dict[int, list[Routed]] = {}
    first = 0
    for target in tail.targets:
        out[target.exchange] = [
            [returns[first + k] for returns in pieces] for k in range(len(target.his))
        ]
        first += len(target.his)
    return out


def _cause(exc: Any) -> BaseException:
    """What an operator raised in a worker (Ray wraps it in a ``RayTaskError``)."""
    return exc.cause if isinstance(exc.cause, BaseException) else exc


def _collected(results: list[pl.LazyFrame | None], index: int) -> pl.DataFrame:
    frame = results[index]
    assert frame is not None, f"stage {index} has not run"
    return frame.collect()
