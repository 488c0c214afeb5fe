"""The Delta sink's pieces written by workers (the ``PartWriter`` / ``PartSink`` capability).

A cluster runtime's workers each write their piece of batch N as Parquet data
files into the table's location (:class:`DeltaPartWriter`; names carry the batch,
the attempt and the worker) and send back a :class:`DeltaPart` describing them (a
Delta *add* action each: path, size, partition values, row count). The driver's
:func:`commit_delta_parts` then commits every piece's files in ONE Delta commit
carrying the batch's application transaction (app id = query id, version = batch
id), with deltalake's public API (``DeltaTable.create_write_transaction``, or
``create_table_with_add_actions`` for the table's first batch). So the table gains
one version per batch, exactly as from :meth:`DeltaSink.add_batch
<connectors.delta.DeltaSink.add_batch>`, and a file of an attempt that is never
committed (a worker lost; a batch found committed already) is in no version of
the log: readers never see it, and ``vacuum_delta`` removes it.

Which batches take this path (:func:`writes_parts`): output modes ``append``
(the pieces are added) and ``complete`` (the pieces replace every file: an
overwrite commit), without ``merge_schema``, and with partition columns of
integer, string, boolean or date type. ``update`` mode MERGEs the whole batch on
its keys, so it is gathered on the driver, as are the others.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl
from pydantic import BaseModel, ConfigDict

from microstream.exceptions import SinkError
from microstream.protocols import SinkPart

if TYPE_CHECKING:
    from deltalake import DeltaTable

__all__ = [
    "DeltaFile",
    "DeltaPart",
    "DeltaPartWriter",
    "commit_delta_parts",
    "delta_types",
    "writes_parts",
]

_PARTITION_TYPES = (pl.Boolean, pl.String, pl.Date)


class DeltaFile(BaseModel):
    """One data file a worker wrote: what its Delta add action says."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str
    """Relative to the table's root (``<col>=<value>/`` directories when partitioned)."""
    size: int
    partition_values: dict[str, str | None]
    rows: int
    null_counts: dict[str, int]


class DeltaPart(SinkPart):
    """The data files one worker wrote of a batch, and the schema of its rows."""

    files: list[DeltaFile]
    schema_ipc: str
    """The piece's schema as a base64 empty Arrow IPC file."""
    partition_by: list[str]
    """The table's partition columns the piece was split by."""

    def row_schema(self) -> pl.Schema:
        """The schema of the piece's rows."""
        return pl.read_ipc(io.BytesIO(base64.b64decode(self.schema_ipc))).schema


def writes_parts(
    mode: str,
    *,
    merge_schema: bool,
    partition_by: Sequence[str] | None,
    schema: pl.Schema | None,
) -> bool:
    """Whether batches in ``mode`` may be written by workers and committed as their files
    give the same table as the driver's ``add_batch`` (the module docstring says which).

    Examples
    --------
    >>> schema = pl.Schema({"day": pl.Date, "x": pl.Float64})
    >>> writes_parts("append", merge_schema=False, partition_by=["day"], schema=schema)
    True
    >>> writes_parts("update", merge_schema=False, partition_by=None, schema=schema)
    False
    >>> writes_parts("append", merge_schema=False, partition_by=["x"], schema=schema)
    False
    """
    if mode not in ("append", "complete") or merge_schema:
        return False
    if not partition_by:
        return True
    if schema is None:
        return False
    return all(
        column in schema
        and (schema[column].is_integer() or isinstance(schema[column], _PARTITION_TYPES))
        for column in partition_by
    )


