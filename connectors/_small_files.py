"""Small local files read from memory: one ``open`` instead of two, one footer instead of two.

A parquet or IPC file is read twice by the file source: its footer (the
columns it has, checked against the source schema) and then its data. For a
path, each read opens the file and sets up Polars' file reader, which for a
file of a few rows costs more than the data itself (on a 2-core machine: ~0.47
ms for ``read_parquet`` of a one-row file by path, ~0.24 ms from its bytes).
A file below :data:`SMALL_FILE_BYTES` is therefore read once into memory and
both reads parse those bytes.

A parquet file of up to :data:`ARROW_READ_BYTES` in memory is opened by
pyarrow (:func:`open_small_parquet`): its footer is parsed once, names the
file's columns, and decodes the data on the calling thread. Polars' reader
parses the footer a second time and hands even a one-row file to its thread
pool, whose wake-up costs more than the decoding (one-row file, footer
included: ~0.21-0.27 ms through Polars, ~0.13 ms through pyarrow, in-process).
Only files whose every column has an Arrow type that pyarrow and Polars' reader
turn into the same Polars dtype and values take this path (flat numbers,
booleans, strings, binaries, int64-stored timestamps with or without a
zone); any other file, or one pyarrow cannot open, is read by Polars as before,
so its frame and its errors are Polars'.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ARROW_READ_BYTES",
    "SMALL_FILE_BYTES",
    "SmallParquet",
    "local_source",
    "open_small_parquet",
]

SMALL_FILE_BYTES = 1 << 20
"""Files up to this size (as the source's log recorded it) are read into memory first."""

ARROW_READ_BYTES = 64 << 10
"""Parquet files read from memory up to this size are opened by pyarrow
(:func:`open_small_parquet`)."""


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


@dataclass(frozen=True)
class SmallParquet:
    """A small parquet file whose footer pyarrow parsed, and whose columns it can decode."""

    file: pq.ParquetFile
    names: list[str]
    """The file's columns, in the file's order."""

    def read(self, columns: list[str]) -> pl.DataFrame:
        """The ``columns`` of the file, decoded on the calling thread."""
        frame = pl.from_arrow(self.file.read(columns=columns, use_threads=False))
        assert isinstance(frame, pl.DataFrame)  # a Table converts to a DataFrame
        return frame


def _same_in_polars(field: pa.Field, physical: str) -> bool:
    """Whether Polars' parquet reader and ``pl.from_arrow`` of pyarrow's read agree on ``field``.

    A dictionary (Polars' categoricals and enums), a nested, decimal, date (a
    date64 the Arrow schema stores reads as date32 in pyarrow, as a Datetime in Polars),
    float16, view or int96-stored type is left to Polars' reader.
    """
    kind = field.type
    if pa.types.is_timestamp(kind):
        return physical == "INT64"
    return bool(
        pa.types.is_integer(kind)
        or kind in (pa.float32(), pa.float64(), pa.bool_())
        or kind in (pa.string(), pa.large_string(), pa.binary(), pa.large_binary())
    )


def open_small_parquet(source: io.BytesIO) -> SmallParquet | None:
    """``source``'s parquet file opened by pyarrow, or ``None`` to read it with Polars.

    ``None`` when the file is over :data:`ARROW_READ_BYTES`, pyarrow cannot
    parse its footer, its column names repeat, or a column's type is one whose
    Polars dtype could differ between the two readers.

    Examples
    --------
    >>> import io, polars as pl
    >>> buf = io.BytesIO()
    >>> pl.DataFrame({"x": [1, None], "s": ["a", "b"]}).write_parquet(buf)
    >>> small = open_small_parquet(buf)
    >>> small.names
    ['x', 's']
    >>> small.read(["x"]).to_dict(as_series=False)
    {'x': [1, None]}
    >>> buf = io.BytesIO()
    >>> pl.DataFrame({"c": ["a"]}, schema={"c": pl.Categorical()}).write_parquet(buf)
    >>> open_small_parquet(buf) is None  # a categorical: Polars' reader
    True
    """
    data = source.getbuffer()
    if data.nbytes > ARROW_READ_BYTES:
        return None
    try:
        file = pq.ParquetFile(pa.py_buffer(data))
        arrow = file.schema_arrow
        physical = [file.schema.column(i).physical_type for i in range(len(file.schema))]
    except Exception:
        return None  # Polars' reader reads it, or fails with its own message as before
    names = arrow.names
    if len(set(names)) != len(names) or len(physical) != len(names):
        return None  # nested columns have several leaves; repeated names are Polars' to reject
    if not all(_same_in_polars(f, p) for f, p in zip(arrow, physical, strict=True)):
        return None
    return SmallParquet(file, names)
