"""``CREATE TABLE ... WITH ('connector' = ...)``: tables read by queries and written by INSERT INTO.

A declared table is a :class:`TableDeclaration` (its columns, computed columns,
watermark and options); it becomes a source the first time a query reads it
(:func:`source_frame`: ``scan_files``, ``scan_kafka`` or ``scan_delta``, then
``with_watermark`` from the ``WATERMARK FOR`` clause and ``with_processing_time``
for a ``PROCTIME()`` column) and a sink when ``INSERT INTO`` writes it
(:func:`start_sink`: ``sink_parquet``/``sink_csv``/``sink_ndjson``, ``sink_delta``,
``sink_kafka``, ``sink_console`` for ``print``, a no-op ``foreach_batch`` for
``blackhole``, and microstream's ``memory`` for ``ms.table(name)``).

Options other than ``connector``, ``path`` and ``format`` are the verb's own keyword
options, spelled as Flink spells options (``'max-files-per-trigger' = '1'`` is
``max_files_per_trigger=1``; ``'checkpoint' = '/cp'`` for a sink); an unknown option
is refused with the list of known ones. Kafka's Flink names
``properties.bootstrap.servers`` and ``scan.startup.mode`` are understood too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, get_args

import polars as pl
from sqlglot import exp

from microstream._typing import FileFormat, KafkaFormat
from microstream.api.frame import StreamFrame
from microstream.api.query import StreamingQuery
from microstream.api.scan import scan_delta, scan_files, scan_kafka
from microstream.exceptions import PlanError
from microstream.sql.expressions import (
    ExpressionLowering,
    Field,
    Scope,
    interval_of,
    polars_type,
    sql_text,
)
from microstream.sql.refusals import refuse

__all__ = [
    "SINK_CONNECTORS",
    "SOURCE_CONNECTORS",
    "TableDeclaration",
    "declare",
    "source_frame",
    "start_sink",
]

SOURCE_CONNECTORS = ("filesystem", "kafka", "delta")
SINK_CONNECTORS = ("filesystem", "kafka", "delta", "print", "blackhole", "memory")
_SINK_FORMATS = {
    "parquet": "sink_parquet",
    "csv": "sink_csv",
    "json": "sink_ndjson",
    "ndjson": "sink_ndjson",
}
# Sink-verb options a table cannot set from SQL (objects, not strings).
_NOT_FROM_SQL = {
    "self",
    "trigger",
    "runtime",
    "session",
    "checkpoint_options",
    "storage_options",
    "function",
}


@dataclass(frozen=True)
class TableDeclaration:
    """A ``CREATE TABLE``: physical columns, computed columns, watermark, options."""

    name: str
    schema: pl.Schema
    options: dict[str, str]
    computed: tuple[tuple[str, exp.Expr], ...] = ()
    proctime: str | None = None
    watermark: tuple[str, timedelta] | None = None
    node: exp.Expr = field(default_factory=exp.Null, compare=False)

    @property
    def connector(self) -> str:
        return self.options.get("connector", "")

    @property
    def columns(self) -> list[str]:
        names = list(self.schema.names())
        names += [n for n, _ in self.computed]
        return [*names, self.proctime] if self.proctime else names


def _key(node: exp.Expr) -> str:
    return (
        node.name
        if isinstance(node, (exp.Literal, exp.Identifier, exp.Var, exp.Column))
        else sql_text(node)
    )


def declare(create: exp.Create) -> TableDeclaration:
    """The declaration of a ``CREATE TABLE`` statement."""
    schema_node = create.this
    if not isinstance(schema_node, exp.Schema):
        raise refuse(create, "CREATE TABLE without columns", alternative="declare the columns")
    name = schema_node.this.name
    columns: dict[str, pl.DataType] = {}
    computed: list[tuple[str, exp.Expr]] = []
    proctime = None
    watermark = None
    for item in schema_node.expressions:
        if isinstance(item, exp.WatermarkColumnConstraint):
            column = item.this.name
            expr = item.expression
            if isinstance(expr, exp.Column) and expr.name == column:
                delay = timedelta(0)
            elif (
                isinstance(expr, exp.Sub)
                and isinstance(expr.this, exp.Column)
                and expr.this.name == column
            ):
                delay = interval_of(expr.expression)
            else:
                raise refuse(
                    item,
                    f"WATERMARK FOR {column} AS {sql_text(expr)}",
                    alternative=f"WATERMARK FOR {column} AS {column} - INTERVAL 'n' SECOND",
                )
            watermark = (column, delay)
        elif isinstance(item, exp.ColumnDef):
            constraints = item.args.get("constraints") or []
            computed_kind = next(
                (c.kind for c in constraints if isinstance(c.kind, exp.ComputedColumnConstraint)),
                None,
            )
            if computed_kind is not None:
                expr = computed_kind.this
                if isinstance(expr, exp.Anonymous) and expr.name.upper() == "PROCTIME":
                    proctime = item.name
                else:
                    computed.append((item.name, expr))
            elif constraints:
                raise refuse(constraints[0], f"column constraint {sql_text(constraints[0])}")
            else:
                columns[item.name] = polars_type(item.args["kind"], item)
        else:
            raise refuse(item, f"{sql_text(item)} in CREATE TABLE")
    options = {}
    for prop in (create.args.get("properties") or exp.Properties()).expressions:
        if isinstance(prop, exp.Property):
            options[_key(prop.this).lower()] = _key(prop.args["value"])
        elif not isinstance(prop, exp.TemporaryProperty):
            raise refuse(
                prop, f"table property {sql_text(prop)}", alternative="WITH ('key' = 'value', ...)"
            )
    connector = options.get("connector")
    if connector not in SOURCE_CONNECTORS + SINK_CONNECTORS:
        raise refuse(
            create,
            f"CREATE TABLE {name} WITH ('connector' = {connector!r})",
            alternative=f"'connector' is one of {sorted(set(SOURCE_CONNECTORS + SINK_CONNECTORS))}",
        )
    if watermark is not None and watermark[0] not in columns:
        raise refuse(create, f"WATERMARK FOR {watermark[0]}", reason="no such physical column")
    return TableDeclaration(
        name=name,
        schema=pl.Schema(columns),
        options=options,
        computed=tuple(computed),
        proctime=proctime,
        watermark=watermark,
        node=create,
    )


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if text.lstrip("-").isdigit():
        return int(text)
    return text


def _keywords(
    decl: TableDeclaration, verb: Callable[..., Any], skip: set[str], what: str
) -> dict[str, Any]:
    accepted = (
        {
            p.name
            for p in inspect.signature(verb).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
            or p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        }
        - _NOT_FROM_SQL
        - skip
    )
    out = {}
    for key, value in decl.options.items():
        if key in ("connector", "path", "format") or key in skip:
            continue
        name = key.replace("-", "_").replace(".", "_")
        if name not in accepted:
            spelled = sorted(a.replace("_", "-") for a in accepted)
            msg = (
                f"CREATE TABLE {decl.name}: option {key!r} is not an option of the "
                f"{decl.connector} {what}; its options are {spelled}"
            )
            raise PlanError(msg)
        if name == "partition_by":
            out[name] = [v.strip() for v in value.split(",")]
        else:
            out[name] = _value(value)
    return out


def _need(decl: TableDeclaration, key: str) -> str:
    if key not in decl.options:
        msg = (
            f"CREATE TABLE {decl.name} WITH ('connector' = '{decl.connector}') needs '{key}' = ..."
        )
        raise PlanError(msg)
    return decl.options[key]


def _choice(
    decl: TableDeclaration, options: dict[str, str], key: str, default: str, choices: Any
) -> Any:
    """Option ``key`` checked against ``choices`` (a ``Literal`` alias): a value of it."""
    value = options.get(key, default)
    allowed = get_args(choices)
    for choice in allowed:
        if value == choice:
            return choice
    msg = f"CREATE TABLE {decl.name}: {key!r} = {value!r}; the {decl.connector} connector reads {list(allowed)}"
    raise PlanError(msg)


def source_frame(decl: TableDeclaration) -> StreamFrame:
    """The stream a query reads from a declared table."""
    connector = decl.connector
    schema = decl.schema
    if connector == "filesystem":
        kwargs = _keywords(decl, scan_files, {"schema"}, "source")
        frame = scan_files(
            _need(decl, "path"),
            format=_choice(decl, decl.options, "format", "parquet", FileFormat),
            schema=schema,
            **kwargs,
        )
    elif connector == "kafka":
        opts = dict(decl.options)
        servers = opts.pop("properties.bootstrap.servers", None) or opts.pop(
            "bootstrap-servers", None
        )
        if servers is None:
            msg = f"CREATE TABLE {decl.name}: a kafka table needs 'properties.bootstrap.servers'"
            raise PlanError(msg)
        mode = opts.pop("scan.startup.mode", None)
        if mode is not None:
            opts["starting-offsets"] = mode.removesuffix("-offset")
        decl2 = TableDeclaration(decl.name, schema, opts)
        kwargs = _keywords(decl2, scan_kafka, {"schema", "bootstrap_servers"}, "source")
        fmt = _choice(decl, opts, "format", "json", KafkaFormat)
        frame = scan_kafka(servers, format=fmt, schema=schema, **kwargs)
    elif connector == "delta":
        kwargs = _keywords(decl, scan_delta, set(), "source")
        frame = scan_delta(_need(decl, "path"), **kwargs)
        missing = [c for c in schema.names() if c not in frame.collect_schema()]
        if missing:
            msg = f"CREATE TABLE {decl.name}: the Delta table at {decl.options['path']} has no column(s) {missing}"
            raise PlanError(msg)
        frame = frame.select([pl.col(c).cast(t) for c, t in schema.items()])
    else:
        msg = (
            f"table {decl.name} ('connector' = '{connector}') is a sink: INSERT INTO it; a query "
            f"reads tables with 'connector' = {', '.join(repr(c) for c in SOURCE_CONNECTORS)}"
        )
        raise PlanError(msg)
    if decl.computed:
        scope = Scope(tuple(Field(None, c, c) for c in schema.names()))
        lowering = ExpressionLowering(scope, frame.collect_schema())
        frame = frame.with_columns([lowering.lower(e).alias(n) for n, e in decl.computed])
    if decl.watermark is not None:
        frame = frame.with_watermark(decl.watermark[0], decl.watermark[1])
    if decl.proctime is not None:
        frame = frame.with_processing_time(decl.proctime)
    return frame


def start_sink(decl: TableDeclaration, frame: StreamFrame, node: exp.Expr) -> StreamingQuery:
    """``INSERT INTO decl SELECT ...``: the query's columns, by position, into the table's."""
    names = decl.columns
    have = frame.collect_schema()
    if len(have) != len(names):
        raise refuse(
            node,
            f"INSERT INTO {decl.name} with {len(have)} columns",
            reason=f"the table has {len(names)}: {names}",
        )
    frame = frame.select(
        [
            pl.col(src).cast(decl.schema[dst]).alias(dst)
            if dst in decl.schema and have[src] != decl.schema[dst]
            else pl.col(src).alias(dst)
            for src, dst in zip(have.names(), names)
        ]
    )
    connector = decl.connector
    if connector == "print":
        return frame.sink_console(**_keywords(decl, frame.sink_console, set(), "sink"))
    if connector == "blackhole":
        kwargs = _keywords(decl, frame.foreach_batch, set(), "sink")
        return frame.foreach_batch(_discard, **kwargs)
    if connector == "memory":
        kwargs = _keywords(decl, frame.sink_memory, {"name"}, "sink")
        return frame.sink_memory(decl.options.get("name", decl.name), **kwargs)
    if connector == "filesystem":
        fmt = decl.options.get("format", "parquet")
        if fmt not in _SINK_FORMATS:
            msg = f"CREATE TABLE {decl.name}: 'format' = {fmt!r}; a filesystem sink writes {sorted(_SINK_FORMATS)}"
            raise PlanError(msg)
        verb = getattr(frame, _SINK_FORMATS[fmt])
        started: StreamingQuery = verb(_need(decl, "path"), **_keywords(decl, verb, set(), "sink"))
        return started
    if connector == "delta":
        return frame.sink_delta(
            _need(decl, "path"), **_keywords(decl, frame.sink_delta, set(), "sink")
        )
    if connector == "kafka":
        opts = dict(decl.options)
        servers = opts.pop("properties.bootstrap.servers", None) or opts.pop(
            "bootstrap-servers", None
        )
        topic = opts.pop("topic", None)
        if servers is None or topic is None:
            msg = f"CREATE TABLE {decl.name}: a kafka sink needs 'properties.bootstrap.servers' and 'topic'"
            raise PlanError(msg)
        decl2 = TableDeclaration(decl.name, decl.schema, opts)
        kwargs = _keywords(decl2, frame.sink_kafka, {"bootstrap_servers", "topic"}, "sink")
        return frame.sink_kafka(servers, topic, **kwargs)
    msg = f"table {decl.name} ('connector' = '{connector}') is a source; INSERT INTO a sink table"
    raise PlanError(msg)


def _discard(df: pl.DataFrame, batch_id: int) -> None:
    """The blackhole sink: every batch dropped."""
