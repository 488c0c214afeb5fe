"""Delta Lake: an exactly-once sink, and a static table for stream-static joins.

The sink commits every batch with a Delta *application transaction*
(``txn`` action; app id = the query id, version = the batch id) in the same
commit as the data. Before writing batch ``N`` it reads the table's last
transaction version for the query: if it is ``>= N`` the batch was committed
by an earlier attempt and is skipped. That is Delta's own idempotent-write
mechanism, so exactly-once holds even if the process dies between the Delta
commit and microstream's ``commits/N.json``.

``deltalake`` is an optional dependency, imported only when used
(``pip install 'microstream[delta]'``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from microstream.exceptions import MissingDependencyError, PlanError, SinkError, SourceError
from microstream.protocols import SinkContext, StaticSide

if TYPE_CHECKING:
    from deltalake import DeltaTable

__all__ = ["DeltaSink", "DeltaSinkSpec", "DeltaStaticTable", "DeltaTableReader", "read_delta"]


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
        append mode, ``"overwrite"`` in complete mode). Off by default: a
        batch whose schema differs from the table's fails with a
        :class:`~microstream.exceptions.SinkError`, since an unexpected
        schema change is more often a bug than an intent.

    Notes
    -----
    Output modes: ``"append"`` appends each batch; ``"complete"`` replaces
    the table's content with each batch's full result. Every batch is one
    table version, an empty batch included (a commit with no files that
    records the batch's transaction), as Delta's Spark sink does.

    Examples
    --------
    >>> spec = DeltaSinkSpec("tables/out", partition_by=["day"])
    >>> sorted(spec.output_modes)
    ['append', 'complete']
    """

    kind: ClassVar[str] = "delta"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "complete"})
    durable: ClassVar[bool] = True

    path: str
    _: KW_ONLY
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    partition_by: Sequence[str] | None = None
    merge_schema: bool = False

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

    def describe(self) -> str:
        """One line: ``DeltaSink[tables/out]``."""
        return f"DeltaSink[{self.path}]"

    def build(self, context: SinkContext) -> DeltaSink:
        """The runtime sink (checks that ``deltalake`` is installed)."""
        return DeltaSink(self, context)


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
                f"{self.description} supports output_mode 'append' or 'complete'; got "
                f"{context.output_mode!r}"
            )
            raise SinkError(msg)
        self.app_id = context.query_id
        self._mode = context.output_mode
        self._logger = context.logger
        self._faults = context.faults
        self._table: DeltaTable | None = None

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

        Raises
        ------
        SinkError
            The table cannot be read or the commit fails (schema mismatch,
            permissions, conflict); the message names the table and batch.
        """
        from deltalake import CommitProperties, Transaction, write_deltalake

        try:
            done = self.committed_batch()
        except Exception as exc:
            msg = (
                f"{self.description}: cannot read the transaction log of {self.spec.path} "
                f"before batch {batch_id}: {exc}"
            )
            raise SinkError(msg) from exc
        if done is not None and done >= batch_id:
            self._logger.info(
                "%s: batch %d already committed (transaction version %d); skipped",
                self.description,
                batch_id,
                done,
            )
            return
        target = self.spec.path if self._table is None else self._table
        table = data.to_arrow()
        partition_by = list(self.spec.partition_by) if self.spec.partition_by else None
        options = self.spec.storage_options if self._table is None else None
        commit = CommitProperties(
            app_transactions=[Transaction(app_id=self.app_id, version=batch_id)]
        )
        try:
            if self._mode == "append":
                write_deltalake(
                    target,
                    table,
                    mode="append",
                    partition_by=partition_by,
                    schema_mode="merge" if self.spec.merge_schema else None,
                    storage_options=options,
                    commit_properties=commit,
                )
            else:
                write_deltalake(
                    target,
                    table,
                    mode="overwrite",
                    partition_by=partition_by,
                    schema_mode="overwrite" if self.spec.merge_schema else None,
                    storage_options=options,
                    commit_properties=commit,
                )
        except Exception as exc:
            hint = ""
            if "schema" in str(exc).lower() and not self.spec.merge_schema:
                hint = " (pass merge_schema=True to let batches add columns)"
            msg = (
                f"{self.description}: cannot commit batch {batch_id} to Delta table "
                f"{self.spec.path}: {exc}{hint}"
            )
            raise SinkError(msg) from exc
        self._faults.reach("sink.after_data")

    def stop(self) -> None:
        """Drop the cached table handle."""
        self._table = None


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