@dataclass(frozen=True)
class DeltaPartWriter:
    """Writes a worker's piece of a batch as Parquet files in a Delta table's location
    (picklable); nothing is in the table until :func:`commit_delta_parts`.

    Examples
    --------
    >>> import tempfile
    >>> writer = DeltaPartWriter(tempfile.mkdtemp() + "/t", partition_by=("k",))
    >>> part = writer.write_part(2, "run.0-1", pl.DataFrame({"k": [1, 1, None], "v": [1, 2, 3]}))
    >>> [(f.partition_values, f.rows) for f in part.files]
    [({'k': '1'}, 2), ({'k': None}, 1)]
    >>> part.files[0].path.startswith("k=1/part-00002-run.0-1-")
    True
    """

    path: str
    storage_options: dict[str, str] | None = field(default=None, repr=False)
    partition_by: tuple[str, ...] = ()
    description: str = ""

    def write_part(self, batch_id: int, piece: str, data: pl.DataFrame) -> DeltaPart:
        """Write ``data`` (split by the partition columns, which Delta keeps in the log,
        not in the files) as new Parquet files named with ``piece``.

        Raises
        ------
        SinkError
            A partition column is missing, or a file cannot be written.
        """
        what = self.description or f"DeltaSink[{self.path}]"
        missing = [c for c in self.partition_by if c not in data.columns]
        if missing:
            msg = (
                f"{what}: batch {batch_id} has no partition column(s) {missing}; "
                f"its columns are {data.columns}"
            )
            raise SinkError(msg)
        try:
            data = data.cast(delta_types(data.schema))
        except Exception as exc:
            msg = f"{what}: batch {batch_id} does not fit the Delta types of its columns: {exc}"
            raise SinkError(msg) from exc
        files: list[DeltaFile] = []
        for values, rows in self._split(data):
            subdir = "".join(f"{c}={_escape(v)}/" for c, v in values.items())
            name = f"{subdir}part-{batch_id:05d}-{piece}-{uuid.uuid4().hex[:12]}.parquet"
            try:
                size = self._write(rows, name)
            except Exception as exc:
                msg = f"{what}: cannot write data file {name} of batch {batch_id}: {exc}"
                raise SinkError(msg) from exc
            nulls = {c: int(n) for c, n in zip(rows.columns, rows.null_count().row(0))}
            files.append(
                DeltaFile(
                    path=name,
                    size=size,
                    partition_values=values,
                    rows=rows.height,
                    null_counts=nulls,
                )
            )
        buffer = io.BytesIO()
        pl.DataFrame(schema=data.schema).write_ipc(buffer)
        schema_ipc = base64.b64encode(buffer.getvalue()).decode()
        return DeltaPart(
            rows=data.height,
            files=files,
            schema_ipc=schema_ipc,
            partition_by=list(self.partition_by),
        )

    def _split(self, data: pl.DataFrame) -> list[tuple[dict[str, str | None], pl.DataFrame]]:
        if data.height == 0:
            return []  # the commit alone records an empty batch's transaction
        if not self.partition_by:
            return [({}, data)]
        cols = list(self.partition_by)
        keys = data.select(pl.col(cols).cast(pl.String))
        groups = (
            data.drop(cols)
            .with_columns(keys.select(pl.all().name.prefix("__key_")))
            .partition_by([f"__key_{c}" for c in cols], as_dict=True, maintain_order=True)
        )
        return [
            (dict(zip(cols, key, strict=True)), rows.drop([f"__key_{c}" for c in cols]))
            for key, rows in groups.items()
        ]

    def _write(self, rows: pl.DataFrame, name: str) -> int:
        if "://" not in self.path or self.path.startswith("file://"):
            root = self.path.removeprefix("file://")
            target = os.path.join(root, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            rows.write_parquet(target, statistics=True)
            return os.path.getsize(target)
        from deltalake.fs import DeltaStorageHandler

        rows.write_parquet(
            f"{self.path.rstrip('/')}/{name}", storage_options=self.storage_options, statistics=True
        )
        handler = DeltaStorageHandler(self.path, self.storage_options)
        (info,) = handler.get_file_info([name])
        return int(info.size)


def delta_types(schema: pl.Schema) -> pl.Schema:
    """``schema`` as a Delta table stores it (as ``write_deltalake`` casts a batch: Delta
    has no unsigned integers, ``pl.len()``'s UInt32 is an ``integer``, Int32).

    Examples
    --------
    >>> delta_types(pl.Schema({"n": pl.UInt32, "s": pl.String}))
    Schema([('n', Int32), ('s', String)])
    """
    import pyarrow as pa
    from deltalake import Schema

    arrow = pa.schema(Schema.from_arrow(pl.DataFrame(schema=schema).to_arrow().schema).to_arrow())
    return pl.DataFrame(pa.Table.from_batches([], schema=arrow)).schema


def _escape(value: str | None) -> str:
    return "__HIVE_DEFAULT_PARTITION__" if value is None else urllib.parse.quote(value, safe="")


def commit_delta_parts(
    table: DeltaTable | None,
    parts: Sequence[SinkPart],
    *,
    path: str,
    storage_options: dict[str, str] | None,
    mode: str,
    app_id: str,
    batch_id: int,
    configuration: dict[str, str | None] | None,
    description: str,
) -> None:
    """Commit every piece's files, with transaction ``(app_id, batch_id)``, in one Delta
    commit: an append (``mode="append"``) or an overwrite of the whole table
    (``"complete"``) of ``table`` (None: there is none yet, the commit creates it,
    partitioned as the pieces are). The caller checked that the batch is not committed.

    Raises
    ------
    SinkError
        A piece is not a Delta piece, the pieces' schema differs from the table's (or its
        partition columns from ``partition_by``), or the commit fails.
    CommitFailedError
        A concurrent commit won (nothing of this one is in the table); retry.
    """
    from deltalake import CommitProperties, Schema, Transaction
    from deltalake.exceptions import CommitFailedError
    from deltalake.transaction import AddAction, create_table_with_add_actions

    pieces = [p for p in parts if isinstance(p, DeltaPart)]
    if len(pieces) != len(parts) or not pieces:
        msg = f"{description}: batch {batch_id} got pieces of another sink: {list(parts)!r}"
        raise SinkError(msg)
    schema = pieces[0].row_schema()
    arrow_schema = pl.DataFrame(schema=schema).to_arrow().schema
    now = int(time.time() * 1000)
    partitions = pieces[0].partition_by
    actions = [
        AddAction(
            path=f.path,  # (delta-rs escapes it for the log, as for its own files)
            size=f.size,
            partition_values=f.partition_values,
            modification_time=now,
            data_change=True,
            stats=json.dumps({"numRecords": f.rows, "nullCount": f.null_counts}),
        )
        for piece in pieces
        for f in piece.files
    ]
    commit = CommitProperties(app_transactions=[Transaction(app_id=app_id, version=batch_id)])
    delta_schema = Schema.from_arrow(arrow_schema)
    try:
        if table is None:
            create_table_with_add_actions(
                path,
                delta_schema,
                actions,
                mode="append",
                partition_by=partitions or None,
                configuration=configuration,
                storage_options=storage_options,
                commit_properties=commit,
            )
            return
        _check_table(table, delta_schema, partitions, description, batch_id, path)
        table.create_write_transaction(
            actions,  # type: ignore[arg-type]
            "overwrite" if mode == "complete" else "append",
            delta_schema,
            partition_by=partitions or None,
            commit_properties=commit,
        )
    except (SinkError, CommitFailedError):
        raise
    except Exception as exc:
        msg = f"{description}: cannot commit batch {batch_id} to Delta table {path}: {exc}"
        raise SinkError(msg) from exc


def _check_table(
    table: DeltaTable,
    schema: Any,
    partitions: list[str],
    description: str,
    batch_id: int,
    path: str,
) -> None:
    """Refuse what ``write_deltalake`` refuses without ``merge_schema``: other columns or
    types than the table's, other partition columns (a commit of add actions would take
    them silently)."""
    have = {f.name: f.type for f in table.schema().fields}
    got = {f.name: f.type for f in schema.fields}
    if have != got:
        differ = sorted(name for name in set(have) | set(got) if have.get(name) != got.get(name))
        msg = (
            f"{description}: cannot commit batch {batch_id} to Delta table {path}: the "
            f"batch's schema differs from the table's in column(s) {differ} (table: "
            f"{ {n: _type_name(t) for n, t in have.items() if n in differ} }; batch: "
            f"{ {n: _type_name(t) for n, t in got.items() if n in differ} }); pass merge_schema=True "
            "to let batches add columns"
        )
        raise SinkError(msg)
    table_partitions = list(table.metadata().partition_columns)
    if table_partitions != partitions:
        msg = (
            f"{description}: cannot commit batch {batch_id} to Delta table {path}: the table "
            f"is partitioned by {table_partitions}, the sink by {partitions}; give the sink "
            "the table's partition_by"
        )
        raise SinkError(msg)


def _type_name(dtype: Any) -> str:
    """A Delta type as the protocol names it (``long``), a nested one as delta-rs shows it."""
    name = getattr(dtype, "type", None)
    return name if isinstance(name, str) else str(dtype)
