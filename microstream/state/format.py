"""The on-disk format of a state store: its records, file names and Arrow IPC encoding.

See :mod:`microstream.state.store` for the layout of ``state/<operator>/`` and
``checkpoints/README.md`` for the format as a whole. No pickle: state is data.
"""

from __future__ import annotations

import base64
import itertools
import zlib
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.ipc as pa_ipc
from pydantic import BaseModel, ConfigDict, Field, RootModel

from microstream.exceptions import CheckpointCorruptError

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage

__all__ = [
    "DELTAS_DIR",
    "KEY_GROUP_COLUMN",
    "MARKS_DIR",
    "METADATA_FILE",
    "SEGMENTS_DIR",
    "SEGMENT_SPEC_FILE",
    "SNAPSHOTS_DIR",
    "STATE_FORMAT_VERSION",
    "VERSIONS_DIR",
    "AnyStateVersion",
    "Compression",
    "SegmentSpec",
    "SegmentVersion",
    "StateFile",
    "StateMetadata",
    "StatePart",
    "StateRecord",
    "StateVersion",
    "checksum",
    "covers_key_groups",
    "decode_frame",
    "delta_file",
    "describe_ranges",
    "describe_schema_change",
    "disjoint_in_order",
    "encode_frame",
    "frame_from_text",
    "frame_to_text",
    "pyarrow_round_trips",
    "ranged_delta_file",
    "read_state_file",
    "segment_file",
    "snapshot_file",
    "split_by_key_group",
    "version_file",
]

STATE_FORMAT_VERSION = 2
METADATA_FILE = "_metadata.json"
VERSIONS_DIR = "versions"
DELTAS_DIR = "deltas"
KEY_GROUP_COLUMN = "__key_group"
SNAPSHOTS_DIR = "snapshots"
SEGMENTS_DIR = "segments"
MARKS_DIR = "marks"
SEGMENT_SPEC_FILE = "_segments.json"
Compression: TypeAlias = Literal["lz4", "zstd"] | None


class StateRecord(BaseModel):
    """Base of the state records: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StateMetadata(StateRecord):
    """``state/<operator>/<store>/_metadata.json``: what the state files mean.

    ``schema`` is for people; ``schema_ipc`` (an empty Arrow IPC file, base64)
    restores the dtypes exactly. ``num_key_groups`` and ``hash_algorithm`` fix
    which key group every key's rows are in (see :mod:`microstream.state.key_groups`).
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, serialize_by_alias=True
    )

    format_version: int = STATE_FORMAT_VERSION
    operator: str
    key_columns: list[str]
    hash_columns: list[str] | None = None
    """The key columns the key group is computed over; None: all."""
    schema_: dict[str, str] = Field(alias="schema")
    schema_ipc: str
    num_key_groups: int
    hash_algorithm: str
    snapshot_every: int
    polars_version: str


class StateFile(StateRecord):
    """One data file of a version: what it holds and its checksum."""

    name: str
    """Its path in the store's directory (``deltas/5.arrow``, ``snapshots/10/0-32.arrow``;
    an owner's ``deltas/5/0-64.r1a2b3c4d.0.arrow``, :func:`fenced`)."""
    kind: Literal["delta", "snapshot", "segment", "marks"]
    """``delta``/``snapshot``: a keyed store's files; ``segment``/``marks``: a segment
    buffer's (:class:`SegmentVersion`)."""
    key_groups: tuple[int, int]
    """The key groups ``[lo, hi)`` its rows may belong to (a segment buffer's entry: the
    key groups of the file's rows that the version uses, the others are not its)."""
    rows: int
    crc32: int


class StateVersion(StateRecord):
    """``state/<operator>/<store>/versions/<version>.json``: one committed version.

    Written after the version's data files, so its presence is the commit.
    """

    format_version: int = STATE_FORMAT_VERSION
    version: int
    parent: int | None
    """The version this one was built on; ``None``: built on the empty state."""
    snapshot: bool
    """The files are a full snapshot (contiguous key-group ranges covering every group);
    otherwise delta files over disjoint key-group ranges, in order: one written by a
    store owning every key group, or one per owner of a range (none: nothing changed)."""
    files: list[StateFile]
    rows_per_key_group: list[int]
    """Live rows of every key group as of this version: a load checks what it rebuilt."""


