"""Incremental aggregation: split Polars aggregation expressions into mergeable partials.

An aggregation expression decomposes when every aggregate in it is one of
``len``, ``count``, ``null_count``, ``sum``, ``min``, ``max``, ``mean``,
``var``/``std``, ``first``/``last``, ``any``/``all`` over a row-wise input,
combined by any row-wise expression (``pl.col("a").sum() / pl.len()``). Then
the state per group is a few partial columns, merged batch after batch, and the
user's expression is evaluated at emit time over the finalised aggregates. Any
other expression (median, quantile, n_unique, a UDF) keeps the group's rows and
is evaluated over them at emit time. Either way the result equals Polars'
aggregation over all of the group's rows.

The expression tree is read through Polars' own serialisation
(``Expr.meta.serialize``) and parts are rebuilt with ``Expr.deserialize``; an
expression that does not survive the round trip simply keeps rows.
"""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from typing import Any

import polars as pl

__all__ = ["AggregateSpec", "Primitive"]

ORDER_T, ORDER_S = "__ot", "__os"
"""Columns that order rows for first/last: event time (0 without time), then arrival."""
_ORDER = [ORDER_T, ORDER_S]


@dataclass(frozen=True)
class Primitive:
    """One decomposable aggregate over a row-wise input expression."""

    kind: str
    input: pl.Expr | None
    name: str
    ddof: int = 1

    def state_columns(self) -> list[str]:
        n = self.name
        return {
            "mean": [f"{n}_sum", f"{n}_cnt"],
            "var": [f"{n}_n", f"{n}_mean", f"{n}_m2"],
            "std": [f"{n}_n", f"{n}_mean", f"{n}_m2"],
            "first": [f"{n}_val", f"{n}_ot", f"{n}_os"],
            "last": [f"{n}_val", f"{n}_ot", f"{n}_os"],
        }.get(self.kind, [n])

    def partial(self) -> list[pl.Expr]:
        """Aggregations over raw rows giving this primitive's state columns."""
        e, n = self.input, self.name
        if self.kind == "len":
            return [pl.len().cast(pl.Int64).alias(n)]
        assert e is not None
        if self.kind in ("sum", "min", "max"):
            return [getattr(e, self.kind)().alias(n)]
        if self.kind == "count":
            return [e.count().cast(pl.Int64).alias(n)]
        if self.kind == "null_count":
            return [e.null_count().cast(pl.Int64).alias(n)]
        if self.kind in ("any", "all"):
            return [getattr(e, self.kind)(ignore_nulls=True).alias(n)]
        if self.kind == "mean":
            return [
                e.cast(pl.Float64).sum().alias(f"{n}_sum"),
                e.count().cast(pl.Int64).alias(f"{n}_cnt"),
            ]
        if self.kind in ("var", "std"):
            x = e.cast(pl.Float64)
            return [
                x.count().cast(pl.Int64).alias(f"{n}_n"),
                x.mean().alias(f"{n}_mean"),
                ((x - x.mean()) ** 2).sum().alias(f"{n}_m2"),
            ]
        if self.kind in ("first", "last"):
            pick = self.kind
            return [
                getattr(e.sort_by(_ORDER), pick)().alias(f"{n}_val"),
                getattr(pl.col(ORDER_T).sort_by(_ORDER), pick)().alias(f"{n}_ot"),
                getattr(pl.col(ORDER_S).sort_by(_ORDER), pick)().alias(f"{n}_os"),
            ]
        raise AssertionError(self.kind)  # pragma: no cover

    def merge(self) -> list[pl.Expr]:
        """Aggregations over partial rows of one group giving merged partials."""
        n = self.name
        if self.kind in ("len", "count", "null_count", "sum"):
            return [pl.col(n).sum()]
        if self.kind in ("min", "max"):
            return [getattr(pl.col(n), self.kind)()]
        if self.kind in ("any", "all"):
            return [getattr(pl.col(n), self.kind)(ignore_nulls=True)]
        if self.kind == "mean":
            return [pl.col(f"{n}_sum").sum(), pl.col(f"{n}_cnt").sum()]
        if self.kind in ("var", "std"):
            cnt, mean, m2 = pl.col(f"{n}_n"), pl.col(f"{n}_mean").fill_null(0.0), pl.col(f"{n}_m2")
            total = cnt.sum()
            weighted = (cnt * mean).sum()
            merged_mean = pl.when(total > 0).then(weighted / total)
            # Chan et al.: M2 = sum(M2_i + n_i * mean_i^2) - n * mean^2, clipped at 0.
            merged_m2 = (m2.fill_null(0.0) + cnt * mean**2).sum() - weighted**2 / total
            return [
                total.alias(f"{n}_n"),
                merged_mean.alias(f"{n}_mean"),
                pl.when(total > 0).then(merged_m2.clip(lower_bound=0.0)).alias(f"{n}_m2"),
            ]
        if self.kind in ("first", "last"):
            pick, order = self.kind, [f"{n}_ot", f"{n}_os"]
            return [getattr(pl.col(c).sort_by(order), pick)() for c in self.state_columns()]
        raise AssertionError(self.kind)  # pragma: no cover

    def finalize(self) -> pl.Expr:
        """The aggregate's value from its (merged) state columns."""
        n = self.name
        if self.kind in ("len", "count", "null_count", "sum", "min", "max", "any", "all"):
            return pl.col(n)
        if self.kind == "mean":
            cnt = pl.col(f"{n}_cnt")
            return pl.when(cnt > 0).then(pl.col(f"{n}_sum") / cnt).alias(n)
        if self.kind in ("var", "std"):
            dof = pl.col(f"{n}_n") - self.ddof
            var = pl.when(dof > 0).then(pl.col(f"{n}_m2") / dof)
            return (var.sqrt() if self.kind == "std" else var).alias(n)
        if self.kind in ("first", "last"):
            return pl.col(f"{n}_val").alias(n)
        raise AssertionError(self.kind)  # pragma: no cover


