"""``microstream migrate``: convert a format-1 checkpoint to format 2, in place.

What changes (``checkpoints/README.md`` has both formats):

- every state store (``state/<op>/<store>/``) is rewritten as one format-2
  snapshot, split into key groups, at the version of the last committed batch
  (its newer, uncommitted versions are dropped: the batch they belonged to is
  re-run from the WAL, as after any crash); the format-1 partition files go;
- every JSON file of the WAL, the commits, the source logs and ``sinks/`` gets
  its checksum;
- ``metadata.json`` records format 2 and the number of key groups: written
  last, it is the switch.

A migration that stops half-way (killed, a full disk) is finished by running
it again: a store is first written whole into ``state/<op>/<store>/migrating/``
and only then installed (its ``_metadata.json`` last), a JSON file that already
carries a valid checksum is left as it is, and ``migrating.json`` at the
checkpoint's root keeps what the first run chose (the key groups, the version).
Until ``metadata.json`` is rewritten this microstream refuses the checkpoint as
format 1; a re-run refuses to go on if a query committed batches meanwhile.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict

from microstream.checkpoint.checksums import CHECKSUM_MEMBER, is_sealed, seal, unseal
from microstream.checkpoint.log import FORMAT_VERSION, Checkpoint, CheckpointMetadata
from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointCorruptError, CheckpointError
from microstream.state.format import (
    METADATA_FILE,
    VERSIONS_DIR,
    StateMetadata,
    StateVersion,
    version_file,
)
from microstream.state.format1 import is_format1_store, read_format1_store
from microstream.state.key_groups import DEFAULT_KEY_GROUPS
from microstream.state.rotation import SNAPSHOT_FILES
from microstream.state.store import StateStore
from microstream.time.windows import END, START

__all__ = ["MigrationPlan", "migrate_checkpoint"]

JOURNAL = "migrating.json"
"""At the checkpoint's root while a migration runs: what it decided."""
STAGING = "migrating"
"""In a store's directory: the format-2 store, complete before it is installed."""
_SEALED_DIRS = ("offsets", "commits", "sources", "sinks")


