"""The ``scan_*`` sources, the readers of sink outputs, and Delta table maintenance.

Every function here stands for a connector object found through the registry (a
source spec, a function): its options, their types, defaults and documentation are
declared once, by the connector, and shown as the function's own
(:mod:`microstream.api.facade`).
"""

from __future__ import annotations

from microstream.api.facade import function_facade, source_facade
from microstream.registry import (
    DELTA_SOURCE,
    FILES,
    KAFKA,
    KINESIS,
    OPTIMIZE_DELTA,
    POSTGRES_CDC,
    PUBSUB,
    RABBITMQ_STREAM,
    RATE,
    READ_FILE_SINK,
    SOCKET,
    VACUUM_DELTA,
)

__all__ = [
    "optimize_delta",
    "read_file_sink",
    "scan_delta",
    "scan_files",
    "scan_kafka",
    "scan_kinesis",
    "scan_postgres_cdc",
    "scan_pubsub",
    "scan_rabbitmq_stream",
    "scan_rate",
    "scan_socket",
    "vacuum_delta",
]


scan_files = source_facade(
    FILES,
    name="scan_files",
    module=__name__,
    doc="""Stream the files that arrive in a directory (any fsspec URL).

    Every file is read once: the source logs which files went into which
    batch, so a batch re-run after a crash reads exactly the same files even if
    more arrived meanwhile. Files whose name starts with ``.`` or ``_`` are
    ignored, so producers should write to such a name and rename when done.

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
    """,
)

scan_delta = source_facade(
    DELTA_SOURCE,
    name="scan_delta",
    module=__name__,
    doc="""Stream a Delta table: the rows each new version appends, or all its changes.

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
    """,
)

scan_kafka = source_facade(
    KAFKA,
    name="scan_kafka",
    module=__name__,
    doc="""Stream the records of Kafka topics, decoded into columns.

    Each batch reads exactly the offsets logged for it in the checkpoint
    (partitions are assigned and sought, no consumer-group rebalancing), so
    a batch re-run after a crash reads the same records. Payloads are decoded
    in bulk by Polars' readers. After each batch the positions are committed
    as the offsets of group ``microstream-<query id>`` (or ``options``'
    ``group.id``) for lag monitoring. See ``connectors/README.md`` for
    offsets and guarantees.

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
    """,
)

scan_rate = source_facade(
    RATE,
    name="scan_rate",
    module=__name__,
    doc="""A synthetic stream of ``(timestamp, value)`` rows at a fixed rate.

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
    """,
)

read_file_sink = function_facade(
    READ_FILE_SINK,
    name="read_file_sink",
    module=__name__,
    doc="""Read the committed output of a file sink (only files in its manifest).

    Examples
    --------
    >>> import microstream as ms
    >>> ms.read_file_sink("memory://no-such-sink")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    microstream.exceptions.SinkError: ...
    """,
)

optimize_delta = function_facade(
    OPTIMIZE_DELTA,
    name="optimize_delta",
    module=__name__,
    doc="""Compact a Delta table's small files (OPTIMIZE); returns delta-rs' metrics.

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
    """,
)

vacuum_delta = function_facade(
    VACUUM_DELTA,
    name="vacuum_delta",
    module=__name__,
    doc="""Delete (``dry_run=False``) or list the files no recent version of a Delta table uses.

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
    """,
)

scan_postgres_cdc = source_facade(
    POSTGRES_CDC,
    name="scan_postgres_cdc",
    module=__name__,
    doc="""Stream the changes (inserts, updates, deletes) of PostgreSQL tables.

    Change data capture through a logical replication slot, decoded by the
    server's ``wal2json`` plugin. Offsets are LSNs: each batch reads exactly
    the transactions whose commit lies in the range logged for it, so a batch
    re-run after a crash reads the same changes, and the slot is advanced
    only once the batch is committed. Each row is a table's row (typed from
    the catalog) with ``_table``, ``_op``, ``_commit_lsn`` and
    ``_commit_time``. A dropped or invalidated slot is a ``DataLossError``.
    See ``connectors/README.md`` for offsets and guarantees.

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.testing.postgres import PostgresServer
    >>> with PostgresServer() as server:  # doctest: +SKIP
    ...     with server.connect() as conn:
    ...         conn.execute("CREATE TABLE orders (id int PRIMARY KEY, amount float8)")
    ...         changes = ms.scan_postgres_cdc(server.dsn, tables=["orders"], slot="doc")
    ...         query = changes.sink_memory("doc_cdc")  # creates the slot
    ...         conn.execute("INSERT INTO orders VALUES (1, 2.5)")
    ...         conn.execute("UPDATE orders SET amount = 3 WHERE id = 1")
    ...         query.process_all_available()
    ...         query.stop()
    >>> ms.table("doc_cdc").select("id", "amount", "_op").rows()  # doctest: +SKIP
    [(1, 2.5, 'insert'), (1, 3.0, 'update')]
    """,
)

