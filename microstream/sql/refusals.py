"""What microstream SQL refuses, and the one way it says so.

Every construct the lowering does not map onto an operator with the same
semantics is refused at plan time, before a query starts, with a
:class:`~microstream.PlanError` that names the construct, its line and column
in the statement, and the supported alternative where one exists: a query never
runs with a silently different result. :data:`REFUSED` lists the constructs
refused by name (the README's table of refusals is this list).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from microstream.exceptions import PlanError

if TYPE_CHECKING:
    from sqlglot import exp

__all__ = ["REFUSED", "position", "refuse"]

REFUSED: dict[str, str] = {
    "ORDER BY": "a stream has no end to sort up to; sort the sink's output when you read it",
    "LIMIT": "a stream has no end to count rows up to; read the sink's output with a limit",
    "OVER": "OVER aggregations are not in this version; use GROUP BY with a window TVF, or "
    "ROW_NUMBER() ... = 1 for deduplication",
    "UNION": "UNION (distinct) is not supported; use UNION ALL, then SELECT DISTINCT",
    "INTERSECT": "INTERSECT is not supported on streams; use a join",
    "EXCEPT": "EXCEPT is not supported on streams; use an anti join in the Python API",
    "outer join of two streams": "only inner joins of two streams in SQL; use the Python "
    "join(other, how=..., within=...) for outer joins",
    "subquery in an expression": "only subqueries in FROM; join with the subquery instead",
    "ROLLUP/CUBE/GROUPING SETS": "group by one set of keys per query; UNION ALL several",
    "keep-first by event time": "unique() keeps the first row by arrival; order by a "
    "PROCTIME() column for that, as Flink's processing-time deduplication",
    "keep-last deduplication": "ORDER BY ... DESC emits updates; keep the first row (ASC)",
    "CLASSIFIER() in DEFINE": "in DEFINE the row's variable is the one being defined; "
    "CLASSIFIER() is for MEASURES",
    "MATCH_NUMBER() in DEFINE": "a match has no number until it is found; MATCH_NUMBER() is "
    "for MEASURES",
    "MATCH_ROWTIME()": "the output has no time attribute; measure LAST(ts), the event time of "
    "the match's last row",
    "FINAL in ALL ROWS PER MATCH": "ALL ROWS PER MATCH measures are RUNNING (the rows up to "
    "each row); measure the final value with ONE ROW PER MATCH and join it back",
    "NEXT in MEASURES": "a measure reads the match's rows; NEXT is for DEFINE, where it reads "
    "the rows after the row being tried",
    "NEXT of another pattern variable": "the rows after the current one are mapped to no "
    "variable yet; write NEXT(col) or NEXT(A.col) in A's own DEFINE",
    "logical offset": "FIRST(A.col, n) and LAST(A.col, n) are not supported; FIRST(A.col), "
    "LAST(A.col) and the physical offset PREV(A.col, n) are",
    "MATCH_RECOGNIZE ORDER BY a column without a watermark": "rows are matched in event-time "
    "order once the watermark passes them; ORDER BY the column the table's watermark is on "
    "(WATERMARK FOR ts AS ... in CREATE TABLE, or with_watermark)",
}
"""Constructs refused by name, with the reason or the supported alternative."""


def position(node: exp.Expr) -> tuple[int, int] | None:
    """Line and (1-based) column where ``node`` starts in its statement, if sqlglot knows."""
    best: tuple[int, int, int] | None = None
    for child in node.walk():
        meta = child.meta if child._meta is not None else None  # avoid creating empty metas
        if not meta or "line" not in meta:
            continue
        start, end = meta.get("start", 0), meta.get("end", 0)
        line, col = meta["line"], meta["col"] - (end - start)
        if best is None or start < best[0]:
            best = (start, line, col)
    return None if best is None else (best[1], best[2])


def refuse(
    node: exp.Expr | None,
    construct: str,
    *,
    reason: str | None = None,
    alternative: str | None = None,
) -> PlanError:
    """The error refusing ``construct`` at ``node``: raise what this returns.

    Without ``reason`` and ``alternative``, :data:`REFUSED` gives the explanation.

    Examples
    --------
    >>> from microstream.sql.dialect import parse
    >>> select = parse("SELECT a\\nFROM t ORDER BY a")[0]
    >>> print(refuse(select.args["order"], "ORDER BY"))
    ORDER BY is not supported on a stream (line 2, column 17): a stream has no end to sort up to; sort the sink's output when you read it
    """
    where = position(node) if node is not None else None
    at = f" (line {where[0]}, column {where[1]})" if where else ""
    explanation = "; ".join(p for p in (reason, alternative) if p) or REFUSED.get(construct, "")
    msg = f"{construct} is not supported on a stream{at}"
    if explanation:
        msg += f": {explanation}"
    return PlanError(msg)
