"""The in-process session: memory tables, listeners and the active queries.

Like Spark's ``SparkSession.streams``, one :class:`Session` object owns what
queries in one process share. ``microstream`` keeps a default instance so that
``ms.table(name)`` and ``ms.add_listener(...)`` work without ceremony; tests may
create their own and pass ``session=`` to sinks.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import polars as pl

from microstream.exceptions import MicrostreamError, SinkError

if TYPE_CHECKING:
    from microstream.api.query import StreamingQuery
    from microstream.runtime.base import Runtime
    from microstream.runtime.progress import (
        QueryIdleEvent,
        QueryProgressEvent,
        QueryStartedEvent,
        QueryTerminatedEvent,
    )
    from microstream.time.trigger import Trigger

__all__ = [
    "Session",
    "StreamingQueryListener",
    "active",
    "add_listener",
    "default_session",
    "remove_listener",
    "table",
]

logger = logging.getLogger("microstream")


@runtime_checkable
class StreamingQueryListener(Protocol):
    """Callbacks for query life-cycle events (Spark's ``StreamingQueryListener``).

    Implement any subset; missing methods are skipped. Callbacks run on the
    query's thread, so keep them short.
    """

    def on_query_started(self, event: QueryStartedEvent) -> None: ...

    def on_query_progress(self, event: QueryProgressEvent) -> None: ...

    def on_query_idle(self, event: QueryIdleEvent) -> None: ...

    def on_query_terminated(self, event: QueryTerminatedEvent) -> None: ...


class Session:
    """Process-wide registry of memory tables, listeners and queries.

    Examples
    --------
    >>> session = Session()
    >>> session.table_names()
    []
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._tables: dict[str, list[pl.DataFrame]] = {}
        self._table_batches: dict[str, set[tuple[str, int]]] = {}  # (writer, batch id)
        self._table_writers: dict[str, str] = {}  # sink_memory table -> its query's id
        self._listeners: list[object] = []
        self._queries: dict[str, StreamingQuery] = {}
        self._finished: deque[StreamingQuery] = deque(maxlen=100)
        self.trigger_override: Trigger | None = None
        """When set (by ``microstream run --available-now``), every new query uses it."""
        self.runtime_override: Runtime | None = None
        """When set (by ``microstream run --runtime``), every new query runs on it."""

    # -- memory tables -------------------------------------------------------------

    def table(self, name: str) -> pl.DataFrame:
        """The current content of the memory table ``name``."""
        with self._lock:
            if name not in self._tables:
                known = ", ".join(sorted(self._tables)) or "none"
                msg = f"no memory table named {name!r} (known tables: {known})"
                raise MicrostreamError(msg)
            parts = self._tables[name]
            if len(parts) > 1:  # concatenate on read, so a batch's append stays O(1)
                # diagonal: late rows of a join's two sides have different columns
                parts[:] = [pl.concat(parts, how="diagonal_relaxed")]
            return parts[0]

    def table_names(self) -> list[str]:
        with self._lock:
            return sorted(self._tables)

    def register_table(
        self, name: str, schema: pl.Schema | None = None, writer: str | None = None
    ) -> None:
        """Make table ``name`` readable; with ``writer`` (a query's id), the table is that
        query's output, as Spark's memory sink: a query restarted on its checkpoint goes
        on with it, another query starts it empty (a notebook cell run again shows the new
        run's rows, neither doubled nor stale), and a second query while its writer runs
        is refused."""
        with self._lock:
            previous = self._table_writers.get(name)
            if writer is not None and previous is not None and previous != writer:
                running = [q for q in self._queries.values() if q.is_active and q.id == previous]
                if running:
                    msg = (
                        f"memory table {name!r} is the output of query {running[0].name or previous} "
                        "which is still running: stop it first, or give this query's "
                        "sink_memory another name"
                    )
                    raise SinkError(msg)
                self._tables.pop(name, None)
            if writer is not None:
                self._table_writers[name] = writer
            if name not in self._tables:
                self._tables[name] = [pl.DataFrame(schema=schema)]
                self._table_batches[name] = set()

    def write_table(
        self, name: str, batch_id: int, data: pl.DataFrame, *, replace: bool, writer: str = ""
    ) -> bool:
        """Apply a batch of query ``writer`` to a memory table; False if that query's batch
        was already applied (a replay). Batch ids are counted per query: two queries into
        one table each write their batch 0."""
        with self._lock:
            seen = self._table_batches.setdefault(name, set())
            if (writer, batch_id) in seen:
                return False
            parts = self._tables.setdefault(name, [])
            if replace or not parts or all(p.width == 0 for p in parts):
                parts[:] = [data]
            else:
                parts.append(data)
            seen.add((writer, batch_id))
            return True

    def drop_table(self, name: str) -> None:
        with self._lock:
            self._tables.pop(name, None)
            self._table_batches.pop(name, None)

    # -- listeners --------------------------------------------------------------------

    def add_listener(self, listener: object) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: object) -> None:
        with self._lock:
            self._listeners = [x for x in self._listeners if x is not listener]

    def post(self, method: str, event: object) -> None:
        """Call ``method`` on every listener; a failing listener is logged, not fatal."""
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            callback = getattr(listener, method, None)
            if callback is None:
                continue
            try:
                callback(event)
            except Exception:
                logger.exception("listener %r failed in %s", listener, method)

    # -- queries ----------------------------------------------------------------------

    def register_query(self, query: StreamingQuery) -> None:
        with self._lock:
            self._queries[query.run_id] = query

    def unregister_query_run(self, run_id: str) -> None:
        with self._lock:
            query = self._queries.pop(run_id, None)
            if query is not None:
                self._finished.append(query)

    @property
    def finished(self) -> list[StreamingQuery]:
        """The most recent queries of this process that have terminated."""
        with self._lock:
            return list(self._finished)

    @property
    def active(self) -> list[StreamingQuery]:
        """Queries started in this process that have not terminated."""
        with self._lock:
            return [q for q in self._queries.values() if q.is_active]


default_session = Session()


def table(name: str) -> pl.DataFrame:
    """The memory table written by ``sink_memory(name)``.

    Examples
    --------
    >>> import microstream as ms
    >>> ms.table("no-such-table")
    Traceback (most recent call last):
    ...
    microstream.exceptions.MicrostreamError: no memory table named 'no-such-table' (known tables: ...)
    """
    return default_session.table(name)


def add_listener(listener: object) -> None:
    """Register a listener for query events (see :class:`StreamingQueryListener`)."""
    default_session.add_listener(listener)


def remove_listener(listener: object) -> None:
    """Unregister a listener added with :func:`add_listener`."""
    default_session.remove_listener(listener)


def active() -> list[StreamingQuery]:
    """The queries of this process that are running."""
    return default_session.active