scan_socket = source_facade(
    SOCKET,
    name="scan_socket",
    module=__name__,
    doc="""Stream the text lines a TCP server sends, one row per line (for demos).

    The source connects when the query starts and keeps the lines it receives
    in memory until their batch is committed. It cannot replay: lines in
    flight at a crash or a stop are lost. A query writing it to a durable
    sink (files, Delta, Kafka, PostgreSQL, HTTP, ``foreach_batch``) is refused
    unless ``acknowledge_not_replayable=True``; ``sink_memory`` and
    ``sink_console`` take it as it is. (Spark's socket source, with the
    warning of its documentation turned into a check.)

    Examples
    --------
    >>> import microstream as ms
    >>> from microstream.testing.line_server import LineServer
    >>> import time
    >>> with LineServer() as server:
    ...     query = ms.scan_socket("127.0.0.1", server.port).sink_memory("doc_socket")
    ...     server.wait_for_clients(1)
    ...     server.send("to be", "or not to be")
    ...     deadline = time.monotonic() + 10  # the lines travel through a socket
    ...     while ms.table("doc_socket").height < 2 and time.monotonic() < deadline:
    ...         query.process_all_available()
    ...     query.stop()
    >>> ms.table("doc_socket")["value"].to_list()
    ['to be', 'or not to be']
    """,
)

scan_kinesis = source_facade(
    KINESIS,
    name="scan_kinesis",
    module=__name__,
    doc="""Stream the records of an Amazon Kinesis data stream, decoded into columns.

    Offsets are, per shard, the sequence number of the last record read and the
    number of records read, logged in the write-ahead log: a batch re-run after
    a crash reads exactly the same records, or fails with a ``DataLossError``
    when the stream no longer holds them (retention, a re-created stream).
    Shards created by a split or a merge are read after their parents are
    read to their end, so the records of a partition key stay in order. See
    ``connectors/README.md`` for offsets and guarantees.

    Examples
    --------
    >>> import boto3
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.testing.moto_s3 import MotoS3Server
    >>> with MotoS3Server() as server:
    ...     kinesis = boto3.client("kinesis", **server.aws_options())
    ...     _ = kinesis.create_stream(StreamName="doc-clicks", ShardCount=1)
    ...     for user in (1, 2):
    ...         _ = kinesis.put_record(
    ...             StreamName="doc-clicks", Data=f'{{"user": {user}}}', PartitionKey="k"
    ...         )
    ...     clicks = ms.scan_kinesis(
    ...         "doc-clicks", schema={"user": pl.Int64}, options=server.aws_options()
    ...     )
    ...     query = clicks.sink_memory("doc_kinesis")
    ...     query.process_all_available()
    ...     query.stop()
    >>> ms.table("doc_kinesis")["user"].to_list()
    [1, 2]
    """,
)

scan_rabbitmq_stream = source_facade(
    RABBITMQ_STREAM,
    name="scan_rabbitmq_stream",
    module=__name__,
    doc="""Stream the messages of a RabbitMQ stream, replayable by offset.

    Offsets are the stream's message offsets, logged in the write-ahead log:
    each batch reads exactly the messages of the offset range logged for it,
    so a batch re-run after a crash reads the same messages. Bodies are
    decoded in bulk (``format=``). Messages that the stream's retention
    deleted before the query read them are a ``DataLossError``. See
    ``connectors/README.md`` for offsets and guarantees.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.testing.rabbitmq import RabbitMQServer
    >>> with RabbitMQServer() as broker:  # doctest: +SKIP
    ...     stream = ms.MemoryStream({"id": pl.Int64})
    ...     out = stream.lazy().sink_rabbitmq_stream(broker.url, "events")
    ...     _ = stream.add_data({"id": [1, 2]})
    ...     out.process_all_available()
    ...     out.stop()
    ...     events = ms.scan_rabbitmq_stream(broker.url, "events", schema={"id": pl.Int64})
    ...     query = events.sink_memory("doc_rabbitmq")
    ...     query.process_all_available()
    ...     query.stop()
    >>> ms.table("doc_rabbitmq")["id"].to_list()  # doctest: +SKIP
    [1, 2]
    """,
)

scan_pubsub = source_facade(
    PUBSUB,
    name="scan_pubsub",
    module=__name__,
    doc="""Stream the messages of a Google Cloud Pub/Sub subscription.

    Each batch's pulled messages are logged in the checkpoint before the batch
    runs and read from there, so a batch re-run after a crash reads the same
    messages; they are acknowledged only after the batch commits, and
    redeliveries of logged messages are dropped by message id. Into an
    exactly-once sink every message reaches the output once (within
    ``dedup_retention``). See ``connectors/README.md``.

    Examples
    --------
    >>> import polars as pl
    >>> import microstream as ms
    >>> ms.scan_pubsub("my-subscription", schema={"id": pl.Int64})
    Traceback (most recent call last):
    ...
    ValueError: subscription must be 'projects/<project>/subscriptions/<name>'; got 'my-subscription'
    """,
)
