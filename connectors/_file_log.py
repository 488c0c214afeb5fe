"""The file source's log on disk: its offsets and records (``sources/<n>/``).

``<k>.json`` (:class:`FileLogEntry`) fixes the files of log entry ``k`` before
its batch runs; ``skipped/<k>.json`` (:class:`SkippedFiles`) the files that
batch left out; ``cleaned.json`` how far ``clean_source`` got. A
:class:`FileOffset` is a position in that log. The format is described in
``connectors/README.md``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from connectors._file_listing import LoggedFile
from microstream.exceptions import OffsetError
from microstream.protocols import Offset

__all__ = ["Cleaned", "FileLogEntry", "FileOffset", "SkippedFile", "SkippedFiles", "file_offset"]


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
        return self.log_index >= file_offset(other, "compare with").log_index

    def distance(self, other: Offset) -> int | None:
        """The number of source log entries (batches of files) from ``other`` to here."""
        return self.log_index - file_offset(other, "measure from").log_index


def file_offset(offset: Offset, action: str) -> FileOffset:
    if not isinstance(offset, FileOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a FileOffset"
        raise OffsetError(msg)
    return offset


class FileLogEntry(BaseModel):
    """Source log entry ``<k>.json``: the files one batch takes, in reading order."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: list[LoggedFile]


class SkippedFile(BaseModel):
    """A logged file a batch left out, and why (``skipped/<k>.json``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """Path relative to the source directory."""
    size: int
    reason: str
    missing: bool
    """Whether the file was gone (``on_missing_file``) rather than unreadable (``on_bad_file``)."""
    dead_letter: bool
    """Whether it was sent to ``dead_letter`` rather than skipped."""


class SkippedFiles(BaseModel):
    """``skipped/<k>.json``: the files of log entry ``k`` that were left out.

    Written before the batch's rows reach the sink, and read before the files
    of entry ``k`` are: a re-run of the batch leaves out the same files, even
    if one was repaired meanwhile.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    files: list[SkippedFile]


class Cleaned(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    up_to: int
    """The last log entry whose files were deleted or archived."""
