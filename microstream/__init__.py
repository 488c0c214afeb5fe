"""microstream: micro-batch structured streaming on Polars, exactly once.

Write a Polars query over a stream as if it were an unbounded table; start it
with a ``sink_*`` verb; microstream runs it every trigger over what is new and
commits offsets to a write-ahead log so the sink sees every row once.

Examples
--------
>>> import polars as pl
>>> import microstream as ms
>>> stream = ms.MemoryStream({"user": pl.Int64, "amount": pl.Float64})
>>> query = (
...     stream.lazy()
...     .filter(pl.col("amount") > 0)
...     .with_columns(cents=(pl.col("amount") * 100).cast(pl.Int64))
...     .sink_memory("payments")
... )
>>> _ = stream.add_data({"user": [1, 2], "amount": [1.5, -3.0]})
>>> query.process_all_available()
>>> ms.table("payments").to_dicts()
[{'user': 1, 'amount': 1.5, 'cents': 150}]
>>> query.stop()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from microstream.api import pattern
from microstream.api.concat import concat
from microstream.api.frame import StreamFrame
from microstream.api.match_recognize import match_recognize_static
from microstream.api.outputs import OutputPointer, current_output, read_output, switch_output
from microstream.api.query import QueryStatus, StreamingQuery
from microstream.api.replay import ReplayResult, replay
from microstream.api.scan import (
    optimize_delta,
    read_file_sink,
    scan_delta,
    scan_files,
    scan_kafka,
    scan_kinesis,
    scan_postgres_cdc,
    scan_pubsub,
    scan_rabbitmq_stream,
    scan_rate,
    scan_socket,
    vacuum_delta,
)
from microstream.api.session import (
    Session,
    StreamingQueryListener,
    active,
    add_listener,
    remove_listener,
    table,
)
from microstream.checkpoint.log import Checkpoint
from microstream.exceptions import (
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    CheckpointStorageError,
    DataLossError,
    EventTimeError,
    MicrostreamError,
    MissingDependencyError,
    OffsetError,
    OutputError,
    PlanChangedError,
    PlanError,
    QueryTerminatedError,
    ReplayError,
    SchemaMismatchError,
    SinkError,
    SourceError,
    UnboundedStateWarning,
)
from microstream.metrics.otel import OpenTelemetryListener
from microstream.metrics.prometheus import MetricsServer, start_metrics_server
from microstream.operators.stateful_fn import GroupState, StateContext
from microstream.runtime.base import LocalRuntime, Runtime
from microstream.runtime.progress import QueryProgress
from microstream.runtime.progress_bar import ProgressBar
from microstream.runtime.ray import RayRuntime
from microstream.sql import sql  # the function; the subpackage stays importable by its path
from microstream.state.read import read_state
from microstream.time.trigger import Trigger
from microstream.ui import Dashboard, start_ui

if TYPE_CHECKING:
    from microstream.registry import MemoryStream
    from microstream.sql.context import SQLContext

__version__ = "0.1.0"

__all__ = [
    "Checkpoint",
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointStorageError",
    "Dashboard",
    "DataLossError",
    "EventTimeError",
    "GroupState",
    "LocalRuntime",
    "MemoryStream",
    "MetricsServer",
    "MicrostreamError",
    "MissingDependencyError",
    "OffsetError",
    "OpenTelemetryListener",
    "OutputError",
    "OutputPointer",
    "PlanChangedError",
    "PlanError",
    "ProgressBar",
    "QueryProgress",
    "QueryStatus",
    "QueryTerminatedError",
    "RayRuntime",
    "ReplayError",
    "ReplayResult",
    "Runtime",
    "SQLContext",
    "SchemaMismatchError",
    "Session",
    "SinkError",
    "SourceError",
    "StateContext",
    "StreamFrame",
    "StreamingQuery",
    "StreamingQueryListener",
    "Trigger",
    "UnboundedStateWarning",
    "active",
    "add_listener",
    "concat",
    "current_output",
    "match_recognize_static",
    "optimize_delta",
    "pattern",
    "read_file_sink",
    "read_output",
    "read_state",
    "remove_listener",
    "replay",
    "scan_delta",
    "scan_files",
    "scan_kafka",
    "scan_kinesis",
    "scan_postgres_cdc",
    "scan_pubsub",
    "scan_rabbitmq_stream",
    "scan_rate",
    "scan_socket",
    "sql",
    "start_metrics_server",
    "start_ui",
    "switch_output",
    "table",
    "vacuum_delta",
]


def __getattr__(name: str) -> Any:
    # MemoryStream is a connector: imported on first use, never at import time.
    if name == "MemoryStream":
        from microstream.registry import memory_stream_class

        return memory_stream_class()
    if name == "SQLContext":
        # SQL needs the optional sqlglot: imported on first use.
        from microstream.sql.context import SQLContext

        return SQLContext
    msg = f"module 'microstream' has no attribute {name!r}"
    raise AttributeError(msg)
