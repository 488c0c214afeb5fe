"""Kappa-style reprocessing: the same query over the whole history, into a new version.

:func:`replay` builds the query from the user's function, runs it from the
start of its sources' retained history into a fresh Delta table
``OUTPUT/v<n>`` with a fresh checkpoint, with ``Trigger.available_now()``
(a progress bar shows the share of the backlog done and the lag), and when
it has finished, switches the output's pointer to the new table
(:mod:`microstream.api.outputs`). Readers that resolve the pointer see either
the old version or the complete new one; a replay that fails, or is
interrupted, leaves the pointer where it was, and running it again resumes
it from its checkpoint.

Where the sources start
-----------------------
The query function is called with ``replay=True`` when it has a ``replay``
parameter: that is where a query whose live job starts at a later point
(``starting_offsets="latest"``, ``starting_version=...``) chooses the start
of the history instead. microstream does not rewrite the sources itself:
what ``replay=True`` means stays visible in the user's code. The defaults of
the sources already read the whole retained history: ``scan_kafka`` from the
earliest offsets, ``scan_delta`` the table's current content and then its
new versions, ``scan_files`` every file there.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from microstream.api.frame import StreamFrame
from microstream.api.outputs import (
    CHECKPOINTS_DIR,
    OutputPointer,
    output_path,
    output_table,
    read_pointer,
    resolved,
    switch_output,
)
from microstream.api.query import StreamingQuery
from microstream.api.session import default_session
from microstream.checkpoint.storage import Storage
from microstream.exceptions import OutputError, ReplayError
from microstream.runtime.progress_bar import ProgressBar, in_notebook
from microstream.time.trigger import Trigger

if TYPE_CHECKING:
    from microstream._typing import OutputMode
    from microstream.runtime.progress import QueryProgressEvent

__all__ = ["ReplayResult", "load_query", "replay"]

logger = logging.getLogger("microstream")

QueryFunction = Callable[..., StreamFrame]
"""A function returning the query as a :class:`StreamFrame` (before its ``sink_*``)."""


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay` did.

    Attributes
    ----------
    output
        The output directory.
    version
        The version the replay wrote (``table`` is ``OUTPUT/v<version>``).
    table, checkpoint
        Where the new version and its checkpoint are.
    switched
        Whether readers were switched to it (``switch=True``, the default).
    pointer
        The output's pointer after the replay (None if there is none).
    previous
        The pointer before it (None if the output was new).
    query
        The replay's query, terminated (``query.progress_df()`` has its
        most recent batches).
    num_batches, num_input_rows, num_output_rows
        What the replay's batches read and wrote, all batches of this run.
    duration_s
        Wall time of the run.
    """

    output: str
    version: int
    table: str
    checkpoint: str
    switched: bool
    pointer: OutputPointer | None
    previous: OutputPointer | None
    query: StreamingQuery
    num_batches: int
    num_input_rows: int
    num_output_rows: int
    duration_s: float


