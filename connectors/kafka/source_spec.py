"""``scan_kafka``'s options: the frozen spec of the Kafka source."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import PayloadDecoder
from connectors._payload_formats import payload_decoder
from connectors.kafka.client import HEADERS_DTYPE, METADATA_SCHEMA
from microstream.exceptions import (
    PlanError,
)
from microstream.protocols import SourceContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from connectors.kafka.source import KafkaSource
    from microstream._typing import (
        BadRecordPolicy,
        ExtraColumnsPolicy,
        KafkaFormat,
        KafkaStartingOffsets,
        MissingColumnsPolicy,
    )
    from microstream.protocols import SideOutputTarget


# -- the spec --------------------------------------------------------------------------------------


def _timestamp_ms(value: int | datetime) -> int:
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        return int(aware.timestamp() * 1000)
    return value


@dataclass(frozen=True, init=False)
class KafkaSourceSpec:
    """Records of Kafka topics as an unbounded stream.

    Parameters
    ----------
    bootstrap_servers
        ``"host:port[,host:port...]"`` of the cluster.
    topic, topics, pattern
        Exactly one: a topic, a list of topics, or a regular expression that
        topic names must match in full (internal ``__*`` topics excluded);
        topics that appear later are read from their start.
    format
        How record values are decoded: ``"json"`` (one object per record,
        parsed with ``schema``; absent fields are null), ``"csv"`` (one line,
        no header, fields by position), ``"avro"`` (plain schemaless Avro of
        the record schema given as ``schema``; the Confluent Schema Registry
        framing is not supported), ``"protobuf"`` (serialised messages of the
        type given as ``schema``; nested messages become structs, repeated
        fields lists, enums their names) or ``"raw"`` (a Binary ``value``
        column). A tombstone (null value) gives a row of nulls.
    schema
        The value's columns: a mapping of name to polars dtype, for
        ``"avro"`` an Avro record schema (dict or JSON text), for
        ``"protobuf"`` a generated message class or ``{"descriptor_set":
        <file>, "message": <full name>}``. Required except for ``"raw"``.
    starting_offsets
        Where a new query starts: ``"earliest"`` (default), ``"latest"``, a
        timestamp (ms since the epoch, or a datetime: the first offset at or
        after it), or explicit offsets ``{partition: offset}`` (with
        ``topic``) or ``{topic: {partition: offset}}``, where -2 means
        earliest and -1 latest; unlisted partitions start at the earliest.
        Resolved once and kept in the checkpoint; ignored on restart.
    max_offsets_per_trigger
        At most this many offsets per batch, split across partitions in
        proportion to what each has available (not applied to
        ``Trigger.once()``).
    include_metadata
        Add ``key`` (Binary), ``topic``, ``partition`` (Int32), ``offset``
        (Int64) and ``timestamp`` (Datetime ms UTC; null if the record has
        none) after the value's columns.
    include_headers
        Add ``headers``: List(Struct(key: String, value: Binary)).
    on_bad_record
        A value that does not decode: ``"fail"`` (a
        :class:`~microstream.SourceError` naming topic, partition, offset and
        the reason), ``"skip"`` (dropped, logged, counted as
        ``bad_records_skipped`` in the batch's source progress ``metrics``)
        or ``"dead_letter"`` (rows ``topic, partition, offset, key, value,
        reason, batch_id`` go to ``dead_letter``; counted as
        ``bad_records_dead_lettered``).
    dead_letter
        With ``on_bad_record="dead_letter"``: a memory table name
        (``ms.table(name)``) or a function called with the rows and the
        batch id.
    extra_columns
        A column the schema lacks (a JSON key holding a value; a CSV field
        past the schema's last column): ``"ignore"`` (default: not read; the
        first record holding each such column is logged as a warning once per
        run, naming topic, partition and offset, and counted as
        ``new_columns_ignored`` in the batch's source progress ``metrics``)
        or ``"raise"`` (a :class:`~microstream.SchemaMismatchError` naming
        the column and the record's topic, partition and offset, whatever
        ``on_bad_record`` says). JSON and CSV only.
    missing_columns
        A schema column a record lacks (a JSON key absent, not null; a CSV
        line with fewer fields): ``"insert"`` (default: null) or ``"raise"``
        (a :class:`~microstream.SchemaMismatchError` naming the column and
        the record, whatever ``on_bad_record`` says). JSON and CSV only.
    fail_on_data_loss
        Offsets the query needs that no longer exist are an error (default);
        False continues from the earliest available offset, logs a warning
        and counts ``offsets_lost`` in the batch's source progress metrics.
    retry_timeout
        How long transient errors (a broker down, timeouts) are retried, with
        a backoff from 50 ms to 1 s, before the query fails; a data loss is
        also reported only once it persisted this long (a restarting broker
        may briefly show no topics). ``"30s"`` by default.
    options
        librdkafka settings passed to every client: ``security.protocol``,
        ``sasl.*``, ``ssl.*``, ``client.id``, ``group.id`` (the group the
        positions are committed to), ``isolation.level``, ... Not part of
        the query's identity and never shown (they may hold credentials).

    Raises
    ------
    ValueError
        An option out of range.
    PlanError
        A missing or unreadable ``schema``, or metadata columns that clash
        with the value's columns.

    Notes
    -----
    ``extra_columns="raise"`` and ``missing_columns="raise"`` stop the query
    rather than route the record by ``on_bad_record``: the record decodes,
    and a schema that changed upstream would otherwise send every later
    record to the dead letter. To keep a new column, add it to ``schema``
    and restart (the schema is not part of the query's identity); a Delta
    sink takes the wider batches with ``merge_schema=True``.

    Examples
    --------
    >>> import polars as pl
    >>> spec = KafkaSourceSpec("127.0.0.1:9092", topic="events", schema={"id": pl.Int64})
    >>> spec.identity()
    {'topics': ['events'], 'format': 'json'}
    >>> KafkaSourceSpec(
    ...     "127.0.0.1:9092", pattern="ev.*", format="raw", include_metadata=True
    ... ).schema.names()
    ['value', 'key', 'topic', 'partition', 'offset', 'timestamp']
    """

    kind: ClassVar[str] = "kafka"

    bootstrap_servers: str
    topics: tuple[str, ...] | None
    pattern: str | None
    format: KafkaFormat
    schema: pl.Schema
    starting_offsets: str | int | dict[str, dict[int, int]]
    max_offsets_per_trigger: int | None
    include_metadata: bool
    include_headers: bool
    on_bad_record: BadRecordPolicy
    dead_letter: SideOutputTarget | None = field(compare=False)
    extra_columns: ExtraColumnsPolicy
    missing_columns: MissingColumnsPolicy
    fail_on_data_loss: bool
    retry_timeout_s: float
    options: dict[str, Any] = field(repr=False, compare=False)
    decoder: PayloadDecoder = field(repr=False, compare=False)

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic: str | None = None,
        topics: Sequence[str] | None = None,
        pattern: str | None = None,
        format: KafkaFormat = "json",
        schema: Mapping[str, Any] | pl.Schema | str | type | None = None,
        starting_offsets: KafkaStartingOffsets = "earliest",
        max_offsets_per_trigger: int | None = None,
        include_metadata: bool = False,
        include_headers: bool = False,
        on_bad_record: BadRecordPolicy = "fail",
        dead_letter: SideOutputTarget | None = None,
        extra_columns: ExtraColumnsPolicy = "ignore",
        missing_columns: MissingColumnsPolicy = "insert",
        fail_on_data_loss: bool = True,
        retry_timeout: str | timedelta | float = "30s",
        options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(bootstrap_servers, str) or not bootstrap_servers.strip():
            msg = f"bootstrap_servers must be 'host:port[,host:port...]'; got {bootstrap_servers!r}"
            raise ValueError(msg)
        given = [n for n, v in (("topic", topic), ("topics", topics), ("pattern", pattern)) if v]
        if len(given) != 1:
            msg = (
                f"pass exactly one of topic=, topics= or pattern=; got {', '.join(given) or 'none'}"
            )
            raise ValueError(msg)
        names: tuple[str, ...] | None = None
        if topic is not None:
            if not isinstance(topic, str):
                msg = f"topic must be a topic name; got {topic!r} (use topics= for a list)"
                raise ValueError(msg)
            names = (topic,)
        elif topics is not None:
            if isinstance(topics, str) or not all(isinstance(t, str) and t for t in topics):
                msg = f"topics must be a list of topic names; got {topics!r}"
                raise ValueError(msg)
            names = tuple(dict.fromkeys(topics))
        else:
            try:
                re.compile(str(pattern))
            except re.error as exc:
                msg = f"pattern must be a regular expression; got {pattern!r}: {exc}"
                raise ValueError(msg) from None
        if max_offsets_per_trigger is not None and (
            isinstance(max_offsets_per_trigger, bool)
            or not isinstance(max_offsets_per_trigger, int)
            or max_offsets_per_trigger < 1
        ):
            msg = (
                "max_offsets_per_trigger must be a positive int or None; "
                f"got {max_offsets_per_trigger!r}"
            )
            raise ValueError(msg)
        if on_bad_record not in ("fail", "skip", "dead_letter"):
            msg = f"on_bad_record must be 'fail', 'skip' or 'dead_letter'; got {on_bad_record!r}"
            raise ValueError(msg)
        if on_bad_record == "dead_letter":
            if not (isinstance(dead_letter, str) and dead_letter) and not callable(dead_letter):
                msg = (
                    "on_bad_record='dead_letter' needs dead_letter= a memory table name or a "
                    f"function(df, batch_id); got {dead_letter!r}"
                )
                raise ValueError(msg)
        elif dead_letter is not None:
            msg = (
                f"dead_letter= is used only with on_bad_record='dead_letter'; got {on_bad_record!r}"
            )
            raise ValueError(msg)
        if extra_columns not in ("ignore", "raise"):
            msg = f"extra_columns must be 'ignore' or 'raise'; got {extra_columns!r}"
            raise ValueError(msg)
        if missing_columns not in ("insert", "raise"):
            msg = f"missing_columns must be 'insert' or 'raise'; got {missing_columns!r}"
            raise ValueError(msg)
        if format not in ("json", "csv"):
            for option, chosen, default in (
                ("extra_columns", extra_columns, "ignore"),
                ("missing_columns", missing_columns, "insert"),
            ):
                if chosen != default:
                    msg = (
                        f"{option}={chosen!r} applies to format='json' or 'csv'; got "
                        f"format={format!r}, whose records always have the schema's columns "
                        "(an Avro record that does not fit is a bad record)"
                    )
                    raise ValueError(msg)
        for flag, value in (
            ("include_metadata", include_metadata),
            ("include_headers", include_headers),
            ("fail_on_data_loss", fail_on_data_loss),
        ):
            if not isinstance(value, bool):
                msg = f"{flag} must be a bool; got {value!r}"
                raise ValueError(msg)
        retry = parse_duration(retry_timeout, name="retry_timeout").total_seconds()
        if options is not None and not isinstance(options, Mapping):
            msg = f"options must be a dict of librdkafka settings; got {options!r}"
            raise ValueError(msg)
        decoder = payload_decoder(format, schema, missing_columns=missing_columns)
        columns = dict(decoder.schema)
        extra: dict[str, pl.DataType] = {}
        if include_metadata:
            extra.update(METADATA_SCHEMA)
        if include_headers:
            extra["headers"] = HEADERS_DTYPE
        clash = sorted(set(columns) & set(extra))
        if clash:
            msg = (
                f"the value's column(s) {clash} clash with the Kafka metadata columns; rename "
                "them in the schema, or drop include_metadata/include_headers"
            )
            raise PlanError(msg)
        put = object.__setattr__
        put(self, "bootstrap_servers", bootstrap_servers.strip())
        put(self, "topics", names)
        put(self, "pattern", pattern if names is None else None)
        put(self, "format", format)
        put(self, "schema", pl.Schema({**columns, **extra}))
        put(self, "starting_offsets", _normalise_starting(starting_offsets, names))
        put(self, "max_offsets_per_trigger", max_offsets_per_trigger)
        put(self, "include_metadata", include_metadata)
        put(self, "include_headers", include_headers)
        put(self, "on_bad_record", on_bad_record)
        put(self, "dead_letter", dead_letter)
        put(self, "extra_columns", extra_columns)
        put(self, "missing_columns", missing_columns)
        put(self, "fail_on_data_loss", fail_on_data_loss)
        put(self, "retry_timeout_s", retry)
        put(self, "options", dict(options or {}))
        put(self, "decoder", decoder)

    def identity(self) -> dict[str, Any]:
        """What is read: the topics (or the pattern) and the value format."""
        if self.topics is not None:
            return {"topics": list(self.topics), "format": self.format}
        return {"pattern": self.pattern, "format": self.format}

    def describe(self) -> str:
        """One line: ``KafkaSource[events]`` or ``KafkaSource[pattern=ev.*]``."""
        what = ",".join(self.topics) if self.topics is not None else f"pattern={self.pattern}"
        return f"KafkaSource[{what}]"

    def build(self, context: SourceContext) -> KafkaSource:
        """The runtime source (checks that confluent-kafka is installed)."""
        # The runtime module builds on this one: imported when a query starts.
        from connectors.kafka.source import KafkaSource

        return KafkaSource(self, context)


def _normalise_starting(
    value: KafkaStartingOffsets, topics: tuple[str, ...] | None
) -> str | int | dict[str, dict[int, int]]:
    if value in ("earliest", "latest"):
        return str(value)
    if isinstance(value, datetime) or (isinstance(value, int) and not isinstance(value, bool)):
        ms = _timestamp_ms(value)
        if ms < 0:
            msg = f"starting_offsets as a timestamp must be >= 0 ms; got {value!r}"
            raise ValueError(msg)
        return ms
    if isinstance(value, Mapping) and value:
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            if topics is None or len(topics) != 1:
                msg = (
                    "starting_offsets as {partition: offset} needs topic=; with topics= or "
                    f"pattern= write {{topic: {{partition: offset}}}}; got {value!r}"
                )
                raise ValueError(msg)
            nested: Mapping[str, Any] = {topics[0]: value}
        else:
            nested = value  # type: ignore[assignment]
        out: dict[str, dict[int, int]] = {}
        for t, parts in nested.items():
            if not isinstance(t, str) or not isinstance(parts, Mapping):
                msg = (
                    f"starting_offsets must map topic names to {{partition: offset}}; got {value!r}"
                )
                raise ValueError(msg)
            if topics is not None and t not in topics:
                msg = (
                    f"starting_offsets names topic {t!r}, which is not subscribed ({list(topics)})"
                )
                raise ValueError(msg)
            for p, o in parts.items():
                if not (isinstance(p, int) and isinstance(o, int)) or p < 0 or o < -2:
                    msg = (
                        f"starting_offsets[{t!r}] must map partitions (int >= 0) to offsets "
                        f"(int >= 0, -2 = earliest, -1 = latest); got {p!r}: {o!r}"
                    )
                    raise ValueError(msg)
            out[t] = {int(p): int(o) for p, o in parts.items()}
        return out
    msg = (
        "starting_offsets must be 'earliest', 'latest', a timestamp (ms or datetime), "
        f"{{partition: offset}} or {{topic: {{partition: offset}}}}; got {value!r}"
    )
    raise ValueError(msg)
