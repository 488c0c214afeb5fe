"""The file source: new files in a directory, as a stream (Spark's ``FileStreamSource``).

Every batch takes the files that appeared in a directory since the previous
batch. Which files a batch took is written to the source's own log in the
checkpoint (``sources/<n>/<k>.json``) *before* the batch runs, so a re-run of
an uncommitted batch reads exactly the same files, even if more arrived, and
a file is never read twice.

Producers should write a file under a hidden name (leading ``.`` or ``_``) or
in another directory and then rename it into place: the source lists files
as they are, and a file still being written may be taken half-written.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Container, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors._paths import DataDir, modified_time
from microstream.exceptions import OffsetError, PlanError, SchemaMismatchError, SourceError
from microstream.protocols import Offset, SourceContext

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

    from microstream._typing import CleanSource, FileFormat

__all__ = ["FileLogEntry", "FileOffset", "FileSource", "FileSourceSpec", "LoggedFile"]

_FORMATS = ("parquet", "csv", "ndjson", "ipc")
_CLEAN_SOURCE = ("off", "delete", "archive")
_INFER_ROWS = 1000
_READ_THREADS = max(2, os.cpu_count() or 2)
_CLEANED_FILE = "cleaned.json"


# -- offsets and the source log --------------------------------------------------------------------


class FileOffset(Offset):
    """Position in the file source's log: the last log entry a batch covered.

    Attributes
    ----------
    log_index
        Index ``k`` of the last source log entry ``sources/<n>/<k>.json``
        included; ``-1`` is before the first entry.

    Examples
    --------
    >>> FileOffset(log_index=3).distance(FileOffset(log_index=1))
    2
    >>> FileOffset(log_index=1).follows_or_equals(FileOffset(log_index=3))
    False
    """

    log_index: int = Field(ge=-1)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this offset is at or after ``other``."""
        return self.log_index >= _file_offset(other, "compare with").log_index

    def distance(self, other: Offset) -> int | None:
        """The number of source log entries (batches of files) from ``other`` to here."""
        return self.log_index - _file_offset(other, "measure from").log_index


