"""Literal aliases for options, collected in one place (as Polars does)."""

from __future__ import annotations

from typing import Literal, TypeAlias

FileFormat: TypeAlias = Literal["parquet", "csv", "ndjson", "ipc"]
CleanSource: TypeAlias = Literal["off", "delete", "archive"]
OutputMode: TypeAlias = Literal["append", "update", "complete"]
StaticJoinStrategy: TypeAlias = Literal["inner", "left", "semi", "anti"]
QueryState: TypeAlias = Literal["initializing", "active", "stopped", "failed"]
