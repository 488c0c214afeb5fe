"""The error hierarchy: one root, precise subclasses.

Every message names what was wrong and where (source, offset, file, column),
and, where there is one, what to do about it.
"""

from __future__ import annotations

import inspect
import os

__all__ = [
    "CheckpointConflictError",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointLockedError",
    "CheckpointStorageError",
    "DataLossError",
    "EventTimeError",
    "MicrostreamError",
    "MissingDependencyError",
    "OffsetError",
    "OutputError",
    "PlanChangedError",
    "PlanError",
    "QueryTerminatedError",
    "ReplayError",
    "SchemaMismatchError",
    "SinkError",
    "SourceError",
    "UnboundedStateWarning",
    "WorkerError",
    "user_stacklevel",
]


class MicrostreamError(Exception):
    """Root of every error microstream raises on purpose."""


class PlanError(MicrostreamError):
    """A query that cannot run on a stream, found when the query is defined."""


class EventTimeError(MicrostreamError):
    """An event time the query cannot place: its window would end past its dtype's range."""


class SchemaMismatchError(MicrostreamError):
    """Data whose schema differs from the one the query was planned with."""


class SourceError(MicrostreamError):
    """A source failed to list or read its input."""


class DataLossError(SourceError):
    """Offsets a query needs no longer exist in the source (retention, a broker that lost
    its data, a topic recreated); the message names the topic, partition and range."""


class SinkError(MicrostreamError):
    """A sink failed to write or commit a batch."""


class OffsetError(MicrostreamError):
    """An offset that is malformed, unknown to the source, or goes backwards."""


class CheckpointError(MicrostreamError):
    """The checkpoint cannot be used as it is."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file that is truncated or not what its name says."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint written in an older format that this microstream cannot read."""


class CheckpointConflictError(CheckpointError):
    """A write-once checkpoint file that another writer created first (never overwritten)."""


class CheckpointLockedError(CheckpointError):
    """Another live process runs a query on this checkpoint."""


class CheckpointStorageError(CheckpointError):
    """The checkpoint's storage failed: a full disk, an I/O error, an unreachable endpoint."""


class PlanChangedError(CheckpointError):
    """The query no longer matches the plan its checkpoint was created with."""


class OutputError(MicrostreamError):
    """A versioned output whose pointer is missing, corrupt, or moved by another writer."""


class ReplayError(OutputError):
    """A replay that cannot start, or that finished without an output to switch to."""


class QueryTerminatedError(MicrostreamError):
    """An operation on a query that has already stopped or failed."""


class WorkerError(MicrostreamError):
    """A worker of a cluster runtime (a Ray actor) died or failed during a batch; the
    batch was not committed, and a restart of the query re-runs it from the log."""


class WorkerLostError(WorkerError):
    """Workers of a cluster runtime died or hung past the runtime's timeout during a
    batch. The runtime replaces them and the driver re-runs the batch from its log entry
    (same offsets, watermark and timestamp) within the run; only when that is not allowed
    (:class:`WorkerRestartsExhaustedError`) does the query fail."""

    def __init__(self, message: str, workers: frozenset[int]) -> None:
        super().__init__(message)
        self.workers = workers
        """The indices of the workers that are gone."""


class WorkerRestartsExhaustedError(WorkerError):
    """A batch lost workers more often than the runtime restarts them for one batch
    (``RayRuntime(max_worker_restarts=...)``); the query stops, nothing of the batch
    committed, and a restart of the query re-runs it from the log."""


class MissingDependencyError(MicrostreamError, ImportError):
    """An optional dependency that a connector needs is not installed."""


class UnboundedStateWarning(UserWarning):
    """A query starts with an operator whose state can only grow (never evicted).

    Not an error: a bounded key space is fine forever. Silence it with
    ``warnings.filterwarnings("ignore", category=ms.UnboundedStateWarning)``.
    """


def user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside microstream
    (as Polars' ``find_stacklevel``): the user's line, however deep the call came from."""
    package = os.path.dirname(os.path.abspath(__file__))
    level = 1
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None  # warnings.warn's caller is 1
        while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(
            package + os.sep
        ):
            level += 1
            frame = frame.f_back
    finally:
        del frame
    return level
