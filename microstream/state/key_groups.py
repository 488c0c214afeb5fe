"""Key groups: the one stable hash of a state's key columns, and the group it puts a key in.

A state store's rows are split into a fixed number of *key groups* (Flink's
unit of state): ``key_group = stable_hash(key columns) % num_key_groups``. The
number is chosen when a checkpoint is created and never changes, so a key stays
in its group for the life of the checkpoint; a worker that owns a range of
groups loads exactly the rows of that range. The hash is therefore part of the
checkpoint format: it is computed here, by this module's own algorithm and seed
(never ``pl.Series.hash``, which Polars does not promise to keep across
versions), and ``tests/state/test_key_groups.py`` pins its values for a fixed
frame. Changing anything below breaks every checkpoint written before.

The algorithm (all arithmetic modulo 2**64, vectorised with numpy over the
columns' Arrow buffers):

1. Each value of a column becomes a 64-bit *value word*, by its dtype:

   - integers, ``Boolean`` (0/1), ``Date``, ``Datetime``, ``Duration``,
     ``Time``: their integer value (physical value, sign-extended to 64
     bits); equal values hash equal whatever the integer width;
   - ``Float32``/``Float64``: the bits of the value as a Float64, with
     ``-0.0`` made ``0.0`` and every NaN the one NaN ``0x7ff8000000000000``;
   - ``Decimal``, ``Int128``: the 128-bit unscaled integer; when it fits in
     64 bits its low word alone (so ``5`` hashes as ``Int64`` ``5``), else
     ``fmix64(lo) * P + hi``;
   - ``String``, ``Binary``, ``Categorical``, ``Enum``: the UTF-8 bytes
     ``b_0 .. b_{n-1}`` as the polynomial ``sum((b_i + 1) * P**i)``, then
     ``^ n * LENGTH_MIX`` (categoricals by their strings, never their
     process-local codes);
   - ``List``/``Array``: the element hashes (step 2) in the same polynomial,
     then ``^ n * LENGTH_MIX``;
   - ``Struct``: its fields combined as in step 3.

2. A value's hash is ``fmix64(word ^ VALUE_SEED)``; a null's is the fixed
   ``NULL_HASH``, so null is never hashed like ``0``, ``""`` or ``false``.

3. Columns combine in order: ``h = SEED``, then per column
   ``h = fmix64(h * P + value_hash)``.

``P`` is an odd 64-bit constant (so ``P**-i`` exists modulo 2**64, which turns
the polynomial of every string into two cumulative sums over the column's
bytes); ``fmix64`` is MurmurHash3's 64-bit finaliser.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from microstream.exceptions import SchemaMismatchError

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

__all__ = [
    "DEFAULT_KEY_GROUPS",
    "HASH_ALGORITHM",
    "check_hashable",
    "key_group_ranges",
    "key_groups",
    "stable_hash",
]

HASH_ALGORITHM = "ms-poly-fmix64-v1"
"""The name recorded in a checkpoint of the algorithm below: a checkpoint
written by another one is refused, never read with silently different groups."""

DEFAULT_KEY_GROUPS = 128
"""Key groups of a new checkpoint unless the query asks for another number."""

SEED = 0x6D6963726F737472  # b"microstr"
VALUE_SEED = 0x5F6B65795F677270  # b"_key_grp"
NULL_HASH = 0x4E554C4C5F4B4559  # b"NULL_KEY"
P = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
P_INVERSE = pow(P, -1, 1 << 64)
LENGTH_MIX = 0xC2B2AE3D27D4EB4F
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_BLOCK_BYTES = 1 << 20  # bytes per pass of the string hash: bounds its temporary arrays
_U64 = np.uint64


def stable_hash(
    frame: pl.DataFrame, columns: Sequence[str], *, start: np.ndarray | None = None
) -> np.ndarray:
    """The stable 64-bit hash of ``columns`` of every row of ``frame``.

    Parameters
    ----------
    frame
        The rows; chunking, slicing and Categorical vs String do not change the hash.
    columns
        The key columns, combined in this order.
    start
        The stable hash of the same rows' leading columns, continued with ``columns``
        (so ``stable_hash(f, a + b)`` is ``stable_hash(f, b, start=stable_hash(f, a))``,
        without hashing ``a`` twice).

    Returns
    -------
    numpy.ndarray
        ``uint64``, one per row.

    Raises
    ------
    SchemaMismatchError
        A column's dtype has no stable hash (``Object``, ``UInt128``; see
        :func:`check_hashable`).

    Examples
    --------
    >>> import polars as pl
    >>> frame = pl.DataFrame({"user": ["a", None], "n": [1, 2]})
    >>> [hex(h) for h in stable_hash(frame, ["user", "n"])]
    ['0x559d5c6f89a87e53', '0x6b78fa60c9aaa3fe']
    >>> head = stable_hash(frame, ["user"])
    >>> bool((stable_hash(frame, ["n"], start=head) == stable_hash(frame, ["user", "n"])).all())
    True
    """
    h = np.full(frame.height, SEED, dtype=_U64) if start is None else start
    for name in columns:
        h = _fmix64(h * _U64(P) + _series_hash(frame.get_column(name)))
    return h


def key_groups(frame: pl.DataFrame, columns: Sequence[str], num_key_groups: int) -> np.ndarray:
    """The key group of every row: ``stable_hash(frame, columns) % num_key_groups``.

    Examples
    --------
    >>> import polars as pl
    >>> key_groups(pl.DataFrame({"user": ["a", "b", "a"]}), ["user"], 128).tolist()
    [38, 49, 38]
    """
    return (stable_hash(frame, columns) % _U64(num_key_groups)).astype(np.uint32)


def key_group_ranges(num_key_groups: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges ``[lo, hi)`` covering ``range(num_key_groups)``, sizes
    differing by at most one (fewer if there are fewer groups).

    Examples
    --------
    >>> key_group_ranges(128, 3)
    [(0, 42), (42, 85), (85, 128)]
    """
    parts = max(1, min(parts, num_key_groups))
    bounds = [num_key_groups * i // parts for i in range(parts + 1)]
    return list(itertools.pairwise(bounds))


def check_hashable(schema: pl.Schema, columns: Sequence[str], where: str) -> None:
    """Refuse key columns whose dtype has no stable hash, at query start.

    Examples
    --------
    >>> import polars as pl
    >>> check_hashable(pl.Schema({"k": pl.Object}), ["k"], "operator 'op0'")
    Traceback (most recent call last):
    ...
    microstream.exceptions.SchemaMismatchError: key column 'k' of operator 'op0' is Object: it has no stable hash, so its state cannot be split into key groups; cast it to a String, integer or Struct key first
    """
    for name in columns:
        problem = _unhashable(schema[name])
        if problem is not None:
            msg = (
                f"key column {name!r} of {where} is {problem}: it has no stable hash, so its "
                "state cannot be split into key groups; cast it to a String, integer or "
                "Struct key first"
            )
            raise SchemaMismatchError(msg)


# -- per dtype ------------------------------------------------------------------------------


def _unhashable(dtype: PolarsDataType) -> str | None:
    if isinstance(dtype, pl.Struct):
        for field in dtype.fields:
            problem = _unhashable(field.dtype)
            if problem is not None:
                return problem
        return None
    if isinstance(dtype, (pl.List, pl.Array)):
        return _unhashable(dtype.inner)
    if dtype == pl.UInt128 or isinstance(dtype, pl.Object):
        return str(dtype)
    known = (
        dtype.is_integer()
        or dtype.is_float()
        or dtype.is_temporal()
        or isinstance(dtype, (pl.Decimal, pl.Categorical, pl.Enum))
        or dtype in (pl.String, pl.Binary, pl.Boolean, pl.Null)
    )
    return None if known else str(dtype)


def _series_hash(s: pl.Series) -> np.ndarray:
    """The value hash (step 2) of every element of ``s``, nulls included."""
    problem = _unhashable(s.dtype)
    if problem is not None:
        msg = f"column {s.name!r} is {problem}: it has no stable hash"
        raise SchemaMismatchError(msg)
    words, valid = _words(s)
    out = _fmix64(words ^ _U64(VALUE_SEED))
    if valid is not None:
        out[~valid] = _U64(NULL_HASH)
    return out


def _words(s: pl.Series) -> tuple[np.ndarray, np.ndarray | None]:
    """The value word (step 1) of every element, and which are not null (None: all)."""
    dtype = s.dtype
    n = s.len()
    valid = None if s.null_count() == 0 else s.is_not_null().to_numpy()
    if dtype == pl.Null:
        return np.zeros(n, dtype=_U64), np.zeros(n, dtype=bool)
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return _words(s.cast(pl.String))
    if dtype in (pl.String, pl.Binary):
        return _bytes_words(s), valid
    if isinstance(dtype, pl.Decimal) or dtype == pl.Int128:
        return _wide_words(s), valid
    if dtype.is_float():
        x = s.cast(pl.Float64).fill_null(0.0).to_numpy().copy()
        x[x == 0.0] = 0.0  # -0.0 == 0.0
        x[np.isnan(x)] = np.nan  # one NaN
        return x.view(_U64), valid
    if isinstance(dtype, pl.Struct):
        h = np.full(n, SEED, dtype=_U64)
        for field in s.struct.unnest().iter_columns():
            h = _fmix64(h * _U64(P) + _series_hash(field))
        return h, valid
    if isinstance(dtype, (pl.List, pl.Array)):
        return _list_words(s), valid
    if valid is None and (
        dtype.is_integer()
        or dtype == pl.Boolean
        or isinstance(dtype, (pl.Datetime, pl.Date, pl.Duration))
    ):
        # (no nulls: the values themselves, read without Polars' cast and fill_null, which
        # cost ~60 us a call: most of the hash of a small batch's keys; numpy's datetime64
        # and timedelta64 hold the physical integers)
        values = s.to_numpy()
        if values.dtype.kind in "mM":
            values = values.view(np.int64)
        wide = np.uint64 if dtype == pl.UInt64 else np.int64
        return values.astype(wide, copy=False).view(_U64), valid
    physical = s.to_physical()  # temporal -> integer, Boolean stays
    if physical.dtype == pl.UInt64:
        return physical.fill_null(0).to_numpy().astype(_U64, copy=False), valid
    return physical.cast(pl.Int64).fill_null(0).to_numpy().view(_U64), valid


def _bytes_words(s: pl.Series) -> np.ndarray:
    arr = pc.cast(s.rechunk().to_arrow(), pa.large_binary())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)
        if buffers[2] is not None
        else np.zeros(0, dtype=np.uint8)
    )
    return _polynomial(data, offsets, plus_one=True)


