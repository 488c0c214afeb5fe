"""What lowering a query works on: a :class:`Relation` (a frame and the columns it shows)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from sqlglot import exp

from microstream.api.frame import StreamFrame
from microstream.sql.expressions import Field, Scope
from microstream.sql.windows import Window

__all__ = ["Frame", "Rank", "Relation", "all_of", "and_operands", "fields_of", "fresh"]

Frame = StreamFrame | pl.LazyFrame


@dataclass(frozen=True)
class Rank:
    """``ROW_NUMBER() OVER (PARTITION BY ... ORDER BY ...) AS rn``, waiting for the outer
    query's ``rn = 1`` (deduplication) or ``rn <= N`` (window Top-N: ``windowed``)."""

    column: str
    partition: tuple[str, ...]
    order: tuple[str, ...]
    descending: tuple[bool, ...]
    node: exp.Expr
    windowed: bool = False


@dataclass(frozen=True)
class Relation:
    """A lowered ``FROM`` item or query: its frame and the columns it shows."""

    frame: Frame
    scope: Scope
    window: Window | None = None
    rank: Rank | None = None

    @property
    def is_stream(self) -> bool:
        return isinstance(self.frame, StreamFrame)


def and_operands(node: exp.Expr | None) -> list[exp.Expr]:
    """The operands of a chain of ``AND`` (``WHERE a AND (b AND c)``: a, b, c)."""
    if node is None:
        return []
    if isinstance(node, exp.And):
        return [*and_operands(node.this), *and_operands(node.expression)]
    if isinstance(node, exp.Paren) and isinstance(node.this, exp.And):
        return and_operands(node.this)
    return [node]


def fields_of(frame: Frame, qualifier: str | None) -> Scope:
    """Every column of ``frame``, visible as ``qualifier.column``."""
    return Scope(tuple(Field(qualifier, c, c) for c in frame.collect_schema().names()))


def fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name_1``, ``name_2``, ... : the first not in ``taken`` (then taken)."""
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    taken.add(candidate)
    return candidate


def all_of(predicates: list[pl.Expr]) -> pl.Expr:
    """The conjunction of ``predicates`` (SQL's AND: null where undecided)."""
    out = predicates[0]
    for p in predicates[1:]:
        out = out & p
    return out
