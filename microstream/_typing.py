"""Literal aliases for options, collected in one place (as Polars does)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Literal, TypeAlias

FileFormat: TypeAlias = Literal["parquet", "csv", "ndjson", "ipc"]
CleanSource: TypeAlias = Literal["off", "delete", "archive"]
OutputMode: TypeAlias = Literal["append", "update", "complete"]
GroupStateTimeout: TypeAlias = Literal["event_time", "processing_time"]
"""The kind of timers ``map_groups_with_state(timeout=...)`` lets a function set."""
StaticJoinStrategy: TypeAlias = Literal["inner", "left", "semi", "anti", "cross"]
QueryState: TypeAlias = Literal["initializing", "active", "stopped", "failed"]
KafkaFormat: TypeAlias = Literal["json", "avro", "raw", "csv", "protobuf"]
KafkaSinkFormat: TypeAlias = Literal["json", "avro", "raw"]
RabbitMQStartingOffset: TypeAlias = "Literal['first', 'next'] | int"
"""Where ``scan_rabbitmq_stream`` starts: the first retained message, the next one, or an offset."""
PostgresSinkMode: TypeAlias = Literal["append", "upsert"]
"""How ``sink_postgres`` writes rows: inserted (``COPY``), or upserted by key (``ON CONFLICT``)."""
BadRecordPolicy: TypeAlias = Literal["fail", "skip", "dead_letter"]
BadFilePolicy: TypeAlias = Literal["fail", "skip", "dead_letter"]
"""What the file source does with a file it cannot read (Spark's ``ignoreCorruptFiles``)."""
MissingFilePolicy: TypeAlias = Literal["fail", "skip"]
"""What the file source does with a logged file that is gone (Spark's ``ignoreMissingFiles``)."""
ExtraColumnsPolicy: TypeAlias = Literal["ignore", "raise"]
"""A file's columns that the schema lacks (as Polars' ``scan_parquet(extra_columns=)``)."""
MissingColumnsPolicy: TypeAlias = Literal["insert", "raise"]
"""Schema columns that a file lacks (as Polars' ``scan_parquet(missing_columns=)``)."""
KafkaStartingOffsets: TypeAlias = "Literal['earliest', 'latest'] | int | datetime | Mapping[int, int] | Mapping[str, Mapping[int, int]]"
"""``"earliest"``, ``"latest"``, a timestamp (ms since the epoch, or a datetime), or
explicit offsets: ``{partition: offset}`` for one topic, ``{topic: {partition: offset}}``."""
HttpSinkFormat: TypeAlias = Literal["ndjson", "json"]
"""The body of a ``sink_http`` request: JSON lines, or one JSON array."""
KinesisSinkFormat: TypeAlias = Literal["json", "raw"]
"""The data of a ``sink_kinesis`` record: every column as JSON (with the batch's identity), or ``value``."""
