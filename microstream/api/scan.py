"""The ``scan_*`` sources, the readers of sink outputs, and Delta table maintenance."""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from microstream.api.frame import StreamFrame
from microstream.registry import load_connector

if TYPE_CHECKING:
    from datetime import timedelta

    import polars as pl

    from microstream._typing import (
        BadFilePolicy,
        BadRecordPolicy,
        CleanSource,
        ExtraColumnsPolicy,
        FileFormat,
        KafkaFormat,
        KafkaStartingOffsets,
        MissingColumnsPolicy,
        MissingFilePolicy,
    )
    from microstream.protocols import SideOutputTarget

__all__ = [
    "optimize_delta",
    "read_file_sink",
    "scan_delta",
    "scan_files",
    "scan_kafka",
    "scan_rate",
    "vacuum_delta",
]


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
    on_bad_file: BadFilePolicy = "fail",
    on_missing_file: MissingFilePolicy = "fail",
    on_bad_record: BadRecordPolicy = "fail",
    dead_letter: SideOutputTarget | None = None,
    extra_columns: ExtraColumnsPolicy = "ignore",
    missing_columns: MissingColumnsPolicy = "raise",
    wait_for_path: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> StreamFrame:
    """Stream the files that arrive in a directory (any fsspec URL).

    Every file is read once: the source logs which files went into which
    batch, so a batch re-run after a crash reads exactly the same files even if
    more arrived meanwhile. Files whose name starts with ``.`` or ``_`` are
    ignored, so producers should write to such a name and rename when done.
    See :class:`connectors.files.FileSourceSpec` for every option.

    Parameters
    ----------
    path
        The directory to watch: a local path, ``memory://...``, ``s3://...``,
        optionally with a glob as in ``pl.scan_parquet`` (``"in/*.parquet"``,
        ``"in/**/*.csv"``). It must exist when the query starts, unless
        ``wait_for_path``.
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
        Without it, only names with the format's extension (``*.parquet``,
        ``*.csv``, ``*.ndjson``/``*.jsonl``/``*.json``,
        ``*.arrow``/``*.ipc``/``*.feather``); other files are reported once.
    recursive
        Also watch subdirectories.
    on_bad_file
        A file that cannot be read or does not fit the schema: ``"fail"``
        (default), ``"skip"`` or ``"dead_letter"``; a file left out is
        recorded in the checkpoint and named in progress (``skipped_files``).
    on_missing_file
        A logged file deleted before its batch committed: ``"fail"`` or ``"skip"``.
    on_bad_record
        csv and ndjson: a record that does not parse, or a csv row with too
        many or too few fields: ``"fail"``, ``"skip"`` or ``"dead_letter"``.
    dead_letter
        For the ``"dead_letter"`` policies: a memory table name or a function
        ``(df, batch_id)``; rows ``path, size, line, value, reason, batch_id``.
    extra_columns
        Columns a file has beyond the schema: ``"ignore"`` (each reported
        once) or ``"raise"`` (a bad file).
    missing_columns
        Schema columns a parquet, ipc or csv file lacks: ``"raise"`` (a bad
        file) or ``"insert"`` (nulls).
    wait_for_path
        Start even if the directory does not exist yet, and wait for it.
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
        on_bad_file=on_bad_file,
        on_missing_file=on_missing_file,
        on_bad_record=on_bad_record,
        dead_letter=dead_letter,
        extra_columns=extra_columns,
        missing_columns=missing_columns,
        wait_for_path=wait_for_path,
        storage_options=storage_options,
    )
    return StreamFrame.from_source(spec)


def scan_delta(
    path: str | os.PathLike[str],
    *,
    starting_version: int | Literal["latest"] | None = None,
    starting_timestamp: datetime | str | None = None,
    max_files_per_trigger: int | None = None,
    read_change_feed: bool = False,
    storage_options: dict[str, str] | None = None,
) -> StreamFrame:
    """Stream a Delta table: the rows each new version appends, or all its changes.

    Offsets are positions ``(table version, file index)`` in the table's own
    log, so a batch re-run after a crash reads exactly the same files. By
    default the query first reads the table as it is when the query first
    starts, then every later version (as Spark does); ``starting_version`` or
    ``starting_timestamp`` start from a version's changes instead. The start
    is kept in the checkpoint: a restart continues where the query stopped.

    A version that deleted, updated or overwrote rows stops the stream with a
    ``SourceError`` naming it, unless ``read_change_feed=True`` (the table
    needs ``delta.enableChangeDataFeed=true``), which streams every change
    with ``_change_type``, ``_commit_version`` and ``_commit_timestamp``.
    Compactions (OPTIMIZE: ``dataChange=false``) are skipped.

    Parameters
    ----------
    path
        Table location (local path, ``s3://...``); the table must exist.
    starting_version
        Start with the changes of this version, without the earlier content;
        ``"latest"``: only versions committed after the query first starts.
    starting_timestamp
        Start with the first version committed at or after this time
        (``datetime``, naive = UTC, or ISO 8601 string).
    max_files_per_trigger
        At most this many data files per batch (with ``read_change_feed``,
        whole versions, at least one); not for ``Trigger.once()``.
    read_change_feed
        Stream the change data feed instead of appended rows.
    storage_options
        Passed to ``deltalake``.

    Examples
    --------
    >>> import tempfile
    >>> import polars as pl
    >>> from deltalake import write_deltalake
    >>> import microstream as ms
    >>> root = tempfile.mkdtemp()
    >>> write_deltalake(f"{root}/t", pl.DataFrame({"x": [1, 2]}).to_arrow())
    >>> query = ms.scan_delta(f"{root}/t").sink_memory("doc_delta", checkpoint=f"{root}/cp")
    >>> query.process_all_available()
    >>> write_deltalake(f"{root}/t", pl.DataFrame({"x": [3]}).to_arrow(), mode="append")
    >>> query.process_all_available()
    >>> query.stop()
    >>> ms.table("doc_delta")["x"].to_list()
    [1, 2, 3]
    """
    spec = load_connector("delta_source")(
        os.fspath(path),
        starting_version=starting_version,
        starting_timestamp=starting_timestamp,
        max_files_per_trigger=max_files_per_trigger,
        read_change_feed=read_change_feed,
        storage_options=storage_options,
    )
    return StreamFrame.from_source(spec)


def scan_kafka(
    bootstrap_servers: str,
    *,
    topic: str | None = None,
    topics: list[str] | None = None,
    pattern: str | None = None,
    format: KafkaFormat = "json",
    schema: Mapping[str, Any] | pl.Schema | str | None = None,
    starting_offsets: KafkaStartingOffsets = "earliest",
    max_offsets_per_trigger: int | None = None,
    include_metadata: bool = False,
    include_headers: bool = False,
    on_bad_record: BadRecordPolicy = "fail",
    dead_letter: SideOutputTarget | None = None,
    extra_columns: ExtraColumnsPolicy = "ignore",
    missing_columns: MissingColumnsPolicy = "insert",
    fail_on_data_loss: bool = True,
    retry_timeout: str | timedelta | float = "30s",
    options: Mapping[str, Any] | None = None,
) -> StreamFrame:
    """Stream the records of Kafka topics, decoded into columns.

    Each batch reads exactly the offsets logged for it in the checkpoint
    (partitions are assigned and sought, no consumer-group rebalancing), so
    a batch re-run after a crash reads the same records. Payloads are decoded
    in bulk by Polars' readers. After each batch the positions are committed
    as the offsets of group ``microstream-<query id>`` (or ``options``'
    ``group.id``) for lag monitoring. See
    :class:`connectors.kafka.KafkaSourceSpec` for every option, and
    ``connectors/README.md`` for offsets and guarantees.

    Parameters
    ----------
    bootstrap_servers
        ``"host:port[,host:port...]"``.
    topic, topics, pattern
        Exactly one: a topic, a list of topics, or a regular expression
        matching topic names in full (new matching topics are picked up).
    format
        ``"json"``, ``"csv"``, ``"avro"`` (schemaless Avro of the record
        schema given as ``schema``) or ``"raw"`` (a Binary ``value`` column).
    schema
        The value's columns (name to polars dtype), or the Avro schema.
    starting_offsets
        ``"earliest"`` (default), ``"latest"``, a timestamp (ms or datetime),
        ``{partition: offset}`` or ``{topic: {partition: offset}}``; used
        only when the checkpoint is new.
    max_offsets_per_trigger
        At most this many offsets per batch (split across partitions).
    include_metadata
        Add ``key``, ``topic``, ``partition``, ``offset``, ``timestamp``.
    include_headers
        Add ``headers`` (list of ``{key, value}``).
    on_bad_record
        ``"fail"`` (default), ``"skip"`` (counted in progress) or
        ``"dead_letter"`` (rows with the raw bytes and the reason go to
        ``dead_letter``).
    dead_letter
        A memory table name or a function ``(df, batch_id)``.
    extra_columns
        A column the schema lacks (JSON key with a value, CSV field past the
        last column): ``"ignore"`` (default; logged once per run with the
        record's topic, partition and offset, counted as
        ``new_columns_ignored`` in progress) or ``"raise"``
        (``SchemaMismatchError``).
    missing_columns
        A schema column a record lacks (JSON key absent, short CSV line):
        ``"insert"`` (default; null) or ``"raise"`` (``SchemaMismatchError``).
    fail_on_data_loss
        Offsets that vanished from the broker are a ``DataLossError``
        (default); False continues from the earliest available offsets and
        counts ``offsets_lost`` in progress.
    retry_timeout
        How long a broker that is down is retried before the query fails.
    options
        librdkafka settings for every client (``security.protocol``,
        ``sasl.mechanism``, ``sasl.username``, ``ssl.ca.location``, ...).

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.testing.tansu import TansuBroker
    >>> with TansuBroker() as broker:
    ...     broker.create_topic("doc-scan")
    ...     _ = broker.produce("doc-scan", [{"user": 1, "amount": 2.5}, {"user": 2, "amount": -1.0}])
    ...     events = ms.scan_kafka(
    ...         broker.bootstrap_servers,
    ...         topic="doc-scan",
    ...         schema={"user": pl.Int64, "amount": pl.Float64},
    ...     )
    ...     query = events.filter(pl.col("amount") > 0).sink_memory("doc_kafka")
    ...     query.process_all_available()
    ...     query.stop()
    >>> ms.table("doc_kafka").to_dicts()
    [{'user': 1, 'amount': 2.5}]
    """
    spec = load_connector("kafka")(
        bootstrap_servers,
        topic=topic,
        topics=topics,
        pattern=pattern,
        format=format,
        schema=schema,
        starting_offsets=starting_offsets,
        max_offsets_per_trigger=max_offsets_per_trigger,
        include_metadata=include_metadata,
        include_headers=include_headers,
        on_bad_record=on_bad_record,
        dead_letter=dead_letter,
        extra_columns=extra_columns,
        missing_columns=missing_columns,
        fail_on_data_loss=fail_on_data_loss,
        retry_timeout=retry_timeout,
        options=options,
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


def optimize_delta(
    path: str | os.PathLike[str],
    *,
    target_size: int | None = None,
    z_order: list[str] | None = None,
    partition_filters: list[tuple[str, str, Any]] | None = None,
    storage_options: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Compact a Delta table's small files (OPTIMIZE); returns delta-rs' metrics.

    Streaming writes at least one file per batch; this rewrites them into
    files of about ``target_size`` bytes (default: ``delta.targetFileSize``,
    else 100 MB), optionally Z-ordered by ``z_order``. The commit has
    ``dataChange=false``, so ``scan_delta`` streams of the table skip it.
    See :func:`connectors.delta.optimize_delta`.

    Examples
    --------
    >>> import microstream as ms
    >>> ms.optimize_delta("/no/such/table")
    Traceback (most recent call last):
    ...
    microstream.exceptions.SinkError: there is no Delta table at /no/such/table to optimize
    """
    function = load_connector("optimize_delta")
    result: dict[str, Any] = function(
        path,
        target_size=target_size,
        z_order=z_order,
        partition_filters=partition_filters,
        storage_options=storage_options,
    )
    return result


def vacuum_delta(
    path: str | os.PathLike[str],
    *,
    retention_hours: int | None = None,
    dry_run: bool = True,
    enforce_retention_duration: bool = True,
    storage_options: dict[str, str] | None = None,
) -> list[str]:
    """Delete (``dry_run=False``) or list the files no recent version of a Delta table uses.

    Files removed from the table (by :func:`optimize_delta` or a rewrite) more
    than ``retention_hours`` ago (default: the table's
    ``delta.deletedFileRetentionDuration``, else a week) are deleted. Keep the
    retention longer than any ``scan_delta`` stream of the table may lag.
    See :func:`connectors.delta.vacuum_delta`.

    Examples
    --------
    >>> import microstream as ms
    >>> ms.vacuum_delta("/no/such/table")
    Traceback (most recent call last):
    ...
    microstream.exceptions.SinkError: there is no Delta table at /no/such/table to vacuum
    """
    function = load_connector("vacuum_delta")
    result: list[str] = function(
        path,
        retention_hours=retention_hours,
        dry_run=dry_run,
        enforce_retention_duration=enforce_retention_duration,
        storage_options=storage_options,
    )
    return result
