"""The in-memory rows of a state store, found by key hash without scanning the state.

A state store's rows live in one :class:`KeyedRows`: a *base* frame sorted by
the 64-bit key hash, with a tombstone mask, plus a small unsorted *tail* that
new rows are appended to, with its own tombstone mask. Finding the rows of ``k``
keys is a binary search in the base (``O(k log n)``) plus a membership test over
the tail (bounded by ``tail_rows``); removing rows flips their tombstone bits, in
the base and in the tail alike. Neither copies the base nor the tail, so the cost
of a batch follows the batch, not the size of the state.
When the tail outgrows its limit (a quarter of the base, at least
``tail_rows``) or tombstones cover half the base, the two are merged into a
new sorted base: a sort paid once every ``limit / rows per batch`` batches.

The hash only narrows the search: every match is confirmed on the key
columns themselves (nulls equal), so a hash collision never mixes two keys.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from microstream.state.key_groups import stable_hash

if TYPE_CHECKING:
    from polars._typing import PolarsDataType

__all__ = ["KeyProbe", "KeyedRows", "ProbeMemo", "equal_rows"]

_POSITION = "__position"


class KeyedRows:
    """Rows with a key and a ``hash_column``, any number of rows per key.

    Parameters
    ----------
    frame
        The initial rows (any further columns are kept as they are); ``hash_column`` holds the (non-null) ``UInt64`` hash
        of ``key_columns``.
    key_columns
        The columns that make a key (nulls are valid key values).
    hash_column
        The name of the hash column.
    num_partitions
        Rows are counted per partition: ``hash % num_partitions``, or the value of
        ``group_column`` when given.
    tail_rows
        The tail size above which the tail is merged into the base (or a
        quarter of the base, if larger, up to eight times ``tail_rows``).
    is_sorted
        ``frame`` is already sorted by ``hash_column``.
    group_column
        A column holding each row's partition (``0 <= value < num_partitions``): the
        state store's key group, which is not derived from ``hash_column``.
    sorted_by_group
        Sorting by ``hash_column`` sorts the rows by ``group_column`` first (the state
        store's hash holds the key group in its top bits): the base rows of a range of
        partitions are then contiguous (:meth:`rows_in_partitions`).
    group_shift
        A row's partition is its hash's top bits, ``hash >> group_shift`` (the state
        store's key group): no group column is needed, and the rows are sorted by
        partition (``sorted_by_group``).

    Examples
    --------
    >>> import polars as pl
    >>> rows = pl.DataFrame({"k": ["a", "b"], "v": [1, 2]}).with_columns(
    ...     pl.col("k").hash().alias("h")
    ... )
    >>> store = KeyedRows(rows, key_columns=["k"], hash_column="h", num_partitions=4)
    >>> keys = pl.DataFrame({"k": ["b"]}).with_columns(pl.col("k").hash().alias("h"))
    >>> store.rows_of(keys)["v"].to_list()
    [2]
    >>> store.replace(keys, keys.with_columns(v=pl.lit(5, pl.Int64)).select("k", "v", "h"))
    >>> sorted(store.frame()["v"].to_list())
    [1, 5]
    >>> store.remove_where(pl.col("v") < 3)["k"].to_list()
    ['a']
    >>> store.height
    1
    """

    def __init__(
        self,
        frame: pl.DataFrame,
        *,
        key_columns: Sequence[str],
        hash_column: str,
        num_partitions: int,
        tail_rows: int = 131_072,
        is_sorted: bool = False,
        group_column: str | None = None,
        sorted_by_group: bool = False,
        group_shift: int | None = None,
    ):
        self.key_columns = list(key_columns)
        self.group_column = group_column
        self.group_shift = None if group_shift is None else np.uint64(group_shift)
        self.sorted_by_group = sorted_by_group or group_shift is not None
        self.hash_column = hash_column
        self.num_partitions = num_partitions
        self.tail_rows = tail_rows
        # (False: the owner decides when to merge, by merge_pressure: SlicedRows spreads the
        # merges of its slices over batches)
        self.auto_merge = True
        self._tail = frame.clear()
        # Tombstones of the tail too: a replace of rows in the tail flips their bits instead
        # of filtering a copy of the tail (at 10M keys a batch replaced rows in every slice's
        # tail: a copy of every tail, 16% of the batch). Dead tail rows are dropped when the
        # tail is rechunked or merged.
        self._tail_live = np.ones(0, dtype=bool)
        self._tail_dead = 0
        self._changes = 0  # bumped by every change: invalidates the search memo
        self._memo: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        # the last _find: (changes, the keys frame itself, on, positions), for rows_of then
        # replace with the very same keys (a state store's fold) without a second probe
        self._found: tuple[int, pl.DataFrame, tuple[str, ...], tuple[np.ndarray, np.ndarray]]
        self._found = (-1, pl.DataFrame(), (), (_NONE, _NONE))
        # the last probe: it depends on the keys only, so a state store's fold reuses it
        # to place the rows found (one sort)
        self._probe = ProbeMemo()
        self._set_base(frame, is_sorted=is_sorted)

    # -- reading -----------------------------------------------------------------------------

    @property
    def height(self) -> int:
        """Number of live rows."""
        return self._base.height - self._dead + self._tail.height - self._tail_dead

    def estimated_size(self) -> int:
        """Bytes held, tombstoned rows included (they are freed at the next merge)."""
        return int(self._base.estimated_size() + self._tail.estimated_size())

    def rows_per_partition(self) -> list[int]:
        """Live rows per partition, in partition order."""
        return [int(n) for n in self._counts]

    def frame(self) -> pl.DataFrame:
        """Every live row (order unspecified)."""
        base = self._base if self._dead == 0 else self._base.filter(pl.Series(self._live))
        tail = self._live_tail()
        if tail.height == 0:
            return base
        return pl.concat([base, tail], how="vertical", rechunk=False)

    def partitions(self) -> list[pl.DataFrame]:
        """The live rows of each partition, in partition order."""
        every = self.frame()
        empty = every.clear()
        if every.height == 0:
            return [empty] * self.num_partitions
        if self.group_shift is not None:
            pids = pl.Series(_POSITION, self._pids_of(every).astype(np.uint32))
        elif self.group_column is not None:
            pids = pl.Series(_POSITION, every.get_column(self.group_column).cast(pl.UInt32))
        else:
            pids = every.select(self._pid_expr(pl.col(self.hash_column))).to_series()
        by_pid = every.with_columns(pids.alias(_POSITION)).partition_by(
            _POSITION, as_dict=True, maintain_order=False
        )
        return [
            by_pid[(p,)].drop(_POSITION) if (p,) in by_pid else empty
            for p in range(self.num_partitions)
        ]

    def rows_in_partitions(self, lo: int, hi: int) -> pl.DataFrame:
        """The live rows of partitions ``[lo, hi)`` (order unspecified).

        With ``sorted_by_group`` the base rows of a range are one contiguous slice, so
        the cost follows the rows returned; otherwise every row's partition is tested.
        """
        if self.group_shift is not None:
            start, stop = (int(i) for i in self._hash_range(lo, hi))
            found = self._base.slice(start, stop - start)
            if self._dead:
                found = found.filter(pl.Series(self._live[start:stop]))
        elif self.sorted_by_group:
            start, stop = (int(i) for i in np.searchsorted(self._pids, [lo, hi]))
            found = self._base.slice(start, stop - start)
            if self._dead:
                found = found.filter(pl.Series(self._live[start:stop]))
        else:
            mask = (self._pids >= lo) & (self._pids < hi) & self._live
            found = self._base.filter(pl.Series(mask))
        if self._tail.height:
            pids = self._pids_of(self._tail)
            mask = (pids >= lo) & (pids < hi)
            if self._tail_dead:
                mask &= self._tail_live
            mine = self._tail.filter(pl.Series(mask))
            found = pl.concat([found, mine], how="vertical") if mine.height else found
        return found

    def rows_of(self, keys: pl.DataFrame, on: Sequence[str] | None = None) -> pl.DataFrame:
        """Every live row whose key is in ``keys`` (key columns + hash; duplicates allowed).

        ``on``: match these columns only, the ones the hash is computed over when that
        is fewer than the key columns (every row of a key prefix).
        """
        base_at, tail_at = self._find(keys, on)
        found = []
        if base_at.size:
            found.append(_gather(self._base, base_at))
        if tail_at.size:
            found.append(_gather(self._tail, tail_at))
        if not found:
            return self._base.clear()
        return found[0] if len(found) == 1 else pl.concat(found, how="vertical")

    # -- changing ----------------------------------------------------------------------------

    @property
    def base(self) -> pl.DataFrame:
        """The sorted rows, tombstoned ones included (positions for :meth:`replace_at`)."""
        return self._base

    @property
    def tail(self) -> pl.DataFrame:
        """The rows added since the last merge, tombstoned ones included (positions for
        :meth:`replace_at`)."""
        return self._tail

    @property
    def tail_live(self) -> np.ndarray:
        """Whether each row of :attr:`tail` is live (read only)."""
        return self._tail_live

    def base_candidates(self, wanted: np.ndarray) -> np.ndarray:
        """Positions of the live rows of :attr:`base` whose hash is in ``wanted`` (sorted,
        unique), not yet confirmed on the key columns (a caller holding several stores
        confirms all their candidates at once)."""
        return self._candidates_in_base(wanted)

    def replace(self, keys: pl.DataFrame, rows: pl.DataFrame) -> None:
        """Remove every row of ``keys`` (key columns + hash), then add ``rows``."""
        base_at, tail_at = self._find(keys)
        self.replace_at(base_at, tail_at, rows)

    def replace_at(self, base_at: np.ndarray, tail_at: np.ndarray, rows: pl.DataFrame) -> None:
        """Remove the live rows at ``base_at`` in :attr:`base` and ``tail_at`` in :attr:`tail`
        (found with no change in between), then add ``rows``."""
        self._changes += 1
        self._kill_base(base_at)
        self._kill_tail(tail_at)
        if rows.height:
            self._count(self._pids_of(rows), 1)
            self._add_to_tail(rows)
        self._maybe_merge()

    def append(self, rows: pl.DataFrame) -> None:
        """Add ``rows``, whose keys the caller guarantees are not in the state yet."""
        if rows.height == 0:
            return
        self._changes += 1
        self._count(self._pids_of(rows), 1)
        self._add_to_tail(rows)
        self._maybe_merge()

    def remove_where(self, predicate: pl.Expr) -> pl.DataFrame:
        """Remove the live rows where ``predicate`` is true (null: kept) and return them."""
        self._changes += 1
        removed = []
        if self._base.height - self._dead:
            mask = self._mask(self._base, predicate) & self._live
            at = np.flatnonzero(mask)
            if at.size:
                removed.append(_gather(self._base, at))
                self._kill_base(at)
        if self._tail.height - self._tail_dead:
            mask = self._mask(self._tail, predicate) & self._tail_live
            at = np.flatnonzero(mask)
            if at.size:
                removed.append(_gather(self._tail, at))
                self._kill_tail(at)
        self._maybe_merge()
        if not removed:
            return self._base.clear()
        return removed[0] if len(removed) == 1 else pl.concat(removed, how="vertical")

    # -- internals ---------------------------------------------------------------------------

    def _set_base(self, frame: pl.DataFrame, *, is_sorted: bool = False) -> None:
        self._changes += 1
        self._base = (frame if is_sorted else frame.sort(self.hash_column)).rechunk()
        self._hashes = self._base.get_column(self.hash_column).to_numpy()
        self._live = np.ones(self._base.height, dtype=bool)
        self._dead = 0
        # (with group_shift the base's partitions are its hashes' top bits, not held)
        pids = self._pids_of(self._base)
        self._pids = _NONE if self.group_shift is not None else pids
        self._counts = np.zeros(self.num_partitions, dtype=np.int64)
        self._count(pids, 1)
        del pids
        if self._tail.height:
            self._count(self._pids_of(self._tail), 1)

    def compact(self) -> None:
        """Merge the tail into the base and drop tombstoned rows: :meth:`frame` is then sorted."""
        if self._tail.height == self._tail_dead:
            self._tail, self._tail_live, self._tail_dead = (
                self._tail.clear(),
                np.ones(0, dtype=bool),
                0,
            )
            if self._dead:
                self._set_base(self._base.filter(pl.Series(self._live)), is_sorted=True)
            return
        (base,) = self._merged([self.height])
        self._set_base(base, is_sorted=True)

    def split(self, sizes: Sequence[int]) -> list[pl.DataFrame]:
        """Merge, then cut the live rows (sorted by hash) into consecutive pieces of
        ``sizes`` rows (their sum: :attr:`height`); this store is left empty.

        Each piece is gathered into buffers of its own: a zero-copy piece of one merged
        base would keep the whole base alive until every other piece is let go too (at
        10M keys, halving 16 slices of 512k rows kept ~200 MB of old bases alive).
        """
        pieces = self._merged(sizes)
        self._set_base(self._base.clear(), is_sorted=True)
        return pieces

    def _merged(self, sizes: Sequence[int]) -> list[pl.DataFrame]:
        """The live rows of the base and the tail in hash order, gathered into pieces of
        ``sizes`` rows; the tail is emptied and the base let go (the caller sets a new one)."""
        tail, tail_live = self._tail, self._tail_live
        self._tail = tail.clear()
        self._tail_live, self._tail_dead = np.ones(0, dtype=bool), 0
        n_base, n_tail = self._base.height, tail.height
        if n_tail == 0:
            at = np.flatnonzero(self._live).astype(np.uint32 if n_base < 2**32 else np.int64)
        else:
            # Merge, not sort: the base is sorted, so sorting the (small) tail and finding
            # where each of its rows goes gives the order of every row; then ONE gather of
            # the live rows builds the new base (no sort of the state).
            tail_hashes = tail.get_column(self.hash_column).to_numpy()
            tail_order = np.argsort(tail_hashes, kind="stable")
            slots = np.searchsorted(self._hashes, tail_hashes[tail_order], side="right")
            slots += np.arange(n_tail)  # each tail row's position among all rows
            index = np.ones(n_base + n_tail, dtype=bool)
            index[slots] = False  # True: a base row
            keep = np.empty(n_base + n_tail, dtype=bool)
            keep[index] = self._live
            keep[slots] = tail_live[tail_order]
            dtype = np.uint32 if n_base + n_tail < 2**32 else np.int64
            order = np.empty(n_base + n_tail, dtype=dtype)
            order[index] = np.arange(n_base, dtype=dtype)
            order[slots] = n_base + tail_order
            del index
            at = order[keep]
            del order, keep
        # Column by column, each base + tail made one chunk first: a gather over the tail's
        # many chunks (one per batch) costs 4-8x more (6M + 1M rows: 1.4 s -> 0.2 s). Each
        # old column is let go once gathered, so the peak holds about one copy of the
        # state plus a column, not two copies.
        bounds = np.cumsum([0, *sizes])
        assert int(bounds[-1]) == at.size, (list(sizes), at.size)  # (the pieces: every live row)
        cuts = [pl.Series(at[lo:hi]) for lo, hi in itertools.pairwise(bounds.tolist())]
        old, self._base, self._hashes, self._pids = self._base, self._base.clear(), _NONE, _NONE
        names = old.columns
        columns: list[list[pl.Series]] = [[] for _ in sizes]
        for name in names:
            both = old.get_column(name)
            if n_tail:
                both = pl.concat([both, tail.get_column(name)], rechunk=True)
            old = pl.DataFrame([c for c in old.get_columns() if c.name != name])
            tail = pl.DataFrame([c for c in tail.get_columns() if c.name != name])
            for piece, cut in zip(columns, cuts, strict=True):
                piece.append(both.gather(cut))
            del both
        return [pl.DataFrame(piece) for piece in columns]

    def merge_pressure(self) -> float:
        """How full the tail (or the tombstones) is against the limit past which a change
        merges it into the base (:meth:`compact`): above 1, the next change merges."""
        limit, dead_limit = self._merge_limits()
        return max(_ratio(self._tail.height, limit), _ratio(self._dead, dead_limit))

    def _merge_limits(self) -> tuple[int, int]:
        # The tail may grow to a quarter of the base (up to 8x tail_rows): a merge then
        # comes only every ``base / 4`` new rows, so its cost per row added stays flat.
        live = self._base.height - self._dead
        limit = max(self.tail_rows, min(live // 4, 8 * self.tail_rows))
        return limit, max(self.tail_rows, self._base.height // 2)

    def _maybe_merge(self) -> None:
        if not self.auto_merge:
            return
        limit, dead_limit = self._merge_limits()
        if self._tail.height > limit or self._dead > dead_limit:
            self.compact()

    def _find(
        self, keys: pl.DataFrame, on: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the live rows of ``keys`` in the base and in the tail."""
        if keys.height == 0 or self.height == 0:
            # (no live row to find: e.g. the first batch's upserts, no sort of their hashes)
            return _NONE, _NONE
        columns = tuple(on or self.key_columns)
        changes, found_keys, found_on, found = self._found
        if changes == self._changes and found_keys is keys and found_on == columns:
            return found
        probe = self.probe(keys, columns)
        base_at, tail_at = self._candidates(probe.wanted)
        tail_hashes = self._tail_hashes() if tail_at.size else _NONE
        found = (
            probe.confirm(self._base, self._hashes, base_at),
            probe.confirm(self._tail, tail_hashes, tail_at),
        )
        self._found = (self._changes, keys, columns, found)
        return found

    def probe(self, keys: pl.DataFrame, on: Sequence[str] | None = None) -> KeyProbe:
        """The :class:`KeyProbe` of ``keys`` on ``on`` (default the key columns): the
        one the last search built when ``keys`` is the same frame (its hashes sorted once)."""
        return self._probe.of(keys, tuple(on or self.key_columns), self.hash_column)

    def _candidates(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of live rows whose hash is in ``wanted`` (sorted, unique): base, tail."""
        # An operator looks keys up and then replaces the same keys: search once.
        memo = self._memo
        if memo is not None and memo[0] == self._changes and np.array_equal(memo[1], wanted):
            return memo[2], memo[3]
        base_at = self._candidates_in_base(wanted)
        tail_at = _NONE
        if self._tail.height and wanted.size <= _FEW:  # (a comparison per key, no query plan)
            tail_at = np.flatnonzero(np.isin(self._tail_hashes(), wanted))
        elif self._tail.height:  # a hash set over ``wanted``, one pass over the tail
            in_tail = self._tail.get_column(self.hash_column).is_in(pl.Series(wanted).implode())
            tail_at = np.flatnonzero(in_tail.to_numpy())
        if self._tail_dead and tail_at.size:
            tail_at = tail_at[self._tail_live[tail_at]]
        self._memo = (self._changes, wanted, base_at, tail_at)
        return base_at, tail_at

    def _tail_hashes(self) -> np.ndarray:
        return self._tail.get_column(self.hash_column).to_numpy()

    def _candidates_in_base(self, wanted: np.ndarray) -> np.ndarray:
        """Positions of live base rows whose hash is in ``wanted`` (sorted, unique)."""
        if self._base.height == 0:
            return _NONE
        hashes = self._hashes
        lo = np.searchsorted(hashes, wanted, side="left")
        inside = lo < hashes.size
        lo = lo[inside]
        lo = lo[hashes[lo] == wanted[inside]]
        if lo.size == 0:
            return _NONE
        last = hashes.size - 1
        repeated = (lo < last) & (hashes[np.minimum(lo + 1, last)] == hashes[lo])
        if not repeated.any():
            at = lo
        else:  # several rows per hash: expand each [lo, hi) range
            hi = lo + 1
            hi[repeated] = np.searchsorted(hashes, hashes[lo[repeated]], side="right")
            counts = hi - lo
            starts = np.cumsum(counts) - counts
            at = np.repeat(lo - starts, counts) + np.arange(int(counts.sum()))
        return at[self._live[at]] if self._dead else at

    def _add_to_tail(self, rows: pl.DataFrame) -> None:
        # (vstack: the rows' chunks appended, no query plan; pl.concat plans one, ~40 us,
        # paid by every slice a batch adds rows to: 32 slices at 10M keys)
        tail = self._tail.vstack(rows)
        live = np.concatenate([self._tail_live, np.ones(rows.height, dtype=bool)])
        # A gather over a frame of many chunks (one per batch) costs several times one over
        # a single chunk (the tail's rows are gathered every batch): rechunked every
        # _TAIL_CHUNKS appends, a copy of the tail amortised over as many batches, which
        # drops the tail's tombstoned rows on the way.
        # Or once most of a large tail is tombstones (a batch replacing the keys the last
        # one added, in one chunk each): the next gathers and merges would carry them.
        dead = self._tail_dead
        if tail.n_chunks() > _TAIL_CHUNKS or (dead > _SMALL_TAIL and 2 * dead >= tail.height):
            if self._tail_dead:
                tail = _without(tail, np.flatnonzero(~live))
                live = np.ones(tail.height, dtype=bool)
                self._tail_dead = 0
            tail = tail.rechunk()
        self._tail, self._tail_live = tail, live

    def _live_tail(self) -> pl.DataFrame:
        if self._tail_dead == 0:
            return self._tail
        return self._tail.filter(pl.Series(self._tail_live))

    def _kill_tail(self, at: np.ndarray) -> None:
        if at.size == 0:
            return
        self._tail_live[at] = False
        self._tail_dead += int(at.size)
        self._count(self._pids_of(self._tail)[at], -1)

    def _kill_base(self, at: np.ndarray) -> None:
        if at.size == 0:
            return
        self._live[at] = False
        self._dead += int(at.size)
        self._count(self._pids[at] if self.group_shift is None else self._pids_at(at), -1)

    def _pids_at(self, at: np.ndarray) -> np.ndarray:
        """With ``group_shift``: the partitions of the base rows at ``at``."""
        assert self.group_shift is not None
        return self._hashes[at] >> self.group_shift

    def _hash_range(self, lo: int, hi: int) -> np.ndarray:
        """With ``group_shift``: the base positions ``[start, stop)`` of partitions ``[lo, hi)``."""
        assert self.group_shift is not None
        bounds = [min(p << int(self.group_shift), 2**64 - 1) for p in (lo, hi)]
        at = np.searchsorted(self._hashes, np.asarray(bounds, dtype=np.uint64))
        if hi << int(self.group_shift) >= 2**64:  # (past the last partition: every row)
            at[1] = self._hashes.size
        return at

    def _pids_of(self, frame: pl.DataFrame) -> np.ndarray:
        """The partition of every row of ``frame``."""
        if self.group_shift is not None:
            return frame.get_column(self.hash_column).to_numpy() >> self.group_shift
        if self.group_column is not None:
            return frame.get_column(self.group_column).to_numpy()
        hashes = frame.get_column(self.hash_column).to_numpy()
        return hashes % np.uint64(self.num_partitions)

    def _count(self, pids: np.ndarray, sign: int) -> None:
        if pids.size:
            counts = np.bincount(pids.astype(np.int64, copy=False), minlength=self.num_partitions)
            self._counts += sign * counts

    def _pid_expr(self, hashes: pl.Expr) -> pl.Expr:
        return (hashes % self.num_partitions).cast(pl.UInt32)

    def _mask(self, frame: pl.DataFrame, predicate: pl.Expr) -> np.ndarray:
        mask = frame.select(predicate.fill_null(False)).to_series()
        if mask.dtype != pl.Boolean:
            msg = f"the predicate must be boolean; got {mask.dtype} from {predicate}"
            raise TypeError(msg)
        return mask.to_numpy()


_NONE = np.zeros(0, dtype=np.int64)
_TAIL_CHUNKS = 8
# Up to this many keys or candidate rows, numpy and Python comparisons: each Polars call
# on a few rows costs ~50-100 us (a query plan), more than comparing the rows one by one.
_FEW = 16
_SMALL_TAIL = 8_192


def _ratio(rows: int, limit: int) -> float:
    """``rows / limit``, infinite for rows over a zero limit."""
    if limit > 0:
        return rows / limit
    return float("inf") if rows else 0.0


class ProbeMemo:
    """The last :class:`KeyProbe` built, for the same keys frame and columns: a store's fold
    searches a batch's keys, then places them, with the very same frame (one sort)."""

    def __init__(self) -> None:
        self._last: tuple[pl.DataFrame, tuple[str, ...], KeyProbe] | None = None

    def of(self, keys: pl.DataFrame, columns: tuple[str, ...], hash_column: str) -> KeyProbe:
        """The probe of ``keys`` on ``columns``: the last one when ``keys`` is that frame."""
        last = self._last
        if last is not None and last[0] is keys and last[1] == columns:
            return last[2]
        probe = KeyProbe(keys, list(columns), hash_column)
        self._last = (keys, columns, probe)
        return probe


class KeyProbe:
    """Keys being looked for: their distinct hashes, and a way to confirm candidate rows.

    Examples
    --------
    >>> keys = pl.DataFrame({"k": ["a", "b"], "h": [7, 9]}, schema={"k": pl.String, "h": pl.UInt64})
    >>> probe = KeyProbe(keys, ["k"], "h")
    >>> probe.wanted.tolist()
    [7, 9]
    >>> rows = pl.DataFrame({"k": ["b", "z"], "h": [9, 9]}, schema=keys.schema)
    >>> probe.confirm(rows, rows["h"].to_numpy(), np.arange(2)).tolist()  # "z": same hash
    [0]
    """

    def __init__(self, keys: pl.DataFrame, key_columns: list[str], hash_column: str):
        hashes = keys.get_column(hash_column).to_numpy()
        self.order = np.argsort(hashes)
        self.sorted_hashes = hashes[self.order]
        first = np.empty(hashes.size, dtype=bool)
        first[:1] = True
        np.not_equal(self.sorted_hashes[1:], self.sorted_hashes[:-1], out=first[1:])
        self.first = first  # (in hash order: the first key of each distinct hash)
        self.wanted = self.sorted_hashes[first]
        # One key row per hash: a candidate is checked against that row column by column.
        self.one_row_per_hash = bool(first.all())
        self.keys = pl.DataFrame([keys.get_column(c) for c in key_columns])
        self.key_columns = key_columns
        # Several keys per hash (the hash covers a prefix of the key, e.g. a group key of
        # several windows): the same check against a hash of the whole key, when that one is
        # unique among the keys; otherwise a semi join.
        self.by_key_hash: tuple[np.ndarray, np.ndarray] | None = None
        if not self.one_row_per_hash:
            full = _key_hash(self.keys)
            order = np.argsort(full)
            if bool((full[order][1:] != full[order][:-1]).all()):
                self.by_key_hash = (order, full[order])

    def confirm(self, frame: pl.DataFrame, hashes: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The positions among ``at`` whose key columns equal one of the keys (nulls equal)."""
        if at.size == 0:
            return _NONE
        found = _gather(pl.DataFrame([frame.get_column(c) for c in self.key_columns]), at)
        if self.one_row_per_hash:
            rows = self.order[np.searchsorted(self.sorted_hashes, hashes[at])]
            same = equal_rows(found, _gather(self.keys, rows))
            return at if same.all() else at[same]
        if self.by_key_hash is not None:
            order, sorted_full = self.by_key_hash
            full = _key_hash(found)
            slot = np.minimum(np.searchsorted(sorted_full, full), sorted_full.size - 1)
            hit = np.flatnonzero(sorted_full[slot] == full)
            same = equal_rows(_gather(found, hit), _gather(self.keys, order[slot[hit]]))
            return at[hit[same]]
        found = found.with_columns(pl.Series(_POSITION, at))
        hits = found.join(self.keys, on=self.key_columns, how="semi", nulls_equal=True)
        return at if hits.height == found.height else hits.get_column(_POSITION).to_numpy()


def _key_hash(keys: pl.DataFrame) -> np.ndarray:
    """A 64-bit hash of every row of ``keys`` (Categoricals by their strings): the stable
    hash, which costs ~20 us on a few keys where a Polars ``struct(...).hash`` costs ~200."""
    return stable_hash(keys, keys.columns)


def equal_rows(left: pl.DataFrame, right: pl.DataFrame) -> np.ndarray:
    """Whether each row of ``left`` equals the same row of ``right`` (same columns; nulls
    equal), column by column; a few rows of dtypes Python compares exactly, in Python.

    Examples
    --------
    >>> equal_rows(pl.DataFrame({"k": [1, None]}), pl.DataFrame({"k": [2, None]})).tolist()
    [False, True]
    """
    same = np.ones(left.height, dtype=bool)
    for a, b in zip(left.get_columns(), right.get_columns(), strict=True):
        if left.height <= _FEW and _python_equal(a.dtype):
            same &= np.fromiter(map(operator.eq, a.to_list(), b.to_list()), bool, left.height)
        else:
            same &= a.eq_missing(b).to_numpy()
    return same


def _python_equal(dtype: PolarsDataType) -> bool:
    """Whether Python's ``==`` on ``to_list()`` values is Polars' ``eq_missing``: flat
    dtypes only, not floats (NaN), nor nanosecond times (Python's hold microseconds)."""
    if isinstance(dtype, (pl.Datetime, pl.Duration)):
        return dtype.time_unit != "ns"
    return (
        dtype.is_integer()
        or dtype in (pl.String, pl.Binary, pl.Boolean, pl.Date, pl.Null)
        or isinstance(dtype, (pl.Categorical, pl.Enum))
    )


def _gather(frame: pl.DataFrame, at: np.ndarray) -> pl.DataFrame:
    """The rows of ``frame`` at positions ``at``, column by column."""
    if at.size == 1:  # (a zero-copy slice: a gather of one row costs ~50-100 us)
        return frame.slice(int(at[0]), 1)
    return frame[pl.Series(at)]


def _without(frame: pl.DataFrame, at: np.ndarray) -> pl.DataFrame:
    """``frame`` without the rows at positions ``at`` (unique): a few removed from a
    small frame, the zero-copy slices between them (no query plan); otherwise a filter."""
    if at.size > _FEW or frame.height > _SMALL_TAIL:
        keep = np.ones(frame.height, dtype=bool)
        keep[at] = False
        return frame.filter(pl.Series(keep))
    bounds = [-1, *np.sort(at).tolist(), frame.height]
    pieces = [frame.slice(a + 1, b - a - 1) for a, b in itertools.pairwise(bounds) if b - a > 1]
    if not pieces:
        return frame.clear()
    return pieces[0] if len(pieces) == 1 else pl.concat(pieces, how="vertical", rechunk=False)
