"""Read-ahead for the file source: the files of the next batches, read while a batch runs.

After a batch's files are read, the source already knows which files come next
when its last listing found more than one trigger takes (``max_files_per_trigger``)
or when log entries past the batch exist (a restart re-forming logged batches).
:class:`ReadAhead` reads those, in the order the batches will take them, on the
source's read threads while the engine computes, writes and commits: several
files at once (Polars releases the GIL), and as many batches ahead as
``read_ahead_bytes`` of decoded frames allow, so a batch of one file finds its
file read even when one read takes longer than one batch's other work.

Prefetching never changes what a batch reads. A prefetched file is used only
when the log entry of the batch names it with the same size and modification
time the prefetch was planned for (the source log is the authority, written
before the batch reads), and only when the file is still the one that was read:
its version (inode, size, modification and change times locally; size, time and
ETag on object stores) is taken before and after the read and again when the
batch takes it. A file deleted or rewritten after its read-ahead is read by the
batch itself, which then sees exactly what it would have seen without
read-ahead (``on_missing_file`` for a deleted file, the new rows of a rewritten
one). Anything else is discarded unused, and a file whose prefetch failed is
read again by the batch, which reports its error exactly as without read-ahead
(policies, messages and skip records are the batch's).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from connectors._file_listing import LoggedFile
from connectors._file_reading import FileFailed, FileRead
from connectors._paths import DataDir, modified_time

__all__ = ["READ_AHEAD_BYTES", "ReadAhead", "file_version"]

READ_AHEAD_BYTES = 128 * 1024 * 1024
"""The default bound on the bytes read ahead and not yet taken by a batch."""

Outcome = FileRead | FileFailed
Version = Callable[[LoggedFile], Hashable | None]
_Read = tuple[Outcome, Hashable | None, Hashable | None]
Submit = Callable[[Callable[[], _Read]], "Future[_Read]"]


def file_version(directory: DataDir, name: str) -> Hashable | None:
    """What identifies the content of file ``name`` of ``directory`` now; None if it is gone.

    Locally the inode, size, and modification and change times in nanoseconds
    (a rename over the file or a rewrite changes one of them); elsewhere the
    size, modification time and ETag fsspec reports.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> root = tempfile.mkdtemp()
    >>> _ = (pathlib.Path(root) / "a.csv").write_text("x\\n1\\n")
    >>> directory = DataDir.resolve(root, None)
    >>> file_version(directory, "a.csv") == file_version(directory, "a.csv")
    True
    >>> file_version(directory, "gone.csv") is None
    True
    """
    path = directory.path(name)
    try:
        if directory.is_local:
            info = os.stat(path)
            return (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        remote = directory.fs.info(path)
    except FileNotFoundError:
        return None
    return (remote.get("size"), modified_time(remote), remote.get("ETag", remote.get("etag")))


@dataclass
class _Ahead:
    """One file planned to be read ahead; ``future`` once its read was started."""

    logged: LoggedFile
    index: int
    future: Future[_Read] | None = None
    held: int = 0
    """Bytes counted against the bound: the file's size (scaled by the decoded/file size
    ratio seen so far) while it is read, then its frame's size."""


