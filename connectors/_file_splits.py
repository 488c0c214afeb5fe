"""The file source's batches in parts: files read by other processes (``SplittableSource``).

A batch of the file source is the files of its log entries. :func:`plan_file_splits`
groups them, in log order, into :class:`FileSplit` s of about
:data:`SPLIT_BYTES` each (a file is never cut); a split carries the spec, the
columns read and the files, and reads them in any process with :func:`read_logged_file`,
the function the source's own ``read`` uses, so the rows, dtypes and errors are the same.

Only ranges whose read needs nothing of the driver are split: every policy is
``"fail"`` (a bad or missing file, a bad record fail the query with the error
``read`` raises, naming the file) and no file of the range was recorded as left
out. Under ``"skip"`` or ``"dead_letter"`` the read records skipped files in the
checkpoint, counts them for progress and emits dead-letter rows: such a range is
read on the driver, as always. A column a file has beyond the schema
(``extra_columns="ignore"``) is logged by the process that read the file and is not
counted in the driver's ``new_columns_ignored``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from connectors._file_reading import (
    PANIC,
    FileFailed,
    FileRead,
    conform,
    fail_error,
    first_line,
    read_frame,
)
from connectors._paths import DataDir
from connectors._prefetch import file_version
from connectors._small_files import local_source
from microstream.exceptions import SchemaMismatchError, SourceError

if TYPE_CHECKING:
    from connectors._file_listing import LoggedFile
    from connectors.files import FileSourceSpec

__all__ = [
    "SPLIT_BYTES",
    "FileSplit",
    "bad_record_error",
    "plan_file_splits",
    "read_logged_file",
]

SPLIT_BYTES = 32 * 1024 * 1024
"""A split takes files (in log order) until they hold this many bytes: small files share
a task, a large file has one of its own."""

logger = logging.getLogger("microstream")


def read_logged_file(
    directory: DataDir, spec: FileSourceSpec, schema: pl.Schema, logged: LoggedFile, entry: str
) -> FileRead | FileFailed:
    """Read one file of ``directory`` (``entry``: its source log entry, for messages);
    what went wrong comes back as a :class:`FileFailed`."""
    shown = directory.display(logged.name)
    where = f"file {shown} (source log entry {entry})"
    try:
        if directory.is_local:
            local = local_source(directory.path(logged.name), logged.size, spec.format)
            parsed = read_frame(local, spec, schema, shown)
        else:
            with directory.fs.open(directory.path(logged.name), "rb") as fh:
                parsed = read_frame(fh, spec, schema, shown)
        frame = conform(parsed.frame, schema, shown, spec.missing_columns)
    except SchemaMismatchError as exc:
        return FileFailed(logged, where, str(exc), missing=False, error=exc)
    except FileNotFoundError as exc:
        return FileFailed(logged, where, "the file no longer exists", missing=True, error=exc)
    except PANIC as exc:
        if not directory.fs.exists(directory.path(logged.name)):
            return FileFailed(logged, where, "the file no longer exists", missing=True, error=exc)
        reason = f"cannot read it as {spec.format}: {first_line(exc)}"
        return FileFailed(logged, where, reason, missing=False, error=exc)
    return FileRead(logged, shown, frame, parsed.bad, parsed.extra_columns)


def bad_record_error(read: FileRead, description: str) -> SourceError:
    """The error of a file with bad records under ``on_bad_record="fail"``."""
    first = read.bad[0]
    more = f" (and {len(read.bad) - 1} more in this file)" if len(read.bad) > 1 else ""
    msg = (
        f"{description}: bad record in file {read.shown} line {first.line}: "
        f"{first.reason}{more}. Fix the file, or restart the query with "
        "on_bad_record='skip' or 'dead_letter' to leave such records out"
    )
    return SourceError(msg)


@dataclass(frozen=True)
class FileSplit:
    """Files of one batch of a file source, read together by one process.

    Examples
    --------
    >>> import polars as pl
    >>> from connectors._file_listing import LoggedFile
    >>> from connectors.files import FileSourceSpec
    >>> import fsspec
    >>> with fsspec.open("memory://doctest-file-split/a.csv", "wb") as fh:
    ...     pl.DataFrame({"id": [1, 2]}).write_csv(fh)
    >>> spec = FileSourceSpec(
    ...     "memory://doctest-file-split", format="csv", schema={"id": pl.Int64}
    ... )
    >>> files = ((LoggedFile(name="a.csv", size=7, mtime=0.0), "0.json"),)
    >>> FileSplit(spec, spec.describe(), spec.schema, files).read()["id"].to_list()
    [1, 2]
    """

    spec: FileSourceSpec
    description: str
    schema: pl.Schema
    """The columns read (the query's projection)."""
    files: tuple[tuple[LoggedFile, str], ...]
    """Each file and the source log entry that took it (for messages), in log order."""
    ahead: tuple[FileSplit, ...] = field(default=(), compare=False)
    """The splits the next batch will take as far as the source knows now (planned as
    that batch will plan them), for a reader to read ahead; not part of the split."""

    def version(self) -> Hashable | None:
        """What identifies the files' content now (:func:`file_version` of each), None
        when one is gone: a reader ahead uses its read only if this did not change."""
        directory = DataDir.resolve(self.spec.directory, self.spec.storage_options)
        versions = tuple(file_version(directory, logged.name) for logged, _ in self.files)
        return None if None in versions else versions

    def read(self) -> pl.DataFrame:
        """The files' rows in order, as ``FileSource.read`` gives them.

        Raises
        ------
        SourceError
            A file is gone, unreadable, or has a bad record (naming the file).
        SchemaMismatchError
            A file's columns do not match the schema.
        """
        directory = DataDir.resolve(self.spec.directory, self.spec.storage_options)
        frames = []
        reported: set[str] = set()
        for logged, entry in self.files:
            outcome = read_logged_file(directory, self.spec, self.schema, logged, entry)
            if isinstance(outcome, FileFailed):
                raise fail_error(outcome, self.spec, self.description)
            if outcome.bad:
                raise bad_record_error(outcome, self.description)
            for column in set(outcome.extra_columns) - reported:
                reported.add(column)
                logger.warning(
                    "%s: column %r of file %s is not in the source schema and is not read "
                    "(extra_columns='ignore')",
                    self.description,
                    column,
                    outcome.shown,
                )
            frames.append(outcome.frame)
        if not frames:
            return pl.DataFrame(schema=self.schema)
        return frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")


def plan_file_splits(
    spec: FileSourceSpec,
    description: str,
    schema: pl.Schema,
    files: list[tuple[LoggedFile, str]],
    *,
    split_bytes: int = SPLIT_BYTES,
) -> list[FileSplit] | None:
    """``files`` (each with its log entry, in log order) in splits of about
    ``split_bytes``, or None when the spec's policies need the driver (module docstring).

    Examples
    --------
    >>> import polars as pl
    >>> from connectors._file_listing import LoggedFile
    >>> from connectors.files import FileSourceSpec
    >>> spec = FileSourceSpec("memory://doctest-plan-splits", format="csv", schema={"id": pl.Int64})
    >>> files = [(LoggedFile(name=f"{n}.csv", size=10, mtime=0.0), "0.json") for n in range(5)]
    >>> [len(s.files) for s in plan_file_splits(spec, "files", spec.schema, files, split_bytes=20)]
    [2, 2, 1]
    >>> skipping = FileSourceSpec(
    ...     "memory://doctest-plan-splits", format="csv", schema={"id": pl.Int64},
    ...     on_bad_file="skip",
    ... )
    >>> plan_file_splits(skipping, "files", spec.schema, files) is None
    True
    """
    if (spec.on_bad_file, spec.on_missing_file, spec.on_bad_record) != ("fail", "fail", "fail"):
        return None
    shipped = copy.copy(spec)
    # Only read with the "dead_letter" policies: a function given there need not pickle.
    object.__setattr__(shipped, "dead_letter", None)
    groups: list[list[tuple[LoggedFile, str]]] = []
    size = split_bytes
    for item in files:
        if size >= split_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += item[0].size
    return [FileSplit(shipped, description, schema, tuple(group)) for group in groups]
