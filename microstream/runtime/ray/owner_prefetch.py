"""Read-ahead in an owner that reads its source: the next batch's splits, read while
the batch runs.

An owner that reads a source's splits itself (:mod:`~microstream.runtime.ray.owner_reads`)
gets them in its call of the batch, so without more it reads every batch's files while
the driver waits (4-15 ms per 100k-event parquet file on one machine), where the driver
of a local query takes a file its source read ahead (``connectors/_prefetch.py``). A
source whose splits know what the next batch will take (a split with ``ahead``: the file
source puts the files its last listing or its log has for the next batch there,
planned exactly as that batch will plan them) lets the owner read those on a thread
of its own once its operator ran (started earlier, the read competed with the operator
for the two cores of the benchmark machine and made q11's calls slower): while the rows
go back and the driver writes, commits and plans the next batch.

Read-ahead never changes what a batch reads. A prefetched read is used only when the
next call's splits for that stage are exactly (``==``) the ones read ahead, and only
when every split's content ``version()`` (for files: inode, size, modification and
change times, or the object store's size, time and ETag) was the same before the read,
after it and when the batch takes it; anything else is dropped unused and the batch
reads its splits itself, so a file rewritten or deleted after its read-ahead, and every
error, is what the batch's own read sees and reports (naming the split's file). A
split without ``version()`` is never read ahead. Nothing of it is state: an owner
replaced after a loss starts with nothing read ahead and reads its splits itself.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import polars as pl

    from microstream.protocols import ReadSplit

__all__ = ["OwnerReadAhead", "VersionedSplit", "next_splits"]


@runtime_checkable
class VersionedSplit(Protocol):
    """A split whose content can be identified without reading it (read ahead only then)."""

    def read(self) -> pl.DataFrame: ...

    def version(self) -> Hashable | None:
        """What identifies the split's content now; None when part of it is gone."""
        ...


def next_splits(splits: Sequence[ReadSplit]) -> tuple[VersionedSplit, ...]:
    """The splits the source expects the batch after ``splits`` to take (each split's
    ``ahead``, in order), or nothing when one of them cannot be versioned.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Split:
    ...     name: str
    ...     ahead: tuple = ()
    ...     def read(self): ...
    ...     def version(self): return self.name
    >>> next_splits([Split("a"), Split("b", ahead=(Split("c"),))])
    (Split(name='c', ahead=()),)
    >>> next_splits([Split("a")])
    ()
    """
    ahead = tuple(s for split in splits for s in getattr(split, "ahead", ()))
    if not all(isinstance(s, VersionedSplit) for s in ahead):
        return ()
    return ahead


@dataclass
class _Pending:
    splits: tuple[VersionedSplit, ...]
    future: Future[tuple[list[pl.DataFrame], list[Hashable | None]]]


class OwnerReadAhead:
    """One owner's reads ahead, at most one per stage it reads the source of.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> import polars as pl
    >>> @dataclass(frozen=True)
    ... class Split:
    ...     n: int
    ...     def read(self): return pl.DataFrame({"n": [self.n]})
    ...     def version(self): return "v1"
    >>> ahead = OwnerReadAhead()
    >>> ahead.start(0, (Split(2),))
    >>> ahead.read(0, (Split(3),))[0]["n"].to_list()  # not what was read ahead: read now
    [3]
    >>> ahead.hits, ahead.misses
    (0, 1)
    >>> ahead.start(0, (Split(4),))
    >>> ahead.read(0, (Split(4),))[0]["n"].to_list()
    [4]
    >>> ahead.hits
    1
    >>> ahead.close()
    """

    def __init__(self) -> None:
        self._pending: dict[int, _Pending] = {}
        self._deferred: dict[int, tuple[VersionedSplit, ...]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.hits = 0
        """Reads a batch took from the read-ahead (tests)."""
        self.misses = 0
        """Reads ahead dropped: another split, a changed version, or a failed read."""

    def read(self, stage: int, splits: Sequence[ReadSplit]) -> list[pl.DataFrame]:
        """The rows of ``splits`` (stage ``stage``'s batch), one frame per split: what was
        read ahead for them if it is exactly these splits at the same version, else read
        now. A read ahead of other splits for the stage is dropped."""
        with self._lock:
            pending = self._pending.pop(stage, None)
        if pending is not None:
            taken = _taken(pending, splits)
            if taken is not None:
                self.hits += 1
                return taken
            self.misses += 1
        return [split.read() for split in splits]

    def defer(self, stage: int, splits: tuple[VersionedSplit, ...]) -> None:
        """Read ``splits`` ahead for stage ``stage`` at :meth:`start_deferred`: once the
        batch's operator ran, so the read does not compete with it for the cores (it
        overlaps the rows going back and the driver's sink, commit and next offsets)."""
        if splits:
            self._deferred[stage] = splits

    def start_deferred(self) -> None:
        """:meth:`start` what :meth:`defer` noted since the last call."""
        deferred, self._deferred = self._deferred, {}
        for stage, splits in deferred.items():
            self.start(stage, splits)

    def start(self, stage: int, splits: tuple[VersionedSplit, ...]) -> None:
        """Read ``splits`` (the source's guess of stage ``stage``'s next batch) on this
        owner's read-ahead thread; nothing when there are none."""
        if not splits:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="microstream-owner-ahead")
        future = self._pool.submit(_read_versioned, splits)
        with self._lock:
            self._pending[stage] = _Pending(splits, future)

    def close(self) -> None:
        """Drop every read ahead and stop the thread."""
        with self._lock:
            self._pending.clear()
        self._deferred.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def _read_versioned(
    splits: tuple[VersionedSplit, ...],
) -> tuple[list[pl.DataFrame], list[Hashable | None]]:
    """The splits' rows, and each one's version if it held from before to after the
    read (None where it changed or is gone: then the read is not used)."""
    before = [s.version() for s in splits]
    frames = [s.read() for s in splits]
    after = [s.version() for s in splits]
    return frames, [b if b == a else None for b, a in zip(before, after)]


def _taken(pending: _Pending, splits: Sequence[ReadSplit]) -> list[pl.DataFrame] | None:
    """``pending``'s rows when it read exactly ``splits`` and their content is still the
    one read; None otherwise (a failed read ahead too: the batch reads and reports)."""
    if tuple(splits) != pending.splits:
        return None
    try:
        frames, versions = pending.future.result()
    except Exception:  # the batch's own read raises it again, naming the file
        return None
    if any(v is None for v in versions):
        return None
    if [s.version() for s in pending.splits] != versions:
        return None
    return frames
