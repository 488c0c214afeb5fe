"""A file source's batch as one lazy parquet scan, for the engine to run with the stage after it.

The file source reads a batch's files into a frame (in read-ahead threads), and
the engine then runs the stage reading the source over that frame. For a row-wise
stage over large files Polars does better when the scan feeds the stage in the
same streaming plan: it decodes the files in morsels on every core and runs the
steps on each morsel while it is in cache (one 92k-row Nexmark bid file, q22's
``str.split_exact``: 7.9 ms for the scan and the steps, against 13-21 ms for the
steps alone over the decoded frame).

The scan must give exactly the rows of the eager read. :func:`scan_parquet_files`
hands one only when every file's footer names the schema's columns with exactly
the declared dtypes and no column beyond the source schema: then the eager read
takes no widening cast, inserts no null column and reports no extra column, and
the scan of the files in log order is its rows in its order. Anything else (a
file gone, a footer that does not parse, a missing, extra or differently typed
column) gives None and the source reads the batch as before, with its checks,
policies and messages. A file whose data pages are bad passes the footer check:
the engine then runs the stage over the source's eager read, which reports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import pyarrow.parquet as pq

__all__ = ["FUSED_SCAN_MIN_BYTES", "scan_parquet_files"]

FUSED_SCAN_MIN_BYTES = 1 << 20
"""A batch's files must hold at least this many bytes (as logged) to be scanned lazily:
a small batch is read eagerly, where the in-memory engine's lower fixed cost per query
matters more than the streaming engine's parallel decoding (and a file of up to
:data:`~connectors._small_files.SMALL_FILE_BYTES` takes the small-file path)."""


def scan_parquet_files(
    paths: Sequence[str], declared: pl.Schema, columns: pl.Schema
) -> tuple[pl.LazyFrame, int] | None:
    """The lazy scan of ``columns`` of the local parquet files ``paths`` (in order) and its
    row count, or None: the files are to be read eagerly (module docstring).

    ``declared``: the source's whole schema (a file column beyond it would be reported
    or refused by the eager read); ``columns``: the columns read, with their dtypes.

    Examples
    --------
    >>> import tempfile, os, polars as pl
    >>> root = tempfile.mkdtemp()
    >>> a, b = os.path.join(root, "a.parquet"), os.path.join(root, "b.parquet")
    >>> pl.DataFrame({"x": [1, 2], "y": ["p", "q"]}).write_parquet(a)
    >>> pl.DataFrame({"x": [3], "y": ["r"]}).write_parquet(b)
    >>> schema = pl.Schema({"x": pl.Int64, "y": pl.String})
    >>> frame, rows = scan_parquet_files([a, b], schema, pl.Schema({"x": pl.Int64}))
    >>> rows, frame.collect()["x"].to_list()
    (3, [1, 2, 3])
    >>> scan_parquet_files([a], schema, pl.Schema({"x": pl.Int32})) is None  # a widening cast
    True
    """
    if not paths or not columns:
        return None
    rows = 0
    for path in paths:
        try:
            found = pl.read_parquet_schema(path)
            rows += pq.read_metadata(path).num_rows
        except Exception:
            return None  # gone or unreadable: the eager read reports it under its policy
        if any(name not in declared for name in found):
            return None
        if any(found.get(name) != dtype for name, dtype in columns.items()):
            return None
    frame = pl.scan_parquet(
        list(paths), glob=False, hive_partitioning=False, missing_columns="raise"
    ).select(list(columns))
    return frame, rows
