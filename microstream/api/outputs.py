"""Versioned outputs: one table per version, and a pointer readers resolve.

A Kappa-style replay (:func:`microstream.replay`) writes a query's whole
history into a *new* table; readers move to it only when it is complete, by
resolving a small pointer file. An output is a directory::

    OUTPUT/current.json          the pointer: which version readers use now
    OUTPUT/v1/, OUTPUT/v2/, ...  one table per version (a Delta table)
    OUTPUT/_checkpoints/v2/ ...  the checkpoint of the query that wrote v2

Readers call :func:`current_output` (the table's path and its checkpoint) or
:func:`read_output` (the table as a DataFrame). A switch replaces
``current.json`` atomically (a temporary file renamed over it; on object
stores a single PUT), so a reader sees the old pointer or the new one, never
a half-written file. Tables are never deleted by a switch: a reader that
resolved the old version keeps reading it until it resolves again, and
:func:`switch_output` can move the pointer back.

The tables are written and read through the registered sink named
:data:`OUTPUT_SINK` (the Delta sink), as a :class:`~microstream.protocols.TableSinkSpec`:
the engine knows nothing of the table format.

Paths inside the output directory are stored relative to it (``"v2"``), so
the directory can be moved or copied whole; :func:`current_output` returns
them resolved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import polars as pl
from pydantic import BaseModel, ConfigDict, ValidationError

from microstream.checkpoint.storage import Storage
from microstream.exceptions import OutputError
from microstream.protocols import TableSinkSpec
from microstream.registry import load_connector

__all__ = [
    "POINTER_FILE",
    "OutputPointer",
    "OutputVersion",
    "current_output",
    "read_output",
    "switch_output",
]

POINTER_FILE = "current.json"
"""The pointer's name inside the output directory."""

CHECKPOINTS_DIR = "_checkpoints"
"""Where :func:`microstream.replay` puts each version's checkpoint by default."""

OUTPUT_SINK = "delta"
"""The registered sink (``microstream.connectors`` entry point) whose tables are the
versions of an output."""


def output_table(table: str, **options: Any) -> TableSinkSpec:
    """The sink spec of the version table at ``table``, with the sink's ``options``.

    Examples
    --------
    >>> output_table("/no/such/output/v1").describe()
    'DeltaSink[/no/such/output/v1]'
    """
    spec = load_connector(OUTPUT_SINK)(table, **options)
    if not isinstance(spec, TableSinkSpec):
        msg = (
            f"the {OUTPUT_SINK!r} sink ({type(spec).__name__}) cannot hold a version of an "
            "output: it has no table_exists()/read_table() (microstream.protocols.TableSinkSpec)"
        )
        raise OutputError(msg)
    return spec


class OutputVersion(BaseModel):
    """A version an output pointed to before (``OutputPointer.previous``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int
    table: str
    checkpoint: str | None = None
    switched_at: datetime


class OutputPointer(BaseModel):
    """Which table readers of a versioned output use now (``OUTPUT/current.json``).

    Attributes
    ----------
    version
        Increases by one with every switch.
    table
        The Delta table to read (resolved to a full path or URL when read
        with :func:`current_output`).
    checkpoint
        The checkpoint of the query that writes ``table``: a live job that
        continues the output runs on it (None if unknown).
    switched_at
        When readers were switched to this version (UTC).
    flushed
        The replay that wrote ``table`` ended with ``Trigger.available_now(flush=True)``,
        so its checkpoint's watermark is at the end of time: a live job cannot
        continue on it (every new row would be late).
    query
        The query that wrote it, as given to ``replay`` (``"jobs/q.py:per_minute"``).
    previous
        The version before this one (what a rollback switches back to).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = 1
    version: int
    table: str
    checkpoint: str | None = None
    switched_at: datetime
    flushed: bool = False
    query: str | None = None
    previous: OutputVersion | None = None


