"""Snapshots spread over key-group slices: which groups a version snapshots, and where a
load of a version finds each group's newest snapshot.

A small store writes a full snapshot every ``snapshot_every`` versions. A large one
(``spread_snapshots_above`` rows) never snapshots the whole state at once: its key
groups are cut into contiguous *slices* (:func:`spread_slices`: 32 of 128 groups),
and a version snapshots, next to its delta, only the slices under *pressure*
(:func:`slices_by_pressure`): those whose delta rows since their last snapshot reach
their rows, or whose oldest group has gone ``AGE_FACTOR * snapshot_every`` versions
without one; and, when none does, the one slice under the most pressure once it is
past half. So the rows a version writes follow the rows the batch changed, not the
size of the state, no version snapshots everything, and a load still replays, per
slice, fewer delta rows than the slice holds and at most ``AGE_FACTOR *
snapshot_every`` versions. (Every group snapshotted within ``snapshot_every``
versions, the rule of a small store and of RayRuntime's owners, would make every
version of a large state write ``1/snapshot_every`` of it: the cost then grows with
the state.)

On disk such a version is an ordinary delta version (``"snapshot": false``) whose
manifest also lists ``snapshot`` files for some key-group ranges: the rows of those
groups as of that version. Each key group's *base* is the newest snapshot file
covering it at or before the loaded version (or the empty state, when the chain of
versions reaches one built on nothing); a load reads that file's rows of the group
and replays only the deltas of later versions (:func:`resolve_bases`), whatever rule
chose the slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from microstream.state.format import KEY_GROUP_COLUMN, StateFile, StateVersion
from microstream.state.key_groups import key_group_ranges

__all__ = [
    "EMPTY_BASE",
    "ONE_FILE_SNAPSHOT_ROWS",
    "SNAPSHOT_FILES",
    "covered",
    "due_groups",
    "full_snapshot_ranges",
    "resolve_bases",
    "rows_after_base",
    "rows_based_at",
    "slices_by_pressure",
    "slices_to_write",
    "snapshot_slices",
    "spread_slices",
]

EMPTY_BASE = -1
"""A group's base when no snapshot covers it: the empty state the chain started from."""
_UNSET = -2

SNAPSHOT_FILES = 4
"""Files of a full snapshot of a store at or above :data:`ONE_FILE_SNAPSHOT_ROWS` rows
(unless the store names another number): contiguous key-group ranges."""

ONE_FILE_SNAPSHOT_ROWS = 10_000
"""Below this many rows a full snapshot is one file covering every key group: each file
costs a create and a rename, and a split saves nothing when reading the whole state is
cheap (a load of a key-group range reads the file and keeps that range's rows)."""


def full_snapshot_ranges(
    num_key_groups: int, rows: int, snapshot_files: int | None
) -> list[tuple[int, int]]:
    """The key-group ranges, one file each, of a full snapshot of a store of ``rows``
    rows: ``snapshot_files`` of them when the store names a number, else one range below
    :data:`ONE_FILE_SNAPSHOT_ROWS` rows and :data:`SNAPSHOT_FILES` from there on.

    Examples
    --------
    >>> full_snapshot_ranges(128, 3, None)
    [(0, 128)]
    >>> full_snapshot_ranges(128, 50_000, None)
    [(0, 32), (32, 64), (64, 96), (96, 128)]
    >>> full_snapshot_ranges(4, 3, 2)
    [(0, 2), (2, 4)]
    """
    if snapshot_files is None:
        snapshot_files = 1 if rows < ONE_FILE_SNAPSHOT_ROWS else SNAPSHOT_FILES
    return key_group_ranges(num_key_groups, snapshot_files)


def snapshot_slices(num_key_groups: int, snapshot_every: int) -> list[tuple[int, int]]:
    """The contiguous key-group slices of a small store or an owner: ``snapshot_every`` of
    them, a slice snapshotted when one of its groups is due (:func:`slices_to_write`).

    Examples
    --------
    >>> snapshot_slices(128, 10)[:3]
    [(0, 12), (12, 25), (25, 38)]
    >>> snapshot_slices(4, 10)
    [(0, 1), (1, 2), (2, 3), (3, 4)]
    """
    return key_group_ranges(num_key_groups, snapshot_every)