@dataclass(frozen=True)
class Decomposed:
    """One user expression: partials and the rewritten expression, or rows."""

    output_name: str
    original: pl.Expr
    primitives: tuple[Primitive, ...] = ()
    rewritten: pl.Expr | None = None

    @property
    def incremental(self) -> bool:
        return self.rewritten is not None

    def strategy(self) -> str:
        if self.rewritten is None:
            return f"{self.output_name}: keeps rows, evaluated at emit ({self.original})"
        parts = ", ".join(p.kind for p in self.primitives)
        return f"{self.output_name}: incremental partials [{parts}]"


class AggregateSpec:
    """The aggregation expressions of one operator, each decomposed or kept as rows.

    Examples
    --------
    >>> import polars as pl
    >>> spec = AggregateSpec([pl.col("v").sum(), (pl.col("v").max() - pl.col("v").min()).alias("range"),
    ...                       pl.col("v").median()])
    >>> for line in spec.strategies():
    ...     print(line)
    v: incremental partials [sum]
    range: incremental partials [max, min]
    v: keeps rows, evaluated at emit (col("v").median())
    """

    def __init__(self, exprs: list[pl.Expr]):
        self.items: list[Decomposed] = []
        counter = [0]
        for expr in exprs:
            self.items.append(_decompose(expr, counter))

    @property
    def primitives(self) -> list[Primitive]:
        return [p for item in self.items for p in item.primitives]

    @property
    def buffered(self) -> list[Decomposed]:
        return [item for item in self.items if not item.incremental]

    @property
    def needs_rows(self) -> bool:
        return bool(self.buffered)

    def buffered_columns(self) -> list[str]:
        """Input columns the row-keeping aggregates read."""
        names: list[str] = []
        for item in self.buffered:
            for name in item.original.meta.root_names():
                if name not in names:
                    names.append(name)
        return names

    def partial_exprs(self) -> list[pl.Expr]:
        return [e for p in self.primitives for e in p.partial()]

    def merge_exprs(self) -> list[pl.Expr]:
        return [e for p in self.primitives for e in p.merge()]

    def state_columns(self) -> list[str]:
        return [c for p in self.primitives for c in p.state_columns()]

    def finalize_exprs(self) -> list[pl.Expr]:
        return [p.finalize() for p in self.primitives]

    def strategies(self) -> list[str]:
        return [item.strategy() for item in self.items]


