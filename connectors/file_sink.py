"""The file sink: each batch as new files in a directory, made visible by a manifest.

As Spark's file sink does with ``_spark_metadata``, the sink keeps a log of
the files each batch wrote in ``<path>/_microstream_log/<batch_id>.json``. A
batch's files are written first, under fresh names, and the manifest entry
last, atomically: the files count only once it lands. A batch replayed after
a crash finds its entry and writes nothing; files of an attempt that crashed
before its entry stay on disk but are never listed, so a reader that goes
through the manifest (:func:`read_file_sink`) sees each row exactly once.
Globbing the directory instead also sees those orphans.
"""

from __future__ import annotations

import base64
import io
import os
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import polars as pl
from pydantic import BaseModel, ConfigDict

from connectors._paths import DataDir
from microstream._typing import FileFormat  # pydantic resolves it at runtime
from microstream.checkpoint.storage import Storage
from microstream.exceptions import MicrostreamError, SinkError
from microstream.protocols import SinkContext, SinkPart

__all__ = [
    "FileSink",
    "FileSinkManifest",
    "FileSinkPart",
    "FileSinkPartWriter",
    "FileSinkSpec",
    "SinkFile",
    "read_file_sink",
    "write_batch_files",
]

MANIFEST_DIR = "_microstream_log"
_FORMATS = ("parquet", "csv", "ndjson", "ipc")
_EXTENSIONS = {"parquet": "parquet", "csv": "csv", "ndjson": "ndjson", "ipc": "arrow"}
_NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"


class SinkFile(BaseModel):
    """One data file of a batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    """Path relative to the sink directory."""
    rows: int
    bytes: int


class FileSinkManifest(BaseModel):
    """Manifest entry ``_microstream_log/<batch_id>.json``: the files of one batch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_id: int
    query_id: str
    format: FileFormat
    schema_ipc: str
    """The batch's schema as a base64 empty Arrow IPC file (csv/ndjson read back exactly)."""
    files: list[SinkFile]


class FileSinkPart(SinkPart):
    """The files one worker wrote of a batch (:class:`FileSinkPartWriter`), listed by the
    driver's :meth:`FileSink.commit_parts` in the batch's one manifest entry."""

    files: list[SinkFile]
    schema_ipc: str
    """The piece's schema (base64 empty Arrow IPC file), for the manifest entry."""


@dataclass(frozen=True)
class FileSinkPartWriter:
    """Writes a worker's piece of a batch into a file sink's directory (picklable): the
    same files and checks as :meth:`FileSink.add_batch`, their names holding the piece;
    nothing is visible until the driver lists them.

    Examples
    --------
    >>> writer = FileSinkPartWriter(FileSinkSpec("memory://doctest-file-parts", format="csv"))
    >>> part = writer.write_part(3, "run.0-1", pl.DataFrame({"x": [1, 2]}))
    >>> part.rows, part.files[0].name.startswith("part-00003-run.0-1-")
    (2, True)
    """

    spec: FileSinkSpec

    def write_part(self, batch_id: int, piece: str, data: pl.DataFrame) -> FileSinkPart:
        """Write ``data`` as new files named with ``piece``; nothing is listed yet."""
        spec = self.spec
        directory = DataDir.resolve(spec.path, spec.storage_options)
        fsync = Storage(spec.path, spec.storage_options).sub(MANIFEST_DIR).fsync
        files = write_batch_files(spec, directory, batch_id, data, fsync=fsync, tag=piece)
        return FileSinkPart(rows=data.height, files=files, schema_ipc=_schema_to_b64(data.schema))