class StatePart(StateRecord):
    """What the owner of key groups ``[lo, hi)`` wrote of one version: its data files and
    row counts. Not a file: owners return it to the driver, which lists every owner's
    files in the version's one manifest (:func:`microstream.state.parts.commit_parts`)."""

    version: int
    parent: int | None
    snapshot: bool
    key_groups: tuple[int, int]
    files: list[StateFile]
    rows_per_key_group: list[int]
    """Live rows of the owner's key groups ``lo .. hi-1``, in order."""
    layout: Literal["keyed", "segments"] = "keyed"
    """``segments``: the part of a segment buffer (its ``files`` are every live file of the
    range, ``snapshot`` is false), committed as a :class:`SegmentVersion`."""
    evicted_through_us: int | None = None
    """A segment buffer's eviction cut (:attr:`SegmentVersion.evicted_through_us`)."""


class SegmentVersion(StateRecord):
    """``versions/<version>.json`` of a segment buffer (a stream-stream join's buffered
    rows, :mod:`microstream.state.segment_buffer`): the whole state as of ``version``.

    The state is the rows of the ``segment`` files (each the rows one version added, in
    time order), without those whose time is at or below ``evicted_through_us`` and
    those a ``marks`` file removes, with the flags the ``marks`` files set. Every file a
    version needs is listed in it: no chain of parents to follow.
    """

    format_version: int = STATE_FORMAT_VERSION
    layout: Literal["segments"] = "segments"
    version: int
    parent: int | None
    files: list[StateFile]
    rows_per_key_group: list[int]
    evicted_through_us: int | None
    """Rows whose time (in microseconds) is at or below this are gone (None: none evicted)."""


class AnyStateVersion(RootModel[StateVersion | SegmentVersion]):
    """A version manifest of either layout (a buffer continues a keyed store's state)."""

    model_config = ConfigDict(frozen=True)


class SegmentSpec(StateRecord):
    """``state/<operator>/<store>/_segments.json``: which columns a segment buffer's
    versions are read with (written beside ``_metadata.json`` by the buffer)."""

    time_column: str | None
    """The rows' event time: what ``evicted_through_us`` cuts (None: no eviction)."""
    row_id_column: str
    """A unique Int64 id per row: what ``marks`` files name."""
    flag_column: str | None
    """A Boolean column a ``marks`` row with ``removed = false`` sets to true."""


def version_file(version: int) -> str:
    return f"{VERSIONS_DIR}/{version}.json"


def delta_file(version: int) -> str:
    return f"{DELTAS_DIR}/{version}.arrow"


def ranged_delta_file(version: int, lo: int, hi: int, fence: str = "") -> str:
    """The delta of key groups ``[lo, hi)`` of a version written by the owner of that range;
    ``fence`` (the writer's run and attempt) in the name keeps apart what two writers of
    one version wrote (:func:`fenced`).

    Examples
    --------
    >>> ranged_delta_file(5, 0, 64), ranged_delta_file(5, 0, 64, "r1a2b3c4d.2")
    ('deltas/5/0-64.arrow', 'deltas/5/0-64.r1a2b3c4d.2.arrow')
    """
    return f"{DELTAS_DIR}/{version}/{lo}-{hi}{fenced(fence)}.arrow"


