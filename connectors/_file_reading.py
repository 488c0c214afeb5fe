"""Reading one file of the file source: parse, check against the schema, find bad records.

A file either reads (a frame conformed to the schema, with its bad records and
the columns it has beyond the schema) or fails (why, for ``on_bad_file``);
csv and ndjson records that do not parse are split out one by one, with the
file and line, for ``on_bad_record``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

import numpy as np
import polars as pl

from connectors._file_listing import LoggedFile, Selection, list_files
from connectors._kafka_codecs import CsvDecoder, JsonDecoder, PayloadDecoder
from connectors._paths import DataDir
from connectors._small_files import SmallParquet, open_small_parquet
from microstream.exceptions import PlanError, SchemaMismatchError, SourceError

if TYPE_CHECKING:
    from connectors.files import FileSourceSpec
    from microstream._typing import FileFormat

__all__ = [
    "PANIC",
    "BadRecord",
    "FileFailed",
    "FileRead",
    "conform",
    "fail_error",
    "first_line",
    "infer_schema",
    "read_columns",
    "read_frame",
]

PANIC: tuple[type[BaseException], ...] = (Exception, pl.exceptions.PanicException)
"""What a Polars reader raises on bad input: errors, and panics on some inputs."""
_INFER_ROWS = 1000


@dataclass(frozen=True)
class BadRecord:
    line: int
    """1-based line of the file where the record starts (a csv header is line 1)."""
    value: str
    reason: str


@dataclass(frozen=True)
class _Parsed:
    frame: pl.DataFrame
    bad: list[BadRecord] = field(default_factory=list)
    extra_columns: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileRead:
    """A file read: its rows (schema conformed), bad records and columns beyond the schema."""

    logged: LoggedFile
    shown: str
    frame: pl.DataFrame
    bad: list[BadRecord]
    extra_columns: tuple[str, ...]


@dataclass(frozen=True)
class FileFailed:
    """A file that could not be read at all, and why."""

    logged: LoggedFile
    where: str
    reason: str
    missing: bool
    error: BaseException


def fail_error(failed: FileFailed, spec: FileSourceSpec, description: str) -> Exception:
    """The error of a file that failed under the "fail" policies, with advice that works."""
    if failed.missing:
        msg = (
            f"{description}: {failed.where} no longer exists, so this logged range cannot be "
            "replayed. Files must stay until the batch that read them is committed "
            "(clean_source does that for you). Restore the file, or restart the query with "
            "on_missing_file='skip' to leave it out (recorded in the source log and in progress)"
        )
        return SourceError(msg)
    advice = (
        "The batch re-reads the file on restart: replace it with a valid file under the same "
        "name, or restart the query with on_bad_file='skip' or 'dead_letter' to leave it out "
        "(recorded in the source log and in progress)"
    )
    if isinstance(failed.error, SchemaMismatchError):
        return SchemaMismatchError(f"{description}: {failed.reason}. {advice}")
    msg = f"{description}: cannot read {failed.where} as {spec.format}: {failed.error}. {advice}"
    error = SourceError(msg)
    error.__cause__ = failed.error
    return error


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def read_frame(
    source: str | IO[bytes], spec: FileSourceSpec, schema: pl.Schema, shown: str
) -> _Parsed:
    """Read one file with ``spec``'s format and column policies (``schema``: the columns read).

    parquet and ipc read only the schema's columns; their footer names the
    file's other columns.
    """
    fmt = spec.format
    if fmt in ("csv", "ndjson"):
        data = source if isinstance(source, str) else source.read()
        if fmt == "csv":
            return _read_csv(data, schema, shown, spec)
        return _read_ndjson(data, schema, shown, spec)
    small = (
        open_small_parquet(source) if isinstance(source, io.BytesIO) and fmt == "parquet" else None
    )
    if small is not None:
        found: list[str] = small.names
    else:
        found = list(
            pl.read_parquet_schema(source) if fmt == "parquet" else pl.read_ipc_schema(source)
        )
        if not isinstance(source, str):
            source.seek(0)
    extra = _check_header(found, spec, shown)
    present = [c for c in schema if c in found]
    if len(present) < len(schema):
        _check_columns(found, schema, shown, spec.missing_columns)
    return _Parsed(read_columns(source, fmt, present, small), extra_columns=extra)


def read_columns(
    source: str | IO[bytes], fmt: FileFormat, columns: list[str], small: SmallParquet | None
) -> pl.DataFrame:
    """The ``columns`` of one parquet or ipc file: where the file source decodes such a file's data.

    ``small``: the file opened by pyarrow (:func:`open_small_parquet`), decoded
    on this thread; otherwise Polars' reader. Every parquet and ipc read of
    the source goes through here, which is what tests observe to see the
    columns a query reads.

    Examples
    --------
    >>> import io, polars as pl
    >>> buf = io.BytesIO()
    >>> pl.DataFrame({"x": [1], "y": ["a"]}).write_parquet(buf)
    >>> _ = buf.seek(0)
    >>> read_columns(buf, "parquet", ["y"], None).to_dict(as_series=False)
    {'y': ['a']}
    """
    if small is not None and columns:
        try:
            return small.read(columns)
        except Exception:
            pass  # Polars' reader reads it, or fails with its own message as before
    if fmt == "parquet":
        return pl.read_parquet(source, columns=columns, glob=False)
    return pl.read_ipc(source, columns=columns)


def _check_header(found: Sequence[str], spec: FileSourceSpec, shown: str) -> tuple[str, ...]:
    """The file's columns beyond the source schema; an error with ``extra_columns="raise"``."""
    extra = tuple(c for c in found if c not in spec.schema)
    if extra and spec.extra_columns == "raise":
        msg = (
            f"file {shown} has column(s) {list(extra)} that the source schema lacks "
            "(extra_columns='raise'). Add them to schema=, or pass extra_columns='ignore' "
            "to leave them out"
        )
        raise SchemaMismatchError(msg)
    return extra


