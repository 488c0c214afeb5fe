"""The ``scan_*`` sources and the readers of sink outputs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from microstream.frame import StreamFrame
from microstream.registry import load_connector

if TYPE_CHECKING:
    import polars as pl

    from microstream._typing import CleanSource, FileFormat

__all__ = ["read_file_sink", "scan_files", "scan_rate"]


def scan_files(
    path: str | os.PathLike[str],
    *,
    format: FileFormat = "parquet",
    schema: Mapping[str, Any] | pl.Schema | None = None,
    max_files_per_trigger: int | None = None,
    latest_first: bool = False,
    clean_source: CleanSource = "off",
    source_archive_dir: str | None = None,
    glob: str | None = None,
    recursive: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> StreamFrame:
    """Stream the files that arrive in a directory (any fsspec URL).

    Every file is read once: the source logs which files went into which
    batch, so a batch re-run after a crash reads exactly the same files even if
    more arrived meanwhile. Files whose name starts with ``.`` or ``_`` are
    ignored, so producers should write to such a name and rename when done.

    Parameters
    ----------
    path
        The directory to watch: a local path, ``memory://...``, ``s3://...``.
    format
        ``"parquet"``, ``"csv"``, ``"ndjson"`` or ``"ipc"``.
    schema
        The rows' schema. Without it, the schema of the oldest file present now.
        A later file that does not fit is an error naming the file and column.
    max_files_per_trigger
        At most this many files per batch (not for ``Trigger.once()``).
    latest_first
        Take the newest files first (when catching up matters more than order).
    clean_source
        After a batch commits: ``"off"``, ``"delete"`` its files, or
        ``"archive"`` them to ``source_archive_dir``.
    source_archive_dir
        Where ``clean_source="archive"`` moves files.
    glob
        Only files whose name matches this pattern (e.g. ``"*.parquet"``).
    recursive
        Also watch subdirectories.
    storage_options
        Passed to fsspec.

    Examples
    --------
    >>> import fsspec
    >>> import polars as pl
    >>> import microstream as ms
    >>> with fsspec.open("memory://doc-in/a.parquet", "wb") as f:
    ...     pl.DataFrame({"x": [1, 2]}).write_parquet(f)
    >>> frame = ms.scan_files("memory://doc-in", format="parquet")
    >>> query = frame.sink_memory("doc_files")
    >>> query.process_all_available()
    >>> ms.table("doc_files")["x"].to_list()
    [1, 2]
    >>> query.stop()
    """
    spec = load_connector("files")(
        path=os.fspath(path),
        format=format,
        schema=None if schema is None else dict(schema),
        max_files_per_trigger=max_files_per_trigger,
        latest_first=latest_first,
        clean_source=clean_source,
        source_archive_dir=source_archive_dir,
        glob=glob,
        recursive=recursive,
        storage_options=storage_options,
    )
    return StreamFrame.from_source(spec)


def scan_rate(
    rows_per_second: int,
    *,
    num_partitions: int = 1,
    start_timestamp: datetime | None = None,
    max_rows_per_trigger: int | None = None,
) -> StreamFrame:
    """A synthetic stream of ``(timestamp, value)`` rows at a fixed rate.

    Row ``i`` has ``value = i`` and ``timestamp = start + i / rows_per_second``
    seconds; the start time is kept in the checkpoint, so replays are exact.
    Value ``v`` belongs to partition ``v % num_partitions``; a batch lists
    partition 0's rows, then partition 1's, each in ascending value.
    ``max_rows_per_trigger`` bounds a batch (not for ``Trigger.once()``).

    Examples
    --------
    >>> import microstream as ms
    >>> ms.scan_rate(100).columns
    ['timestamp', 'value']
    """
    spec = load_connector("rate")(
        rows_per_second=rows_per_second,
        num_partitions=num_partitions,
        start_timestamp=start_timestamp,
        max_rows_per_trigger=max_rows_per_trigger,
    )
    return StreamFrame.from_source(spec)


def read_file_sink(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> pl.DataFrame:
    """Read the committed output of a file sink (only files in its manifest).

    Examples
    --------
    >>> import microstream as ms
    >>> ms.read_file_sink("memory://no-such-sink")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    microstream.exceptions.SinkError: ...
    """
    reader = load_connector("read_file_sink")
    result: pl.DataFrame = reader(os.fspath(path), storage_options=storage_options)
    return result
