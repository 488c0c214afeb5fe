"""A state store's in-memory rows cut into slices of key groups, each its own
:class:`~microstream.state.keyed_rows.KeyedRows`.

One :class:`KeyedRows` keeps a sorted base and an unsorted tail; once the tail is
large it is merged into the base, a copy of the whole state (at 10M keys: 0.76 s
once every 1M new rows, and twice the state in memory while it runs). Here the
rows are cut by contiguous ranges of key groups (the groups are the top bits of
the sort key, so a range is one slice of a sorted base) into slices of at most
``slice_rows`` rows, each a :class:`KeyedRows` with its own base and tail: a
merge copies one slice, so the spike and the extra memory of a merge are bounded
by ``slice_rows``, whatever the size of the state. A slice that grows past
``slice_rows`` is split in two at a group boundary (a merge of that slice, then
two zero-copy halves); a small state is one slice, used as it is.

The tails of all slices together may hold what the single tail held (a quarter
of the state, at most ``8 * tail_rows``): each slice gets its share of that
budget, so merges come as often per row added as before, a slice at a time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import polars as pl

from microstream.state.keyed_rows import KeyedRows, KeyProbe, ProbeMemo

__all__ = ["SlicedRows"]

_Found = tuple[pl.DataFrame, list[tuple[int, np.ndarray, np.ndarray]]]
"""What a search found: the rows, and per slice holding some their base and tail positions."""

_NONE = np.zeros(0, dtype=np.int64)
SLICE_ROWS = 524_288
"""A slice of more rows than this (and of more than one key group) is split in two: the
most rows a merge copies (with its tail), about 25-50 ms on a quiet machine."""
TAIL_ROWS = 131_072
"""The tail budget of the whole state, as :class:`KeyedRows`' ``tail_rows``."""
_MIN_SLICE_TAIL = 1024  # a slice's tail limit floor: a merge is never for a handful of rows
MERGE_AT = 0.75
"""A slice's tail is merged, one slice per change, once past this share of its limit."""
MERGE_OVER = 2.0
"""Past this many times its limit, a slice's tail is merged whatever other slices do."""


