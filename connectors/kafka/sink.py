"""The Kafka sink: records tagged with their query and batch, transactional where the broker allows."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import avro_schema_for, encode_values
from connectors.kafka.client import (
    _CLIENT_LOGGER,
    _REQUEST_TIMEOUT_S,
    _client_options,
    _require_kafka,
)
from microstream.exceptions import (
    PlanError,
    SinkError,
)
from microstream.protocols import SinkContext

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Producer

    from microstream._typing import (
        KafkaSinkFormat,
    )


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
