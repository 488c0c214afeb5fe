"""Publish to a RabbitMQ stream exactly once, by the broker's producer deduplication.

RabbitMQ streams deduplicate by producer: a producer with a *name* gives each
message a *publishing id*, and the broker stores, per stream and producer name,
the last id it stored; a message whose id is at or below it is confirmed but not
stored. The sink is one named producer per query (``microstream-<query id>``
unless ``producer_name`` says otherwise), and gives the row at position ``i``
(0-based) of batch ``N`` the publishing id ``N * 2**32 + i + 1``: ids grow with
the batch id and within a batch, so

- a batch re-run after a crash is published again with the same ids, and the
  broker drops every message it already stored: each row is stored once, even
  when the crash came in the middle of the batch (the messages after the last
  stored one are stored by the re-run);
- ``add_batch`` first asks the broker for the producer's last id (``query
  publisher sequence``): a batch whose last id is at or below it is skipped
  without publishing, and of a partly stored batch only the rest is sent;
- ``add_batch`` returns once the broker confirmed every message, so
  ``commits/N`` is written only after the batch is in the stream.

The ids of a re-run batch name the same rows only if the re-run produces its
rows in the same order. A re-run reads the same input, and stateless queries
keep their input's order; the rows of an aggregation (``update``/``complete``
output, or windows closed in ``append``) are sorted by their key columns before
they get ids, since a hash aggregation's order may differ between runs.

Each message is an AMQP 1.0 message: application properties
``microstream.query_id`` and ``microstream.batch_id``, then the row as one data
section (``format``).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import encode_values
from connectors.rabbitmq.client import (
    BrokerAnswerError,
    BrokerUnreachableError,
    StreamConnection,
    StreamUrl,
    encode_messages,
    require_rstream,
)
from microstream.exceptions import SinkError
from microstream.protocols import SinkContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import KafkaSinkFormat

__all__ = ["RabbitMQStreamSink", "RabbitMQStreamSinkSpec", "publishing_id"]

_ROWS_PER_BATCH = 2**32 - 1
"""The most rows a batch may have: the row position takes the low 32 bits of an id."""


def publishing_id(batch_id: int, position: int) -> int:
    """The publishing id of the row at ``position`` (0-based) of batch ``batch_id``.

    Examples
    --------
    >>> publishing_id(0, 0), publishing_id(0, 1), publishing_id(1, 0) == 2**32 + 1
    (1, 2, True)
    >>> batch_of(publishing_id(7, 12345))
    7
    """
    return (batch_id << 32) + position + 1


def batch_of(pid: int) -> int:
    """The batch id of a publishing id (:func:`publishing_id`'s inverse)."""
    return (pid - 1) >> 32


@dataclass(frozen=True)
class RabbitMQStreamSinkSpec:
    """Publish each batch's rows to a RabbitMQ stream, exactly once (producer deduplication).

    Parameters
    ----------
    url
        The broker: ``"rabbitmq-stream://user:password@host:5552/vhost"``. Never shown.
    stream
        The stream written to.
    format
        ``"json"`` (every column, one JSON object per message; Binary columns as
        base64), ``"avro"`` (schemaless Avro of ``avro_schema``, default derived
        from the batch's schema) or ``"raw"`` (the ``value`` column's bytes).
    avro_schema
        The Avro record schema of ``format="avro"``.
    producer_name
        The producer's name, under which the broker keeps the last publishing id
        (default ``microstream-<query id>``). Two queries must not share one.
    create_stream
        Create the stream when the query starts, if it is missing.
    stream_arguments
        The arguments of a stream the sink creates: ``{"max-length-bytes":
        10**10, "max-age": "7D", "stream-max-segment-size-bytes": ...}``.
    retry_timeout
        How long an unreachable broker is retried before the query fails.

    Examples
    --------
    >>> spec = RabbitMQStreamSinkSpec("rabbitmq-stream://mq", "out")
    >>> spec.describe(), sorted(spec.output_modes)
    ('RabbitMQStreamSink[out]', ['append', 'complete', 'update'])
    """

    kind: ClassVar[str] = "rabbitmq_stream_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = True

    url: str = field(repr=False, compare=False)
    stream: str
    _: KW_ONLY
    format: KafkaSinkFormat = "json"
    avro_schema: dict[str, Any] | None = None
    producer_name: str | None = None
    create_stream: bool = True
    stream_arguments: dict[str, Any] | None = None
    retry_timeout: str | timedelta | float = "30s"

    def __post_init__(self) -> None:
        StreamUrl.parse(self.url)
        if not isinstance(self.stream, str) or not self.stream or len(self.stream.encode()) > 255:
            msg = f"stream must be a stream name (1 to 255 bytes); got {self.stream!r}"
            raise ValueError(msg)
        if self.format not in ("json", "avro", "raw"):
            msg = f"format must be 'json', 'avro' or 'raw'; got {self.format!r}"
            raise ValueError(msg)
        if self.avro_schema is not None and self.format != "avro":
            msg = f"avro_schema= is for format='avro'; got format={self.format!r}"
            raise ValueError(msg)
        name = self.producer_name
        if name is not None and (not isinstance(name, str) or not name or len(name) > 255):
            msg = f"producer_name must be a name of 1 to 255 characters; got {name!r}"
            raise ValueError(msg)
        parse_duration(self.retry_timeout, name="retry_timeout")

    def describe(self) -> str:
        """One line: ``RabbitMQStreamSink[out]``."""
        return f"RabbitMQStreamSink[{self.stream}]"

    def build(self, context: SinkContext) -> RabbitMQStreamSink:
        """The runtime sink (creates the stream if asked to)."""
        return RabbitMQStreamSink(self, context)


class RabbitMQStreamSink:
    """The runtime side of :class:`RabbitMQStreamSinkSpec` (see the module docstring)."""

    def __init__(self, spec: RabbitMQStreamSinkSpec, context: SinkContext) -> None:
        require_rstream()
        self.spec = spec
        self.description = spec.describe()
        self._logger = context.logger
        self._faults = context.faults
        self._query_id = context.query_id
        self._producer = spec.producer_name or f"microstream-{context.query_id}"
        self._order = list(context.key_columns or ())
        self._url = StreamUrl.parse(spec.url)
        timeout = parse_duration(spec.retry_timeout, name="retry_timeout").total_seconds()
        self._conn = StreamConnection(self._url, retry_timeout_s=timeout, name=self._producer)
        if spec.create_stream:
            self._broker(
                "create the stream",
                lambda c: c.create_stream(spec.stream, dict(spec.stream_arguments or {})),
            )
        elif not self._broker("look up the stream", lambda c: c.stream_exists(spec.stream)):
            msg = (
                f"{self.description}: there is no stream {spec.stream!r} on the broker at "
                f"{self._url.where}; create it, or pass create_stream=True"
            )
            raise SinkError(msg)

    def _broker(self, what: str, work: Any) -> Any:
        try:
            return work(self._conn)
        except BrokerUnreachableError as exc:
            raise SinkError(f"{self.description}: {exc}") from exc
        except BrokerAnswerError as exc:
            msg = (
                f"{self.description}: cannot {what}: the broker at {self._url.where} answered {exc}"
            )
            raise SinkError(msg) from exc

    def _last_id(self) -> int:
        return int(
            self._broker(
                "read the producer's last publishing id",
                lambda c: c.publisher_sequence(self.spec.stream, self._producer),
            )
        )

    def committed_batch(self) -> int | None:
        """The batch of the last message this query's producer stored (None: none).

        A batch with no rows stores nothing, so it is not seen here.
        """
        last = self._last_id()
        return None if last <= 0 else batch_of(last)

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Publish the rows of ``batch_id`` not yet stored; return once all are confirmed.

        Raises
        ------
        SinkError
            The batch has too many rows, the broker refused messages, or it was
            unreachable for ``retry_timeout``.
        """
        if data.height == 0:
            return
        if data.height > _ROWS_PER_BATCH:
            msg = (
                f"{self.description}: batch {batch_id} has {data.height} rows; a batch may have "
                f"at most {_ROWS_PER_BATCH} (lower the source's rate limit)"
            )
            raise SinkError(msg)
        last = self._last_id()
        done = 0 if last < publishing_id(batch_id, 0) else last - publishing_id(batch_id, 0) + 1
        if done >= data.height:
            self._logger.info("%s: batch %d is in the stream already", self.description, batch_id)
            return
        order = [c for c in self._order if c in data.columns]
        if order:
            data = data.sort(order, nulls_last=True, maintain_order=True)
        rows = data.slice(done)
        try:
            payloads = encode_values(rows, self.spec.format, self.spec.avro_schema)
        except SinkError as exc:
            raise SinkError(f"{self.description}: batch {batch_id}: {exc}") from exc
        properties = {"microstream.query_id": self._query_id, "microstream.batch_id": str(batch_id)}
        messages = encode_messages(payloads, properties)
        ids = [publishing_id(batch_id, done + i) for i in range(len(messages))]
        half = len(messages) // 2
        parts = [(ids[:half], messages[:half]), (ids[half:], messages[half:])]
        for number, (part_ids, part) in enumerate(parts):
            if not part:
                continue
            errors = self._broker(
                "publish the batch",
                lambda c, i=part_ids, m=part: c.publish(self.spec.stream, self._producer, i, m),
            )
            if errors:
                pid, code = errors[0]
                msg = (
                    f"{self.description}: the broker refused {len(errors)} message(s) of batch "
                    f"{batch_id} (the first: publishing id {pid}, response code {code}); the "
                    "batch is published again when the query restarts"
                )
                raise SinkError(msg)
            if number == 0:
                # Half the batch is stored: a crash here shows that a re-run stores the rest once.
                self._faults.reach("sink.after_data")

    def stop(self) -> None:
        """Close the connection."""
        self._conn.close()
