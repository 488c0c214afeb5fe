"""Reading a query's state from outside the query: ``ms.read_state`` and ``microstream state``."""

from __future__ import annotations

import binascii
import os

import polars as pl

from microstream.checkpoint.log import Checkpoint
from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointCorruptError, CheckpointError
from microstream.state.format import (
    METADATA_FILE,
    SEGMENT_SPEC_FILE,
    VERSIONS_DIR,
    AnyStateVersion,
    SegmentSpec,
    SegmentVersion,
    StateMetadata,
    frame_from_text,
    version_file,
)
from microstream.state.segment_buffer import SegmentBuffer
from microstream.state.store import StateStore

__all__ = [
    "friendly_names",
    "list_state",
    "list_stores",
    "read_committed_state",
    "read_state",
    "read_store",
]

_FRIENDLY = {
    "__start": "window_start_us",
    "__end": "window_end_us",
    "__sstart": "session_start_us",
    "__send": "session_end_us",
    "__expire_us": "expires_at_us",
    "__ot": "order_time_us",
    "__os": "arrival_seq",
    "__has_state": "has_state",
    "__timer_us": "timer_us",
    "__updated_ms": "updated_at_ms",
}


def list_state(checkpoint: str | os.PathLike[str]) -> dict[str, list[str]]:
    """The stateful operators of a checkpoint and the stores each keeps.

    Examples
    --------
    >>> list_state("memory://no-state-here")
    {}
    """
    return list_stores(Checkpoint(os.fspath(checkpoint)))


def list_stores(cp: Checkpoint) -> dict[str, list[str]]:
    """:func:`list_state` of an open checkpoint (with its storage options)."""
    fs, root = cp.storage.fs, cp.storage.path("state")
    result: dict[str, list[str]] = {}
    try:
        operators = sorted(fs.ls(root, detail=False))
    except FileNotFoundError:
        return result
    for operator in operators:
        name = str(operator).rstrip("/").rsplit("/", 1)[-1]
        stores = sorted(
            str(s).rstrip("/").rsplit("/", 1)[-1] for s in fs.ls(operator, detail=False)
        )
        result[name] = [s for s in stores if not s.startswith((".", "_"))]
    return result


def read_state(
    checkpoint: str | os.PathLike[str],
    *,
    operator: str = "op0",
    store: str | None = None,
    version: int | None = None,
) -> pl.DataFrame:
    """The state of one stateful operator as a DataFrame, as of a committed batch.

    Operators are named ``op0``, ``op1``, ... in plan order (``explain()``);
    each keeps one or two stores: ``partials`` (incremental aggregates) and
    ``rows`` (rows kept for aggregates that do not decompose) for windows
    (plus ``emits`` with emit triggers, ``updated`` with ``state_ttl``),
    ``sessions`` for session windows, ``keys`` for deduplication, ``state``
    for ``map_groups_with_state``. Internal columns get readable names
    (``window_start_us``, ``timer_us``, ...). Before the first committed
    batch the state is empty, even if an interrupted batch wrote some.

    Parameters
    ----------
    checkpoint
        The query's checkpoint directory or URL.
    operator
        The operator id.
    store
        Which store; defaults to the operator's first.
    version
        The batch id; defaults to the last committed batch.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> stream = ms.MemoryStream({"user": pl.String})
    >>> query = stream.lazy().group_by("user").agg(pl.len()).sink_memory(
    ...     "doc_state", output_mode="complete", checkpoint="memory://doc-state"
    ... )
    >>> _ = stream.add_data({"user": ["a", "a", "b"]})
    >>> query.process_all_available()
    >>> query.stop()
    >>> ms.read_state("memory://doc-state").sort("user").rows()
    [('a', 2), ('b', 1)]
    """
    return read_committed_state(
        Checkpoint(os.fspath(checkpoint)), operator=operator, store=store, version=version
    )


