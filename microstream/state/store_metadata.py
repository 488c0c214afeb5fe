"""Checking a state store's ``_metadata.json`` against the store that opens it.

A store (:mod:`microstream.state.store`) refuses metadata of another state format
version and metadata written with other settings (operator, key columns, hash
columns, schema, number of key groups, hash algorithm): the messages name the file
and what changed.
"""

from __future__ import annotations

import binascii
import json

import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    PlanChangedError,
)
from microstream.state.format import (
    METADATA_FILE,
    STATE_FORMAT_VERSION,
    VERSIONS_DIR,
    StateMetadata,
    describe_schema_change,
    frame_from_text,
)
from microstream.state.key_groups import HASH_ALGORITHM

__all__ = ["check_metadata", "read_metadata", "refuse_other_format", "state_metadata"]


def state_metadata(
    *,
    operator: str,
    key_columns: list[str],
    hash_columns: list[str],
    schema: pl.Schema,
    schema_ipc: str,
    num_key_groups: int,
    snapshot_every: int,
) -> StateMetadata:
    """The ``_metadata.json`` record of a store with these settings (hash columns recorded
    only where they differ from the key columns)."""
    return StateMetadata(
        operator=operator,
        key_columns=key_columns,
        hash_columns=None if hash_columns == key_columns else hash_columns,
        schema={name: str(dtype) for name, dtype in schema.items()},
        schema_ipc=schema_ipc,
        num_key_groups=num_key_groups,
        hash_algorithm=HASH_ALGORITHM,
        snapshot_every=snapshot_every,
        polars_version=pl.__version__,
    )


def read_metadata(storage: Storage, operator: str) -> StateMetadata | None:
    """The store's ``_metadata.json`` (None: the store has none yet), refused when it
    records another state format version.

    Raises
    ------
    CheckpointCorruptError
        Versions were committed but the metadata is gone.
    CheckpointError, CheckpointFormatError
        As :func:`refuse_other_format`.

    Examples
    --------
    >>> read_metadata(Storage("memory://doctest-read-meta"), "op0") is None
    True
    """
    try:
        raw = storage.read_bytes(METADATA_FILE)
    except FileNotFoundError:
        if storage.list_numbered(VERSIONS_DIR):
            msg = (
                f"state of operator {operator!r} has committed versions but no "
                f"{storage.display(METADATA_FILE)}; restore it from a backup or delete "
                "the checkpoint to start over"
            )
            raise CheckpointCorruptError(msg) from None
        return None
    refuse_other_format(storage, raw)
    return storage.read_model(METADATA_FILE, StateMetadata)


def refuse_other_format(storage: Storage, raw: bytes) -> None:
    """Raise if the raw ``_metadata.json`` records another state format version.

    Raises
    ------
    CheckpointError
        A newer format: upgrade microstream.
    CheckpointFormatError
        An older format: migrate the checkpoint.

    Examples
    --------
    >>> refuse_other_format(Storage("memory://doctest-meta"), b'{"format_version": 2}')
    >>> refuse_other_format(Storage("memory://doctest-meta"), b'{"format_version": 9}')
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointError: memory:///doctest-meta/_metadata.json has state format version 9; this microstream reads version 2: upgrade microstream
    """
    try:
        found = json.loads(raw).get("format_version")
    except (ValueError, AttributeError):
        return  # not JSON: read_model names the file as corrupt
    if isinstance(found, int) and found != STATE_FORMAT_VERSION:
        newer = found > STATE_FORMAT_VERSION
        msg = f"{storage.display(METADATA_FILE)} has state format version {found}" + (
            f"; this microstream reads version {STATE_FORMAT_VERSION}: upgrade microstream"
            if newer
            else ", written by an older microstream; convert its checkpoint with "
            "`microstream migrate CHECKPOINT`, or re-run the query from the start of its "
            "input with a new checkpoint"
        )
        raise CheckpointError(msg) if newer else CheckpointFormatError(msg)


def check_metadata(
    storage: Storage,
    meta: StateMetadata,
    *,
    operator: str,
    key_columns: list[str],
    hash_columns: list[str],
    schema: pl.Schema,
    num_key_groups: int,
) -> None:
    """Raise :class:`PlanChangedError` if ``meta`` was written with other settings.

    Raises
    ------
    PlanChangedError
        The operator, key columns, hash columns, schema, number of key groups or hash
        algorithm differ from the stored ones; the message lists every difference.
    CheckpointCorruptError
        The stored ``schema_ipc`` is not a base64 Arrow IPC file.
    """
    stored_schema = _decode_metadata_frame(storage, meta.schema_ipc, "schema_ipc").schema
    problems = []
    if meta.operator != operator:
        problems.append(f"operator {meta.operator!r} -> {operator!r}")
    if meta.key_columns != key_columns:
        problems.append(f"key_columns {meta.key_columns} -> {key_columns}")
    if (meta.hash_columns or meta.key_columns) != hash_columns:
        problems.append(f"hash_columns {meta.hash_columns} -> {hash_columns}")
    if stored_schema != schema:
        problems.append(f"schema {describe_schema_change(stored_schema, schema)}")
    if meta.num_key_groups != num_key_groups:
        problems.append(f"num_key_groups {meta.num_key_groups} -> {num_key_groups}")
    if meta.hash_algorithm != HASH_ALGORITHM:
        problems.append(f"hash_algorithm {meta.hash_algorithm!r} -> {HASH_ALGORITHM!r}")
    if problems:
        msg = (
            f"the state in {storage.display(METADATA_FILE)} was written with other "
            "settings than this query uses: "
            + "; ".join(problems)
            + ". Use a new checkpoint for the changed query (the number of key groups is "
            "fixed when the checkpoint is created)"
        )
        raise PlanChangedError(msg)


def _decode_metadata_frame(storage: Storage, data: str, field: str) -> pl.DataFrame:
    try:
        return frame_from_text(data)
    except (binascii.Error, ValueError, pl.exceptions.PolarsError) as exc:
        msg = (
            f"checkpoint file {storage.display(METADATA_FILE)} is corrupt: field {field} "
            f"is not a base64 Arrow IPC file ({exc})"
        )
        raise CheckpointCorruptError(msg) from None
