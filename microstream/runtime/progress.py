"""Progress of a query: one pydantic record per micro-batch, and listener events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "BatchDurations",
    "QueryIdleEvent",
    "QueryProgress",
    "QueryProgressEvent",
    "QueryStartedEvent",
    "QueryTerminatedEvent",
    "SinkProgress",
    "SourceProgress",
    "StateOperatorProgress",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class BatchDurations(_Frozen):
    """Milliseconds spent in each phase of a batch."""

    latest_offset: float = 0.0
    wal: float = 0.0
    read: float = 0.0
    compute: float = 0.0
    sink: float = 0.0
    commit: float = 0.0
    total: float = 0.0


class SourceProgress(_Frozen):
    """What one source contributed to a batch."""

    description: str
    start_offset: dict[str, Any] | None
    end_offset: dict[str, Any]
    latest_offset: dict[str, Any] | None = None
    num_input_rows: int
    lag: int | None = Field(
        default=None, description="Units (rows, files) available but not yet in a batch."
    )
    num_input_units: int | None = Field(
        default=None,
        description="How far the batch moved the source, in the units of ``lag`` (offsets, "
        "files): the lag before the batch minus the lag after it. With ``lag`` it gives the "
        "share of a backlog done (the progress bar of ``ms.replay``).",
    )
    metrics: dict[str, int] = Field(
        default_factory=dict,
        description="Source-specific counts for this batch (Kafka: bad records skipped or "
        "dead-lettered, offsets lost; files: files and records skipped or dead-lettered, "
        "files ignored, new columns ignored).",
    )
    skipped_files: list[str] = Field(
        default_factory=list,
        description="The files this batch left out (skipped or dead-lettered: unreadable or "
        "gone), by path; the reasons are logged and in the file source's log.",
    )


class StateOperatorProgress(_Frozen):
    """One stateful operator in a batch: its state and what the batch did to it."""

    operator_id: str
    kind: str
    num_rows_total: int
    memory_bytes: int
    num_rows_updated: int = 0
    num_rows_removed: int = Field(default=0, description="State rows evicted by the watermark.")
    num_rows_dropped_late: int = Field(
        default=0, description="Input rows (per window for sliding windows) dropped as late."
    )
    num_rows_dropped_null_time: int = Field(
        default=0,
        description="Input rows dropped because their event time is null (no window, session "
        "or join bound can hold them); routed to ``on_late`` like late rows.",
    )


class SinkProgress(_Frozen):
    """What the sink received in a batch."""

    description: str
    num_output_rows: int


class QueryProgress(_Frozen):
    """Progress of one micro-batch (``StreamingQuery.last_progress``).

    Written as one JSON line per batch to ``progress/`` in the checkpoint.
    """

    id: str
    run_id: str
    name: str | None
    batch_id: int
    timestamp: datetime
    batch_timestamp_ms: int
    recovered: bool = Field(description="Whether this batch re-ran a logged, uncommitted batch.")
    num_input_rows: int
    num_output_rows: int
    input_rows_per_second: float
    processed_rows_per_second: float
    durations_ms: BatchDurations
    watermark: datetime | None = None
    late_watermark: datetime | None = None
    state_operators: list[StateOperatorProgress] = Field(default_factory=list)
    sources: list[SourceProgress]
    sink: SinkProgress
    worker_restarts: int = Field(
        default=0,
        description="How many times a cluster runtime lost workers in this batch and ran it "
        "again from its log entry (0 locally and in a batch that lost none).",
    )
    replaced_workers: list[int] = Field(
        default_factory=list,
        description="The indices of the workers replaced for this batch, one entry per "
        "replacement, in order (RayRuntime: the actor's index, 0 .. num_workers - 1).",
    )

    def flat(self) -> dict[str, Any]:
        """A flat dict (one row of ``progress_df()``)."""
        row: dict[str, Any] = {
            "batch_id": self.batch_id,
            "timestamp": self.timestamp,
            "recovered": self.recovered,
            "num_input_rows": self.num_input_rows,
            "num_output_rows": self.num_output_rows,
            "input_rows_per_second": self.input_rows_per_second,
            "processed_rows_per_second": self.processed_rows_per_second,
            "watermark": self.watermark,
            "late_watermark": self.late_watermark,
            "worker_restarts": self.worker_restarts,
        }
        for phase, ms in self.durations_ms.model_dump().items():
            row[f"duration_{phase}_ms"] = ms
        row["source_lag"] = sum(s.lag or 0 for s in self.sources)
        row["state_rows"] = sum(op.num_rows_total for op in self.state_operators)
        row["state_bytes"] = sum(op.memory_bytes for op in self.state_operators)
        row["rows_dropped_late"] = sum(op.num_rows_dropped_late for op in self.state_operators)
        row["rows_dropped_null_time"] = sum(
            op.num_rows_dropped_null_time for op in self.state_operators
        )
        return row


class QueryStartedEvent(_Frozen):
    id: str
    run_id: str
    name: str | None
    timestamp: datetime


class QueryProgressEvent(_Frozen):
    progress: QueryProgress


class QueryIdleEvent(_Frozen):
    id: str
    run_id: str
    timestamp: datetime


class QueryTerminatedEvent(_Frozen):
    id: str
    run_id: str
    exception: str | None
    timestamp: datetime
