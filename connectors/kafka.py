"""Kafka: a replayable source, and a sink that tags every record with its batch.

**Source.** An offset is the position (the next offset to read) of every
topic-partition; the write-ahead log holds the ``(start, end]`` positions of
each batch, and a batch reads exactly those offsets by assigning the
partitions and seeking (no consumer-group membership, no rebalancing), so a
re-run reads the same records. Records are consumed in bulk
(``consume(num_messages=...)``) and decoded in bulk (see
:mod:`connectors._kafka_codecs`); the only Python work per record is
reading its offset (and partition) once, and its value. The consumer stays
assigned between batches, so librdkafka fetches the next records while a
batch is decoded, computed and written, and records consumed past a
partition's end are kept for the next batch instead of being fetched again
(any other start is a seek). Partitions that appear later (a topic
that grew, a new topic matching ``pattern``) are read from their start.
After each batch commits, the positions are committed as the offsets of a
consumer group (``microstream-<query id>`` unless ``options`` set
``group.id``), so the usual lag tools see the query's progress; they are
never read back (the log is the truth).

**Data loss.** Before offsets are used, they are checked against the
partition's earliest and end offsets: a partition that vanished, an end
below the query's position (a broker that lost its data, a topic recreated)
or an earliest offset above it (retention) is a :class:`DataLossError`
naming the topic, the partition and the missing range, unless
``fail_on_data_loss=False``: then the query continues from the earliest
available offset, logs a warning and counts the lost offsets in progress.
The offsets are looked up when a batch is planned (``latest_offset``) and
when a logged batch is re-run (``read``); a batch just planned is read
without a second look-up, and with ``Trigger.available_now()`` the ends are
looked up once, at start (as Spark does). With ``fail_on_data_loss=True``, a
loss after the look-up shows when the records are fetched: an
out-of-range error, or (a broker that answers with no records) a look-up
after ``retry_timeout`` without records, either way a :class:`DataLossError`.
Kafka offsets alone cannot tell a topic recreated with at least as many
records as the query had read from the old one; like Spark, this goes
unnoticed.

**Sink.** See :class:`KafkaSinkSpec` for the guarantee of each mode.

``confluent-kafka`` and ``fastavro`` are optional dependencies, imported
only when used (``pip install 'microstream[kafka]'``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import polars as pl
from pydantic import Field, ValidationError

from connectors._kafka_codecs import PayloadDecoder, avro_schema_for, encode_values, make_decoder
from microstream.exceptions import (
    DataLossError,
    MissingDependencyError,
    OffsetError,
    PlanError,
    SchemaMismatchError,
    SinkError,
    SourceError,
)
from microstream.protocols import Offset, SinkContext, SourceContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from confluent_kafka import Consumer, KafkaError, Message, Producer
    from confluent_kafka.admin import AdminClient

    from microstream._typing import (
        BadRecordPolicy,
        ExtraColumnsPolicy,
        KafkaFormat,
        KafkaSinkFormat,
        KafkaStartingOffsets,
        MissingColumnsPolicy,
    )
    from microstream.protocols import SideOutputTarget

__all__ = ["KafkaOffset", "KafkaSink", "KafkaSinkSpec", "KafkaSource", "KafkaSourceSpec"]

_CLIENT_LOGGER = logging.getLogger("microstream.kafka.client")
"""librdkafka's own log lines (connection failures while a broker is down, ...)."""

TopicPartitionKey = tuple[str, int]
T = TypeVar("T")

METADATA_SCHEMA = pl.Schema(
    {
        "key": pl.Binary(),
        "topic": pl.String(),
        "partition": pl.Int32(),
        "offset": pl.Int64(),
        "timestamp": pl.Datetime("ms", "UTC"),
    }
)
HEADERS_DTYPE = pl.List(pl.Struct({"key": pl.String(), "value": pl.Binary()}))
DEAD_LETTER_SCHEMA = pl.Schema(
    {
        "topic": pl.String(),
        "partition": pl.Int32(),
        "offset": pl.Int64(),
        "key": pl.Binary(),
        "value": pl.Binary(),
        "reason": pl.String(),
    }
)
"""Columns of a dead-letter row; the engine appends ``batch_id``."""

_FETCH_MAX = 10_000
"""Most records asked of one ``consume`` call."""
_STASH_MAX = 100_000
"""Records of one partition kept past its batch's end before it is unassigned (librdkafka's
own ``queued.min.messages``: what it prefetches of a partition anyway). A broker may send
one partition far ahead of the others (on Tansu, tens of thousands of records)."""
_FRESH_S = 1.0
"""Offsets looked up this recently are reused at start-up (``initial_offset`` and then
``prepare_for_available_now`` run back to back)."""
_REQUEST_TIMEOUT_S = 10.0
_POLL_S = 0.2
_MAX_BACKOFF_S = 1.0
_CONSUMER_ONLY = ("group.", "isolation.level", "auto.offset.reset", "enable.auto.",
                  "auto.commit.", "enable.partition.eof", "fetch.", "session.timeout.ms",
                  "heartbeat.interval.ms", "max.poll.interval.ms", "partition.assignment",
                  "queued.", "check.crcs", "allow.auto.create.topics", "coordinator.",
                  "on_commit", "group.protocol")  # fmt: skip
_PRODUCER_ONLY = ("linger.ms", "batch.", "compression.", "acks", "request.required.acks",
                  "transactional.", "transaction.", "enable.idempotence", "message.timeout.ms",
                  "message.send.max.retries", "retries", "queue.buffering.", "delivery.",
                  "partitioner", "sticky.", "enable.gapless.guarantee", "dr_", "on_delivery",
                  "request.timeout.ms")  # fmt: skip
_FATAL_CODES = frozenset(
    {
        "_AUTHENTICATION",
        "SASL_AUTHENTICATION_FAILED",
        "TOPIC_AUTHORIZATION_FAILED",
        "GROUP_AUTHORIZATION_FAILED",
        "CLUSTER_AUTHORIZATION_FAILED",
        "_INVALID_ARG",
        "_UNSUPPORTED_FEATURE",
    }
)


def _require_kafka() -> None:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError as exc:
        msg = (
            "the Kafka connector needs confluent-kafka (and fastavro for Avro), which is not "
            "installed: pip install 'microstream[kafka]'"
        )
        raise MissingDependencyError(msg) from exc


def _kafka_error(exc: BaseException) -> KafkaError | None:
    from confluent_kafka import KafkaException

    if isinstance(exc, KafkaException) and exc.args:
        error = exc.args[0]
        return error if hasattr(error, "code") else None
    return None


def _is_transient(exc: BaseException) -> bool:
    """Whether an error from a client call may go away by itself (a broker down, a timeout)."""
    if isinstance(exc, TimeoutError):
        return True
    error = _kafka_error(exc)
    if error is None:
        return False
    return not error.fatal() and error.name() not in _FATAL_CODES


