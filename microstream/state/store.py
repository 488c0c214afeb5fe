"""The keyed state of one stateful operator, persisted as Arrow IPC files (format 2).

A :class:`StateStore` holds the rows of an operator's state (partial
aggregates, buffered window rows, deduplication keys, ...) in memory as one
:class:`~microstream.state.sliced_rows.SlicedRows` (sorted by a key hash, so a
batch finds its keys without scanning the state). Every row also carries its *key
group* (:mod:`microstream.state.key_groups`: a stable hash of the key, modulo the
checkpoint's number of key groups); both come from ONE hash of the key, computed
once when the row is written (:func:`~microstream.state.store_rows.hashed`). After every batch the engine calls :meth:`StateStore.commit`
with the batch id: the changes since the last commit go to ONE delta file, and
snapshots bound what recovery replays (a small state whole every ``snapshot_every``
versions, split into contiguous key-group ranges; a large one the key-group slices
whose deltas have grown, :mod:`microstream.state.rotation`); a worker owning a range
of key groups reads only its files (:meth:`StateStore.load` with ``key_groups=``).
No pickle anywhere.

Layout of the store's directory ``state/<operator>/<store>/``::

    _metadata.json                   key columns, exact schema, key groups, hash algorithm
    versions/<version>.json          one per committed version, written last: the commit point
    deltas/<version>.arrow           rows of the keys changed in that version (+ ``__deleted``,
                                     ``__key_group``), sorted by key group
    snapshots/<version>/<lo>-<hi>.arrow  the rows of key groups lo..hi-1 as of that version
                                     (all groups: a full snapshot; some: a spread one)

A version exists when, and only when, ``versions/<version>.json`` exists; it
names its parent version, whether it is a snapshot, its files with their
key-group ranges, row counts and CRC-32s, and how many rows each key group
holds, so a load checks what it rebuilt.

Key semantics: a key (the values of ``key_columns``, nulls included) may hold
several rows. An upsert replaces *all* rows of each key it contains; a delete
removes all rows of a key. Row order in :attr:`StateStore.frame` is
unspecified.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Literal

import numpy as np
import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    SchemaMismatchError,
)
from microstream.state.chain import read_chain
from microstream.state.format import (
    METADATA_FILE,
    VERSIONS_DIR,
    Compression,
    StateFile,
    StateMetadata,
    StatePart,
    StateVersion,
    checksum,
    covers_key_groups,
    delta_file,
    encode_frame,
    frame_from_text,
    frame_to_text,
    pyarrow_round_trips,
    ranged_delta_file,
    read_state_file,
    snapshot_file,
    version_file,
)
from microstream.state.key_groups import (
    DEFAULT_KEY_GROUPS,
    check_hashable,
    key_group_ranges,
)
from microstream.state.retention import delete_below
from microstream.state.rotation import (
    EMPTY_BASE,
    SNAPSHOT_FILES,
    due_groups,
    full_snapshot_ranges,
    resolve_bases,
    rows_after_base,
    rows_based_at,
    slices_by_pressure,
    slices_to_write,
)
from microstream.state.sliced_rows import SlicedRows
from microstream.state.store_checks import (
    check_forward,
    check_whole_commit,
    conform,
    key_group_range,
    validate_store_arguments,
)
from microstream.state.store_metadata import check_metadata, read_metadata, state_metadata
from microstream.state.store_rows import DELETED as _DELETED
from microstream.state.store_rows import HASH as _HASH
from microstream.state.store_rows import KG as _KG
from microstream.state.store_rows import MASK as _MASK
from microstream.state.store_rows import ORDER as _ORDER
from microstream.state.store_rows import POSITION as _POSITION
from microstream.state.store_rows import (
    by_key_group,
    deletion_markers,
    hashed,
    key_positions,
    record,
    same_keys,
    upserted,
)
from microstream.state.store_rows import project as _project

__all__ = ["StateStore"]

logger = logging.getLogger("microstream")

_MAX_KEY_GROUPS = 1 << 16  # the key group is kept as a UInt16
# Uncompressed: cheapest to write every batch and read back zero-copy on recovery
# (lz4 makes files ~3x smaller but a snapshot of 1M rows ~4x slower to encode).
_NO_ROWS = np.zeros(0, dtype=np.uint32)
_HASH_SEED = 0x6D73  # "ms"; the in-memory hash only, never on disk
_COMPRESSION: Final[Compression] = None


class StateStore:
    """The keyed state of one stateful operator, in key-hash partitions.

    Parameters
    ----------
    storage
        The operator's directory in the checkpoint, ``state/<operator>/``.
    operator
        The operator's name, recorded in the metadata and used in messages.
    key_columns
        The columns whose values form a key. Null is a valid key value.
    schema
        Every column of the state, key columns included, in order.
    num_key_groups
        How many key groups the rows are split into (default: the recorded
        number, or 128 for new state); fixed when the state is first committed,
        a later mismatch is refused.
    snapshot_every
        While the state is small, a full snapshot at every version divisible by
        this (recovery replays fewer deltas); above ``spread_snapshots_above`` rows,
        each version snapshots only the key-group slices whose deltas reached their
        rows or that went ``10 * snapshot_every`` versions without a snapshot
        (:mod:`microstream.state.rotation`): no batch pays for the whole state.
    min_versions_to_retain
        Files needed to rebuild any of the last this-many versions (by
        version number) are kept; older ones are removed after a snapshot.
    hash_columns
        The key columns the hash, and so the partition, is computed over
        (default: all). Fewer lets :meth:`lookup` find every row of a key
        prefix: a join keeps one key per row (join keys and a row id), hashed
        on the join keys, so new rows are inserted without rewriting old ones.
    prefix_lookups
        With ``hash_columns`` fewer than the key columns: whether :meth:`lookup` is
        called with the hash columns only (every row of a key prefix). ``False`` (an
        aggregation's windows of a group key: always looked up by whole key) makes
        the in-memory hash one of the whole key, the key group still of the hash
        columns: a lookup, fold or eviction then finds one candidate row per key
        instead of every window of its group key; a lookup of a key prefix still
        works, by a scan of the state.
    one_row_per_key
        The caller never gives a key more than one row, so :meth:`filter_out`
        need not look for rows its evicted keys keep.
    snapshot_files
        A full snapshot is written as this many files, each a contiguous range of
        key groups (default: one file below
        :data:`~microstream.state.rotation.ONE_FILE_SNAPSHOT_ROWS` rows, four from there on).
    spread_snapshots_above
        From this many rows on, snapshots are spread over the versions.

    Notes
    -----
    Versions are batch ids. Call :meth:`load` with the last committed batch id
    on start (``None`` for a fresh query), then per batch :meth:`apply` /
    :meth:`filter_out` and :meth:`commit` with the batch id — every batch,
    even one that changed nothing (it writes only a small manifest), because
    :meth:`load` accepts only versions that were committed. Versions may skip
    numbers. After ``load(n)``, versions above ``n`` still on disk (written by
    a run that died before committing its batch) are discarded by the next
    commit; committing one of their numbers again (the re-run batch)
    overwrites its files. A store that was never loaded starts empty, and
    refuses to commit over a directory that already holds versions.

    A store is not thread-safe; the trigger loop owns it.

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.checkpoint.storage import Storage
    >>> storage = Storage("memory://doctest-state-store/counts")
    >>> store = StateStore(
    ...     storage,
    ...     operator="counts",
    ...     key_columns=["user"],
    ...     schema=pl.Schema({"user": pl.String, "n": pl.Int64}),
    ... )
    >>> store.load(None)
    >>> store.apply(upserts=pl.DataFrame({"user": ["a", "b"], "n": [1, 2]}))
    >>> store.commit(0)
    >>> store.apply(
    ...     upserts=pl.DataFrame({"user": ["b"], "n": [5]}),
    ...     deletes=pl.DataFrame({"user": ["a"]}),
    ... )
    >>> store.commit(1)
    >>> store.frame
    shape: (1, 2)
    ┌──────┬─────┐
    │ user ┆ n   │
    │ ---  ┆ --- │
    │ str  ┆ i64 │
    ╞══════╪═════╡
    │ b    ┆ 5   │
    └──────┴─────┘
    >>> store.load(0)
    >>> store.frame.sort("user")["n"].to_list()
    [1, 2]
    """

    def __init__(
        self,
        storage: Storage,
        *,
        operator: str,
        key_columns: Sequence[str],
        schema: pl.Schema | Mapping[str, pl.DataType],
        num_key_groups: int | None = None,
        snapshot_every: int = 10,
        min_versions_to_retain: int = 100,
        hash_columns: Sequence[str] | None = None,
        one_row_per_key: bool = False,
        snapshot_files: int | None = None,
        spread_snapshots_above: int = 100_000,
        prefix_lookups: bool = True,
    ):
        self.storage = storage
        self.operator = operator
        self.schema = pl.Schema(schema)
        self.key_columns = list(key_columns)
        self.hash_columns = list(hash_columns) if hash_columns is not None else self.key_columns
        self.one_row_per_key = one_row_per_key
        # the columns of the in-memory hash's low bits when not the hash columns (never
        # written: a checkpoint does not depend on it)
        self._whole_key = None if prefix_lookups else self.key_columns
        self._requested_key_groups = num_key_groups
        self.num_key_groups = DEFAULT_KEY_GROUPS if num_key_groups is None else num_key_groups
        self.snapshot_files = snapshot_files
        self.snapshot_every = snapshot_every
        self.min_versions_to_retain = min_versions_to_retain
        self.spread_snapshots_above = spread_snapshots_above
        self._validate_arguments()

        check_hashable(self.schema, self.hash_columns, f"operator {operator!r}")
        self._keys_hash = [*self.key_columns, _HASH, _KG]
        self._mem_schema = pl.Schema({**self.schema, _HASH: pl.UInt64(), _KG: pl.UInt16()})
        self._delta_schema = pl.Schema({**self.schema, _DELETED: pl.Boolean(), _KG: pl.UInt16()})
        self._snapshot_schema = pl.Schema({**self.schema, _KG: pl.UInt16()})
        self._schema_ipc = frame_to_text(pl.DataFrame(schema=self.schema))
        if frame_from_text(self._schema_ipc).schema != self.schema:
            msg = (
                f"the state schema of operator {operator!r} does not survive an Arrow IPC "
                f"round trip: {self.schema}; use plain Polars dtypes"
            )
            raise SchemaMismatchError(msg)
        self._pyarrow_io = pyarrow_round_trips(self.schema)

        self._data = self._keyed(pl.DataFrame(schema=self._mem_schema))
        # rows of the keys changed since the last commit (+ _HASH, _DELETED), all partitions
        self._pending: pl.DataFrame | None = None
        self._frame: pl.DataFrame | None = None
        self._version: int | None = None
        # (version, the oldest version its files need, None: unknown), from the oldest
        # base of the loaded version up to _version
        self._chain: list[tuple[int, int | None]] = []
        # per key group: the version of its newest snapshot (EMPTY_BASE: none, the empty
        # state the chain started from, version _origin)
        self._bases = np.full(self.num_key_groups, EMPTY_BASE, dtype=np.int64)
        self._since = np.zeros(self.num_key_groups, dtype=np.int64)  # delta rows since base
        self._origin: int | None = None
        self._key_range = (0, self.num_key_groups)
        self._opened = False
        self._metadata_current = False
        self._stale_versions: list[int] = []
        self._cleaned_below = -1

    def _validate_arguments(self) -> None:
        validate_store_arguments(
            operator=self.operator,
            schema=self.schema,
            key_columns=self.key_columns,
            hash_columns=self.hash_columns,
            counts={
                "num_key_groups": self.num_key_groups,
                "snapshot_every": self.snapshot_every,
                "spread_snapshots_above": self.spread_snapshots_above,
                "min_versions_to_retain": self.min_versions_to_retain,
                "snapshot_files": (
                    SNAPSHOT_FILES if self.snapshot_files is None else self.snapshot_files
                ),
            },
            reserved=(_DELETED, _HASH, _KG, _ORDER, _MASK, _POSITION),
            max_key_groups=_MAX_KEY_GROUPS,
        )

    # -- reading the state ---------------------------------------------------------

    @property
    def version(self) -> int | None:
        """The version loaded or last committed (``None``: the empty initial state)."""
        return self._version

    @property
    def frame(self) -> pl.DataFrame:
        """The whole state, all partitions, columns in schema order (row order unspecified)."""
        if self._frame is None:
            self._frame = _project(self._data.frame(), list(self.schema))
        return self._frame

    @property
    def rows(self) -> int:
        """Number of rows in the state."""
        return self._data.height

    @property
    def bytes(self) -> int:
        """Estimated in-memory size of the state (including an 8-byte key hash per row)."""
        return self._data.estimated_size()

    def rows_per_key_group(self) -> list[int]:
        """Number of rows in each key group, in key-group order."""
        return self._data.rows_per_partition()

    def use_key_groups(self, num_key_groups: int) -> None:
        """Split the state into ``num_key_groups`` key groups: the checkpoint's number,
        set before :meth:`load` (a store whose files record another is then refused)."""
        self._requested_key_groups = num_key_groups
        self._set_key_groups(num_key_groups)
        self._validate_arguments()

    @property
    def has_pending_changes(self) -> bool:
        """Whether :meth:`apply` or :meth:`filter_out` changed the state since the last commit."""
        return self._pending is not None

    def lookup(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The current rows of the given keys, reading only their partitions.

        Parameters
        ----------
        keys
            A frame with (at least) the key columns, or with the hash columns
            only when they are fewer (then every row whose hash columns match);
            duplicates are ignored.

        Returns
        -------
        DataFrame
            Every state row whose key is in ``keys``, columns in schema order.
        """
        by_hash = self.hash_columns != self.key_columns and not set(self.key_columns) <= set(
            keys.columns
        )
        on = self.hash_columns if by_hash else self.key_columns
        keys = conform(self.schema, self.operator, keys, "keys", on, exact=False)
        if keys.height == 0 or self._data.height == 0:  # (nothing to find: skip the hashing)
            return pl.DataFrame(schema=self.schema)
        if by_hash and self._whole_key is not None:  # (the hash is of whole keys: a scan)
            return self.frame.join(keys.unique(), on=on, how="semi", nulls_equal=True)
        found = self._data.rows_of(self._hashed(keys), on if by_hash else None)
        return _project(found, list(self.schema))

    def insert(self, rows: pl.DataFrame) -> None:
        """Add rows of keys that are not in the state: :meth:`apply` without looking
        for the keys' old rows (the caller guarantees there are none: e.g. a row id
        among the key columns).

        Parameters
        ----------
        rows
            Rows with exactly the state's columns and dtypes.
        """
        ups = conform(self.schema, self.operator, rows, "rows", list(self.schema), exact=True)
        if ups.height == 0:
            return
        ups = self._hashed(ups)
        self._data.append(ups)
        self._frame = None
        changes = upserted(ups)
        pending = self._pending
        self._pending = changes if pending is None else pl.concat([pending, changes])

    # -- changing the state --------------------------------------------------------

    def fold(
        self,
        rows: pl.DataFrame,
        merge: Callable[[pl.DataFrame, pl.DataFrame], pl.DataFrame],
        *,
        positions: bool = False,
    ) -> pl.DataFrame:
        """Replace the rows of the keys of ``rows`` by ``merge(their current rows, rows)``.

        :meth:`lookup` of the keys, then :meth:`apply` of the merged rows as upserts, with
        the keys hashed and found once. For one row per key: ``rows`` and the merged rows
        hold one row for each of the same keys. Returns the merged rows.

        With ``positions``, the current rows come with a ``__fold_position`` column
        (:data:`~microstream.state.store_rows.POSITION`): the row of ``rows`` with the
        same key, so ``merge`` can group by it instead of the key columns. Merged rows
        in the order of ``rows`` keep their keys' hashes (no second hash of the keys).

        Raises
        ------
        ValueError
            ``merge`` returned another number of rows than ``rows`` has (a key lost or gained).
        """
        rows = conform(self.schema, self.operator, rows, "rows", list(self.schema), exact=True)
        if rows.height == 0:
            return rows
        keys = self._hashed(rows)
        found = self._data.rows_of(keys)
        old = _project(found, list(self.schema))
        if positions:  # (none stored: no search)
            # (the probe the search built: the keys' hashes sorted once a fold)
            probe = self._data.probe(keys) if found.height else None
            at = _NO_ROWS if probe is None else key_positions(keys, found, self.key_columns, probe)
            old = old.hstack([pl.Series(_POSITION, at, dtype=pl.UInt32)])
        merged = merge(old, rows)
        if merged.height != rows.height:
            msg = f"fold of operator {self.operator!r}: {rows.height} key(s) merged into {merged.height} rows; expected one row per key"
            raise ValueError(msg)
        if merged is rows:  # (e.g. none of their keys was stored: hashed already)
            ups = keys
        else:
            merged = conform(
                self.schema, self.operator, merged, "merged", list(self.schema), exact=True
            )
            # (merged rows in the order of ``rows``: their hashes are the keys')
            same = same_keys(merged, rows, self.key_columns)
            ups = merged.hstack(_project(keys, [_HASH, _KG])) if same else self._hashed(merged)
        self._data.replace(keys, ups)  # (the same keys frame: found by rows_of above)
        self._record(_project(keys, self._keys_hash), upserted(ups))
        return merged

    def apply(
        self, *, upserts: pl.DataFrame | None = None, deletes: pl.DataFrame | None = None
    ) -> None:
        """Replace the rows of some keys and delete others.

        Parameters
        ----------
        upserts
            Rows with exactly the state's columns and dtypes. For every key in
            ``upserts``, all existing rows of that key are replaced by the
            upsert rows of that key (a key may have several rows).
        deletes
            A frame with (at least) the key columns: all rows of those keys are
            removed. A key both deleted and upserted in one call ends up with
            its upsert rows: the upsert wins.

        Raises
        ------
        SchemaMismatchError
            A column is missing, extra (upserts) or of another dtype.
        """
        ups = conform(self.schema, self.operator, upserts, "upserts", list(self.schema), exact=True)
        dels = conform(
            self.schema, self.operator, deletes, "deletes", self.key_columns, exact=False
        )
        if ups.height == 0 and dels.height == 0:
            return
        changes = []
        key_frames = []
        ups = self._hashed(ups) if ups.height else pl.DataFrame(schema=self._mem_schema)
        if ups.height:
            key_frames.append(_project(ups, self._keys_hash))
            changes.append(upserted(ups))
        if dels.height:
            dels = self._hashed(dels)
            key_frames.append(dels)
            gone = dels.unique()
            if ups.height:
                gone = gone.join(
                    _project(ups, self.key_columns),
                    on=self.key_columns,
                    how="anti",
                    nulls_equal=True,
                )
            changes.append(deletion_markers(gone, self.schema, self.key_columns))
        keys = key_frames[0] if len(key_frames) == 1 else pl.concat(key_frames, how="vertical")
        self._data.replace(keys, ups)
        self._frame = None
        self._record(keys, pl.concat(changes, how="vertical"))

    def filter_out(self, predicate: pl.Expr) -> pl.DataFrame:
        """Evict every row matching ``predicate`` and return the evicted rows.

        Rows where the predicate is null are kept. A key that keeps some rows
        is recorded in the next delta with its remaining rows; a key that
        loses all its rows is recorded as deleted.

        Parameters
        ----------
        predicate
            A boolean expression over the state's columns, e.g.
            ``pl.col("window_end") <= watermark``.

        Returns
        -------
        DataFrame
            The removed rows, columns in schema order (row order unspecified).
        """
        try:
            removed = self._data.remove_where(predicate)
        except TypeError as exc:
            msg = f"filter_out predicate of operator {self.operator!r}: {exc}"
            raise TypeError(msg) from None
        if removed.height == 0:
            return pl.DataFrame(schema=self.schema)
        self._frame = None
        # Keys that keep rows are recorded with their remaining rows, the others as deleted.
        evicted = _project(removed, self._keys_hash)
        read = set(predicate.meta.root_names())  # empty for selectors: unknown
        if self.one_row_per_key or (read and read <= set(self.key_columns)):
            # One row per key, or a predicate of key columns only: a key lost all or none.
            remaining = pl.DataFrame(schema=self._mem_schema)
        else:
            remaining = self._data.rows_of(evicted)
        gone = evicted if self.one_row_per_key else evicted.unique()
        if remaining.height:
            gone = gone.join(
                _project(remaining, self.key_columns),
                on=self.key_columns,
                how="anti",
                nulls_equal=True,
            )
        changes = pl.concat(
            [
                upserted(remaining),
                deletion_markers(gone, self.schema, self.key_columns),
            ],
            how="vertical",
        )
        self._record(evicted, changes)
        return _project(removed, list(self.schema))

    # -- persistence ---------------------------------------------------------------

    def load(self, version: int | None, *, key_groups: range | None = None) -> None:
        """Replace the in-memory state by the committed state as of ``version``.

        Parameters
        ----------
        version
            A committed version (batch id), or ``None`` for the empty state.
            Uncommitted changes are discarded.
        key_groups
            Load only the rows of these key groups (``range(lo, hi)``), what a worker
            owning them needs: other ranges' snapshot files are not read. Such a
            store holds part of the state and cannot commit. Default: every group.

        Raises
        ------
        CheckpointCorruptError
            A file needed to rebuild ``version`` is missing, unreadable, has
            the wrong columns or checksum, or the rebuilt row counts disagree with
            the version's manifest; ``version`` was never committed or is no longer
            retained. The message names the file.
        PlanChangedError
            The stored metadata has other key columns, schema or number of
            key groups than this store.
        """
        self._open()
        lo, hi = self._range(key_groups)
        data = self._keyed(pl.DataFrame(schema=self._mem_schema))
        chain: list[StateVersion] = []
        bases = np.full(self.num_key_groups, EMPTY_BASE, dtype=np.int64)
        since = np.zeros(self.num_key_groups, dtype=np.int64)
        if version is not None:
            n = self.num_key_groups
            chain = read_chain(self.storage, self.operator, n, version, (lo, hi))
            # each group's base: the newest snapshot of it (a full one, or a spread slice)
            bases, snapshot_files = resolve_bases(chain, lo, hi, n)
            parts = [
                rows_based_at(self._read_file(f, self._snapshot_schema, lo, hi), bases, v)
                for f, v in snapshot_files
            ]
            if parts:
                base = pl.concat(parts, how="vertical") if len(parts) > 1 else parts[0]
                data = self._keyed(self._hashed(base).select(list(self._mem_schema)))
            deltas = [(f, m.version) for m in reversed(chain) for f in m.files if f.kind == "delta"]
            since = self._replay(deltas, bases, data, lo, hi)
            data.compact()
            counts = data.rows_per_partition()
            target = chain[0].rows_per_key_group
            for group in range(lo, hi):
                if counts[group] != target[group]:
                    msg = (
                        f"state of operator {self.operator!r}: key group {group} has "
                        f"{counts[group]} rows after rebuilding version {version}, but "
                        f"{self.storage.display(version_file(version))} records "
                        f"{target[group]}; the files it lists are inconsistent"
                    )
                    raise CheckpointCorruptError(msg)
        self._data = data
        self._pending = None
        self._frame = None
        self._version = version
        self._key_range = (lo, hi)
        self._bases, self._since = bases, since
        origin = chain[-1].version if chain and chain[-1].parent is None else None
        self._origin = origin
        self._chain = [
            (m.version, m.version if m.snapshot or m.parent is None else None)
            for m in reversed(chain)
        ]
        if chain and (lo, hi) == (0, self.num_key_groups):
            self._chain[-1] = (chain[0].version, self._needs_from())
        self._stale_versions = [
            v for v in self.storage.list_numbered(VERSIONS_DIR) if version is None or v > version
        ]

    def commit(self, version: int, *, snapshot: bool = False) -> None:
        """Persist the changes since the last commit as ``version``.

        Writes one delta file of the changes since the last commit (none if
        nothing changed) or, every ``snapshot_every`` versions (or when
        ``snapshot`` is true), a snapshot in ``snapshot_files`` key-group ranges;
        above ``spread_snapshots_above`` rows, the delta and a snapshot of the
        key-group slices under pressure instead (of every slice: a full snapshot in
        those slices, no delta); then the version's manifest; then removes files
        that no retained version needs.

        Parameters
        ----------
        version
            The batch id. It must be greater than the current version;
            committing the current version again with no changes in between
            does nothing (a re-run batch). After a restart, committing a
            version that an earlier run already wrote overwrites it.
        snapshot
            Write a full snapshot now.

        Raises
        ------
        CheckpointError
            ``version`` is below the current version, or equal to it with
            uncommitted changes.
        """
        current = self._version
        if not check_forward(self.operator, version, self._version, self._pending is not None):
            return
        first = not self._opened
        self._open()
        check_whole_commit(
            self.storage, self.operator, self._key_range, self.num_key_groups, first=first
        )
        if not self._metadata_current:
            self.storage.write_model(METADATA_FILE, self._metadata())
            self._metadata_current = True
        for stale in self._stale_versions:
            if stale != version:
                self.storage.delete(version_file(stale))
        self._stale_versions = []

        # (a delta over twice the state's rows, e.g. evicting it all, outweighs a snapshot)
        grown = self._pending is not None and self._pending.height > 2 * self.rows
        spread = self.rows >= self.spread_snapshots_above
        n = self.num_key_groups
        full = snapshot or grown or (version % self.snapshot_every == 0 and not spread)
        if self._pending is not None:
            self._since += np.bincount(self._pending.get_column(_KG).to_numpy(), minlength=n)
        slices = [] if full else self._slices_due(version, 0, n, spread=spread)
        files: list[StateFile] = []
        if full or slices == [(0, n)]:  # (one key group, or snapshot_every=1)
            full, slices = True, full_snapshot_ranges(n, self.rows, self.snapshot_files)
        elif covers_key_groups(slices, n):
            # Every slice under pressure (the first version of a large batch): the slices
            # are the whole state, a full snapshot; a delta too would write every row twice.
            full = True
        elif self._pending is not None:
            pending = by_key_group(self._pending)
            groups = pending.get_column(_KG)
            span = (int(groups[0]), int(groups[-1]) + 1)
            files.append(self._write_file(delta_file(version), pending, self._delta_schema, span))
        files.extend(self._write_snapshot(version, slices))
        entry = StateVersion(
            version=version,
            parent=current,
            snapshot=full,
            files=files,
            rows_per_key_group=self.rows_per_key_group(),
        )
        self.storage.write_model(version_file(version), entry)

        self._version = version
        self._advance(version, current, slices)
        self._pending = None
        self._remove_unneeded_files()

    def write_part(self, version: int, *, leader: bool, fence: str = "") -> StatePart:
        """Write this store's key-group range of ``version``; the caller commits it.

        A store loaded for key groups ``[lo, hi)`` (:meth:`load` with ``key_groups=``)
        is one *owner* of a range-owned state: every owner writes, for each version,
        the delta of its range (``deltas/<version>/<lo>-<hi>.<fence>.arrow``, none if nothing
        changed) or its pieces of the snapshot, and returns what it wrote; once every
        owner returned, the driver writes the version's one manifest listing all their
        files (:func:`microstream.state.parts.commit_parts`): the commit point, as for a
        store that owns every group. The ``leader`` (one owner per store) also keeps
        the store's shared files: the metadata, removing versions a dead run left above
        the loaded one, and removing files no retained version needs (for the versions
        committed before this one, whose manifests exist).

        Raises
        ------
        CheckpointError
            ``version`` is not past the current version, or the store holds rows outside
            its range (an exchange routed rows by other columns than the state's hash).
        """
        lo, hi = self._key_range
        current = self._version
        if not check_forward(self.operator, version, self._version, self._pending is not None):
            msg = f"state version {version} of operator {self.operator!r} was already written"
            raise CheckpointError(msg)
        outside = [g for g, n in enumerate(self.rows_per_key_group()) if n and not lo <= g < hi]
        if outside:
            msg = (
                f"state of operator {self.operator!r} owns key groups {lo}-{hi - 1} but holds "
                f"rows of key group {outside[0]}: its input was not routed by its key "
                f"columns {self.hash_columns}"
            )
            raise CheckpointError(msg)
        if leader:
            if not self._metadata_current:
                self.storage.write_model(METADATA_FILE, self._metadata())
                self._metadata_current = True
            for stale in self._stale_versions:
                if stale != version:
                    self.storage.delete(version_file(stale))
            self._stale_versions = []
            if current is not None:
                self._remove_unneeded_files()
        # Every owner decides the kind alike (from the version); groups whose base is
        # ``snapshot_every - 1`` versions old get a snapshot of their slice in a delta version.
        full = version % self.snapshot_every == 0
        slices = (
            [
                (max(a, lo), min(b, hi))
                for a, b in key_group_ranges(
                    self.num_key_groups, self.snapshot_files or SNAPSHOT_FILES
                )
                if a < hi and lo < b
            ]
            if full
            else self._slices_due(version, lo, hi, spread=False)
        )
        files: list[StateFile] = []
        if not full and self._pending is not None:
            name = ranged_delta_file(version, lo, hi, fence)
            pending = by_key_group(self._pending)
            files.append(self._write_file(name, pending, self._delta_schema, (lo, hi)))
        files.extend(self._write_snapshot(version, slices, fence))
        self._version = version
        self._advance(version, current, slices, owner=True)
        self._pending = None
        return StatePart(
            version=version,
            parent=current,
            snapshot=full,
            key_groups=(lo, hi),
            files=files,
            rows_per_key_group=self.rows_per_key_group()[lo:hi],
        )

    # -- internals -----------------------------------------------------------------

    def _slices_due(self, version: int, lo: int, hi: int, *, spread: bool) -> list[tuple[int, int]]:
        """The key-group slices of ``[lo, hi)`` that ``version`` snapshots: those holding a
        group whose base is ``snapshot_every - 1`` versions old, or, in a large state,
        those under pressure (:func:`~microstream.state.rotation.slices_by_pressure`)."""
        versions = [v for v, _ in self._chain]
        if spread:
            rows = np.asarray(self.rows_per_key_group(), dtype=np.int64)
            args = (self._since, rows, self._bases, versions, self.snapshot_every, lo, hi)
            return slices_by_pressure(*args)
        due = due_groups(self._bases, versions, self.snapshot_every, lo, hi)
        return slices_to_write(due, self.snapshot_every, lo, hi)

    def _write_snapshot(
        self, version: int, slices: list[tuple[int, int]], fence: str = ""
    ) -> list[StateFile]:
        """Write the rows of each key-group range of ``slices`` as of ``version``, one range
        at a time (each a contiguous slice of the state: no copy of the whole state)."""
        return [
            self._write_file(
                snapshot_file(version, a, b, fence),
                # (every group: no per-group filter of the rows)
                self._data.frame()
                if (a, b) == (0, self.num_key_groups)
                else self._data.rows_in_partitions(a, b),
                self._snapshot_schema,
                (a, b),
            )
            for a, b in slices
        ]

    def _advance(
        self, version: int, parent: int | None, slices: list[tuple[int, int]], owner: bool = False
    ) -> None:
        """Record committed ``version`` (snapshotting ``slices``) in the chain and bases."""
        for a, b in slices:
            self._bases[a:b] = version
            self._since[a:b] = 0
        if parent is None:
            self._origin = version
        # An owner knows only its groups' bases (the leader's retention covers every
        # group): for it, only a full snapshot or the empty state is a known base.
        if owner:
            whole = version % self.snapshot_every == 0 or parent is None
            self._chain.append((version, version if whole else None))
        else:
            self._chain.append((version, self._needs_from()))

    def _needs_from(self) -> int | None:
        """The oldest version whose files rebuilding the current one reads (None: unknown)."""
        oldest = int(self._bases.min())
        return self._origin if oldest == EMPTY_BASE else oldest

    def _open(self) -> None:
        """Check the stored metadata against this store (once)."""
        if self._opened:
            return
        meta = read_metadata(self.storage, self.operator)
        if meta is not None:
            if self._requested_key_groups is None:
                self._set_key_groups(meta.num_key_groups)
            check_metadata(
                self.storage,
                meta,
                operator=self.operator,
                key_columns=self.key_columns,
                hash_columns=self.hash_columns,
                schema=self.schema,
                num_key_groups=self.num_key_groups,
            )
        self._metadata_current = meta is not None and meta == self._metadata()
        self._opened = True

    def _metadata(self) -> StateMetadata:
        return state_metadata(
            operator=self.operator,
            key_columns=self.key_columns,
            hash_columns=self.hash_columns,
            schema=self.schema,
            schema_ipc=self._schema_ipc,
            num_key_groups=self.num_key_groups,
            snapshot_every=self.snapshot_every,
        )

    def _set_key_groups(self, num_key_groups: int) -> None:
        if num_key_groups == self.num_key_groups:
            return
        self.num_key_groups = num_key_groups
        self._key_range = (0, num_key_groups)
        self._bases = np.full(num_key_groups, EMPTY_BASE, dtype=np.int64)
        self._since = np.zeros(num_key_groups, dtype=np.int64)
        rows = self._data.frame()
        if rows.height:
            rows = self._hashed(rows)
        self._data = self._keyed(rows)
        if self._pending is not None:
            self._pending = self._hashed(self._pending)

    def _range(self, groups: range | None) -> tuple[int, int]:
        return key_group_range(groups, self.num_key_groups, self.operator)

    def _hashed(self, frame: pl.DataFrame) -> pl.DataFrame:
        """``frame`` with the in-memory hash and the (stable) key group of every row."""
        return hashed(
            frame, self.hash_columns, self.num_key_groups, _HASH_SEED, key_columns=self._whole_key
        )

    def _write_file(
        self, name: str, frame: pl.DataFrame, schema: pl.Schema, span: tuple[int, int]
    ) -> StateFile:
        data = encode_frame(
            _project(frame, list(schema)), _COMPRESSION, pyarrow_io=self._pyarrow_io
        )
        self.storage.write_bytes(name, data)
        kind: Literal["delta", "snapshot"] = "delta" if _DELETED in schema else "snapshot"
        return StateFile(
            name=name, kind=kind, key_groups=span, rows=frame.height, crc32=checksum(data)
        )

    def _read_file(self, entry: StateFile, schema: pl.Schema, lo: int, hi: int) -> pl.DataFrame:
        return read_state_file(
            self.storage, entry, schema, (lo, hi), self.operator, pyarrow_io=self._pyarrow_io
        )

    def _replay(
        self,
        deltas: list[tuple[StateFile, int]],
        bases: np.ndarray,
        data: SlicedRows,
        lo: int,
        hi: int,
    ) -> np.ndarray:
        """Apply the delta files (with their versions), oldest first, to ``data`` (key
        groups ``[lo, hi)``), each to the groups whose base is older than it; the delta
        rows each group replayed.

        All deltas are read into one frame; for each key the rows of its newest
        delta decide (upsert rows, or the deletion marker).
        """
        frames = [
            rows_after_base(
                self._read_file(entry, self._delta_schema, lo, hi), bases, v
            ).with_columns(pl.lit(order, pl.UInt32).alias(_ORDER))
            for order, (entry, v) in enumerate(deltas)
            if entry.key_groups[0] < hi and lo < entry.key_groups[1]
        ]
        if not frames:
            return np.zeros(self.num_key_groups, dtype=np.int64)
        every = self._hashed(pl.concat(frames, how="vertical"))
        newest = every.filter(pl.col(_ORDER) == pl.col(_ORDER).max().over(self.key_columns))
        live = newest.filter(~pl.col(_DELETED))
        data.replace(_project(newest, self._keys_hash), _project(live, list(self._mem_schema)))
        return np.bincount(every.get_column(_KG).to_numpy(), minlength=self.num_key_groups)

    def _remove_unneeded_files(self) -> None:
        """Delete files older than the base needed by the oldest retained version."""
        assert self._version is not None
        oldest_retained = self._version - self.min_versions_to_retain + 1
        # (what a version needs is monotonic in the version: the newest known one decides)
        needs = [n for v, n in self._chain if n is not None and v <= oldest_retained]
        if not needs or needs[-1] <= self._cleaned_below:
            return
        keep_from = needs[-1]
        self._chain = [entry for entry in self._chain if entry[0] >= keep_from]
        delete_below(self.storage, keep_from)
        self._cleaned_below = keep_from

    def _keyed(self, frame: pl.DataFrame, *, is_sorted: bool = False) -> SlicedRows:
        """``frame`` (memory schema) as the store's in-memory rows."""
        return SlicedRows(
            frame,
            key_columns=self.key_columns,
            hash_column=_HASH,
            group_column=_KG,
            num_groups=self.num_key_groups,
            is_sorted=is_sorted,
            group_shift=48,  # (hashed(): the key group is the top 16 bits, not held in memory)
        )

    def _record(self, keys: pl.DataFrame, changes: pl.DataFrame) -> None:
        """Make ``changes`` the pending delta of ``keys`` (replacing earlier changes)."""
        self._pending = record(self._pending, keys, changes, self.key_columns)
        self._frame = None
