"""Range-owned commits: several owners write one version of a store, one manifest commits it.

A cluster runtime splits an operator's state between workers, each owning a
contiguous range of key groups (:meth:`StateStore.load` with ``key_groups=``).
For version N every owner writes its own data files and returns a
:class:`~microstream.state.format.StatePart` (:meth:`StateStore.write_part`); once
every owner returned, the driver calls :func:`commit_parts`, which checks that the
parts cover every key group exactly once and agree on the version, its parent and
its kind, and writes ``versions/<N>.json`` listing all their files. As for a store
that owns every group, that manifest is the commit point: a version some owners
wrote but whose manifest is missing does not exist, and the next run overwrites
its files. Owners never write a manifest, so no two processes write one file.
"""

from __future__ import annotations

from collections.abc import Sequence

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointError
from microstream.state.format import (
    SegmentVersion,
    StatePart,
    StateVersion,
    covers_key_groups,
    version_file,
)

__all__ = ["commit_parts"]


def commit_parts(
    storage: Storage, parts: Sequence[StatePart], num_key_groups: int
) -> StateVersion | SegmentVersion:
    """Write the manifest of the version the owners' ``parts`` hold; return it.

    Parameters
    ----------
    storage
        The store's directory, ``state/<operator>/<store>/``.
    parts
        One part per owner, in any order.
    num_key_groups
        The checkpoint's number of key groups, which the parts must cover.

    Raises
    ------
    CheckpointError
        The parts leave out or overlap key groups, or disagree on the version, its
        parent, whether it is a snapshot, the layout or a segment buffer's eviction cut.
        A segment buffer's parts (``layout="segments"``) make a :class:`SegmentVersion`.

    Examples
    --------
    >>> from microstream.state.format import StateFile
    >>> storage = Storage("memory://doctest-commit-parts")
    >>> def part(lo, hi, rows):
    ...     f = StateFile(name=f"deltas/0/{lo}-{hi}.arrow", kind="delta", key_groups=(lo, hi),
    ...                   rows=sum(rows), crc32=0)
    ...     return StatePart(version=0, parent=None, snapshot=False, key_groups=(lo, hi),
    ...                      files=[f], rows_per_key_group=rows)
    >>> entry = commit_parts(storage, [part(2, 4, [0, 5]), part(0, 2, [1, 0])], 4)
    >>> [f.key_groups for f in entry.files], entry.rows_per_key_group
    ([(0, 2), (2, 4)], [1, 0, 0, 5])
    >>> commit_parts(storage, [part(0, 2, [1, 0])], 4)
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointError: cannot commit version 0 of the state in memory:///doctest-commit-parts: its owners wrote key groups [(0, 2)], which do not cover 0-3 exactly once
    """
    ordered = sorted(parts, key=lambda p: p.key_groups)
    where = (
        f"version {ordered[0].version if ordered else '?'} of the state in {storage.display('')}"
    )
    ranges = [p.key_groups for p in ordered]
    if not covers_key_groups(ranges, num_key_groups) or any(
        len(p.rows_per_key_group) != p.key_groups[1] - p.key_groups[0] for p in ordered
    ):
        msg = (
            f"cannot commit {where}: its owners wrote key groups {ranges}, which do not cover "
            f"0-{num_key_groups - 1} exactly once"
        )
        raise CheckpointError(msg)
    kinds = {(p.version, p.parent, p.snapshot) for p in ordered}
    if len(kinds) != 1:
        msg = (
            f"cannot commit {where}: its owners disagree on (version, parent, snapshot): "
            f"{sorted(kinds, key=str)}; every owner must load the same version before writing"
        )
        raise CheckpointError(msg)
    layouts = {(p.layout, p.evicted_through_us) for p in ordered}
    if len(layouts) != 1:
        msg = (
            f"cannot commit {where}: its owners disagree on (layout, eviction cut): "
            f"{sorted(layouts, key=str)}; every owner of a segment buffer evicts through the "
            "same watermark"
        )
        raise CheckpointError(msg)
    first = ordered[0]
    files = [f for p in ordered for f in sorted(p.files, key=lambda f: f.key_groups)]
    rows = [n for p in ordered for n in p.rows_per_key_group]
    if first.layout == "segments":
        segments = SegmentVersion(
            version=first.version,
            parent=first.parent,
            files=files,
            rows_per_key_group=rows,
            evicted_through_us=first.evicted_through_us,
        )
        storage.write_model(version_file(first.version), segments)
        return segments
    entry = StateVersion(
        version=first.version,
        parent=first.parent,
        snapshot=first.snapshot,
        files=files,
        rows_per_key_group=rows,
    )
    storage.write_model(version_file(first.version), entry)
    return entry
