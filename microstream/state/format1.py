"""Read a state store of checkpoint format 1, for ``microstream migrate`` only.

Format 1 (microstream up to commit 82ba171) split a store into a fixed number
of partitions by Polars' hash, one file per partition and version::

    _metadata.json                          key columns, schema, num_partitions, hash probe
    versions/<v>.json                       parent, snapshot?, partitions that wrote a delta,
                                            rows per partition, CRC-32 per file
    <partition>/<v>.delta.arrow             the rows of keys changed in v (+ ``__deleted``)
    <partition>/<v>.snapshot.arrow          the whole partition as of v

Its JSON files carry no checksum. This module reads the state as of one
committed version into a frame; :mod:`microstream.checkpoint.migrate` writes it
again in format 2. Nothing here writes.
"""

from __future__ import annotations

import binascii
import json
import zlib
from dataclasses import dataclass

import polars as pl
from pydantic import ConfigDict, Field

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointCorruptError
from microstream.state.format import StateRecord, describe_schema_change, frame_from_text

__all__ = [
    "Format1Metadata",
    "Format1State",
    "Format1Version",
    "is_format1_store",
    "read_format1_store",
]

_METADATA = "_metadata.json"
_DELETED = "__deleted"
_ORDER = "__order"
_PART = "__partition"


class Format1Metadata(StateRecord):
    """``_metadata.json`` of a format-1 store (the fields migration needs, and the rest)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True)

    format_version: int
    operator: str
    key_columns: list[str]
    hash_columns: list[str] | None = None
    schema_: dict[str, str] = Field(alias="schema")
    schema_ipc: str
    num_partitions: int
    snapshot_every: int
    hash_seed: int
    hash_probe: list[int]
    probe_ipc: str
    polars_version: str


class Format1Version(StateRecord):
    """``versions/<v>.json`` of a format-1 store."""

    format_version: int
    version: int
    parent: int | None
    snapshot: bool
    partitions: list[int]
    rows_per_partition: list[int]
    hash_probe: list[int]
    checksums: dict[str, int] = Field(default_factory=dict)


@dataclass(frozen=True)
class Format1State:
    """A format-1 store's metadata and its rows as of one version."""

    metadata: Format1Metadata
    schema: pl.Schema
    frame: pl.DataFrame


def is_format1_store(storage: Storage) -> bool:
    """Whether ``storage`` holds a store whose ``_metadata.json`` says format 1."""
    try:
        raw = storage.read_bytes(_METADATA)
    except FileNotFoundError:
        return False
    try:
        found = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):
        return False
    return bool(found == 1)


def read_format1_store(storage: Storage, version: int) -> Format1State:
    """The state of a format-1 store as of ``version``, checked as format 1 checked it.

    Follows ``parent`` back to a snapshot (or the empty state), replays the
    deltas (for each key, the rows of its newest file win; a deletion marker
    removes it), and checks every file's CRC-32 where its version recorded one
    and every partition's row count.

    Raises
    ------
    CheckpointCorruptError
        A file is missing, fails its checksum, does not decode or hold the
        store's columns, or the row counts disagree; the message names the file.
    """
    meta = storage.read_model(_METADATA, Format1Metadata, checksum=False)
    try:
        schema = frame_from_text(meta.schema_ipc).schema
    except (binascii.Error, ValueError, pl.exceptions.PolarsError) as exc:
        msg = f"checkpoint file {storage.display(_METADATA)} is corrupt: field schema_ipc ({exc})"
        raise CheckpointCorruptError(msg) from None
    chain = [_read_version(storage, version)]
    while not chain[-1].snapshot and chain[-1].parent is not None:
        chain.append(_read_version(storage, chain[-1].parent))
    checksums = {name: crc for entry in chain for name, crc in entry.checksums.items()}
    delta_schema = pl.Schema({**schema, _DELETED: pl.Boolean()})
    parts: list[pl.DataFrame] = []
    oldest = chain[-1]
    if oldest.snapshot:
        for p in range(meta.num_partitions):
            name = f"{p}/{oldest.version}.snapshot.arrow"
            frame = _read_file(storage, name, schema, checksums)
            parts.append(
                frame.with_columns(
                    pl.lit(False).alias(_DELETED),
                    pl.lit(-1, pl.Int64).alias(_ORDER),
                    pl.lit(p, pl.Int64).alias(_PART),
                )
            )
    replay = reversed(chain[:-1] if oldest.snapshot else chain)
    for order, (entry_version, p) in enumerate(
        (entry.version, p) for entry in replay for p in entry.partitions
    ):
        name = f"{p}/{entry_version}.delta.arrow"
        frame = _read_file(storage, name, delta_schema, checksums)
        parts.append(
            frame.with_columns(
                pl.lit(order, pl.Int64).alias(_ORDER), pl.lit(p, pl.Int64).alias(_PART)
            )
        )
    columns = [*schema, _DELETED, _ORDER, _PART]
    every = (
        pl.concat([part.select(columns) for part in parts], how="vertical")
        if parts
        else pl.DataFrame(schema={**delta_schema, _ORDER: pl.Int64, _PART: pl.Int64})
    )
    newest = every.filter(pl.col(_ORDER) == pl.col(_ORDER).max().over(meta.key_columns))
    live = newest.filter(~pl.col(_DELETED))
    counts = live.get_column(_PART).value_counts()
    found = dict(zip(counts.get_column(_PART).to_list(), counts.get_column("count").to_list()))
    for p, expected in enumerate(chain[0].rows_per_partition):
        if found.get(p, 0) != expected:
            msg = (
                f"state in {storage.display('')}: partition {p} has {found.get(p, 0)} rows "
                f"after rebuilding version {version}, but "
                f"{storage.display(f'versions/{version}.json')} records {expected}"
            )
            raise CheckpointCorruptError(msg)
    return Format1State(metadata=meta, schema=schema, frame=live.select(list(schema)))


def _read_version(storage: Storage, version: int) -> Format1Version:
    name = f"versions/{version}.json"
    try:
        entry = storage.read_model(name, Format1Version, checksum=False)
    except FileNotFoundError:
        msg = f"format-1 state file {storage.display(name)} is missing"
        raise CheckpointCorruptError(msg) from None
    if entry.version != version:
        msg = (
            f"checkpoint file {storage.display(name)} is corrupt: it holds version {entry.version}"
        )
        raise CheckpointCorruptError(msg)
    return entry


def _read_file(
    storage: Storage, name: str, schema: pl.Schema, checksums: dict[str, int]
) -> pl.DataFrame:
    where = storage.display(name)
    try:
        data = storage.read_bytes(name)
    except FileNotFoundError:
        msg = f"format-1 state file {where} is missing; its version manifest lists it"
        raise CheckpointCorruptError(msg) from None
    expected = checksums.get(name)
    if expected is not None and zlib.crc32(data) != expected:
        msg = (
            f"state file {where} is corrupt: its CRC-32 is {zlib.crc32(data):08x}, the version "
            f"that wrote it recorded {expected:08x}"
        )
        raise CheckpointCorruptError(msg)
    try:
        frame = pl.read_ipc(data)
    except Exception as exc:  # polars raises various errors on bad bytes
        msg = f"state file {where} is corrupt or truncated ({len(data)} bytes): {exc}"
        raise CheckpointCorruptError(msg) from None
    if frame.schema != schema:
        msg = f"state file {where} does not hold the store's columns: " + describe_schema_change(
            schema, frame.schema
        )
        raise CheckpointCorruptError(msg)
    return frame