def replay(
    query: QueryFunction | str,
    output: str | os.PathLike[str],
    *,
    output_mode: OutputMode = "append",
    version: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    flush: bool = False,
    switch: bool = True,
    progress: bool | None = None,
    name: str | None = None,
    partition_by: Sequence[str] | None = None,
    merge_schema: bool = False,
    target_file_size: int | None = None,
    storage_options: dict[str, str] | None = None,
    checkpoint_options: dict[str, Any] | None = None,
    pointer_options: dict[str, Any] | None = None,
) -> ReplayResult:
    """Reprocess a query's whole input into a new version of a Delta output, then switch.

    The Kappa architecture's reprocessing step: after a change to the query
    (a fix, a new column), run the same code from the start of its sources'
    retained history into a new table, and move readers to it when it is
    complete. Concretely:

    1. the version is the output's current one plus one (1 for a new output);
       the table is ``OUTPUT/v<version>``, the checkpoint
       ``OUTPUT/_checkpoints/v<version>`` unless ``checkpoint`` is given;
    2. ``query`` is called (with ``replay=True`` if it has a ``replay``
       parameter, so it can pick the start of the history where its live
       job starts later) and returns the query as a :class:`StreamFrame`;
    3. the query runs into the new table with
       ``Trigger.available_now(flush=flush)``: everything available at
       start, in the batches the sources' rate limits allow, then stop; a
       progress bar shows the share done and the sources' lag;
    4. when it finished without error, ``OUTPUT/current.json`` is replaced
       atomically to point at the new table (:func:`switch_output`), unless
       ``switch=False``.

    If the replay fails or is interrupted, the pointer does not move and the
    exception is raised. Calling ``replay`` again resumes the same version
    from its checkpoint (exactly once: the Delta sink skips batches already
    committed); if the query changed in a way its checkpoint refuses, pass
    ``version=`` a higher number, or delete that version's table and
    checkpoint.

    A live job continues the output from the replay's checkpoint: resolve
    ``ms.current_output(OUTPUT)`` and start the same query with
    ``sink_delta(pointer.table, checkpoint=pointer.checkpoint, ...)``. Its
    sources' starting options are then ignored (the checkpoint has the
    positions). With ``flush=True`` every window is emitted at the end (the
    output equals the batch result of the whole history), but the checkpoint
    is finished: a live job must not continue on it.

    Parameters
    ----------
    query
        A function returning the query as a :class:`StreamFrame`, or where to
        find one: ``"path/to/job.py:function"`` or ``"package.module:function"``
        (the file is imported under its own name, so its
        ``if __name__ == "__main__":`` block, e.g. the live job, does not run).
    output
        The output directory (local path or fsspec URL) holding the pointer
        and the versions.
    output_mode
        As for ``sink_delta``: ``"append"``, ``"update"`` or ``"complete"``.
    version
        The version to write (default: the current one plus one). Must be
        higher than the current one.
    checkpoint
        The replay's checkpoint (default ``OUTPUT/_checkpoints/v<version>``).
    flush
        Emit every window at the end (``Trigger.available_now(flush=True)``).
    switch
        Switch readers when done (default). With False, switch later with
        ``ms.switch_output(output, table=result.table, checkpoint=result.checkpoint)``.
    progress
        Show a progress bar (default: in a terminal or a notebook).
    name
        The query's name (default ``"<output name>-v<version>"``).
    partition_by, merge_schema, target_file_size, storage_options, checkpoint_options
        As for ``sink_delta``.
    pointer_options
        fsspec options for the output directory (the pointer file).

    Returns
    -------
    ReplayResult

    Raises
    ------
    ReplayError
        The query cannot be loaded or does not return a StreamFrame; the
        version's table exists without its checkpoint; the replay read
        nothing, so there is no table to switch to; another writer switched
        the output meanwhile (the new table is kept; switch by hand).
    MicrostreamError
        The replay's query failed (the pointer is unchanged).

    See Also
    --------
    current_output, read_output, switch_output

    Examples
    --------
    >>> import tempfile
    >>> import polars as pl
    >>> from deltalake import write_deltalake
    >>> import microstream as ms
    >>> root = tempfile.mkdtemp()
    >>> write_deltalake(f"{root}/events", pl.DataFrame({"user": [1, 2, 1]}).to_arrow())
    >>> def big_users(replay: bool = False) -> ms.StreamFrame:
    ...     return ms.scan_delta(f"{root}/events").filter(pl.col("user") > 1)
    >>> result = ms.replay(big_users, f"{root}/big_users", progress=False)
    >>> result.version, result.num_input_rows, result.switched
    (1, 3, True)
    >>> ms.read_output(f"{root}/big_users")["user"].to_list()
    [2]

    The query changes; replay it into version 2, which readers then see:

    >>> def big_users(replay: bool = False) -> ms.StreamFrame:
    ...     return ms.scan_delta(f"{root}/events").filter(pl.col("user") >= 1)
    >>> ms.replay(big_users, f"{root}/big_users", progress=False).version
    2
    >>> sorted(ms.read_output(f"{root}/big_users")["user"].to_list())
    [1, 1, 2]
    >>> ms.current_output(f"{root}/big_users").previous.version
    1
    """
    function, label = _resolve_query(query)
    store = Storage(os.fspath(output), pointer_options)
    current = read_pointer(store)
    at = current.version if current is not None else 0
    target = at + 1 if version is None else version
    if isinstance(target, bool) or not isinstance(target, int) or target <= at:
        msg = (
            f"version must be an int above the output's current version {at} "
            f"({store.display('')}); got {version!r}"
        )
        raise ReplayError(msg)
    table_name = f"v{target}"
    table = output_path(store, table_name)
    location = (
        output_path(store, f"{CHECKPOINTS_DIR}/{table_name}")
        if checkpoint is None
        else os.fspath(checkpoint)
    )
    resuming = Storage(location, checkpoint_options).exists("metadata.json")
    spec = output_table(
        table,
        storage_options=storage_options,
        partition_by=list(partition_by) if partition_by else None,
        merge_schema=merge_schema,
        target_file_size=target_file_size,
    )
    table_dir = Storage(table, pointer_options)
    if spec.table_exists(table_dir) and not resuming:
        msg = (
            f"the table of version {target}, {table}, exists but its checkpoint {location} "
            "does not, so the replay cannot know what it holds. Delete the table (a replay "
            "that failed before its first checkpoint entry), or pass version= a higher number"
        )
        raise ReplayError(msg)
    frame = _build(function, label)
    if resuming:
        logger.info("resuming the replay of %s version %d from %s", label, target, location)
    totals = _Totals()
    default_session.add_listener(totals)
    started = time.monotonic()
    try:
        running = frame.sink(
            spec,
            output_mode=output_mode,
            trigger=Trigger.available_now(flush=flush),
            checkpoint=location,
            checkpoint_options=checkpoint_options,
            name=name or f"{_basename(store)}-v{target}",
        )
        totals.follow(running.run_id)
        _wait(running, show=_show_progress(progress), label=f"replay {label} -> v{target}")
    finally:
        default_session.remove_listener(totals)
    duration = time.monotonic() - started
    if not spec.table_exists(table_dir):
        msg = (
            f"the replay of {label} ran no batch (its sources had no data), so there is no "
            f"table {table} to switch readers to; the output stays at version {at}"
        )
        raise ReplayError(msg)
    pointer = resolved(store, current) if current is not None else None
    switched = False
    if switch:
        try:
            pointer = switch_output(
                store.url,
                table=table,
                checkpoint=location,
                expected_version=at,
                flushed=flush,
                query=label,
                pointer_options=pointer_options,
            )
        except OutputError as exc:
            msg = (
                f"{exc}. The replay's table {table} is complete; switch to it with "
                f"ms.switch_output({store.url!r}, table={table!r}, checkpoint={location!r})"
            )
            raise ReplayError(msg) from exc
        switched = True
    return ReplayResult(
        output=store.display(""),
        version=target,
        table=table,
        checkpoint=location,
        switched=switched,
        pointer=pointer,
        previous=resolved(store, current) if current is not None else None,
        query=running,
        num_batches=totals.batches,
        num_input_rows=totals.rows_in,
        num_output_rows=totals.rows_out,
        duration_s=duration,
    )