# -- reading the expression tree -------------------------------------------------------

_SIMPLE_AGGS = {
    "Sum": "sum",
    "Min": "min",
    "Max": "max",
    "Mean": "mean",
    "First": "first",
    "Last": "last",
}
_ROW_DEPENDENT_KEYS = {"Agg", "Over", "Sort", "SortBy", "Slice", "Gather", "Filter", "Window"}


def _decompose(expr: pl.Expr, counter: list[int]) -> Decomposed:
    name = expr.meta.output_name()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the json format is deprecated, still exact
            tree = json.loads(expr.meta.serialize(format="json"))
    except Exception:
        return Decomposed(name, expr)
    primitives: list[Primitive] = []
    try:
        rewritten_tree = _rewrite(tree, primitives, counter, inside_agg=False)
        rewritten = _deserialize(rewritten_tree)
        rewritten = rewritten.alias(name)
    except _NotDecomposableError:
        return Decomposed(name, expr)
    if not primitives:
        return Decomposed(name, expr)  # no aggregate at all: Polars' list semantics, keep rows
    return Decomposed(name, expr, tuple(primitives), rewritten)


class _NotDecomposableError(Exception):
    pass


def _rewrite(node: Any, primitives: list[Primitive], counter: list[int], inside_agg: bool) -> Any:
    if node == "Len":
        return _register("len", None, primitives, counter)
    if isinstance(node, list):
        return [_rewrite(x, primitives, counter, inside_agg) for x in node]
    if not isinstance(node, dict):
        return node
    if "Column" in node or "Columns" in node or "Selector" in node or "Nth" in node:
        raise _NotDecomposableError  # a column outside any aggregate gives a list per group
    if "Literal" in node:
        return node
    if "Agg" in node:
        agg = node["Agg"]
        ((kind, body),) = agg.items()
        if kind in _SIMPLE_AGGS:
            inner = body["input"] if isinstance(body, dict) and "input" in body else body
            return _register(_SIMPLE_AGGS[kind], _row_wise(inner), primitives, counter)
        if kind == "Count":
            if body.get("include_nulls"):
                return _register("len_of", _row_wise(body["input"]), primitives, counter)
            return _register("count", _row_wise(body["input"]), primitives, counter)
        if kind in ("Var", "Std"):
            inner, ddof = body
            return _register(kind.lower(), _row_wise(inner), primitives, counter, ddof=int(ddof))
        raise _NotDecomposableError
    if "Function" in node:
        fn = node["Function"]
        function = fn.get("function")
        if function == "NullCount":
            return _register("null_count", _row_wise(fn["input"][0]), primitives, counter)
        if isinstance(function, dict) and "Boolean" in function:
            boolean = function["Boolean"]
            if isinstance(boolean, dict) and ("Any" in boolean or "All" in boolean):
                kind = "any" if "Any" in boolean else "all"
                if not boolean[kind.capitalize()].get("ignore_nulls", True):
                    raise _NotDecomposableError  # Kleene logic needs the null count too
                return _register(kind, _row_wise(fn["input"][0]), primitives, counter)
    if any(key in _ROW_DEPENDENT_KEYS for key in node):
        raise _NotDecomposableError
    return {key: _rewrite(value, primitives, counter, inside_agg) for key, value in node.items()}


def _register(
    kind: str, inner: pl.Expr | None, primitives: list[Primitive], counter: list[int], ddof: int = 1
) -> dict[str, str]:
    if kind == "len_of":  # count(include_nulls=True) is the group's length
        kind, inner = "len", None
    name = f"__agg{counter[0]}"
    counter[0] += 1
    primitives.append(Primitive(kind=kind, input=inner, name=name, ddof=ddof))
    return {"Column": name}


def _row_wise(tree: Any) -> pl.Expr:
    text = json.dumps(tree)
    if any(f'"{key}"' in text for key in _ROW_DEPENDENT_KEYS) or '"Len"' in text:
        raise _NotDecomposableError
    return _deserialize(tree)


def _deserialize(tree: Any) -> pl.Expr:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pl.Expr.deserialize(io.StringIO(json.dumps(tree)), format="json")
    except Exception as exc:
        raise _NotDecomposableError from exc
