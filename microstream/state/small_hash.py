"""The stable key hash of a few rows, in Python integers instead of numpy passes.

:func:`~microstream.state.key_groups.stable_hash` runs a dozen numpy operations per
column, each ~1 us whatever the rows: ~40 us a column for a 1-row batch, which a state
store hashes two or three times per fold. For a frame of at most :data:`SMALL_ROWS`
rows whose key columns are integers, Booleans, dates, datetimes, durations (without
nulls) or strings (nulls allowed), :func:`small_stable_hash` computes the same
algorithm, step for step, over the rows' Python values; any other frame goes to
``stable_hash``. The two agree
on every value (``tests/test_tiny_fold.py`` compares them on random frames), which the
checkpoint format requires: the hash decides a key's key group on disk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from microstream.state.key_groups import (
    LENGTH_MIX,
    NULL_HASH,
    SEED,
    VALUE_SEED,
    P,
    stable_hash,
)

__all__ = ["SMALL_ROWS", "small_hash_list", "small_stable_hash"]

SMALL_ROWS = 16
"""Up to this many rows the Python loop beats numpy's per-call cost (~2 us a value
against ~40 us a column)."""

_MASK = (1 << 64) - 1
_LONGEST_STRING = 64
"""Longer strings (in characters, up to 4 UTF-8 bytes each) are hashed by numpy."""


def small_stable_hash(
    frame: pl.DataFrame, columns: Sequence[str], *, start: np.ndarray | None = None
) -> np.ndarray:
    """:func:`~microstream.state.key_groups.stable_hash` of ``columns``, the same values,
    faster for a few rows.

    Examples
    --------
    >>> import polars as pl
    >>> frame = pl.DataFrame({"user": ["a", None], "n": [1, 2]})
    >>> [hex(h) for h in small_stable_hash(frame, ["user", "n"])]
    ['0x559d5c6f89a87e53', '0x6b78fa60c9aaa3fe']
    """
    hashes = small_hash_list(frame, columns, None if start is None else start.tolist())
    if hashes is None:
        return stable_hash(frame, columns, start=start)
    return np.array(hashes, dtype=np.uint64)


def small_hash_list(
    frame: pl.DataFrame, columns: Sequence[str], start: list[int] | None = None
) -> list[int] | None:
    """:func:`small_stable_hash` as Python integers, or None when the frame is not
    small or a column's dtype is left to numpy (then ``stable_hash`` is the one to ask).

    Examples
    --------
    >>> import polars as pl
    >>> [hex(h) for h in small_hash_list(pl.DataFrame({"user": ["a"]}), ["user"])]
    ['0xc4bbf1f475c0f826']
    """
    if frame.height > SMALL_ROWS:
        return None
    words = [_value_hashes(frame.get_column(name)) for name in columns]
    if any(w is None for w in words):
        return None
    hashes = [SEED] * frame.height if start is None else start
    for column in words:
        assert column is not None
        hashes = [_fmix64((h * P + v) & _MASK) for h, v in zip(hashes, column, strict=True)]
    return hashes


def _value_hashes(s: pl.Series) -> list[int] | None:
    """Step 2 of every value of ``s``, or None for a dtype left to numpy."""
    dtype = s.dtype
    if dtype == pl.String:
        strings: list[str | None] = s.to_list()
        if any(v is not None and len(v) > _LONGEST_STRING for v in strings):
            return None  # (a loop over every byte in Python: numpy's prefix sums win)
        return [NULL_HASH if v is None else _fmix64(_string_word(v) ^ VALUE_SEED) for v in strings]
    integral = (
        dtype.is_integer() or dtype == pl.Boolean or isinstance(dtype, (pl.Datetime, pl.Date))
    )
    if not (integral or isinstance(dtype, pl.Duration)) or dtype in (pl.Int128, pl.UInt128):
        return None
    if s.null_count():
        return None
    values = s.to_numpy()
    if values.dtype.kind in "mM":
        values = values.view(np.int64)
    return [_fmix64((int(v) & _MASK) ^ VALUE_SEED) for v in values.tolist()]


def _string_word(value: str) -> int:
    """``sum((b_i + 1) * P**i) ^ n * LENGTH_MIX`` over the UTF-8 bytes, modulo 2**64."""
    data = value.encode()
    word, power = 0, 1
    for b in data:
        word = (word + (b + 1) * power) & _MASK
        power = (power * P) & _MASK
    return word ^ ((len(data) * LENGTH_MIX) & _MASK)


def _fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finaliser on a Python integer below 2**64."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _MASK
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _MASK
    k ^= k >> 33
    return k