class ReadAhead:
    """Files of the next batches, read in the background; taken only when they match.

    Parameters
    ----------
    read
        Reads one file (the source's own reader: ``(file, log_index)`` to an
        outcome that never raises for a bad file).
    submit
        Runs a job on the source's read threads and returns its future.
    max_bytes
        Bound on the bytes read ahead and not taken yet: a read frame counts its
        size in memory, a read still running its file's size times the largest
        ratio of frame to file size seen so far (at least 1). One file is always
        read ahead, however large (the batch reads it anyway); ``0`` reads
        nothing ahead.
    max_running
        At most this many reads ahead at once (the read threads: a batch's own
        reads then never queue behind more than one round of them).
    version
        The current version of a file (:func:`file_version`), or None when
        files are not checked for changes after their read (only where they
        cannot change).
    recheck_on_take
        Also compare the version when a batch takes the file (a ``stat``
        locally). Off for object stores, where it would be one request per
        file on the batch's path: there a file is checked before and after
        its read, on the read thread.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> import polars as pl
    >>> files = [LoggedFile(name=f"{i}.parquet", size=10, mtime=1.0) for i in range(3)]
    >>> def read(logged, k):
    ...     return FileRead(logged, logged.name, pl.DataFrame({"x": [k]}), [], ())
    >>> with ThreadPoolExecutor(2) as pool:
    ...     ahead = ReadAhead(read, pool.submit)
    ...     ahead.start([(f, k) for k, f in enumerate(files)])  # three batches ahead
    ...     taken = [ahead.take(f).frame["x"].item() for f in files]
    >>> taken, ahead.used, ahead.discarded
    ([0, 1, 2], 3, 0)
    >>> ahead.take(files[0]) is None  # taken once
    True
    """

    def __init__(
        self,
        read: Callable[[LoggedFile, int], Outcome],
        submit: Submit,
        *,
        max_bytes: int = READ_AHEAD_BYTES,
        max_running: int = 2,
        version: Version | None = None,
        recheck_on_take: bool = True,
    ) -> None:
        self._read = read
        self._submit = submit
        self.max_bytes = max_bytes
        self.max_running = max_running
        self._version = version
        self._recheck_on_take = recheck_on_take
        self.used = 0
        """Files a batch took from the read-ahead (since the source was built)."""
        self.discarded = 0
        """Files read ahead that no batch took as they were (another file, size or mtime;
        changed or deleted since its read; or the prefetch failed and the batch read the
        file itself)."""
        self._ratio = 1.0  # the largest decoded/file size ratio seen
        self._planned: dict[str, _Ahead] = {}  # in the order the batches take them
        self._closed = False
        self._filling = False  # a read that ends at once calls _fill from within _fill
        # Reads finish on the read threads and start the next ones from there.
        self._lock = threading.RLock()

    def start(self, files: Sequence[tuple[LoggedFile, int]]) -> None:
        """Plan ``files`` (each with the log index it is expected in, in the order the
        next batches take them) and read them ahead as the bound allows.

        A file already read ahead for the same name, size and mtime is kept;
        earlier prefetches not in ``files`` are discarded.
        """
        with self._lock:
            if self._closed:
                return
            before, self._planned = self._planned, {}
            for logged, k in files:
                kept = before.pop(logged.name, None)
                if kept is not None and kept.logged == logged:
                    self._planned[logged.name] = kept
                else:
                    if kept is not None:
                        before[logged.name] = kept  # dropped below
                    self._planned[logged.name] = _Ahead(logged, k)
            for stale in before.values():
                self._drop(stale)
            self._fill()

    def planned(self) -> list[str]:
        """The names of the files whose reads ahead were started and not taken, in order."""
        with self._lock:
            return [a.logged.name for a in self._planned.values() if a.future is not None]

    def finished(self) -> list[str]:
        """The names of the files read ahead whose reads ended (well or not), not taken yet."""
        with self._lock:
            return [
                a.logged.name
                for a in self._planned.values()
                if a.future is not None and a.future.done()
            ]

    def held_bytes(self) -> int:
        """The bytes the files read ahead (or being read) count against ``max_bytes``."""
        with self._lock:
            return sum(a.held for a in self._planned.values() if a.future is not None)

    def take(self, logged: LoggedFile) -> FileRead | None:
        """The prefetched read of exactly ``logged`` (name, size, mtime), or ``None``.

        Waits for a prefetch still running rather than reading the file twice.
        A failed prefetch, or a file changed or deleted since it was read, gives
        ``None``: the caller reads the file again and reports what goes wrong then.
        """
        with self._lock:
            ahead = self._planned.pop(logged.name, None)
            self._fill()  # its bytes are the batch's now
        if ahead is None or ahead.future is None:
            return None  # never started: nothing was read
        if ahead.logged != logged:
            self._drop(ahead)
            return None
        try:
            outcome, before, after = ahead.future.result()
        except BaseException:  # cancelled by a stop, or a reader bug: read it again
            self.discarded += 1
            return None
        if isinstance(outcome, FileFailed) or not self._unchanged(logged, before, after):
            self.discarded += 1
            return None
        self.used += 1
        return outcome

    def discard(self) -> None:
        """Drop every prefetch not taken, and the plan (a running read finishes, ignored)."""
        with self._lock:
            planned, self._planned = self._planned, {}
        for ahead in planned.values():
            self._drop(ahead)

    def close(self) -> None:
        """Discard everything and start no read from now on (the read threads stop)."""
        with self._lock:
            self._closed = True
        self.discard()

    def _unchanged(self, logged: LoggedFile, before: Hashable, after: Hashable) -> bool:
        """Whether the file read is the one there now: the same version before and after
        the read, and now."""
        if self._version is None:
            return True
        if before is None or before != after:
            return False
        if not self._recheck_on_take:
            return True
        try:
            return self._version(logged) == after
        except Exception:  # cannot tell (a permission, a store's error): the batch reads it
            return False

    def _drop(self, ahead: _Ahead) -> None:
        if ahead.future is None:
            return  # only planned: nothing was read
        ahead.future.cancel()
        self.discarded += 1

    def _fill(self) -> None:
        """Start the planned reads, in order, that the bounds allow (under the lock)."""
        if self._closed or self._filling or self.max_bytes <= 0:
            return
        self._filling = True
        try:
            self._fill_in_order()
        finally:
            self._filling = False

    def _fill_in_order(self) -> None:
        started = [a for a in self._planned.values() if a.future is not None]
        running = sum(1 for a in started if a.future is not None and not a.future.done())
        held = sum(a.held for a in started)
        for ahead in self._planned.values():
            if ahead.future is not None:
                continue
            if running >= self.max_running:
                return
            cost = int(ahead.logged.size * self._ratio)
            if started and held + cost > self.max_bytes:
                return
            try:
                future = self._submit(lambda ahead=ahead: self._job(ahead))  # type: ignore[misc]
            except RuntimeError:  # the read threads were shut down
                self._closed = True
                return
            ahead.future, ahead.held = future, cost
            started.append(ahead)
            running += 1
            held += cost
            # By name, not by the entry: the entry holds the future, and a cycle through
            # it would keep a taken frame alive until the garbage collector runs.
            name = ahead.logged.name
            future.add_done_callback(lambda f, name=name: self._finished(name, f))  # type: ignore[misc]

    def _job(self, ahead: _Ahead) -> _Read:
        logged = ahead.logged
        before = None if self._version is None else self._version(logged)
        outcome = self._read(logged, ahead.index)
        after = None if self._version is None else self._version(logged)
        return outcome, before, after

    def _finished(self, name: str, future: Future[_Read]) -> None:
        """A read ahead ended (on a read thread): count its frame, start the next reads."""
        size = 0
        if not future.cancelled() and future.exception() is None:
            outcome = future.result()[0]
            if isinstance(outcome, FileRead):
                size = int(outcome.frame.estimated_size())
        with self._lock:
            ahead = self._planned.get(name)
            if ahead is not None and ahead.future is future:  # not taken or dropped yet
                if ahead.logged.size > 0 and size > 0:
                    self._ratio = max(self._ratio, size / ahead.logged.size)
                ahead.held = max(size, ahead.logged.size)
            self._fill()  # a read thread is free