def read_committed_state(
    cp: Checkpoint, *, operator: str = "op0", store: str | None = None, version: int | None = None
) -> pl.DataFrame:
    """:func:`read_state` of an open checkpoint (``StreamingQuery.state`` reads through here)."""
    listed = list_stores(cp)
    stores = listed.get(operator)
    if not stores:
        known = ", ".join(listed) or "none"
        msg = (
            f"checkpoint {cp.display()} has no state for operator {operator!r} (operators: {known})"
        )
        raise CheckpointError(msg)
    chosen = store or stores[0]
    if chosen not in stores:
        msg = f"operator {operator!r} keeps the stores {stores}; got store={chosen!r}"
        raise CheckpointError(msg)
    storage = cp.storage.sub(f"state/{operator}/{chosen}")
    if version is None:
        commit = cp.latest_commit()
        if commit is None:  # nothing committed: the newest version on disk is not (yet) valid
            return friendly_names(read_store(storage).clear())
        version = commit.batch_id
    return friendly_names(read_store(storage, version=version))


def friendly_names(frame: pl.DataFrame) -> pl.DataFrame:
    """A state frame with its internal column names made readable."""
    renamed = {c: _FRIENDLY.get(c, _friendly_agg(c)) for c in frame.columns}
    return frame.rename(renamed)


def _friendly_agg(column: str) -> str:
    # "__agg0_sum" -> "agg0_sum": partial aggregate columns, numbered in plan order
    return column[2:] if column.startswith("__agg") else column


def read_store(storage: Storage, *, version: int | None = None) -> pl.DataFrame:
    """Read the state of one operator from its checkpoint directory.

    Works from outside a running query: the key columns, schema and partitions
    come from the directory's ``_metadata.json``. Nothing is written.

    Parameters
    ----------
    storage
        The operator's directory, ``<checkpoint>/state/<operator>/``.
    version
        The version (batch id) to read; ``None`` reads the newest version on
        disk, which can be one batch ahead of the query's ``commits/`` if the
        process died between committing the state and the batch.

    Returns
    -------
    DataFrame
        The state's rows, columns in schema order (row order unspecified).

    Raises
    ------
    CheckpointError
        The directory holds no state.
    CheckpointCorruptError
        A file needed is missing or corrupt; the message names it.

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.checkpoint.storage import Storage
    >>> storage = Storage("memory://doctest-read-state/dedup")
    >>> from microstream.state.store import StateStore
    >>> store = StateStore(
    ...     storage, operator="dedup", key_columns=["id"], schema={"id": pl.Int64}
    ... )
    >>> store.apply(upserts=pl.DataFrame({"id": [1, 2, 3]}))
    >>> store.commit(0)
    >>> read_store(storage).sort("id")["id"].to_list()
    [1, 2, 3]
    """
    try:
        meta = storage.read_model(METADATA_FILE, StateMetadata)
    except FileNotFoundError:
        msg = f"no operator state in {storage.display('')}: {storage.display(METADATA_FILE)} is missing"
        raise CheckpointError(msg) from None
    try:
        schema = frame_from_text(meta.schema_ipc).schema
    except (binascii.Error, ValueError, pl.exceptions.PolarsError) as exc:
        msg = (
            f"checkpoint file {storage.display(METADATA_FILE)} is corrupt: field schema_ipc ({exc})"
        )
        raise CheckpointCorruptError(msg) from None
    if version is None:
        committed = storage.list_numbered(VERSIONS_DIR)
        version = committed[-1] if committed else None
    if version is not None and storage.exists(version_file(version)):
        entry = storage.read_model(version_file(version), AnyStateVersion).root
        if isinstance(entry, SegmentVersion):  # (a join's buffer: segments, not keyed)
            try:
                spec = storage.read_model(SEGMENT_SPEC_FILE, SegmentSpec)
            except FileNotFoundError:
                msg = (
                    f"checkpoint file {storage.display(SEGMENT_SPEC_FILE)} is missing: version "
                    f"{version} is a join buffer's segments, whose columns that file names"
                )
                raise CheckpointCorruptError(msg) from None
            buffer = SegmentBuffer(
                storage,
                operator=meta.operator,
                key_columns=meta.key_columns,
                hash_columns=meta.hash_columns or meta.key_columns,
                schema=schema,
                num_key_groups=meta.num_key_groups,
                time_column=spec.time_column,
                row_id_column=spec.row_id_column,
                flag_column=spec.flag_column,
            )
            buffer.load(version)
            return buffer.frame
    store = StateStore(
        storage,
        operator=meta.operator,
        key_columns=meta.key_columns,
        hash_columns=meta.hash_columns,
        schema=schema,
        num_key_groups=meta.num_key_groups,
        snapshot_every=meta.snapshot_every,
    )
    store.load(version)
    return store.frame