def _storage(output: str | os.PathLike[str], options: dict[str, Any] | None) -> Storage:
    return Storage(os.fspath(output), options)


def output_path(store: Storage, relative: str) -> str:
    """The full path or URL of ``relative`` in the output directory ``store``."""
    return store.display(relative)


def _resolve(store: Storage, location: str | None) -> str | None:
    if location is None or "://" in location or os.path.isabs(location):
        return location
    return output_path(store, location)


def _relative(store: Storage, location: str | None) -> str | None:
    """``location`` relative to the output directory if it lies inside it."""
    if location is None:
        return None
    full = location if "://" in location else os.path.abspath(location)
    root = output_path(store, "")
    if full.startswith(root.rstrip("/") + "/"):
        return full[len(root.rstrip("/")) + 1 :].rstrip("/")
    return full.rstrip("/")


def read_pointer(store: Storage) -> OutputPointer | None:
    """The pointer as stored (relative paths), or None if the output has none yet."""
    if not store.exists(POINTER_FILE):
        return None
    raw = store.read_bytes(POINTER_FILE)
    try:
        return OutputPointer.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the document"
        msg = (
            f"output pointer {store.display(POINTER_FILE)} is corrupt ({len(raw)} bytes): "
            f"{where}: {first['msg']}. Repair it with ms.switch_output(output, table=...)"
        )
        raise OutputError(msg) from None


def resolved(store: Storage, pointer: OutputPointer) -> OutputPointer:
    """``pointer`` with its table and checkpoint paths made full."""
    previous = pointer.previous
    if previous is not None:
        previous = previous.model_copy(
            update={
                "table": _resolve(store, previous.table),
                "checkpoint": _resolve(store, previous.checkpoint),
            }
        )
    return pointer.model_copy(
        update={
            "table": _resolve(store, pointer.table),
            "checkpoint": _resolve(store, pointer.checkpoint),
            "previous": previous,
        }
    )


def current_output(
    output: str | os.PathLike[str], *, pointer_options: dict[str, Any] | None = None
) -> OutputPointer:
    """The version of ``output`` readers use now: its Delta table and checkpoint.

    Resolve it when a reader or a live job starts, and again to follow a
    switch; a reader that keeps the old table path keeps reading the old
    version (switches never delete tables).

    Parameters
    ----------
    output
        The output directory (local path or fsspec URL), as given to
        :func:`microstream.replay`.
    pointer_options
        fsspec storage options for ``output`` (for ``s3://``: ``endpoint_url``,
        ``key``, ``secret``, ...).

    Raises
    ------
    OutputError
        The output has no pointer yet, or its pointer is corrupt.

    See Also
    --------
    read_output : the current table as a DataFrame.
    switch_output : move the pointer (adopt a table, roll back).
    microstream.replay : write a new version and switch to it.

    Examples
    --------
    >>> import tempfile
    >>> import microstream as ms
    >>> output = tempfile.mkdtemp() + "/per_minute"
    >>> ms.switch_output(output, table=f"{output}/v1").version
    1
    >>> pointer = ms.current_output(output)
    >>> pointer.table == f"{output}/v1", pointer.previous
    (True, None)
    """
    store = _storage(output, pointer_options)
    pointer = read_pointer(store)
    if pointer is None:
        msg = (
            f"output {store.display('')} has no pointer ({POINTER_FILE}) yet: create its first "
            "version with ms.replay(query, output) (CLI: microstream replay), or adopt an "
            "existing table with ms.switch_output(output, table=...)"
        )
        raise OutputError(msg)
    return resolved(store, pointer)