class SlicedRows:
    """Rows with a key, a hash sorted by key group, and a key-group column, in slices.

    Parameters
    ----------
    frame
        The initial rows; ``hash_column`` holds each row's (non-null) ``UInt64`` hash
        of the key, whose order sorts the rows by ``group_column`` first.
    key_columns
        The columns that make a key (nulls are valid key values).
    hash_column, group_column
        The hash and the key-group column (``0 <= group < num_groups``).
    num_groups
        The number of key groups.
    tail_rows
        The tail budget, as for :class:`KeyedRows` (spread over the slices); default
        :data:`TAIL_ROWS`.
    slice_rows
        A slice holding more rows than this (and more than one key group) is split;
        default :data:`SLICE_ROWS`.
    is_sorted
        ``frame`` is already sorted by ``hash_column``.
    group_shift
        The key group is the hash's top bits, ``hash >> group_shift`` (the state
        store's hash): ``group_column`` is then not held in memory (at 10M keys of
        23 bytes, 2 bytes a row, and a copy at every merge) but computed from the hash
        in every frame returned.

    Examples
    --------
    >>> import polars as pl
    >>> rows = pl.DataFrame({"k": [1, 2, 3, 4], "v": [10, 20, 30, 40]})
    >>> rows = rows.with_columns(g=pl.col("k").cast(pl.UInt16) % 4).with_columns(
    ...     h=pl.col("g").cast(pl.UInt64) * (1 << 48) + pl.col("k").cast(pl.UInt64)
    ... )
    >>> store = SlicedRows(rows, key_columns=["k"], hash_column="h", group_column="g",
    ...                    num_groups=4, slice_rows=2, group_shift=48)
    >>> store.slice_ranges()
    [(0, 2), (2, 4)]
    >>> keys = rows.filter(pl.col("k").is_in([1, 2]))
    >>> sorted(store.rows_of(keys)["v"].to_list())
    [10, 20]
    >>> store.replace(keys, keys.with_columns(v=pl.lit(0, pl.Int64)))
    >>> sorted(store.frame()["v"].to_list()), store.rows_per_partition()
    ([0, 0, 30, 40], [1, 1, 1, 1])
    """

    def __init__(
        self,
        frame: pl.DataFrame,
        *,
        key_columns: Sequence[str],
        hash_column: str,
        group_column: str,
        num_groups: int,
        tail_rows: int | None = None,
        slice_rows: int | None = None,
        is_sorted: bool = False,
        group_shift: int | None = None,
    ):
        self.key_columns = list(key_columns)
        self.hash_column = hash_column
        self.group_column = group_column
        self.num_groups = num_groups
        self.tail_rows = TAIL_ROWS if tail_rows is None else tail_rows
        self.slice_rows = SLICE_ROWS if slice_rows is None else slice_rows
        self.group_shift = group_shift
        self._columns = frame.columns
        self._group_dtype = frame.schema[group_column]
        self._empty = frame.clear()
        self._changes = 0  # bumped by every change: invalidates the search memo
        # the last _find: (changes, the keys frame itself, columns, what it found): a state
        # store's fold looks a batch's keys up, then replaces them, with the very same frame
        self._found: tuple[int, pl.DataFrame, tuple[str, ...], _Found] | None = None
        # the last probe of several slices (as KeyedRows')
        self._probe = ProbeMemo()
        whole = self._keyed(self._held(frame), is_sorted=is_sorted)
        self._starts: list[int] = [0]
        self._slices: list[KeyedRows] = [whole]
        if whole.height > self.slice_rows:
            whole.compact()
            self._starts, self._slices = self._cut(whole, 0, num_groups)
            self._share_tail()

    # -- reading -----------------------------------------------------------------------------

    @property
    def height(self) -> int:
        """Number of live rows."""
        return sum(s.height for s in self._slices)

    def estimated_size(self) -> int:
        """Bytes held, tombstoned rows included (they are freed at their slice's next merge)."""
        return sum(s.estimated_size() for s in self._slices)

    def slice_ranges(self) -> list[tuple[int, int]]:
        """The key-group range ``[lo, hi)`` of every slice, in group order."""
        return list(zip(self._starts, [*self._starts[1:], self.num_groups], strict=True))

    def rows_per_partition(self) -> list[int]:
        """Live rows per key group, in group order."""
        counts = np.zeros(self.num_groups, dtype=np.int64)
        for s in self._slices:
            counts += np.asarray(s.rows_per_partition(), dtype=np.int64)
        return [int(n) for n in counts]

    def frame(self) -> pl.DataFrame:
        """Every live row (order unspecified; after :meth:`compact`, sorted by hash)."""
        frames = [f for f in (s.frame() for s in self._slices) if f.height]
        if not frames:
            return self._empty
        if len(frames) == 1:
            return self._dressed(frames[0])
        return self._dressed(pl.concat(frames, how="vertical", rechunk=False))

    def rows_in_partitions(self, lo: int, hi: int) -> pl.DataFrame:
        """The live rows of key groups ``[lo, hi)`` (order unspecified): each slice's
        rows are one contiguous piece of its base plus its tail rows of those groups."""
        found = [
            s.rows_in_partitions(max(a, lo), min(b, hi))
            for s, (a, b) in zip(self._slices, self.slice_ranges(), strict=True)
            if a < hi and lo < b
        ]
        found = [f for f in found if f.height]
        if not found:
            return self._empty
        return self._dressed(found[0] if len(found) == 1 else pl.concat(found, how="vertical"))

    def rows_of(self, keys: pl.DataFrame, on: Sequence[str] | None = None) -> pl.DataFrame:
        """Every live row whose key is in ``keys`` (key columns, hash and key group).

        ``on``: as for :meth:`KeyedRows.rows_of` (match these columns only).
        """
        if len(self._slices) == 1:
            return self._dressed(self._slices[0].rows_of(keys, on))
        return self._dressed(self._find(keys, on)[0])

    def probe(self, keys: pl.DataFrame, on: Sequence[str] | None = None) -> KeyProbe:
        """The :class:`KeyProbe` of ``keys`` on ``on``, as :meth:`KeyedRows.probe`: the one
        the last search built when ``keys`` is the same frame."""
        if len(self._slices) == 1:  # (the single slice searches by itself)
            return self._slices[0].probe(keys, on)
        return self._probe.of(keys, tuple(on or self.key_columns), self.hash_column)

    # -- changing ----------------------------------------------------------------------------

    def replace(self, keys: pl.DataFrame, rows: pl.DataFrame) -> None:
        """Remove every row of ``keys`` (key columns, hash and key group), then add ``rows``."""
        rows = self._held(rows)
        if rows.height > self.tail_rows and self.height == 0:
            self._fill(rows)
            return
        if len(self._slices) == 1:
            self._slices[0].replace(keys, rows)
        else:
            found = {i: (base_at, tail_at) for i, base_at, tail_at in self._find(keys)[1]}
            added = dict(self._route(rows))
            for i in sorted(found.keys() | added.keys()):
                base_at, tail_at = found.get(i, (_NONE, _NONE))
                self._slices[i].replace_at(base_at, tail_at, added.get(i, self._empty))
        self._changed()

    def append(self, rows: pl.DataFrame) -> None:
        """Add ``rows``, whose keys the caller guarantees are not in the state yet."""
        for i, part in self._route(self._held(rows)):
            self._slices[i].append(part)
        self._changed()

    def remove_where(self, predicate: pl.Expr) -> pl.DataFrame:
        """Remove the live rows where ``predicate`` is true (null: kept) and return them."""
        removed = [s.remove_where(predicate) for s in self._slices if s.height]
        removed = [r for r in removed if r.height]
        self._changed()
        if not removed:
            return self._empty
        return self._dressed(
            removed[0] if len(removed) == 1 else pl.concat(removed, how="vertical")
        )

    def compact(self) -> None:
        """Merge every slice's tail into its base: :meth:`frame` is then sorted."""
        self._changes += 1
        for s in self._slices:
            s.compact()

    # -- internals ---------------------------------------------------------------------------

    def _keyed(self, frame: pl.DataFrame, *, is_sorted: bool) -> KeyedRows:
        return KeyedRows(
            frame,
            key_columns=self.key_columns,
            hash_column=self.hash_column,
            num_partitions=self.num_groups,
            tail_rows=self.tail_rows,
            is_sorted=is_sorted,
            group_column=None if self.group_shift is not None else self.group_column,
            sorted_by_group=True,
            group_shift=self.group_shift,
        )

    def _held(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` as the slices hold it: without the group column if it is derived."""
        if self.group_shift is None or self.group_column not in frame.columns:
            return frame
        # (columns picked, not DataFrame.drop: that builds a query plan, ~50-100 us)
        return pl.DataFrame([c for c in frame.get_columns() if c.name != self.group_column])

    def _dressed(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Rows the slices hold, with their group column again (in its place)."""
        if self.group_shift is None:
            return frame
        if frame.height == 0:
            return self._empty
        groups = _groups(frame.get_column(self.hash_column).to_numpy(), self.group_shift)
        frame = frame.hstack([pl.Series(self.group_column, groups).cast(self._group_dtype)])
        if frame.columns == self._columns:
            return frame
        return pl.DataFrame([frame.get_column(c) for c in self._columns])

    def _changed(self) -> None:
        self._changes += 1
        self._after_change()

    def _route(self, frame: pl.DataFrame) -> list[tuple[int, pl.DataFrame]]:
        """``frame``'s rows by slice: (slice index, its rows), for the slices with rows."""
        if frame.height == 0:
            return []
        if len(self._slices) == 1:
            return [(0, frame)]
        index = self._slice_of(frame)
        first = int(index[0])
        if (index == first).all():
            return [(first, frame)]
        order = np.argsort(index, kind="stable")
        index = index[order]
        ordered = frame[pl.Series(order)]  # (one gather; each slice's rows a zero-copy piece)
        bounds = [0, *(np.flatnonzero(np.diff(index)) + 1).tolist(), index.size]
        return [
            (int(index[lo]), ordered.slice(lo, hi - lo)) for lo, hi in itertools.pairwise(bounds)
        ]

    def _slice_of(self, frame: pl.DataFrame) -> np.ndarray:
        if self.group_shift is not None:
            groups = _groups(frame.get_column(self.hash_column).to_numpy(), self.group_shift)
        else:
            groups = frame.get_column(self.group_column).to_numpy()
        return np.searchsorted(np.asarray(self._starts), groups, side="right") - 1

    def _find(self, keys: pl.DataFrame, on: Sequence[str] | None = None) -> _Found:
        """The live rows of ``keys`` and, per slice holding some, their positions in its
        base and tail.

        Per slice only a search in numpy; the tails' hashes are tested in one pass, the
        candidates gathered at once and confirmed on the key columns at once: a batch
        costs a few Polars calls, not a few per slice.
        """
        columns = tuple(on or self.key_columns)
        memo = self._found
        if memo is not None and memo[0] == self._changes and memo[1] is keys and memo[2] == columns:
            return memo[3]
        frames: list[pl.DataFrame] = []
        at: list[np.ndarray] = []
        owners: list[tuple[int, bool]] = []  # (slice, in its tail)
        if keys.height:
            # sorted by hash, the keys are sorted by group, so by slice: each slice's
            # distinct hashes are one run
            probe = self.probe(keys, columns)
            wanted = probe.wanted
            index = self._slice_of(keys)[probe.order[probe.first]]
            cuts = np.flatnonzero(np.diff(index)) + 1
            for run in np.split(np.arange(wanted.size), cuts):
                i = int(index[run[0]])
                found = self._slices[i].base_candidates(wanted[run[0] : run[-1] + 1])
                if found.size:
                    frames.append(self._slices[i].base)
                    at.append(found)
                    owners.append((i, False))
            self._tail_candidates(wanted, frames, at, owners)
        if not frames:
            result: _Found = (self._empty, [])
        else:
            starts = np.cumsum([0] + [f.height for f in frames[:-1]])
            every = pl.concat(frames, how="vertical", rechunk=False)
            every = every[
                pl.Series(np.concatenate([a + s for a, s in zip(at, starts, strict=True)]))
            ]
            probe = self.probe(keys, columns)
            every_at = np.arange(every.height)
            hits = np.sort(
                probe.confirm(every, every.get_column(self.hash_column).to_numpy(), every_at)
            )
            rows = every if hits.size == every.height else every[pl.Series(hits)]
            per_slice: dict[int, tuple[np.ndarray, np.ndarray]] = {}
            edges = np.cumsum([0] + [a.size for a in at])
            for (i, in_tail), found, lo, hi in zip(owners, at, edges[:-1], edges[1:], strict=True):
                mine = found[hits[(hits >= lo) & (hits < hi)] - lo]
                base_at, tail_at = per_slice.get(i, (_NONE, _NONE))
                per_slice[i] = (base_at, mine) if in_tail else (mine, tail_at)
            result = (rows, [(i, b, t) for i, (b, t) in sorted(per_slice.items())])
        self._found = (self._changes, keys, columns, result)
        return result

    def _tail_candidates(
        self,
        wanted: np.ndarray,
        frames: list[pl.DataFrame],
        at: list[np.ndarray],
        owners: list[tuple[int, bool]],
    ) -> None:
        """Add the tail rows whose hash is in ``wanted``: one hash-set pass over every
        slice's tail at once."""
        tails = [(i, s.tail) for i, s in enumerate(self._slices) if s.tail.height]
        if not tails:
            return
        every = pl.concat([t.get_column(self.hash_column) for _, t in tails], rechunk=False)
        hit = np.flatnonzero(every.is_in(pl.Series(wanted).implode()).to_numpy())
        if hit.size == 0:
            return
        starts = np.cumsum([0] + [t.height for _, t in tails[:-1]])
        which = np.searchsorted(starts, hit, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        for run in np.split(np.arange(hit.size), cuts):
            j = int(which[run[0]])
            mine = hit[run] - starts[j]
            mine = mine[self._slices[tails[j][0]].tail_live[mine]]  # (not the tombstoned)
            if mine.size:
                frames.append(tails[j][1])
                at.append(mine)
                owners.append((tails[j][0], True))

    def _after_change(self) -> None:
        """Split one slice grown past ``slice_rows``, or merge the tails due.

        Slices filled at the same rate (keys spread evenly) would all reach their merge
        limit in the same batch: a merge of the whole state at once. So, like snapshots
        by pressure, one slice per change is merged, the fullest, once past
        ``MERGE_AT`` of its limit; more at once only past ``MERGE_OVER`` times the
        limit (a batch adding more rows than a merge a change takes out, or a split
        halving every slice's share of the tail budget, leaves tails over their limits
        for a while, and within that bound the merges stay spread). A split, which
        merges its slice, is the only one of its change.
        """
        if len(self._slices) == 1:
            self._split_one()  # (a single slice merges by itself, as one KeyedRows)
            return
        if self._split_one():
            return
        pressures = [s.merge_pressure() for s in self._slices]
        due = [i for i, p in enumerate(pressures) if p > MERGE_OVER]
        fullest = int(np.argmax(pressures))
        if fullest not in due and pressures[fullest] >= MERGE_AT:
            due.append(fullest)
        for i in due:
            self._slices[i].compact()

    def _split_one(self) -> bool:
        """Split the largest slice over ``slice_rows`` rows (and of more than one group)."""
        ranges = self.slice_ranges()
        over = [
            (s.height, i)
            for i, (s, (a, b)) in enumerate(zip(self._slices, ranges, strict=True))
            if s.height > self.slice_rows and b - a > 1
        ]
        if not over:
            return False
        _, i = max(over)
        (a, b), whole = ranges[i], self._slices[i]
        counts = np.asarray(whole.rows_per_partition(), dtype=np.int64)[a:b]
        pieces = _pieces(counts, self.slice_rows)
        frames = whole.split([int(counts[lo:hi].sum()) for lo, hi in pieces])
        starts = [a + lo for lo, _ in pieces]
        slices = [self._keyed(f, is_sorted=True) for f in frames]
        self._starts[i : i + 1] = starts
        self._slices[i : i + 1] = slices
        self._share_tail()
        return True

    def _cut(self, whole: KeyedRows, lo: int, hi: int) -> tuple[list[int], list[KeyedRows]]:
        """A compacted slice of groups ``[lo, hi)`` cut at group boundaries into pieces
        of at most ``slice_rows`` rows where it can (zero-copy pieces of its base)."""
        counts = np.asarray(whole.rows_per_partition(), dtype=np.int64)[lo:hi]
        pieces = _pieces(counts, self.slice_rows)
        base = whole.frame()
        starts, slices, offset = [], [], 0
        for a, b in pieces:
            rows = int(counts[a:b].sum())
            slices.append(self._keyed(base.slice(offset, rows), is_sorted=True))
            starts.append(lo + a)
            offset += rows
        return starts, slices

    def _fill(self, rows: pl.DataFrame) -> None:
        """Make ``rows`` (as held) the rows of this empty store: sorted by hash once and
        cut into slices, as a loaded state is.

        An empty state filled by one large batch (the first of a reprocessing: 837k
        groups of a 5M-row batch) went through a tail: the merge sorted and gathered
        every row, then the split gathered every row again into the slices. The order
        is the merge's (stable by hash), so the rows and slices are the same.
        """
        whole = self._keyed(rows.sort(self.hash_column, maintain_order=True), is_sorted=True)
        self._starts, self._slices = [0], [whole]
        if whole.height > self.slice_rows:
            self._starts, self._slices = self._cut(whole, 0, self.num_groups)
        self._share_tail()
        self._changed()

    def _share_tail(self) -> None:
        """Give each slice its share of the tail budget (a merge per row added as for one
        tail over the whole state, each merge one slice)."""
        share = max(min(_MIN_SLICE_TAIL, self.tail_rows), self.tail_rows // len(self._slices))
        several = len(self._slices) > 1
        for s in self._slices:
            s.tail_rows = share if several else self.tail_rows
            s.auto_merge = not several


def _groups(hashes: np.ndarray, shift: int) -> np.ndarray:
    """The key groups of ``hashes``: their top bits, as the smallest unsigned dtype.

    Examples
    --------
    >>> _groups(np.array([5, (3 << 48) + 7], dtype=np.uint64), 48).tolist()
    [0, 3]
    """
    groups = hashes >> np.uint64(shift)
    bits = 64 - shift
    dtype = (
        np.uint8
        if bits <= 8
        else np.uint16
        if bits <= 16
        else np.uint32
        if bits <= 32
        else np.uint64
    )
    return groups.astype(dtype)


def _pieces(counts: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Cut groups ``[0, len(counts))`` into contiguous pieces, halving any piece of more
    than ``limit`` rows and more than one group (by groups: pieces stay aligned as the
    state grows evenly).

    Examples
    --------
    >>> _pieces(np.array([5, 5, 5, 5]), 10)
    [(0, 2), (2, 4)]
    >>> _pieces(np.array([30, 1, 1, 1]), 10)
    [(0, 1), (1, 2), (2, 4)]
    """
    out: list[tuple[int, int]] = []
    todo = [(0, counts.size)]
    while todo:
        a, b = todo.pop()
        if b - a > 1 and int(counts[a:b].sum()) > limit:
            middle = (a + b) // 2
            todo += [(middle, b), (a, middle)]
        else:
            out.append((a, b))
    return out
