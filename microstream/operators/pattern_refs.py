"""Navigation and aggregates in ``match_recognize``'s DEFINE and MEASURES.

SQL's ``FIRST(A.price)``, ``LAST(A.price)``, ``PREV(price, 2)``, ``COUNT(A.*)``,
``SUM(A.price)``, ... are written in Python as columns with those names, which the
helpers of :mod:`microstream.api.pattern` build (``pattern.first("A.price")`` is
``pl.col("first(A.price)")``), so DEFINE and MEASURES stay ordinary Polars
expressions. This module reads those names back (:func:`parse_reference`) and
computes their values for a mapping of rows to variables (:func:`reference_values`).

The values follow SQL:2016's *running* semantics in DEFINE (the rows mapped so far,
the current row included) and its *final* semantics in MEASURES (ONE ROW PER MATCH:
every row of the match; a plain column is the match's last row).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import polars as pl

from microstream.exceptions import PlanError

__all__ = [
    "FUNCTIONS",
    "Reference",
    "parse_reference",
    "reference_name",
    "reference_values",
]

FUNCTIONS: Final = (
    "first", "last", "prev", "next", "count", "sum", "avg", "min", "max",
    "classifier", "match_number",
)  # fmt: skip
_NAME = re.compile(r"^(first|last|prev|next|count|sum|avg|min|max)\((.+?)(?:, (\d+))?\)$")
_NULLARY = ("classifier", "match_number")
"""``classifier()`` (the variable of the current row) and ``match_number()`` (the
match's number in its partition, from 1) read no column."""


def reference_name(function: str, argument: str, offset: int | None = None) -> str:
    """The column name that stands for ``function(argument[, offset])``.

    Examples
    --------
    >>> reference_name("prev", "price", 2)
    'prev(price, 2)'
    """
    return f"{function}({argument})" if offset is None else f"{function}({argument}, {offset})"


@dataclass(frozen=True)
class Reference:
    """One navigation or aggregate reference: ``function`` over ``column`` of the rows
    mapped to ``variable`` (None: every row of the match)."""

    name: str
    function: str
    variable: str | None
    column: str | None
    """None only for ``count`` of rows (``count(A.*)``, ``count(*)``); ``count(A.col)``
    counts the rows of ``A`` whose ``col`` is not null, as SQL's ``COUNT(A.col)``."""
    offset: int = 0
    """``prev``'s and ``next``'s offset."""

    @property
    def row_local(self) -> bool:
        """Whether its value in DEFINE depends on the current row's position only (not on
        which rows were mapped to which variable): ``prev(col, n)``, ``next(col, n)`` and
        ``last(col)``."""
        return self.variable is None and self.function in ("prev", "next", "last")

    def dtype(self, schema: pl.Schema) -> pl.DataType:
        """The dtype of its values, as Polars' aggregate of that name gives."""
        if self.function in ("count", "match_number"):
            return pl.Int64()
        if self.function == "classifier":
            return pl.String()
        assert self.column is not None
        if self.function in ("sum", "avg"):
            expr = (
                pl.col(self.column).sum() if self.function == "sum" else pl.col(self.column).mean()
            )
            return pl.DataFrame(schema={self.column: schema[self.column]}).select(expr).dtypes[0]
        return schema[self.column]


def parse_reference(
    name: str, variables: Sequence[str], schema: pl.Schema, where: str
) -> Reference | None:
    """The reference a column name of a DEFINE or MEASURES expression stands for; None for
    an input column.

    ``"first(A.price)"`` is ``first`` of ``price`` over the rows of variable ``A`` when
    ``A`` is a pattern variable, else ``first`` of a column named ``A.price``.

    Raises
    ------
    PlanError
        The name looks like a reference but names no column or variable, or an
        offset where none is taken.

    Examples
    --------
    >>> schema = pl.Schema({"price": pl.Int64})
    >>> parse_reference("sum(A.price)", ["A", "B"], schema, "measure 'total'")
    Reference(name='sum(A.price)', function='sum', variable='A', column='price', offset=0)
    >>> parse_reference("price", ["A"], schema, "DEFINE of A") is None
    True
    """
    if name in schema:
        return None
    if name.endswith("()") and name[:-2] in _NULLARY:
        return Reference(name, name[:-2], None, None)
    found = _NAME.match(name)
    if found is None:
        msg = (
            f"{where} reads column {name!r}, which the input does not have (columns: "
            f"{list(schema)}); navigation and aggregates are written with ms.pattern's "
            "helpers, e.g. ms.pattern.first('A.price')"
        )
        raise PlanError(msg)
    function, argument, offset_text = found.groups()
    if offset_text is not None and function not in ("prev", "next"):
        msg = f"{where}: {name!r} takes no offset; only prev(column, n) and next(column, n) do"
        raise PlanError(msg)
    navigates = function in ("prev", "next")
    offset = int(offset_text) if offset_text is not None else (1 if navigates else 0)
    variable: str | None = None
    column = argument
    head, dot, tail = argument.partition(".")
    if dot and head in variables and argument not in schema:
        variable, column = head, tail
    if function == "count" and column == "*":
        return Reference(name, function, variable, None, offset)
    if function == "next" and variable is not None:
        msg = (
            f"{where}: {name!r}: next reads the rows after the current row, of no variable "
            "(they are not mapped yet); write ms.pattern.next('column', n)"
        )
        raise PlanError(msg)
    if column not in schema:
        known = f"; pattern variables are {list(variables)}" if dot else ""
        msg = f"{where}: {name!r} reads column {column!r}, which the input does not have{known}"
        raise PlanError(msg)
    if function in ("sum", "avg") and not schema[column].is_numeric():
        msg = (
            f"{where}: {name!r}: {function} needs a numeric column; {column!r} is {schema[column]}"
        )
        raise PlanError(msg)
    return Reference(name, function, variable, column, offset)


def reference_values(
    references: Sequence[Reference],
    data: Mapping[str, Sequence[Any]],
    start: int,
    labels: Sequence[int],
    variable_index: Mapping[str, int],
    match_number: int | None = None,
) -> list[Any]:
    """The value of each reference for one mapping of rows to variables.

    Parameters
    ----------
    references
        What to compute.
    data
        The partition's rows, column by column, in event-time order (rows before
        ``start`` included: ``prev`` reads them).
    start
        The row the match starts at.
    labels
        The variable (index in ``variable_index``) of rows ``start``,
        ``start + 1``, ...; the last one is the current row (DEFINE) or the match's
        last row (MEASURES).
    variable_index
        Variable names to their indexes.
    match_number
        The match's number in its partition (``match_number()``; MEASURES only).

    Returns
    -------
    list
        One value per reference. Aggregates over no non-null values are null (as in
        SQL), ``count`` of no rows (or no non-null values) is 0; ``prev`` before the partition's first row is null.

    Examples
    --------
    >>> refs = [Reference("sum(A.x)", "sum", "A", "x"), Reference("prev(x, 1)", "prev", None, "x", 1)]
    >>> reference_values(refs, {"x": [5, 1, 2, 3]}, 1, [0, 1, 0], {"A": 0, "B": 1})
    [4, 2]
    """
    current = start + len(labels) - 1
    out: list[Any] = []
    for ref in references:
        if ref.variable is None:
            rows: Sequence[int] = range(start, current + 1)
        else:
            wanted = variable_index[ref.variable]
            rows = [start + i for i, label in enumerate(labels) if label == wanted]
        if ref.function == "count" and ref.column is None:
            out.append(len(rows))
            continue
        if ref.function == "classifier":
            names = {i: name for name, i in variable_index.items()}
            out.append(names[labels[-1]] if labels else None)
            continue
        if ref.function == "match_number":
            out.append(match_number)
            continue
        assert ref.column is not None
        column = data[ref.column]
        if ref.function == "count":
            out.append(sum(1 for i in rows if column[i] is not None))
            continue
        if ref.function == "first":
            out.append(column[rows[0]] if rows else None)
        elif ref.function == "last":
            out.append(column[rows[-1]] if rows else None)
        elif ref.function == "prev":
            at = (rows[-1] if rows else -1) - ref.offset
            out.append(column[at] if rows and at >= 0 else None)
        else:
            values = [column[i] for i in rows if column[i] is not None]
            if not values:
                out.append(None)
            elif ref.function == "sum":
                out.append(sum(values))
            elif ref.function == "avg":
                out.append(sum(values) / len(values))
            elif ref.function == "min":
                out.append(min(values))
            else:
                out.append(max(values))
    return out
