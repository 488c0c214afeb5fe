"""Small local files read from memory: one ``open`` instead of two.

A parquet or IPC file is read twice by the file source: its footer (the
columns it has, checked against the source schema) and then its data. For a
path, each read opens the file and sets up Polars' file reader, which for a
file of a few rows costs more than the data itself (on a 2-core machine: ~0.47
ms for ``read_parquet`` of a one-row file by path, ~0.24 ms from its bytes).
A file below :data:`SMALL_FILE_BYTES` is therefore read once into memory and
both reads parse those bytes; the same Polars readers run on the same bytes, so
the frame is the same.

The data of a parquet file of up to :data:`ARROW_READ_BYTES` is decoded by
pyarrow's reader on the calling thread (:func:`read_small_parquet`): Polars'
reader hands even a one-row file to its thread pool, whose wake-up costs more
than the decoding (~0.55 against ~0.35 ms a one-row file, footer included, on a
2-core machine). The frame is kept only when its dtypes are the ones Polars
names for the file's columns; otherwise Polars reads it as before.
"""

from __future__ import annotations

import io

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["ARROW_READ_BYTES", "SMALL_FILE_BYTES", "local_source", "read_small_parquet"]

SMALL_FILE_BYTES = 1 << 20
"""Files up to this size (as the source's log recorded it) are read into memory first."""

ARROW_READ_BYTES = 64 << 10
"""Parquet files read from memory up to this size are decoded by pyarrow on the calling
thread (:func:`read_small_parquet`)."""


def local_source(path: str, size: int, fmt: str) -> str | io.BytesIO:
    """What the file source hands the reader for the local file ``path`` of ``size`` bytes.

    Examples
    --------
    >>> import tempfile, polars as pl
    >>> path = tempfile.mktemp(suffix=".parquet")
    >>> pl.DataFrame({"x": [1]}).write_parquet(path)
    >>> pl.read_parquet(local_source(path, 1, "parquet"))["x"].to_list()
    [1]
    >>> local_source(path, 10 << 20, "parquet") == path  # large: read by path
    True
    """
    if fmt not in ("parquet", "ipc") or size > SMALL_FILE_BYTES:
        return path
    with open(path, "rb") as fh:
        return io.BytesIO(fh.read())


def read_small_parquet(
    source: io.BytesIO, columns: list[str], expected: pl.Schema
) -> pl.DataFrame | None:
    """The ``columns`` of the parquet file in ``source``, decoded by pyarrow on this thread;
    ``None`` (nothing read) when the file is over :data:`ARROW_READ_BYTES` or the frame's
    dtypes are not ``expected``, the dtypes Polars' reader gives those columns
    (``pl.read_parquet_schema``): a categorical, say, that pyarrow reads as strings.

    Examples
    --------
    >>> import io, polars as pl
    >>> buf = io.BytesIO()
    >>> pl.DataFrame({"x": [1, None], "s": ["a", "b"]}).write_parquet(buf)
    >>> _ = buf.seek(0)
    >>> read_small_parquet(buf, ["x"], pl.Schema({"x": pl.Int64})).to_dict(as_series=False)
    {'x': [1, None]}
    >>> read_small_parquet(buf, ["s"], pl.Schema({"s": pl.Categorical()})) is None
    True
    """
    data = source.getbuffer()
    if data.nbytes > ARROW_READ_BYTES:
        return None
    table = pq.ParquetFile(pa.py_buffer(data)).read(columns=columns, use_threads=False)
    frame = pl.from_arrow(table)
    if not isinstance(frame, pl.DataFrame) or frame.schema != expected:
        return None
    return frame
