"""Which files the file source takes: listing a directory, the format's default globs.

A listing returns the new files (not yet in the source's log) that the
selection takes, sorted by the caller; hidden files (leading ``.`` or ``_``)
are never taken, and files the format's default extensions exclude are
reported rather than silently passed over.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Container, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict

from connectors._paths import DataDir, glob_regex, modified_time
from microstream.exceptions import SourceError

__all__ = ["DEFAULT_GLOBS", "Listing", "LoggedFile", "Selection", "list_files"]

DEFAULT_GLOBS: dict[str, tuple[str, ...]] = {
    "parquet": ("*.parquet",),
    "csv": ("*.csv",),
    "ndjson": ("*.ndjson", "*.jsonl", "*.json"),
    "ipc": ("*.arrow", "*.ipc", "*.feather"),
}
"""The names a format's files have; others are ignored (and reported) unless ``glob`` is given."""


class LoggedFile(BaseModel):
    """One file taken by the source, as recorded in its log."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """Path relative to the source directory."""
    size: int
    mtime: float


@dataclass(frozen=True)
class Selection:
    """Which listed files the source takes (hidden ones never)."""

    recursive: bool
    name_glob: str | None
    """``glob=``: a pattern on the file's own name."""
    path_glob: re.Pattern[str] | None
    """The glob of ``path``: a pattern on the path relative to the directory."""
    default_globs: tuple[str, ...]
    """The format's extensions, when neither glob is given; other files are reported."""

    @classmethod
    def of(cls, fmt: str, glob: str | None, pattern: str | None, recursive: bool) -> Selection:
        return cls(
            recursive=recursive or (pattern is not None and ("/" in pattern or "**" in pattern)),
            name_glob=glob,
            path_glob=None if pattern is None else glob_regex(pattern),
            default_globs=DEFAULT_GLOBS[fmt] if glob is None and pattern is None else (),
        )

    def verdict(self, name: str, base: str) -> Literal["take", "pass", "ignore"]:
        """``take``; ``pass`` over a file the user's globs exclude; ``ignore`` (and report)
        a file the format's default extensions exclude."""
        if self.name_glob is not None and not fnmatch.fnmatchcase(base, self.name_glob):
            return "pass"
        if self.path_glob is not None and not self.path_glob.fullmatch(name):
            return "pass"
        if self.default_globs and not any(
            fnmatch.fnmatchcase(base.lower(), g) for g in self.default_globs
        ):
            return "ignore"
        return "take"


@dataclass(frozen=True)
class Listing:
    files: list[LoggedFile]
    """New files the source takes."""
    ignored: list[str] = field(default_factory=list)
    """Names the format's default extensions exclude."""
    missing: bool = False
    """Whether the directory does not exist."""


def list_files(
    directory: DataDir,
    selection: Selection,
    *,
    seen: Container[str] = frozenset(),
    known: Mapping[str, LoggedFile] | None = None,
) -> Listing:
    """The visible files of ``directory`` (no hidden ones, as ``selection`` says) not in ``seen``.

    Names in ``seen`` are dropped before anything else is done with them: a
    file already taken is neither stat-ed nor described again, so a trigger
    costs a listing of names plus work for the new files only. A local file
    listed before (``known``: the previous listing's records) keeps that
    record, not stat-ed again: a backlog that ``max_files_per_trigger`` takes
    one file at a time costs one ``stat`` per file, not one per file and
    trigger.

    Examples
    --------
    >>> import os, tempfile
    >>> from connectors._paths import DataDir
    >>> root = tempfile.mkdtemp()
    >>> for name in ("a.csv", "b.csv"):
    ...     with open(os.path.join(root, name), "w") as fh:
    ...         _ = fh.write("x\\n1\\n")
    >>> selection = Selection.of("csv", None, None, recursive=False)
    >>> first = list_files(DataDir.resolve(root), selection)
    >>> sorted((f.name, f.size) for f in first.files)
    [('a.csv', 4), ('b.csv', 4)]
    >>> known = {f.name: f for f in first.files}
    >>> again = list_files(DataDir.resolve(root), selection, seen={"a.csv"}, known=known)
    >>> again.files == [known["b.csv"]]
    True
    """
    try:
        if directory.is_local:
            return _list_local(directory.root, selection, seen, known or {})
        return _list_remote(directory, selection, seen)
    except FileNotFoundError:
        return Listing([], missing=True)
    except Exception as exc:
        msg = f"cannot list the source directory {directory.url}: {exc}"
        raise SourceError(msg) from exc


def _list_local(
    root: str, selection: Selection, seen: Container[str], known: Mapping[str, LoggedFile]
) -> Listing:
    """:func:`list_files` with ``os.scandir``: names come without a ``stat`` call.

    Which entries count as files is fsspec's: without ``recursive`` regular
    files only; with it everything but a directory, and symbolic links to
    directories are not followed.
    """
    recursive = selection.recursive
    files = []
    ignored = []
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
                if name in seen:
                    continue
                record = known.get(name)
                if record is not None:  # taken by the selection when first listed
                    files.append(record)
                    continue
                verdict = selection.verdict(name, entry.name)
                if verdict != "take":
                    if verdict == "ignore":
                        ignored.append(name)
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
    return Listing(files, ignored)


def _list_remote(directory: DataDir, selection: Selection, seen: Container[str]) -> Listing:
    """:func:`list_files` through fsspec, whose listings carry sizes and times already."""
    fs = directory.fs
    fs.invalidate_cache(directory.root)  # object stores cache listings
    if selection.recursive:
        infos = list(fs.find(directory.root, withdirs=False, detail=True).values())
    else:
        infos = [i for i in fs.ls(directory.root, detail=True) if i.get("type") == "file"]
    files = []
    ignored = []
    for info in infos:
        name = directory.relative(str(info["name"]))
        if name in seen:
            continue
        parts = name.split("/")
        if any(p.startswith((".", "_")) for p in parts):
            continue
        verdict = selection.verdict(name, parts[-1])
        if verdict != "take":
            if verdict == "ignore":
                ignored.append(name)
            continue
        files.append(
            LoggedFile(name=name, size=int(info.get("size") or 0), mtime=modified_time(info))
        )
    return Listing(files, ignored)
