"""Removing the files of a state store that no retained version needs.

A store keeps every file needed to rebuild its last ``min_versions_to_retain``
versions; since what a version needs (its manifests and files back to the oldest
base of its key groups) only moves forward with the version, everything older
than what the oldest retained version needs goes (:func:`delete_below`).
"""

from __future__ import annotations

from microstream.checkpoint.storage import Storage
from microstream.state.format import (
    DELTAS_DIR,
    MARKS_DIR,
    SEGMENTS_DIR,
    SNAPSHOTS_DIR,
    VERSIONS_DIR,
    delta_file,
    segment_file_version,
    version_file,
)

__all__ = ["delete_below"]


def delete_below(storage: Storage, keep_from: int) -> None:
    """Delete the manifests, deltas and snapshots (a segment buffer's segments and marks)
    of every version below ``keep_from``.

    Examples
    --------
    >>> storage = Storage("memory://doctest-retention")
    >>> for name in ("versions/3.json", "versions/5.json", "deltas/3.arrow", "snapshots/4/0-8.arrow",
    ...              "segments/4/0-8.arrow", "segments/5/0-8.arrow", "marks/2/0-8.arrow",
    ...              "segments/4.0-8.arrow", "segments/5.0-8.arrow", "marks/3.0-8.arrow"):
    ...     storage.write_bytes(name, b"x")
    >>> delete_below(storage, 5)
    >>> storage.list_numbered("versions"), storage.list_names("snapshots")
    ([5], [])
    >>> storage.list_names("segments"), storage.list_names("marks")
    (['5', '5.0-8.arrow'], [])
    """
    for v in storage.list_numbered(VERSIONS_DIR):
        if v < keep_from:
            storage.delete(version_file(v))
    for v in storage.list_numbered(DELTAS_DIR, ".arrow"):
        if v < keep_from:
            storage.delete(delta_file(v))
    for name in storage.list_names(DELTAS_DIR):  # the owners' deltas/<v>/ directories
        if name.isdigit() and int(name) < keep_from:
            storage.sub(f"{DELTAS_DIR}/{name}").delete_tree()
    for name in storage.list_names(SNAPSHOTS_DIR):
        if name.isdigit() and int(name) < keep_from:
            storage.sub(f"{SNAPSHOTS_DIR}/{name}").delete_tree()
    for folder in (SEGMENTS_DIR, MARKS_DIR):
        for name in storage.list_names(folder):
            written = segment_file_version(name)
            if written is None or written >= keep_from:
                continue
            if name.isdigit():  # (a version's folder, as buffers wrote them before)
                storage.sub(f"{folder}/{name}").delete_tree()
            else:
                storage.delete(f"{folder}/{name}")