def _file_offset(offset: Offset, action: str) -> FileOffset:
    if not isinstance(offset, FileOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a FileOffset"
        raise OffsetError(msg)
    return offset


class LoggedFile(BaseModel):
    """One file taken by the source, as recorded in its log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """Path relative to the source directory."""
    size: int
    mtime: float


class FileLogEntry(BaseModel):
    """Source log entry ``<k>.json``: the files one batch takes, in reading order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: list[LoggedFile]


class _Cleaned(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to: int
    """The last log entry whose files were deleted or archived."""


# -- the spec --------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class FileSourceSpec:
    """New files in a directory as an unbounded stream.

    Parameters
    ----------
    path
        Directory to watch: a local path or any fsspec URL (``"s3://b/in"``,
        ``"memory://in"``).
    format
        ``"parquet"``, ``"csv"``, ``"ndjson"`` or ``"ipc"``.
    schema
        The schema of the rows. When omitted it is inferred from the oldest
        file present when the spec is created (csv and ndjson from its first
        1000 rows); pass it explicitly for production queries.
    max_files_per_trigger
        At most this many new files per batch (not applied to
        :meth:`~microstream.Trigger.once`).
    latest_first
        Take the newest files first (useful with ``max_files_per_trigger`` to
        catch up on recent data before old backlog).
    clean_source
        What to do with a file once the batch that read it is committed:
        ``"off"`` (keep), ``"delete"``, or ``"archive"`` (move below
        ``source_archive_dir``, keeping its name relative to ``path``).
        Failures to clean are logged as warnings and never stop the query.
    source_archive_dir
        Where ``clean_source="archive"`` moves files; same filesystem as
        ``path`` and not inside it.
    glob
        ``fnmatch`` pattern the file names must match (``"*.parquet"``).
        Hidden files (name starting with ``.`` or ``_``) are always ignored,
        as Spark does, so a producer's temporary files are never taken.
    recursive
        Also take files in sub-directories (hidden directories are skipped).
    storage_options
        Passed to :func:`fsspec.url_to_fs` for ``path`` and
        ``source_archive_dir``.

    Raises
    ------
    ValueError
        An option out of range.
    PlanError
        No ``schema`` and no file to infer one from.

    Examples
    --------
    >>> import polars as pl
    >>> spec = FileSourceSpec(
    ...     "memory://doctest-files-spec", format="csv", schema={"id": pl.Int64}
    ... )
    >>> spec.identity()
    {'path': 'memory:///doctest-files-spec', 'format': 'csv'}
    >>> spec.schema
    Schema([('id', Int64)])
    """

    kind: ClassVar[str] = "files"

    path: str
    format: FileFormat
    schema: pl.Schema
    max_files_per_trigger: int | None
    latest_first: bool
    clean_source: CleanSource
    source_archive_dir: str | None
    glob: str | None
    recursive: bool
    storage_options: dict[str, Any] | None = field(repr=False)  # may hold credentials

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: FileFormat = "parquet",
        schema: pl.Schema | Mapping[str, PolarsDataType] | None = None,
        max_files_per_trigger: int | None = None,
        latest_first: bool = False,
        clean_source: CleanSource = "off",
        source_archive_dir: str | os.PathLike[str] | None = None,
        glob: str | None = None,
        recursive: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if format not in _FORMATS:
            msg = f"format must be one of {', '.join(map(repr, _FORMATS))}; got {format!r}"
            raise ValueError(msg)
        if max_files_per_trigger is not None and (
            isinstance(max_files_per_trigger, bool)
            or not isinstance(max_files_per_trigger, int)
            or max_files_per_trigger < 1
        ):
            msg = (
                "max_files_per_trigger must be a positive int or None; "
                f"got {max_files_per_trigger!r}"
            )
            raise ValueError(msg)
        if not isinstance(latest_first, bool):
            msg = f"latest_first must be a bool; got {latest_first!r}"
            raise ValueError(msg)
        if clean_source not in _CLEAN_SOURCE:
            known = ", ".join(map(repr, _CLEAN_SOURCE))
            msg = f"clean_source must be one of {known}; got {clean_source!r}"
            raise ValueError(msg)
        if glob is not None and (not isinstance(glob, str) or not glob):
            msg = f"glob must be a non-empty pattern such as '*.parquet' or None; got {glob!r}"
            raise ValueError(msg)
        directory = DataDir.resolve(path, storage_options)
        archive = None if source_archive_dir is None else os.fspath(source_archive_dir)
        if clean_source == "archive":
            if archive is None:
                msg = "clean_source='archive' needs source_archive_dir; got None"
                raise ValueError(msg)
            archive_dir = DataDir.resolve(archive, storage_options)
            if type(archive_dir.fs) is not type(directory.fs):
                msg = (
                    f"source_archive_dir must be on the same filesystem as path {directory.url!r}; "
                    f"got {archive_dir.url!r}"
                )
                raise ValueError(msg)
            if directory.contains(archive_dir) and (
                archive_dir.root == directory.root or recursive
            ):
                msg = (
                    f"source_archive_dir must not be inside the watched directory "
                    f"{directory.url!r} (archived files would be read again); got {archive!r}"
                )
                raise ValueError(msg)
        elif archive is not None:
            msg = (
                f"source_archive_dir is only used with clean_source='archive'; "
                f"got clean_source={clean_source!r} and source_archive_dir={archive!r}"
            )
            raise ValueError(msg)

        if schema is None:
            resolved = _infer_schema(directory, format, glob=glob, recursive=recursive)
        else:
            try:
                resolved = pl.Schema(schema)
            except (TypeError, ValueError) as exc:
                msg = f"schema must map column names to polars dtypes; got {schema!r} ({exc})"
                raise ValueError(msg) from None

        object.__setattr__(self, "path", os.fspath(path))
        object.__setattr__(self, "format", format)
        object.__setattr__(self, "schema", resolved)
        object.__setattr__(self, "max_files_per_trigger", max_files_per_trigger)
        object.__setattr__(self, "latest_first", latest_first)
        object.__setattr__(self, "clean_source", clean_source)
        object.__setattr__(self, "source_archive_dir", archive)
        object.__setattr__(self, "glob", glob)
        object.__setattr__(self, "recursive", recursive)
        object.__setattr__(self, "storage_options", storage_options)

    def identity(self) -> dict[str, Any]:
        """The normalised directory URL and the format (a change refuses the checkpoint)."""
        return {"path": DataDir.resolve(self.path, self.storage_options).url, "format": self.format}

    def describe(self) -> str:
        """One line: ``FileSource[parquet: /data/in]``."""
        return f"FileSource[{self.format}: {DataDir.resolve(self.path, self.storage_options).url}]"

    def build(self, context: SourceContext) -> FileSource:
        """The runtime source, with its log restored from ``context.storage``."""
        return FileSource(self, context)


# -- the runtime source ----------------------------------------------------------------------------


class FileSource:
    """The runtime side of :class:`FileSourceSpec` (see the module docstring).

    On-disk, in the source's checkpoint directory:

    - ``<k>.json`` (:class:`FileLogEntry`): the files log entry ``k`` takes,
      written once, before any batch reads them.
    - ``cleaned.json``: the last entry whose files ``clean_source`` handled.

    The whole log is loaded when the source is built (one small JSON file
    per batch that found new files).
    """

    def __init__(self, spec: FileSourceSpec, context: SourceContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        self._dir = DataDir.resolve(spec.path, spec.storage_options)
        self._archive = (
            None
            if spec.source_archive_dir is None
            else DataDir.resolve(spec.source_archive_dir, spec.storage_options)
        )
        self._log = context.storage
        self._logger = context.logger
        self._faults = context.faults
        self._entries: dict[int, FileLogEntry] = {}
        self._seen: set[str] = set()
        ids = self._log.list_numbered("")
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))[0]
            msg = (
                f"{self.description}: source log {self._log.display('')} lacks entry "
                f"{missing}.json (has {ids[:10]}...); the log was truncated by hand. Restore it "
                "or delete the checkpoint to start over"
            )
            raise SourceError(msg)
        for k in ids:
            entry = self._log.read_model(f"{k}.json", FileLogEntry)
            self._entries[k] = entry
            self._seen.update(f.name for f in entry.files)
        self._last_logged = len(ids) - 1
        self._cleaned = (
            self._log.read_model(_CLEANED_FILE, _Cleaned).up_to
            if self._log.exists(_CLEANED_FILE)
            else -1
        )
        self._snapshot: frozenset[str] | None = None
        self._unlogged = 0  # new files the last listing found but left for later batches
        # The columns read: the query's projection (parquet and ipc read no others).
        self._schema = spec.schema
        self._pool: ThreadPoolExecutor | None = None  # reads a batch's files; made on first use

    def project(self, columns: Sequence[str]) -> None:
        """Read only ``columns`` of the schema from now on (the query reads no others)."""
        if self.spec.format in ("parquet", "ipc"):
            self._schema = pl.Schema({c: self.spec.schema[c] for c in columns})

    # -- offsets ---------------------------------------------------------------------------

    def initial_offset(self) -> FileOffset:
        """Before the first log entry."""
        return FileOffset(log_index=-1)

    def parse_offset(self, data: dict[str, Any]) -> FileOffset:
        """A :class:`FileOffset` from its JSON form in the write-ahead log."""
        try:
            return FileOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a file source offset "
                f"(expected {{'log_index': <int >= -1>}}): {exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> FileOffset:
        """The log entry ending the next batch; ``start`` itself when no new file.

        A log entry already written after ``start`` (by a run that stopped
        before its batch was committed) is returned again rather than a new
        listing, so that batch is re-formed exactly.
        """
        begin = _file_offset(start, "start a batch at")
        if begin.log_index > self._last_logged:
            msg = (
                f"{self.description}: offset log_index={begin.log_index} is beyond the last "
                f"entry ({self._last_logged}) of the source log {self._log.display('')}; the "
                "log was lost or replaced. Restore it or delete the checkpoint to start over"
            )
            raise OffsetError(msg)
        if begin.log_index < self._last_logged:
            end = begin.log_index + 1 if rate_limited else self._last_logged
            return FileOffset(log_index=end)

        new = self._new_files()
        if self._snapshot is not None:
            new = [f for f in new if f.name in self._snapshot]
        new.sort(key=lambda f: (f.mtime, f.name), reverse=self.spec.latest_first)
        limit = self.spec.max_files_per_trigger
        taken = new[:limit] if rate_limited and limit is not None else new
        self._unlogged = len(new) - len(taken)
        if not taken:
            return begin
        index = self._last_logged + 1
        entry = FileLogEntry(files=taken)
        self._log.write_model(f"{index}.json", entry, overwrite=False)
        self._entries[index] = entry
        self._seen.update(f.name for f in taken)
        self._last_logged = index
        self._faults.reach("source.after_log")
        return FileOffset(log_index=index)

    def prepare_for_available_now(self) -> None:
        """Fix the set of files to process to those present now."""
        self._snapshot = frozenset(f.name for f in self._new_files())

    def lag(self, end: Offset) -> int | None:
        """Files known but not yet in a batch ending at ``end``.

        Counts the files of log entries after ``end`` and the new files the
        last listing left for later batches (no extra listing is made).
        """
        after = _file_offset(end, "measure lag from").log_index
        logged = sum(
            len(self._entries[k].files)
            for k in range(after + 1, self._last_logged + 1)
            if k in self._entries
        )
        return logged + self._unlogged

    # -- reading ---------------------------------------------------------------------------

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The rows of the files of log entries ``start + 1 .. end``, in log order.

        Raises
        ------
        OffsetError
            ``end`` before ``start`` or beyond the log.
        SchemaMismatchError
            A file lacks a column of the schema, or has it with another dtype
            that is not a lossless widening (``Int32`` read as ``Int64`` is).
        SourceError
            A logged file is gone (the range cannot be replayed) or unreadable.
        """
        first = _file_offset(start, "read from").log_index + 1
        last = _file_offset(end, "read to").log_index
        if last < first - 1 or last > self._last_logged:
            msg = (
                f"{self.description}: cannot read ({first - 1}, {last}]: the source log "
                f"{self._log.display('')} has entries 0..{self._last_logged}"
            )
            raise OffsetError(msg)
        wanted = [(logged, k) for k in range(first, last + 1) for logged in self._entry(k).files]
        if not wanted:
            return pl.DataFrame(schema=self._schema)
        if len(wanted) == 1:
            frames = [self._read_file(*wanted[0])]
        else:
            # Polars reads release the GIL: several files at once use every core. map()
            # keeps log order and re-raises the first file's error, naming that file.
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=_READ_THREADS, thread_name_prefix="microstream-files"
                )
            frames = list(self._pool.map(lambda item: self._read_file(*item), wanted))
        return pl.concat(frames, how="vertical")

    def _entry(self, k: int) -> FileLogEntry:
        entry = self._entries.get(k)
        if entry is None:
            entry = self._log.read_model(f"{k}.json", FileLogEntry)
            self._entries[k] = entry
        return entry

    def _read_file(self, logged: LoggedFile, k: int) -> pl.DataFrame:
        shown = self._dir.display(logged.name)
        where = f"file {shown} (source log entry {self._log.display(f'{k}.json')})"
        try:
            if self._dir.is_local:
                df = _read(self._dir.path(logged.name), self.spec.format, self._schema, shown)
            else:
                with self._dir.fs.open(self._dir.path(logged.name), "rb") as fh:
                    df = _read(fh, self.spec.format, self._schema, shown)
        except SchemaMismatchError:
            raise
        except FileNotFoundError:
            msg = (
                f"{self.description}: {where} no longer exists, so this logged range cannot be "
                "replayed. Files must stay until the batch that read them is committed "
                "(clean_source does that for you); restore the file or delete the checkpoint"
            )
            raise SourceError(msg) from None
        except Exception as exc:
            if not self._dir.fs.exists(self._dir.path(logged.name)):
                msg = (
                    f"{self.description}: {where} no longer exists, so this logged range "
                    "cannot be replayed; restore the file or delete the checkpoint"
                )
                raise SourceError(msg) from exc
            msg = (
                f"{self.description}: cannot read {where} as {self.spec.format}: {exc}. "
                "Replace or remove the corrupt file (the batch re-reads it on restart)"
            )
            raise SourceError(msg) from exc
        return _conform(df, self._schema, shown)

    # -- clean-up --------------------------------------------------------------------------

    def commit(self, end: Offset) -> None:
        """Delete or archive the files of log entries up to ``end`` (``clean_source``)."""
        last = _file_offset(end, "commit").log_index
        if self.spec.clean_source == "off" or last <= self._cleaned:
            return
        for k in range(self._cleaned + 1, min(last, self._last_logged) + 1):
            for logged in self._entry(k).files:
                self._clean(logged)
        self._cleaned = min(last, self._last_logged)
        try:
            self._log.write_model(_CLEANED_FILE, _Cleaned(up_to=self._cleaned))
        except Exception as exc:  # a later commit() retries; the files are already handled
            self._logger.warning("%s: cannot record clean-up progress: %s", self.description, exc)

    def _clean(self, logged: LoggedFile) -> None:
        source = self._dir.path(logged.name)
        try:
            if self.spec.clean_source == "delete":
                self._dir.fs.rm_file(source)
            else:
                assert self._archive is not None
                target = self._archive.path(logged.name)
                self._archive.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                self._dir.fs.mv(source, target)
        except FileNotFoundError:
            pass  # cleaned before a crash cut the record short, or by someone else
        except Exception as exc:
            # As in Spark: clean-up is best effort and never fails the query.
            self._logger.warning(
                "%s: cannot %s %s: %s",
                self.description,
                self.spec.clean_source,
                self._dir.display(logged.name),
                exc,
            )

    def stop(self) -> None:
        """Shut down the threads that read files (files themselves are opened per read)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- listing ---------------------------------------------------------------------------

    def _new_files(self) -> list[LoggedFile]:
        return _list_files(self._dir, self.spec.glob, self.spec.recursive, seen=self._seen)


def _list_files(
    directory: DataDir, glob: str | None, recursive: bool, *, seen: Container[str] = frozenset()
) -> list[LoggedFile]:
    """The visible files of ``directory`` (no hidden ones, matching ``glob``) not in ``seen``.

    Names in ``seen`` are dropped before anything else is done with them: a
    file already taken is neither stat-ed nor described again, so a trigger
    costs a listing of names plus work for the new files only.
    """
    try:
        if directory.is_local:
            return _list_local(directory.root, glob, recursive, seen)
        return _list_remote(directory, glob, recursive, seen)
    except FileNotFoundError:
        return []
    except Exception as exc:
        msg = f"cannot list the source directory {directory.url}: {exc}"
        raise SourceError(msg) from exc


def _list_local(
    root: str, glob: str | None, recursive: bool, seen: Container[str]
) -> list[LoggedFile]:
    """:func:`_list_files` with ``os.scandir``: names come without a ``stat`` call.

    Which entries count as files is fsspec's: without ``recursive`` regular
    files only; with it everything but a directory, and symbolic links to
    directories are not followed.
    """
    files = []
    pending = [("", root)]
    while pending:
        prefix, path = pending.pop()
        try:
            with os.scandir(path) as listing:
                entries = list(listing)
        except FileNotFoundError:
            if not prefix:
                raise  # the directory itself: nothing there yet
            continue  # a sub-directory removed since it was listed
        for entry in entries:
            if entry.name.startswith((".", "_")):
                continue
            name = prefix + entry.name
            try:
                if recursive and entry.is_dir(follow_symlinks=False):
                    pending.append((name + "/", entry.path))
                    continue
                if not recursive and not entry.is_file(follow_symlinks=False):
                    continue
                if name in seen or (glob is not None and not fnmatch.fnmatchcase(entry.name, glob)):
                    continue
                info = entry.stat(follow_symlinks=False)
                size = info.st_size
                if entry.is_symlink():  # as fsspec: the size of the target, the link's mtime
                    try:
                        size = entry.stat().st_size
                    except OSError:
                        size = 0
            except FileNotFoundError:
                continue  # removed since the listing
            files.append(LoggedFile(name=name, size=size, mtime=info.st_mtime))
    return files


def _list_remote(
    directory: DataDir, glob: str | None, recursive: bool, seen: Container[str]
) -> list[LoggedFile]:
    """:func:`_list_files` through fsspec, whose listings carry sizes and times already."""
    fs = directory.fs
    fs.invalidate_cache(directory.root)  # object stores cache listings
    if recursive:
        infos = list(fs.find(directory.root, withdirs=False, detail=True).values())
    else:
        infos = [i for i in fs.ls(directory.root, detail=True) if i.get("type") == "file"]
    files = []
    for info in infos:
        name = directory.relative(str(info["name"]))
        if name in seen:
            continue
        parts = name.split("/")
        if any(p.startswith((".", "_")) for p in parts):
            continue
        if glob is not None and not fnmatch.fnmatchcase(parts[-1], glob):
            continue
        files.append(
            LoggedFile(name=name, size=int(info.get("size") or 0), mtime=modified_time(info))
        )
    return files


# -- reading one file ------------------------------------------------------------------------------


def _read(source: str | IO[bytes], fmt: FileFormat, schema: pl.Schema, shown: str) -> pl.DataFrame:
    """Read one file; parquet and ipc read only the schema's columns (one open of the file)."""
    if fmt == "csv":
        try:
            return pl.read_csv(
                source, schema=schema, extra_columns="ignore", raise_if_empty=False, glob=False
            )
        except pl.exceptions.SchemaError:
            # Name the missing column and its dtype, which polars' message lacks.
            if not isinstance(source, str):
                source.seek(0)
            header = pl.read_csv(source, n_rows=0, infer_schema=False, glob=False).columns
            _check_columns(header, schema, shown)
            raise
    if fmt == "ndjson":
        # JSON has no per-file schema: an absent field is null, as in Spark.
        return pl.read_ndjson(source, schema=schema)
    # parquet and ipc: one open. A missing column fails the read; only then is the
    # file's schema read, to name the column and its dtype (polars' message lacks it).
    # The dtypes of the columns read are checked by _conform.
    try:
        if fmt == "parquet":
            return pl.read_parquet(source, columns=list(schema), glob=False)
        return pl.read_ipc(source, columns=list(schema))
    except pl.exceptions.ColumnNotFoundError:
        if not isinstance(source, str):
            source.seek(0)
        found = pl.read_parquet_schema(source) if fmt == "parquet" else pl.read_ipc_schema(source)
        _check_columns(list(found), schema, shown)
        raise


def _check_columns(found: list[str], schema: pl.Schema, shown: str) -> None:
    for name, dtype in schema.items():
        if name not in found:
            msg = (
                f"file {shown} has no column {name!r} (expected dtype {dtype}); its columns are "
                f"{found}. Fix the file or declare the source schema without {name!r}"
            )
            raise SchemaMismatchError(msg)


def _conform(df: pl.DataFrame, schema: pl.Schema, shown: str) -> pl.DataFrame:
    """``df`` with exactly ``schema``'s columns, order and dtypes (widening casts only)."""
    if df.schema == schema:  # the usual case; Schema compares names, order and dtypes
        return df
    _check_columns(df.columns, schema, shown)
    casts = []
    for name, expected in schema.items():
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
    out = df.select(list(schema))
    return out.with_columns(casts) if casts else out


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


def _infer_schema(
    directory: DataDir, fmt: FileFormat, *, glob: str | None, recursive: bool
) -> pl.Schema:
    files = sorted(_list_files(directory, glob, recursive), key=lambda f: (f.mtime, f.name))
    if not files:
        msg = (
            f"cannot infer the schema of the {fmt} files in {directory.url}: no file there yet. "
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
