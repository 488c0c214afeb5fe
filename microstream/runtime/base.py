"""The Runtime seam: how a query's batches execute, behind one small protocol.

The API layer builds an :class:`~microstream.runtime.driver.ExecutionConfig`
(the plan, the sink spec, the trigger, the checkpoint) and hands it to a
:class:`Runtime`, which returns a :class:`QueryRun`: the running query as the
API sees it (state, progress, stop, wait). The driver (trigger loop, write-ahead
log, watermark, recovery, sink commit) is the same whatever the runtime; a
runtime decides only where the batches' work runs. :class:`LocalRuntime` (the
default) runs it in this process, on a background thread.

Two steps, :meth:`Runtime.prepare` then :meth:`QueryRun.start`, so the API can
register the query with its session before the query posts its first event (a
query that fails at once is then still found among the session's finished ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from microstream.runtime.driver import ExecutionConfig, StreamExecution

if TYPE_CHECKING:
    import polars as pl

    from microstream._typing import QueryState
    from microstream.runtime.progress import QueryProgress

__all__ = ["LocalRuntime", "QueryRun", "Runtime"]


class QueryRun(Protocol):
    """One run of a query, as a runtime exposes it to ``StreamingQuery``."""

    config: ExecutionConfig
    query_id: str
    """Stable across restarts (kept in the checkpoint); known once :meth:`start` returned."""
    run_id: str
    state: QueryState
    status_message: str
    is_data_available: bool
    is_trigger_active: bool
    exception: BaseException | None

    @property
    def recent_progress(self) -> Sequence[QueryProgress]:
        """The progress of the last batches, oldest first."""
        ...

    @property
    def is_active(self) -> bool:
        """Whether the run is starting or running (not stopped or failed)."""
        ...

    def start(self) -> None:
        """Prepare on the caller's thread (checkpoint, sources, sink: set-up errors raise
        here), then run the trigger loop in the background."""
        ...

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the current batch and wait up to ``timeout`` seconds."""
        ...

    def join(self, timeout: float | None) -> bool:
        """Wait for the run to end; whether it did within ``timeout``."""
        ...

    def process_all_available(self, timeout: float | None = None) -> bool:
        """Block until a check for new data that started after this call found none."""
        ...

    def operator_store_schemas(self) -> list[dict[str, pl.Schema]]:
        """Per stateful operator, in plan order, its state stores and their schemas."""
        ...


class Runtime(Protocol):
    """Where a query's batches run: ``LocalRuntime`` (this process) or a cluster."""

    def prepare(self, config: ExecutionConfig) -> QueryRun:
        """A run of the query ``config`` describes, not started yet."""
        ...


class LocalRuntime:
    """Runs a query in this process, on a background thread: the default runtime.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"x": pl.Int64})
    >>> query = stream.lazy().sink_memory("doc_local_runtime", runtime=ms.LocalRuntime())
    >>> _ = stream.add_data({"x": [1, 2]})
    >>> query.process_all_available()
    >>> ms.table("doc_local_runtime")["x"].to_list()
    [1, 2]
    >>> query.stop()
    """

    def prepare(self, config: ExecutionConfig) -> StreamExecution:
        return StreamExecution(config)

    def __repr__(self) -> str:
        return "LocalRuntime()"
