"""Delta Lake: an exactly-once sink, table maintenance, and a static table for joins.

The sink commits every batch with a Delta *application transaction*
(``txn`` action; app id = the query id, version = the batch id) in the same
commit as the data. Before writing batch ``N`` it reads the table's last
transaction version for the query: if it is ``>= N`` the batch was committed
by an earlier attempt and is skipped. That is Delta's own idempotent-write
mechanism, so exactly-once holds even if the process dies between the Delta
commit and microstream's ``commits/N.json``.

Output modes: append (add the batch's rows), complete (replace the table
with the batch) and update (MERGE the batch on the key columns of the query's
aggregation: matched rows are replaced, new keys inserted). Each is one Delta
commit per batch, the transaction included; in append and update mode a batch
without rows makes no commit (``connectors/_delta_commit.py``).

On a cluster runtime (``RayRuntime``) in append and complete mode the workers write
a batch's Parquet files and the driver commits them, with the same transaction, in
one commit (:meth:`DeltaSink.part_writer`, :meth:`DeltaSink.commit_parts`,
:mod:`connectors._delta_parts`); update mode and ``merge_schema`` take the batch on
the driver.

Streaming writes many small files; :func:`optimize_delta` compacts them and
:func:`vacuum_delta` deletes the files no version needs any more.

``deltalake`` is an optional dependency, imported only when used
(``pip install 'microstream[delta]'``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._delta_commit import log_retention_property, post_commit_hooks, skips_empty_batch
from microstream.checkpoint.storage import Storage
from microstream.exceptions import MissingDependencyError, PlanError, SinkError, SourceError
from microstream.protocols import SinkContext, SinkPart, StaticSide
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from deltalake import CommitProperties, DeltaTable, PostCommitHookProperties

    from connectors._delta_parts import DeltaPartWriter

__all__ = [
    "DeltaSink",
    "DeltaSinkSpec",
    "DeltaStaticTable",
    "DeltaTableReader",
    "merge_predicate",
    "optimize_delta",
    "read_delta",
    "vacuum_delta",
]


_COMMIT_ATTEMPTS = 3
"""Attempts at a batch's commit when concurrent commits win (each re-reads the log)."""


def _require_deltalake() -> None:
    try:
        import deltalake  # noqa: F401
    except ImportError as exc:
        msg = (
            "the Delta connector needs the deltalake package, which is not installed: "
            "pip install 'microstream[delta]'"
        )
        raise MissingDependencyError(msg) from exc


