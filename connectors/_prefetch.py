"""Read-ahead for the file source: the next batch's files, read while this batch runs.

After a batch's files are read, the source already knows which files come next
when its last listing found more than one trigger takes (``max_files_per_trigger``)
or when log entries past the batch exist (a restart re-forming logged batches).
:class:`ReadAhead` reads those on the source's read threads while the engine
computes, writes and commits the batch, so the next ``read`` finds them done.

Prefetching never changes what a batch reads: a prefetched file is used only
when the log entry of the batch names it with the same size and modification
time the prefetch was started for (the source log is the authority, written
before the batch reads). Anything else is discarded unused, and a file whose
prefetch failed is read again by the batch, which reports its error exactly as
without read-ahead (policies, messages and skip records are the batch's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from connectors._file_listing import LoggedFile
from connectors._file_reading import FileFailed, FileRead

__all__ = ["READ_AHEAD_BYTES", "ReadAhead"]

READ_AHEAD_BYTES = 256 * 1024 * 1024
"""At most this many bytes of files (their listed sizes) are read ahead at once."""

Outcome = FileRead | FileFailed
Submit = Callable[[Callable[[], Outcome]], "Future[Outcome]"]


@dataclass
class ReadAhead:
    """Files of the next batch, read in the background; taken only when they match.

    Parameters
    ----------
    read
        Reads one file (the source's own reader: ``(file, log_index)`` to an
        outcome that never raises for a bad file).
    submit
        Runs a read on the source's read threads and returns its future.
    max_bytes
        Bound on the listed sizes of the files read ahead at once.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> import polars as pl
    >>> f = LoggedFile(name="a.parquet", size=10, mtime=1.0)
    >>> def read(logged, k):
    ...     return FileRead(logged, logged.name, pl.DataFrame({"x": [k]}), [], ())
    >>> with ThreadPoolExecutor(1) as pool:
    ...     ahead = ReadAhead(read, pool.submit)
    ...     ahead.start([(f, 3)])
    ...     taken = ahead.take(f)
    >>> taken.frame["x"].to_list(), ahead.used, ahead.discarded
    ([3], 1, 0)
    >>> ahead.take(f) is None  # taken once
    True
    """

    read: Callable[[LoggedFile, int], Outcome]
    submit: Submit
    max_bytes: int = READ_AHEAD_BYTES
    used: int = 0
    """Files a batch took from the read-ahead (since the source was built)."""
    discarded: int = 0
    """Files read ahead that no batch took as they were (another file, size, mtime;
    or the prefetch failed and the batch read the file itself)."""
    _pending: dict[str, tuple[LoggedFile, Future[Outcome]]] = field(default_factory=dict)

    def start(self, files: Sequence[tuple[LoggedFile, int]]) -> None:
        """Read ``files`` (each with the log index it is expected in) in the background.

        Earlier prefetches not taken are discarded first. Files are taken in
        order until their listed sizes would pass ``max_bytes`` (the first file
        always counts, however large: the batch reads it anyway).
        """
        self.discard()
        budget = self.max_bytes
        for logged, k in files:
            if self._pending and logged.size > budget:
                break
            budget -= logged.size
            future = self.submit(lambda logged=logged, k=k: self.read(logged, k))  # type: ignore[misc]
            self._pending[logged.name] = (logged, future)

    def take(self, logged: LoggedFile) -> FileRead | None:
        """The prefetched read of exactly ``logged`` (name, size, mtime), or ``None``.

        Waits for a prefetch still running rather than reading the file twice.
        A failed prefetch gives ``None``: the caller reads the file again and
        reports what goes wrong then.
        """
        pending = self._pending.pop(logged.name, None)
        if pending is None:
            return None
        expected, future = pending
        if expected != logged:
            self._drop(future)
            return None
        try:
            outcome = future.result()
        except BaseException:  # cancelled by a stop, or a reader bug: read it again
            self.discarded += 1
            return None
        if isinstance(outcome, FileFailed):
            self.discarded += 1
            return None
        self.used += 1
        return outcome

    def discard(self) -> None:
        """Drop every prefetch not taken (a running read finishes and is ignored)."""
        pending, self._pending = self._pending, {}
        for _, future in pending.values():
            self._drop(future)

    def _drop(self, future: Future[Outcome]) -> None:
        future.cancel()
        self.discarded += 1
