"""Delta Lake as a replayable streaming source (Spark's Delta streaming source).

A Delta table's transaction log is already a write-ahead log: version ``v``
is the commit file ``_delta_log/<v:020>.json``, immutable once written, and
lists the data files it added and removed. The source reads those commit
files directly and streams the *files each version added*; an offset is a
position ``(version, index)`` in that sequence, so any logged range names
exactly the same files on every replay and the source keeps no log of its own
beyond where it started (``sources/<n>/start.json``).

Why the commit files, and not ``DeltaTable.history()`` or a diff of
``get_add_actions()`` between versions: only the commit file says which files
a version added *and* whether each action changed data (``dataChange``), and
it costs one small read per version. ``history()`` gives operations without
files (and numbers its entries by counting back from the handle's version),
and diffing two snapshots costs the whole file list per version and loses
``dataChange``, so compaction could not be told from a rewrite. The files are
read through delta-rs' own object store (``deltalake.fs.DeltaStorageHandler``),
so ``storage_options`` mean the same as everywhere else in deltalake. The
initial snapshot's file list comes from ``get_add_actions()`` at its version.

What a version means to the source:

- it added files with ``dataChange=true`` and removed none: its files are
  streamed, in the order of the commit (appends, inserts-only merges);
- it only has ``dataChange=false`` actions (OPTIMIZE, a checkpoint-only
  rewrite) or none (metadata, properties): skipped, since its rows were
  already streamed;
- it removed files with ``dataChange=true`` (DELETE, UPDATE, MERGE, an
  overwrite): without ``read_change_feed`` that is a :class:`SourceError`
  naming the table, the version and the operation; with it, the version's
  changes are read with ``DeltaTable.load_cdf``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from connectors._delta_files import (
    DataFile,
    DeltaSplit,
    conform_to,
    delta_filesystem,
    plan_delta_splits,
    read_data_file,
)
from connectors.delta import _open_table, _require_deltalake
from microstream.exceptions import OffsetError, PlanError, SourceError
from microstream.protocols import Offset, SourceContext

if TYPE_CHECKING:
    from deltalake import DeltaTable
    from pyarrow.fs import FileSystem

__all__ = ["CHANGE_COLUMNS", "DeltaOffset", "DeltaSource", "DeltaSourceSpec"]

CHANGE_COLUMNS: dict[str, pl.DataType] = {
    "_change_type": pl.String(),
    "_commit_version": pl.Int64(),
    "_commit_timestamp": pl.Datetime("us", "UTC"),
}
"""The columns ``read_change_feed=True`` adds to the table's, as Delta's change data feed."""

_START_FILE = "start.json"
_LOG_DIR = "_delta_log"
_CDF_PROPERTY = "delta.enableChangeDataFeed"
_COLUMN_MAPPING_PROPERTY = "delta.columnMapping.mode"


def _commit_path(version: int) -> str:
    return f"{_LOG_DIR}/{version:020d}.json"


# -- offsets ---------------------------------------------------------------------------------------


class DeltaOffset(Offset):
    """A position in a Delta table's stream of added files.

    Everything up to and including unit ``index`` of table version
    ``version`` has been read; ``index=-1`` is before the version's first
    unit. A version's units are the data files it added (the table's files
    for the initial snapshot), or, with ``read_change_feed=True``, the whole
    version's changes as one unit.

    Attributes
    ----------
    version
        A Delta table version.
    index
        The last unit of ``version`` read; ``-1``: none of it.

    Examples
    --------
    >>> DeltaOffset(version=3, index=4).distance(DeltaOffset(version=3, index=1))
    3
    >>> DeltaOffset(version=4, index=-1).follows_or_equals(DeltaOffset(version=3, index=7))
    True
    """

    version: int = Field(ge=0)
    index: int = Field(ge=-1)

    def follows_or_equals(self, other: Offset) -> bool:
        """Whether this position is at or after ``other`` (by version, then index)."""
        theirs = _delta_offset(other, "compare with")
        return (self.version, self.index) >= (theirs.version, theirs.index)

    def distance(self, other: Offset) -> int | None:
        """Units from ``other`` to here within one version; None across versions.

        Across versions the count needs the table's log (the source's ``lag``
        has it).
        """
        theirs = _delta_offset(other, "measure from")
        return self.index - theirs.index if self.version == theirs.version else None


def _delta_offset(offset: Offset, action: str) -> DeltaOffset:
    if not isinstance(offset, DeltaOffset):
        msg = f"cannot {action} a {type(offset).__name__} ({offset!r}): expected a DeltaOffset"
        raise OffsetError(msg)
    return offset


class _DeltaStart(BaseModel):
    """``start.json``: where the query's stream of the table begins, fixed at its first start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    first_version: int = Field(ge=0)
    snapshot: bool
    """Whether ``first_version`` is read as the table's whole content at that version."""


