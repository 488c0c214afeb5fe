"""Navigation and aggregates for ``StreamFrame.match_recognize``'s DEFINE and MEASURES.

SQL writes ``FIRST(A.price)``, ``PREV(price, 2)``, ``COUNT(A.*)``, ``AVG(B.price)``;
here each is a function returning a Polars column expression, so a condition is
ordinary Polars: ``pl.col("price") > pattern.first("A.price")``. The column it
stands for is named as SQL writes it (``first(A.price)``), which ``explain()`` shows.

An argument ``"A.price"`` means column ``price`` over the rows mapped to pattern
variable ``A``; ``"price"`` means every row of the match so far. In DEFINE the
values are *running* (the rows mapped up to and including the current row, which is
being tried as the variable the condition defines); in MEASURES they are *final*
(every row of the match). A plain ``pl.col("price")`` is the current row in DEFINE
and the match's last row in MEASURES.

Examples
--------
>>> import microstream as ms
>>> str(ms.pattern.first("A.price"))
'col("first(A.price)")'
"""

from __future__ import annotations

import polars as pl

from microstream.operators.pattern_refs import reference_name

__all__ = [
    "avg",
    "classifier",
    "count",
    "first",
    "last",
    "match_number",
    "max",
    "min",
    "next",
    "prev",
    "sum",
]


def first(column: str) -> pl.Expr:
    """``FIRST(A.col)``: ``col`` at the first row mapped to ``A`` (``"col"``: the match's
    first row); null when no row is mapped to ``A`` yet.

    Examples
    --------
    >>> import polars as pl
    >>> from microstream import pattern
    >>> str(pl.col("price") > pattern.first("A.price"))
    '[(col("price")) > (col("first(A.price)"))]'
    """
    return pl.col(reference_name("first", column))


def last(column: str) -> pl.Expr:
    """``LAST(A.col)``: ``col`` at the last row mapped to ``A`` so far (``"col"``: the
    current row in DEFINE, the match's last row in MEASURES).

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.last("B.price").meta.output_name()
    'last(B.price)'
    """
    return pl.col(reference_name("last", column))


def prev(column: str, n: int = 1) -> pl.Expr:
    """``PREV(col, n)``: ``col`` ``n`` rows before the current row (DEFINE) or the match's
    last row (MEASURES) in the partition's event-time order, possibly before the match;
    ``"A.col"``: ``n`` rows before the last row mapped to ``A``. Null before the
    partition's first row.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.prev("price", 2).meta.output_name()
    'prev(price, 2)'
    """
    if not isinstance(n, int) or n < 1:
        msg = f"prev(column, n) needs a positive integer n; got {n!r} instead"
        raise ValueError(msg)
    return pl.col(reference_name("prev", column, n))


def next(column: str, n: int = 1) -> pl.Expr:
    """``NEXT(col, n)``: ``col`` ``n`` rows after the current row in the partition's
    event-time order (DEFINE only). The condition waits until that row is final (the
    watermark passed it); at the end of the input (a flush) it is null.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.next("price").meta.output_name()
    'next(price, 1)'
    """
    if not isinstance(n, int) or n < 1:
        msg = f"next(column, n) needs a positive integer n; got {n!r} instead"
        raise ValueError(msg)
    return pl.col(reference_name("next", column, n))


def classifier() -> pl.Expr:
    """``CLASSIFIER()``: the pattern variable of the current row (MEASURES only): of the
    match's last row with ONE ROW PER MATCH, of each row with ALL ROWS PER MATCH.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.classifier().meta.output_name()
    'classifier()'
    """
    return pl.col("classifier()")


def match_number() -> pl.Expr:
    """``MATCH_NUMBER()``: the match's number in its partition, 1 for the first (MEASURES
    only); kept in the state across batches and restarts.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.match_number().meta.output_name()
    'match_number()'
    """
    return pl.col("match_number()")


def count(variable: str | None = None) -> pl.Expr:
    """``COUNT(A.*)``: how many rows are mapped to ``variable`` (None: rows of the match);
    ``"A.col"``: ``COUNT(A.col)``, how many of them hold a non-null ``col``.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.count("A").meta.output_name(), pattern.count().meta.output_name()
    ('count(A.*)', 'count(*)')
    >>> pattern.count("A.price").meta.output_name()
    'count(A.price)'
    """
    if variable is None:
        return pl.col(reference_name("count", "*"))
    return pl.col(reference_name("count", variable if "." in variable else f"{variable}.*"))


def sum(column: str) -> pl.Expr:
    """``SUM(A.col)``: the sum of ``col`` over the rows mapped to ``A``; null when they
    hold no value (as in SQL).

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.sum("A.amount").meta.output_name()
    'sum(A.amount)'
    """
    return pl.col(reference_name("sum", column))


def avg(column: str) -> pl.Expr:
    """``AVG(A.col)``: the mean of ``col`` over the rows mapped to ``A``.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.avg("price").meta.output_name()
    'avg(price)'
    """
    return pl.col(reference_name("avg", column))


def min(column: str) -> pl.Expr:
    """``MIN(A.col)``: the smallest ``col`` over the rows mapped to ``A``.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.min("A.price").meta.output_name()
    'min(A.price)'
    """
    return pl.col(reference_name("min", column))


def max(column: str) -> pl.Expr:
    """``MAX(A.col)``: the largest ``col`` over the rows mapped to ``A``.

    Examples
    --------
    >>> from microstream import pattern
    >>> pattern.max("A.price").meta.output_name()
    'max(A.price)'
    """
    return pl.col(reference_name("max", column))