def _list_words(s: pl.Series) -> np.ndarray:
    if isinstance(s.dtype, pl.Array):
        s = s.cast(pl.List(s.dtype.inner))
    arr = s.rechunk().to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    inner_arrow = arr.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    inner = pl.Series("inner", inner_arrow, dtype=s.dtype.inner)  # type: ignore[attr-defined]
    return _polynomial(_series_hash(inner), offsets - offsets[0], plus_one=False)


def _wide_words(s: pl.Series) -> np.ndarray:
    if s.dtype == pl.Int128:
        try:
            s = s.cast(pl.Decimal(38, 0), strict=True)
        except pl.exceptions.PolarsError as exc:
            msg = f"column {s.name!r} holds an Int128 beyond 38 digits, which has no stable hash"
            raise SchemaMismatchError(msg) from exc
    arr = s.rechunk().to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    lanes = np.frombuffer(arr.buffers()[1], dtype=_U64)[
        2 * arr.offset : 2 * (arr.offset + len(arr))
    ]
    lo, hi = lanes[0::2], lanes[1::2]
    fits = hi == ((lo.view(np.int64) >> 63).view(_U64))  # hi is lo's sign extension
    wide = _fmix64(lo.copy()) * _U64(P) + hi
    return np.where(fits, lo, wide)


