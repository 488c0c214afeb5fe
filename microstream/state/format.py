"""The on-disk format of a state store: its records, file names and Arrow IPC encoding.

See :mod:`microstream.state.store` for the layout of ``state/<operator>/`` and
``checkpoints/README.md`` for the format as a whole. No pickle: state is data.
"""

from __future__ import annotations

import base64
import zlib
from typing import Literal, TypeAlias

import polars as pl
import pyarrow as pa
import pyarrow.ipc as pa_ipc
from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DELTA_SUFFIX",
    "METADATA_FILE",
    "SNAPSHOT_SUFFIX",
    "STATE_FORMAT_VERSION",
    "VERSIONS_DIR",
    "Compression",
    "StateMetadata",
    "StateRecord",
    "StateVersion",
    "checksum",
    "decode_frame",
    "describe_schema_change",
    "encode_frame",
    "frame_from_text",
    "frame_to_text",
    "pyarrow_round_trips",
    "version_file",
]

STATE_FORMAT_VERSION = 1
METADATA_FILE = "_metadata.json"
VERSIONS_DIR = "versions"
DELTA_SUFFIX = ".delta.arrow"
SNAPSHOT_SUFFIX = ".snapshot.arrow"
Compression: TypeAlias = Literal["lz4", "zstd"] | None


class StateRecord(BaseModel):
    """Base of the state records: frozen, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class StateMetadata(StateRecord):
    """``state/<operator>/_metadata.json``: what the state files mean.

    ``schema`` is for people; ``schema_ipc`` (an empty Arrow IPC file, base64)
    restores the dtypes exactly. ``hash_probe`` holds the partition of each row
    of the ``probe_ipc`` key frame under the hash that placed the rows: when a
    Polars upgrade changes the hash, the probe no longer matches and the state
    is re-partitioned on load.
    """

    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_by_name=True, serialize_by_alias=True
    )

    format_version: int = STATE_FORMAT_VERSION
    operator: str
    key_columns: list[str]
    hash_columns: list[str] | None = None
    """The key columns the hash (and so the partition) is computed over; None: all."""
    schema_: dict[str, str] = Field(alias="schema")
    schema_ipc: str
    num_partitions: int
    snapshot_every: int
    hash_seed: int
    hash_probe: list[int]
    probe_ipc: str
    polars_version: str


class StateVersion(StateRecord):
    """``state/<operator>/versions/<version>.json``: one committed version.

    Written after the version's data files, so its presence is the commit.
    """

    format_version: int = STATE_FORMAT_VERSION
    version: int
    parent: int | None
    """The version this one was built on; ``None``: built on the empty state."""
    snapshot: bool
    """Every partition wrote ``<version>.snapshot.arrow``."""
    partitions: list[int]
    """Partitions that wrote ``<version>.delta.arrow`` (empty for a snapshot)."""
    rows_per_partition: list[int]
    hash_probe: list[int]
    checksums: dict[str, int] = Field(default_factory=dict)
    """CRC-32 of each data file the version wrote, by its name in the operator's
    directory (``"3/17.delta.arrow"``); a load verifies it, so a flipped bit or a
    rewritten file is an error, never silently wrong state. Empty in versions written
    before checksums existed (their files are not verified)."""


def version_file(version: int) -> str:
    return f"{VERSIONS_DIR}/{version}.json"


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
