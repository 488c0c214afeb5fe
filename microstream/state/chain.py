"""Reading the chain of state manifests that rebuilds one version of a state store.

A version's manifest (``versions/<version>.json``) names its parent; a load reads
manifests back from the wanted version until every key group it loads has a base (a
full snapshot, snapshot files of some key-group ranges in delta versions — spread
snapshots, :mod:`microstream.state.rotation` —, or the empty state) and checks each
one is well formed before any file it lists is read.
"""

from __future__ import annotations

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointCorruptError
from microstream.state.format import (
    VERSIONS_DIR,
    StateVersion,
    covers_key_groups,
    describe_ranges,
    disjoint_in_order,
    version_file,
)
from microstream.state.rotation import covered

__all__ = ["read_chain"]


def read_chain(
    storage: Storage,
    operator: str,
    num_key_groups: int,
    version: int,
    key_groups: tuple[int, int] | None = None,
) -> list[StateVersion]:
    """Manifests from ``version`` back until each of ``key_groups`` (default: all) has a
    base: a full snapshot, snapshot files covering it, or the empty state."""
    lo, hi = key_groups or (0, num_key_groups)
    chain = [_read_version(storage, operator, num_key_groups, version, wanted=version)]
    while not chain[-1].snapshot and chain[-1].parent is not None and not covered(chain, lo, hi):
        chain.append(
            _read_version(storage, operator, num_key_groups, chain[-1].parent, wanted=version)
        )
    return chain


def _read_version(
    storage: Storage, operator: str, num_key_groups: int, version: int, *, wanted: int
) -> StateVersion:
    name = version_file(version)
    try:
        entry = storage.read_model(name, StateVersion)
    except FileNotFoundError:
        committed = storage.list_numbered(VERSIONS_DIR)
        if version != wanted and committed and version < committed[0]:
            # (its manifests are kept, but what it needs is older than the retention bound)
            why = (
                f"version {wanted} is no longer retained: it needs version {version}, older "
                f"than the oldest on disk ({committed[0]})"
            )
        elif version != wanted:
            why = f"it is needed to rebuild version {wanted} but is missing"
        elif not committed:
            why = "no state version was ever committed"
        elif version < committed[0]:
            why = f"version {version} is no longer retained (oldest on disk: {committed[0]})"
        elif version > committed[-1]:
            why = f"version {version} was never committed (newest on disk: {committed[-1]})"
        else:
            why = f"version {version} is missing (versions on disk: {describe_ranges(committed)})"
        msg = f"state of operator {operator!r}: {storage.display(name)}: {why}"
        raise CheckpointCorruptError(msg) from None
    n = num_key_groups
    ranges = [f.key_groups for f in entry.files]
    kinds = {f.kind for f in entry.files}
    # a delta version may also hold snapshot files of some ranges (a spread snapshot)
    by_kind = {k: [f.key_groups for f in entry.files if f.kind == k] for k in kinds}
    well_formed = (
        entry.version == version
        and len(entry.rows_per_key_group) == n
        and (entry.parent is None or entry.parent < version)
        and all(0 <= lo < hi <= n for lo, hi in ranges)
        and (
            (kinds <= {"snapshot"} and covers_key_groups(ranges, n))
            if entry.snapshot
            else all(disjoint_in_order(r) for r in by_kind.values())
        )
    )
    if not well_formed:
        msg = (
            f"checkpoint file {storage.display(name)} is corrupt: it describes version "
            f"{entry.version} (parent {entry.parent}) with {len(entry.rows_per_key_group)} "
            f"key groups and files {ranges}; expected version {version} with {n} key groups"
        )
        raise CheckpointCorruptError(msg)
    return entry
