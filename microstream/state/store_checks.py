"""The argument and schema checks of a state store (:mod:`microstream.state.store`).

Kept apart from the store so that the store module reads as what it does (hold,
change, persist and load keyed rows); the messages name the operator, the column
and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointError, SchemaMismatchError
from microstream.state.format import VERSIONS_DIR

__all__ = [
    "check_forward",
    "check_whole_commit",
    "conform",
    "key_group_range",
    "validate_store_arguments",
]


def check_forward(operator: str, version: int, current: int | None, pending: bool) -> bool:
    """Whether ``version`` is to be written by a store at version ``current`` (with
    uncommitted changes: ``pending``): it is past the current version (False: it is the
    current one and nothing changed since, a re-run batch); else raise.

    Examples
    --------
    >>> check_forward("op0", 4, 3, True), check_forward("op0", 3, 3, False)
    (True, False)
    >>> check_forward("op0", 2, 3, False)
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointError: cannot commit state version 2 of operator 'op0': the store is at version 3; versions only go forward (load an earlier version to re-run a batch)
    """
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        msg = f"state version must be a non-negative integer; got {version!r} instead"
        raise ValueError(msg)
    if current is not None and version <= current:
        if version == current and not pending:
            return False
        msg = (
            f"cannot commit state version {version} of operator {operator!r}: the "
            f"store is at version {current}"
            + (" with uncommitted changes" if version == current else "")
            + "; versions only go forward (load an earlier version to re-run a batch)"
        )
        raise CheckpointError(msg)
    return True


def check_whole_commit(
    storage: Storage,
    operator: str,
    key_range: tuple[int, int],
    num_key_groups: int,
    *,
    first: bool,
) -> None:
    """Raise unless a store may commit a version of the whole state: it holds every key
    group, and (``first``: its first commit since it was opened) it was loaded wherever
    versions were committed before.

    Examples
    --------
    >>> storage = Storage("memory://doctest-whole-commit")
    >>> check_whole_commit(storage, "op0", (0, 128), 128, first=True)
    >>> check_whole_commit(storage, "op0", (0, 64), 128, first=False)
    Traceback (most recent call last):
    ...
    microstream.exceptions.CheckpointError: state of operator 'op0' was loaded for key groups 0-63 only; a store holding part of the key groups cannot commit a version of the whole state
    """
    lo, hi = key_range
    if (lo, hi) != (0, num_key_groups):
        msg = (
            f"state of operator {operator!r} was loaded for key groups {lo}-{hi - 1} only; a "
            "store holding part of the key groups cannot commit a version of the whole state"
        )
        raise CheckpointError(msg)
    if first and storage.list_numbered(VERSIONS_DIR):
        msg = (
            f"state of operator {operator!r} in {storage.display('')} has committed versions: "
            "call load() with the last committed batch id (or None to start over) before "
            "committing"
        )
        raise CheckpointError(msg)


def key_group_range(groups: range | None, num_key_groups: int, operator: str) -> tuple[int, int]:
    """``groups`` as ``(lo, hi)`` (None: every key group), checked to be a non-empty range of
    ``range(num_key_groups)``.

    Examples
    --------
    >>> key_group_range(None, 128, "op0"), key_group_range(range(8, 16), 128, "op0")
    ((0, 128), (8, 16))
    """
    if groups is None:
        return 0, num_key_groups
    if groups.step != 1 or not 0 <= groups.start < groups.stop <= num_key_groups:
        msg = (
            f"key_groups must be a non-empty range(lo, hi) within range(0, "
            f"{num_key_groups}) of operator {operator!r}; got {groups!r} instead"
        )
        raise ValueError(msg)
    return groups.start, groups.stop


def validate_store_arguments(
    *,
    operator: str,
    schema: pl.Schema,
    key_columns: Sequence[str],
    hash_columns: Sequence[str],
    counts: dict[str, object],
    reserved: Sequence[str],
    max_key_groups: int,
) -> None:
    """Raise ``ValueError`` naming the first wrong argument of a store.

    ``counts`` are the store's positive-integer settings by name
    (``num_key_groups``, ``snapshot_every``, ...).

    Examples
    --------
    >>> validate_store_arguments(
    ...     operator="op0/keys", schema=pl.Schema({"k": pl.Int64}), key_columns=["k"],
    ...     hash_columns=["k"], counts={"snapshot_every": 0}, reserved=[], max_key_groups=8,
    ... )
    Traceback (most recent call last):
    ...
    ValueError: snapshot_every must be a positive integer; got 0 instead
    """
    key_columns, hash_columns = list(key_columns), list(hash_columns)
    if not key_columns:
        msg = f"key_columns of operator {operator!r} must not be empty; got []"
        raise ValueError(msg)
    missing = [c for c in key_columns if c not in schema]
    if missing:
        msg = (
            f"key_columns {missing} of operator {operator!r} are not in the state "
            f"schema {list(schema)}"
        )
        raise ValueError(msg)
    if len(set(key_columns)) != len(key_columns):
        msg = f"key_columns of operator {operator!r} repeat a column: {key_columns}"
        raise ValueError(msg)
    if not hash_columns or not set(hash_columns) <= set(key_columns):
        msg = (
            f"hash_columns of operator {operator!r} must be some of its key_columns "
            f"{key_columns}; got {hash_columns}"
        )
        raise ValueError(msg)
    used = [c for c in reserved if c in schema]
    if used:
        msg = f"the state schema of operator {operator!r} uses reserved column names {used}"
        raise ValueError(msg)
    num_key_groups = counts.get("num_key_groups")
    if isinstance(num_key_groups, int) and not 1 <= num_key_groups <= max_key_groups:
        msg = (
            f"num_key_groups must be an integer from 1 to {max_key_groups}; got "
            f"{num_key_groups!r} instead"
        )
        raise ValueError(msg)
    for name, value in counts.items():
        if not isinstance(value, int) or value < 1:
            msg = f"{name} must be a positive integer; got {value!r} instead"
            raise ValueError(msg)


def conform(
    schema: pl.Schema,
    operator: str,
    frame: pl.DataFrame | None,
    what: str,
    columns: list[str],
    *,
    exact: bool,
) -> pl.DataFrame:
    """``frame`` reduced to ``columns`` in order, dtypes checked against the state's
    ``schema`` (Null columns cast); ``what`` names the frame in the message.

    Examples
    --------
    >>> schema = pl.Schema({"k": pl.Int64, "n": pl.Int64})
    >>> conform(schema, "op0", pl.DataFrame({"n": [1], "k": [None]}), "rows", ["k", "n"],
    ...         exact=True).schema
    Schema([('k', Int64), ('n', Int64)])
    """
    if frame is None:
        return pl.DataFrame(schema={c: schema[c] for c in columns})
    if frame.columns == columns and frame.dtypes == [schema[c] for c in columns]:
        return frame  # (already conforming, the common case: no new frame)
    missing = [c for c in columns if c not in frame.schema]
    extra = [c for c in frame.schema if c not in columns] if exact else []
    wrong = [
        f"{c}: {frame.schema[c]} instead of {schema[c]}"
        for c in columns
        if c in frame.schema and frame.schema[c] != schema[c] and frame.schema[c] != pl.Null
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if extra:
            parts.append(f"unexpected columns {extra}")
        if wrong:
            parts.append("wrong dtypes (" + ", ".join(wrong) + ")")
        msg = (
            f"{what} for the state of operator {operator!r} do not match its schema: "
            + "; ".join(parts)
            + f"; expected {dict(schema) if exact else columns}"
        )
        raise SchemaMismatchError(msg)
    casts = [c for c in columns if frame.schema[c] == pl.Null and schema[c] != pl.Null]
    frame = pl.DataFrame([frame.get_column(c) for c in columns])
    if casts:
        frame = frame.with_columns([pl.col(c).cast(schema[c]) for c in casts])
    return frame