def _polynomial(values: np.ndarray, offsets: np.ndarray, *, plus_one: bool) -> np.ndarray:
    """Per segment ``[offsets[i], offsets[i+1])`` of ``values``: ``sum(v_j * P**j) ^ n*LENGTH_MIX``.

    Prefix sums of ``v_k * P**k`` give each segment's sum times ``P**start``, which
    ``P**-start`` removes; done in blocks of rows so temporaries stay small.
    """
    rows = offsets.size - 1
    out = np.empty(rows, dtype=_U64)
    if rows == 0:
        return out
    longest = int(np.max(offsets[1:] - offsets[:-1]))
    size = min(int(offsets[-1] - offsets[0]), max(_BLOCK_BYTES, longest))
    powers = _powers(P, size + 1)
    inverse = _powers(P_INVERSE, size + 1)
    prefix = np.zeros(size + 1, dtype=_U64)
    row = 0
    while row < rows:
        # as many rows as fit in one block (at least one)
        end = int(np.searchsorted(offsets, offsets[row] + size, side="right")) - 1
        end = min(max(end, row + 1), rows)
        base = int(offsets[row])
        starts = offsets[row:end] - base
        stops = offsets[row + 1 : end + 1] - base
        chunk = values[base : int(offsets[end])].astype(_U64)
        if plus_one:
            chunk += _U64(1)
        chunk *= powers[: chunk.size]
        np.cumsum(chunk, dtype=_U64, out=prefix[1 : chunk.size + 1])
        sums = (prefix[stops] - prefix[starts]) * inverse[starts]
        out[row:end] = sums ^ ((stops - starts).astype(_U64) * _U64(LENGTH_MIX))
        row = end
    return out


def _powers(base: int, n: int) -> np.ndarray:
    """``base**0 .. base**(n-1)`` modulo 2**64, by doubling (numpy's cumprod is ~10x slower)."""
    out = np.empty(max(n, 1), dtype=_U64)
    out[0] = 1
    done = 1
    while done < n:
        take = min(done, n - done)
        np.multiply(out[:take], _U64(pow(base, done, 1 << 64)), out=out[done : done + take])
        done += take
    return out[:n]


def _fmix64(k: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (a bijection), in place on a uint64 array."""
    k ^= k >> _U64(33)
    k *= _M1
    k ^= k >> _U64(33)
    k *= _M2
    k ^= k >> _U64(33)
    return k