@dataclass(frozen=True)
class FileSinkSpec:
    """Write each batch as new files under ``path`` (append mode only).

    Parameters
    ----------
    path
        Output directory: local path or fsspec URL. It belongs to one query.
    format
        ``"parquet"``, ``"csv"``, ``"ndjson"`` or ``"ipc"`` (Arrow IPC, ``.arrow``).
    partition_by
        Columns to split each batch by, Hive style
        (``<col>=<value>/part-....parquet``, null as
        ``__HIVE_DEFAULT_PARTITION__``). The columns also stay inside the files.
    storage_options
        Passed to :func:`fsspec.url_to_fs`.

    Examples
    --------
    >>> FileSinkSpec("memory://doctest-sink-spec", format="csv").describe()
    'FileSink[csv: memory:///doctest-sink-spec]'
    """

    kind: ClassVar[str] = "file_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append"})
    durable: ClassVar[bool] = True

    path: str
    _: KW_ONLY
    format: FileFormat = "parquet"
    partition_by: Sequence[str] | None = None
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", os.fspath(self.path))
        if self.format not in _FORMATS:
            msg = f"format must be one of {', '.join(map(repr, _FORMATS))}; got {self.format!r}"
            raise ValueError(msg)
        if self.partition_by is not None:
            cols = (self.partition_by,) if isinstance(self.partition_by, str) else self.partition_by
            if (
                not isinstance(cols, Sequence)
                or not cols
                or not all(isinstance(c, str) and c for c in cols)
            ):
                msg = (
                    "partition_by must be a non-empty list of column names or None; "
                    f"got {self.partition_by!r}"
                )
                raise ValueError(msg)
            object.__setattr__(self, "partition_by", tuple(cols))

    def describe(self) -> str:
        """One line: ``FileSink[parquet: /data/out]``."""
        return f"FileSink[{self.format}: {DataDir.resolve(self.path, self.storage_options).url}]"

    def build(self, context: SinkContext) -> FileSink:
        """The runtime sink."""
        return FileSink(self, context)