# -- what a version holds --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Changes:
    """A whole version's change data feed (``read_change_feed=True``)."""

    version: int
    files: int
    """The version's data-changing actions, counted against ``max_files_per_trigger``."""

    @property
    def cost(self) -> int:
        return max(1, self.files)


@dataclass(frozen=True)
class _Version:
    units: tuple[DataFile | _Changes, ...]
    timestamp_ms: int | None
    problem: str | None = None
    """Why the stream cannot pass this version (raised when the stream reaches it)."""


# -- the spec --------------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class DeltaSourceSpec:
    """A Delta table as an unbounded stream of its appended rows (or of its changes).

    Parameters
    ----------
    path
        Table location (local path, ``s3://...``, ``az://...``). The table
        must exist: its schema is read when the spec is created.
    starting_version
        Stream the changes committed at this version and later, without the
        table's earlier content; ``"latest"``: only versions committed after
        the query first starts. At most the latest version + 1 (the next commit).
    starting_timestamp
        Stream from the first version committed at or after this time (a
        ``datetime``, naive meaning UTC, or an ISO 8601 string). A time after
        the last commit means: only later commits.
    max_files_per_trigger
        At most this many data files per batch (not applied to
        ``Trigger.once()``). With ``read_change_feed`` a version is never
        split: a batch takes whole versions, at least one.
    read_change_feed
        Stream the table's change data feed (needs
        ``delta.enableChangeDataFeed=true``): every insert, update and delete
        as a row with ``_change_type`` (``insert``, ``update_preimage``,
        ``update_postimage``, ``delete``), ``_commit_version`` and
        ``_commit_timestamp``.
    storage_options
        Passed to ``deltalake`` (credentials, endpoints).

    Notes
    -----
    Without a starting option the query first reads the table as it is when
    the query first starts (its *snapshot*, split into batches by
    ``max_files_per_trigger``; as inserts with ``read_change_feed``), then
    every later version — Spark's behaviour. The starting position is
    resolved once and kept in the checkpoint, so restarts continue where the
    query stopped whatever the options say.

    The schema is the table's latest schema when the spec is created; rows of
    older files lacking a column get nulls. A commit after that version that
    changes the schema stops the query with a :class:`SourceError`; a restart
    plans with the new schema.

    Raises
    ------
    ValueError
        An option of the wrong type or range, or both starting options.
    PlanError
        No table at ``path``; ``read_change_feed`` on a table without change
        data feed; a table with column mapping; ``starting_version`` beyond
        the table's latest version.

    Examples
    --------
    >>> import tempfile
    >>> import polars as pl
    >>> from deltalake import write_deltalake
    >>> table = tempfile.mkdtemp() + "/t"
    >>> write_deltalake(table, pl.DataFrame({"id": [1, 2]}).to_arrow())
    >>> spec = DeltaSourceSpec(table, max_files_per_trigger=10)
    >>> spec.schema
    Schema([('id', Int64)])
    >>> sorted(spec.identity())
    ['path', 'read_change_feed']
    """

    kind: ClassVar[str] = "delta_source"

    path: str
    starting_version: int | Literal["latest"] | None
    starting_timestamp: datetime | None
    max_files_per_trigger: int | None
    read_change_feed: bool
    storage_options: dict[str, str] | None = field(repr=False)  # may hold credentials
    schema: pl.Schema = field(repr=False)
    data_schema: pl.Schema = field(compare=False, repr=False)
    """The table's own columns (``schema`` without the change-feed columns)."""
    schema_version: int = field(compare=False, repr=False)
    """The table version whose schema ``schema`` is."""
    schema_fields: tuple[tuple[str, str], ...] = field(compare=False, repr=False)
    """``(name, Delta type as JSON)`` of the table's columns at ``schema_version``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        starting_version: int | Literal["latest"] | None = None,
        starting_timestamp: datetime | str | None = None,
        max_files_per_trigger: int | None = None,
        read_change_feed: bool = False,
        storage_options: dict[str, str] | None = None,
    ) -> None:
        _require_deltalake()
        if starting_version is not None and starting_timestamp is not None:
            msg = (
                "pass starting_version or starting_timestamp, not both; got "
                f"starting_version={starting_version!r} and "
                f"starting_timestamp={starting_timestamp!r}"
            )
            raise ValueError(msg)
        if starting_version not in (None, "latest") and (
            isinstance(starting_version, bool)
            or not isinstance(starting_version, int)
            or starting_version < 0
        ):
            msg = (
                "starting_version must be a table version (int >= 0), 'latest' or None; "
                f"got {starting_version!r}"
            )
            raise ValueError(msg)
        timestamp = None if starting_timestamp is None else _utc(starting_timestamp)
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
        if not isinstance(read_change_feed, bool):
            msg = f"read_change_feed must be a bool; got {read_change_feed!r}"
            raise ValueError(msg)

        location = _normalise(path)
        try:
            table = _open_table(location, storage_options)
        except Exception as exc:
            msg = f"cannot open the Delta table at {location} to stream it: {exc}"
            raise PlanError(msg) from exc
        if table is None:
            msg = (
                f"there is no Delta table at {location} to stream: scan_delta reads the schema "
                "from the table, so it must exist (create it first, e.g. with write_deltalake)"
            )
            raise PlanError(msg)
        configuration = table.metadata().configuration
        mapping = configuration.get(_COLUMN_MAPPING_PROPERTY, "none")
        if mapping != "none":
            msg = (
                f"Delta table {location} uses column mapping ({_COLUMN_MAPPING_PROPERTY}="
                f"{mapping!r}), which scan_delta does not read (it reads data files by their "
                "column names). Stream a copy of the table without column mapping"
            )
            raise PlanError(msg)
        if read_change_feed and configuration.get(_CDF_PROPERTY, "false").lower() != "true":
            msg = (
                f"read_change_feed=True needs the change data feed of Delta table {location}, "
                f"which is off ({_CDF_PROPERTY} is not 'true'). Turn it on with "
                f"DeltaTable(path).alter.set_table_properties({{'{_CDF_PROPERTY}': 'true'}}); "
                "changes are recorded from the next version on"
            )
            raise PlanError(msg)
        latest = table.version()
        if isinstance(starting_version, int) and starting_version > latest + 1:
            msg = (
                f"starting_version={starting_version} is beyond the next version ({latest + 1}) "
                f"of Delta table {location}; use starting_version='latest' to read only new "
                "commits"
            )
            raise PlanError(msg)
        data_schema = _polars_schema(table)
        schema = pl.Schema({**data_schema, **CHANGE_COLUMNS}) if read_change_feed else data_schema

        object.__setattr__(self, "path", location)
        object.__setattr__(self, "starting_version", starting_version)
        object.__setattr__(self, "starting_timestamp", timestamp)
        object.__setattr__(self, "max_files_per_trigger", max_files_per_trigger)
        object.__setattr__(self, "read_change_feed", read_change_feed)
        object.__setattr__(self, "storage_options", storage_options)
        object.__setattr__(self, "schema", schema)
        object.__setattr__(self, "data_schema", data_schema)
        object.__setattr__(self, "schema_version", latest)
        object.__setattr__(self, "schema_fields", _fields(json.loads(table.schema().to_json())))

    def identity(self) -> dict[str, Any]:
        """The table location and whether it is read as a change feed.

        The starting options are not part of it: they matter only at the
        query's first start and are then kept in the checkpoint.
        """
        return {"path": self.path, "read_change_feed": self.read_change_feed}

    def describe(self) -> str:
        """One line: ``DeltaSource[/data/t]`` (``DeltaSource[cdf: /data/t]`` for changes)."""
        return f"DeltaSource[{'cdf: ' if self.read_change_feed else ''}{self.path}]"

    def build(self, context: SourceContext) -> DeltaSource:
        """The runtime source, with its starting position from ``context.storage``."""
        return DeltaSource(self, context)


def _normalise(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if "://" in text:
        return text.rstrip("/")
    return os.path.abspath(text)


def _utc(value: datetime | str) -> datetime:
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            msg = f"starting_timestamp must be a datetime or an ISO 8601 string; got {value!r}"
            raise ValueError(msg) from None
    if not isinstance(value, datetime):
        msg = f"starting_timestamp must be a datetime or an ISO 8601 string; got {value!r}"
        raise ValueError(msg)
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def _polars_schema(table: DeltaTable) -> pl.Schema:
    import pyarrow as pa

    empty = pa.schema(table.schema().to_arrow()).empty_table()
    frame = pl.from_arrow(empty)
    assert isinstance(frame, pl.DataFrame)
    return frame.schema


def _fields(schema_json: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """``(name, type)`` of a Delta schema's columns; nullability and comments ignored."""
    return tuple(
        (str(f["name"]), json.dumps(f["type"], sort_keys=True))
        for f in schema_json.get("fields", [])
    )