def covered(chain: Sequence[StateVersion], lo: int, hi: int) -> bool:
    """Whether the snapshot files of ``chain`` (newest first) cover key groups ``[lo, hi)``.

    Examples
    --------
    >>> f = StateFile(name="snapshots/3/0-2.arrow", kind="snapshot", key_groups=(0, 2),
    ...               rows=0, crc32=0)
    >>> v = StateVersion(version=3, parent=2, snapshot=False, files=[f],
    ...                  rows_per_key_group=[0] * 4)
    >>> covered([v], 0, 2), covered([v], 0, 4)
    (True, False)
    """
    seen = np.zeros(hi - lo, dtype=bool)
    for entry in chain:
        for f in entry.files:
            if f.kind == "snapshot":
                a, b = max(f.key_groups[0], lo), min(f.key_groups[1], hi)
                if a < b:
                    seen[a - lo : b - lo] = True
    return bool(seen.all())


def resolve_bases(
    chain: Sequence[StateVersion], lo: int, hi: int, num_key_groups: int
) -> tuple[np.ndarray, list[tuple[StateFile, int]]]:
    """Each group's base version and the snapshot files to read, for groups ``[lo, hi)``.

    Parameters
    ----------
    chain
        Manifests from the loaded version back (newest first).

    Returns
    -------
    tuple
        ``bases``: for every key group (``num_key_groups`` of them), the version of the
        newest snapshot file covering it in ``chain``, :data:`EMPTY_BASE` when none does
        (groups outside ``[lo, hi)`` too); and the snapshot files that are some group's
        base, each with its version, oldest first.

    Examples
    --------
    >>> def snap(v, lo, hi):
    ...     return StateFile(name=f"snapshots/{v}/{lo}-{hi}.arrow", kind="snapshot",
    ...                      key_groups=(lo, hi), rows=0, crc32=0)
    >>> v5 = StateVersion(version=5, parent=4, snapshot=False, files=[snap(5, 0, 2)],
    ...                   rows_per_key_group=[0] * 4)
    >>> v4 = StateVersion(version=4, parent=None, snapshot=True,
    ...                   files=[snap(4, 0, 2), snap(4, 2, 4)], rows_per_key_group=[0] * 4)
    >>> bases, files = resolve_bases([v5, v4], 0, 4, 4)
    >>> bases.tolist(), [(f.name, v) for f, v in files]
    ([5, 5, 4, 4], [('snapshots/4/2-4.arrow', 4), ('snapshots/5/0-2.arrow', 5)])
    """
    bases = np.full(num_key_groups, _UNSET, dtype=np.int64)
    bases[:lo] = EMPTY_BASE
    bases[hi:] = EMPTY_BASE
    files: list[tuple[StateFile, int]] = []
    for entry in chain:
        for f in entry.files:
            if f.kind != "snapshot":
                continue
            a, b = max(f.key_groups[0], lo), min(f.key_groups[1], hi)
            if a < b and (bases[a:b] == _UNSET).any():
                bases[a:b][bases[a:b] == _UNSET] = entry.version
                files.append((f, entry.version))
    bases[bases == _UNSET] = EMPTY_BASE
    return bases, files[::-1]


def due_groups(
    bases: np.ndarray, chain_versions: Sequence[int], snapshot_every: int, lo: int, hi: int
) -> np.ndarray:
    """Which of the groups ``[lo, hi)`` must be snapshotted by the next version: those
    with ``snapshot_every - 1`` versions after their base already (a boolean mask over
    every group, false outside ``[lo, hi)``).

    Examples
    --------
    >>> due_groups(np.array([3, 1, -1]), [1, 2, 3], 3, 0, 3).tolist()
    [False, True, True]
    """
    versions = np.asarray(chain_versions, dtype=np.int64)
    after_base = versions.size - np.searchsorted(versions, bases, side="right")
    due = after_base + 1 >= snapshot_every
    due[:lo] = False
    due[hi:] = False
    return due


def slices_to_write(
    due: np.ndarray, snapshot_every: int, lo: int, hi: int
) -> list[tuple[int, int]]:
    """The key-group ranges (slices cut at ``[lo, hi)``) holding a due group: what a
    version of a small store, or of an owner of a range, snapshots.

    Examples
    --------
    >>> due = np.zeros(8, dtype=bool)
    >>> slices_to_write(due, 4, 0, 8)
    []
    >>> due[6] = True
    >>> slices_to_write(due, 4, 0, 8), slices_to_write(due, 4, 3, 7)
    ([(6, 8)], [(6, 7)])
    """
    out = []
    for start, stop in snapshot_slices(due.size, snapshot_every):
        a, b = max(start, lo), min(stop, hi)
        if a < b and bool(due[a:b].any()):
            out.append((a, b))
    return out


