"""The file source: new files in a directory, as a stream (Spark's ``FileStreamSource``).

Every batch takes the files that appeared in a directory since the previous
batch. Which files a batch took is written to the source's own log in the
checkpoint (``sources/<n>/<k>.json``) *before* the batch runs, so a re-run of
an uncommitted batch reads exactly the same files, even if more arrived, and
a file is never read twice.

Producers should write a file under a hidden name (leading ``.`` or ``_``) or
in another directory and then rename it into place: the source lists files
as they are, and a file still being written may be taken half-written.

What goes wrong is handled by policy, and never lost without a word:

- a file that cannot be read (corrupt, unparsable, or not fitting the schema)
  by ``on_bad_file``, a logged file that is gone by ``on_missing_file``; a
  file left out is recorded in ``skipped/<k>.json`` next to its log entry, so
  a re-run of the batch leaves it out again (the same rows);
- a csv or ndjson record that does not parse (or a csv row with too many or
  too few fields) by ``on_bad_record``, with the file and line;
- columns a file has beyond the schema by ``extra_columns``, schema columns a
  file lacks by ``missing_columns`` (Polars' names and meanings).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl
from pydantic import ValidationError

from connectors._file_listing import LoggedFile, Selection, list_files
from connectors._file_log import (
    Cleaned,
    FileLogEntry,
    FileOffset,
    SkippedFile,
    SkippedFiles,
    file_offset,
)
from connectors._file_reading import FileFailed, FileRead, fail_error, infer_schema
from connectors._file_splits import FileSplit, bad_record_error, plan_file_splits, read_logged_file
from connectors._fused_scan import FUSED_SCAN_MIN_BYTES, scan_parquet_files
from connectors._paths import DataDir, split_glob
from connectors._prefetch import READ_AHEAD_BYTES, ReadAhead, file_version
from microstream.exceptions import OffsetError, SourceError
from microstream.protocols import Offset, ScannedBatch, SideOutputTarget, SourceContext

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

    from microstream._typing import (
        BadFilePolicy,
        BadRecordPolicy,
        CleanSource,
        ExtraColumnsPolicy,
        FileFormat,
        MissingColumnsPolicy,
        MissingFilePolicy,
    )

__all__ = [
    "DEAD_LETTER_SCHEMA",
    "FileLogEntry",
    "FileOffset",
    "FileSource",
    "FileSourceSpec",
    "LoggedFile",
    "SkippedFile",
    "SkippedFiles",
]

_FORMATS = ("parquet", "csv", "ndjson", "ipc")
_CLEAN_SOURCE = ("off", "delete", "archive")
_SKIPPED_DIR = "skipped"

DEAD_LETTER_SCHEMA = pl.Schema(
    {
        "path": pl.String(),
        "size": pl.Int64(),
        "line": pl.Int64(),
        "value": pl.String(),
        "reason": pl.String(),
    }
)
"""Columns of a dead-letter row (the engine appends ``batch_id``): a whole file has
null ``line`` and ``value``; a bad record has its line number and its text."""
_READ_THREADS = max(2, os.cpu_count() or 2)
_READ_AHEAD_FILES = 4096  # at most this many files planned ahead (tiny files, long backlogs)
_CLEANED_FILE = "cleaned.json"


# -- the spec --------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class FileSourceSpec:
    """New files in a directory as an unbounded stream.

    Parameters
    ----------
    path
        Directory to watch: a local path or any fsspec URL (``"s3://b/in"``,
        ``"memory://in"``), optionally with a glob below it, as in
        :func:`polars.scan_parquet`: ``"in/*.parquet"``, ``"in/**/*.csv"``
        (``*`` and ``?`` within a path segment, ``**`` across directories).
        A directory that does not exist is an error when the query starts,
        unless ``wait_for_path``.
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
        Without it (and without a glob in ``path``) only names with the
        format's extension are taken (parquet ``*.parquet``; csv ``*.csv``;
        ndjson ``*.ndjson``, ``*.jsonl``, ``*.json``; ipc ``*.arrow``,
        ``*.ipc``, ``*.feather``); any other file is logged as ignored once
        and counted as ``files_ignored`` in progress. Hidden files (name
        starting with ``.`` or ``_``) are always ignored, as Spark does, so a
        producer's temporary files are never taken.
    recursive
        Also take files in sub-directories (hidden directories are skipped).
        Not with a glob in ``path``, whose ``**`` says that.
    on_bad_file
        A file that cannot be read (corrupt, unparsable as a whole, a column
        missing with ``missing_columns="raise"``, extra with
        ``extra_columns="raise"``, or of a dtype that does not widen):
        ``"fail"`` (a :class:`~microstream.SourceError` or
        :class:`~microstream.SchemaMismatchError` naming the file),
        ``"skip"`` (left out, logged, counted as ``files_skipped_bad``) or
        ``"dead_letter"`` (one row ``path, size, reason, batch_id`` to
        ``dead_letter``; counted as ``files_dead_lettered``). A file left out
        is named in the batch's ``SourceProgress.skipped_files`` and recorded
        in the source log, so a re-run of the batch leaves it out again.
    on_missing_file
        A file in the source log that is gone when its batch reads it (deleted
        before the batch committed): ``"fail"`` or ``"skip"`` (recorded and
        reported as for ``on_bad_file``; counted as ``files_skipped_missing``).
    on_bad_record
        csv and ndjson only: a record that does not parse (a value not of its
        column's dtype, invalid JSON, a csv row with more or fewer fields
        than the header): ``"fail"`` (naming the file and line), ``"skip"``
        (counted as ``bad_records_skipped``) or ``"dead_letter"`` (rows
        ``path, size, line, value, reason, batch_id``; counted as
        ``bad_records_dead_lettered``), as the Kafka source does.
    dead_letter
        With a ``"dead_letter"`` policy: a memory table name
        (``ms.table(name)``) or a function called with the rows and the
        batch id. Both policies share it; columns :data:`DEAD_LETTER_SCHEMA`.
    extra_columns
        Columns a file has that the schema lacks: ``"ignore"`` (not read;
        each new column is logged once and counted as
        ``new_columns_ignored``) or ``"raise"`` (the file is bad). ndjson
        files are checked by the keys of their first 1000 lines with
        ``"ignore"``, of every line with ``"raise"`` (a second parse).
    missing_columns
        Schema columns a parquet, ipc or csv file lacks: ``"raise"`` (the
        file is bad) or ``"insert"`` (read as nulls). An ndjson field that
        is absent is null in that row either way (JSON has no header).
    wait_for_path
        Start even if the directory does not exist yet, and take its files
        once it does (logged once); off: a missing directory is an error
        when the query starts. An object-store prefix exists once it holds
        a file.
    storage_options
        Passed to :func:`fsspec.url_to_fs` for ``path`` and
        ``source_archive_dir``.
    read_ahead_bytes
        While a batch runs, the files the next batches take (when already
        known: ``max_files_per_trigger`` left them for later, or a restart
        replays logged batches) are read on the source's threads, at most this
        many bytes of them held in memory at once (their decoded frames; one
        file always, however large). ``0`` turns read-ahead off. Read-ahead
        never changes what a batch reads (connectors/README.md, "Read-ahead").

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
    on_bad_file: BadFilePolicy
    on_missing_file: MissingFilePolicy
    on_bad_record: BadRecordPolicy
    dead_letter: SideOutputTarget | None = field(compare=False)
    extra_columns: ExtraColumnsPolicy
    missing_columns: MissingColumnsPolicy
    wait_for_path: bool
    storage_options: dict[str, Any] | None = field(repr=False)  # may hold credentials
    read_ahead_bytes: int

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
        on_bad_file: BadFilePolicy = "fail",
        on_missing_file: MissingFilePolicy = "fail",
        on_bad_record: BadRecordPolicy = "fail",
        dead_letter: SideOutputTarget | None = None,
        extra_columns: ExtraColumnsPolicy = "ignore",
        missing_columns: MissingColumnsPolicy = "raise",
        wait_for_path: bool = False,
        storage_options: dict[str, Any] | None = None,
        read_ahead_bytes: int = READ_AHEAD_BYTES,
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
        _check_policies(
            format,
            on_bad_file=on_bad_file,
            on_missing_file=on_missing_file,
            on_bad_record=on_bad_record,
            dead_letter=dead_letter,
            extra_columns=extra_columns,
            missing_columns=missing_columns,
        )
        if not isinstance(wait_for_path, bool):
            msg = f"wait_for_path must be a bool; got {wait_for_path!r}"
            raise ValueError(msg)
        if isinstance(read_ahead_bytes, bool) or not isinstance(read_ahead_bytes, int):
            msg = f"read_ahead_bytes must be an int (0: no read-ahead); got {read_ahead_bytes!r}"
            raise ValueError(msg)
        if read_ahead_bytes < 0:
            msg = f"read_ahead_bytes must be 0 (no read-ahead) or more; got {read_ahead_bytes}"
            raise ValueError(msg)
        base, pattern = split_glob(os.fspath(path))
        if pattern is not None and recursive:
            msg = (
                f"recursive=True does not combine with the glob in path {os.fspath(path)!r}: "
                "use '**' in the glob to take files in sub-directories"
            )
            raise ValueError(msg)
        directory = DataDir.resolve(base, storage_options)
        selection = Selection.of(format, glob, pattern, recursive)
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
                archive_dir.root == directory.root or selection.recursive
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
            resolved = infer_schema(directory, format, selection)
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
        object.__setattr__(self, "on_bad_file", on_bad_file)
        object.__setattr__(self, "on_missing_file", on_missing_file)
        object.__setattr__(self, "on_bad_record", on_bad_record)
        object.__setattr__(self, "dead_letter", dead_letter)
        object.__setattr__(self, "extra_columns", extra_columns)
        object.__setattr__(self, "missing_columns", missing_columns)
        object.__setattr__(self, "wait_for_path", wait_for_path)
        object.__setattr__(self, "storage_options", storage_options)
        object.__setattr__(self, "read_ahead_bytes", read_ahead_bytes)

    @property
    def directory(self) -> str:
        """The directory watched: ``path`` up to its glob, if it has one."""
        return split_glob(self.path)[0]

    @property
    def selection(self) -> Selection:
        """Which of the directory's files the source takes."""
        return Selection.of(self.format, self.glob, split_glob(self.path)[1], self.recursive)

    def _url(self) -> str:
        base, pattern = split_glob(self.path)
        url = DataDir.resolve(base, self.storage_options).url
        return url if pattern is None else f"{url.rstrip('/')}/{pattern}"

    def identity(self) -> dict[str, Any]:
        """The normalised URL (with its glob) and the format (a change refuses the checkpoint)."""
        return {"path": self._url(), "format": self.format}

    def describe(self) -> str:
        """One line: ``FileSource[parquet: /data/in]``."""
        return f"FileSource[{self.format}: {self._url()}]"

    def build(self, context: SourceContext) -> FileSource:
        """The runtime source, with its log restored from ``context.storage``."""
        return FileSource(self, context)


