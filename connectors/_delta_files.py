"""Reading the Delta source's data files, on the driver or in another process.

A version's added data file is read by :func:`read_data_file` (columns of the
table's schema, partition values as columns, with ``read_change_feed`` the change
columns of an insert). The Delta source reads its batches with it, and splits them
(``SplittableSource``): :class:`DeltaSplit` is a few of a batch's data files, read
in a Ray task with the same function, so the rows, dtypes and errors are the same.
A range with a version read through the change data feed (``read_change_feed`` and a
version that removed rows) is not split: ``load_cdf`` reads versions, not files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.exceptions import SchemaMismatchError, SourceError

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem

    from connectors.delta_source import DeltaSourceSpec

__all__ = [
    "MAX_SPLITS",
    "DataFile",
    "DeltaSplit",
    "conform_to",
    "delta_filesystem",
    "parse_partition",
    "plan_delta_splits",
    "read_data_file",
]

MAX_SPLITS = 64
"""At most this many splits per batch: files beyond are grouped, a few per split."""


@dataclass(frozen=True)
class DataFile:
    """A data file to read: its path in the table and its partition values."""

    path: str
    """Relative to the table root, URL-decoded (the log stores it URL-encoded)."""
    partition: tuple[tuple[str, Any], ...]
    typed: bool
    """Partition values are Python values (snapshot) rather than Delta's strings (commit log)."""

    @property
    def cost(self) -> int:
        return 1


def parse_partition(raw: str | None, dtype: pl.DataType) -> pl.Expr:
    """A Delta partition value (serialised as a string in the log) as a ``dtype`` literal.

    Examples
    --------
    >>> pl.select(parse_partition("2024-01-02 03:04:05.5", pl.Datetime("us", "UTC"))).item()
    datetime.datetime(2024, 1, 2, 3, 4, 5, 500000, tzinfo=zoneinfo.ZoneInfo(key='UTC'))
    >>> pl.select(parse_partition("7", pl.Int32())).item()
    7
    """
    if raw is None or (raw == "" and dtype != pl.String):
        return pl.lit(None, dtype)
    text = pl.lit(raw, pl.String)
    if dtype == pl.String:
        return text
    if dtype == pl.Boolean:
        return text.str.to_lowercase() == "true"
    if isinstance(dtype, pl.Date):
        return text.str.to_date("%Y-%m-%d")
    if isinstance(dtype, pl.Datetime):
        # Delta writes "2024-01-02 03:04:05[.ffffff]" (UTC for timestamps with a zone);
        # ISO 8601 with a trailing Z is allowed too.
        parsed = (
            text.str.replace("T", " ", literal=True)
            .str.strip_suffix("Z")
            .str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us")
        )
        if dtype.time_zone is not None:
            parsed = parsed.dt.replace_time_zone("UTC").dt.convert_time_zone(dtype.time_zone)
        return parsed.dt.cast_time_unit(dtype.time_unit or "us")
    if dtype == pl.Binary:
        return text.cast(pl.Binary)
    return text.cast(dtype)


def conform_to(frame: pl.DataFrame, schema: pl.Schema, where: str) -> pl.DataFrame:
    """``frame`` with exactly ``schema``'s columns, in order; absent columns are null."""
    columns = [
        (pl.col(name) if frame.schema[name] == dtype else pl.col(name).cast(dtype))
        if name in frame.schema
        else pl.lit(None, dtype).alias(name)
        for name, dtype in schema.items()
    ]
    try:
        return frame.select(columns)
    except pl.exceptions.PolarsError as exc:
        msg = (
            f"{where} does not fit the schema the query was planned with "
            f"({dict(schema)}); found {dict(frame.schema)}: {exc}"
        )
        raise SchemaMismatchError(msg) from exc


def read_data_file(
    fs: FileSystem,
    spec: DeltaSourceSpec,
    description: str,
    unit: DataFile,
    version: int,
    timestamp_ms: int | None,
) -> pl.DataFrame:
    """The rows of data file ``unit`` of ``version`` (committed at ``timestamp_ms``), in
    ``spec``'s schema, read through ``fs`` (delta-rs' object store over the table)."""
    import pyarrow.parquet as pq

    where = f"data file {spec.path}/{unit.path} (version {version})"
    schema = spec.data_schema
    try:
        with fs.open_input_file(unit.path) as fh:
            parquet = pq.ParquetFile(fh)
            present = set(parquet.schema_arrow.names)
            table = parquet.read(columns=[c for c in schema if c in present])
    except FileNotFoundError:
        msg = (
            f"{description}: {where} is gone, so this range cannot be replayed. "
            "VACUUM removes files once a later version no longer uses them (after OPTIMIZE "
            "or a rewrite): keep the retention longer than a stream may lag, or restart the "
            "query with a new checkpoint"
        )
        raise SourceError(msg) from None
    except Exception as exc:
        msg = f"{description}: cannot read {where}: {exc}"
        raise SourceError(msg) from exc
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    partition = [
        (pl.lit(value, schema[name]) if unit.typed else parse_partition(value, schema[name])).alias(
            name
        )
        for name, value in unit.partition
        if name in schema
    ]
    if partition:
        frame = frame.with_columns(partition)
    frame = conform_to(frame, schema, where)
    if not spec.read_change_feed:
        return frame
    # The initial snapshot, read with read_change_feed: every row is an insert.
    return frame.with_columns(
        pl.lit("insert", pl.String).alias("_change_type"),
        pl.lit(version, pl.Int64).alias("_commit_version"),
        pl.lit(None if timestamp_ms is None else timestamp_ms * 1000, pl.Int64)
        .cast(pl.Datetime("us", "UTC"))
        .alias("_commit_timestamp"),
    )


def delta_filesystem(spec: DeltaSourceSpec) -> FileSystem:
    """The table's files through delta-rs' object store (``storage_options`` as for deltalake)."""
    from deltalake.fs import DeltaStorageHandler
    from pyarrow.fs import PyFileSystem

    return PyFileSystem(DeltaStorageHandler(spec.path, options=spec.storage_options))


@dataclass(frozen=True)
class DeltaSplit:
    """Data files of one batch of a Delta source, read together by one process."""

    spec: DeltaSourceSpec
    description: str
    files: tuple[tuple[DataFile, int, int | None], ...]
    """Each file with its version and the version's commit time (ms), in log order."""

    def read(self) -> pl.DataFrame:
        """The files' rows in order, as ``DeltaSource.read`` gives them.

        Raises
        ------
        SourceError
            A data file is gone or unreadable.
        SchemaMismatchError
            A data file's column cannot be cast to the table's schema.
        """
        fs = delta_filesystem(self.spec)
        frames = [
            read_data_file(fs, self.spec, self.description, unit, version, stamp)
            for unit, version, stamp in self.files
        ]
        return pl.concat(frames, how="vertical")


def plan_delta_splits(
    spec: DeltaSourceSpec,
    description: str,
    files: list[tuple[DataFile, int, int | None]],
    *,
    max_splits: int = MAX_SPLITS,
) -> list[DeltaSplit]:
    """``files`` (in log order) in at most ``max_splits`` splits of consecutive files.

    Examples
    --------
    >>> files = [(DataFile(f"{n}.parquet", (), False), 1, None) for n in range(5)]
    >>> [len(s.files) for s in plan_delta_splits(None, "t", files, max_splits=2)]  # type: ignore[arg-type]
    [3, 2]
    """
    per_split = max(1, -(-len(files) // max_splits))
    return [
        DeltaSplit(spec, description, tuple(files[i : i + per_split]))
        for i in range(0, len(files), per_split)
    ]