class _Journal(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key_groups: int
    version: int | None
    """The state version every store is migrated at (the last committed batch; None: none)."""


class MigrationPlan(BaseModel):
    """What :func:`migrate_checkpoint` does (or did) to a checkpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint: str
    key_groups: int
    version: int | None
    """The last committed batch: every store's state as of it becomes a snapshot."""
    stores: list[str]
    """``op0/keys``, ... (for ``version`` None: deleted, no batch committed them)."""
    json_files: int
    """JSON files of ``offsets/``, ``commits/``, ``sources/`` and ``sinks/`` to checksum."""

    def describe(self) -> str:
        """One paragraph for a person deciding whether to go on."""
        stores = ", ".join(self.stores) or "none"
        state = (
            f"state stores ({stores}) rewritten as format-2 snapshots of version {self.version} "
            f"in {self.key_groups} key groups"
            if self.version is not None
            else f"no batch was committed: state stores ({stores}) deleted"
        )
        return (
            f"checkpoint {self.checkpoint}: format 1 -> 2 in place: {state}; "
            f"{self.json_files} JSON files given checksums; metadata.json last. Afterwards only "
            "this microstream (or a newer one) can run its query: back the checkpoint up "
            "first to be able to go back"
        )


def migrate_checkpoint(
    url: str,
    *,
    confirm: Callable[[MigrationPlan], bool],
    key_groups: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> MigrationPlan | None:
    """Convert the format-1 checkpoint at ``url`` to format 2; what was done (None: declined).

    The checkpoint's lock is taken first, so a running query is refused by
    name. ``confirm`` gets the plan before anything is written. Running it again
    after an interruption finishes the work.

    Parameters
    ----------
    url
        The checkpoint directory or URL.
    confirm
        Called with the plan; return False to stop without changing anything.
    key_groups
        The number of key groups of the migrated state (default 128); fixed from
        then on, as for a new checkpoint.

    Raises
    ------
    CheckpointError
        ``url`` is not a checkpoint, is already in format 2, or a resumed migration
        chose another number of key groups.
    CheckpointLockedError
        A running query holds the checkpoint.
    CheckpointCorruptError
        A file of the format-1 checkpoint is corrupt (the message names it).

    Examples
    --------
    >>> from microstream.checkpoint.log import Checkpoint
    >>> cp = Checkpoint("memory://doctest-migrate-new")
    >>> migrate_checkpoint("memory://doctest-migrate-new", confirm=lambda plan: True)
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointError: memory:///doctest-migrate-new is not a microstream checkpoint (no metadata.json): nothing to migrate
    """
    cp = Checkpoint(url, storage_options)
    storage = cp.storage
    if not storage.exists("metadata.json"):
        msg = (
            f"{cp.display()} is not a microstream checkpoint (no metadata.json): nothing to migrate"
        )
        raise CheckpointError(msg)
    found = cp.format_version()
    if found == FORMAT_VERSION:
        msg = (
            f"checkpoint {cp.display()} is already in format {FORMAT_VERSION}: nothing to "
            "migrate; run its query"
        )
        raise CheckpointError(msg)
    if found != 1:
        msg = (
            f"checkpoint {cp.display()} has format version {found}; `microstream migrate` "
            f"converts format 1 to {FORMAT_VERSION}"
        )
        raise CheckpointError(msg)
    cp.acquire_lock(f"migrate-{uuid.uuid4()}", timeout_s=30.0)
    try:
        cp.remove_temporary_files()
        journal = _journal(cp, key_groups)
        plan = MigrationPlan(
            checkpoint=cp.display(),
            key_groups=journal.key_groups,
            version=journal.version,
            stores=_stores(storage),
            json_files=len(_json_files(storage)),
        )
        if not confirm(plan):
            return None
        storage.write_model(JOURNAL, journal)
        for name in plan.stores:
            _migrate_store(storage.sub(f"state/{name}"), journal)
        for relative in _json_files(storage):
            _seal_file(storage, relative)
        old = json.loads(storage.read_bytes("metadata.json"))
        old.update(format_version=FORMAT_VERSION, key_groups=journal.key_groups)
        storage.write_model("metadata.json", CheckpointMetadata.model_validate(old))
        storage.delete(JOURNAL)
    finally:
        cp.release_lock()
    return plan


def _journal(cp: Checkpoint, key_groups: int | None) -> _Journal:
    """The decisions of a migration: the first run's if it was interrupted."""
    if cp.storage.exists(JOURNAL):
        journal = cp.storage.read_model(JOURNAL, _Journal)
        if key_groups is not None and key_groups != journal.key_groups:
            msg = (
                f"checkpoint {cp.display()} is half-way through a migration to "
                f"{journal.key_groups} key groups; run it again with --key-groups "
                f"{journal.key_groups} (or without --key-groups) to finish it"
            )
            raise CheckpointError(msg)
        latest = cp.storage.list_numbered("commits")
        if (latest[-1] if latest else None) != journal.version:
            msg = (
                f"checkpoint {cp.display()} is half-way through a migration of the state as of "
                f"batch {journal.version}, but its newest commit is now "
                f"{latest[-1] if latest else None}: a query ran on it meanwhile. Restore the "
                "checkpoint from the copy made before migrating and run the migration again"
            )
            raise CheckpointError(msg)
        return journal
    commits = cp.storage.list_numbered("commits")
    chosen = DEFAULT_KEY_GROUPS if key_groups is None else key_groups
    if not 1 <= chosen <= 1 << 16:
        msg = f"--key-groups must be from 1 to {1 << 16}; got {chosen}"
        raise CheckpointError(msg)
    return _Journal(key_groups=chosen, version=commits[-1] if commits else None)


def _stores(storage: Storage) -> list[str]:
    return [
        f"{op}/{store}"
        for op in storage.list_names("state")
        for store in storage.list_names(f"state/{op}")
    ]


def _json_files(storage: Storage) -> list[str]:
    return [
        f
        for f in storage.files()
        if f.split("/", 1)[0] in _SEALED_DIRS and f.endswith(".json") and "/." not in f
    ]


def _migrate_store(storage: Storage, journal: _Journal) -> None:
    """Rewrite one store as a format-2 snapshot at ``journal.version``; idempotent."""
    version = journal.version
    if version is None:  # no batch committed: a restart begins with empty state
        storage.delete_tree()
        return
    if not is_format1_store(storage):
        if not storage.exists(METADATA_FILE):
            storage.delete_tree()
            return
        storage.read_model(METADATA_FILE, StateMetadata)  # installed: checked, then tidied
        _remove_format1_files(storage, version)
        return
    staging = storage.sub(STAGING)
    if not staging.exists(version_file(version)):
        staging.delete_tree()
        old = read_format1_store(storage, version)
        meta = old.metadata
        store = StateStore(
            staging,
            operator=meta.operator,
            key_columns=meta.key_columns,
            hash_columns=meta.hash_columns or _format2_hash_columns(meta.key_columns),
            schema=old.schema,
            num_key_groups=journal.key_groups,
            snapshot_every=meta.snapshot_every,
            # a migrated state keeps the four-file layout, whatever its size
            snapshot_files=SNAPSHOT_FILES,
        )
        store.load(None)
        store.insert(old.frame)
        store.commit(version, snapshot=True)
    staged = staging.read_model(version_file(version), StateVersion)
    for entry in staged.files:
        storage.write_bytes(entry.name, staging.read_bytes(entry.name))
    storage.write_model(version_file(version), staged)
    for v in storage.list_numbered(VERSIONS_DIR):
        if v != version:
            storage.delete(version_file(v))
    storage.write_model(METADATA_FILE, staging.read_model(METADATA_FILE, StateMetadata))
    _remove_format1_files(storage, version)


def _format2_hash_columns(key_columns: list[str]) -> list[str] | None:
    """The key groups of a window aggregation's stores follow its group keys only (the
    window bounds left out: one owner holds every window of a key); format 1 hashed
    every key column. None: all key columns, as format 1 did."""
    keys = [c for c in key_columns if c not in (START, END)]
    return keys if keys and len(keys) < len(key_columns) else None


def _remove_format1_files(storage: Storage, version: int) -> None:
    """Delete the format-1 partition directories, old manifests and the staging copy."""
    for name in storage.list_names(""):
        if name.isdigit() or name == STAGING:
            storage.sub(name).delete_tree()
    for v in storage.list_numbered(VERSIONS_DIR):
        if v != version:
            storage.delete(version_file(v))


def _seal_file(storage: Storage, relative: str) -> None:
    """Give a JSON file its checksum; one that has a valid one already is left as it is."""
    raw = storage.read_bytes(relative)
    if is_sealed(raw):
        unseal(raw, storage.display(relative))  # a half-done run's file: check it
        return
    try:
        document = json.loads(raw)
    except ValueError as exc:
        msg = f"checkpoint file {storage.display(relative)} is corrupt: not JSON ({exc})"
        raise CheckpointCorruptError(msg) from None
    if not isinstance(document, dict) or not document or CHECKSUM_MEMBER in document:
        msg = (
            f"checkpoint file {storage.display(relative)} is corrupt: not a JSON object of "
            "a checkpoint record"
        )
        raise CheckpointCorruptError(msg)
    storage.write_bytes(relative, seal(json.dumps(document, indent=1).encode()))
