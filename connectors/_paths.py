"""A directory of data files on an fsspec filesystem, as the file connectors see it.

The checkpoint's own files go through :class:`microstream.storage.Storage`;
the data files a source reads or a sink writes go through :class:`DataDir`,
which resolves a URL once and knows how to name a file in messages.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from microstream.exceptions import MissingDependencyError

__all__ = ["DataDir", "glob_regex", "modified_time", "split_glob"]


@dataclass(frozen=True)
class DataDir:
    """A resolved directory URL.

    Attributes
    ----------
    fs
        The fsspec filesystem.
    root
        The directory in the filesystem's own terms (no protocol, no trailing ``/``).
    url
        The normalised URL: an absolute path for local files, else ``protocol://root``.
    is_local
        Whether ``fs`` is the local filesystem (polars then reads paths directly).

    Examples
    --------
    >>> d = DataDir.resolve("memory://doctest-datadir/in")
    >>> d.url, d.path("a.csv")
    ('memory:///doctest-datadir/in', '/doctest-datadir/in/a.csv')
    """

    fs: fsspec.AbstractFileSystem
    root: str
    url: str
    is_local: bool

    @classmethod
    def resolve(
        cls, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None
    ) -> DataDir:
        """Resolve ``url`` (local path or fsspec URL) once."""
        try:
            fs, root = fsspec.url_to_fs(os.fspath(url), **(storage_options or {}))
        except ImportError as exc:  # fsspec: "Install s3fs to access S3"
            msg = (
                f"{os.fspath(url)} needs a filesystem package that is not installed ({exc}); "
                "for s3:// run: pip install 'microstream[s3]'"
            )
            raise MissingDependencyError(msg) from exc
        is_local = isinstance(fs, LocalFileSystem)
        if is_local:
            root = os.path.abspath(root)
            return cls(fs=fs, root=root.rstrip("/") or "/", url=root, is_local=True)
        root = root.rstrip("/")
        return cls(fs=fs, root=root, url=str(fs.unstrip_protocol(root)), is_local=False)

    def path(self, relative: str) -> str:
        """The filesystem path of ``relative`` below the directory."""
        return f"{self.root}/{relative}" if relative else self.root

    def display(self, relative: str) -> str:
        """The full URL of ``relative``, for messages."""
        if self.is_local:
            return self.path(relative)
        return str(self.fs.unstrip_protocol(self.path(relative)))

    def relative(self, path: str) -> str:
        """``path`` (as the filesystem lists it) relative to the directory."""
        path = path.rstrip("/")
        prefix = self.root.rstrip("/") + "/"
        return path[len(prefix) :] if path.startswith(prefix) else path.rsplit("/", 1)[-1]

    def contains(self, other: DataDir) -> bool:
        """Whether ``other`` is this directory or lies below it (same filesystem type)."""
        if type(other.fs) is not type(self.fs):
            return False
        return other.root == self.root or other.root.startswith(self.root.rstrip("/") + "/")


_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def modified_time(info: dict[str, Any]) -> float:
    """Seconds since the epoch at which a listed file last changed (0.0 if unknown).

    Filesystems name this differently (local ``mtime``, S3 ``LastModified``,
    GCS ``updated``, memory ``created``) and type it differently (float,
    datetime, ISO string).

    Examples
    --------
    >>> modified_time({"mtime": 12.5})
    12.5
    >>> from datetime import timezone
    >>> modified_time({"LastModified": datetime(1970, 1, 1, 0, 1, tzinfo=timezone.utc)})
    60.0
    >>> modified_time({})
    0.0
    """
    for key in _MTIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return 0.0


_GLOB_CHARS = "*?["


def split_glob(path: str) -> tuple[str, str | None]:
    """``path`` as the directory before its first glob character and the pattern below it.

    Examples
    --------
    >>> split_glob("in/*.parquet")
    ('in', '*.parquet')
    >>> split_glob("s3://bucket/in/**/day=*/x.csv")
    ('s3://bucket/in', '**/day=*/x.csv')
    >>> split_glob("in")
    ('in', None)
    >>> split_glob("*.csv")
    ('.', '*.csv')
    """
    found = [i for i in (path.find(c) for c in _GLOB_CHARS) if i >= 0]
    if not found:
        return path, None
    cut = path.rfind("/", 0, min(found))
    if cut < 0:
        return ".", path
    base = path[:cut] or "/"
    if base.endswith(":/") or base.endswith(":"):
        msg = f"the glob in {path!r} must come after a directory (e.g. 'memory://in/*.csv')"
        raise ValueError(msg)
    return base, path[cut + 1 :]


def glob_regex(pattern: str) -> re.Pattern[str]:
    """The regular expression a relative path must match in full, with Polars' glob rules.

    ``*`` and ``?`` stay within one path segment, ``**`` spans any number of
    directories, ``[...]`` is a character class (``[!...]`` negated).

    Examples
    --------
    >>> bool(glob_regex("*.parquet").fullmatch("a.parquet"))
    True
    >>> bool(glob_regex("*.parquet").fullmatch("day=1/a.parquet"))
    False
    >>> [bool(glob_regex("**/*.csv").fullmatch(p)) for p in ("a.csv", "x/y/a.csv", "a.tmp")]
    [True, True, False]
    """
    out = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[" and (end := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : end]
            negate = body.startswith("!")
            body = body[1:] if negate else body
            out.append(("[^" if negate else "[") + body.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out), re.DOTALL)
