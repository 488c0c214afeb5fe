"""The logical plan of a streaming query: frozen nodes, one per verb.

A plan is data: nodes are frozen dataclasses, so a plan can be printed
(``explain``), fingerprinted (stored in the checkpoint and compared on restart)
and compiled, every batch, into one Polars lazy query over the batch's input.
Stateful operators (windows, deduplication, stream-stream joins) will be more
node kinds that own state; stateless nodes simply rewrite a LazyFrame.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.protocols import StaticSide

if TYPE_CHECKING:
    from microstream.protocols import SourceSpec

__all__ = [
    "MapBatchesNode",
    "PlanNode",
    "ScanNode",
    "StatelessNode",
    "StaticJoinNode",
    "StaticSide",
    "check_row_wise",
    "describe_value",
]


class PlanNode:
    """Base of every plan node."""

    def children(self) -> tuple[PlanNode, ...]:
        return ()

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_lazy(self, inputs: Mapping[int, pl.LazyFrame]) -> pl.LazyFrame:
        """The node as a Polars lazy query over the batch's per-source inputs."""
        raise NotImplementedError  # pragma: no cover - abstract

    def scans(self) -> list[ScanNode]:
        """Scan nodes in plan order (their position is the source index)."""
        found: list[ScanNode] = []
        for child in self.children():
            found.extend(child.scans())
        return found

    def explain_lines(self, depth: int = 0) -> list[str]:
        lines = ["  " * depth + self.describe()]
        for child in self.children():
            lines.extend(child.explain_lines(depth + 1))
        return lines

    def stateless_steps(self) -> list[str]:
        steps: list[str] = []
        for child in self.children():
            steps.extend(child.stateless_steps())
        return steps

    def schema(self) -> pl.Schema:
        """The output schema, found by planning the query over empty inputs."""
        empty = {i: pl.LazyFrame(schema=scan.source.schema) for i, scan in enumerate(self.scans())}
        try:
            return self.to_lazy(empty).collect_schema()
        except pl.exceptions.PolarsError as exc:
            msg = f"the query cannot be planned: {exc}\nplan:\n" + "\n".join(self.explain_lines())
            raise PlanError(msg) from exc


@dataclass(frozen=True, eq=False)
class ScanNode(PlanNode):
    source: SourceSpec
    index: int = 0

    def describe(self) -> str:
        return f"Scan[{self.index}] {self.source.describe()}"

    def scans(self) -> list[ScanNode]:
        return [self]

    def to_lazy(self, inputs: Mapping[int, pl.LazyFrame]) -> pl.LazyFrame:
        return inputs[self.index]


@dataclass(frozen=True, eq=False)
class StatelessNode(PlanNode):
    """A LazyFrame verb applied as is to every batch (filter, select, ...)."""

    input: PlanNode
    verb: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        parts = [describe_value(a) for a in self.args]
        parts += [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        return f"{self.verb}({', '.join(parts)})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def to_lazy(self, inputs: Mapping[int, pl.LazyFrame]) -> pl.LazyFrame:
        lf = self.input.to_lazy(inputs)
        result: pl.LazyFrame = getattr(lf, self.verb)(*self.args, **self.kwargs)
        return result


@dataclass(frozen=True, eq=False)
class MapBatchesNode(PlanNode):
    """A user function from DataFrame to DataFrame, called once per batch."""

    input: PlanNode
    function: Callable[[pl.DataFrame], pl.DataFrame]
    output_schema: pl.Schema

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        name = getattr(self.function, "__qualname__", repr(self.function))
        return f"map_batches({name})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def to_lazy(self, inputs: Mapping[int, pl.LazyFrame]) -> pl.LazyFrame:
        return self.input.to_lazy(inputs).map_batches(
            self.function, schema=self.output_schema, validate_output_schema=True
        )


@dataclass(frozen=True, eq=False)
class StaticJoinNode(PlanNode):
    """A join of the stream with a static DataFrame, LazyFrame or changing table."""

    input: PlanNode
    other: pl.LazyFrame | StaticSide
    kwargs: Mapping[str, Any]

    def children(self) -> tuple[PlanNode, ...]:
        return (self.input,)

    def describe(self) -> str:
        other = self.other.describe() if isinstance(self.other, StaticSide) else "static LazyFrame"
        parts = [f"{k}={describe_value(v)}" for k, v in self.kwargs.items()]
        return f"join({other}, {', '.join(parts)})"

    def stateless_steps(self) -> list[str]:
        return [*self.input.stateless_steps(), self.describe()]

    def to_lazy(self, inputs: Mapping[int, pl.LazyFrame]) -> pl.LazyFrame:
        other = self.other.current() if isinstance(self.other, StaticSide) else self.other
        return self.input.to_lazy(inputs).join(other, **self.kwargs)


def describe_value(value: Any) -> str:
    """A stable, readable text for a verb argument (used in fingerprints)."""
    if isinstance(value, pl.Expr):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {describe_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (pl.DataType, type)):
        return str(value)
    return repr(value)


# Aggregations and order-dependent functions give per-batch answers that differ
# from the answer over the whole stream, so they are refused in row-wise verbs.
_ROW_DEPENDENT = ("Agg", "Len", "Over", "Sort", "SortBy", "Slice", "Gather", "Filter", "Window")


def check_row_wise(verb: str, exprs: list[Any]) -> None:
    """Refuse expressions whose value for a row depends on other rows of the batch.

    ``pl.col("x").sum()`` or ``cum_sum()`` inside ``with_columns`` would give a
    per-batch answer on a stream and a whole-table answer on a static frame;
    the two must agree, so such expressions need a stateful verb instead.
    """
    for expr in exprs:
        if not isinstance(expr, pl.Expr):
            continue
        separable: bool | None
        try:
            separable = expr.meta.is_row_separable()
        except Exception:  # a UDF cannot be inspected without a schema
            separable = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the json format is deprecated, still exact
                tree = json.loads(expr.meta.serialize(format="json"))
        except Exception:  # UDFs may not serialise
            tree = None
        bad = _find_row_dependent(tree) if tree is not None else None
        if separable is False or bad is not None:
            what = bad or "an order- or batch-dependent function"
            msg = (
                f"{verb}({expr}) cannot run on a stream: {what} makes each row's value depend "
                "on the other rows of the micro-batch, so the result would change with how the "
                "stream is split into batches. Aggregates over the whole stream need the "
                "stateful verbs group_by/group_by_dynamic, which this version does not have yet; "
                "if a per-batch answer is what you want, say so with map_batches(fn) or "
                "foreach_batch(fn)"
            )
            raise PlanError(msg)


def _find_row_dependent(node: Any) -> str | None:
    if isinstance(node, str):
        return "len()" if node == "Len" else None
    if isinstance(node, list):
        for item in node:
            found = _find_row_dependent(item)
            if found:
                return found
        return None
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ROW_DEPENDENT:
                return f"an aggregation ({key.lower()})" if key == "Agg" else key.lower()
            if key == "Literal":
                continue
            found = _find_row_dependent(value)
            if found:
                return found
    return None