def _check_policies(
    fmt: str,
    *,
    on_bad_file: str,
    on_missing_file: str,
    on_bad_record: str,
    dead_letter: object,
    extra_columns: str,
    missing_columns: str,
) -> None:
    choices: dict[str, tuple[str, tuple[str, ...]]] = {
        "on_bad_file": (on_bad_file, ("fail", "skip", "dead_letter")),
        "on_missing_file": (on_missing_file, ("fail", "skip")),
        "on_bad_record": (on_bad_record, ("fail", "skip", "dead_letter")),
        "extra_columns": (extra_columns, ("ignore", "raise")),
        "missing_columns": (missing_columns, ("insert", "raise")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            msg = f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}"
            raise ValueError(msg)
    if on_bad_record != "fail" and fmt not in ("csv", "ndjson"):
        msg = (
            f"on_bad_record applies to csv and ndjson files, which hold records one by one; "
            f"a {fmt} file is read whole: use on_bad_file={on_bad_record!r} instead"
        )
        raise ValueError(msg)
    wants = "dead_letter" in (on_bad_file, on_bad_record)
    if wants and not (isinstance(dead_letter, str) and dead_letter) and not callable(dead_letter):
        msg = (
            "on_bad_file='dead_letter' or on_bad_record='dead_letter' needs dead_letter= a "
            f"memory table name or a function(df, batch_id); got {dead_letter!r}"
        )
        raise ValueError(msg)
    if not wants and dead_letter is not None:
        msg = (
            "dead_letter= is used only with on_bad_file='dead_letter' or "
            f"on_bad_record='dead_letter'; got on_bad_file={on_bad_file!r} and "
            f"on_bad_record={on_bad_record!r}"
        )
        raise ValueError(msg)


# -- the runtime source ----------------------------------------------------------------------------


class FileSource:
    """The runtime side of :class:`FileSourceSpec` (see the module docstring).

    On-disk, in the source's checkpoint directory:

    - ``<k>.json`` (:class:`FileLogEntry`): the files log entry ``k`` takes,
      written once, before any batch reads them.
    - ``skipped/<k>.json`` (:class:`SkippedFiles`): the files of entry ``k``
      its batch left out (``on_bad_file``, ``on_missing_file``).
    - ``cleaned.json``: the last entry whose files ``clean_source`` handled.

    The whole log is loaded when the source is built (one small JSON file
    per batch that found new files).

    Raises
    ------
    SourceError
        The directory does not exist (without ``wait_for_path``) or is a
        file; the log has a gap.
    """

    def __init__(self, spec: FileSourceSpec, context: SourceContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        self._dir = DataDir.resolve(spec.directory, spec.storage_options)
        self._selection = spec.selection
        self._check_directory()
        self._archive = (
            None
            if spec.source_archive_dir is None
            else DataDir.resolve(spec.source_archive_dir, spec.storage_options)
        )
        self._log = context.storage
        self._logger = context.logger
        self._faults = context.faults
        self._side_output = context.side_output
        if spec.dead_letter is not None:
            self._side_output.declare(spec.dead_letter, DEAD_LETTER_SCHEMA)
        self._metrics: dict[str, int] = {}
        self._skipped_names: list[str] = []
        self._reported: set[str] = set()  # ignored files and new columns, reported once per run
        self._waiting_reported = False
        self._entries: dict[int, FileLogEntry] = {}
        self._seen: set[str] = set()
        ids = self._log.list_numbered("")
        if ids != list(range(len(ids))):
            missing = sorted(set(range(max(ids) + 1)) - set(ids))[0]
            msg = (
                f"{self.description}: source log {self._log.display('')} lacks entry "
                f"{missing}.json (has {ids[:10]}...); the log was truncated by hand. Restore it "
                "or start over with `microstream reset CHECKPOINT`"
            )
            raise SourceError(msg)
        for k in ids:
            entry = self._log.read_model(f"{k}.json", FileLogEntry)
            self._entries[k] = entry
            self._seen.update(f.name for f in entry.files)
        self._last_logged = len(ids) - 1
        self._cleaned = (
            self._log.read_model(_CLEANED_FILE, Cleaned).up_to
            if self._log.exists(_CLEANED_FILE)
            else -1
        )
        self._snapshot: frozenset[str] | None = None
        self._unlogged: list[LoggedFile] = []  # the last listing's files left for later batches
        self._listed: dict[str, LoggedFile] = {}  # the last listing's new files, by name
        # The columns read: the query's projection (parquet and ipc read no others).
        self._schema = spec.schema
        self._pool: ThreadPoolExecutor | None = None  # reads a batch's files; made on first use
        self._read_ahead = ReadAhead(
            self._read_file,
            lambda job: self._threads().submit(job),
            max_bytes=spec.read_ahead_bytes,
            max_running=_READ_THREADS,
            version=lambda logged: file_version(self._dir, logged.name),
            recheck_on_take=self._dir.is_local,
        )

    def _check_directory(self) -> None:
        try:
            exists = self._dir.fs.exists(self._dir.root)
            is_dir = exists and self._dir.fs.isdir(self._dir.root)
        except Exception as exc:
            msg = f"{self.description}: cannot look up the source directory {self._dir.url}: {exc}"
            raise SourceError(msg) from exc
        if exists and not is_dir:
            msg = (
                f"{self.description}: {self._dir.url} is a file, not a directory; pass its "
                "directory as path, or a glob such as 'dir/*.parquet'"
            )
            raise SourceError(msg)
        if not exists and not self.spec.wait_for_path:
            msg = (
                f"{self.description}: the source directory {self._dir.url} does not exist. "
                "Check the path, create the directory, or pass wait_for_path=True to wait "
                "for it to be created"
            )
            raise SourceError(msg)

    # -- what the batch left out, for progress ------------------------------------------------

    def metrics(self) -> dict[str, int]:
        """Counts since the previous call (only those not zero): ``files_skipped_bad``,
        ``files_dead_lettered``, ``files_skipped_missing``, ``bad_records_skipped``,
        ``bad_records_dead_lettered``, ``files_ignored``, ``new_columns_ignored``."""
        out, self._metrics = self._metrics, {}
        return out

    def skipped_files(self) -> list[str]:
        """The files left out (skipped or dead-lettered) since the previous call."""
        out, self._skipped_names = self._skipped_names, []
        return out

    @property
    def read_ahead(self) -> ReadAhead:
        """The next batch's files read in the background (its counts: ``used``, ``discarded``)."""
        return self._read_ahead

    def _count(self, name: str, n: int = 1) -> None:
        if n:
            self._metrics[name] = self._metrics.get(name, 0) + n

    def project(self, columns: Sequence[str]) -> None:
        """Read only ``columns`` of the schema from now on (the query reads no others)."""
        if self.spec.format in ("parquet", "ipc"):
            self._schema = pl.Schema({c: self.spec.schema[c] for c in columns})
            self._read_ahead.discard()  # read with the columns before

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
        begin = file_offset(start, "start a batch at")
        if begin.log_index > self._last_logged:
            msg = (
                f"{self.description}: offset log_index={begin.log_index} is beyond the last "
                f"entry ({self._last_logged}) of the source log {self._log.display('')}; the "
                "log was lost or replaced. Restore it, or start over with `microstream reset "
                "CHECKPOINT`"
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
        self._unlogged = new[len(taken) :]
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
        after = file_offset(end, "measure lag from").log_index
        logged = sum(
            len(self._entries[k].files)
            for k in range(after + 1, self._last_logged + 1)
            if k in self._entries
        )
        return logged + len(self._unlogged)

    # -- reading ---------------------------------------------------------------------------

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The rows of the files of log entries ``start + 1 .. end``, in log order.

        Files recorded as left out by an earlier run of the same batch are
        left out again, unread. A file that fails is handled by
        ``on_bad_file`` / ``on_missing_file``; a file left out now is
        recorded in ``skipped/<k>.json`` before the rows are returned.

        Raises
        ------
        OffsetError
            ``end`` before ``start`` or beyond the log.
        SchemaMismatchError
            With ``on_bad_file="fail"``: a file lacks a column of the schema
            (``missing_columns="raise"``), has one it lacks
            (``extra_columns="raise"``), or has one with another dtype that
            is not a lossless widening (``Int32`` read as ``Int64`` is).
        SourceError
            With ``on_missing_file="fail"``: a logged file is gone; with
            ``on_bad_file="fail"``: a file is unreadable; with
            ``on_bad_record="fail"``: a csv or ndjson record is bad.
        """
        first = file_offset(start, "read from").log_index + 1
        last = file_offset(end, "read to").log_index
        if last < first - 1 or last > self._last_logged:
            msg = (
                f"{self.description}: cannot read ({first - 1}, {last}]: the source log "
                f"{self._log.display('')} has entries 0..{self._last_logged}"
            )
            raise OffsetError(msg)
        recorded = {k: self._recorded_skips(k) for k in range(first, last + 1)}
        wanted = [
            (logged, k)
            for k in range(first, last + 1)
            for logged in self._entry(k).files
            if logged.name not in recorded[k]
        ]
        ahead = {item[0].name: r for item in wanted if (r := self._read_ahead.take(item[0]))}
        rest = [item for item in wanted if item[0].name not in ahead]
        if len(rest) <= 1:
            read = {item[0].name: self._read_file(*item) for item in rest}
        else:
            # Polars reads release the GIL: several files at once use every core.
            # Failures come back as values, handled below in log order.
            results = self._threads().map(lambda item: self._read_file(*item), rest)
            read = {item[0].name: r for item, r in zip(rest, results)}
        outcomes = [ahead.get(item[0].name) or read[item[0].name] for item in wanted]
        self._read_ahead.start(self._upcoming(last))
        frames = []
        dead: list[pl.DataFrame] = []
        skips: dict[int, list[SkippedFile]] = {}
        for (_, k), outcome in zip(wanted, outcomes):
            if isinstance(outcome, FileFailed):
                skip = self._leave_out(outcome)  # raises with the "fail" policies
                skips.setdefault(k, []).append(skip)
                continue
            frames.append(outcome.frame)
            self._report_columns(outcome)
            if outcome.bad:
                dead.extend(self._bad_records(outcome))
        for k, new in skips.items():
            record = SkippedFiles(files=[*recorded[k].values(), *new])
            self._log.write_model(f"{_SKIPPED_DIR}/{k}.json", record)
        for k in range(first, last + 1):
            for skip in [*recorded[k].values(), *skips.get(k, [])]:
                dead.extend(self._account(skip))
        if dead and self.spec.dead_letter is not None:
            self._side_output.emit(self.spec.dead_letter, pl.concat(dead, how="vertical"))
        if not frames:
            return pl.DataFrame(schema=self._schema)
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")

    def scan(self, start: Offset, end: Offset) -> ScannedBatch | None:
        """The files of log entries ``start + 1 .. end`` as one lazy parquet scan, for the
        engine to run with the stage reading the source (:mod:`connectors._fused_scan`),
        or None: :meth:`read` reads the batch.

        Only a batch whose read has no effect beyond its rows is scanned: parquet on the
        local disk, every policy ``"fail"`` (nothing recorded as skipped, no dead letters),
        no file recorded as left out by an earlier run, at least
        :data:`~connectors._fused_scan.FUSED_SCAN_MIN_BYTES` of files, and every file's
        footer matching the schema exactly. The read-ahead is dropped (its files would be
        decoded twice); ``read`` starts it again when a batch is read eagerly.
        """
        spec = self.spec
        if spec.format != "parquet" or not self._dir.is_local:
            return None
        if (spec.on_bad_file, spec.on_missing_file, spec.on_bad_record) != ("fail",) * 3:
            return None
        first = file_offset(start, "read from").log_index + 1
        last = file_offset(end, "read to").log_index
        if last < first or last > self._last_logged:
            return None  # nothing to read, or an error that read() reports
        files = [logged for k in range(first, last + 1) for logged in self._entry(k).files]
        if sum(f.size for f in files) < FUSED_SCAN_MIN_BYTES:
            return None
        if any(self._recorded_skips(k) for k in range(first, last + 1)):
            return None
        scanned = scan_parquet_files(
            [self._dir.path(f.name) for f in files], spec.schema, self._schema
        )
        if scanned is None:
            return None
        self._read_ahead.discard()
        frame, rows = scanned
        return ScannedBatch(frame, rows, lambda: self.read(start, end))

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(
                max_workers=_READ_THREADS, thread_name_prefix="microstream-files"
            )
        return self._pool

    def _upcoming(self, last: int) -> list[tuple[LoggedFile, int]]:
        """The files the batches after log entry ``last`` will take, as far as known now,
        in order: the logged entries' after it, then the last listing's files left for
        later (their log index a guess, for messages only), up to the read-ahead bound
        in listed sizes (no more can be read ahead)."""
        files = [
            (f, k) for k in range(last + 1, self._last_logged + 1) for f in self._entry(k).files
        ]
        limit = self.spec.max_files_per_trigger or 1
        later = self._unlogged[:_READ_AHEAD_FILES]  # a long backlog: only what can be planned
        files += [(f, self._last_logged + 1 + n // limit) for n, f in enumerate(later)]
        budget = self.spec.read_ahead_bytes
        for n, (logged, _) in enumerate(files):
            budget -= logged.size
            if budget < 0 or n >= _READ_AHEAD_FILES:
                return files[: max(n, 1)]
        return files

    def _entry(self, k: int) -> FileLogEntry:
        entry = self._entries.get(k)
        if entry is None:
            entry = self._log.read_model(f"{k}.json", FileLogEntry)
            self._entries[k] = entry
        return entry

    def _recorded_skips(self, k: int) -> dict[str, SkippedFile]:
        name = f"{_SKIPPED_DIR}/{k}.json"
        if not self._log.exists(name):
            return {}
        return {f.name: f for f in self._log.read_model(name, SkippedFiles).files}

    def _read_file(self, logged: LoggedFile, k: int) -> FileRead | FileFailed:
        """Read one file; what went wrong comes back as a :class:`FileFailed`."""
        entry = self._log.display(f"{k}.json")
        return read_logged_file(self._dir, self.spec, self._schema, logged, entry)

    def plan_splits(self, start: Offset, end: Offset) -> list[FileSplit] | None:
        """The files of ``(start, end]`` in splits other processes read
        (:mod:`connectors._file_splits`), or None: read on the driver (a policy other
        than "fail", or a file of the range recorded as left out)."""
        first = file_offset(start, "read from").log_index + 1
        last = file_offset(end, "read to").log_index
        if last < first or last > self._last_logged:
            return None  # nothing to read, or an error that read() reports
        if any(self._recorded_skips(k) for k in range(first, last + 1)):
            return None
        files = [
            (logged, self._log.display(f"{k}.json"))
            for k in range(first, last + 1)
            for logged in self._entry(k).files
        ]
        splits = plan_file_splits(self.spec, self.description, self._schema, files)
        # The next batch's files as far as known, for a reader in another process to read
        # ahead (it uses them only if that batch's splits are these: the log decides).
        ahead = [
            (f, self._log.display(f"{k}.json")) for f, k in self._upcoming(last) if k == last + 1
        ]
        if splits and ahead and self.spec.read_ahead_bytes:
            nxt = plan_file_splits(self.spec, self.description, self._schema, ahead) or []
            splits[-1] = replace(splits[-1], ahead=tuple(nxt))
        return splits

    def _leave_out(self, failed: FileFailed) -> SkippedFile:
        """The record of a file left out by policy; raise under the "fail" policies."""
        spec = self.spec
        policy = spec.on_missing_file if failed.missing else spec.on_bad_file
        if policy == "fail":
            raise fail_error(failed, spec, self.description)
        return SkippedFile(
            name=failed.logged.name,
            size=failed.logged.size,
            reason=failed.reason,
            missing=failed.missing,
            dead_letter=policy == "dead_letter",
        )

    def _account(self, skip: SkippedFile) -> list[pl.DataFrame]:
        """Count, log and name a file left out; its dead-letter row if it has one."""
        shown = self._dir.display(skip.name)
        self._skipped_names.append(shown)
        if skip.dead_letter and self.spec.dead_letter is not None:
            self._count("files_dead_lettered")
            self._logger.warning(
                "%s: file %s sent to dead_letter: %s", self.description, shown, skip.reason
            )
            row = {"path": shown, "size": skip.size, "line": None, "value": None}
            return [pl.DataFrame([{**row, "reason": skip.reason}], schema=DEAD_LETTER_SCHEMA)]
        self._count("files_skipped_missing" if skip.missing else "files_skipped_bad")
        self._logger.warning("%s: skipped file %s: %s", self.description, shown, skip.reason)
        return []

    def _bad_records(self, read: FileRead) -> list[pl.DataFrame]:
        """Apply ``on_bad_record`` to a file's bad records; their dead-letter rows."""
        first = read.bad[0]
        if self.spec.on_bad_record == "fail":
            raise bad_record_error(read, self.description)
        if self.spec.on_bad_record == "skip":
            self._count("bad_records_skipped", len(read.bad))
            self._logger.warning(
                "%s: skipped %d bad record(s) of file %s; the first at line %d: %s",
                self.description,
                len(read.bad),
                read.shown,
                first.line,
                first.reason,
            )
            return []
        self._count("bad_records_dead_lettered", len(read.bad))
        return [
            pl.DataFrame(
                {
                    "path": [read.shown] * len(read.bad),
                    "size": [read.logged.size] * len(read.bad),
                    "line": [b.line for b in read.bad],
                    "value": [b.value for b in read.bad],
                    "reason": [b.reason for b in read.bad],
                },
                schema=DEAD_LETTER_SCHEMA,
            )
        ]

    def _report_columns(self, read: FileRead) -> None:
        """Log each column a file has beyond the schema once (``extra_columns="ignore"``)."""
        for column in read.extra_columns:
            key = f"column:{column}"
            if key in self._reported:
                continue
            self._reported.add(key)
            self._count("new_columns_ignored")
            self._logger.warning(
                "%s: column %r of file %s is not in the source schema and is not read "
                "(extra_columns='ignore'; reported once). To read it, add it to schema= "
                "(with missing_columns='insert' for the files without it) and restart",
                self.description,
                column,
                read.shown,
            )

    # -- clean-up --------------------------------------------------------------------------

    def commit(self, end: Offset) -> None:
        """Delete or archive the files of log entries up to ``end`` (``clean_source``)."""
        last = file_offset(end, "commit").log_index
        if self.spec.clean_source == "off" or last <= self._cleaned:
            return
        for k in range(self._cleaned + 1, min(last, self._last_logged) + 1):
            # A file left out as bad stays where it is, for whoever repairs or inspects it.
            left_out = self._recorded_skips(k)
            for logged in self._entry(k).files:
                if logged.name not in left_out:
                    self._clean(logged)
        self._cleaned = min(last, self._last_logged)
        try:
            self._log.write_model(_CLEANED_FILE, Cleaned(up_to=self._cleaned))
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
        self._read_ahead.close()
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- listing ---------------------------------------------------------------------------

    def _new_files(self) -> list[LoggedFile]:
        listing = list_files(self._dir, self._selection, seen=self._seen, known=self._listed)
        self._listed = {f.name: f for f in listing.files}
        if listing.missing and not self._waiting_reported:
            self._waiting_reported = True
            self._logger.warning(
                "%s: the source directory %s does not exist (yet); waiting for it "
                "(wait_for_path=True)",
                self.description,
                self._dir.url,
            )
        for name in listing.ignored:
            if name in self._reported:
                continue
            self._reported.add(name)
            self._count("files_ignored")
            self._logger.warning(
                "%s: ignoring file %s: its name does not match %s, the names of %s files. "
                "Pass glob= (or a glob in path) to take it; producers should write under a "
                "name starting with '.' or '_' and rename when done",
                self.description,
                self._dir.display(name),
                " or ".join(self._selection.default_globs),
                self.spec.format,
            )
        return listing.files
