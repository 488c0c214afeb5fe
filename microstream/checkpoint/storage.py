"""Atomic files on any fsspec filesystem.

The write-ahead log, the source logs and the sink manifests all rest on one
primitive: a file that appears whole under its final name or not at all, and,
for the files written once (``overwrite=False``), never replaced by a second
writer. On a local disk that is write-to-temp then rename (``os.link`` for a
write-once file: it fails if the name exists). On an object store a single PUT
is already atomic, so the object is written directly under its name; a
write-once file is a *conditional* PUT (fsspec's ``mode="create"``, which s3fs
sends as ``If-None-Match: *``): the store refuses it when the object exists,
and the refusal is a :class:`~microstream.exceptions.CheckpointConflictError`
naming the file. Object stores have no directories, so none are created there,
and a question about what exists is always asked of the store, never of
fsspec's cached listings (another process may have written since).

Local writes survive a crash of the process (the kernel keeps the pages) without
fsync, as Spark's and Flink's local checkpoints do. To survive a power loss too,
set ``MICROSTREAM_FSYNC=1``: every file and its directory are then fsynced,
which costs about 1.5 ms per file on a typical disk.

Every checkpoint file (metadata, WAL, commits, state, source logs, sink
manifests, progress, the lock) is read and written through this class, so a
failing store is handled here once: a full disk, an I/O error or an
unreachable endpoint is a :class:`~microstream.exceptions.CheckpointStorageError`
naming the file and the storage, and a failed write leaves no temporary file
and no partial line behind. Nothing is retried here (s3fs and botocore retry
requests themselves): the query stops with its checkpoint consistent, and a
restart continues from the last committed batch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel, ValidationError

from microstream.checkpoint.checksums import is_sealed, seal, unseal
from microstream.exceptions import (
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointStorageError,
    MicrostreamError,
    MissingDependencyError,
)

__all__ = ["Storage", "temporary_name", "temporary_target"]

ModelT = TypeVar("ModelT", bound=BaseModel)

OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss"})
"""fsspec protocols of object stores: no directories, no rename, no append."""

APPEND_SEGMENT_BYTES = 1 << 20
"""Where no append exists, :meth:`Storage.append_line` starts a new object past this size."""


def temporary_name(name: str) -> str:
    """The name a local write of ``name`` goes to before its rename (``.<name>.<hex>.tmp``,
    unique per write; hidden, so listings of numbered files skip it).

    Examples
    --------
    >>> temporary_target(temporary_name("7.0-8.arrow"))
    '7.0-8.arrow'
    """
    return f".{name}.{uuid.uuid4().hex}.tmp"


def temporary_target(name: str) -> str | None:
    """The file name a temporary of :func:`temporary_name` was to be renamed to; None: not
    such a temporary. A writer killed between write and rename leaves one behind.

    Examples
    --------
    >>> temporary_target(".5.json.0123456789abcdef0123456789abcdef.tmp"), temporary_target("5.json")
    ('5.json', None)
    """
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    target, _, token = name[1:-4].rpartition(".")
    return target if target and len(token) == 32 else None


class Storage:
    """A directory on an fsspec filesystem with atomic JSON files.

    Parameters
    ----------
    url
        Any fsspec URL or local path (``"checkpoints/q1"``, ``"memory://q1"``,
        ``"s3://bucket/q1"``).
    storage_options
        Passed to :func:`fsspec.url_to_fs` (for ``s3://``: ``endpoint_url``,
        ``key``, ``secret``, ``client_kwargs``, ...; without them s3fs reads
        the usual ``AWS_*`` environment variables and config files).
    fsync
        Whether to fsync every written file (default: ``MICROSTREAM_FSYNC=1``).
    checksums
        Whether :meth:`write_model` ends every JSON file with its CRC-32 and
        :meth:`read_model` checks it (:mod:`microstream.checkpoint.checksums`);
        on for a checkpoint's storage and every :meth:`sub` of it.

    Examples
    --------
    >>> store = Storage("memory://doctest-storage")
    >>> store.write_bytes("a/b.json", b"{}")
    >>> store.read_bytes("a/b.json")
    b'{}'

    A write-once file is never replaced:

    >>> store.write_bytes("a/once.json", b"1", overwrite=False)
    >>> store.write_bytes("a/once.json", b"2", overwrite=False)
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointConflictError: checkpoint file memory:///doctest-storage/a/once.json already exists: another writer created it first, and it was not overwritten. Is a second process running a query on this checkpoint? Stop it, or give this query its own checkpoint
    >>> store.read_bytes("a/once.json")
    b'1'
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None = None,
        *,
        fsync: bool | None = None,
        checksums: bool = False,
    ):
        self.url = os.fspath(url)
        self.checksums = checksums
        self.fsync = os.environ.get("MICROSTREAM_FSYNC", "") == "1" if fsync is None else fsync
        try:
            fs, root = fsspec.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as exc:  # fsspec: "Install s3fs to access S3"
            msg = (
                f"the checkpoint location {self.url} needs a filesystem package that is not "
                f"installed ({exc}); for s3:// run: pip install 'microstream[s3]'"
            )
            raise MissingDependencyError(msg) from exc
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = root.rstrip("/")
        self.is_local = isinstance(fs, LocalFileSystem)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        self.is_object_store = _is_object_store(fs)
        self.location, self._checks = _describe_location(fs, storage_options or {})
        """The storage in messages (``local disk``, ``S3 endpoint http://...``), and
        what to check when it fails."""
        self._failures = _failure_types(fs)
        # append_line on stores without append: per file, (segment number, its content)
        self._appends: dict[str, tuple[int, bytes]] = {}

    def path(self, relative: str) -> str:
        """Absolute path (in the filesystem's terms) of ``relative``."""
        return f"{self.root}/{relative}" if relative else self.root

    def display(self, relative: str) -> str:
        """A path to put in messages: the full URL of ``relative``."""
        if self.is_local:
            return self.path(relative)
        return f"{self.fs.unstrip_protocol(self.path(relative))}"

    def sub(self, relative: str) -> Storage:
        """A :class:`Storage` rooted at ``relative`` below this one."""
        child = Storage.__new__(Storage)
        child.url = f"{self.url.rstrip('/')}/{relative}"
        child.fs = self.fs
        child.root = self.path(relative)
        child.is_local = self.is_local
        child.is_object_store = self.is_object_store
        child.fsync = self.fsync
        child.checksums = self.checksums
        child.location = self.location
        child._checks = self._checks
        child._failures = self._failures
        child._appends = {}
        return child

    # -- reading -----------------------------------------------------------------

    def exists(self, relative: str) -> bool:
        """Whether ``relative`` exists now (asked of the store, not of a cached listing)."""
        path = self.path(relative)
        self._forget_listing(path)
        with self._failing("look up checkpoint file", relative):
            return bool(self.fs.exists(path))

    def _forget_listing(self, path: str) -> None:
        # fsspec's object stores cache directory listings per filesystem instance:
        # a file another process wrote since would look absent.
        if not self.is_local:
            self.fs.invalidate_cache(path)

    def read_bytes(self, relative: str) -> bytes:
        """The bytes of ``relative``; ``FileNotFoundError`` if it does not exist."""
        path = self.path(relative)
        self._forget_listing(path)  # s3fs sizes the object from a cached listing
        with self._failing("read checkpoint file", relative, absent_ok=True):
            data: bytes = self.fs.cat_file(path)
        return data

    def read_model(
        self, relative: str, model: type[ModelT], *, checksum: bool | None = None
    ) -> ModelT:
        """Read a JSON file as ``model``; a corrupt file is an error naming it.

        ``checksum``: require the file's CRC-32 (default: this storage's
        ``checksums``); a file that carries one has it checked in any case.
        """
        raw = self.read_bytes(relative)
        if (self.checksums if checksum is None else checksum) or is_sealed(raw):
            raw = unseal(raw, self.display(relative))
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "the document"
            msg = (
                f"checkpoint file {self.display(relative)} is corrupt or truncated "
                f"({len(raw)} bytes): {where}: {first['msg']}. Restore it from a backup "
                "or start over with `microstream reset CHECKPOINT` (deletes the checkpoint, never "
                "the output); microstream never restarts "
                "from zero on its own"
            )
            raise CheckpointCorruptError(msg) from None

    def list_names(self, relative: str) -> list[str]:
        """Sorted names of the entries of a directory (missing dir: [])."""
        return sorted(self._entry_names(relative))

    def _entry_names(self, relative: str) -> list[str]:
        """The names of the entries of a directory, unordered (missing dir: [])."""
        directory = self.path(relative)
        self._forget_listing(directory)
        try:
            with self._failing("list checkpoint directory", relative, absent_ok=True):
                if self.is_local:
                    # fsspec's local ls builds and normalises a path per entry: a state
                    # store's retention lists directories of ~100 files every few batches
                    try:
                        return os.listdir(directory)
                    except NotADirectoryError:  # a file lists as itself, as in fsspec
                        return [directory.rsplit("/", 1)[-1]]
                names = self.fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
        return [str(name).rstrip("/").rsplit("/", 1)[-1] for name in names]

    def list_numbered(self, relative: str, suffix: str = ".json") -> list[int]:
        """Sorted batch ids of ``<n><suffix>`` files in a directory (missing dir: [])."""
        ids = []
        for base in self._entry_names(relative):
            stem = base[: -len(suffix)] if base.endswith(suffix) else None
            if stem is not None and stem.isdigit():
                ids.append(int(stem))
        return sorted(ids)

    # -- writing -----------------------------------------------------------------

    def makedirs(self, relative: str) -> None:
        """Create a directory; nothing on object stores, which have none."""
        if self.is_object_store:
            return  # s3fs would otherwise create a missing *bucket*
        with self._failing("create checkpoint directory", relative):
            self.fs.makedirs(self.path(relative), exist_ok=True)

    def write_bytes(self, relative: str, data: bytes, *, overwrite: bool = True) -> None:
        """Write ``data`` atomically under ``relative``.

        With ``overwrite=False`` the file is written once: if it exists, or
        another writer creates it meanwhile, nothing is written and
        :class:`~microstream.exceptions.CheckpointConflictError` names it (the
        WAL never rewrites an entry). Locally that is a hard link of the
        temporary file, which fails on an existing name; on object stores a
        conditional PUT (S3: ``If-None-Match: *``).

        Raises
        ------
        CheckpointConflictError
            ``overwrite=False`` and the file exists.
        CheckpointStorageError
            The store failed (disk full, I/O error, endpoint unreachable);
            nothing was written under ``relative`` and no temporary file is left.
        CheckpointError
            Permission denied, or (object stores) the bucket does not exist.
        """
        if not self.is_local:
            with self._failing("write checkpoint file", relative):
                self._put(relative, data, overwrite=overwrite)
            return
        target = self.path(relative)
        parent, name = target.rsplit("/", 1)
        # Every batch writes several of these files, so no system call is spent on what
        # the ones made anyway tell: the directory is created only when the temporary
        # file cannot be, and an existing target makes link() fail (no exists() first).
        with self._failing("write checkpoint file", relative):
            tmp = f"{parent}/{temporary_name(name)}"
            try:
                try:
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                except FileNotFoundError:
                    os.makedirs(parent, exist_ok=True)
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    _write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                if overwrite:
                    os.replace(tmp, target)
                else:
                    # link() fails if the target appeared meanwhile: no lost race.
                    try:
                        os.link(tmp, target)
                    except FileExistsError:
                        raise CheckpointConflictError(self._conflict(relative)) from None
                    finally:
                        os.unlink(tmp)
            except BaseException:
                # A full disk fails mid-file: the half-written temporary must not stay.
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            if self.fsync:
                _fsync_dir(parent)

    def _put(self, relative: str, data: bytes, *, overwrite: bool) -> None:
        """One PUT: plain, or conditional on the object not existing (``overwrite=False``)."""
        target = self.path(relative)
        if not self.is_object_store:
            self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        try:
            if overwrite:
                self.fs.pipe_file(target, data)
            else:
                self.fs.pipe_file(target, data, mode="create")
        except FileExistsError:
            raise CheckpointConflictError(self._conflict(relative)) from None
        except FileNotFoundError as exc:  # s3fs: NoSuchBucket
            msg = f"cannot write checkpoint file {self.display(relative)}: {exc}"
            raise CheckpointError(msg) from exc

    @contextlib.contextmanager
    def _failing(self, what: str, relative: str, *, absent_ok: bool = False) -> Iterator[None]:
        """Turn a failure of the store into an error naming the file and the storage.

        With ``absent_ok`` a ``FileNotFoundError`` passes through, for callers
        to whom a missing file is an answer, not a failure.
        """
        try:
            yield
        except MicrostreamError:
            raise
        except self._failures as exc:
            if absent_ok and isinstance(exc, FileNotFoundError):
                raise
            where = f"cannot {what} {self.display(relative)}"
            if isinstance(exc, PermissionError):
                msg = f"{where}: permission denied ({self.location})"
                raise CheckpointError(msg) from exc
            raise CheckpointStorageError(f"{where}: {self._diagnose(exc)}") from exc

    def _diagnose(self, exc: BaseException) -> str:
        """What failed, on which storage, and what to check."""
        after = "; a restarted query then continues from its last committed batch"
        code = exc.errno if isinstance(exc, OSError) else None
        if code in (errno.ENOSPC, errno.EDQUOT):
            what = "no space left on device" if code == errno.ENOSPC else "disk quota exceeded"
            return (
                f"{what} ({errno.errorcode[code]}) on the {self.location}. Free space on it{after}"
            )
        if code == errno.EROFS:
            return f"the {self.location} is mounted read-only. Remount it writable{after}"
        if self.is_local:
            return f"{exc} on the {self.location}. Check {self._checks}{after}"
        return (
            f"the {self.location} failed or cannot be reached ({type(exc).__name__}: {exc}). "
            f"Check {self._checks}{after}"
        )

    def _conflict(self, relative: str) -> str:
        return (
            f"checkpoint file {self.display(relative)} already exists: another writer created "
            "it first, and it was not overwritten. Is a second process running a query on "
            "this checkpoint? Stop it, or give this query its own checkpoint"
        )

    def write_model(
        self,
        relative: str,
        model: BaseModel,
        *,
        overwrite: bool = True,
        checksum: bool | None = None,
    ) -> None:
        """Write ``model`` as indented JSON, atomically (see :meth:`write_bytes`).

        ``checksum``: end the file with its CRC-32 (default: this storage's ``checksums``).
        """
        data = model.model_dump_json(indent=1).encode()
        if self.checksums if checksum is None else checksum:
            data = seal(data)
        self.write_bytes(relative, data, overwrite=overwrite)

    def write_json(self, relative: str, obj: Any) -> None:
        self.write_bytes(relative, json.dumps(obj, indent=1, default=str).encode())

    def append_line(self, relative: str, line: str) -> None:
        """Append a line to a text file (for logs that are read whole, like progress).

        Local files are appended to. Elsewhere an object can only be replaced
        whole: the file is rewritten with the lines this :class:`Storage`
        wrote before (read once, never again), and once it would pass
        :data:`APPEND_SEGMENT_BYTES` the next lines go to a new file
        ``<stem>.<n><suffix>`` beside it (``progress/<run>.1.jsonl``, ...), so
        one line never costs more than that. Readers read every file of the
        directory.

        Examples
        --------
        >>> store = Storage("memory://doctest-append-line")
        >>> store.append_line("progress/run.jsonl", '{"batch": 0}')
        >>> store.append_line("progress/run.jsonl", '{"batch": 1}')
        >>> store.read_bytes("progress/run.jsonl").decode().splitlines()
        ['{"batch": 0}', '{"batch": 1}']
        """
        target = self.path(relative)
        data = (line + "\n").encode()
        with self._failing("append to checkpoint file", relative):
            if self.is_local:
                flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
                try:
                    fd = os.open(target, flags, 0o666)
                except FileNotFoundError:  # the first line: its directory may be missing
                    os.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                    fd = os.open(target, flags, 0o666)
                try:
                    size = os.fstat(fd).st_size
                    try:
                        _write_all(fd, data)
                    except BaseException:
                        # No half line: readers parse every line of the file.
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)
                        raise
                finally:
                    os.close(fd)
                return
            self._append_object(relative, data)

    def _append_object(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        known = self._appends.get(relative)
        if known is None:
            segment, content = 0, (self.fs.cat_file(target) if self.exists(relative) else b"")
        else:
            segment, content = known
        if content and len(content) + len(data) > APPEND_SEGMENT_BYTES:
            segment, content = segment + 1, b""
        content += data
        self._put(_segment_name(relative, segment), content, overwrite=True)
        self._appends[relative] = (segment, content)

    def files(self) -> list[str]:
        """Every file below this storage's root, relative to it, sorted (none: [])."""
        root = self.path("")
        self._forget_listing(root)
        try:
            with self._failing("list checkpoint directory", "", absent_ok=True):
                found = self.fs.find(root)
        except FileNotFoundError:
            return []
        prefix = root.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] for p in found if str(p).startswith(prefix))

    def delete_tree(self) -> None:
        """Remove the root directory and everything left below it (nothing if absent)."""
        with (
            contextlib.suppress(FileNotFoundError),
            self._failing("delete checkpoint directory", "", absent_ok=True),
        ):
            self.fs.rm(self.path(""), recursive=True)

    def delete(self, relative: str) -> None:
        """Remove ``relative``; nothing if it does not exist."""
        with (
            contextlib.suppress(FileNotFoundError),
            self._failing("delete checkpoint file", relative, absent_ok=True),
        ):
            if self.is_local:
                os.unlink(self.path(relative))
            else:
                self.fs.rm_file(self.path(relative))


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    return any(p in OBJECT_STORE_PROTOCOLS for p in protocols)