def _open_table(
    path: str, storage_options: dict[str, str] | None, version: int | None = None
) -> DeltaTable | None:
    """The table at ``path``, or None if there is no Delta table there yet."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        return DeltaTable(path, version=version, storage_options=storage_options)
    except TableNotFoundError:
        return None


# -- the sink --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaSinkSpec:
    """Write each batch to a Delta table, exactly once.

    Parameters
    ----------
    path
        Table location (local path, ``s3://...``, ``az://...``); created by
        the first batch if absent.
    storage_options
        Passed to ``deltalake`` (credentials, endpoints).
    partition_by
        Partition columns used when the table is created.
    merge_schema
        Let a batch add columns to the table (``schema_mode="merge"`` in
        append mode, ``"overwrite"`` in complete mode, a schema-merging MERGE
        in update mode). Off by default: a batch whose schema differs from
        the table's fails with a :class:`~microstream.exceptions.SinkError`,
        since an unexpected schema change is more often a bug than an intent.
    target_file_size
        Target size in bytes of the data files a batch writes (delta-rs'
        ``target_file_size``). When the sink creates the table it is also
        stored as the table property ``delta.targetFileSize``, which MERGE
        (update mode) and :func:`optimize_delta` follow.
    log_retention
        How much log history the table keeps (a duration: ``"1h"``, a
        ``timedelta``); when the sink creates the table it is stored as
        ``delta.logRetentionDuration`` and log files older than that are
        deleted when a checkpoint is written (every ``delta.checkpointInterval``
        versions). Delta's default is 30 days, and a commit's cost grows with
        the files in ``_delta_log`` (delta-rs lists the directory twice per
        commit): a short retention bounds that part, at the price of time travel
        to versions older than that.

    Notes
    -----
    Output modes: ``"append"`` appends each batch; ``"complete"`` replaces
    the table's content with each batch's full result; ``"update"`` MERGEs
    each batch into the table on the key columns of the query's aggregation
    (the window start and the group keys of ``group_by_dynamic``, the group
    keys of ``group_by``): a row whose key is in the table replaces it, a new
    key is inserted. Keys match null-safely (a null key equals a null key),
    as Polars groups them. Every batch with rows is one table version; a
    batch without rows is none in append and update mode (the table's
    transaction version is then the last batch that had rows; see
    ``connectors/_delta_commit.py`` for why exactly-once holds), one that
    empties the table in complete mode.

    Examples
    --------
    >>> spec = DeltaSinkSpec("tables/out", partition_by=["day"])
    >>> sorted(spec.output_modes)
    ['append', 'complete', 'update']
    """

    kind: ClassVar[str] = "delta"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "complete", "update"})
    durable: ClassVar[bool] = True

    path: str
    _: KW_ONLY
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    partition_by: Sequence[str] | None = None
    merge_schema: bool = False
    target_file_size: int | None = None
    log_retention: str | timedelta | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.partition_by is not None:
            cols = (self.partition_by,) if isinstance(self.partition_by, str) else self.partition_by
            if not cols or not all(isinstance(c, str) and c for c in cols):
                msg = (
                    "partition_by must be a non-empty list of column names or None; "
                    f"got {self.partition_by!r}"
                )
                raise ValueError(msg)
            object.__setattr__(self, "partition_by", tuple(cols))
        if not isinstance(self.merge_schema, bool):
            msg = f"merge_schema must be a bool; got {self.merge_schema!r}"
            raise ValueError(msg)
        size = self.target_file_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            msg = f"target_file_size must be a positive number of bytes or None; got {size!r}"
            raise ValueError(msg)
        if self.log_retention is not None:
            parse_duration(self.log_retention, name="log_retention")

    def describe(self) -> str:
        """One line: ``DeltaSink[tables/out]``."""
        return f"DeltaSink[{self.path}]"

    def build(self, context: SinkContext) -> DeltaSink:
        """The runtime sink (checks that ``deltalake`` is installed)."""
        return DeltaSink(self, context)

    def table_exists(self, directory: Storage) -> bool:
        """Whether ``directory`` has a Delta log (even an empty one): :class:`TableSinkSpec`.

        Examples
        --------
        >>> DeltaSinkSpec("/no/such/table").table_exists(Storage("/no/such/table"))
        False
        """
        return directory.exists("_delta_log")

    def read_table(self, columns: Sequence[str] | None = None) -> pl.DataFrame:
        """The table's rows now (only ``columns`` if given): :class:`TableSinkSpec`."""
        _require_deltalake()
        return pl.read_delta(
            self.path,
            columns=None if columns is None else list(columns),
            storage_options=self.storage_options,
        )


class DeltaSink:
    """The runtime side of :class:`DeltaSinkSpec`.

    Keeps nothing in the checkpoint: the table's transaction log records
    which batches it holds.
    """

    def __init__(self, spec: DeltaSinkSpec, context: SinkContext) -> None:
        _require_deltalake()
        self.spec = spec
        self.description = spec.describe()
        if context.output_mode not in DeltaSinkSpec.output_modes:
            msg = (
                f"{self.description} supports output_mode 'append', 'complete' or 'update'; "
                f"got {context.output_mode!r}"
            )
            raise SinkError(msg)
        self.key_columns: tuple[str, ...] | None = None
        if context.output_mode == "update":
            self.key_columns = _update_keys(self.description, context)
        self.app_id = context.query_id
        self._mode = context.output_mode
        self._logger = context.logger
        self._faults = context.faults
        self._schema = context.schema
        self._table: DeltaTable | None = None
        # The batch this sink committed last in this run: its handle is then at the table's
        # version (a write updates it), so the next batch's transaction check needs no read.
        self._wrote: int | None = None

    def committed_batch(self) -> int | None:
        """The last batch id this query committed to the table (None: none yet)."""
        if self._table is None:
            self._table = _open_table(self.spec.path, self.spec.storage_options)
            if self._table is None:
                return None
        else:
            self._table.update_incremental()
        return self._table.transaction_version(self.app_id)

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Commit ``data`` with transaction ``(query id, batch_id)``; skip a committed batch.

        A commit that loses to a concurrent one (an OPTIMIZE while a MERGE
        runs, another writer) is retried on the new table version, up to
        three attempts; the transaction check keeps each retry exactly once.
        A batch without rows is not committed in append and update mode once
        the table exists with its columns (:func:`skips_empty_batch`).

        Raises
        ------
        SinkError
            The table cannot be read or the commit fails (schema mismatch,
            permissions, repeated conflicts); the message names the table and batch.
        """
        from deltalake.exceptions import CommitFailedError

        if data.height == 0 and self._mode != "complete" and self._table is None:
            self._committed(batch_id)  # (opens the handle: an empty batch compares columns)
        if skips_empty_batch(self._table, self._mode, data):
            self._faults.reach("sink.after_data")
            return
        for attempt in range(1, _COMMIT_ATTEMPTS + 1):
            # Another writer with this query's id cannot exist (the checkpoint lock), so
            # after our own commit the transaction version is ours; a retry re-reads.
            done: int | None = self._wrote
            if attempt > 1 or done is None or done >= batch_id:
                done = self._committed(batch_id)
            if done is not None and done >= batch_id:
                self._logger.info(
                    "%s: batch %d already committed (transaction version %d); skipped",
                    self.description,
                    batch_id,
                    done,
                )
                return
            try:
                self._wrote = None  # (unknown until this write returns)
                self._write(batch_id, data)
                # (a MERGE leaves the handle at its old version, so update mode re-reads; a
                # write by path, the table's first, has no handle yet)
                kept = self._mode != "update" and self._table is not None
                self._wrote = batch_id if kept else None
                break
            except CommitFailedError as exc:
                # A concurrent commit won (an OPTIMIZE during a MERGE, another writer):
                # nothing of this attempt is in the table. Re-read the log and retry;
                # the transaction check above keeps it exactly once.
                if attempt == _COMMIT_ATTEMPTS:
                    msg = (
                        f"{self.description}: cannot commit batch {batch_id} to Delta table "
                        f"{self.spec.path}: it conflicted with concurrent commits "
                        f"{_COMMIT_ATTEMPTS} times; last: {exc}"
                    )
                    raise SinkError(msg) from exc
                self._logger.warning(
                    "%s: batch %d conflicted with a concurrent commit, retrying (%d/%d): %s",
                    self.description,
                    batch_id,
                    attempt,
                    _COMMIT_ATTEMPTS,
                    exc,
                )
                time.sleep(0.05 * attempt)
        self._faults.reach("sink.after_data")

    def _committed(self, batch_id: int) -> int | None:
        """:meth:`committed_batch` before ``batch_id``; a failure is a :class:`SinkError`."""
        try:
            return self.committed_batch()
        except Exception as exc:
            msg = (
                f"{self.description}: cannot read the transaction log of {self.spec.path} "
                f"before batch {batch_id}: {exc}"
            )
            raise SinkError(msg) from exc

    def part_writer(self) -> DeltaPartWriter | None:
        """What workers write their pieces of a batch with (``PartSink``); None in update
        mode or with ``merge_schema`` (:func:`connectors._delta_parts.writes_parts`)."""
        from connectors._delta_parts import DeltaPartWriter, writes_parts

        partition_by = self.spec.partition_by
        if partition_by is None and self.committed_batch() is not None and self._table:
            partition_by = tuple(self._table.metadata().partition_columns) or None
        if not writes_parts(
            self._mode,
            merge_schema=self.spec.merge_schema,
            partition_by=partition_by,
            schema=self._schema,
        ):
            return None
        return DeltaPartWriter(
            self.spec.path, self.spec.storage_options, tuple(partition_by or ()), self.description
        )

    def commit_parts(self, batch_id: int, parts: Sequence[SinkPart]) -> None:
        """Commit the pieces' files with the batch's transaction in one Delta commit
        (``PartSink``; :func:`connectors._delta_parts.commit_delta_parts`); a committed batch
        is skipped, as by :meth:`add_batch`, its pieces left out of the log, and so is a
        batch without rows in append mode once the table exists (:func:`skips_empty_batch`)."""
        from connectors._delta_parts import commit_delta_parts

        done = self._committed(batch_id)
        if done is not None and done >= batch_id:
            self._logger.info("%s: batch %d already committed; skipped", self.description, batch_id)
            return
        self._faults.reach("sink.after_data")
        empty = pl.DataFrame(schema=self._schema)
        if not sum(p.rows for p in parts) and skips_empty_batch(self._table, self._mode, empty):
            return
        configuration = self._table_properties() if self._table is None else None
        commit_delta_parts(
            self._table,
            parts,
            path=self.spec.path,
            storage_options=self.spec.storage_options,
            mode=self._mode,
            app_id=self.app_id,
            batch_id=batch_id,
            configuration=configuration,
            description=self.description,
        )
        self._wrote = None  # the next batch re-reads the log (the handle is not at it)

    def _table_properties(self) -> dict[str, str | None] | None:
        """The properties the commit that creates the table gives it."""
        properties: dict[str, str | None] = {}
        if self.spec.target_file_size is not None:
            properties["delta.targetFileSize"] = str(self.spec.target_file_size)
        if self.spec.log_retention is not None:
            retention = parse_duration(self.spec.log_retention, name="log_retention")
            properties.update(log_retention_property(retention))
        return properties or None

    def _write(self, batch_id: int, data: pl.DataFrame) -> None:
        """One commit of ``data`` by output mode, carrying the batch's transaction."""
        from deltalake import CommitProperties, Transaction, write_deltalake
        from deltalake.exceptions import CommitFailedError

        target = self.spec.path if self._table is None else self._table
        table = data.to_arrow()
        partition_by = list(self.spec.partition_by) if self.spec.partition_by else None
        options = self.spec.storage_options if self._table is None else None
        # Table properties can only be given when the table is created.
        configuration = self._table_properties() if self._table is None else None
        hooks = post_commit_hooks(self._table)
        commit = CommitProperties(
            app_transactions=[Transaction(app_id=self.app_id, version=batch_id)]
        )
        try:
            if self._mode == "update" and self._table is not None and data.height > 0:
                self._merge(self._table, data, batch_id, commit, hooks)
            elif self._mode in ("append", "update"):
                # update mode on a new table, or with nothing to merge: the append
                # creates the table / records the batch's transaction.
                write_deltalake(
                    target,
                    table,
                    mode="append",
                    partition_by=partition_by,
                    schema_mode="merge" if self.spec.merge_schema else None,
                    storage_options=options,
                    configuration=configuration,
                    target_file_size=self.spec.target_file_size,
                    commit_properties=commit,
                    post_commithook_properties=hooks,
                )
            else:
                write_deltalake(
                    target,
                    table,
                    mode="overwrite",
                    partition_by=partition_by,
                    schema_mode="overwrite" if self.spec.merge_schema else None,
                    storage_options=options,
                    configuration=configuration,
                    target_file_size=self.spec.target_file_size,
                    commit_properties=commit,
                    post_commithook_properties=hooks,
                )
        except (SinkError, CommitFailedError):
            raise
        except Exception as exc:
            hint = ""
            if "schema" in str(exc).lower() and not self.spec.merge_schema:
                hint = " (pass merge_schema=True to let batches add columns)"
            msg = (
                f"{self.description}: cannot commit batch {batch_id} to Delta table "
                f"{self.spec.path}: {exc}{hint}"
            )
            raise SinkError(msg) from exc

    def _merge(
        self,
        table: DeltaTable,
        data: pl.DataFrame,
        batch_id: int,
        commit: CommitProperties,
        hooks: PostCommitHookProperties | None,
    ) -> None:
        """MERGE ``data`` on the key columns: one Delta commit, the transaction included."""
        if not self.spec.merge_schema:
            # delta-rs' MERGE drops source columns the table lacks without a word.
            have = {f.name for f in table.schema().fields}
            extra = [c for c in data.columns if c not in have]
            missing = [c for c in have if c not in data.columns]
            if extra or missing:
                msg = (
                    f"{self.description}: cannot commit batch {batch_id} to Delta table "
                    f"{self.spec.path}: the batch's columns differ from the table's "
                    f"(not in the table: {extra}; not in the batch: {sorted(missing)}); pass "
                    "merge_schema=True to let batches add columns"
                )
                raise SinkError(msg)
        assert self.key_columns is not None
        (
            table.merge(
                data.to_arrow(),
                predicate=merge_predicate(self.key_columns),
                source_alias="source",
                target_alias="target",
                merge_schema=self.spec.merge_schema,
                commit_properties=commit,
                post_commithook_properties=hooks,
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )

    def stop(self) -> None:
        """Drop the cached table handle."""
        self._table = None
        self._wrote = None


def _update_keys(description: str, context: SinkContext) -> tuple[str, ...]:
    """The key columns update mode MERGEs on, checked against the batches' schema."""
    keys = context.key_columns
    if keys is None:
        msg = (
            f"{description}: output_mode='update' MERGEs each batch into the table on the key "
            "columns of the query's aggregation (group_by keys, plus the window start of "
            "group_by_dynamic), and this query has none: without an aggregation, or with "
            "unique(), every output row is new (use output_mode='append'); a session window's "
            "key changes when sessions merge (stream sessions with output_mode='append')"
        )
        raise PlanError(msg)
    if context.schema is not None:
        lost = [k for k in keys if k not in context.schema]
        if lost:
            msg = (
                f"{description}: output_mode='update' MERGEs on the aggregation's key columns "
                f"{list(keys)}, but the query's output lacks {lost} (columns: "
                f"{list(context.schema.names())}); keep the keys, under their names, in the "
                "output"
            )
            raise PlanError(msg)
    return keys


def merge_predicate(keys: Sequence[str], *, target: str = "target", source: str = "source") -> str:
    """The MERGE condition matching rows with equal keys, nulls equal to nulls.

    Each key is compared with ``IS NOT DISTINCT FROM`` (parenthesised: it binds
    more loosely than ``AND``), names quoted with backticks. No keys (a global
    aggregation): every row matches, the table holds one row.

    Examples
    --------
    >>> merge_predicate(["user", "ts"])
    '(target.`user` IS NOT DISTINCT FROM source.`user`) AND (target.`ts` IS NOT DISTINCT FROM source.`ts`)'
    >>> merge_predicate([])
    'true'
    """
    if not keys:
        return "true"

    def quote(name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    return " AND ".join(
        f"({target}.{quote(k)} IS NOT DISTINCT FROM {source}.{quote(k)})" for k in keys
    )


# -- the static side of stream-static joins --------------------------------------------------------


class DeltaTableReader:
    """Reads a Delta table into polars, again only when its version changed.

    Thread-safe; shared by every query that joins the same
    :class:`DeltaStaticTable`.
    """

    def __init__(
        self,
        path: str,
        storage_options: dict[str, str] | None = None,
        version: int | None = None,
        *,
        table: DeltaTable | None = None,
    ) -> None:
        _require_deltalake()
        self.path = path
        self.storage_options = storage_options
        self.pinned_version = version
        self._table = table
        self._lock = threading.Lock()
        self._loaded_version: int | None = None
        self._frame: pl.DataFrame | None = None

    def _current_table(self) -> DeltaTable:
        if self._table is None:
            self._table = _open_table(self.path, self.storage_options, self.pinned_version)
            if self._table is None:
                msg = f"there is no Delta table at {self.path} to join with"
                raise SourceError(msg)
        elif self.pinned_version is None:
            self._table.update_incremental()  # reads only the new log entries
        return self._table

    def load_if_changed(self) -> tuple[int, pl.DataFrame, bool]:
        """The table's version, its content, and whether it was (re-)read by this call.

        The table is re-read only when its version moved since the last call
        (or never, with a pinned version).

        Raises
        ------
        SourceError
            No table at the path, or it cannot be read.
        """
        with self._lock:
            try:
                table = self._current_table()
                version = table.version()
                if self._frame is not None and version == self._loaded_version:
                    return version, self._frame, False
                frame = pl.read_delta(table)
            except SourceError:
                raise
            except Exception as exc:
                msg = f"cannot read Delta table {self.path} for a stream-static join: {exc}"
                raise SourceError(msg) from exc
            self._loaded_version, self._frame = version, frame
            return version, frame, True


@dataclass(frozen=True)
class DeltaStaticTable(StaticSide):
    """A Delta table joined to a stream, re-read when its version changes.

    Parameters
    ----------
    path
        Table location.
    storage_options
        Passed to ``deltalake``.
    version
        Pin a table version; by default every batch joins with the latest.

    Attributes
    ----------
    schema
        The table's schema, read when the spec is created (the table must
        exist then).

    Examples
    --------
    >>> side = DeltaStaticTable("tables/users")  # doctest: +SKIP
    >>> version, frame, reloaded = side.load_if_changed()  # doctest: +SKIP
    """

    path: str
    _: KW_ONLY
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    version: int | None = None
    schema: pl.Schema = field(init=False, compare=False, repr=False)
    _reader: DeltaTableReader = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        self._attach(DeltaTableReader(self.path, self.storage_options, self.version))

    def _attach(self, reader: DeltaTableReader) -> None:
        try:
            _, frame, _ = reader.load_if_changed()
        except SourceError as exc:
            msg = f"cannot plan a join with {self.describe()}: {exc}"
            raise PlanError(msg) from exc
        object.__setattr__(self, "_reader", reader)
        object.__setattr__(self, "schema", frame.schema)

    @classmethod
    def claims(cls, table: object) -> bool:
        """Whether ``table`` is a ``deltalake.DeltaTable``: :class:`StaticTableAdapter`.

        A DeltaTable can only exist once ``deltalake`` is imported, so this never
        imports it.

        Examples
        --------
        >>> DeltaStaticTable.claims(object())
        False
        """
        deltalake = sys.modules.get("deltalake")
        return deltalake is not None and isinstance(table, deltalake.DeltaTable)

    @classmethod
    def from_table(cls, table: DeltaTable) -> DeltaStaticTable:
        """Follow a ``deltalake.DeltaTable`` the user opened (keeps its storage options)."""
        spec = cls.__new__(cls)
        object.__setattr__(spec, "path", str(table.table_uri))
        object.__setattr__(spec, "storage_options", None)
        object.__setattr__(spec, "version", None)
        spec._attach(DeltaTableReader(spec.path, table=table))
        return spec

    def identity(self) -> dict[str, Any]:
        """The table location and pinned version."""
        return {"path": self.path, "version": self.version}

    def describe(self) -> str:
        """One line: ``DeltaTable[tables/users@latest]``."""
        at = "latest" if self.version is None else f"v{self.version}"
        return f"DeltaTable[{self.path}@{at}]"

    def load_if_changed(self) -> tuple[int, pl.DataFrame, bool]:
        """See :meth:`DeltaTableReader.load_if_changed`."""
        return self._reader.load_if_changed()

    def current(self) -> pl.LazyFrame:
        """The table's content now (cached until its version changes)."""
        return self._reader.load_if_changed()[1].lazy()


def read_delta(
    path: str | os.PathLike[str],
    *,
    version: int | None = None,
    storage_options: dict[str, str] | None = None,
) -> pl.DataFrame:
    """Read a Delta table (a sink's output) into a DataFrame.

    Examples
    --------
    >>> read_delta("tables/out")  # doctest: +SKIP
    """
    _require_deltalake()
    return pl.read_delta(os.fspath(path), version=version, storage_options=storage_options)


# -- maintenance: the small-files problem of streaming ---------------------------------------------


def optimize_delta(
    path: str | os.PathLike[str],
    *,
    target_size: int | None = None,
    z_order: Sequence[str] | None = None,
    partition_filters: list[tuple[str, str, Any]] | None = None,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compact a Delta table's small files into larger ones (Delta's OPTIMIZE).

    A streaming sink writes at least one file per batch and partition, so a
    table fed every few seconds gathers many small files, which slow every
    reader. OPTIMIZE rewrites them into files of about ``target_size`` bytes
    in one commit whose actions all carry ``dataChange=false``: the rows do
    not change, so :func:`~microstream.scan_delta` streams of the table skip
    the commit (no duplicates). It can run while a query writes the table:
    appends do not conflict with it, and an update-mode MERGE that does is
    retried by the sink on the new version. The old files stay on storage
    for time travel until :func:`vacuum_delta` removes them.

    Parameters
    ----------
    path
        Table location.
    target_size
        Bytes per output file; default: the table property
        ``delta.targetFileSize``, else 100 MB.
    z_order
        Columns to cluster the rows by (Z-order) while rewriting; all
        files of the selected partitions are rewritten then.
    partition_filters
        Only these partitions, e.g. ``[("day", "=", "2024-01-01")]``.
    storage_options
        Passed to ``deltalake``.

    Returns
    -------
    dict
        delta-rs' metrics: ``numFilesAdded``, ``numFilesRemoved``, ...

    Examples
    --------
    >>> import tempfile
    >>> import polars as pl
    >>> from deltalake import write_deltalake
    >>> table = tempfile.mkdtemp() + "/t"
    >>> for i in range(3):
    ...     write_deltalake(table, pl.DataFrame({"x": [i]}).to_arrow(), mode="append")
    >>> metrics = optimize_delta(table)
    >>> metrics["numFilesRemoved"], metrics["numFilesAdded"]
    (3, 1)
    """
    table = _existing_table(path, storage_options, "optimize")
    optimizer = table.optimize
    if z_order:
        return optimizer.z_order(
            list(z_order), partition_filters=partition_filters, target_size=target_size
        )
    return optimizer.compact(partition_filters=partition_filters, target_size=target_size)


def vacuum_delta(
    path: str | os.PathLike[str],
    *,
    retention_hours: int | None = None,
    dry_run: bool = True,
    enforce_retention_duration: bool = True,
    storage_options: dict[str, str] | None = None,
) -> list[str]:
    """Delete the files of a Delta table that no version younger than the retention uses.

    After :func:`optimize_delta` (or a rewrite) the replaced files stay on
    storage for time travel; VACUUM deletes those removed from the table
    longer than ``retention_hours`` ago. A :func:`~microstream.scan_delta`
    query that lags further behind than the retention, or a replay of an old
    range, then fails with a ``SourceError`` naming the missing file: keep
    the retention longer than any stream of the table may lag.

    Parameters
    ----------
    path
        Table location.
    retention_hours
        Keep files removed less than this long ago; default: the table
        property ``delta.deletedFileRetentionDuration``, else one week.
    dry_run
        Only list the files (the default, as in delta-rs); ``False`` deletes them.
    enforce_retention_duration
        Refuse a ``retention_hours`` below the table's retention property.
    storage_options
        Passed to ``deltalake``.

    Returns
    -------
    list of str
        The files deleted (or that would be, with ``dry_run``).

    Examples
    --------
    >>> import tempfile
    >>> import polars as pl
    >>> from deltalake import write_deltalake
    >>> table = tempfile.mkdtemp() + "/t"
    >>> write_deltalake(table, pl.DataFrame({"x": [1]}).to_arrow())
    >>> write_deltalake(table, pl.DataFrame({"x": [2]}).to_arrow(), mode="overwrite")
    >>> len(vacuum_delta(table, retention_hours=0, enforce_retention_duration=False))
    1
    """
    table = _existing_table(path, storage_options, "vacuum")
    return table.vacuum(
        retention_hours=retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=enforce_retention_duration,
    )


def _existing_table(
    path: str | os.PathLike[str], storage_options: dict[str, str] | None, verb: str
) -> DeltaTable:
    _require_deltalake()
    location = os.fspath(path)
    table = _open_table(location, storage_options)
    if table is None:
        msg = f"there is no Delta table at {location} to {verb}"
        raise SinkError(msg)
    return table