class FileSink:
    """The runtime side of :class:`FileSinkSpec`.

    Keeps nothing in the checkpoint: the manifest lives with the data
    (``<path>/_microstream_log/``), so readers need only the output directory.
    """

    def __init__(self, spec: FileSinkSpec, context: SinkContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        if context.output_mode not in FileSinkSpec.output_modes:
            msg = (
                f"{self.description} supports output_mode 'append' only; got "
                f"{context.output_mode!r}. Use sink_delta for 'complete'"
            )
            raise SinkError(msg)
        self._dir = DataDir.resolve(spec.path, spec.storage_options)
        self._manifest = Storage(spec.path, spec.storage_options).sub(MANIFEST_DIR)
        self._query_id = context.query_id
        self._logger = context.logger
        self._faults = context.faults
        self._check_owner()

    def _check_owner(self) -> None:
        # Batch ids of two queries collide: a second query would skip the first's ids.
        try:
            ids = self._manifest.list_numbered("")
            last = self._manifest.read_model(f"{ids[-1]}.json", FileSinkManifest) if ids else None
        except MicrostreamError as exc:
            msg = f"{self.description}: cannot read the manifest: {exc}"
            raise SinkError(msg) from exc
        if last is not None and last.query_id != self._query_id:
            msg = (
                f"{self.description}: the directory already holds the output of query "
                f"{last.query_id} (manifest {self._manifest.display(f'{ids[-1]}.json')}), not of "
                f"this query {self._query_id}. A file sink directory belongs to one query: "
                "write to a new directory, or delete this one to start over"
            )
            raise SinkError(msg)

    def committed_batch(self) -> int | None:
        """The last batch id in the manifest (None: none yet); the manifest is this query's.

        Raises
        ------
        SinkError
            The manifest cannot be listed.
        """
        try:
            ids = self._manifest.list_numbered("")
        except MicrostreamError as exc:
            msg = f"{self.description}: cannot read the manifest: {exc}"
            raise SinkError(msg) from exc
        return ids[-1] if ids else None

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Write ``data`` as new files, then its manifest entry; a replayed batch is skipped.

        Raises
        ------
        SinkError
            A partition column is missing, or a file or the manifest entry
            cannot be written.
        """
        entry_name = f"{batch_id}.json"
        if self._manifest.exists(entry_name):
            self._logger.info("%s: batch %d already written; skipped", self.description, batch_id)
            return
        files = write_batch_files(self.spec, self._dir, batch_id, data, fsync=self._manifest.fsync)
        self._faults.reach("sink.after_data")
        self.commit_files(batch_id, data.schema, files)

    def commit_files(self, batch_id: int, schema: pl.Schema, files: list[SinkFile]) -> None:
        """Write the manifest entry of ``batch_id`` listing ``files`` (already written).

        Raises
        ------
        SinkError
            The entry cannot be written.
        """
        entry_name = f"{batch_id}.json"
        entry = FileSinkManifest(
            batch_id=batch_id,
            query_id=self._query_id,
            format=self.spec.format,
            schema_ipc=_schema_to_b64(schema),
            files=files,
        )
        try:
            self._manifest.write_model(entry_name, entry, overwrite=False)
        except Exception as exc:
            msg = (
                f"{self.description}: cannot write manifest entry "
                f"{self._manifest.display(entry_name)} for batch {batch_id}: {exc}"
            )
            raise SinkError(msg) from exc

    def part_writer(self) -> FileSinkPartWriter | None:
        """What workers write their pieces of a batch with (``PartSink``); None for a
        directory in this process's memory (``memory://``), which other processes cannot
        write into (the batch is written here)."""
        if self._dir.url.startswith("memory://"):
            return None
        return FileSinkPartWriter(self.spec)

    def commit_parts(self, batch_id: int, parts: Sequence[SinkPart]) -> None:
        """One manifest entry listing every piece's files, in piece order (``PartSink``);
        a batch already in the manifest is skipped, its pieces left unlisted.

        Raises
        ------
        SinkError
            A piece is not this sink's, or the entry cannot be written.
        """
        if self._manifest.exists(f"{batch_id}.json"):
            self._logger.info("%s: batch %d already written; skipped", self.description, batch_id)
            return
        files: list[SinkFile] = []
        pieces: list[FileSinkPart] = []
        for part in parts:
            if not isinstance(part, FileSinkPart):
                msg = f"{self.description}: batch {batch_id} got a piece of another sink: {part!r}"
                raise SinkError(msg)
            files.extend(part.files)
            pieces.append(part)
        self._faults.reach("sink.after_data")
        self.commit_files(batch_id, _schema_from_b64(pieces[0].schema_ipc), files)

    def stop(self) -> None:
        """Nothing to release: every file is closed when written."""


def write_batch_files(
    spec: FileSinkSpec,
    directory: DataDir,
    batch_id: int,
    data: pl.DataFrame,
    *,
    fsync: bool,
    tag: str = "",
) -> list[SinkFile]:
    """Write ``data`` (a batch, or one worker's piece of it: ``tag`` in the names) as new
    files under ``directory``, split by ``spec.partition_by``; what was written.

    Raises
    ------
    SinkError
        A partition column is missing, or a file cannot be written.
    """
    description = spec.describe()
    missing = [c for c in spec.partition_by or () if c not in data.columns]
    if missing:
        msg = (
            f"{description}: batch {batch_id} has no partition column(s) {missing}; "
            f"its columns are {data.columns}"
        )
        raise SinkError(msg)
    files: list[SinkFile] = []
    for subdir, part in _split(spec, data):
        extension = _EXTENSIONS[spec.format]
        unique = f"{tag}-{uuid.uuid4().hex[:12]}" if tag else uuid.uuid4().hex
        name = f"{subdir}part-{batch_id:05d}-{unique}.{extension}"
        try:
            size = _write(spec, directory, part, name, fsync=fsync)
        except Exception as exc:
            msg = (
                f"{description}: cannot write {directory.display(name)} for batch {batch_id}: {exc}"
            )
            raise SinkError(msg) from exc
        files.append(SinkFile(name=name, rows=part.height, bytes=size))
    return files


def _split(spec: FileSinkSpec, data: pl.DataFrame) -> list[tuple[str, pl.DataFrame]]:
    if data.height == 0:
        return []  # the manifest entry alone marks an empty batch as done
    if not spec.partition_by:
        return [("", data)]
    cols = list(spec.partition_by)
    groups = data.partition_by(cols, as_dict=True, maintain_order=True, include_key=True)
    return [
        ("".join(f"{c}={_partition_value(v)}/" for c, v in zip(cols, key, strict=True)), part)
        for key, part in groups.items()
    ]


def _write(
    spec: FileSinkSpec, directory: DataDir, part: pl.DataFrame, name: str, *, fsync: bool
) -> int:
    path = directory.path(name)
    if directory.is_local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_frame(part, path, spec.format)
        if fsync:
            # With MICROSTREAM_FSYNC=1 the data must be durable before its manifest entry.
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return os.path.getsize(path)
    buffer = io.BytesIO()
    _write_frame(part, buffer, spec.format)
    data = buffer.getvalue()
    directory.fs.pipe_file(path, data)
    return len(data)


def _write_frame(df: pl.DataFrame, target: str | io.BytesIO, fmt: FileFormat) -> None:
    if fmt == "parquet":
        df.write_parquet(target)
    elif fmt == "csv":
        df.write_csv(target)
    elif fmt == "ndjson":
        df.write_ndjson(target)
    else:
        df.write_ipc(target)


def _partition_value(value: object) -> str:
    return _NULL_PARTITION if value is None else urllib.parse.quote(str(value), safe="")


def _schema_to_b64(schema: pl.Schema) -> str:
    buffer = io.BytesIO()
    pl.DataFrame(schema=schema).write_ipc(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _schema_from_b64(text: str) -> pl.Schema:
    return pl.read_ipc(io.BytesIO(base64.b64decode(text))).schema


def read_file_sink(
    path: str | os.PathLike[str], *, storage_options: dict[str, Any] | None = None
) -> pl.DataFrame:
    """Read the committed output of a file sink: only files its manifest lists.

    Batches come in batch-id order, each batch's files in the order written.
    Files of a crashed attempt that never got a manifest entry are ignored.

    Parameters
    ----------
    path
        The sink's output directory (local path or fsspec URL).
    storage_options
        Passed to :func:`fsspec.url_to_fs`.

    Returns
    -------
    DataFrame
        Every committed row; an empty frame (no columns) when no batch was
        committed yet.

    Raises
    ------
    SinkError
        ``path`` has no ``_microstream_log`` (not a file sink's output), or a
        listed file is gone or unreadable.

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.api.session import Session
    >>> from microstream.protocols import SinkContext
    >>> url = "memory://doctest-read-file-sink"
    >>> ctx = SinkContext(
    ...     query_id="q", query_name=None, output_mode="append",
    ...     storage=Storage(url + "-cp"), session=Session(),
    ... )
    >>> sink = FileSinkSpec(url, format="ndjson").build(ctx)
    >>> sink.add_batch(0, pl.DataFrame({"x": [1, 2]}))
    >>> sink.add_batch(1, pl.DataFrame({"x": [3]}))
    >>> sink.add_batch(1, pl.DataFrame({"x": [3]}))  # replayed: skipped
    >>> read_file_sink(url)["x"].to_list()
    [1, 2, 3]
    """
    directory = DataDir.resolve(path, storage_options)
    manifest = Storage(path, storage_options).sub(MANIFEST_DIR)
    if not manifest.exists(""):
        msg = (
            f"{directory.url} is not the output of a microstream file sink: it has no "
            f"{MANIFEST_DIR} directory. Read plain files with pl.read_parquet / pl.scan_* instead"
        )
        raise SinkError(msg)
    frames: list[pl.DataFrame] = []
    for batch_id in manifest.list_numbered(""):
        try:
            entry = manifest.read_model(f"{batch_id}.json", FileSinkManifest)
        except MicrostreamError as exc:
            msg = f"cannot read the file sink manifest of {directory.url}: {exc}"
            raise SinkError(msg) from exc
        schema = _schema_from_b64(entry.schema_ipc)
        frames.append(pl.DataFrame(schema=schema))
        frames.extend(_read_listed(directory, entry, f, schema) for f in entry.files)
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="vertical_relaxed")


def _read_listed(
    directory: DataDir, entry: FileSinkManifest, listed: SinkFile, schema: pl.Schema
) -> pl.DataFrame:
    shown = directory.display(listed.name)
    try:
        with directory.fs.open(directory.path(listed.name), "rb") as fh:
            if entry.format == "parquet":
                return pl.read_parquet(fh)
            if entry.format == "ipc":
                return pl.read_ipc(fh)
            if entry.format == "csv":
                return pl.read_csv(fh, schema=schema, raise_if_empty=False)
            return pl.read_ndjson(fh, schema=schema)
    except FileNotFoundError:
        msg = (
            f"file {shown}, listed in the manifest of batch {entry.batch_id}, is gone: the "
            "sink's output was modified by hand"
        )
        raise SinkError(msg) from None
    except Exception as exc:
        msg = f"cannot read {shown} (batch {entry.batch_id} of the file sink): {exc}"
        raise SinkError(msg) from exc