def rows_based_at(frame: pl.DataFrame, bases: np.ndarray, version: int) -> pl.DataFrame:
    """The rows of a snapshot file of ``version`` whose key group has it as its base (a
    newer snapshot of a group, e.g. in a slice cut otherwise, replaces it).

    Examples
    --------
    >>> rows = pl.DataFrame({"__key_group": [0, 1, 2]}, schema={"__key_group": pl.UInt16})
    >>> rows_based_at(rows, np.array([4, 7, 4]), 4)["__key_group"].to_list()
    [0, 2]
    """
    keep = bases[frame.get_column(KEY_GROUP_COLUMN).to_numpy()] == version
    return frame if keep.all() else frame.filter(pl.Series(keep))


def rows_after_base(frame: pl.DataFrame, bases: np.ndarray, version: int) -> pl.DataFrame:
    """The rows of a delta file of ``version`` whose key group's base is older.

    Examples
    --------
    >>> rows = pl.DataFrame({"__key_group": [0, 1, 2]}, schema={"__key_group": pl.UInt16})
    >>> rows_after_base(rows, np.array([4, 7, -1]), 5)["__key_group"].to_list()
    [0, 2]
    """
    keep = bases[frame.get_column(KEY_GROUP_COLUMN).to_numpy()] < version
    return frame if keep.all() else frame.filter(pl.Series(keep))


SPREAD_SLICES = 32
"""A large store cuts its key groups into this many slices (or ``snapshot_every``, if
more; at most one per group): smaller slices, smaller snapshot writes."""
AGE_FACTOR = 10
"""A large store snapshots every group within ``AGE_FACTOR * snapshot_every`` versions."""


def spread_slices(num_key_groups: int, snapshot_every: int) -> list[tuple[int, int]]:
    """The key-group slices of a large store (:func:`slices_by_pressure`).

    Examples
    --------
    >>> len(spread_slices(128, 10)), spread_slices(128, 10)[:2]
    (32, [(0, 4), (4, 8)])
    >>> spread_slices(4, 10)
    [(0, 1), (1, 2), (2, 3), (3, 4)]
    """
    count = min(num_key_groups, max(snapshot_every, SPREAD_SLICES))
    return key_group_ranges(num_key_groups, count)


def slices_by_pressure(
    since: np.ndarray,
    rows: np.ndarray,
    bases: np.ndarray,
    chain_versions: Sequence[int],
    snapshot_every: int,
    lo: int,
    hi: int,
) -> list[tuple[int, int]]:
    """The slices of ``[lo, hi)`` a version of a large store snapshots, by *pressure*:
    the larger of a slice's delta rows since its groups' bases over its rows, and its
    oldest group's age (versions after its base, this one included) over
    ``AGE_FACTOR * snapshot_every``.

    Every slice at pressure 1 or more is snapshotted (a load then replays at most about
    the state's rows in deltas, and at most that many versions); when none is, the one
    under the most pressure, if at 1/2 or more: slices that fill at the same rate (keys
    spread evenly) are so taken one per version before any reaches 1, and write cost
    follows the rows changed, not the state's size.

    Parameters
    ----------
    since
        Per key group: delta rows written since its base, this version's included.
    rows
        Per key group: its rows as of this version.
    bases, chain_versions
        Per key group its base version; the versions of the chain (oldest first), as
        for :func:`due_groups`.

    Examples
    --------
    >>> rows = np.array([100, 100, 100, 100])
    >>> none = np.array([-1, -1, -1, -1])
    >>> slices_by_pressure(np.array([10, 60, 0, 0]), rows, none, [0], 10, 0, 4)
    [(1, 2)]
    >>> slices_by_pressure(np.array([100, 200, 0, 0]), rows, none, [0], 10, 0, 4)
    [(0, 1), (1, 2)]
    >>> slices_by_pressure(np.array([1, 1, 1, 1]), rows, none, [0], 10, 0, 4)  # no pressure
    []
    >>> slices_by_pressure(np.array([1, 1, 1, 1]), rows, np.array([0, 60, 60, 60]),
    ...                    list(range(100)), 10, 0, 4)  # group 0's base is 99 versions old
    [(0, 1)]
    """
    versions = np.asarray(chain_versions, dtype=np.int64)
    age = versions.size - np.searchsorted(versions, bases, side="right") + 1
    pressures: list[tuple[float, tuple[int, int]]] = []
    for start, stop in spread_slices(since.size, snapshot_every):
        a, b = max(start, lo), min(stop, hi)
        if a < b:
            by_rows = float(since[a:b].sum()) / max(int(rows[a:b].sum()), 1)
            by_age = float(age[a:b].max()) / (AGE_FACTOR * snapshot_every)
            pressures.append((max(by_rows, by_age), (a, b)))
    due = [cut for pressure, cut in pressures if pressure >= 1]
    if due or not pressures:
        return due
    pressure, cut = max(pressures, key=lambda p: p[0])
    return [cut] if pressure >= 0.5 else []
