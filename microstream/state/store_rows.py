"""A state store's rows in memory and in its pending delta: the in-memory key hash,
projections, deletion markers, and folding a batch's changes into the pending delta.

Column names of the store's frames (:mod:`microstream.state.store`):

- ``__key_group`` (:data:`KG`, on disk and in memory): the row's key group (UInt16);
- ``__deleted`` (:data:`DELETED`, on disk): the deletion marker column of delta files;
- ``__key_hash`` (:data:`HASH`, in memory only): the key group in the top 16 bits, then
  48 bits of a hash of the key, so rows sorted by it are sorted by key group.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from microstream.state.format import KEY_GROUP_COLUMN
from microstream.state.key_groups import stable_hash
from microstream.state.keyed_rows import KeyProbe, equal_rows
from microstream.state.small_hash import small_hash_list

__all__ = [
    "DELETED",
    "HASH",
    "KG",
    "MASK",
    "ORDER",
    "POSITION",
    "by_key_group",
    "deletion_markers",
    "hashed",
    "key_positions",
    "project",
    "record",
    "same_keys",
    "upserted",
]

DELETED = "__deleted"  # on disk: the deletion marker column of delta files
HASH = "__key_hash"  # in memory only: key group, then 48 bits of the stable hash
KG = KEY_GROUP_COLUMN  # on disk and in memory: the row's key group (UInt16)
ORDER = "__order"  # in memory only: position of a delta file in a replay
POSITION = "__fold_position"  # given to a fold's merge: the row of the folded rows
MASK = "__mask"
_LOW_48 = (1 << 48) - 1
_SMALL_ROWS = 16  # (up to this many rows, Python over the values beats a Polars call)


def _python_equal(dtype: pl.DataType) -> bool:
    """Whether Python's ``==`` on this dtype's values (nulls as None) is Polars' equality
    with nulls equal: not floats (NaN, -0.0), not times finer than Python's microseconds."""
    return dtype.is_integer() or dtype in (pl.String, pl.Boolean, pl.Date)


def hashed(
    frame: pl.DataFrame,
    hash_columns: list[str],
    num_key_groups: int,
    seed: int,
    key_columns: list[str] | None = None,
) -> pl.DataFrame:
    """``frame`` with its rows' key group (``KG``) and in-memory hash (``HASH``), both
    from ONE hash of the key: the stable hash of ``hash_columns``
    (:func:`~microstream.state.key_groups.stable_hash`, which the key group must use).

    The in-memory hash is the key group in the top 16 bits and the stable hash's top
    48 bits (xor ``seed``) below, so rows sorted by it are sorted by key group: the rows
    of a range of key groups (a snapshot slice) are one contiguous slice of the state.
    It is never written (only ``KG`` is), so it may change between versions.
    An earlier ``KG`` or ``HASH`` column of ``frame`` is replaced.

    With ``key_columns`` (a superset of ``hash_columns``) the 48 bits below the key
    group are the stable hash of those columns instead: rows that share the hash
    columns but not the whole key (the windows of one group key) get different
    in-memory hashes, so a search by whole keys finds one candidate per key, and a
    search by the hash columns alone no longer works.

    Examples
    --------
    >>> out = hashed(pl.DataFrame({"k": [1, 2, 1]}), ["k"], 128, seed=0)
    >>> out.columns
    ['k', '__key_hash', '__key_group']
    >>> [h >> 48 == g for h, g in out.select(HASH, KG).rows()]
    [True, True, True]
    >>> out[HASH][0] == out[HASH][2]
    True
    >>> two = pl.DataFrame({"k": [1, 1], "w": [0, 60]})
    >>> whole = hashed(two, ["k"], 128, seed=0, key_columns=["k", "w"])
    >>> whole[KG][0] == whole[KG][1], whole[HASH][0] == whole[HASH][1]
    (True, False)
    """
    small = _small_hashed(frame, hash_columns, num_key_groups, seed, key_columns)
    if small is not None:
        return small
    h = stable_hash(frame, hash_columns)
    groups = (h % np.uint64(num_key_groups)).astype(np.uint16)
    if key_columns is not None and key_columns != hash_columns:
        prefix = key_columns[: len(hash_columns)] == hash_columns  # (continue, not re-hash)
        rest = key_columns[len(hash_columns) :] if prefix else key_columns
        h = stable_hash(frame, rest, start=h if prefix else None)
    low = (h >> np.uint64(16)) ^ np.uint64(seed & _LOW_48)
    mem = (groups.astype(np.uint64) << np.uint64(48)) | low
    columns = [c for c in frame.get_columns() if c.name not in (HASH, KG)]
    return pl.DataFrame(
        [*columns, pl.Series(HASH, mem, dtype=pl.UInt64), pl.Series(KG, groups, dtype=pl.UInt16)]
    )


