"""A buffer of rows that arrive in time order and leave by time: a stream-stream join's side.

A join keeps each side's rows until the watermark passes their time plus the bound,
and finds a batch's partners among the rows of a time range
(:meth:`SegmentBuffer.rows_between`): it never looks a key up, never replaces a row,
and drops rows oldest first. A
:class:`SegmentBuffer` keeps exactly that, without a keyed store's per-row
bookkeeping (hashes, sorted merges, a deletion marker per evicted row):

- a *segment* per version (batch) and writer: the rows the version added, with their
  time range, each with its key group (one stable hash of the join keys per row,
  :func:`~microstream.state.key_groups.key_groups`); written once, as one Arrow file;
- eviction by time: every row at or below a cut (:meth:`SegmentBuffer.evict_through`,
  or :meth:`SegmentBuffer.drop_through` when no one reads them)
  leaves: a segment wholly below the cut is dropped (its file is no longer listed), one
  wholly above is not read, only the few that straddle it are filtered;
  the cut is one number in the version's manifest, no file per evicted row;
- *marks*: the ids of rows flagged (``flag_column`` set true: an outer join's row
  that matched) or removed (a semi join's matched row) after their segment was
  written, one small file per version, applied when a version is loaded.

On disk (``state/<operator>/<store>/``, beside a keyed store's ``_metadata.json``)::

    _segments.json                   SegmentSpec: the time, row-id and flag columns
    versions/<v>.json                SegmentVersion: every live file, the cut, rows per group
    segments/<v>.<lo>-<hi>.arrow     the rows version v added, key groups lo..hi-1
    marks/<v>.<lo>-<hi>.arrow        row id, key group, removed: the marks of version v

(Buffers written before put each version's files in a folder, ``segments/<v>/<lo>-<hi>.arrow``;
their manifests name them, and they load and are retained alike.)

A version exists when its manifest does (written last); it lists every file it
needs, so a load reads one manifest and never a file of a later, uncommitted
version. A store written by the keyed :class:`~microstream.state.store.StateStore`
(the join's buffers before this layout) is loaded through it and continues as
segments: its rows are written with the first version committed after the load.
Owners of key-group ranges (a cluster runtime) load their range and write their
part (:meth:`SegmentBuffer.write_part`, committed by
:func:`~microstream.state.parts.commit_parts`), as for a keyed store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointCorruptError, CheckpointError, SchemaMismatchError
from microstream.state.format import (
    KEY_GROUP_COLUMN,
    METADATA_FILE,
    SEGMENT_SPEC_FILE,
    VERSIONS_DIR,
    AnyStateVersion,
    SegmentSpec,
    SegmentVersion,
    StateFile,
    StateMetadata,
    StatePart,
    StateVersion,
    checksum,
    describe_ranges,
    encode_frame,
    frame_from_text,
    frame_to_text,
    pyarrow_round_trips,
    read_state_file,
    segment_file,
    segment_file_version,
    version_file,
)
from microstream.state.key_groups import DEFAULT_KEY_GROUPS, key_groups
from microstream.state.retention import delete_below
from microstream.state.store import StateStore
from microstream.state.store_checks import (
    check_forward,
    check_whole_commit,
    conform,
    key_group_range,
)
from microstream.state.store_metadata import check_metadata, read_metadata, state_metadata
from microstream.time.windows import to_us

__all__ = ["SegmentBuffer"]

_KG = KEY_GROUP_COLUMN
_REMOVED = "__removed"
_INT64 = np.iinfo(np.int64)
_MAX_SEGMENTS = 32
"""Above this many live segments (small batches under a long bound, or a join without
one), a commit merges the oldest into one file: the manifest and the in-memory
concatenation stay short, for a rewrite of the merged rows every few batches."""
_KEEP_SEGMENTS = 16
"""Segments a merge leaves apart (the newest)."""


@dataclass
class _Segment:
    """Rows one version added, their time range, and the file entries that hold them."""

    frame: pl.DataFrame
    """The state's columns and the key group."""
    times: np.ndarray | None
    """The rows' times in microseconds (None: the buffer has no time column)."""
    earliest: int = 0
    latest: int = 0
    """The lowest and highest of ``times`` (when there are rows)."""
    files: list[StateFile] = field(default_factory=list)
    """Empty: not written yet (added since the last commit)."""
    version: int | None = None
    """The version whose files hold it (None: not written yet)."""
    counts: np.ndarray | None = None
    """Rows per key group (None: not counted since ``frame``'s rows last changed); every
    commit's manifest lists the buffer's, and most segments are unchanged between two."""