def _check_columns(
    found: list[str], schema: pl.Schema, shown: str, missing_columns: str = "raise"
) -> None:
    if missing_columns == "insert":
        return
    for name, dtype in schema.items():
        if name not in found:
            msg = (
                f"file {shown} has no column {name!r} (expected dtype {dtype}); its columns are "
                f"{found}. Fix the file, declare the source schema without {name!r}, or pass "
                "missing_columns='insert' to read it as null"
            )
            raise SchemaMismatchError(msg)


def _open(data: str | bytes) -> str | io.BytesIO:
    return data if isinstance(data, str) else io.BytesIO(data)


def _raw(data: str | bytes) -> bytes:
    if isinstance(data, bytes):
        return data
    with open(data, "rb") as fh:
        return fh.read()


def _read_csv(data: str | bytes, schema: pl.Schema, shown: str, spec: FileSourceSpec) -> _Parsed:
    """A csv file by header name, every row checked to have the header's number of fields.

    Polars pads a short row with nulls and, when columns are left out, drops
    the fields of a long one; both are bad records here. A quick check counts
    each line's separators (outside quotes) in bulk; a file that fails it, or
    whose typed parse fails, is split into records with :mod:`csv` and the
    records are parsed in bulk again, the bad ones found by bisection.
    """
    header = pl.read_csv(
        _open(data), n_rows=0, infer_schema=False, glob=False, raise_if_empty=False
    ).columns
    if not header:  # an empty file
        return _Parsed(pl.DataFrame(schema=schema))
    extra = _check_header(header, spec, shown)
    _check_columns(header, schema, shown, spec.missing_columns)
    file_schema = pl.Schema({c: schema.get(c, pl.String()) for c in header})
    frame: pl.DataFrame | None = None
    if _fields_match(data, len(header)):
        try:
            frame = pl.read_csv(_open(data), schema=file_schema, raise_if_empty=False, glob=False)
        except PANIC:
            frame = None
    if frame is not None:
        return _Parsed(frame.select([c for c in schema if c in file_schema]), [], extra)
    lines, records = _csv_records(_raw(data), shown)
    bad: list[BadRecord] = []
    payloads: list[bytes] = []
    starts: list[int] = []
    for start, stop, fields in records[1:]:  # records[0] is the header
        text = "".join(lines[start:stop]).rstrip("\r\n")
        if len(fields) != len(header):
            reason = f"{len(fields)} fields where the header has {len(header)}"
            bad.append(BadRecord(start + 1, text, reason))
        else:
            payloads.append(text.encode())
            starts.append(start)
    good, decode_bad = _decode(
        CsvDecoder(file_schema), payloads, starts, [p.decode() for p in payloads]
    )
    bad = sorted([*bad, *decode_bad], key=lambda b: b.line)
    return _Parsed(good.select([c for c in schema if c in file_schema]), bad, extra)