def read_output(
    output: str | os.PathLike[str],
    *,
    columns: Sequence[str] | None = None,
    storage_options: dict[str, str] | None = None,
    pointer_options: dict[str, Any] | None = None,
) -> pl.DataFrame:
    """Read the current version of a versioned output (a Delta table) into a DataFrame.

    The pointer is resolved once, so the frame comes from one version even if
    a switch happens meanwhile.

    Parameters
    ----------
    output
        The output directory.
    columns
        Only these columns.
    storage_options
        Passed to ``deltalake`` for the table (``AWS_ENDPOINT_URL``, ...).
    pointer_options
        fsspec options for the output directory (see :func:`current_output`).

    Examples
    --------
    >>> import tempfile
    >>> import polars as pl
    >>> import microstream as ms
    >>> output = tempfile.mkdtemp() + "/totals"
    >>> pl.DataFrame({"x": [1, 2]}).write_delta(f"{output}/v1")
    >>> _ = ms.switch_output(output, table=f"{output}/v1")
    >>> ms.read_output(output)["x"].to_list()
    [1, 2]
    """
    pointer = current_output(output, pointer_options=pointer_options)
    return output_table(pointer.table, storage_options=storage_options).read_table(columns)


def switch_output(
    output: str | os.PathLike[str],
    *,
    table: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    expected_version: int | None = None,
    flushed: bool = False,
    query: str | None = None,
    pointer_options: dict[str, Any] | None = None,
) -> OutputPointer:
    """Point the readers of ``output`` at ``table``, atomically.

    :func:`microstream.replay` calls it when a replay has finished. Call it
    yourself to adopt an existing table as the first version, or to roll
    back (``table=pointer.previous.table``). The new pointer's version is the
    old one's plus one (1 for the first); the old table is left as it is.

    Parameters
    ----------
    output
        The output directory (created if missing).
    table
        The Delta table readers should use (any path or URL).
    checkpoint
        The checkpoint of the query that writes ``table``, for live jobs
        that continue the output.
    expected_version
        Switch only if the pointer is still at this version (0: only if there
        is none): guards against two writers switching at once.
    flushed, query
        Recorded in the pointer (see :class:`OutputPointer`).
    pointer_options
        fsspec options for the output directory.

    Returns
    -------
    OutputPointer
        The new pointer, paths resolved.

    Raises
    ------
    OutputError
        The pointer is not at ``expected_version``.

    Examples
    --------
    >>> import tempfile
    >>> import microstream as ms
    >>> output = tempfile.mkdtemp() + "/out"
    >>> _ = ms.switch_output(output, table=f"{output}/v1")
    >>> _ = ms.switch_output(output, table=f"{output}/v2", expected_version=1)
    >>> pointer = ms.current_output(output)
    >>> pointer.version, pointer.table.endswith("v2"), pointer.previous.table.endswith("v1")
    (2, True, True)
    >>> ms.switch_output(output, table=f"{output}/v3", expected_version=1)
    Traceback (most recent call last):
    ...
    microstream.exceptions.OutputError: output ... is at version 2, not 1: another writer switched it meanwhile; the pointer was not changed
    """
    store = _storage(output, pointer_options)
    current = read_pointer(store)
    now_at = current.version if current is not None else 0
    if expected_version is not None and now_at != expected_version:
        msg = (
            f"output {store.display('')} is at version {now_at}, not {expected_version}: another "
            "writer switched it meanwhile; the pointer was not changed"
        )
        raise OutputError(msg)
    previous = None
    if current is not None:
        previous = OutputVersion(
            version=current.version,
            table=current.table,
            checkpoint=current.checkpoint,
            switched_at=current.switched_at,
        )
    location = _relative(store, os.fspath(table))
    assert location is not None
    pointer = OutputPointer(
        version=now_at + 1,
        table=location,
        checkpoint=_relative(store, None if checkpoint is None else os.fspath(checkpoint)),
        switched_at=datetime.now(timezone.utc),
        flushed=flushed,
        query=query,
        previous=previous,
    )
    store.makedirs("")
    store.write_model(POINTER_FILE, pointer)  # temp + rename (one PUT on object stores)
    return resolved(store, pointer)
