"""``StreamingQuery``: the handle to a running query."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import polars as pl
from pydantic import BaseModel, ConfigDict

from microstream.plan.physical import explain_lines

if TYPE_CHECKING:
    from microstream.runtime.base import QueryRun
    from microstream.runtime.progress import QueryProgress

__all__ = ["QueryStatus", "StreamingQuery"]


class QueryStatus(BaseModel):
    """What the query is doing right now (Spark's ``StreamingQuery.status``)."""

    model_config = ConfigDict(frozen=True)

    message: str
    is_data_available: bool
    is_trigger_active: bool
    state: str


class StreamingQuery:
    """A started query, returned by every ``sink_*`` verb.

    The query runs on a background thread, so a notebook stays usable; a job
    calls :meth:`await_termination`. ``id`` is stored in the checkpoint and
    stays the same across restarts; ``run_id`` is new for every start.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"x": pl.Int64})
    >>> query = stream.lazy().filter(pl.col("x") > 1).sink_memory("big")
    >>> _ = stream.add_data({"x": [1, 2, 3]})
    >>> query.process_all_available()
    >>> query.last_progress.num_input_rows, query.last_progress.num_output_rows
    (3, 2)
    >>> query.stop()
    >>> query.is_active
    False
    """

    def __init__(self, execution: QueryRun):
        self._execution = execution

    @property
    def id(self) -> str:
        """Stable id, kept in the checkpoint across restarts."""
        return self._execution.query_id

    @property
    def run_id(self) -> str:
        """Id of this run; new every time the query starts."""
        return self._execution.run_id

    @property
    def name(self) -> str | None:
        return self._execution.config.name

    @property
    def checkpoint(self) -> str:
        """Where the query's checkpoint lives."""
        return self._execution.config.checkpoint_url

    @property
    def is_active(self) -> bool:
        return self._execution.is_active

    @property
    def status(self) -> QueryStatus:
        ex = self._execution
        return QueryStatus(
            message=ex.status_message,
            is_data_available=ex.is_data_available,
            is_trigger_active=ex.is_trigger_active,
            state=ex.state,
        )

    @property
    def last_progress(self) -> QueryProgress | None:
        """Progress of the most recent batch, or None before the first."""
        recent = self._execution.recent_progress
        return recent[-1] if recent else None

    @property
    def recent_progress(self) -> list[QueryProgress]:
        """Progress of the most recent batches (up to 100), oldest first."""
        return list(self._execution.recent_progress)

    def progress_df(self) -> pl.DataFrame:
        """Recent progress as a DataFrame, one row per batch (for plots)."""
        rows = [p.flat() for p in self._execution.recent_progress]
        if not rows:
            return pl.DataFrame(
                schema={"batch_id": pl.Int64, "timestamp": pl.Datetime("us", "UTC")}
            )
        return pl.DataFrame(rows)

    def exception(self) -> BaseException | None:
        """The exception that stopped the query, if any."""
        return self._execution.exception

    def stop(self) -> None:
        """Stop after the current batch (it commits or is re-run on restart) and wait."""
        self._execution.stop()

    def await_termination(self, timeout: float | timedelta | None = None) -> bool:
        """Wait until the query stops; re-raise the exception that stopped it.

        Returns
        -------
        bool
            True if the query terminated, False if ``timeout`` (seconds) passed first.
        """
        seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
        done = self._execution.join(seconds)
        if done and self._execution.exception is not None:
            raise self._execution.exception
        return done

    def await_termination_quietly(self, timeout: float | None = None) -> bool:
        """Wait like :meth:`await_termination`, without raising the query's exception."""
        return self._execution.join(timeout)

    def process_all_available(self, timeout: float | None = None) -> None:
        """Block until everything available when called has been processed (for tests).

        Raises the query's exception if it failed meanwhile.

        Raises
        ------
        TimeoutError
            If ``timeout`` seconds pass first.
        """
        done = self._execution.process_all_available(timeout)
        if self._execution.exception is not None:
            raise self._execution.exception
        if not done:
            msg = f"query {self.name or self.id} did not catch up within {timeout}s"
            raise TimeoutError(msg)

    def state(self, operator: str | None = None) -> pl.DataFrame:
        """The committed state of a stateful operator, as a DataFrame.

        Reads, from the checkpoint, the state as of the last batch in
        ``commits/`` — never a batch still running or one a crash cut short —
        through the same code as :func:`microstream.read_state`; safe to call
        from any thread while the query runs, and after it stopped.

        Parameters
        ----------
        operator
            ``"op0"``, ``"op1"``, ... in plan order (``explain()``), optionally
            with the store: ``"op0/rows"``; the operator's first store by
            default. May be left out when the query has one stateful operator.

        Returns
        -------
        DataFrame
            One row per state row (for ``map_groups_with_state``: per key),
            internal columns renamed as by ``read_state`` (``timer_us``, ...);
            empty, with the state's columns, before the first commit.

        Raises
        ------
        CheckpointError
            No such operator or store; the message lists those there are.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"user": pl.String})
        >>> query = stream.lazy().group_by("user").agg(pl.len()).sink_memory(
        ...     "doc_query_state", output_mode="complete"
        ... )
        >>> _ = stream.add_data({"user": ["a", "b", "a"]})
        >>> query.process_all_available()
        >>> query.state().sort("user").rows()
        [('a', 2), ('b', 1)]
        >>> query.state("op1")
        Traceback (most recent call last):
        ...
        microstream.exceptions.CheckpointError: no stateful operator 'op1' in this query; its operators and stores: op0/partials
        >>> query.stop()
        """
        from microstream.checkpoint.log import Checkpoint
        from microstream.exceptions import CheckpointError
        from microstream.state.read import friendly_names, list_stores, read_committed_state

        ex = self._execution
        names, schemas = self._state_stores()
        listing = ", ".join(f"{o}/{s}" for o, stores in names.items() for s in stores) or "none"
        if operator is None:
            if len(names) != 1:
                msg = f"this query has {len(names)} stateful operators; name one: {listing}"
                raise CheckpointError(msg)
            operator = next(iter(names))
        op_name, _, store_name = operator.partition("/")
        if op_name not in names or (store_name and store_name not in names[op_name]):
            what = f"store {operator!r}" if store_name else f"stateful operator {operator!r}"
            msg = f"no {what} in this query; its operators and stores: {listing}"
            raise CheckpointError(msg)
        cp = Checkpoint(ex.config.checkpoint_url, ex.config.storage_options)
        on_disk = list_stores(cp).get(op_name, [])
        store_name = store_name or next(iter(names[op_name] or on_disk), "")
        commit = cp.latest_commit()
        if commit is None or store_name not in on_disk:
            schema = schemas.get(f"{op_name}/{store_name}", pl.Schema())
            return friendly_names(pl.DataFrame(schema=schema))
        return read_committed_state(cp, operator=op_name, store=store_name, version=commit.batch_id)

    def list_state(self) -> dict[str, list[str]]:
        """The query's stateful operators and the stores each keeps, as :meth:`state` takes them.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"user": pl.String})
        >>> query = stream.lazy().group_by("user").agg(pl.len()).sink_memory(
        ...     "doc_list_state", output_mode="complete"
        ... )
        >>> query.list_state()
        {'op0': ['partials']}
        >>> query.stop()
        """
        return self._state_stores()[0]

    def _state_stores(self) -> tuple[dict[str, list[str]], dict[str, pl.Schema]]:
        names: dict[str, list[str]] = {}  # operator -> stores, from the running operators
        schemas: dict[str, pl.Schema] = {}
        for i, stores in enumerate(self._execution.operator_store_schemas()):
            names[f"op{i}"] = []
            for store, schema in stores.items():
                op_name, _, store_name = store.partition("/")
                names.setdefault(op_name, []).append(store_name)
                schemas[store] = schema
        return names, schemas

    def explain(self) -> None:
        """Print the query's plan."""
        print(self.explain_text())

    def explain_text(self) -> str:
        """The plan :meth:`explain` prints, one node a line, as a string.

        Examples
        --------
        >>> import polars as pl
        >>> import microstream as ms
        >>> stream = ms.MemoryStream({"x": pl.Int64}, name="xs")
        >>> query = stream.lazy().filter(pl.col("x") > 1).sink_memory("doc_explain_text")
        >>> print(query.explain_text())
        filter([(col("x")) > (dyn int: 1)])
          Scan MemoryStream[xs]
        <BLANKLINE>
        Physical plan:
          [0] Scan MemoryStream[xs] -> filter([(col("x")) > (dyn int: 1)])
          [1] Sink <- [0]
        >>> query.stop()
        """
        return "\n".join(explain_lines(self._execution.config.plan))

    def __repr__(self) -> str:
        return f"<StreamingQuery name={self.name!r} id={self.id} state={self._execution.state}>"