def segment_file(
    kind: str, version: int, lo: int, hi: int, fence: str = "", *, part: str = ""
) -> str:
    """A segment buffer's ``segment`` or ``marks`` file of a version and key-group range;
    ``part="older"``: the segment of older segments' rows a version merged.

    The version leads the name, in one folder per kind (no folder per version: creating
    one cost a directory per side and batch). Buffers written before named them
    ``segments/<v>/<lo>-<hi>.arrow``; manifests list names, so both load
    (:func:`segment_file_version` reads the version of either).

    Examples
    --------
    >>> segment_file("segment", 7, 0, 128), segment_file("marks", 7, 0, 64, "r1a.0")
    ('segments/7.0-128.arrow', 'marks/7.0-64.r1a.0.arrow')
    >>> segment_file("segment", 7, 0, 128, part="older")
    'segments/7.0-128.older.arrow'
    """
    folder = SEGMENTS_DIR if kind == "segment" else MARKS_DIR
    return f"{folder}/{version}.{lo}-{hi}{fenced(fence)}{fenced(part)}.arrow"


def segment_file_version(name: str) -> int | None:
    """The version that wrote a segment buffer's file, from its name relative to the store
    (``segments/7.0-128.arrow`` or, written before, ``segments/7/0-128.arrow``) or within
    its folder (``7.0-128.arrow``, ``7``); None: not such a name.

    Examples
    --------
    >>> segment_file_version("segments/7.0-128.arrow"), segment_file_version("marks/12/0-8.arrow")
    (7, 12)
    >>> segment_file_version("7"), segment_file_version("7.0-8.arrow"), segment_file_version(".x.tmp")
    (7, 7, None)
    """
    folder, _, rest = name.partition("/")
    if folder in (SEGMENTS_DIR, MARKS_DIR) and rest:
        name = rest
    head = name.split("/", 1)[0].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def snapshot_file(version: int, lo: int, hi: int, fence: str = "") -> str:
    return f"{SNAPSHOTS_DIR}/{version}/{lo}-{hi}{fenced(fence)}.arrow"


def fenced(fence: str) -> str:
    """The part of a data file's name that says which writer wrote it (empty: a store that
    owns every key group, written by one process). A cluster runtime's owners put their
    run id and attempt there, so a stale owner (of a dead run, or one replaced after a
    timeout) that writes late writes a file no manifest the driver accepted lists."""
    return f".{fence}" if fence else ""


def encode_frame(frame: pl.DataFrame, compression: Compression, *, pyarrow_io: bool) -> bytes:
    """``frame`` as an Arrow IPC file."""
    if not pyarrow_io:
        return frame.write_ipc(None, compression=compression or "uncompressed").getvalue()
    table = frame.to_arrow()
    sink = pa.BufferOutputStream()
    options = pa_ipc.IpcWriteOptions(compression=compression)
    with pa_ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table)
    return bytes(sink.getvalue().to_pybytes())


def decode_frame(data: bytes, *, pyarrow_io: bool) -> pl.DataFrame:
    """An Arrow IPC file as a DataFrame; raises on bad bytes."""
    if not pyarrow_io:
        return pl.read_ipc(data)
    frame = pl.from_arrow(pa_ipc.open_file(pa.py_buffer(data)).read_all())
    assert isinstance(frame, pl.DataFrame)
    return frame


def pyarrow_round_trips(schema: pl.Schema) -> bool:
    """Whether pyarrow (faster than Polars' IPC for small files) keeps these dtypes exactly."""
    try:
        frame = pl.from_arrow(pl.DataFrame(schema=schema).to_arrow())
    except Exception:  # e.g. Int128, unknown to pyarrow
        return False
    return isinstance(frame, pl.DataFrame) and frame.schema == schema


def frame_to_text(frame: pl.DataFrame) -> str:
    return base64.b64encode(frame.write_ipc(None).getvalue()).decode("ascii")


def frame_from_text(data: str) -> pl.DataFrame:
    return pl.read_ipc(base64.b64decode(data.encode("ascii"), validate=True))


def describe_schema_change(old: pl.Schema, new: pl.Schema) -> str:
    changes = []
    for name in old:
        if name not in new:
            changes.append(f"column {name!r} ({old[name]}) missing")
        elif old[name] != new[name]:
            changes.append(f"column {name!r} is {new[name]} instead of {old[name]}")
    changes.extend(f"unexpected column {name!r} ({new[name]})" for name in new if name not in old)
    if not changes and list(old) != list(new):
        changes.append(f"columns in order {list(new)} instead of {list(old)}")
    return "; ".join(changes) if changes else "identical"


