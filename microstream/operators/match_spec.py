"""The checked, compiled form of a ``match_recognize`` call (:class:`MatchSpec`).

:meth:`MatchSpec.build` parses the pattern, reads the DEFINE and MEASURES
expressions for the pattern references they use (:mod:`.pattern_refs`), checks
every argument (a :class:`~microstream.PlanError` names the one that is wrong) and
works out what the operator keeps: the columns of its state, how far ``prev`` and
``next`` reach, the output schema for ONE or ALL ROWS PER MATCH.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from microstream.exceptions import PlanError
from microstream.operators.pattern import (
    Alternation,
    Concatenation,
    PatternNode,
    Program,
    Quantified,
    check_pattern,
    compile_pattern,
    parse_pattern,
    variables,
)
from microstream.operators.pattern_refs import Reference, parse_reference
from microstream.plan.nodes import check_row_wise

__all__ = ["AFTER_MATCH", "MatchSpec"]

AFTER_MATCH = ("skip_past_last_row", "skip_to_next_row", "skip_to_first:", "skip_to_last:")
"""The ``after_match`` strategies; the last two name a variable: ``"skip_to_last:B"``."""


@dataclass(frozen=True)
class _Condition:
    """A variable's DEFINE: its expression, and the references that depend on the mapping."""

    expr: pl.Expr
    mapping_refs: tuple[Reference, ...]
    columns: tuple[str, ...]
    """Every column it reads: input columns and the row-local reference columns."""

    @property
    def row_local(self) -> bool:
        return not self.mapping_refs


