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
StaticJoinStrategy: TypeAlias = Literal["inner", "left", "semi", "anti"]
QueryState: TypeAlias = Literal["initializing", "active", "stopped", "failed"]
KafkaFormat: TypeAlias = Literal["json", "avro", "raw", "csv"]
KafkaSinkFormat: TypeAlias = Literal["json", "avro", "raw"]
BadRecordPolicy: TypeAlias = Literal["fail", "skip", "dead_letter"]
ExtraColumns: TypeAlias = Literal["ignore", "raise"]
"""What a source does with a column its schema lacks (Polars' ``extra_columns``)."""
MissingColumns: TypeAlias = Literal["insert", "raise"]
"""What a source does with a schema column the data lacks (Polars' ``missing_columns``)."""
KafkaStartingOffsets: TypeAlias = "Literal['earliest', 'latest'] | int | datetime | Mapping[int, int] | Mapping[str, Mapping[int, int]]"
"""``"earliest"``, ``"latest"``, a timestamp (ms since the epoch, or a datetime), or
explicit offsets: ``{partition: offset}`` for one topic, ``{topic: {partition: offset}}``."""