def load_query(target: str) -> QueryFunction:
    """The query function named by ``"path/to/job.py:function"`` or ``"module:function"``.

    A file is imported as a module of its own name (not ``__main__``, so its
    ``if __name__ == "__main__":`` block does not run), with its directory on
    ``sys.path`` as ``python job.py`` would have it.

    Raises
    ------
    ReplayError
        A malformed target, a missing file or module, or a name that is not
        a function.

    Examples
    --------
    >>> load_query("microstream.api.replay:load_query") is load_query
    True
    >>> load_query("no_colon")
    Traceback (most recent call last):
    ...
    microstream.exceptions.ReplayError: the query must be given as FILE.py:FUNCTION or MODULE:FUNCTION; got 'no_colon'
    """
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        msg = f"the query must be given as FILE.py:FUNCTION or MODULE:FUNCTION; got {target!r}"
        raise ReplayError(msg)
    if where.endswith(".py") or "/" in where or os.sep in where:
        path = os.path.abspath(where)
        if not os.path.isfile(path):
            msg = f"no query file {path} (from {target!r})"
            raise ReplayError(msg)
        directory = os.path.dirname(path)
        if directory not in sys.path:
            sys.path.insert(0, directory)
        stem = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(stem, path)
        if spec is None or spec.loader is None:
            msg = f"cannot import {path} (from {target!r})"
            raise ReplayError(msg)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            msg = f"cannot import module {where!r} (from {target!r}): {exc}"
            raise ReplayError(msg) from exc
    function = getattr(module, attr, None)
    if not callable(function):
        msg = f"{where} has no function {attr!r} (from {target!r})"
        raise ReplayError(msg)
    result: QueryFunction = function
    return result