@dataclass(frozen=True)
class MatchSpec:
    """A ``match_recognize`` call, checked and compiled: what the node and the operator need.

    Build it with :meth:`build`, which raises :class:`~microstream.PlanError` for
    anything the operator cannot run, naming the argument.
    """

    tree: PatternNode
    program: Program
    conditions: Mapping[int, _Condition]
    """DEFINE per variable index; a variable without DEFINE accepts every row."""
    row_local_refs: tuple[Reference, ...]
    """References of DEFINE computed as columns over the buffered rows."""
    measure_refs: tuple[Reference, ...]
    measure_columns: tuple[str, ...]
    state_columns: tuple[str, ...]
    max_prev: int
    output_schema: pl.Schema
    skip: str
    skip_variable: int | None
    reference_dtypes: Mapping[str, pl.DataType] = field(default_factory=dict)
    rows_per_match: str = "one"
    max_next: int = 0
    """The largest ``next`` offset of DEFINE: a row is tried once that many rows follow it."""

    @property
    def numbers_matches(self) -> bool:
        """Whether MEASURES read ``match_number()`` (a count per partition is kept)."""
        return any(r.function == "match_number" for r in self.measure_refs)

    @classmethod
    def build(
        cls,
        *,
        schema: pl.Schema,
        partition_by: Sequence[str],
        order_by: str,
        pattern: str,
        define: Mapping[str, pl.Expr],
        measures: Mapping[str, pl.Expr],
        after_match: str,
        rows_per_match: str = "one",
    ) -> MatchSpec:
        """Check and compile a ``match_recognize`` call over input ``schema``."""
        if rows_per_match not in ("one", "all"):
            msg = f"rows_per_match must be 'one' or 'all'; got {rows_per_match!r} instead"
            raise PlanError(msg)
        tree = parse_pattern(pattern)
        check_pattern(tree, pattern)
        program = compile_pattern(tree)
        names = variables(tree)
        index = {name: i for i, name in enumerate(names)}
        unknown = [v for v in define if v not in index]
        if unknown:
            msg = f"define names {unknown}, which pattern {pattern!r} does not use (its variables: {list(names)})"
            raise PlanError(msg)
        clash = [m for m in measures if m in partition_by]
        if clash:
            msg = f"measures {clash} have the names of partition_by columns; rename them"
            raise PlanError(msg)
        if rows_per_match == "all":
            clash = [m for m in measures if m in schema]
            if clash:
                msg = (
                    f"measures {clash} have the names of input columns, which rows_per_match="
                    "'all' outputs beside them; rename them"
                )
                raise PlanError(msg)

        references: dict[str, Reference] = {}

        def read(expr: Any, where: str) -> tuple[list[str], list[Reference]]:
            if not isinstance(expr, pl.Expr):
                msg = f"{where} must be a Polars expression; got {expr!r}"
                raise PlanError(msg)
            try:
                check_row_wise("match_recognize", [expr])
            except PlanError:
                msg = (
                    f"{where} ({expr}) reads other rows of the frame; DEFINE and MEASURES are "
                    "evaluated row by row: use ms.pattern.sum('A.price'), ms.pattern.prev('price'), "
                    "... for aggregates and navigation"
                )
                raise PlanError(msg) from None
            columns, refs = [], []
            for name in expr.meta.root_names():
                ref = parse_reference(name, names, schema, where)
                if ref is None:
                    columns.append(name)
                else:
                    refs.append(references.setdefault(ref.name, ref))
            return columns, refs

        conditions: dict[int, _Condition] = {}
        row_local: dict[str, Reference] = {}
        used: dict[str, None] = dict.fromkeys([*partition_by, order_by])
        for var, expr in define.items():
            columns, refs = read(expr, f"define[{var!r}]")
            measuring = [r.name for r in refs if r.function in ("classifier", "match_number")]
            if measuring:
                msg = (
                    f"define[{var!r}] reads {measuring[0]}, which only MEASURES have (in "
                    "DEFINE the variable is the one being defined, and the match has no "
                    "number until it is found)"
                )
                raise PlanError(msg)
            local = [r for r in refs if r.row_local]
            row_local.update((r.name, r) for r in local)
            conditions[index[var]] = _Condition(
                expr=expr,
                mapping_refs=tuple(r for r in refs if not r.row_local),
                columns=tuple(dict.fromkeys([*columns, *(r.name for r in local)])),
            )
            used.update(dict.fromkeys(columns))
        measure_columns: dict[str, None] = {}
        measure_refs: dict[str, Reference] = {}
        for name, expr in measures.items():
            columns, refs = read(expr, f"measures[{name!r}]")
            ahead = [r.name for r in refs if r.function == "next"]
            if ahead:
                msg = (
                    f"measures[{name!r}] reads {ahead[0]}: next(...) is for DEFINE, where it "
                    "reads the rows after the row being tried; a measure reads the match's rows"
                )
                raise PlanError(msg)
            measure_columns.update(dict.fromkeys(columns))
            measure_refs.update((r.name, r) for r in refs)
        used.update(measure_columns)
        used.update((r.column, None) for r in references.values() if r.column is not None)
        dtypes = {name: ref.dtype(schema) for name, ref in references.items()}
        planning = pl.DataFrame(schema={**schema, **dtypes})
        for var, expr in define.items():
            try:
                dtype = planning.select(expr).dtypes[0]
            except pl.exceptions.PolarsError as exc:
                msg = f"define[{var!r}] ({expr}) cannot be evaluated: {exc}"
                raise PlanError(msg) from exc
            if not isinstance(dtype, pl.Boolean | pl.Null):
                msg = f"define[{var!r}] must be a boolean condition; {expr} is {dtype}"
                raise PlanError(msg)
        rest = [c for c in schema if c not in (*partition_by, order_by)]
        if rows_per_match == "all":
            used.update(dict.fromkeys(schema))  # every input column is in the output
        try:
            measured = planning.select(
                *partition_by,
                *([order_by] if rows_per_match == "all" else []),
                *(expr.alias(name) for name, expr in measures.items()),
                *(rest if rows_per_match == "all" else []),
            )
        except pl.exceptions.PolarsError as exc:
            msg = f"measures cannot be evaluated: {exc}"
            raise PlanError(msg) from exc
        skip, skip_variable = _after_match(after_match, index)
        prevs = [r.offset for r in references.values() if r.function == "prev"]
        nexts = [r.offset for r in row_local.values() if r.function == "next"]
        return cls(
            tree=tree,
            program=program,
            conditions=conditions,
            row_local_refs=tuple(row_local.values()),
            measure_refs=tuple(measure_refs.values()),
            measure_columns=tuple(measure_columns),
            state_columns=tuple(c for c in schema if c in used),
            max_prev=max(prevs, default=0),
            output_schema=measured.schema,
            skip=skip,
            skip_variable=skip_variable,
            reference_dtypes=dtypes,
            rows_per_match=rows_per_match,
            max_next=max(nexts, default=0),
        )

    @property
    def memo(self) -> bool:
        """Whether every DEFINE depends on the row alone (the matcher may memoise)."""
        return all(c.row_local for c in self.conditions.values())

    def has_unbounded_quantifier(self) -> bool:
        def walk(node: PatternNode) -> bool:
            if isinstance(node, Quantified):
                return node.high is None or walk(node.node)
            if isinstance(node, Concatenation):
                return any(walk(child) for child in node.items)
            if isinstance(node, Alternation):
                return any(walk(child) for child in node.options)
            return False

        return walk(self.tree)


def _after_match(after_match: str, index: Mapping[str, int]) -> tuple[str, int | None]:
    if after_match in ("skip_past_last_row", "skip_to_next_row"):
        return after_match, None
    head, _, var = after_match.partition(":")
    if head in ("skip_to_first", "skip_to_last") and var:
        if var not in index:
            msg = f"after_match={after_match!r} names variable {var!r}, which the pattern does not use (its variables: {list(index)})"
            raise PlanError(msg)
        return head, index[var]
    msg = (
        "after_match must be 'skip_past_last_row', 'skip_to_next_row', "
        f"'skip_to_first:VAR' or 'skip_to_last:VAR'; got {after_match!r} instead"
    )
    raise PlanError(msg)
