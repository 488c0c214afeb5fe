"""Lowering a SQL query to StreamFrame verbs (or, over static frames only, LazyFrame verbs).

A query is lowered bottom up into a :class:`Relation`: a frame and the
:class:`~microstream.sql.expressions.Scope` of columns it makes visible.

1. ``FROM``: a registered table or view, a subquery, a window TVF
   (:mod:`microstream.sql.windows`), and joins (:mod:`microstream.sql.joins`:
   stream with static table, interval and window joins of two streams, two
   static frames); ``MATCH_RECOGNIZE`` after the table ->
   ``match_recognize`` (:mod:`microstream.sql.match_recognize`).
2. ``WHERE`` -> ``filter``; ``ROW_NUMBER() OVER (PARTITION BY k ORDER BY pt) = 1``
   over a subquery -> ``unique(subset=k)`` (keep first by arrival, so ``pt``
   must be a ``PROCTIME()`` column); ``ROW_NUMBER() OVER (PARTITION BY
   window_start, window_end ORDER BY ...) <= N`` -> ``group_by(window).top_k(N)``;
   ``ROW_NUMBER() OVER (PARTITION BY k ORDER BY ...) <= N`` (N > 1) ->
   ``group_by(k).top_k(N, rank=rn)``, a running Top-N in update mode.
3. ``GROUP BY`` -> ``group_by``, ``group_by_dynamic`` or ``group_by_session``;
   aggregate arguments are computed first as columns, so each aggregate is a
   plain ``pl.col(c).sum()``-like expression the engine folds incrementally;
   ``HAVING`` -> ``filter`` after it.
4. the SELECT list -> ``select``; ``DISTINCT`` -> ``unique()``; ``UNION ALL`` ->
   ``ms.concat``. ``ORDER BY``/``LIMIT`` only over static frames.

Over static frames only, the same lowering runs on ``pl.LazyFrame`` verbs (windows
assigned row by row): the batch result of the same text.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import polars as pl
from sqlglot import exp

from microstream.api.concat import concat
from microstream.api.frame import StreamFrame
from microstream.exceptions import PlanError
from microstream.plan.nodes import PlanNode
from microstream.plan.processing_time import ProcessingTimeNode
from microstream.sql.dialect import MatchRecognize
from microstream.sql.expressions import (
    AGGREGATES,
    ExpressionLowering,
    Field,
    Scope,
    sql_text,
)
from microstream.sql.joins import join_relations
from microstream.sql.match_recognize import lower_match_recognize
from microstream.sql.refusals import position, refuse
from microstream.sql.relation import (
    Frame,
    Rank,
    Relation,
    all_of,
    and_operands,
    fields_of,
    fresh,
)
from microstream.sql.windows import (
    LEGACY_PARTS,
    WINDOW_COLUMNS,
    Window,
    calendar_window,
    legacy_window,
    tvf_window,
    window_aggregate,
)

__all__ = ["Frame", "QueryLowering", "Relation"]


def _walk_plan(plan: PlanNode) -> list[PlanNode]:
    out, stack = [], [plan]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node.children())
    return out


class QueryLowering:
    """Lowers queries over ``tables`` (name -> StreamFrame or LazyFrame).

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.sql.dialect import parse
    >>> tables = {"t": pl.LazyFrame({"k": ["a", "b", "a"], "x": [1, 2, 3]})}
    >>> q = parse("SELECT k, SUM(x) AS total FROM t WHERE x > 1 GROUP BY k")[0]
    >>> QueryLowering(tables).query(q).frame.collect().sort("k").rows()
    [('a', 3), ('b', 2)]
    """

    def __init__(self, tables: Mapping[str, Frame]):
        self.tables = dict(tables)

    # -- tables ---------------------------------------------------------------------

    def table(self, name: str, node: exp.Expr) -> Frame:
        for key, frame in self.tables.items():
            if key.lower() == name.lower():
                return frame
        known = sorted(self.tables)
        where = position(node)
        at = f" (line {where[0]}, column {where[1]})" if where else ""
        msg = (
            f"SQL: no table {name!r}{at}; registered tables are {known}. Register one with "
            "SQLContext.register(name, frame), CREATE TABLE, or CREATE TEMPORARY VIEW"
        )
        raise PlanError(msg)

    # -- queries --------------------------------------------------------------------

    def query(self, node: exp.Expr) -> Relation:
        """The relation of a query (SELECT, UNION ALL, a parenthesized query)."""
        if isinstance(node, exp.Subquery):
            return self.query(node.this)
        if isinstance(node, exp.Union):
            return self._union(node)
        if isinstance(node, exp.Intersect):
            raise refuse(node, "INTERSECT")
        if isinstance(node, exp.Except):
            raise refuse(node, "EXCEPT")
        if isinstance(node, exp.Select):
            return self._select(node)
        raise refuse(node, f"statement {type(node).__name__.upper()} as a query")

    def _union(self, node: exp.Union) -> Relation:
        if node.args.get("distinct"):
            raise refuse(node, "UNION")
        left, right = self.query(node.this), self.query(node.expression)
        names = [f.name for f in left.scope.fields]
        right_names = right.frame.collect_schema().names()
        if len(names) != len(right_names):
            raise refuse(
                node,
                "UNION ALL of queries with different numbers of columns",
                reason=f"{len(names)} and {len(right_names)}",
            )
        rframe = right.frame
        if right_names != names:
            rframe = rframe.rename(dict(zip(right_names, names)))
        if left.is_stream != right.is_stream:
            raise refuse(
                node,
                "UNION ALL of a stream and a static table",
                alternative="join the static table to the stream instead",
            )
        if isinstance(left.frame, StreamFrame):
            assert isinstance(rframe, StreamFrame)
            frame: Frame = concat([left.frame, rframe])
        else:
            assert isinstance(rframe, pl.LazyFrame)
            frame = pl.concat([left.frame, rframe], how="vertical")
        return Relation(frame, fields_of(frame, None))

    def _select(self, select: exp.Select) -> Relation:
        saved = dict(self.tables)
        try:
            for cte in (select.args.get("with") or exp.With()).expressions:
                self.tables[cte.alias] = self.query(cte.this).frame
            return self._select_body(select)
        finally:
            self.tables = saved

    def _select_body(self, select: exp.Select) -> Relation:
        group = select.args.get("group")
        if group is not None and (
            any(group.args.get(k) for k in ("rollup", "cube", "grouping_sets"))
            or any(
                isinstance(g, (exp.Rollup, exp.Cube, exp.GroupingSets)) for g in group.expressions
            )
        ):
            raise refuse(group, "ROLLUP/CUBE/GROUPING SETS")
        where = select.args.get("where")
        conjuncts = and_operands(where.this if where is not None else None)
        source = select.args.get("from_") or select.args.get("from")
        if source is None:
            rel = Relation(pl.LazyFrame({"__one": [1]}), Scope(()))
        else:
            rel, conjuncts = self._from(source.this, select.args.get("joins") or [], conjuncts)
        match = select.args.get("match")
        if match is not None:
            rel = self._match_recognize(rel, match, select)
        if rel.rank is not None:
            rel, conjuncts = self._deduplicate(rel, conjuncts, select)
        frame = rel.frame
        if conjuncts:
            lowering = ExpressionLowering(rel.scope, frame.collect_schema())
            predicate = all_of([lowering.lower(c) for c in conjuncts])
            frame = frame.filter(predicate)
        rel = replace(rel, frame=frame)
        items = self._expand_stars(select, rel.scope)
        has_aggregates = (
            any(item.find(*AGGREGATES) is not None for item in items)
            or select.args.get("having") is not None
        )
        ranked = [i for i in items if isinstance(i.unalias(), exp.Window)]
        if ranked:
            return self._ranked(rel, items, ranked, select)
        if group is not None or has_aggregates:
            out = self._aggregate(rel, items, select)
        else:
            out = self._project(rel, items)
        return self._finish(out, select)

    def _finish(self, rel: Relation, select: exp.Select) -> Relation:
        frame = rel.frame
        distinct = select.args.get("distinct")
        if distinct is not None:
            if distinct.args.get("on") is not None:
                raise refuse(distinct, "DISTINCT ON")
            frame = (
                frame.unique(keep="first")
                if isinstance(frame, StreamFrame)
                else frame.unique(keep="first", maintain_order=True)
            )
        order, limit = select.args.get("order"), select.args.get("limit")
        if isinstance(frame, StreamFrame):
            if order is not None:
                raise refuse(order, "ORDER BY")
            if limit is not None:
                raise refuse(limit, "LIMIT")
        else:
            if order is not None:
                names, descending = [], []
                for item in order.expressions:
                    column = item.this
                    if not isinstance(column, exp.Column) or column.name not in frame.columns:
                        raise refuse(
                            item,
                            f"ORDER BY {sql_text(item)}",
                            alternative="order by output columns",
                        )
                    names.append(column.name)
                    descending.append(bool(item.args.get("desc")))
                frame = frame.sort(
                    names, descending=descending, nulls_last=True, maintain_order=True
                )
            if limit is not None:
                frame = frame.head(int(limit.expression.name))
        return replace(rel, frame=frame)

    # -- SELECT list ----------------------------------------------------------------

    def _expand_stars(self, select: exp.Select, scope: Scope) -> list[exp.Expr]:
        items: list[exp.Expr] = []
        for item in select.expressions:
            star_of = None
            if isinstance(item, exp.Star):
                star_of = ""
            elif isinstance(item, exp.Column) and isinstance(item.this, exp.Star):
                star_of = item.table
            if star_of is None:
                items.append(item)
                continue
            for f in scope.fields:
                if star_of and (f.qualifier or "").lower() != star_of.lower():
                    continue
                if f.column is None:
                    raise refuse(
                        item,
                        f"SELECT * over a {f.name} that exists only after the window aggregation",
                        alternative="GROUP BY window_start, window_end",
                    )
                column = (
                    exp.column(f.name, table=f.qualifier) if f.qualifier else exp.column(f.name)
                )
                items.append(column)
        return items

    @staticmethod
    def _name(item: exp.Expr, index: int) -> str:
        if isinstance(item, exp.Alias):
            return item.alias
        if isinstance(item, exp.Column):
            return item.name
        return f"EXPR${index}"

    def _output(
        self, frame: Frame, items: list[exp.Expr], lowering: ExpressionLowering
    ) -> Relation:
        exprs, names = [], []
        for i, item in enumerate(items):
            name = self._name(item, i)
            if name in names:
                raise refuse(
                    item, f"two output columns named {name!r}", alternative="alias one of them"
                )
            names.append(name)
            exprs.append(lowering.lower(item.unalias()).alias(name))
        out = frame.select(exprs)
        return Relation(out, fields_of(out, None))

    def _project(self, rel: Relation, items: list[exp.Expr]) -> Relation:
        rel, items = _processing_time(rel, items)
        lowering = ExpressionLowering(rel.scope, rel.frame.collect_schema())
        return self._output(rel.frame, items, lowering)

    # -- aggregation ----------------------------------------------------------------

    def _aggregate(self, rel: Relation, items: list[exp.Expr], select: exp.Select) -> Relation:
        group = select.args.get("group")
        group_exprs = list(group.expressions) if group is not None else []
        base = ExpressionLowering(rel.scope, rel.frame.collect_schema())
        taken = set(rel.frame.collect_schema().names())
        pre: dict[str, pl.Expr] = {}
        keys: list[str] = []
        key_of: dict[str, str] = {}  # SQL text of a group expression -> output column
        window: Window | None = None
        window_nodes: list[exp.Expr] = []
        legacy_call: exp.Anonymous | None = None
        calendar: tuple[str, exp.Expr] | None = None  # DATE_FORMAT(ts, ...) as a window
        windowed = rel.window is not None or any(
            isinstance(g, exp.Anonymous) and g.name.upper() in ("TUMBLE", "HOP", "SESSION")
            for g in group_exprs
        )
        for g in group_exprs:
            if (
                isinstance(g, exp.Anonymous)
                and g.name.upper() in ("TUMBLE", "HOP", "SESSION", "CUMULATE")
                and g.expressions
                and isinstance(g.expressions[0], exp.Column)
            ):
                if window is not None:
                    raise refuse(g, "two group windows in one GROUP BY")
                window = legacy_window(g, rel.scope.column_of(g.expressions[0]))
                legacy_call = g
                continue
            if isinstance(g, exp.Column) and rel.window is not None:
                found = rel.scope.resolve(g)
                if (
                    found.name.lower() in WINDOW_COLUMNS
                    and found.qualifier == rel.scope.fields[-1].qualifier
                ):
                    window_nodes.append(g)
                    key_of[sql_text(g).lower()] = found.name.lower()
                    key_of[found.name.lower()] = found.name.lower()
                    continue
            if (
                not windowed
                and calendar is None
                and (found_window := calendar_window(g, rel.scope.column_of, rel.frame))
            ):
                window = found_window
                calendar = (fresh("__key", taken), g)
                key_of[sql_text(g).lower()] = calendar[0]
                continue
            if isinstance(g, exp.Column):
                column = rel.scope.column_of(g)
            else:
                column = fresh("__key", taken)
                pre[column] = base.lower(g)
            keys.append(column)
            key_of[sql_text(g).lower()] = column
            if isinstance(g, exp.Column):
                key_of[g.name.lower()] = column
        if window_nodes:
            named = {g.name.lower() for g in window_nodes}
            if not {"window_start", "window_end"} <= named:
                raise refuse(
                    window_nodes[0],
                    "GROUP BY with only some of window_start, window_end",
                    alternative="GROUP BY window_start, window_end (both), as Flink requires",
                )
            window = rel.window
        # Aggregates: their arguments become columns first.
        aggs: dict[str, pl.Expr] = {}
        agg_of: dict[str, pl.Expr] = {}
        having = select.args.get("having")
        sources = [*items, *([having.this] if having is not None else [])]
        for item in sources:
            for node in item.find_all(*AGGREGATES):
                if any(isinstance(p, AGGREGATES) for p in _ancestors(node, item)):
                    raise refuse(node, "an aggregate inside an aggregate")
                # COUNT(*) FILTER (WHERE c): the aggregate over the rows where c holds
                parent = node.parent
                filtered = isinstance(parent, exp.Filter) and parent.this is node
                unit = parent if filtered else node
                assert unit is not None
                text = sql_text(unit).lower()
                if text in agg_of:
                    continue
                name = fresh("__agg", taken)
                condition = unit.expression.this if filtered else None
                agg_of[text] = self._agg(node, name, base, pre, taken, aggs, condition)
        if not aggs:
            # GROUP BY without aggregates (distinct keys per window): the verbs need one.
            aggs[fresh("__rows", taken)] = pl.len()
        frame = rel.frame.with_columns(**pre) if pre else rel.frame
        if window is not None:
            out = window_aggregate(frame, window, keys, aggs)
            if calendar is not None:
                # the formatted window start: the formatted time of each of its rows
                start = calendar[1].copy()
                start.set("expressions", [exp.column("window_start"), start.expressions[1]])
                at_start = ExpressionLowering(
                    Scope((Field(None, "window_start", "window_start"),)), out.collect_schema()
                )
                out = out.with_columns(at_start.lower(start).alias(calendar[0]))
        elif isinstance(frame, StreamFrame):
            out = frame.group_by(*keys).agg(**aggs)
        elif keys:
            out = frame.group_by(keys, maintain_order=True).agg(**aggs)
        else:
            out = frame.select(**aggs)

        def substitute(node: exp.Expr) -> pl.Expr | None:
            text = sql_text(node).lower()
            if isinstance(node, AGGREGATES) or (
                isinstance(node, exp.Filter) and isinstance(node.this, AGGREGATES)
            ):
                return agg_of[text]
            if text in key_of:
                return pl.col(key_of[text])
            if isinstance(node, exp.Anonymous) and node.name.upper() in LEGACY_PARTS:
                kind, part = LEGACY_PARTS[node.name.upper()]
                if (
                    legacy_call is None
                    or kind != legacy_call.name.upper()
                    or [sql_text(a) for a in node.expressions]
                    != [sql_text(a) for a in legacy_call.expressions]
                ):
                    raise refuse(
                        node,
                        f"{node.name.upper()}(...) without the same {kind}(...) in GROUP BY",
                    )
                return pl.col(
                    {"START": "window_start", "END": "window_end", "ROWTIME": "window_time"}[part]
                )
            if isinstance(node, exp.Column):
                found = rel.scope.resolve(node)
                if (
                    window is not None
                    and rel.window is not None
                    and found.name.lower() in WINDOW_COLUMNS
                ):
                    return pl.col(found.name.lower())
                for k in (found.column, found.name.lower()):
                    if k is not None and k in keys:
                        return pl.col(k)
                raise refuse(
                    node,
                    f"column {sql_text(node)} neither grouped nor aggregated",
                    alternative="add it to GROUP BY or wrap it in an aggregate",
                )
            return None

        after = ExpressionLowering(Scope(()), out.collect_schema(), substitute)
        if having is not None:
            out = out.filter(after.lower(having.this))
        return self._output(out, items, after)

    def _agg(
        self,
        node: exp.Expr,
        name: str,
        base: ExpressionLowering,
        pre: dict[str, pl.Expr],
        taken: set[str],
        aggs: dict[str, pl.Expr],
        condition: exp.Expr | None = None,
    ) -> pl.Expr:
        arg = node.this
        when = None if condition is None else base.lower(condition)
        distinct = isinstance(arg, exp.Distinct)
        if distinct:
            if not isinstance(node, exp.Count) or len(arg.expressions) != 1:
                raise refuse(
                    node, f"{sql_text(node)}", alternative="COUNT(DISTINCT x) of one column"
                )
            arg = arg.expressions[0]
        if isinstance(node, exp.Count) and (arg is None or isinstance(arg, exp.Star)):
            if when is None:
                aggs[name] = pl.len()
                return pl.col(name).cast(pl.Int64)
            arg = exp.Literal.number(1)  # COUNT(*) FILTER (WHERE c) counts the rows where c
        if isinstance(arg, exp.Column) and when is None:
            column = base.scope.column_of(arg)
        else:
            column = fresh("__arg", taken)
            value = base.lower(arg)
            # a row outside the FILTER is a NULL, which every aggregate skips
            pre[column] = value if when is None else pl.when(when).then(value)
        col = pl.col(column)
        if isinstance(node, exp.Count):
            aggs[name] = col.drop_nulls().n_unique() if distinct else col.count()
            return pl.col(name).cast(pl.Int64)
        if not isinstance(node, (exp.Sum, exp.Min, exp.Max, exp.Avg)):
            raise refuse(node, f"aggregate {sql_text(node)}")
        aggs[name] = {exp.Sum: col.sum, exp.Min: col.min, exp.Max: col.max, exp.Avg: col.mean}[
            type(node)
        ]()
        if isinstance(node, exp.Sum):
            # SQL's SUM over no non-NULL value (all NULL, or none passes the FILTER) is
            # NULL; Polars' sum is 0
            counted = fresh("__cnt", taken)
            aggs[counted] = col.count()
            return pl.when(pl.col(counted) > 0).then(pl.col(name))
        return pl.col(name)

    # -- FROM -----------------------------------------------------------------------

    @staticmethod
    def _match_recognize(rel: Relation, match: exp.Expr, select: exp.Select) -> Relation:
        if select.args.get("joins"):
            raise refuse(
                match,
                "MATCH_RECOGNIZE in a FROM with a join",
                alternative="put the MATCH_RECOGNIZE in a subquery and join that",
            )
        assert isinstance(match, MatchRecognize)
        return lower_match_recognize(rel, match)

    def _from(
        self, item: exp.Expr, joins: list[exp.Join], conjuncts: list[exp.Expr]
    ) -> tuple[Relation, list[exp.Expr]]:
        rel = self._item(item)
        for join in joins:
            inner = (join.side or "").upper() == "" and (join.kind or "INNER").upper() in (
                "",
                "INNER",
            )
            # WHERE conjuncts join the ON conditions of a single inner join (pushdown).
            movable = conjuncts if inner and len(joins) == 1 else []
            rel, rest = join_relations(rel, self._item(join.this), join, movable)
            if movable:
                conjuncts = rest
        return rel, conjuncts

    def _item(self, item: exp.Expr) -> Relation:
        if isinstance(item, exp.Subquery):
            rel = self.query(item.this)
            return replace(rel, scope=rel.scope.requalified(item.alias or None))
        if isinstance(item, exp.Table):
            inner = item.this
            if isinstance(inner, exp.Anonymous) and inner.name.upper() == "TABLE":
                return self._tvf(item, inner)
            if not isinstance(inner, exp.Identifier):
                raise refuse(item, f"FROM {sql_text(item)}")
            frame = self.table(item.name, item)
            return Relation(frame, fields_of(frame, item.alias or item.name))
        raise refuse(item, f"FROM {sql_text(item)}")

    def _tvf(self, item: exp.Table, wrapper: exp.Anonymous) -> Relation:
        if len(wrapper.expressions) != 1 or not isinstance(wrapper.expressions[0], exp.Anonymous):
            raise refuse(item, f"FROM {sql_text(item)}")
        call = wrapper.expressions[0]
        if call.name.upper() not in ("TUMBLE", "HOP", "SESSION", "CUMULATE"):
            raise refuse(call, f"table function {call.name.upper()}")
        first = call.expressions[0] if call.expressions else None
        name = first.this.name if first is not None and isinstance(first.this, exp.Table) else ""
        frame = self.table(name, call)
        columns = {c: c for c in frame.collect_schema().names()}
        _, window = tvf_window(call, columns)
        qualifier = item.alias or None
        fields = list(fields_of(frame, qualifier).fields)
        if window.kind == "TUMBLE":
            assert window.size is not None
            unit = frame.collect_schema()[window.column]
            one = (
                timedelta(milliseconds=1)
                if getattr(unit, "time_unit", "us") == "ms"
                else timedelta(microseconds=1)
            )
            start = pl.col(window.column).dt.truncate(window.size)
            frame = frame.with_columns(
                window_start=start,
                window_end=start + pl.lit(window.size),
                window_time=start + pl.lit(window.size - one),
            )
            fields += [Field(qualifier, c, c) for c in WINDOW_COLUMNS]
        else:
            fields += [Field(qualifier, c, None) for c in WINDOW_COLUMNS]
        return Relation(frame, Scope(tuple(fields)), window=window)

    # -- deduplication --------------------------------------------------------------

    def _ranked(
        self,
        rel: Relation,
        items: list[exp.Expr],
        ranked: list[exp.Expr],
        select: exp.Select,
    ) -> Relation:
        window = ranked[0].unalias()
        assert isinstance(window, exp.Window)
        if (
            len(ranked) > 1
            or not isinstance(window.this, exp.RowNumber)
            or not isinstance(ranked[0], exp.Alias)
        ):
            raise refuse(window, "OVER")
        if select.args.get("group") is not None:
            raise refuse(window, "OVER")
        partition = window.args.get("partition_by") or []
        order = window.args.get("order")
        order_items = order.expressions if order is not None else []
        wcols = [p.name.lower() for p in partition if isinstance(p, exp.Column)]
        windowed = "window_start" in wcols or "window_end" in wcols
        if not order_items or not all(isinstance(o.this, exp.Column) for o in order_items):
            raise refuse(window, "ROW_NUMBER() without ORDER BY columns")
        if len(order_items) != 1 and not windowed:
            raise refuse(window, "ROW_NUMBER() without ORDER BY one time column")
        if not all(isinstance(p, exp.Column) for p in partition):
            raise refuse(window, "ROW_NUMBER() OVER (PARTITION BY an expression)")
        rest = [i for i in items if i is not ranked[0]]
        out = self._project(rel, rest)
        # The partition and order columns, as the projection names them.
        names = {}
        for i, item in enumerate(rest):
            inner = item.unalias()
            if isinstance(inner, exp.Column):
                names[rel.scope.column_of(inner)] = self._name(item, i)

        def output(column: exp.Column) -> str:
            physical = rel.scope.column_of(column)
            if physical not in names:
                raise refuse(
                    column, f"ROW_NUMBER() over {column.name}, which the query does not select"
                )
            return names[physical]

        rank = Rank(
            column=ranked[0].alias,
            partition=tuple(output(p) for p in partition),
            order=tuple(output(o.this) for o in order_items),
            descending=tuple(bool(o.args.get("desc")) for o in order_items),
            node=window,
            windowed=windowed,
        )
        scope = Scope((*out.scope.fields, Field(None, rank.column, rank.column)))
        return Relation(out.frame, scope, rank=rank)

    @staticmethod
    def _top_n(frame: Frame, rank: Rank, limit: int) -> Frame:
        """``rn <= limit`` per window or key: ``group_by(...).top_k`` on a stream (a running
        Top-N in update mode when no partition column is an event time)."""
        if isinstance(frame, pl.LazyFrame):
            return _top_n_static(frame, rank, limit)
        columns = [*frame.columns, rank.column]
        top = frame.group_by(*rank.partition).top_k(
            limit, by=list(rank.order), reverse=[not d for d in rank.descending], rank=rank.column
        )
        return top.select(columns)

    def _deduplicate(
        self, rel: Relation, conjuncts: list[exp.Expr], select: exp.Select
    ) -> tuple[Relation, list[exp.Expr]]:
        rank = rel.rank
        assert rank is not None
        keep, limit = [], None
        for conj in conjuncts:
            bound = _rank_bound(conj, rank.column)
            if bound is None:
                keep.append(conj)
            else:
                limit = bound if limit is None else min(limit, bound)
        if limit is None:
            raise refuse(
                rank.node,
                "OVER",
                reason="ROW_NUMBER() is only supported as deduplication, filtered by rn = 1 in the outer query",
            )
        if limit < 1:
            raise refuse(
                rank.node,
                f"a condition on {rank.column} other than {rank.column} = 1 or {rank.column} <= N",
                alternative=f"keep {rank.column} <= N and filter the rows you want after it",
            )
        if rank.windowed:
            return replace(rel, frame=self._top_n(rel.frame, rank, limit), rank=None), keep
        if limit > 1:
            # Nexmark q19: a running Top-N per key, in update mode keyed by (keys, rn)
            if not rank.partition:
                raise refuse(
                    rank.node,
                    "Top-N (ROW_NUMBER() <= N) without PARTITION BY",
                    alternative="PARTITION BY a key, or by window_start, window_end",
                )
            return replace(rel, frame=self._top_n(rel.frame, rank, limit), rank=None), keep
        if rank.descending[0]:
            raise refuse(rank.node, "keep-last deduplication")
        frame = rel.frame
        subset = list(rank.partition) or None
        order = rank.order[0]
        if isinstance(frame, StreamFrame):
            proctime = [n.name for n in _walk_plan(frame.plan) if isinstance(n, ProcessingTimeNode)]
            if order not in proctime:
                raise refuse(rank.node, "keep-first by event time")
            frame = frame.unique(subset=subset, keep="first")
        else:
            frame = frame.sort(order, maintain_order=True, nulls_last=True).unique(
                subset=subset, keep="first", maintain_order=True
            )
        frame = frame.with_columns(pl.lit(1, pl.Int64).alias(rank.column))
        return replace(rel, frame=frame, rank=None), keep


def _processing_time(rel: Relation, items: list[exp.Expr]) -> tuple[Relation, list[exp.Expr]]:
    """``PROCTIME() AS pt`` in a SELECT list (Flink's q12: ``SELECT *, PROCTIME() AS pt FROM
    bid``): on a stream ``with_processing_time(pt)``, the batch's logged timestamp; over
    static frames the time the query is planned, one instant for every row (the batch
    result processes every row at once)."""
    frame, fields, out = rel.frame, list(rel.scope.fields), []
    for i, item in enumerate(items):
        inner = item.unalias()
        if not (
            isinstance(inner, exp.Anonymous)
            and inner.name.upper() == "PROCTIME"
            and not inner.expressions
        ):
            out.append(item)
            continue
        name = QueryLowering._name(item, i)
        column = fresh(name, set(frame.collect_schema().names()))
        if isinstance(frame, StreamFrame):
            frame = frame.with_processing_time(column)
        else:
            now = datetime.now(UTC).replace(tzinfo=None)
            frame = frame.with_columns(pl.lit(now, pl.Datetime("ms")).alias(column))
        fields.append(Field(None, column, column))
        out.append(exp.alias_(exp.column(column), name))
    if len(fields) == len(rel.scope.fields):
        return rel, items
    return replace(rel, frame=frame, scope=Scope(tuple(fields))), out


def _top_n_static(frame: pl.LazyFrame, rank: Rank, limit: int) -> pl.LazyFrame:
    """Window Top-N over static frames: the batch result of the same text."""
    position = pl.int_range(1, pl.len() + 1, dtype=pl.Int64)
    if rank.partition:
        position = position.over(list(rank.partition))
    return (
        frame.sort(
            list(rank.order), descending=list(rank.descending), nulls_last=True, maintain_order=True
        )
        .with_columns(position.alias(rank.column))
        .filter(pl.col(rank.column) <= limit)
    )


def _ancestors(node: exp.Expr, stop: exp.Expr) -> list[exp.Expr]:
    out, parent = [], node.parent
    while parent is not None and parent is not stop:
        out.append(parent)
        parent = parent.parent
    if parent is stop:
        out.append(stop)
    return out


def _rank_bound(conj: exp.Expr, column: str) -> int | None:
    """N when ``conj`` is ``rn = 1``/``rn <= N``/``rn < N+1`` (either way round); 0 for
    another comparison of ``rn`` with a number, None when ``conj`` is not one."""
    if not isinstance(conj, (exp.EQ, exp.LTE, exp.LT, exp.GTE, exp.GT)):
        return None
    a, b = conj.this, conj.expression
    flipped = False
    if isinstance(b, exp.Column) and isinstance(a, exp.Literal):
        a, b, flipped = b, a, True
    if not (
        isinstance(a, exp.Column)
        and a.name.lower() == column.lower()
        and isinstance(b, exp.Literal)
    ):
        return None
    n = int(b.name)
    op: type[exp.Expr] = type(conj)
    if flipped:
        mirror: dict[type[exp.Expr], type[exp.Expr]] = {
            exp.GTE: exp.LTE,
            exp.GT: exp.LT,
            exp.LTE: exp.GTE,
            exp.LT: exp.GT,
        }
        op = mirror.get(op, op)
    if op is exp.EQ:
        return n if n == 1 else 0  # rn = N > 1: the N-th row alone, no Top-N
    if op is exp.LTE:
        return n
    if op is exp.LT:
        return n - 1
    return 0  # rn > N, rn >= N: no bound from above
