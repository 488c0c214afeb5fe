"""Removing the files of a state store that no retained version needs.

A store keeps every file needed to rebuild its last ``min_versions_to_retain``
versions; since what a version needs (its manifests and files back to the oldest
base of its key groups) only moves forward with the version, everything older
than what the oldest retained version needs goes (:func:`delete_below`).

That includes the temporaries a writer killed between write and rename left in the
flat folders (``segments/.7.0-8.arrow.<hex>.tmp``): a restart removes them with the
lock held, but a run that goes on (a cluster owner replaced mid-run, a store used
outside a query) would keep them forever. Only a temporary of a version below what the
oldest retained version needs goes: a running commit writes a newer version, so none
it may still rename is ever touched.
"""

from __future__ import annotations

from microstream.checkpoint.storage import Storage, temporary_target
from microstream.state.format import (
    DELTAS_DIR,
    MARKS_DIR,
    SEGMENTS_DIR,
    SNAPSHOTS_DIR,
    VERSIONS_DIR,
    segment_file_version,
)

__all__ = ["delete_below"]


def delete_below(storage: Storage, keep_from: int) -> None:
    """Delete the manifests, deltas and snapshots (a segment buffer's segments and marks)
    of every version below ``keep_from``, and the temporaries a killed writer left of them.

    Examples
    --------
    >>> storage = Storage("memory://doctest-retention")
    >>> for name in ("versions/3.json", "versions/5.json", "deltas/3.arrow", "snapshots/4/0-8.arrow",
    ...              "segments/4/0-8.arrow", "segments/5/0-8.arrow", "marks/2/0-8.arrow",
    ...              "segments/4.0-8.arrow", "segments/5.0-8.arrow", "marks/3.0-8.arrow"):
    ...     storage.write_bytes(name, b"x")
    >>> hexed = "." + "0" * 32 + ".tmp"  # (what makes a temporary's name unique)
    >>> for name in ("segments/.4.0-8.arrow", "segments/.5.0-8.arrow", "versions/.3.json"):
    ...     storage.write_bytes(name + hexed, b"x")
    >>> delete_below(storage, 5)
    >>> storage.list_names("versions"), storage.list_names("snapshots")
    (['5.json'], [])
    >>> storage.list_names("segments"), storage.list_names("marks")
    (['.5.0-8.arrow.00000000000000000000000000000000.tmp', '5', '5.0-8.arrow'], [])
    """
    for folder in (VERSIONS_DIR, DELTAS_DIR, SNAPSHOTS_DIR, SEGMENTS_DIR, MARKS_DIR):
        for name in storage.list_names(folder):
            target = temporary_target(name)
            if target is not None:
                written = segment_file_version(target)
                if written is not None and written < keep_from:
                    storage.delete(f"{folder}/{name}")
                continue
            written = _version_of(folder, name)
            if written is None or written >= keep_from:
                continue
            if name.isdigit():  # (a version's folder: snapshots, owners' deltas, older buffers)
                storage.sub(f"{folder}/{name}").delete_tree()
            else:
                storage.delete(f"{folder}/{name}")


def _version_of(folder: str, name: str) -> int | None:
    """The version of an entry of a store's folder that retention deletes; None: keep it."""
    if folder == VERSIONS_DIR:
        stem = name.removesuffix(".json")
        return int(stem) if stem != name and stem.isdigit() else None
    if folder == DELTAS_DIR:
        stem = name.removesuffix(".arrow")  # (a file deltas/<v>.arrow, or a folder deltas/<v>)
        return int(stem) if stem.isdigit() else None
    if folder == SNAPSHOTS_DIR:
        return int(name) if name.isdigit() else None
    return segment_file_version(name)