class SegmentBuffer:
    """Rows kept until a time cut passes them, in time-ordered append-only segments.

    Parameters
    ----------
    storage
        The store's directory in the checkpoint, ``state/<operator>/<store>/``.
    operator
        The store's name (``<operator id>/<side>``), recorded and used in messages.
    key_columns
        Recorded in the metadata as a keyed store would (a join: its keys and the row id),
        so a keyed store's state of the same operator loads.
    hash_columns
        The columns whose stable hash gives a row's key group (a join: its keys).
    schema
        Every column, in order.
    time_column
        What :meth:`evict_through` cuts (Datetime or Date); None: rows never leave by time.
    row_id_column
        A unique Int64 per row, what :meth:`mark` names rows by.
    flag_column
        A Boolean column :meth:`mark` sets (None: no flag).
    num_key_groups
        As for :class:`~microstream.state.store.StateStore`.
    min_versions_to_retain
        Files needed to load any of the last this-many versions are kept.

    Examples
    --------
    >>> from datetime import datetime
    >>> storage = Storage("memory://doctest-segment-buffer/left")
    >>> schema = {"k": pl.Int64(), "t": pl.Datetime("us"), "id": pl.Int64(), "m": pl.Boolean()}
    >>> buffer = SegmentBuffer(storage, operator="join/left", key_columns=["k", "id"],
    ...     hash_columns=["k"], schema=schema, time_column="t", row_id_column="id",
    ...     flag_column="m")
    >>> buffer.load(None)
    >>> buffer.insert(pl.DataFrame({"k": [1, 2], "t": [datetime(2026, 1, 1, 0, 1),
    ...     datetime(2026, 1, 1, 0, 0)], "id": [10, 11], "m": [False, False]}, schema=schema))
    >>> buffer.commit(0)
    >>> buffer.mark(pl.Series([10]))  # (row 10 matched: its flag is set)
    1
    >>> midnight_us = 1_767_225_600_000_000  # 2026-01-01 00:00
    >>> buffer.evict_through(midnight_us).get_column("id").to_list()
    [11]
    >>> buffer.commit(1)
    >>> buffer.load(1)
    >>> buffer.frame.rows()
    [(1, datetime.datetime(2026, 1, 1, 0, 1), 10, True)]
    """

    def __init__(
        self,
        storage: Storage,
        *,
        operator: str,
        key_columns: Sequence[str],
        hash_columns: Sequence[str],
        schema: pl.Schema | Mapping[str, pl.DataType],
        time_column: str | None,
        row_id_column: str,
        flag_column: str | None = None,
        num_key_groups: int | None = None,
        min_versions_to_retain: int = 100,
    ):
        self.storage = storage
        self.operator = operator
        self.schema = pl.Schema(schema)
        self.key_columns = list(key_columns)
        self.hash_columns = list(hash_columns)
        self.spec = SegmentSpec(
            time_column=time_column, row_id_column=row_id_column, flag_column=flag_column
        )
        self.num_key_groups = DEFAULT_KEY_GROUPS if num_key_groups is None else num_key_groups
        self._requested_key_groups = num_key_groups
        self.min_versions_to_retain = min_versions_to_retain
        self._file_schema = pl.Schema({**self.schema, _KG: pl.UInt16()})
        self._marks_schema = pl.Schema(
            {row_id_column: pl.Int64(), _KG: pl.UInt16(), _REMOVED: pl.Boolean()}
        )
        self._schema_ipc = frame_to_text(pl.DataFrame(schema=self.schema))
        if frame_from_text(self._schema_ipc).schema != self.schema:
            msg = (
                f"the state schema of operator {operator!r} does not survive an Arrow IPC "
                f"round trip: {self.schema}; use plain Polars dtypes"
            )
            raise SchemaMismatchError(msg)
        self._pyarrow_io = pyarrow_round_trips(self._file_schema)
        # (Polars' write_ipc plans a sink per call: ~1.7 ms for a marks file of 200 rows,
        # pyarrow ~0.2 ms; either reads the other's files)
        self._pyarrow_marks = pyarrow_round_trips(self._marks_schema)
        self._segments: list[_Segment] = []
        self._marks: list[pl.DataFrame] = []  # (since the last commit)
        self._mark_files: list[tuple[int, StateFile]] = []  # (version, live marks file)
        self._cut: int | None = None
        self._frame: pl.DataFrame | None = None
        self._version: int | None = None
        self._pending = False
        self._key_range = (0, self.num_key_groups)
        self._opened = False
        self._metadata_current = False
        self._stale_versions: list[int] = []
        self._needs: dict[int, int] = {}  # version -> oldest version its files are of
        self._cleaned_below = -1

    # -- reading -------------------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The version loaded or last committed (``None``: the empty initial state)."""
        return self._version

    @property
    def frame(self) -> pl.DataFrame:
        """Every row, columns in schema order (oldest segment first, each by time)."""
        if self._frame is None:
            parts = [s.frame for s in self._segments if s.frame.height]
            whole = pl.concat(parts, how="vertical", rechunk=False) if parts else None
            columns = list(self.schema)
            self._frame = (
                # (``frame[names]`` picks columns without a query plan: ~0.1 ms less
                # than ``select`` per call, which a join's small batches make every batch)
                pl.DataFrame(schema=self.schema) if whole is None else whole[columns]
            )
        return self._frame

    def rows_between(self, earliest_us: int, latest_us: int) -> pl.DataFrame:
        """The rows whose time in microseconds lies in ``[earliest_us, latest_us]``, or
        every row (:attr:`frame`) when most are in it (or there is no time column): a
        superset of them, columns in schema order.

        What a join's batch can pair with: a segment wholly outside the range is not
        read, one wholly inside is taken as it is, those the range cuts are filtered (a
        mask over their times, kept as numpy). A short bound against long batches keeps
        a sliver of the buffer; a long one most of it, where a filter would copy it.
        """
        if self.spec.time_column is None:
            return self.frame
        inside: list[_Segment] = []
        cut: list[_Segment] = []
        for s in self._segments:
            if not s.frame.height or s.latest < earliest_us or s.earliest > latest_us:
                continue
            wholly = earliest_us <= s.earliest and s.latest <= latest_us
            (inside if wholly else cut).append(s)
        total = self.rows
        kept = sum(s.frame.height for s in inside)
        if 2 * kept > total:  # (no mask needed to know most rows are in)
            return self.frame
        picks: list[tuple[_Segment, np.ndarray | None]] = [(s, None) for s in inside]
        for s in cut:
            assert s.times is not None
            mask = (s.times >= earliest_us) & (s.times <= latest_us)
            picks.append((s, mask))
            kept += int(np.count_nonzero(mask))
        if 2 * kept > total:
            return self.frame
        parts = [s.frame if m is None else s.frame.filter(pl.Series(m)) for s, m in picks]
        parts = [p for p in parts if p.height]
        if not parts:
            return pl.DataFrame(schema=self.schema)
        columns = list(self.schema)
        if len(parts) == 1:
            return parts[0][columns]
        return pl.concat(parts, how="vertical", rechunk=False)[columns]

    @property
    def rows(self) -> int:
        """Number of rows in the buffer."""
        return sum(s.frame.height for s in self._segments)

    @property
    def bytes(self) -> int:
        """Estimated in-memory size of the rows (with their key groups)."""
        return int(sum(s.frame.estimated_size() for s in self._segments))

    @property
    def has_pending_changes(self) -> bool:
        """Whether rows were added, marked or removed since the last commit."""
        return self._pending

    def rows_per_key_group(self) -> list[int]:
        """Number of rows in each key group, in key-group order."""
        counts = np.zeros(self.num_key_groups, dtype=np.int64)
        for s in self._segments:
            if s.frame.height:
                if s.counts is None or len(s.counts) != self.num_key_groups:
                    groups = s.frame.get_column(_KG).to_numpy()
                    s.counts = np.bincount(groups, minlength=self.num_key_groups)
                counts += s.counts
        return counts.tolist()

    def use_key_groups(self, num_key_groups: int) -> None:
        """Split the rows into ``num_key_groups`` key groups (set before :meth:`load`)."""
        self._requested_key_groups = num_key_groups
        if num_key_groups != self.num_key_groups:
            self.num_key_groups = num_key_groups
            self._key_range = (0, num_key_groups)
            for s in self._segments:
                s.frame, s.counts = self._grouped(s.frame.drop(_KG)), None

    # -- changing ------------------------------------------------------------------

    def insert(self, rows: pl.DataFrame) -> None:
        """Add rows (exactly the state's columns); they are written with the next commit."""
        rows = conform(self.schema, self.operator, rows, "rows", list(self.schema), exact=True)
        if rows.height == 0:
            return
        self._add(self._grouped(rows))

    def mark(self, row_ids: pl.Series, *, removed: bool = False) -> int:
        """Set the flag of the rows with these ids (``removed``: remove them instead);
        returns how many rows were found. Ids of no row are ignored."""
        if len(row_ids) == 0 or not self._segments:
            return 0
        rid = self.spec.row_id_column
        ids = row_ids.cast(pl.Int64).implode()
        found = 0
        for s in self._segments:
            hit = s.frame.get_column(rid).is_in(ids)
            n = int(hit.sum())
            if n == 0:
                continue
            found += n
            if s.files:  # (rows not written yet are written as they are then)
                marked = s.frame.filter(hit).select(rid, _KG)
                self._marks.append(marked.with_columns(pl.lit(removed).alias(_REMOVED)))
            if removed:
                keep = ~hit
                s.frame, s.counts = s.frame.filter(keep), None
                if s.times is not None:
                    _set_times(s, s.times[keep.to_numpy()])
            else:
                flag = self.spec.flag_column
                assert flag is not None, "mark(removed=False) of a buffer without a flag column"
                s.frame = s.frame.with_columns(pl.col(flag) | hit)
        if found:
            self._changed()
        return found

    def evict_through(self, cut_us: float) -> pl.DataFrame:
        """Remove and return every row whose time is at or below ``cut_us`` (microseconds).

        The cut is recorded even when no row goes: it is part of the version (every
        owner of a range records the same), and it only moves forward. Rows added at or
        below an earlier cut (a bound that keeps rows from before the watermark) leave
        now too: no row at or below the recorded cut is ever kept.
        """
        gone, _ = self._cut_through(cut_us, returned=True)
        if not gone:
            return pl.DataFrame(schema=self.schema)
        return pl.concat(gone, how="vertical")[list(self.schema)]

    def drop_through(self, cut_us: float) -> int:
        """As :meth:`evict_through`, for rows no one reads: returns only how many went
        (a segment the cut straddles keeps its rows above it; those below are not built)."""
        return self._cut_through(cut_us, returned=False)[1]

    def _cut_through(self, cut_us: float, *, returned: bool) -> tuple[list[pl.DataFrame], int]:
        """Remove the rows at or below the cut: the removed rows (``returned``), how many."""
        if self.spec.time_column is None:
            msg = f"state of operator {self.operator!r} has no time column to evict by"
            raise CheckpointError(msg)
        cut = int(min(max(cut_us, _INT64.min), _INT64.max))
        if self._cut is not None:
            cut = max(cut, self._cut)
        if cut != self._cut:
            self._cut = cut
            self._pending = True
        gone: list[pl.DataFrame] = []
        removed = 0
        kept: list[_Segment] = []
        for s in self._segments:
            assert s.times is not None
            if s.frame.height and s.latest <= cut:
                removed += s.frame.height
                if returned:
                    gone.append(s.frame)
                s.frame, s.times, s.counts = s.frame.clear(), s.times[:0], None
            elif s.frame.height and s.earliest <= cut:
                keep = s.times > cut
                mask = pl.Series(keep)
                removed += s.frame.height - int(np.count_nonzero(keep))
                if returned:
                    gone.append(s.frame.filter(~mask))
                s.frame, s.counts = s.frame.filter(mask), None
                _set_times(s, s.times[keep])
            if s.frame.height or not s.files:
                kept.append(s)
        self._segments = kept
        if removed:
            self._frame = None
        return gone, removed

    # -- persistence ---------------------------------------------------------------

    def load(self, version: int | None, *, key_groups: range | None = None) -> None:
        """Replace the rows by those of committed ``version`` (None: empty); with
        ``key_groups``, of that range only (an owner of it, which commits with
        :meth:`write_part`).

        Raises
        ------
        CheckpointCorruptError
            ``version`` was never committed or is no longer retained, a file it lists is
            missing or corrupt, or the rows loaded disagree with its manifest.
        """
        self._open()
        lo, hi = self._range(key_groups)
        self._segments, self._marks, self._mark_files = [], [], []
        self._cut, self._pending, self._frame = None, False, None
        self._needs = {}
        if version is not None:
            entry = self._read_manifest(version)
            if isinstance(entry, SegmentVersion):
                self._load_segments(entry, lo, hi)
            else:  # (a keyed store's version: continued as segments from the next commit)
                keyed = self._keyed_store()
                keyed.load(version, key_groups=None if key_groups is None else range(lo, hi))
                if keyed.rows:
                    self._add(self._grouped(keyed.frame))
        self._version = version
        self._key_range = (lo, hi)
        self._stale_versions = [
            v for v in self.storage.list_numbered(VERSIONS_DIR) if version is None or v > version
        ]

    def commit(self, version: int) -> None:
        """Persist the state as ``version``: this version's segment and marks files, then its
        manifest (the commit point), then remove files no retained version needs.

        Raises
        ------
        CheckpointError
            ``version`` is below the current one (or equal, with changes), or the buffer
            holds only some key groups (an owner: :meth:`write_part`).
        """
        current = self._version
        if not check_forward(self.operator, version, current, self._pending):
            return
        n = self.num_key_groups
        first = not self._opened
        self._open()
        check_whole_commit(self.storage, self.operator, self._key_range, n, first=first)
        self._shared_files(version)
        files = self._write(version, 0, n, "")
        entry = SegmentVersion(
            version=version,
            parent=current,
            files=files,
            rows_per_key_group=self.rows_per_key_group(),
            evicted_through_us=self._cut,
        )
        self.storage.write_model(version_file(version), entry)
        self._version = version
        self._needs[version] = _oldest(files, version)
        self._remove_unneeded_files()

    def write_part(self, version: int, *, leader: bool, fence: str = "") -> StatePart:
        """Write this owner's key-group range of ``version`` (its new segment and marks
        files) and return the part the driver commits; it lists every live file of the
        range. The ``leader`` also writes the shared files and removes unneeded ones.

        Raises
        ------
        CheckpointError
            ``version`` is not past the current one, or a row is outside the range.
        """
        lo, hi = self._key_range
        current = self._version
        if not check_forward(self.operator, version, current, self._pending):
            msg = f"state version {version} of operator {self.operator!r} was already written"
            raise CheckpointError(msg)
        counts = self.rows_per_key_group()
        outside = [g for g, c in enumerate(counts) if c and not lo <= g < hi]
        if outside:
            msg = (
                f"state of operator {self.operator!r} owns key groups {lo}-{hi - 1} but holds "
                f"rows of key group {outside[0]}: its input was not routed by its key "
                f"columns {self.hash_columns}"
            )
            raise CheckpointError(msg)
        if leader:
            self._shared_files(version)
        files = self._write(version, lo, hi, fence)
        self._version = version
        if leader and current is not None:
            self._remove_unneeded_files(owner=True)
        return StatePart(
            version=version,
            parent=current,
            snapshot=False,
            key_groups=(lo, hi),
            files=files,
            rows_per_key_group=counts[lo:hi],
            layout="segments",
            evicted_through_us=self._cut,
        )

    # -- internals -----------------------------------------------------------------

    def _add(self, rows: pl.DataFrame) -> None:
        """Add ``rows`` (with key groups) as a segment not written yet."""
        self._segments.append(self._segment(rows))
        self._changed()

    def _segment(self, rows: pl.DataFrame) -> _Segment:
        """``rows`` (with key groups) as a segment, with their times (not sorted: a batch's
        rows are roughly in time order, so few segments straddle a cut, and filtering
        those costs less than sorting every batch's rows)."""
        segment = _Segment(rows, None)
        time = self.spec.time_column
        if time is not None:
            _set_times(segment, rows.select(to_us(time)).to_series().to_numpy())
        return segment

    def _changed(self) -> None:
        self._pending = True
        self._frame = None

    def _grouped(self, rows: pl.DataFrame) -> pl.DataFrame:
        groups = key_groups(rows, self.hash_columns, self.num_key_groups)
        return rows.with_columns(pl.Series(_KG, groups, dtype=pl.UInt16))

    def _write(self, version: int, lo: int, hi: int, fence: str) -> list[StateFile]:
        """Write the segment of the rows added since the last commit and the marks; update
        what is live; return every live file of ``[lo, hi)``."""
        new = [s for s in self._segments if not s.files]
        written = [s for s in self._segments if s.files and s.frame.height]
        if new:
            segment = new[0] if len(new) == 1 else self._merged(new)
            if segment.frame.height:
                name = segment_file("segment", version, lo, hi, fence)
                segment.files = [self._write_file(name, "segment", segment.frame, (lo, hi))]
                segment.version = version
                written.append(segment)
        if len(written) > _MAX_SEGMENTS:
            older, newer = written[:-_KEEP_SEGMENTS], written[-_KEEP_SEGMENTS:]
            merged = self._merged(older)
            name = segment_file("segment", version, lo, hi, fence, part="older")
            merged.files = [self._write_file(name, "segment", merged.frame, (lo, hi))]
            merged.version = version
            written = [merged, *newer]
        self._segments = written
        if self._marks:
            marks = pl.concat(self._marks, how="vertical")
            name = segment_file("marks", version, lo, hi, fence)
            self._mark_files.append((version, self._write_file(name, "marks", marks, (lo, hi))))
            self._marks = []
        oldest = min((s.version for s in written if s.version is not None), default=None)
        # A marks file names rows of its version's and older segments: needed while one lives.
        self._mark_files = [
            (v, f) for v, f in self._mark_files if oldest is not None and v >= oldest
        ]
        self._pending = False
        return [f for s in written for f in s.files] + [f for _, f in self._mark_files]

    def _merged(self, segments: list[_Segment]) -> _Segment:
        """One segment (not written) of the rows of ``segments``."""
        merged = _Segment(pl.concat([s.frame for s in segments], how="vertical"), None)
        if self.spec.time_column is not None:
            _set_times(merged, np.concatenate([s.times for s in segments if s.times is not None]))
        return merged

    def _write_file(
        self, name: str, kind: str, frame: pl.DataFrame, span: tuple[int, int]
    ) -> StateFile:
        # Uncompressed, as the keyed store's files: lz4 took ~10 ms per 50k-row segment
        # (~1 ms without) for ~1.5x fewer bytes, and a segment is written every batch.
        data = encode_frame(frame, None, pyarrow_io=self._pyarrow_for(kind))
        self.storage.write_bytes(name, data)
        return StateFile(
            name=name,
            kind="segment" if kind == "segment" else "marks",
            key_groups=span,
            rows=frame.height,
            crc32=checksum(data),
        )

    def _pyarrow_for(self, kind: str) -> bool:
        """Whether a segment or marks file is encoded and decoded with pyarrow."""
        return self._pyarrow_io if kind == "segment" else self._pyarrow_marks

    def _load_segments(self, entry: SegmentVersion, lo: int, hi: int) -> None:
        """Rebuild the rows of ``[lo, hi)`` from a segment manifest."""
        n = self.num_key_groups
        if len(entry.rows_per_key_group) != n:
            msg = (
                f"checkpoint file {self.storage.display(version_file(entry.version))} is "
                f"corrupt: it has {len(entry.rows_per_key_group)} key groups, expected {n}"
            )
            raise CheckpointCorruptError(msg)
        cache: dict[str, pl.DataFrame] = {}
        marks: list[pl.DataFrame] = []
        segments: list[_Segment] = []
        mark_files: list[tuple[int, StateFile]] = []
        for f in entry.files:
            a, b = max(f.key_groups[0], lo), min(f.key_groups[1], hi)
            if a >= b:
                continue
            schema = self._file_schema if f.kind == "segment" else self._marks_schema
            frame = cache.get(f.name)
            if frame is None:
                frame = read_state_file(
                    self.storage,
                    f,
                    schema,
                    (0, n),
                    self.operator,
                    pyarrow_io=self._pyarrow_for(f.kind),
                )
                cache[f.name] = frame
            if (a, b) != (0, n):
                frame = frame.filter(pl.col(_KG).is_between(a, b - 1))
            used = f.model_copy(update={"key_groups": (a, b)})
            if f.kind == "marks":
                marks.append(frame)
                mark_files.append((_version_of(f), used))
            elif f.kind == "segment":
                segment = self._segment(frame)
                segment.files, segment.version = [used], _version_of(f)
                segments.append(segment)
            else:
                msg = (
                    f"checkpoint file {self.storage.display(version_file(entry.version))} "
                    f"lists {f.name} of kind {f.kind!r} in a segment buffer's version"
                )
                raise CheckpointCorruptError(msg)
        self._segments, self._mark_files = segments, mark_files
        if entry.evicted_through_us is not None:
            self._cut = None
            self.evict_through(entry.evicted_through_us)
        if marks:
            every = pl.concat(marks, how="vertical")
            rid = self.spec.row_id_column
            self.mark(every.filter(pl.col(_REMOVED)).get_column(rid), removed=True)
            if self.spec.flag_column is not None:
                self.mark(every.filter(~pl.col(_REMOVED)).get_column(rid))
        self._marks, self._pending, self._frame = [], False, None
        self._needs[entry.version] = _oldest(entry.files, entry.version)
        counts = self.rows_per_key_group()
        wrong = [g for g in range(lo, hi) if counts[g] != entry.rows_per_key_group[g]]
        if wrong:
            g = wrong[0]
            msg = (
                f"state of operator {self.operator!r}: key group {g} has {counts[g]} rows "
                f"after loading version {entry.version}, but "
                f"{self.storage.display(version_file(entry.version))} records "
                f"{entry.rows_per_key_group[g]}; the files it lists are inconsistent"
            )
            raise CheckpointCorruptError(msg)

    def _read_manifest(self, version: int) -> StateVersion | SegmentVersion:
        name = version_file(version)
        try:
            return self.storage.read_model(name, AnyStateVersion).root
        except FileNotFoundError:
            committed = self.storage.list_numbered(VERSIONS_DIR)
            if not committed:
                why = "no state version was ever committed"
            elif version < committed[0]:
                why = f"version {version} is no longer retained (oldest on disk: {committed[0]})"
            elif version > committed[-1]:
                why = f"version {version} was never committed (newest on disk: {committed[-1]})"
            else:
                why = (
                    f"version {version} is missing (versions on disk: {describe_ranges(committed)})"
                )
            msg = f"state of operator {self.operator!r}: {self.storage.display(name)}: {why}"
            raise CheckpointCorruptError(msg) from None

    def _keyed_store(self) -> StateStore:
        """The keyed store that wrote this directory's versions before the segment layout."""
        return StateStore(
            self.storage,
            operator=self.operator,
            key_columns=self.key_columns,
            hash_columns=self.hash_columns,
            one_row_per_key=True,
            schema=self.schema,
            num_key_groups=self.num_key_groups,
        )

    def _shared_files(self, version: int) -> None:
        """The metadata and spec (once), and the manifests a dead run left above the load."""
        if not self._metadata_current:
            self.storage.write_model(METADATA_FILE, self._metadata())
            self.storage.write_model(SEGMENT_SPEC_FILE, self.spec)
            self._metadata_current = True
        for stale in self._stale_versions:
            if stale != version:
                self.storage.delete(version_file(stale))
        self._stale_versions = []

    def _remove_unneeded_files(self, *, owner: bool = False) -> None:
        """Delete the files of versions older than the oldest file the oldest retained
        version lists (and the manifests below it)."""
        assert self._version is not None
        oldest_retained = self._version - self.min_versions_to_retain + 1
        if oldest_retained <= self._cleaned_below:
            return
        known = [v for v in self._needs if v <= oldest_retained]
        if known:
            v = max(known)
            needs = self._needs[v]
        elif owner:  # (the driver wrote the manifests of an owner's versions)
            v = oldest_retained
            try:
                entry = self.storage.read_model(version_file(v), AnyStateVersion).root
            except FileNotFoundError:
                return
            if not isinstance(entry, SegmentVersion):
                return
            needs = _oldest(entry.files, v)
        else:  # (a keyed store's version, or none committed here yet: wait)
            return
        delete_below(self.storage, needs)
        self._needs = {k: n for k, n in self._needs.items() if k >= v}
        self._cleaned_below = v

    def _open(self) -> None:
        """Check the stored metadata against this buffer (once)."""
        if self._opened:
            return
        meta = read_metadata(self.storage, self.operator)
        if meta is not None:
            if self._requested_key_groups is None:
                self.use_key_groups(meta.num_key_groups)
                self._requested_key_groups = None
            check_metadata(
                self.storage,
                meta,
                operator=self.operator,
                key_columns=self.key_columns,
                hash_columns=self.hash_columns,
                schema=self.schema,
                num_key_groups=self.num_key_groups,
            )
        spec_written = False
        if meta is not None:
            try:
                spec_written = self.storage.read_model(SEGMENT_SPEC_FILE, SegmentSpec) == self.spec
            except FileNotFoundError:
                spec_written = False
        self._metadata_current = meta is not None and meta == self._metadata() and spec_written
        self._opened = True

    def _metadata(self) -> StateMetadata:
        return state_metadata(
            operator=self.operator,
            key_columns=self.key_columns,
            hash_columns=self.hash_columns,
            schema=self.schema,
            schema_ipc=self._schema_ipc,
            num_key_groups=self.num_key_groups,
            snapshot_every=10,
        )

    def _range(self, groups: range | None) -> tuple[int, int]:
        return key_group_range(groups, self.num_key_groups, self.operator)


def _set_times(segment: _Segment, times: np.ndarray) -> None:
    segment.times = times
    if len(times):
        segment.earliest, segment.latest = int(times.min()), int(times.max())


def _version_of(entry: StateFile) -> int:
    """The version a segment or marks file was written by: ``segments/<v>.<range>.arrow``
    (or ``segments/<v>/``, as buffers named them before)."""
    v = segment_file_version(entry.name)
    if v is None:
        msg = f"a segment buffer's manifest lists {entry.name!r}: not a segment or marks file"
        raise CheckpointCorruptError(msg)
    return v


def _oldest(files: list[StateFile], version: int) -> int:
    """The oldest version whose files a segment version lists (itself when none)."""
    return min((_version_of(f) for f in files), default=version)