def _client_options(options: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The ``options`` that apply to a client of ``role`` ("consumer", "producer", "admin").

    librdkafka warns about (and ignores) settings of the other kind of client.
    """
    drop = _PRODUCER_ONLY if role == "consumer" else _CONSUMER_ONLY
    return {k: v for k, v in options.items() if not k.startswith(drop)}


# -- offsets ---------------------------------------------------------------------------------------


class KafkaOffset(Offset):
    """The position of every topic-partition: the next offset to read.

    A batch ``(start, end]`` reads offsets ``start[tp] .. end[tp] - 1`` of
    each partition ``tp`` of ``end``; a partition absent from ``start`` (new
    since) is read from offset 0.

    Attributes
    ----------
    topics
        ``{topic: {partition: next offset}}``.
    resets
        Only in the end offset of a batch that followed a data loss with
        ``fail_on_data_loss=False``: ``{topic: {partition: offset}}`` of
        partitions whose log was replaced (the broker lost its data, the topic
        was recreated); the batch reads them from that offset of the new log.
    epoch
        How many such resets happened; an offset with a higher epoch follows
        one with a lower epoch even where its positions are lower.

    Examples
    --------
    >>> a = KafkaOffset(topics={"t": {0: 5, 1: 2}})
    >>> b = KafkaOffset(topics={"t": {0: 7, 1: 2, 2: 4}})
    >>> b.follows_or_equals(a), a.follows_or_equals(b)
    (True, False)
    >>> b.distance(a)  # 2 more in partition 0, 4 in the new partition 2
    6
    """

    topics: dict[str, dict[int, int]] = Field(default_factory=dict)
    resets: dict[str, dict[int, int]] = Field(default_factory=dict)
    epoch: int = Field(default=0, ge=0)

    def positions(self) -> dict[TopicPartitionKey, int]:
        """``{(topic, partition): next offset}``."""
        return {(t, p): pos for t, parts in self.topics.items() for p, pos in parts.items()}

    def read_from(self, tp: TopicPartitionKey, start: KafkaOffset) -> int:
        """Where a batch from ``start`` to this offset begins reading partition ``tp``."""
        if self.epoch > start.epoch:
            reset = self.resets.get(tp[0], {}).get(tp[1])
            if reset is not None:
                return reset
        return start.topics.get(tp[0], {}).get(tp[1], 0)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other`` in every partition of ``other``."""
        start = _kafka_offset(other, "compare with")
        if self.epoch != start.epoch:
            return self.epoch > start.epoch
        mine = self.positions()
        return all(tp in mine and mine[tp] >= pos for tp, pos in start.positions().items())

    def distance(self, other: Offset) -> int | None:
        """Offsets from ``other`` to here, summed over partitions."""
        start = _kafka_offset(other, "measure from")
        return sum(max(0, pos - self.read_from(tp, start)) for tp, pos in self.positions().items())


def _kafka_offset(offset: Offset, action: str) -> KafkaOffset:
    if not isinstance(offset, KafkaOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a KafkaOffset"
        raise OffsetError(msg)
    return offset


def _nest(positions: Mapping[TopicPartitionKey, int]) -> dict[str, dict[int, int]]:
    out: dict[str, dict[int, int]] = {}
    for (t, p), pos in sorted(positions.items()):
        out.setdefault(t, {})[p] = pos
    return out


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
        framing is not supported) or ``"raw"`` (a Binary ``value`` column).
        A tombstone (null value) gives a row of nulls.
    schema
        The value's columns: a mapping of name to polars dtype, or for
        ``"avro"`` an Avro record schema (dict or JSON text). Required
        except for ``"raw"``.
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
        schema: Mapping[str, Any] | pl.Schema | str | None = None,
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
        decoder = make_decoder(format, schema, missing_columns=missing_columns)
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


# -- the runtime source ----------------------------------------------------------------------------


class _Bounds(NamedTuple):
    low: int
    """The earliest offset still in the partition."""
    high: int
    """The end offset (last stable offset under read_committed)."""


class _Loss(NamedTuple):
    tp: TopicPartitionKey
    first: int
    """The first offset lost."""
    end: int | None
    """One past the last offset lost; None when unknown."""
    resume: int | None
    """Where reading continues in this partition; None: the partition is gone."""
    replaced: bool
    """Whether the partition's log was replaced (its end is below the position)."""
    why: str

    def lost(self) -> int:
        """How many offsets are known to be lost (0 when the end is unknown)."""
        return 0 if self.end is None else max(0, self.end - self.first)

    def describe(self) -> str:
        t, p = self.tp
        span = f"[{self.first}, {self.end})" if self.end is not None else f"from {self.first} on"
        return f"topic {t!r} partition {p}: offsets {span} are lost ({self.why})"


class KafkaSource:
    """The runtime side of :class:`KafkaSourceSpec` (see the module docstring).

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.protocols import SourceContext
    >>> from microstream.checkpoint.storage import Storage
    >>> from microstream.testing.tansu import TansuBroker
    >>> with TansuBroker() as broker:
    ...     broker.create_topic("doc-source")
    ...     _ = broker.produce("doc-source", [{"id": 1}, {"id": 2}, {"id": 3}])
    ...     spec = KafkaSourceSpec(
    ...         broker.bootstrap_servers, topic="doc-source", schema={"id": pl.Int64}
    ...     )
    ...     ctx = SourceContext(index=0, storage=Storage("memory://doc-kafka"), query_id="q")
    ...     source = spec.build(ctx)
    ...     start = source.initial_offset()
    ...     end = source.latest_offset(start, rate_limited=False)
    ...     rows = source.read(start, end)["id"].to_list()
    ...     source.stop()
    >>> start.positions(), end.positions(), rows
    ({('doc-source', 0): 0}, {('doc-source', 0): 3}, [1, 2, 3])
    """

    def __init__(self, spec: KafkaSourceSpec, context: SourceContext) -> None:
        _require_kafka()
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self.spec = spec
        self.description = spec.describe()
        self._storage = context.storage
        self._logger = context.logger
        self._side_output = context.side_output
        options = {k: v for k, v in spec.options.items() if k != "group.id"}
        self.group_id: str = str(spec.options.get("group.id") or f"microstream-{context.query_id}")
        self._read_committed = options.get("isolation.level", "read_committed") == "read_committed"
        base: dict[str, Any] = {
            "bootstrap.servers": spec.bootstrap_servers,
            "logger": _CLIENT_LOGGER,
        }
        self._admin: AdminClient = AdminClient({**base, **_client_options(options, "admin")})
        self._consumer: Consumer = Consumer(
            {
                **base,
                **_client_options(options, "consumer"),
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,  # tells when a range ends in a gap
                "auto.offset.reset": "error",  # an out-of-range seek is never silent
                "on_commit": self._on_commit,
            }
        )
        self._pattern = re.compile(spec.pattern) if spec.pattern is not None else None
        self._bounds: dict[TopicPartitionKey, _Bounds] = {}
        self._seen_high: dict[TopicPartitionKey, int] = {}
        self._available_now: dict[TopicPartitionKey, int] | None = None
        self._metrics: dict[str, int] = {}
        self._ignored: dict[str, None] = {}
        """Extra columns reported in this run (ordered), so each is reported once."""
        self._committed: KafkaOffset | None = None
        self._confirmed: set[TopicPartitionKey] = set()
        """Partitions whose data loss was already confirmed (waited out) in this run."""
        self._cursors: dict[TopicPartitionKey, _Cursor] = {}
        """The assigned partitions: what was consumed of each and not read yet."""
        self._planned: tuple[KafkaOffset, KafkaOffset] | None = None
        """The last batch ``latest_offset`` planned, checked against fresh offsets."""
        self._looked_up: tuple[float, dict[TopicPartitionKey, _Bounds]] | None = None
        """When the offsets were last looked up (``time.monotonic()``), and what was found."""
        if spec.dead_letter is not None:
            self._side_output.declare(spec.dead_letter, DEAD_LETTER_SCHEMA)

    # -- talking to the cluster --------------------------------------------------------------

    def _until_stable(
        self, what: str, attempt: Callable[[float], tuple[T, list[_Loss]]]
    ) -> tuple[T, list[_Loss]]:
        """Run ``attempt`` until it succeeds without losses, retrying transient errors.

        A loss found is retried too (a restarting broker briefly shows no
        topics) and returned once it persisted for ``retry_timeout``, or at
        once if its partitions' losses were confirmed before in this run.
        """
        deadline = time.monotonic() + self.spec.retry_timeout_s
        delay = 0.05
        warned = False
        while True:
            remaining = deadline - time.monotonic()
            timeout = max(0.5, min(_REQUEST_TIMEOUT_S, remaining))
            try:
                result, losses = attempt(timeout)
                if not losses:
                    if warned:
                        self._logger.warning("%s: %s succeeded again", self.description, what)
                    return result, losses
                problem = "; ".join(loss.describe() for loss in losses)
                self._forget()  # what was consumed may be of a log that is gone
                if remaining <= 0 or all(loss.tp in self._confirmed for loss in losses):
                    self._confirmed.update(loss.tp for loss in losses)
                    return result, losses
            except Exception as exc:
                if not _is_transient(exc):
                    msg = f"{self.description}: cannot {what}: {exc}"
                    raise SourceError(msg) from exc
                problem = str(exc)
                self._forget()  # the broker may come back without what was consumed
                if remaining <= 0:
                    msg = (
                        f"{self.description}: cannot {what} on {self.spec.bootstrap_servers}: "
                        f"still failing after retry_timeout={self.spec.retry_timeout_s:g}s: {exc}"
                    )
                    raise SourceError(msg) from exc
            if not warned:
                self._logger.warning(
                    "%s: cannot %s yet (%s); retrying for up to %gs",
                    self.description,
                    what,
                    problem,
                    self.spec.retry_timeout_s,
                )
                warned = True
            time.sleep(min(delay, max(0.0, remaining)))
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def _partitions(self, timeout: float) -> list[TopicPartitionKey]:
        """The subscribed topic-partitions that exist now."""
        metadata = self._admin.list_topics(timeout=timeout)
        found: list[TopicPartitionKey] = []
        for name, topic in metadata.topics.items():
            if self.spec.topics is not None:
                if name not in self.spec.topics:
                    continue
            elif (
                name.startswith("__") or self._pattern is None or not self._pattern.fullmatch(name)
            ):
                continue
            if topic.error is not None:
                if topic.error.name() == "UNKNOWN_TOPIC_OR_PART":
                    continue
                raise _retryable(f"topic {name!r} metadata: {topic.error}")
            found.extend((name, p) for p in topic.partitions)
        return sorted(found)

    def _fetch_bounds(self, timeout: float) -> dict[TopicPartitionKey, _Bounds]:
        """Earliest and end offsets of every subscribed partition (two bulk requests)."""
        from confluent_kafka import IsolationLevel, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        parts = self._partitions(timeout)
        if not parts:
            return {}
        level = (
            IsolationLevel.READ_COMMITTED
            if self._read_committed
            else IsolationLevel.READ_UNCOMMITTED
        )
        # Both requests are sent before either answer is awaited (one round trip).
        requests = {
            name: self._admin.list_offsets(
                {TopicPartition(t, p): spec for t, p in parts},
                isolation_level=level,
                request_timeout=timeout,
            )
            for name, spec in (("low", OffsetSpec.earliest()), ("high", OffsetSpec.latest()))
        }
        found: dict[str, dict[TopicPartitionKey, int]] = {}
        for name, futures in requests.items():
            values: dict[TopicPartitionKey, int] = {}
            for request, future in futures.items():
                offset = future.result(timeout=timeout + 1).offset
                if offset < 0:  # a broker that did not answer in time reports -1001
                    raise _retryable(f"no {name} offset for {request.topic}-{request.partition}")
                values[(request.topic, request.partition)] = offset
            found[name] = values
        bounds = {tp: _Bounds(found["low"][tp], found["high"][tp]) for tp in parts}
        for tp, b in bounds.items():
            self._seen_high[tp] = max(self._seen_high.get(tp, 0), b.high)
        self._looked_up = (time.monotonic(), bounds)
        return bounds

    # -- offsets -----------------------------------------------------------------------------

    def parse_offset(self, data: dict[str, Any]) -> KafkaOffset:
        """The :class:`KafkaOffset` from its JSON form in the write-ahead log."""
        try:
            return KafkaOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a Kafka offset (expected "
                f"{{'topics': {{topic: {{partition: offset}}}}, ...}}): {exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def initial_offset(self) -> KafkaOffset:
        """The positions ``starting_offsets`` resolves to, resolved once and kept.

        Written to ``sources/<n>/initial.json`` the first time, so a query
        that stops before its first batch starts again at the same place
        (``"latest"`` does not move on).
        """
        if self._storage.exists("initial.json"):
            return self._storage.read_model("initial.json", KafkaOffset)
        bounds, _ = self._until_stable("look up the starting offsets", self._stable_bounds)
        wanted = self.spec.starting_offsets
        if wanted == "earliest":
            positions = {tp: b.low for tp, b in bounds.items()}
        elif wanted == "latest":
            positions = {tp: b.high for tp, b in bounds.items()}
        elif isinstance(wanted, int):
            positions = self._offsets_for_time(wanted, bounds)
        else:
            assert isinstance(wanted, dict)
            unknown = [
                f"{t}-{p}" for t, parts in wanted.items() for p in parts if (t, p) not in bounds
            ]
            if unknown:
                msg = (
                    f"{self.description}: starting_offsets names partition(s) {unknown} that do "
                    f"not exist; the subscribed partitions are {sorted(bounds)}"
                )
                raise SourceError(msg)
            positions = {}
            for tp, b in bounds.items():
                pos = wanted.get(tp[0], {}).get(tp[1], -2)
                positions[tp] = b.low if pos == -2 else b.high if pos == -1 else pos
        offset = KafkaOffset(topics=_nest(positions))
        self._storage.write_model("initial.json", offset, overwrite=False)
        return offset

    def _stable_bounds(
        self, timeout: float
    ) -> tuple[dict[TopicPartitionKey, _Bounds], list[_Loss]]:
        return self._fetch_bounds(timeout), []

    def _offsets_for_time(
        self, timestamp_ms: int, bounds: Mapping[TopicPartitionKey, _Bounds]
    ) -> dict[TopicPartitionKey, int]:
        from confluent_kafka import TopicPartition

        def attempt(timeout: float) -> tuple[dict[TopicPartitionKey, int], list[_Loss]]:
            request = [TopicPartition(t, p, timestamp_ms) for t, p in bounds]
            found = self._consumer.offsets_for_times(request, timeout=timeout)
            out = {}
            for tp in found:
                key = (tp.topic, tp.partition)
                # -1: no record at or after the timestamp, so start at the end.
                out[key] = bounds[key].high if tp.offset < 0 else tp.offset
            return out, []

        return self._until_stable("look up offsets by timestamp", attempt)[0] if bounds else {}

    def _start_losses(
        self, start: KafkaOffset, bounds: Mapping[TopicPartitionKey, _Bounds]
    ) -> list[_Loss]:
        """Positions of ``start`` that the partitions no longer hold."""
        losses = []
        for tp, pos in start.positions().items():
            seen = self._seen_high.get(tp)
            known_end = seen if seen is not None and seen > pos else None
            b = bounds.get(tp)
            if b is None:
                why = "the partition no longer exists: the topic was deleted or the broker lost it"
                losses.append(_Loss(tp, pos, known_end, None, True, why))
            elif b.high < pos:
                why = (
                    f"the partition now ends at offset {b.high}, before the query's position "
                    f"{pos}: its log was truncated or replaced (a broker that lost its data, a "
                    "topic recreated)"
                )
                losses.append(_Loss(tp, pos, known_end, b.low, True, why))
            elif b.low > pos:
                why = (
                    f"the earliest offset still in the partition is {b.low} (retention or deletion)"
                )
                losses.append(_Loss(tp, pos, b.low, b.low, False, why))
        return losses

    def _data_loss(self, losses: Sequence[_Loss], where: str) -> DataLossError:
        details = "; ".join(loss.describe() for loss in losses)
        msg = (
            f"{self.description}: data loss {where}: {details}. Pass fail_on_data_loss=False "
            "to continue from the earliest available offsets (the loss is counted in progress "
            "as offsets_lost), or start over with a new checkpoint"
        )
        return DataLossError(msg)

    def _count(self, name: str, n: int) -> None:
        if n:
            self._metrics[name] = self._metrics.get(name, 0) + n

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> KafkaOffset:
        """The end of the next batch: every partition's end, within the rate limit.

        Raises
        ------
        DataLossError
            A position of ``start`` no longer exists in its partition (after
            ``retry_timeout``), with ``fail_on_data_loss=True``.
        SourceError
            The cluster stayed unreachable for ``retry_timeout``.
        """
        begin = _kafka_offset(start, "start a batch at")

        def attempt(timeout: float) -> tuple[dict[TopicPartitionKey, _Bounds], list[_Loss]]:
            bounds = self._fetch_bounds(timeout)
            return bounds, self._start_losses(begin, bounds)

        if (
            self._available_now is not None
            and self.spec.fail_on_data_loss
            and not self._start_losses(begin, self._bounds)
        ):
            # Available now: the ends were fixed at start (as Spark does), so the offsets
            # are not looked up again for every batch; a loss since then shows when the
            # batch's records are fetched (``_fetch``).
            bounds, losses = self._bounds, list[_Loss]()
        else:
            bounds, losses = self._until_stable("look up the latest offsets", attempt)
        self._bounds = bounds
        base = begin.positions()
        resets: dict[TopicPartitionKey, int] = {}
        if losses:
            if self.spec.fail_on_data_loss:
                raise self._data_loss(losses, "before the next batch")
            for loss in losses:
                if not loss.replaced:
                    continue  # retention: read() skips to the earliest offset and counts
                lost = loss.lost() + (loss.resume or 0)  # plus the new log's deleted head
                self._count("offsets_lost", lost)
                del base[loss.tp]
                if loss.resume is not None:
                    resets[loss.tp] = loss.resume
                    self._seen_high[loss.tp] = bounds[loss.tp].high  # the new log's
                self._logger.warning(
                    "%s: data loss: %s; continuing from %s (fail_on_data_loss=False)",
                    self.description,
                    loss.describe(),
                    "nothing: the partition is gone"
                    if loss.resume is None
                    else f"offset {loss.resume} of the new log",
                )
        ends: dict[TopicPartitionKey, int] = {}
        available: dict[TopicPartitionKey, int] = {}
        for tp, b in bounds.items():
            first = resets.get(tp, base.get(tp, 0))
            high = b.high
            if self._available_now is not None:
                high = min(high, self._available_now.get(tp, first))
            ends[tp] = first
            available[tp] = max(0, high - first)
            if tp not in base and tp not in resets and available[tp] == 0:
                del ends[tp]  # a new, empty partition: nothing to log yet
        for tp, pos in base.items():
            ends.setdefault(tp, pos)  # gone but not a loss (never happens) or not listed
        limit = self.spec.max_offsets_per_trigger
        grant = _apportion(available, limit) if rate_limited and limit is not None else available
        for tp, n in grant.items():
            if tp in ends:
                ends[tp] += n
        if not resets and ends == begin.positions() and len(base) == len(begin.positions()):
            return begin
        planned = KafkaOffset(
            topics=_nest(ends),
            resets=_nest(resets),
            epoch=begin.epoch + (1 if resets or len(base) != len(begin.positions()) else 0),
        )
        self._planned = None if losses else (begin, planned)
        return planned

    def prepare_for_available_now(self) -> None:
        """Fix the end of every partition as it is now; later records wait for the next run."""
        recent = self._looked_up
        if recent is not None and time.monotonic() - recent[0] < _FRESH_S:
            bounds = recent[1]  # looked up a moment ago, by ``initial_offset``
        else:
            bounds, _ = self._until_stable("look up the latest offsets", self._stable_bounds)
        self._available_now = {tp: b.high for tp, b in bounds.items()}
        self._bounds = bounds

    def lag(self, end: Offset) -> int | None:
        """Offsets available beyond ``end`` at the last look-up (all partitions)."""
        positions = _kafka_offset(end, "measure lag from").positions()
        return sum(max(0, b.high - positions.get(tp, 0)) for tp, b in self._bounds.items())

    def metrics(self) -> dict[str, int]:
        """Counts since the previous call: ``bad_records_skipped``,
        ``bad_records_dead_lettered``, ``new_columns_ignored``, ``offsets_lost``
        (only those not zero)."""
        out, self._metrics = self._metrics, {}
        return out

    # -- reading -----------------------------------------------------------------------------

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The records of ``(start, end]``, decoded, ordered by topic, partition and offset.

        Raises
        ------
        DataLossError
            Offsets of the range no longer exist, with ``fail_on_data_loss=True``.
        SourceError
            A bad record with ``on_bad_record="fail"``, or the cluster stayed
            unreachable for ``retry_timeout``.
        """
        begin, stop = _kafka_offset(start, "read from"), _kafka_offset(end, "read to")
        ranges = {
            tp: (stop.read_from(tp, begin), pos)
            for tp, pos in stop.positions().items()
            if stop.read_from(tp, begin) < pos
        }
        if not ranges:
            return pl.DataFrame(schema=self.spec.schema)
        planned = self._planned == (begin, stop) and self.spec.fail_on_data_loss
        if not planned:
            # A batch planned by ``latest_offset`` of this run was checked against offsets
            # looked up just before (a loss since then shows when fetching, see ``_fetch``);
            # a replayed batch, or one that may have to skip lost offsets, is checked here.

            def attempt(timeout: float) -> tuple[None, list[_Loss]]:
                bounds = self._fetch_bounds(timeout)
                return None, _range_losses(ranges, bounds)

            _, losses = self._until_stable("look up the offsets of the batch", attempt)
            if losses:
                if self.spec.fail_on_data_loss:
                    raise self._data_loss(losses, "in the logged range of the batch")
                for loss in losses:
                    self._count("offsets_lost", loss.lost())
                    a, b = ranges[loss.tp]
                    if loss.first == a and loss.resume is not None:
                        ranges[loss.tp] = (loss.resume, b)  # the head was deleted
                    else:
                        ranges[loss.tp] = (a, loss.first)  # the tail is gone
                    self._logger.warning(
                        "%s: data loss: %s (fail_on_data_loss=False)",
                        self.description,
                        loss.describe(),
                    )
                ranges = {tp: r for tp, r in ranges.items() if r[0] < r[1]}
        records = self._fetch(ranges) if ranges else _Records.empty()
        return self._decode(records)

    # The consumer stays assigned between batches: librdkafka keeps fetching the next
    # records while the batch is decoded, computed and written, and records consumed past
    # a partition's end in one batch are kept (``_Cursor.stash``) for the next one, which
    # then starts where this one ended. Any change of the assignment (a seek, a new
    # partition, one unassigned while too far ahead) assigns every partition again at an
    # explicit offset, its cursor's ``next``, so where each partition goes on never
    # depends on what librdkafka had fetched ahead and drops on such a change.

    def _assign(self) -> None:
        """Assign every attached partition at its cursor's ``next`` (the whole assignment)."""
        from confluent_kafka import TopicPartition

        self._consumer.assign(
            [TopicPartition(t, p, c.next) for (t, p), c in self._cursors.items() if not c.detached]
        )

    def _position(self, ranges: Mapping[TopicPartitionKey, tuple[int, int]]) -> None:
        """Make the consumer deliver every partition of ``ranges`` from its range's start."""
        changed = False
        for tp, (a, _) in ranges.items():
            cursor = self._cursors.get(tp)
            if cursor is not None and cursor.start <= a <= cursor.next:
                cursor.drop_before(a)
                if cursor.detached:
                    cursor.detached = False
                    changed = True
            else:
                self._cursors[tp] = _Cursor(a)
                changed = True
        if changed:
            self._assign()

    def _forget(self, tps: Sequence[TopicPartitionKey] | None = None) -> None:
        """Unassign ``tps`` (default: every partition) and drop what was kept of them."""
        gone = [tp for tp in (self._cursors if tps is None else tps) if tp in self._cursors]
        if not gone:
            return
        for tp in gone:
            del self._cursors[tp]
        with contextlib.suppress(Exception):  # a closed consumer
            if self._cursors:
                self._assign()
            else:
                self._consumer.unassign()

    def _fetch(self, ranges: Mapping[TopicPartitionKey, tuple[int, int]]) -> _Records:
        """Every record of ``ranges`` (``{tp: (first, end)}``), by bulk ``consume``."""
        try:
            self._position(ranges)
            self._consume_until(ranges)
        except BaseException:
            self._forget()  # start clean: the next read assigns and seeks again
            raise
        segments = []
        for tp in sorted(ranges):
            segments.append((tp, *self._cursors[tp].take_until(ranges[tp][1])))
        return _Records.join(segments)

    def _consume_until(self, ranges: Mapping[TopicPartitionKey, tuple[int, int]]) -> None:
        """Consume until every partition of ``ranges`` delivered its records up to the end."""
        consumer = self._consumer
        cursors = self._cursors
        pending = {tp: b for tp, (_, b) in ranges.items() if cursors[tp].next < b}
        single = next(iter(cursors)) if len(cursors) == 1 else None
        deadline = time.monotonic() + self.spec.retry_timeout_s
        while pending:
            # As many as the pending partitions still miss (consume returns as soon as it
            # has that many): records of other partitions, or past an end, are kept.
            wanted = sum(b - cursors[tp].next for tp, b in pending.items())
            batch = consumer.consume(num_messages=min(_FETCH_MAX, max(1, wanted)), timeout=_POLL_S)
            if not batch:
                if time.monotonic() > deadline:
                    raise self._stalled(pending)
                continue
            deadline = time.monotonic() + self.spec.retry_timeout_s
            ends: list[tuple[TopicPartitionKey, int]] = []
            if any(m.error() is not None for m in batch):
                batch, ends = self._errors_out(batch, pending)
            if batch:
                # Route the records to their partitions in bulk: one call per record for
                # its offset (and, with several partitions, its partition), numpy for the
                # rest.
                offsets = np.fromiter((m.offset() for m in batch), np.int64, len(batch))
                if single is not None:
                    cursors[single].add(batch, offsets)
                else:
                    self._route(batch, offsets)
            for tp, offset in ends:  # a range may end in a gap (transaction markers)
                if tp in cursors:
                    cursors[tp].reached(offset)
            done = [tp for tp, b in pending.items() if cursors[tp].next >= b]
            for tp in done:
                del pending[tp]
            # A partition far ahead of the others is unassigned (its records wait in the
            # broker, not in memory); the batch that needs it assigns it again at ``next``.
            full = [
                tp
                for tp, c in cursors.items()
                if tp not in pending and not c.detached and len(c.stash) > _STASH_MAX
            ]
            if full:
                for tp in full:
                    cursors[tp].detached = True
                self._assign()

    def _route(self, batch: list[Message], offsets: np.ndarray) -> None:
        """Append each record of ``batch`` to its partition's cursor (partitions interleave)."""
        cursors = self._cursors
        if len({t for t, _ in cursors}) == 1:
            codes = np.fromiter((m.partition() for m in batch), np.int64, len(batch))
            owner = {p: (t, p) for t, p in cursors}
        else:
            index: dict[Any, int] = {tp: i for i, tp in enumerate(cursors)}
            codes = np.fromiter(
                (index.get((m.topic(), m.partition()), -1) for m in batch),
                np.int64,
                len(batch),
            )
            owner = {i: tp for tp, i in index.items()}
        if codes[0] == codes[-1] and (codes == codes[0]).all():
            groups = [np.arange(len(batch))]
        else:
            order = np.argsort(codes, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
        for group in groups:
            tp = owner.get(int(codes[group[0]]))
            if tp is None:  # a partition unassigned meanwhile: not ours any more
                continue
            if len(group) == len(batch):
                cursors[tp].add(batch, offsets)
            else:
                cursors[tp].add([batch[i] for i in group.tolist()], offsets[group])

    def _errors_out(
        self, batch: list[Message], pending: dict[TopicPartitionKey, int]
    ) -> tuple[list[Message], list[tuple[TopicPartitionKey, int]]]:
        """The records of ``batch``, and the ends of partitions it reached.

        Errors are handled (data loss, fatal errors); an end of partition
        (``_PARTITION_EOF``) is returned, to be applied after the records of
        the same call, which come before it.
        """
        from confluent_kafka import KafkaError

        records = []
        ends: list[tuple[TopicPartitionKey, int]] = []
        for m in batch:
            error = m.error()
            if error is None:
                records.append(m)
                continue
            tp = _key_of(m) if m.topic() is not None else None
            if error.code() == KafkaError._PARTITION_EOF:
                if tp is not None:
                    ends.append((tp, _offset_of(m)))
            elif tp is not None and tp not in pending:
                self._forget([tp])  # not read in this batch: seek afresh when it is
            elif error.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                msg = (
                    f"{self.description}: offsets of topic {m.topic()!r} partition "
                    f"{m.partition()} went out of range while reading them: {error}"
                )
                raise DataLossError(msg)
            elif not _is_transient(_as_exception(error)):
                msg = f"{self.description}: consuming failed: {error}"
                raise SourceError(msg)
        return records, ends

    def _stalled(self, pending: Mapping[TopicPartitionKey, int]) -> SourceError:
        """The error for records that did not come for ``retry_timeout``: a loss, if it is one.

        A broker that lost the records may answer a fetch with none (Tansu
        does) rather than an out-of-range error: the offsets are looked up.
        """
        missing = {tp: (self._cursors[tp].next, b) for tp, b in pending.items()}
        text = ", ".join(f"{t}-{p} [{a}, {b})" for (t, p), (a, b) in missing.items())

        def attempt(timeout: float) -> tuple[None, list[_Loss]]:
            return None, _range_losses(missing, self._fetch_bounds(timeout))

        try:
            _, losses = self._until_stable(
                "look up the offsets of records that do not come", attempt
            )
        except SourceError:
            losses = []
        if losses and self.spec.fail_on_data_loss:
            return self._data_loss(losses, "while reading the batch")
        if losses:
            details = "; ".join(loss.describe() for loss in losses)
            msg = (
                f"{self.description}: offsets of the batch were lost while reading it: "
                f"{details}. The query stops; a restart re-reads the batch and continues past "
                "them (fail_on_data_loss=False)"
            )
            return SourceError(msg)
        msg = (
            f"{self.description}: no records from {self.spec.bootstrap_servers} "
            f"for {self.spec.retry_timeout_s:g}s while reading {text}"
        )
        return SourceError(msg)

    def _decode(self, records: _Records) -> pl.DataFrame:
        spec = self.spec
        messages = records.messages
        meta = pl.DataFrame(
            {
                "topic": records.topics,
                "partition": records.partitions,
                "offset": records.offsets,
            }
        )
        if spec.include_metadata:
            stamps = [m.timestamp() for m in messages]
            meta = meta.with_columns(
                key=pl.Series([m.key() for m in messages], dtype=pl.Binary),
                timestamp=pl.Series([s[1] if s[0] else None for s in stamps], dtype=pl.Int64)
                .cast(pl.Datetime("ms"))
                .dt.replace_time_zone("UTC"),
            )
        if spec.include_headers:
            meta = meta.with_columns(
                headers=pl.Series(
                    [[{"key": k, "value": v} for k, v in _headers_of(m)] for m in messages],
                    dtype=HEADERS_DTYPE,
                )
            )
        decoded = spec.decoder.decode([m.value() for m in messages], seen=tuple(self._ignored))
        if decoded.bad:
            self._bad_records(decoded.bad, messages)
        if decoded.missing or decoded.extra:
            self._schema_drift(decoded.extra, decoded.missing, messages)
        if decoded.index is not None:
            meta = meta[decoded.index]
        frame = pl.concat([decoded.frame, meta], how="horizontal")
        return frame.select(spec.schema.names())

    def _bad_records(self, bad: list[tuple[int, str]], messages: list[Message]) -> None:
        spec = self.spec
        first, why = bad[0]
        m = messages[first]
        where = f"topic {m.topic()!r} partition {m.partition()} offset {m.offset()}"
        if spec.on_bad_record == "fail":
            more = f" (and {len(bad) - 1} more in this batch)" if len(bad) > 1 else ""
            msg = (
                f"{self.description}: bad record at {where}: {why}{more}. Fix or remove it, or "
                "pass on_bad_record='skip' or 'dead_letter'"
            )
            raise SourceError(msg)
        if spec.on_bad_record == "skip":
            self._count("bad_records_skipped", len(bad))
            self._logger.warning(
                "%s: skipped %d bad record(s); the first at %s: %s",
                self.description,
                len(bad),
                where,
                why,
            )
            return
        rows = [messages[i] for i, _ in bad]
        dead = pl.DataFrame(
            {
                "topic": [r.topic() for r in rows],
                "partition": [r.partition() for r in rows],
                "offset": [r.offset() for r in rows],
                "key": [r.key() for r in rows],
                "value": [r.value() for r in rows],
                "reason": [reason for _, reason in bad],
            },
            schema=DEAD_LETTER_SCHEMA,
        )
        assert spec.dead_letter is not None
        self._side_output.emit(spec.dead_letter, dead)
        self._count("bad_records_dead_lettered", len(bad))

    def _schema_drift(
        self, extra: Mapping[str, int], missing: Mapping[str, int], messages: list[Message]
    ) -> None:
        """Apply ``missing_columns`` and ``extra_columns`` to what the decoder found."""
        spec = self.spec

        def where(i: int) -> str:
            m = messages[i]
            return f"topic {m.topic()!r} partition {m.partition()} offset {m.offset()}"

        if missing:
            column, first = min(missing.items(), key=lambda item: item[1])
            msg = (
                f"{self.description}: the record at {where(first)} lacks column {column!r} of "
                "the schema (missing_columns='raise'). Pass missing_columns='insert' to read "
                "it as null, or remove the column from schema="
            )
            raise SchemaMismatchError(msg)
        if spec.extra_columns == "raise":
            column, first = min(extra.items(), key=lambda item: item[1])
            msg = (
                f"{self.description}: the record at {where(first)} has "
                f"{spec.decoder.describe_extra(column)} (extra_columns='raise'). Add it to "
                "schema= to read it, or pass extra_columns='ignore' to drop it (reported once)"
            )
            raise SchemaMismatchError(msg)
        new = {c: i for c, i in extra.items() if c not in self._ignored}
        for column, first in sorted(new.items(), key=lambda item: item[1]):
            self._logger.warning(
                "%s: the record at %s has %s; it is not read (extra_columns='ignore', "
                "reported once per run). Add it to schema= to read it",
                self.description,
                where(first),
                spec.decoder.describe_extra(column),
            )
        self._ignored.update(dict.fromkeys(new))
        self._count("new_columns_ignored", len(new))

    # -- after the batch -----------------------------------------------------------------------

    def commit(self, end: Offset) -> None:
        """Commit ``end``'s positions as the group's offsets, for lag monitoring.

        Asynchronous: a synchronous commit blocks for as long as the broker is
        down. Failures are logged, never fatal (the checkpoint is the truth).
        """
        from confluent_kafka import TopicPartition

        offset = _kafka_offset(end, "commit")
        if offset == self._committed or not offset.topics:
            return
        try:
            # Its callback is served by the next ``consume`` (not ``poll``: the consumer
            # stays assigned, and a poll would take a record).
            self._consumer.commit(
                offsets=[TopicPartition(t, p, pos) for (t, p), pos in offset.positions().items()],
                asynchronous=True,
            )
        except Exception as exc:
            self._logger.warning(
                "%s: cannot commit offsets of group %s: %s", self.description, self.group_id, exc
            )
            return
        self._committed = offset

    def _on_commit(self, error: Any, partitions: Any) -> None:
        if error is not None:
            self._logger.warning(
                "%s: committing offsets of group %s failed: %s",
                self.description,
                self.group_id,
                error,
            )

    def stop(self) -> None:
        """Close the consumer (after serving pending commit callbacks)."""
        with contextlib.suppress(RuntimeError):  # already closed
            self._consumer.close()


class _Cursor:
    """One assigned partition: records consumed and not yet read by a batch.

    ``stash`` holds the partition's records from offset ``start`` up to
    ``next`` (exclusive; offsets may have gaps, e.g. transaction markers), in
    offset order; the consumer delivers the partition's records from ``next``
    on (once assigned again, if ``detached``).
    """

    __slots__ = ("_offsets", "detached", "next", "start", "stash")

    def __init__(self, start: int) -> None:
        self.start = start
        self.next = start
        self.stash: list[Message] = []
        self._offsets: list[np.ndarray] = []
        self.detached = False
        """Unassigned while its stash is full; assigned again at ``next``."""

    def add(self, messages: list[Message], offsets: np.ndarray) -> None:
        """Records the consumer delivered, in offset order."""
        if offsets[0] < self.next:  # (never seen: a record delivered twice)
            keep = np.flatnonzero(offsets >= self.next)
            if not len(keep):
                return
            messages, offsets = [messages[i] for i in keep.tolist()], offsets[keep]
        self.stash.extend(messages)
        self._offsets.append(offsets)
        self.next = int(offsets[-1]) + 1

    def reached(self, offset: int) -> None:
        """The end of the partition was at ``offset``: nothing below it is left to deliver."""
        self.next = max(self.next, offset)

    def _flat(self) -> np.ndarray:
        if len(self._offsets) != 1:
            self._offsets = [
                np.concatenate(self._offsets) if self._offsets else np.empty(0, np.int64)
            ]
        return self._offsets[0]

    def drop_before(self, offset: int) -> None:
        """Forget the records below ``offset``."""
        if offset > self.start:
            offsets = self._flat()
            k = int(np.searchsorted(offsets, offset))
            del self.stash[:k]
            self._offsets = [offsets[k:]]
            self.start = offset

    def take_until(self, end: int) -> tuple[list[Message], np.ndarray]:
        """The records below ``end``, removed; the stash then starts at ``end``."""
        offsets = self._flat()
        k = int(np.searchsorted(offsets, end))
        taken, self.stash = self.stash[:k], self.stash[k:]
        self._offsets = [offsets[k:]]
        self.start = max(self.start, end)
        return taken, offsets[:k]


class _Records(NamedTuple):
    """The records of a batch, ordered by topic, partition and offset, with those columns."""

    messages: list[Message]
    topics: pl.Series
    partitions: pl.Series
    offsets: pl.Series

    @staticmethod
    def join(segments: Sequence[tuple[TopicPartitionKey, list[Message], np.ndarray]]) -> _Records:
        """The records of each partition's segment, one after the other."""
        messages: list[Message] = []
        for _, part, _ in segments:
            messages.extend(part)
        lengths = np.array([len(part) for _, part, _ in segments], dtype=np.int64)
        which = pl.Series(np.repeat(np.arange(len(segments), dtype=np.int64), lengths))
        return _Records(
            messages,
            pl.Series("topic", [t for (t, _), _, _ in segments], pl.String).gather(which),
            pl.Series("partition", [p for (_, p), _, _ in segments], pl.Int32).gather(which),
            pl.Series(
                "offset",
                np.concatenate([o for _, _, o in segments]) if segments else [],
                pl.Int64,
            ),
        )

    @staticmethod
    def empty() -> _Records:
        return _Records.join([])


def _key_of(message: Message) -> TopicPartitionKey:
    return (str(message.topic()), int(message.partition() or 0))


def _offset_of(message: Message) -> int:
    offset = message.offset()
    return -1 if offset is None else offset


def _headers_of(message: Message) -> list[tuple[str, Any]]:
    headers = message.headers()
    if headers is None:
        return []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def _retryable(text: str) -> Exception:
    """A transient error raised by the source itself (a timeout-like condition)."""
    return TimeoutError(text)


def _as_exception(error: KafkaError) -> Exception:
    from confluent_kafka import KafkaException

    return KafkaException(error)


def _range_losses(
    ranges: Mapping[TopicPartitionKey, tuple[int, int]], bounds: Mapping[TopicPartitionKey, _Bounds]
) -> list[_Loss]:
    """Offsets of the logged ``ranges`` that the partitions no longer hold."""
    losses = []
    for tp, (a, b) in ranges.items():
        bound = bounds.get(tp)
        if bound is None:
            why = "the partition no longer exists: the topic was deleted or the broker lost it"
            losses.append(_Loss(tp, a, b, None, True, why))
            continue
        if bound.low > a:
            why = (
                f"the earliest offset still in the partition is {bound.low} (retention or deletion)"
            )
            losses.append(_Loss(tp, a, min(bound.low, b), min(bound.low, b), False, why))
        if bound.high < b:
            first = max(a, bound.high, bound.low)
            why = (
                f"the partition now ends at offset {bound.high}: its log was truncated or "
                "replaced (a broker that lost its data, a topic recreated)"
            )
            if first < b:
                losses.append(_Loss(tp, first, b, None, True, why))
    return losses


def _apportion(
    available: Mapping[TopicPartitionKey, int], limit: int
) -> dict[TopicPartitionKey, int]:
    """Split ``limit`` offsets across partitions in proportion to what each has.

    Examples
    --------
    >>> _apportion({("t", 0): 10, ("t", 1): 30}, 8)
    {('t', 0): 2, ('t', 1): 6}
    >>> _apportion({("t", 0): 1, ("t", 1): 1, ("t", 2): 1}, 2)
    {('t', 0): 1, ('t', 1): 1, ('t', 2): 0}
    """
    total = sum(available.values())
    if total <= limit:
        return dict(available)
    share = {tp: limit * n // total for tp, n in available.items()}
    left = limit - sum(share.values())
    by_remainder = sorted(available, key=lambda tp: (-(limit * available[tp] % total), tp))
    for tp in by_remainder[:left]:
        share[tp] += 1
    return share


# -- the sink --------------------------------------------------------------------------------------

QUERY_ID_HEADER = "microstream.query_id"
BATCH_ID_HEADER = "microstream.batch_id"


@dataclass(frozen=True)
class KafkaSinkSpec:
    """Write each batch's rows as records of a Kafka topic.

    Parameters
    ----------
    bootstrap_servers
        ``"host:port[,host:port...]"`` of the cluster.
    topic
        The topic written to (it should exist, or the cluster auto-create it).
    key
        The record key: a column name or a polars expression over the batch
        (String and Binary as they are, other dtypes as their text); None: no
        key (the producer spreads records over partitions).
    format
        The record value: ``"json"`` (every column as one JSON object,
        written by Polars' NDJSON writer; Binary columns as base64),
        ``"avro"`` (every column, plain schemaless Avro of ``avro_schema``,
        derived from the batch's schema by default; encoded row by row by
        fastavro) or ``"raw"`` (the ``value`` column, Binary or String; the
        batch may hold only ``value`` and the key's column).
    avro_schema
        The Avro record schema of ``format="avro"`` values.
    headers
        Headers added to every record, after ``microstream.query_id`` and
        ``microstream.batch_id``.
    transactional
        One Kafka transaction per batch (see Notes).
    options
        librdkafka producer settings (``security.protocol``, ``sasl.*``,
        ``ssl.*``, ``compression.type``, ``transactional.id``, ...).

    Notes
    -----
    Every record has the headers ``microstream.query_id`` (the query's
    stable id) and ``microstream.batch_id`` (the batch, as decimal text).
    The producer is idempotent (``enable.idempotence=true``: no duplicates
    or reordering from its own retries). After a batch is written, the sink
    records it as the committed offset ``batch_id + 1`` of consumer group
    ``microstream-sink-<query id>`` on partition 0 of the topic; a batch
    re-run at or below it is skipped.

    - **Default (at-least-once).** ``add_batch`` returns once every record
      is acknowledged; a failed delivery is a
      :class:`~microstream.SinkError` and the batch is re-run on restart.
      A process that dies after the records landed and before the batch was
      recorded writes them again on restart: consumers deduplicate on
      ``(microstream.query_id, microstream.batch_id)``, or on their own keys.
    - **transactional=True (exactly-once for read_committed consumers, on
      brokers that honour transactions).** Each batch is one transaction
      (``transactional.id`` ``microstream-<query id>`` unless ``options``
      set one), committed together with the batch record; an error aborts
      it. A re-run of a committed batch is skipped, and the records of an
      aborted or unfinished attempt are never seen by ``read_committed``
      consumers. This was not verified on the test broker (Tansu does not
      honour ``read_committed``); only that records land with their headers
      and that a committed batch is skipped.

    Examples
    --------
    >>> import polars as pl
    >>> spec = KafkaSinkSpec("127.0.0.1:9092", "out", key=pl.col("user").cast(pl.String))
    >>> spec.describe(), sorted(spec.output_modes)
    ('KafkaSink[out]', ['append', 'complete', 'update'])
    """

    kind: ClassVar[str] = "kafka_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = True

    bootstrap_servers: str
    topic: str
    _: KW_ONLY
    key: str | pl.Expr | None = field(default=None, compare=False)
    format: KafkaSinkFormat = "json"
    avro_schema: Mapping[str, Any] | str | None = field(default=None, compare=False)
    headers: Mapping[str, str | bytes] | None = None
    transactional: bool = False
    options: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers.strip():
            msg = f"bootstrap_servers must be 'host:port[,host:port...]'; got {self.bootstrap_servers!r}"
            raise ValueError(msg)
        if not isinstance(self.topic, str) or not self.topic:
            msg = f"topic must be a topic name; got {self.topic!r}"
            raise ValueError(msg)
        if self.format not in ("json", "avro", "raw"):
            msg = f"format must be 'json', 'avro' or 'raw'; got {self.format!r}"
            raise ValueError(msg)
        if self.key is not None and not isinstance(self.key, (str, pl.Expr)):
            msg = f"key must be a column name, a polars expression or None; got {self.key!r}"
            raise ValueError(msg)
        if self.avro_schema is not None and self.format != "avro":
            msg = f"avro_schema= is used only with format='avro'; got format={self.format!r}"
            raise ValueError(msg)
        if not isinstance(self.transactional, bool):
            msg = f"transactional must be a bool; got {self.transactional!r}"
            raise ValueError(msg)
        for name, value in (self.headers or {}).items():
            if not isinstance(name, str) or not isinstance(value, (str, bytes)):
                msg = (
                    f"headers must map names (str) to str or bytes values; got {name!r}: {value!r}"
                )
                raise ValueError(msg)
        if isinstance(self.avro_schema, str):
            import json

            object.__setattr__(self, "avro_schema", json.loads(self.avro_schema))

    def describe(self) -> str:
        """One line: ``KafkaSink[out]``."""
        return f"KafkaSink[{self.topic}]"

    def build(self, context: SinkContext) -> KafkaSink:
        """The runtime sink (checks confluent-kafka and the batch schema)."""
        return KafkaSink(self, context)


class KafkaSink:
    """The runtime side of :class:`KafkaSinkSpec`."""

    def __init__(self, spec: KafkaSinkSpec, context: SinkContext) -> None:
        _require_kafka()
        from confluent_kafka import Consumer, Producer

        self.spec = spec
        self.description = spec.describe()
        self.query_id = context.query_id
        self._logger = context.logger
        self._faults = context.faults
        self._key = pl.col(spec.key) if isinstance(spec.key, str) else spec.key
        schema = context.schema
        if schema is not None:
            self._check_schema(schema)
        options = dict(spec.options or {})
        base: dict[str, Any] = {
            "bootstrap.servers": spec.bootstrap_servers,
            "logger": _CLIENT_LOGGER,
        }
        producer_options = {
            **base,
            "linger.ms": 5,
            **_client_options(options, "producer"),
            "enable.idempotence": True,
        }
        if spec.transactional:
            producer_options.setdefault("transactional.id", f"microstream-{context.query_id}")
        self._producer: Producer = Producer(producer_options)
        self.marker_group = f"microstream-sink-{context.query_id}"
        self._marker: Consumer = Consumer(
            {
                **base,
                **_client_options(options, "consumer"),
                "group.id": self.marker_group,
                "enable.auto.commit": False,
            }
        )
        self._next_batch: int | None = None
        self._in_transaction = False
        self._avro_schema = (
            dict(spec.avro_schema)
            if isinstance(spec.avro_schema, Mapping)
            else avro_schema_for(schema)
            if spec.format == "avro" and schema is not None
            else None
        )
        if spec.transactional:
            try:
                self._producer.init_transactions(_REQUEST_TIMEOUT_S * 3)
            except Exception as exc:
                msg = (
                    f"{self.description}: cannot start the transactional producer on "
                    f"{spec.bootstrap_servers}: {exc}"
                )
                raise SinkError(msg) from exc

    def _check_schema(self, schema: pl.Schema) -> None:
        if self.spec.format != "raw":
            return
        if schema.get("value") not in (pl.Binary, pl.String):
            msg = (
                f"{self.description}: format='raw' writes the 'value' column (Binary or "
                f"String); the batches have {dict(schema)}"
            )
            raise PlanError(msg)
        key_columns = set(self._key.meta.root_names()) if self._key is not None else set()
        extra = sorted(set(schema) - {"value"} - key_columns)
        if extra:
            msg = (
                f"{self.description}: format='raw' writes only the 'value' column; drop "
                f"{extra} (or use format='json')"
            )
            raise PlanError(msg)

    def committed_batch(self) -> int | None:
        """The last batch this query recorded as written to the topic (None: none yet)."""
        from confluent_kafka import TopicPartition

        try:
            found = self._marker.committed([TopicPartition(self.spec.topic, 0)], timeout=30)
        except Exception as exc:
            msg = (
                f"{self.description}: cannot read which batches are already in topic "
                f"{self.spec.topic!r} (group {self.marker_group}): {exc}"
            )
            raise SinkError(msg) from exc
        offset = found[0].offset if found else -1
        return offset - 1 if offset > 0 else None

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Write the batch's rows, then record the batch; skip a batch already recorded.

        Raises
        ------
        SinkError
            A record was not delivered (or the transaction failed); the batch
            is re-run on restart.
        """
        if self._next_batch is None:
            done = self.committed_batch()
            self._next_batch = 0 if done is None else done + 1
        if batch_id < self._next_batch:
            self._logger.info(
                "%s: batch %d is already in topic %s; skipped",
                self.description,
                batch_id,
                self.spec.topic,
            )
            return
        values = encode_values(
            data if self.spec.format != "raw" else data.select("value"),
            self.spec.format,
            self._avro_schema,
        )
        keys: list[bytes | None] | None = None
        if self._key is not None:
            column = data.select(self._key).to_series()
            if column.dtype != pl.Binary:
                column = column.cast(pl.String).cast(pl.Binary)
            keys = column.to_list()
        headers: list[tuple[str, str | bytes | None]] = [
            (QUERY_ID_HEADER, self.query_id.encode()),
            (BATCH_ID_HEADER, str(batch_id).encode()),
            *(
                (k, v.encode() if isinstance(v, str) else v)
                for k, v in (self.spec.headers or {}).items()
            ),
        ]
        if self.spec.transactional:
            self._write_transaction(batch_id, values, keys, headers)
        else:
            self._write(batch_id, values, keys, headers)
        self._next_batch = batch_id + 1

    def _produce_all(
        self,
        values: list[bytes],
        keys: list[bytes | None] | None,
        headers: list[tuple[str, str | bytes | None]],
        errors: list[str],
    ) -> None:
        producer = self._producer

        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(str(err))

        topic = self.spec.topic
        for i, value in enumerate(values):
            key = None if keys is None else keys[i]
            while True:
                try:
                    producer.produce(
                        topic, value=value, key=key, headers=headers, on_delivery=on_delivery
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    producer.poll(0.1)

    def _write(
        self,
        batch_id: int,
        values: list[bytes],
        keys: list[bytes | None] | None,
        headers: list[tuple[str, str | bytes | None]],
    ) -> None:
        from confluent_kafka import TopicPartition

        errors: list[str] = []
        self._produce_all(values, keys, headers, errors)
        left = self._producer.flush()
        if errors or left:
            what = errors[0] if errors else f"{left} record(s) still queued"
            msg = (
                f"{self.description}: {len(errors) or left} of {len(values)} record(s) of batch "
                f"{batch_id} were not delivered to topic {self.spec.topic!r}: {what}"
            )
            raise SinkError(msg)
        self._faults.reach("sink.after_data")
        try:
            self._marker.commit(
                offsets=[TopicPartition(self.spec.topic, 0, batch_id + 1)], asynchronous=True
            )
            self._marker.poll(0)
        except Exception as exc:  # the records are there; a re-run would only duplicate them
            self._logger.warning(
                "%s: cannot record batch %d as written: %s", self.description, batch_id, exc
            )

    def _write_transaction(
        self,
        batch_id: int,
        values: list[bytes],
        keys: list[bytes | None] | None,
        headers: list[tuple[str, str | bytes | None]],
    ) -> None:
        from confluent_kafka import TopicPartition

        producer = self._producer
        errors: list[str] = []
        try:
            producer.begin_transaction()
            self._in_transaction = True
            self._produce_all(values, keys, headers, errors)
            producer.flush()
            if errors:
                raise SinkError(errors[0])
            self._faults.reach("sink.after_data")
            producer.send_offsets_to_transaction(
                [TopicPartition(self.spec.topic, 0, batch_id + 1)],
                self._marker.consumer_group_metadata(),
                _REQUEST_TIMEOUT_S * 3,
            )
            producer.commit_transaction()
            self._in_transaction = False
        except Exception as exc:
            self._abort()
            msg = (
                f"{self.description}: the transaction of batch {batch_id} on topic "
                f"{self.spec.topic!r} failed and was aborted: {exc}"
            )
            raise SinkError(msg) from exc

    def _abort(self) -> None:
        if not self._in_transaction:
            return
        self._in_transaction = False
        try:
            self._producer.abort_transaction(_REQUEST_TIMEOUT_S * 3)
        except Exception as exc:
            self._logger.warning("%s: aborting the transaction failed: %s", self.description, exc)

    def stop(self) -> None:
        """Abort an unfinished transaction, deliver what is queued, close the marker consumer."""
        self._abort()
        self._producer.flush(_REQUEST_TIMEOUT_S)
        with contextlib.suppress(RuntimeError):  # already closed
            self._marker.close()