# -- the runtime source ----------------------------------------------------------------------------


class DeltaSource:
    """The runtime side of :class:`DeltaSourceSpec` (see the module docstring).

    On disk, in the source's checkpoint directory: ``start.json``
    (``{"first_version": v, "snapshot": bool}``), written at the first start.
    Everything else is re-derived from the table's log, which is immutable.
    """

    def __init__(self, spec: DeltaSourceSpec, context: SourceContext) -> None:
        _require_deltalake()
        self.spec = spec
        self.description = spec.describe()
        table = _open_table(spec.path, spec.storage_options)
        if table is None:
            msg = f"{self.description}: the Delta table at {spec.path} is gone"
            raise SourceError(msg)
        self._table: DeltaTable = table
        self._fs: FileSystem = delta_filesystem(spec)
        self._versions: dict[int, _Version] = {}
        self._latest = table.version()
        self._end_version: int | None = None
        storage = context.storage
        if storage.exists(_START_FILE):
            self.start = storage.read_model(_START_FILE, _DeltaStart)
        else:
            self.start = self._resolve_start()
            storage.write_model(_START_FILE, self.start, overwrite=False)

    # -- where the stream begins ---------------------------------------------------------------

    def _resolve_start(self) -> _DeltaStart:
        spec, latest = self.spec, self._latest
        if spec.starting_version == "latest":
            return _DeltaStart(first_version=latest + 1, snapshot=False)
        if isinstance(spec.starting_version, int):
            if spec.starting_version > latest + 1:
                msg = (
                    f"{self.description}: starting_version={spec.starting_version} is beyond the "
                    f"table's next version ({latest + 1})"
                )
                raise SourceError(msg)
            if spec.starting_version <= latest:
                self._commit(spec.starting_version)  # must still be in the log
            return _DeltaStart(first_version=spec.starting_version, snapshot=False)
        if spec.starting_timestamp is not None:
            return _DeltaStart(
                first_version=self._version_at(spec.starting_timestamp), snapshot=False
            )
        return _DeltaStart(first_version=latest, snapshot=True)

    def _version_at(self, when: datetime) -> int:
        """The first version committed at or after ``when`` (latest + 1 if none)."""
        micros = (when - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
        target_ms = -(-micros // 1000)  # commit times are in ms: round up
        low, high = self._earliest_version(), self._latest
        if self._timestamp_ms(high) < target_ms:
            return high + 1
        while low < high:  # commit timestamps increase with versions
            mid = (low + high) // 2
            if self._timestamp_ms(mid) >= target_ms:
                high = mid
            else:
                low = mid + 1
        return low

    def _timestamp_ms(self, version: int) -> int:
        """When ``version`` was committed (its commit info; else its commit file's mtime)."""
        for action in self._commit(version):
            if "commitInfo" in action:
                info = action["commitInfo"]
                stamp = info.get("inCommitTimestamp", info.get("timestamp"))
                if stamp is not None:
                    return int(stamp)
        mtime = self._fs.get_file_info(_commit_path(version)).mtime
        return 0 if mtime is None else int(mtime.timestamp() * 1000)

    def _earliest_version(self) -> int:
        from pyarrow.fs import FileSelector

        infos = self._fs.get_file_info(FileSelector(_LOG_DIR))
        versions = [
            int(name[:-5])
            for name in (info.base_name for info in infos)
            if name.endswith(".json") and name[:-5].isdigit()
        ]
        if not versions:
            msg = f"{self.description}: no commit files in {self.spec.path}/{_LOG_DIR}"
            raise SourceError(msg)
        return min(versions)

    # -- offsets -------------------------------------------------------------------------------

    def initial_offset(self) -> DeltaOffset:
        """Before the first unit of the starting version."""
        return DeltaOffset(version=self.start.first_version, index=-1)

    def parse_offset(self, data: dict[str, Any]) -> DeltaOffset:
        """A :class:`DeltaOffset` from its JSON form in the write-ahead log."""
        try:
            return DeltaOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a Delta source offset (expected "
                f"{{'version': <int >= 0>, 'index': <int >= -1>}}): {exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> DeltaOffset:
        """The end of the next batch: the units of the versions after ``start``.

        Stops before a version the stream cannot pass (a rewrite without
        ``read_change_feed``, a schema change) so what precedes it is
        processed first; when ``start`` is right before it, raises.

        Raises
        ------
        SourceError
            The next version removed or rewrote data (without
            ``read_change_feed``), changed the schema, or cannot be read.
        """
        begin = _delta_offset(start, "start a batch at")
        limit = self.spec.max_files_per_trigger if rate_limited else None
        last = self._last_version()
        end, taken = begin, 0
        version, index = begin.version, begin.index
        while version <= last:
            info = self._version(version)
            if info.problem is not None:
                if end != begin:
                    return end
                raise SourceError(info.problem)
            for k in range(index + 1, len(info.units)):
                cost = info.units[k].cost
                if limit is not None and taken > 0 and taken + cost > limit:
                    return end
                taken += cost
                end = DeltaOffset(version=version, index=k)
                if limit is not None and taken >= limit:
                    return end
            version, index = version + 1, -1
        return end

    def prepare_for_available_now(self) -> None:
        """Stop at the table's version now; later commits wait for the next run."""
        self._end_version = None
        self._end_version = self._last_version()

    def lag(self, end: Offset) -> int | None:
        """Units (files; versions with ``read_change_feed``) known but not yet read."""
        after = _delta_offset(end, "measure lag from")
        remaining = 0
        for version in range(after.version, self._latest + 1):
            try:
                info = self._version(version)  # parsed once, kept until committed
            except SourceError:
                return None
            first = after.index + 1 if version == after.version else 0
            remaining += max(0, len(info.units) - first)
        return remaining

    def _last_version(self) -> int:
        if self._end_version is not None:
            return self._end_version
        try:
            self._table.update_incremental()
        except Exception as exc:
            msg = f"{self.description}: cannot read the log of Delta table {self.spec.path}: {exc}"
            raise SourceError(msg) from exc
        self._latest = self._table.version()
        return self._latest

    # -- the log -------------------------------------------------------------------------------

    def _version(self, version: int) -> _Version:
        info = self._versions.get(version)
        if info is None:
            if self.start.snapshot and version == self.start.first_version:
                info = self._snapshot(version)
            else:
                info = self._classify(version, self._commit(version))
            self._versions[version] = info
        return info

    def _commit(self, version: int) -> list[dict[str, Any]]:
        """The actions of commit ``version``, in file order."""
        path = _commit_path(version)
        try:
            with self._fs.open_input_stream(path) as fh:
                raw = fh.read()
        except FileNotFoundError:
            msg = (
                f"{self.description}: the commit file {self.spec.path}/{path} of version "
                f"{version} is not in the log (removed by log retention, "
                "delta.logRetentionDuration, or never written), so this range cannot be read. "
                "Restart the query with a new checkpoint and a later starting_version"
            )
            raise SourceError(msg) from None
        except Exception as exc:
            msg = f"{self.description}: cannot read {self.spec.path}/{path}: {exc}"
            raise SourceError(msg) from exc
        try:
            return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = f"{self.description}: commit file {self.spec.path}/{path} is corrupt: {exc}"
            raise SourceError(msg) from exc

    def _classify(self, version: int, actions: list[dict[str, Any]]) -> _Version:
        """What the stream reads of one commit (see the module docstring)."""
        from urllib.parse import unquote

        adds: list[DataFile] = []
        removed = with_vectors = cdc = 0
        operation, timestamp_ms = "unknown operation", None
        metadata: dict[str, Any] | None = None
        for action in actions:
            if "add" in action:
                add = action["add"]
                if add.get("dataChange", True):
                    if add.get("deletionVector"):
                        with_vectors += 1
                    values = add.get("partitionValues") or {}
                    adds.append(
                        DataFile(unquote(add["path"]), tuple(sorted(values.items())), False)
                    )
            elif "remove" in action:
                if action["remove"].get("dataChange", True):
                    removed += 1
            elif "cdc" in action:
                cdc += 1
            elif "metaData" in action:
                metadata = action["metaData"]
            elif "commitInfo" in action:
                info = action["commitInfo"]
                timestamp_ms = info.get("inCommitTimestamp", info.get("timestamp"))
                operation = _operation(info)
        where = f"version {version} of Delta table {self.spec.path} ({operation})"
        if metadata is not None and version > self.spec.schema_version:
            change = _schema_change(
                self.spec.schema_fields, _fields(json.loads(metadata["schemaString"]))
            )
            if change:
                problem = (
                    f"{self.description}: {where} changed the table's schema ({change}); the "
                    f"query was planned with the schema of version {self.spec.schema_version}. "
                    "Restart the query to plan it with the new schema (older rows get nulls "
                    "in added columns)"
                )
                return _Version((), timestamp_ms, problem)
        rewrites = removed > 0 or with_vectors > 0
        if not self.spec.read_change_feed:
            if rewrites:
                problem = (
                    f"{self.description}: {where} removed or rewrote data ({removed} file(s) "
                    "removed with dataChange=true), and scan_delta streams only appended rows. "
                    f"Either stream the changes with read_change_feed=True (the table needs "
                    f"{_CDF_PROPERTY}=true, set before that version), or restart the query "
                    f"with a new checkpoint and starting_version={version + 1} to continue "
                    "after it"
                )
                return _Version((), timestamp_ms, problem)
            return _Version(tuple(adds), timestamp_ms)
        changes = len(adds) + removed + cdc
        if changes == 0:
            return _Version((), timestamp_ms)
        if rewrites and cdc == 0 and not self._cdf_enabled(version, metadata):
            problem = (
                f"{self.description}: {where} removed or rewrote data while the table's change "
                f"data feed was off ({_CDF_PROPERTY} not 'true' at that version), so its changes "
                "were not recorded and cannot be streamed. Restart the query with a new "
                f"checkpoint and starting_version={version + 1} to continue after it"
            )
            return _Version((), timestamp_ms, problem)
        return _Version((_Changes(version, changes),), timestamp_ms)

    def _cdf_enabled(self, version: int, metadata: dict[str, Any] | None) -> bool:
        if metadata is not None:
            configuration = metadata.get("configuration") or {}
        else:
            table = _open_table(self.spec.path, self.spec.storage_options, version)
            configuration = {} if table is None else table.metadata().configuration
        return str(configuration.get(_CDF_PROPERTY, "false")).lower() == "true"

    def _snapshot(self, version: int) -> _Version:
        """The table's files at ``version``, oldest first: the stream's initial snapshot."""
        try:
            table = _open_table(self.spec.path, self.spec.storage_options, version)
            if table is None:
                msg = f"the table at {self.spec.path} is gone"
                raise SourceError(msg)
            actions = pl.DataFrame(table.get_add_actions(flatten=False))
            protocol = table.protocol()
            vectors = (
                pl.DataFrame(table.deletion_vectors().read_all()).height
                if "deletionVectors" in (protocol.reader_features or [])
                else 0
            )
        except Exception as exc:
            msg = (
                f"{self.description}: cannot list the files of version {version} of Delta "
                f"table {self.spec.path} (the query's initial snapshot): {exc}"
            )
            raise SourceError(msg) from exc
        if vectors:
            problem = (
                f"{self.description}: version {version} of Delta table {self.spec.path} has "
                f"{vectors} file(s) with deletion vectors, which scan_delta's file reader does "
                f"not apply. Start the query after it (starting_version={version + 1}), or "
                "purge the deletion vectors first (REORG TABLE ... APPLY (PURGE) in Spark)"
            )
            return _Version((), None, problem)
        from urllib.parse import unquote

        ordered = actions.sort(["modification_time", "path"])
        paths = ordered["path"].to_list()
        if "partition" in ordered.columns:
            partitions = [
                tuple(sorted(values.items())) if values else ()
                for values in ordered["partition"].to_list()
            ]
        else:
            partitions = [()] * len(paths)
        units = tuple(
            DataFile(unquote(path), values, True)
            for path, values in zip(paths, partitions, strict=True)
        )
        timestamp_ms = self._timestamp_ms(version) if self.spec.read_change_feed else None
        return _Version(units, timestamp_ms)

    # -- reading -------------------------------------------------------------------------------

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The rows of the units in ``(start, end]``, in log order.

        Raises
        ------
        OffsetError
            ``end`` before ``start``.
        SourceError
            A commit or data file of the range is gone (the range cannot be
            replayed) or unreadable.
        SchemaMismatchError
            A data file's column cannot be cast to the table's schema.
        """
        first = _delta_offset(start, "read from")
        last = _delta_offset(end, "read to")
        if not last.follows_or_equals(first):
            msg = (
                f"{self.description}: cannot read ({first.model_dump()}, {last.model_dump()}]: "
                "the end is before the start"
            )
            raise OffsetError(msg)
        frames: list[pl.DataFrame] = []
        run: list[int] = []  # consecutive versions read through the change data feed
        for version in range(first.version, last.version + 1):
            if version == last.version and last.index < 0:
                break  # nothing of the end's version
            info = self._version(version)
            if info.problem is not None:
                raise SourceError(info.problem)
            lo = first.index + 1 if version == first.version else 0
            hi = last.index if version == last.version else len(info.units) - 1
            for unit in info.units[lo : hi + 1]:
                if isinstance(unit, _Changes):
                    if run and run[-1] != unit.version - 1:
                        frames.append(self._read_changes(run[0], run[-1]))
                        run = []
                    run.append(unit.version)
                else:
                    if run:
                        frames.append(self._read_changes(run[0], run[-1]))
                        run = []
                    frames.append(self._read_file(unit, version, info))
        if run:
            frames.append(self._read_changes(run[0], run[-1]))
        if not frames:
            return pl.DataFrame(schema=self.spec.schema)
        return pl.concat(frames, how="vertical")

    def plan_splits(self, start: Offset, end: Offset) -> list[DeltaSplit] | None:
        """The data files of ``(start, end]`` in splits other processes read
        (:mod:`connectors._delta_files`), or None: read on the driver (a version read
        through the change data feed, or one the stream cannot pass)."""
        first = _delta_offset(start, "read from")
        last = _delta_offset(end, "read to")
        if not last.follows_or_equals(first):
            return None  # read() names the error
        files: list[tuple[DataFile, int, int | None]] = []
        for version in range(first.version, last.version + 1):
            if version == last.version and last.index < 0:
                break
            info = self._version(version)
            lo = first.index + 1 if version == first.version else 0
            hi = last.index if version == last.version else len(info.units) - 1
            units = info.units[lo : hi + 1]
            if info.problem is not None or not all(isinstance(u, DataFile) for u in units):
                return None
            files += [(u, version, info.timestamp_ms) for u in units]  # type: ignore[misc]
        return plan_delta_splits(self.spec, self.description, files) if files else None

    def _read_file(self, unit: DataFile, version: int, info: _Version) -> pl.DataFrame:
        return read_data_file(
            self._fs, self.spec, self.description, unit, version, info.timestamp_ms
        )

    def _read_changes(self, first: int, last: int) -> pl.DataFrame:
        where = f"the change data feed of versions {first}..{last}"
        try:
            reader = self._table.load_cdf(starting_version=first, ending_version=last)
            frame = pl.DataFrame(reader.read_all())
        except Exception as exc:
            msg = f"{self.description}: cannot read {where} of Delta table {self.spec.path}: {exc}"
            raise SourceError(msg) from exc
        stamp = frame.schema.get("_commit_timestamp")
        if isinstance(stamp, pl.Datetime) and stamp.time_zone is None:
            frame = frame.with_columns(pl.col("_commit_timestamp").dt.replace_time_zone("UTC"))
        frame = conform_to(frame, self.spec.schema, where)
        # delta-rs gives no order within a range; versions in order, as they were committed.
        return frame.sort("_commit_version", maintain_order=True)

    # -- clean-up ------------------------------------------------------------------------------

    def commit(self, end: Offset) -> None:
        """Forget the parsed log of versions before ``end`` (the table itself is never touched)."""
        done = _delta_offset(end, "commit").version
        for version in [v for v in self._versions if v < done]:
            del self._versions[version]

    def stop(self) -> None:
        """Forget the parsed log."""
        self._versions.clear()


def _operation(info: dict[str, Any]) -> str:
    operation = str(info.get("operation") or "unknown operation")
    mode = (info.get("operationParameters") or {}).get("mode")
    return f"operation {operation}" + (f", mode {mode}" if mode else "")


def _schema_change(before: tuple[tuple[str, str], ...], after: tuple[tuple[str, str], ...]) -> str:
    """A readable difference of two column lists ('' when the same columns and types)."""
    old, new = dict(before), dict(after)
    parts = []
    added = [name for name in new if name not in old]
    dropped = [name for name in old if name not in new]
    retyped = [name for name in new if name in old and new[name] != old[name]]
    if added:
        parts.append(f"added {added}")
    if dropped:
        parts.append(f"dropped {dropped}")
    if retyped:
        parts.append(f"changed the type of {retyped}")
    return ", ".join(parts)
