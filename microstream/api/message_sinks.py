"""The ``sink_*`` verbs of message systems and web APIs: Kafka, Kinesis, RabbitMQ
streams, Pub/Sub and HTTP.

A mixin of :class:`microstream.api.sinks.SinkVerbs`, kept apart so that each module
stays one readable size: every verb here builds its connector's spec (looked up by
name in the connector registry, never imported) and calls ``sink(spec, ...)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.registry import load_connector

if TYPE_CHECKING:
    from datetime import timedelta

    from microstream._typing import (
        HttpSinkFormat,
        KafkaSinkFormat,
        KinesisSinkFormat,
        OutputMode,
    )
    from microstream.api.query import StreamingQuery
    from microstream.protocols import SinkSpec
    from microstream.runtime.base import Runtime
    from microstream.time.trigger import Trigger

__all__ = ["MessageSinkVerbs"]


class MessageSinkVerbs:
    """The message-system ``sink_*`` verbs of :class:`~microstream.api.frame.StreamFrame`."""

    if TYPE_CHECKING:

        def sink(
            self,
            spec: SinkSpec,
            *,
            output_mode: OutputMode = "append",
            trigger: Trigger | None = None,
            checkpoint: str | os.PathLike[str] | None = None,
            checkpoint_options: dict[str, Any] | None = None,
            name: str | None = None,
            runtime: Runtime | None = None,
            key_groups: int | None = None,
        ) -> StreamingQuery: ...

    def sink_kafka(
        self,
        bootstrap_servers: str,
        topic: str,
        *,
        key: str | pl.Expr | None = None,
        format: KafkaSinkFormat = "json",
        avro_schema: Mapping[str, Any] | str | None = None,
        headers: Mapping[str, str | bytes] | None = None,
        transactional: bool = False,
        options: Mapping[str, Any] | None = None,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query writing each batch's rows as records of a Kafka topic.

        Every record carries the headers ``microstream.query_id`` and
        ``microstream.batch_id``. The producer is idempotent and a batch is
        acknowledged before the next one starts (a failed delivery is a
        ``SinkError``; the batch is re-run on restart).

        Guarantees: by default **at-least-once** — after a crash a batch may
        be written again, with the same ``(query id, batch id)`` headers, so
        consumers can drop duplicates. ``transactional=True`` writes each
        batch in one Kafka transaction committed together with the batch's
        record, which is **exactly-once for read_committed consumers** on
        brokers that honour transactions (real Kafka; not verifiable on the
        Tansu test broker). See :class:`connectors.kafka.KafkaSinkSpec`.

        Parameters
        ----------
        bootstrap_servers
            ``"host:port[,host:port...]"``.
        topic
            The topic written to.
        key
            The record key: a column name or an expression (None: no key).
        format
            ``"json"`` (all columns as a JSON object), ``"avro"`` (all
            columns, schemaless Avro) or ``"raw"`` (the ``value`` column).
        avro_schema
            The Avro schema of ``format="avro"`` (default: derived from the
            batch's schema, every field nullable).
        headers
            Extra headers on every record.
        transactional
            One transaction per batch (exactly-once for read_committed
            consumers on real Kafka).
        options
            librdkafka producer settings (``security.protocol``, ``sasl.*``,
            ``ssl.*``, ``compression.type``, ``transactional.id``, ...).

        Examples
        --------
        >>> import tempfile
        >>> import polars as pl
        >>> import microstream as ms
        >>> from microstream.testing.tansu import TansuBroker
        >>> stream = ms.MemoryStream({"user": pl.Int64, "amount": pl.Float64})
        >>> with TansuBroker() as broker:
        ...     broker.create_topic("doc-sink")
        ...     query = stream.lazy().sink_kafka(
        ...         broker.bootstrap_servers, "doc-sink", key="user",
        ...         checkpoint=tempfile.mkdtemp(),
        ...     )
        ...     _ = stream.add_data({"user": [1], "amount": [2.5]})
        ...     query.process_all_available()
        ...     query.stop()
        ...     [record] = broker.consume("doc-sink", 1)
        >>> record.key(), record.value()
        (b'1', b'{"user":1,"amount":2.5}')
        >>> [name for name, _ in record.headers()]
        ['microstream.query_id', 'microstream.batch_id']
        """
        spec = load_connector("kafka_sink")(
            bootstrap_servers,
            topic,
            key=key,
            format=format,
            avro_schema=avro_schema,
            headers=None if headers is None else dict(headers),
            transactional=transactional,
            options=None if options is None else dict(options),
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            checkpoint_options=checkpoint_options,
            name=name,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_http(
        self,
        url: str,
        *,
        format: HttpSinkFormat = "ndjson",
        chunk_rows: int = 1000,
        headers: Mapping[str, str] | None = None,
        timeout: str | timedelta | float = "10s",
        retry_timeout: str | timedelta | float = "30s",
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query POSTing each batch's rows to ``url``, in chunks.

        Chunk ``c`` of batch ``N`` is one request carrying
        ``Idempotency-Key: <query id>-<N>-<c>``; a batch re-run after a crash
        sends the same chunks under the same keys. Connection errors,
        timeouts, ``408``, ``429`` and ``5xx`` are retried with backoff for
        ``retry_timeout``; any other error status fails the query with a
        ``SinkError`` naming it and quoting the reply. Guarantee:
        **at-least-once**, exactly-once with an endpoint that deduplicates on
        the key. The options are :class:`connectors.http.HttpSinkSpec`'s.

        Examples
        --------
        >>> import tempfile
        >>> import polars as pl
        >>> import microstream as ms
        >>> from microstream.testing.http_server import RecordingHttpServer
        >>> stream = ms.MemoryStream({"user": pl.Int64})
        >>> with RecordingHttpServer() as server:
        ...     query = stream.lazy().sink_http(
        ...         server.url("/events"), chunk_rows=2, checkpoint=tempfile.mkdtemp()
        ...     )
        ...     _ = stream.add_data({"user": [1, 2, 3]})
        ...     query.process_all_available()
        ...     query.stop()
        >>> [request.body for request in server.requests]
        [b'{"user":1}\\n{"user":2}\\n', b'{"user":3}\\n']
        >>> [request.headers["Idempotency-Key"][-4:] for request in server.requests]
        ['-0-0', '-0-1']
        """
        spec = load_connector("http_sink")(
            url,
            format=format,
            chunk_rows=chunk_rows,
            headers=headers,
            timeout=timeout,
            retry_timeout=retry_timeout,
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            name=name,
            checkpoint_options=checkpoint_options,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_kinesis(
        self,
        stream: str,
        *,
        partition_key: str | pl.Expr,
        format: KinesisSinkFormat = "json",
        retry_timeout: str | timedelta | float = "30s",
        options: Mapping[str, Any] | None = None,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query writing each batch's rows as records of a Kinesis stream.

        Guarantee: **at-least-once** — a batch re-run after a crash is sent
        again whole. With ``format="json"`` every record carries
        ``microstream_query_id``, ``microstream_batch_id`` and
        ``microstream_row``, on which consumers can deduplicate. Refused records
        (throttling) are retried for ``retry_timeout``. The options are
        :class:`connectors.kinesis.KinesisSinkSpec`'s.

        Examples
        --------
        >>> import json
        >>> import tempfile
        >>> import boto3
        >>> import polars as pl
        >>> import microstream as ms
        >>> from microstream.testing.moto_s3 import MotoS3Server
        >>> stream = ms.MemoryStream({"user": pl.Int64})
        >>> with MotoS3Server() as server:
        ...     kinesis = boto3.client("kinesis", **server.aws_options())
        ...     _ = kinesis.create_stream(StreamName="doc-out", ShardCount=1)
        ...     query = stream.lazy().sink_kinesis(
        ...         "doc-out", partition_key="user", options=server.aws_options(),
        ...         checkpoint=tempfile.mkdtemp(),
        ...     )
        ...     _ = stream.add_data({"user": [7]})
        ...     query.process_all_available()
        ...     query.stop()
        ...     shard = kinesis.list_shards(StreamName="doc-out")["Shards"][0]["ShardId"]
        ...     iterator = kinesis.get_shard_iterator(
        ...         StreamName="doc-out", ShardId=shard, ShardIteratorType="TRIM_HORIZON"
        ...     )["ShardIterator"]
        ...     [record] = kinesis.get_records(ShardIterator=iterator)["Records"]
        >>> data = json.loads(record["Data"])
        >>> record["PartitionKey"], data["user"], data["microstream_batch_id"], data["microstream_row"]
        ('7', 7, 0, 0)
        """
        spec = load_connector("kinesis_sink")(
            stream,
            partition_key=partition_key,
            format=format,
            retry_timeout=retry_timeout,
            options=None if options is None else dict(options),
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            checkpoint_options=checkpoint_options,
            name=name,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_rabbitmq_stream(
        self,
        url: str,
        stream: str,
        *,
        format: KafkaSinkFormat = "json",
        producer_name: str | None = None,
        create_stream: bool = True,
        stream_arguments: Mapping[str, Any] | None = None,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query publishing each row to a RabbitMQ stream, exactly once.

        The query is one named producer (``microstream-<query id>``) whose
        publishing ids are derived from the batch id and the row's position, so
        the broker's deduplication stores each row once, also when a batch is
        re-run after a crash. See :class:`connectors.rabbitmq.RabbitMQStreamSinkSpec`.

        Parameters
        ----------
        url
            ``"rabbitmq-stream://user:password@host:5552/vhost"``.
        stream
            The stream written to.
        format
            ``"json"``, ``"avro"`` or ``"raw"`` (the ``value`` column).
        producer_name
            The producer's name (default ``microstream-<query id>``).
        create_stream
            Create the stream if it is missing, with ``stream_arguments``
            (``{"max-length-bytes": ...}``).

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> ms.MemoryStream({"id": pl.Int64}).lazy().sink_rabbitmq_stream("amqp://mq", "out")
        Traceback (most recent call last):
        ...
        ValueError: url must be 'rabbitmq-stream://user:password@host:port/vhost'; got a url of scheme 'amqp'
        """
        spec = load_connector("rabbitmq_stream_sink")(
            url,
            stream,
            format=format,
            producer_name=producer_name,
            create_stream=create_stream,
            stream_arguments=None if stream_arguments is None else dict(stream_arguments),
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            checkpoint_options=checkpoint_options,
            name=name,
            runtime=runtime,
            key_groups=key_groups,
        )

    def sink_pubsub(
        self,
        topic: str,
        *,
        format: KafkaSinkFormat = "json",
        ordering_key: str | None = None,
        endpoint: str | None = None,
        output_mode: OutputMode = "append",
        trigger: Trigger | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_options: dict[str, Any] | None = None,
        name: str | None = None,
        runtime: Runtime | None = None,
        key_groups: int | None = None,
    ) -> StreamingQuery:
        """Start the query publishing each row to a Pub/Sub topic, at least once.

        Every message has the attributes ``microstream.query_id``,
        ``microstream.batch_id`` and ``microstream.row``, so consumers can drop
        the copies a re-run batch publishes again; with ``ordering_key`` (a String
        column) messages of a key are delivered in order. See
        :class:`connectors.pubsub.PubSubSinkSpec`.

        Parameters
        ----------
        topic
            ``"projects/<project>/topics/<name>"``.
        format
            ``"json"``, ``"avro"`` or ``"raw"`` (the ``value`` column).
        ordering_key
            The String column holding each message's ordering key.
        endpoint
            ``"host:port"`` of the emulator (no credentials, no TLS).

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> ms.MemoryStream({"id": pl.Int64}).lazy().sink_pubsub("my-topic")
        Traceback (most recent call last):
        ...
        ValueError: topic must be 'projects/<project>/topics/<name>'; got 'my-topic'
        """
        spec = load_connector("pubsub_sink")(
            topic, format=format, ordering_key=ordering_key, endpoint=endpoint
        )
        return self.sink(
            spec,
            output_mode=output_mode,
            trigger=trigger,
            checkpoint=checkpoint,
            checkpoint_options=checkpoint_options,
            name=name,
            runtime=runtime,
            key_groups=key_groups,
        )