def _resolve_query(query: QueryFunction | str) -> tuple[QueryFunction, str]:
    if isinstance(query, str):
        return load_query(query), query
    if not callable(query):
        msg = (
            "query must be a function returning a StreamFrame, or 'FILE.py:FUNCTION'; "
            f"got {query!r}"
        )
        raise ReplayError(msg)
    module = getattr(query, "__module__", None)
    qualname = getattr(query, "__qualname__", None) or repr(query)
    if module in (None, "__main__"):  # a script's or a notebook's own function
        return query, qualname
    return query, f"{module}:{qualname}"


def _build(function: QueryFunction, label: str) -> StreamFrame:
    """Call the query function, with ``replay=True`` if it takes that argument."""
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C callable: call it plainly
        parameters = {}
    takes_replay = "replay" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )
    frame = function(replay=True) if takes_replay else function()
    if isinstance(frame, StreamingQuery):
        frame.stop()
        msg = (
            f"{label} started a query (it called a sink_* verb); a replayed query function "
            "must return the StreamFrame before its sink, and replay adds the sink. The "
            "query it started was stopped"
        )
        raise ReplayError(msg)
    if not isinstance(frame, StreamFrame):
        msg = (
            f"{label} must return the query as a StreamFrame (e.g. ms.scan_kafka(...)."
            f"filter(...)); got {type(frame).__name__}"
        )
        raise ReplayError(msg)
    return frame


def _show_progress(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return bool(getattr(sys.stderr, "isatty", lambda: False)()) or in_notebook()


def _wait(query: StreamingQuery, *, show: bool, label: str) -> None:
    """Wait for the replay's query; on Ctrl-C stop it (its checkpoint stays consistent)."""
    try:
        if show:
            with ProgressBar(query, label=label):
                query.await_termination()
        else:
            query.await_termination()
    except KeyboardInterrupt:
        query.stop()
        raise


def _basename(store: Storage) -> str:
    return store.root.rstrip("/").rsplit("/", 1)[-1] or "output"


class _Totals:
    """Counts the batches and rows of one query run (listener; all batches, not the last 100)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._run_id: str | None = None
        self._early: list[tuple[str, int, int]] = []
        self.batches = 0
        self.rows_in = 0
        self.rows_out = 0

    def follow(self, run_id: str) -> None:
        with self._lock:
            self._run_id = run_id
            for run, rows_in, rows_out in self._early:
                self._count(run, rows_in, rows_out)
            self._early = []

    def on_query_progress(self, event: QueryProgressEvent) -> None:
        p = event.progress
        with self._lock:
            if self._run_id is None:  # the query started before its run id was known here
                self._early.append((p.run_id, p.num_input_rows, p.num_output_rows))
            else:
                self._count(p.run_id, p.num_input_rows, p.num_output_rows)

    def _count(self, run_id: str, rows_in: int, rows_out: int) -> None:
        if run_id == self._run_id:
            self.batches += 1
            self.rows_in += rows_in
            self.rows_out += rows_out