def checksum(data: bytes) -> int:
    """The CRC-32 a state file's bytes are checked with.

    Examples
    --------
    >>> checksum(b"state")
    2744374011
    """
    return zlib.crc32(data)


def split_by_key_group(frame: pl.DataFrame, ranges: list[tuple[int, int]]) -> list[pl.DataFrame]:
    """The rows of ``frame`` in each key-group range, each sorted by key group."""
    groups = frame.get_column(KEY_GROUP_COLUMN).to_numpy()
    order = np.argsort(groups, kind="stable")
    bounds = np.searchsorted(groups[order], [lo for lo, _ in ranges] + [ranges[-1][1]])
    ordered = frame[order] if frame.height else frame
    return [
        ordered.slice(int(start), int(stop - start)) for start, stop in itertools.pairwise(bounds)
    ]


def disjoint_in_order(ranges: list[tuple[int, int]]) -> bool:
    """Whether ``ranges`` are in order and do not overlap (the delta files of a version).

    Examples
    --------
    >>> disjoint_in_order([(0, 4), (4, 8)]), disjoint_in_order([(4, 8), (0, 4)])
    (True, False)
    """
    return all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))


def covers_key_groups(ranges: list[tuple[int, int]], n: int) -> bool:
    """Whether ``ranges``, in order, are contiguous and cover ``[0, n)``."""
    return (
        bool(ranges)
        and ranges[0][0] == 0
        and ranges[-1][1] == n
        and all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    )


def describe_ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


def read_state_file(
    storage: Storage,
    entry: StateFile,
    schema: pl.Schema,
    key_groups: tuple[int, int],
    operator: str,
    *,
    pyarrow_io: bool,
) -> pl.DataFrame:
    """Read the state file ``entry`` of ``operator``'s store, checking its checksum,
    columns and rows; keep the rows of ``key_groups`` ``[lo, hi)``.

    Raises
    ------
    CheckpointCorruptError
        The file is missing, its CRC-32 differs from the manifest's, it does not decode,
        or it has other columns or another number of rows than the manifest records.
    """
    lo, hi = key_groups
    name = entry.name
    where = storage.display(name)
    try:
        data = storage.read_bytes(name)
    except FileNotFoundError:
        msg = (
            f"state file {where} of operator {operator!r} is missing; the version "
            "manifests list it. Restore it from a backup, or start over with `microstream reset "
            "CHECKPOINT`"
        )
        raise CheckpointCorruptError(msg) from None
    if (found := checksum(data)) != entry.crc32:
        msg = (
            f"state file {where} of operator {operator!r} is corrupt: its CRC-32 is "
            f"{found:08x}, the version that wrote it recorded {entry.crc32:08x} (a changed "
            "bit or a rewritten file). Restore it from a backup, or start over with "
            "`microstream reset CHECKPOINT`"
        )
        raise CheckpointCorruptError(msg)
    try:
        frame = decode_frame(data, pyarrow_io=pyarrow_io)
    except Exception as exc:  # polars and arrow raise various errors on bad bytes
        msg = (
            f"state file {where} is corrupt or truncated ({len(data)} bytes): "
            f"{type(exc).__name__}: {exc}"
        )
        raise CheckpointCorruptError(msg) from None
    if frame.schema != schema or frame.height != entry.rows:
        msg = f"state file {where} does not hold the state of operator {operator!r}: " + (
            describe_schema_change(schema, frame.schema)
            if frame.schema != schema
            else f"{frame.height} rows, its manifest records {entry.rows}"
        )
        raise CheckpointCorruptError(msg)
    if lo <= entry.key_groups[0] and entry.key_groups[1] <= hi:
        return frame
    return frame.filter(pl.col(KEY_GROUP_COLUMN).is_between(lo, hi - 1))