def _fields_match(data: str | bytes, width: int) -> bool:
    """Whether every line has ``width`` fields, counted in bulk (false: check record by record).

    Without quote chars, separators are counted per line on the raw bytes
    with numpy (a fraction of the parse's cost). With them, each line is
    counted by Polars without its quoted parts; an odd number of quotes on a
    line (a quoted line break) sends the file to the record-by-record check,
    as does a blank line (Polars would make it a row of nulls).
    """
    raw = np.frombuffer(_raw(data), dtype=np.uint8)
    if not (raw == ord('"')).any():
        ends = np.flatnonzero(raw == ord("\n"))
        if len(ends) and ends[-1] == len(raw) - 1:
            ends = ends[:-1]  # the newline that ends the last line starts no line
        starts = np.concatenate(([0], ends + 1))
        stops = np.concatenate((ends, [len(raw)]))
        lengths = stops - starts
        if len(ends) and lengths[-1] and raw[stops[-1] - 1] == ord("\r"):
            lengths[-1] -= 1
        crlf = np.zeros(len(lengths), dtype=bool)
        crlf[:-1] = raw[np.maximum(ends - 1, 0)] == ord("\r")
        if ((lengths - crlf) <= 0).any():
            return False  # a blank line
        per_line = np.bincount(
            np.searchsorted(ends, np.flatnonzero(raw == ord(",")), side="right"),
            minlength=len(starts),
        )
        return bool((per_line == width - 1).all())
    try:
        lines = pl.read_csv(
            _open(data),
            has_header=False,
            separator="\x1f",
            quote_char=None,
            schema={"line": pl.String()},
            glob=False,
            raise_if_empty=False,
        ).get_column("line")
    except PANIC:
        return False
    quotes = lines.str.count_matches('"', literal=True)
    if ((quotes % 2) == 1).any() or lines.is_null().any():
        return False
    lines = lines.str.replace_all(r'"(?:[^"]|"")*"', "")
    return bool((lines.str.count_matches(",", literal=True) == width - 1).all())


