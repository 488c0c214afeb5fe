"""A state store's rows in memory and in its pending delta: the in-memory key hash,
projections, deletion markers, and folding a batch's changes into the pending delta.

Column names of the store's frames (:mod:`microstream.state.store`):

- ``__key_group`` (:data:`KG`, on disk and in memory): the row's key group (UInt16);
- ``__deleted`` (:data:`DELETED`, on disk): the deletion marker column of delta files;
- ``__key_hash`` (:data:`HASH`, in memory only): the key group in the top 16 bits, then
  48 bits of a hash of the key, so rows sorted by it are sorted by key group.
"""

from __future__ import annotations

import polars as pl

from microstream.state.format import KEY_GROUP_COLUMN

__all__ = [
    "DELETED",
    "HASH",
    "KG",
    "MASK",
    "ORDER",
    "deletion_markers",
    "hash_expr",
    "project",
    "record",
]

DELETED = "__deleted"  # on disk: the deletion marker column of delta files
HASH = "__key_hash"  # in memory only: key group, then 48 bits of Polars' (fast, unstable) hash
KG = KEY_GROUP_COLUMN  # on disk and in memory: the row's key group (UInt16)
ORDER = "__order"  # in memory only: position of a delta file in a replay
MASK = "__mask"


def hash_expr(
    schema: pl.Schema, keys: list[str], seed: int, groups: pl.Series | None = None
) -> pl.Expr:
    """The in-memory hash: the key group in the top 16 bits, 48 bits of Polars' hash of
    the key below, so that the rows, sorted by it, are sorted by key group: the rows of a
    range of key groups (a snapshot slice) are one contiguous slice of the state.

    Examples
    --------
    >>> frame = pl.DataFrame({"k": [1, 2], KG: pl.Series([3, 3], dtype=pl.UInt16)})
    >>> [h >> 48 for h in frame.select(hash_expr(frame.schema, ["k"], 1)).to_series()]
    [3, 3]
    """
    # A Categorical's hash follows its process-local physical codes: hash the strings.
    fields = [
        pl.col(k).cast(pl.String) if isinstance(schema[k], pl.Categorical) else pl.col(k)
        for k in keys
    ]
    low = pl.struct(fields).hash(seed=seed) // (1 << 16)
    group = pl.col(KG) if groups is None else pl.lit(groups)  # (the rows' KG column, or)
    return (group.cast(pl.UInt64) * pl.lit(1 << 48, pl.UInt64) + low).alias(HASH)


def project(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """``frame.select(columns)`` for plain column names, without a query plan.

    Examples
    --------
    >>> project(pl.DataFrame({"a": [1], "b": [2]}), ["b"]).columns
    ['b']
    """
    return pl.DataFrame([frame.get_column(c) for c in columns])


def deletion_markers(keys: pl.DataFrame, schema: pl.Schema, key_columns: list[str]) -> pl.DataFrame:
    """One row per key: key columns and hash set, values null, ``DELETED`` true.

    Examples
    --------
    >>> keys = pl.DataFrame({"k": [1], HASH: pl.Series([7], dtype=pl.UInt64),
    ...                      KG: pl.Series([0], dtype=pl.UInt16)})
    >>> deletion_markers(keys, pl.Schema({"k": pl.Int64, "n": pl.Int64}), ["k"]).row(0)
    (1, None, 7, 0, True)
    """
    return keys.select(
        *[
            pl.col(c) if c in key_columns else pl.lit(None, dtype=dtype).alias(c)
            for c, dtype in schema.items()
        ],
        pl.col(HASH),
        pl.col(KG),
        pl.lit(True).alias(DELETED),
    )


def record(
    pending: pl.DataFrame | None,
    keys: pl.DataFrame,
    changes: pl.DataFrame,
    key_columns: list[str],
) -> pl.DataFrame:
    """The pending delta with ``changes`` as the changes of ``keys`` (replacing earlier
    changes of those keys).

    Examples
    --------
    >>> def rows(k, n):
    ...     return pl.DataFrame({"k": [k], "n": [n], HASH: pl.Series([k], dtype=pl.UInt64)})
    >>> record(rows(1, 10), rows(1, 0), rows(1, 11), ["k"])["n"].to_list()
    [11]
    """
    if pending is not None and pending.height:
        # Only rows whose hash is among the keys' can be theirs: one hash-set pass, and
        # the join (over the key columns) only for those, often none (eviction of keys
        # changed in earlier batches).
        maybe = pending.get_column(HASH).is_in(keys.get_column(HASH).implode())
        if maybe.any():
            kept = pending.filter(maybe).join(
                project(keys, key_columns),
                on=key_columns,
                how="anti",
                nulls_equal=True,
            )
            pending = pl.concat([pending.filter(~maybe), kept], how="vertical")
        changes = pl.concat([pending, changes], how="vertical")
    return changes