def _describe_location(fs: fsspec.AbstractFileSystem, options: dict[str, Any]) -> tuple[str, str]:
    """The storage as messages name it (``local disk``, ``S3 endpoint http://...``),
    and what to check when it fails."""
    if isinstance(fs, LocalFileSystem):
        return "local disk", "the disk"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    reachable = "that it is up and reachable from this machine"
    if protocol not in ("s3", "s3a"):
        return f"{protocol}:// storage", f"{reachable}, the storage options and the credentials"
    client_kwargs = options.get("client_kwargs") or {}
    endpoint = (
        options.get("endpoint_url")
        or client_kwargs.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    checks = (
        f"{reachable}, that endpoint_url in the storage options (checkpoint_options= of a "
        "query) or AWS_ENDPOINT_URL names it, and the credentials (key and secret in the "
        "storage options, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    )
    name = f"S3 endpoint {endpoint}" if endpoint else "S3 endpoint of AWS (no endpoint_url set)"
    return name, checks


def _failure_types(fs: fsspec.AbstractFileSystem) -> tuple[type[BaseException], ...]:
    """What a failing store raises: ``OSError``, and botocore's own errors on S3.

    s3fs turns S3's error responses into ``OSError`` subclasses, but a
    connection that cannot be made (``EndpointConnectionError``), a timeout or
    missing credentials reach the caller as botocore exceptions.
    """
    if isinstance(fs, LocalFileSystem):
        return (OSError,)
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _segment_name(relative: str, segment: int) -> str:
    """``progress/r.jsonl`` for segment 0, ``progress/r.<n>.jsonl`` after."""
    if segment == 0:
        return relative
    head, _, name = relative.rpartition("/")
    stem, dot, suffix = name.partition(".")
    renamed = f"{stem}.{segment}{dot}{suffix}" if dot else f"{stem}.{segment}"
    return f"{head}/{renamed}" if head else renamed


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable, not only the file's bytes.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