def _csv_records(raw: bytes, shown: str) -> tuple[list[str], list[tuple[int, int, list[str]]]]:
    """The file's physical lines, and each record's ``(first line, end line, fields)``."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        msg = f"file {shown} is not UTF-8 text: {exc}"
        raise SourceError(msg) from None
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(iter(lines))
    records = []
    before = 0
    try:
        for fields in reader:
            if fields:  # a blank line is no record
                records.append((before, reader.line_num, fields))
            before = reader.line_num
    except csv.Error as exc:
        msg = f"file {shown} line {reader.line_num}: {exc}"
        raise SourceError(msg) from None
    return lines, records


def _decode(
    decoder: PayloadDecoder, payloads: list[bytes], starts: list[int], texts: list[str]
) -> tuple[pl.DataFrame, list[BadRecord]]:
    """Rows of the payloads that decode; the others as bad records (``starts``: 0-based lines)."""
    decoded = decoder.decode(payloads)
    bad = [BadRecord(starts[i] + 1, texts[i], reason) for i, reason in decoded.bad]
    return decoded.frame, bad


def _read_ndjson(data: str | bytes, schema: pl.Schema, shown: str, spec: FileSourceSpec) -> _Parsed:
    """An ndjson file with the schema; an absent field is null (JSON has no header), as in Spark.

    A file that does not parse in bulk is split into lines, parsed in bulk
    again, and the bad lines found by bisection.
    """
    try:
        frame = pl.read_ndjson(_open(data), schema=schema)
        bad: list[BadRecord] = []
        keys_from: str | bytes = data
    except PANIC:
        lines = _raw(data).split(b"\n")
        starts = [i for i, line in enumerate(lines) if line.strip()]
        payloads = [lines[i] for i in starts]
        texts = [p.decode(errors="replace").rstrip("\r") for p in payloads]
        frame, bad = _decode(JsonDecoder(schema), payloads, starts, texts)
        bad_lines = {b.line - 1 for b in bad}
        keys_from = b"\n".join(lines[i] for i in starts if i not in bad_lines)
    infer = None if spec.extra_columns == "raise" else _INFER_ROWS
    try:
        keys = pl.scan_ndjson(_open(keys_from), infer_schema_length=infer).collect_schema()
    except PANIC:
        keys = pl.Schema()  # no line to infer from: no key beyond the schema to report
    return _Parsed(frame, bad, _check_header(list(keys), spec, shown))


def conform(
    df: pl.DataFrame, schema: pl.Schema, shown: str, missing_columns: str = "raise"
) -> pl.DataFrame:
    """``df`` with exactly ``schema``'s columns, order and dtypes (widening casts only).

    A schema column ``df`` lacks is an error, or nulls with ``missing_columns="insert"``.
    """
    if df.schema == schema:  # the usual case; Schema compares names, order and dtypes
        return df
    _check_columns(df.columns, schema, shown, missing_columns)
    casts = []
    for name, expected in schema.items():
        if name not in df.schema:
            casts.append(pl.lit(None, expected).alias(name))
            continue
        found = df.schema[name]
        if found == expected:
            continue
        if not _is_widening(found, expected):
            msg = (
                f"file {shown} has column {name!r} as {found}, but the source schema says "
                f"{expected}; only lossless widening (e.g. Int32 to Int64) is applied. "
                "Fix the file or change the declared schema"
            )
            raise SchemaMismatchError(msg)
        casts.append(pl.col(name).cast(expected, strict=True))
    out = df.with_columns(casts) if casts else df
    return out.select(list(schema))


_SIGNED = {pl.Int8: 8, pl.Int16: 16, pl.Int32: 32, pl.Int64: 64, pl.Int128: 128}
_UNSIGNED = {pl.UInt8: 8, pl.UInt16: 16, pl.UInt32: 32, pl.UInt64: 64}
_FLOAT = {pl.Float32: 32, pl.Float64: 64}
_FLOAT_EXACT_INT_BITS = {32: 16, 64: 32}  # the widest ints a float holds exactly
_TIME_UNITS = ("ms", "us", "ns")


def _is_widening(found: pl.DataType, expected: pl.DataType) -> bool:
    """Whether casting ``found`` to ``expected`` never loses a value.

    Examples
    --------
    >>> _is_widening(pl.Int32(), pl.Int64())
    True
    >>> _is_widening(pl.Int64(), pl.Int32())
    False
    >>> _is_widening(pl.Int64(), pl.Float64())
    False
    >>> _is_widening(pl.Datetime("ms"), pl.Datetime("us"))
    True
    """
    f, e = found.base_type(), expected.base_type()
    if f is pl.Null:
        return True
    if f in _SIGNED:
        bits = _SIGNED[f]
        if e in _SIGNED:
            return _SIGNED[e] > bits
        return e in _FLOAT and _FLOAT_EXACT_INT_BITS[_FLOAT[e]] >= bits
    if f in _UNSIGNED:
        bits = _UNSIGNED[f]
        if e in _UNSIGNED:
            return _UNSIGNED[e] > bits
        if e in _SIGNED:
            return _SIGNED[e] > bits
        return e in _FLOAT and _FLOAT_EXACT_INT_BITS[_FLOAT[e]] >= bits
    if f is pl.Float32:
        return e is pl.Float64
    if isinstance(found, pl.Datetime) and isinstance(expected, pl.Datetime):
        return found.time_zone == expected.time_zone and _TIME_UNITS.index(
            found.time_unit
        ) < _TIME_UNITS.index(expected.time_unit)
    return False


def infer_schema(directory: DataDir, fmt: FileFormat, selection: Selection) -> pl.Schema:
    listing = list_files(directory, selection)
    files = sorted(listing.files, key=lambda f: (f.mtime, f.name))
    if not files:
        why = "the directory does not exist" if listing.missing else "no file there yet"
        msg = (
            f"cannot infer the schema of the {fmt} files in {directory.url}: {why}. "
            "Pass schema={'column': pl.Int64, ...} to declare it"
        )
        raise PlanError(msg)
    oldest = files[0].name
    shown = directory.display(oldest)
    try:
        with directory.fs.open(directory.path(oldest), "rb") as fh:
            if fmt == "parquet":
                return pl.Schema(pl.read_parquet_schema(fh))
            if fmt == "ipc":
                return pl.Schema(pl.read_ipc_schema(fh))
            if fmt == "csv":
                return pl.read_csv(fh, n_rows=_INFER_ROWS, infer_schema_length=_INFER_ROWS).schema
            return pl.read_ndjson(fh, n_rows=_INFER_ROWS, infer_schema_length=_INFER_ROWS).schema
    except Exception as exc:
        msg = (
            f"cannot infer the schema from {shown} (the oldest {fmt} file in {directory.url}): "
            f"{exc}. Pass schema= to declare it"
        )
        raise SourceError(msg) from exc