def _small_hashed(
    frame: pl.DataFrame,
    hash_columns: list[str],
    num_key_groups: int,
    seed: int,
    key_columns: list[str] | None,
) -> pl.DataFrame | None:
    """:func:`hashed` of a few rows in Python integers (the same values: ``small_hash_list``
    is ``stable_hash``), or None when ``frame`` is not such a frame."""
    names = frame.columns  # (not ``schema``: a Schema built per call)
    if HASH in names or KG in names:
        return None
    h = small_hash_list(frame, hash_columns)
    if h is None:
        return None
    groups = [x % num_key_groups for x in h]
    if key_columns is not None and key_columns != hash_columns:
        prefix = key_columns[: len(hash_columns)] == hash_columns
        rest = key_columns[len(hash_columns) :] if prefix else key_columns
        h = small_hash_list(frame, rest, h if prefix else None)
        if h is None:
            return None
    low = seed & _LOW_48
    mem = [(g << 48) | ((x >> 16) ^ low) for g, x in zip(groups, h, strict=True)]
    return frame.hstack(
        [pl.Series(HASH, mem, dtype=pl.UInt64), pl.Series(KG, groups, dtype=pl.UInt16)]
    )


def key_positions(
    keys: pl.DataFrame,
    found: pl.DataFrame,
    key_columns: list[str],
    probe: KeyProbe | None = None,
) -> np.ndarray:
    """For every row of ``found`` (stored rows of keys of ``keys``), the row of ``keys``
    holding its key; ``keys`` holds each key once and both have the ``HASH`` column.
    ``probe``: the :class:`KeyProbe` of ``keys`` on ``key_columns`` if one was built
    (the search that found the rows: no second sort of the hashes).

    Examples
    --------
    >>> def rows(ks):
    ...     return hashed(pl.DataFrame({"k": ks, "w": [0] * len(ks)}), ["k"], 8, 0, ["k", "w"])
    >>> key_positions(rows([5, 6, 7]), rows([7, 5]), ["k", "w"]).tolist()
    [2, 0]
    """
    if probe is None:
        probe = KeyProbe(keys, key_columns, HASH)
    if probe.one_row_per_hash:  # (whole-key hashes, almost always: a search per row)
        hashes = found.get_column(HASH).to_numpy()
        return probe.order[np.searchsorted(probe.sorted_hashes, hashes)]
    # (keys sharing a hash: matched on the key columns)
    indexed = project(keys, key_columns).with_row_index(POSITION)
    matched = project(found, key_columns).join(
        indexed, on=key_columns, how="left", nulls_equal=True, maintain_order="left"
    )
    return matched.get_column(POSITION).to_numpy()


def same_keys(a: pl.DataFrame, b: pl.DataFrame, key_columns: list[str]) -> bool:
    """Whether ``a`` and ``b`` hold the same keys in the same order (nulls equal).

    Examples
    --------
    >>> same_keys(pl.DataFrame({"k": [1, None]}), pl.DataFrame({"k": [1, None]}), ["k"])
    True
    >>> same_keys(pl.DataFrame({"k": [1, 2]}), pl.DataFrame({"k": [2, 1]}), ["k"])
    False
    """
    if a.height != b.height:
        return False
    if a.height <= _SMALL_ROWS:
        pairs = [(a.get_column(k), b.get_column(k)) for k in key_columns]
        if all(_python_equal(x.dtype) and x.dtype == y.dtype for x, y in pairs):
            # (a few rows of keys whose Python values compare as Polars' do: no Polars call)
            return all(x.to_list() == y.to_list() for x, y in pairs)
    return bool(equal_rows(project(a, key_columns), project(b, key_columns)).all())


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
        # the key columns compared only for those, often none (eviction of keys changed
        # in earlier batches): each candidate against the key of its hash, no join.
        hashes = pending.get_column(HASH)
        maybe = np.flatnonzero(hashes.is_in(keys.get_column(HASH).implode()).to_numpy())
        if maybe.size:
            probe = KeyProbe(keys, key_columns, HASH)
            theirs = probe.confirm(pending, hashes.to_numpy(), maybe)
            if theirs.size:
                keep = np.ones(pending.height, dtype=bool)
                keep[theirs] = False
                pending = pending.filter(pl.Series(keep))
        changes = pl.concat([pending, changes], how="vertical")
    return changes


def upserted(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` as upserts of a delta: with ``DELETED`` false (a column added, not a
    ``with_columns`` query plan).

    Examples
    --------
    >>> upserted(pl.DataFrame({"k": [1, 2]})).rows()
    [(1, False), (2, False)]
    """
    # (hstack: a new frame of the same columns plus one, without a frame built anew)
    return rows.hstack([pl.Series(DELETED, np.zeros(rows.height, dtype=bool))])


def by_key_group(rows: pl.DataFrame) -> pl.DataFrame:
    """``rows`` sorted by key group, as a delta file holds them (unchanged if they are).

    Examples
    --------
    >>> rows = pl.DataFrame({KG: pl.Series([2, 0, 2], dtype=pl.UInt16), "k": [1, 2, 3]})
    >>> by_key_group(rows)["k"].to_list()
    [2, 1, 3]
    """
    groups = rows.get_column(KG).to_numpy()
    if bool((groups[1:] >= groups[:-1]).all()):  # (e.g. one row: no sort, no query plan)
        return rows
    # (one thread: sorting by a UInt16 is memory-bound; the pool's hand-offs cost more
    # than they save, 2-6x on this 2-core machine at 37k-837k rows)
    return rows.sort(KG, multithreaded=False)
