"""The keyed state of one stateful operator, persisted as Arrow IPC files.

A :class:`StateStore` holds the rows of an operator's state (partial
aggregates, buffered window rows, deduplication keys, ...) in memory as one
:class:`~microstream.keyed_rows.KeyedRows` (sorted by key hash, so a batch
finds its keys without scanning the state), and on disk split into a fixed
number of key-hash partitions. After every batch
the engine calls :meth:`StateStore.commit` with the batch id: each partition
touched since the last commit writes what changed as ``<version>.delta.arrow``
and every ``snapshot_every`` versions every partition writes a full
``<version>.snapshot.arrow``, so recovery replays at most ``snapshot_every - 1``
deltas. A checkpoint is data, never code: no pickle anywhere.

Layout of the operator's directory ``state/<operator>/``::

    _metadata.json                  key columns, exact schema, partitions, hash probe
    versions/<version>.json         one per committed version, written last: the commit point
    <partition>/<version>.delta.arrow     rows of the keys changed in that version (+ ``__deleted``)
    <partition>/<version>.snapshot.arrow  the whole partition as of that version

A version exists when, and only when, ``versions/<version>.json`` exists; it
names its parent version, whether it is a full snapshot, which partitions wrote
a delta (an untouched partition writes nothing) and how many rows each
partition holds, so a load checks what it rebuilt.

Key semantics: a key (the values of ``key_columns``, nulls included) may hold
several rows. An upsert replaces *all* rows of each key it contains; a delete
removes all rows of a key. Row order in :attr:`StateStore.frame` is
unspecified.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np
import polars as pl

from microstream.checkpoint.storage import Storage
from microstream.exceptions import (
    CheckpointCorruptError,
    CheckpointError,
    PlanChangedError,
    SchemaMismatchError,
)
from microstream.state.format import (
    DELTA_SUFFIX,
    METADATA_FILE,
    SNAPSHOT_SUFFIX,
    STATE_FORMAT_VERSION,
    VERSIONS_DIR,
    Compression,
    StateMetadata,
    StateVersion,
    checksum,
    decode_frame,
    describe_schema_change,
    encode_frame,
    frame_from_text,
    frame_to_text,
    pyarrow_round_trips,
    version_file,
)
from microstream.state.keyed_rows import KeyedRows

__all__ = ["StateStore"]

logger = logging.getLogger("microstream")

_DELETED = "__deleted"  # on disk: the deletion marker column of delta files
_HASH = "__key_hash"  # in memory only: the u64 hash of the key columns
_PART = "__partition"  # reserved (older in-memory column)
_ORDER = "__order"  # in memory only: position of a delta file in a replay
_MASK = "__mask"
_HASH_SEED = 0x6D73  # "ms"; recorded in the metadata
_PROBE_ROWS = 32
# Uncompressed: cheapest to write every batch and read back zero-copy on recovery
# (lz4 makes files ~3x smaller but a snapshot of 1M rows ~4x slower to encode).
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
    num_partitions
        Fixed when the state is first committed; a later mismatch is refused.
    snapshot_every
        A full snapshot is written at every version divisible by this, and at
        the latest after this many versions, which bounds recovery to that
        many files per partition.
    min_versions_to_retain
        Files needed to rebuild any of the last this-many versions (by
        version number) are kept; older ones are removed after a snapshot.
    hash_columns
        The key columns the hash, and so the partition, is computed over
        (default: all). Fewer lets :meth:`lookup` find every row of a key
        prefix: a join keeps one key per row (join keys and a row id), hashed
        on the join keys, so new rows are inserted without rewriting old ones.
    one_row_per_key
        The caller never gives a key more than one row, so :meth:`filter_out`
        need not look for rows its evicted keys keep.

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
        num_partitions: int = 8,
        snapshot_every: int = 10,
        min_versions_to_retain: int = 100,
        hash_columns: Sequence[str] | None = None,
        one_row_per_key: bool = False,
    ):
        self.storage = storage
        self.operator = operator
        self.schema = pl.Schema(schema)
        self.key_columns = list(key_columns)
        self.hash_columns = list(hash_columns) if hash_columns is not None else self.key_columns
        self.one_row_per_key = one_row_per_key
        self.num_partitions = num_partitions
        self.snapshot_every = snapshot_every
        self.min_versions_to_retain = min_versions_to_retain
        self._validate_arguments()

        self._keys_hash = [*self.key_columns, _HASH]
        self._mem_schema = pl.Schema({**self.schema, _HASH: pl.UInt64()})
        self._delta_schema = pl.Schema({**self.schema, _DELETED: pl.Boolean()})
        self._hash_expr = _hash_expr(self.schema, self.hash_columns)
        self._schema_ipc = frame_to_text(pl.DataFrame(schema=self.schema))
        if frame_from_text(self._schema_ipc).schema != self.schema:
            msg = (
                f"the state schema of operator {operator!r} does not survive an Arrow IPC "
                f"round trip: {self.schema}; use plain Polars dtypes"
            )
            raise SchemaMismatchError(msg)
        self._pyarrow_io = pyarrow_round_trips(self.schema)
        self._probe_frame = _make_probe_frame(self.schema, self.hash_columns)
        self._probe = self._partitions_of(self._probe_frame)

        self._data = self._keyed(pl.DataFrame(schema=self._mem_schema))
        # rows of the keys changed since the last commit (+ _HASH, _DELETED), all partitions
        self._pending: pl.DataFrame | None = None
        self._frame: pl.DataFrame | None = None
        self._version: int | None = None
        # (version, is a snapshot, is a base: nothing older is needed to rebuild it), from
        # the base of the loaded version up to _version
        self._chain: list[tuple[int, bool, bool]] = []
        self._force_snapshot = False
        self._opened = False
        self._metadata_current = False
        self._stale_versions: list[int] = []
        self._cleaned_below = -1

    def _validate_arguments(self) -> None:
        if not self.key_columns:
            msg = f"key_columns of operator {self.operator!r} must not be empty; got []"
            raise ValueError(msg)
        missing = [c for c in self.key_columns if c not in self.schema]
        if missing:
            msg = (
                f"key_columns {missing} of operator {self.operator!r} are not in the state "
                f"schema {list(self.schema)}"
            )
            raise ValueError(msg)
        if len(set(self.key_columns)) != len(self.key_columns):
            msg = f"key_columns of operator {self.operator!r} repeat a column: {self.key_columns}"
            raise ValueError(msg)
        if not self.hash_columns or not set(self.hash_columns) <= set(self.key_columns):
            msg = (
                f"hash_columns of operator {self.operator!r} must be some of its key_columns "
                f"{self.key_columns}; got {self.hash_columns}"
            )
            raise ValueError(msg)
        reserved = [c for c in (_DELETED, _HASH, _PART, _ORDER, _MASK) if c in self.schema]
        if reserved:
            msg = f"the state schema of operator {self.operator!r} uses reserved column names {reserved}"
            raise ValueError(msg)
        for name in ("num_partitions", "snapshot_every", "min_versions_to_retain"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                msg = f"{name} must be a positive integer; got {value!r} instead"
                raise ValueError(msg)

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

    def rows_per_partition(self) -> list[int]:
        """Number of rows in each partition, in partition order."""
        return self._data.rows_per_partition()

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
        keys = self._conform(keys, "keys", on, exact=False)
        if keys.height == 0:
            return pl.DataFrame(schema=self.schema)
        found = self._data.rows_of(keys.with_columns(self._hash_expr), on if by_hash else None)
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
        ups = self._conform(rows, "rows", list(self.schema), exact=True)
        if ups.height == 0:
            return
        ups = ups.with_columns(self._hash_expr)
        self._data.append(ups)
        self._frame = None
        changes = ups.with_columns(pl.lit(False).alias(_DELETED))
        pending = self._pending
        self._pending = changes if pending is None else pl.concat([pending, changes])

    # -- changing the state --------------------------------------------------------

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
        ups = self._conform(upserts, "upserts", list(self.schema), exact=True)
        dels = self._conform(deletes, "deletes", self.key_columns, exact=False)
        if ups.height == 0 and dels.height == 0:
            return
        changes = []
        key_frames = []
        ups = (
            ups.with_columns(self._hash_expr)
            if ups.height
            else pl.DataFrame(schema=self._mem_schema)
        )
        if ups.height:
            key_frames.append(_project(ups, self._keys_hash))
            changes.append(ups.with_columns(pl.lit(False).alias(_DELETED)))
        if dels.height:
            dels = dels.with_columns(self._hash_expr)
            key_frames.append(dels)
            gone = dels.unique()
            if ups.height:
                gone = gone.join(
                    _project(ups, self.key_columns),
                    on=self.key_columns,
                    how="anti",
                    nulls_equal=True,
                )
            changes.append(self._deletion_markers(gone))
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
            remaining = self._rows_of(evicted)
        gone = evicted.unique()
        if remaining.height:
            gone = gone.join(
                _project(remaining, self.key_columns),
                on=self.key_columns,
                how="anti",
                nulls_equal=True,
            )
        changes = pl.concat(
            [remaining.with_columns(pl.lit(False).alias(_DELETED)), self._deletion_markers(gone)],
            how="vertical",
        )
        self._record(evicted, changes)
        return _project(removed, list(self.schema))

    # -- persistence ---------------------------------------------------------------

    def load(self, version: int | None) -> None:
        """Replace the in-memory state by the committed state as of ``version``.

        Parameters
        ----------
        version
            A committed version (batch id), or ``None`` for the empty state.
            Uncommitted changes are discarded.

        Raises
        ------
        CheckpointCorruptError
            A file needed to rebuild ``version`` is missing, unreadable, has
            the wrong columns, or the rebuilt row counts disagree with the
            version's manifest; ``version`` was never committed or is no longer
            retained. The message names the file.
        PlanChangedError
            The stored metadata has other key columns, schema or number of
            partitions than this store.
        """
        self._open()
        data = self._keyed(pl.DataFrame(schema=self._mem_schema))
        chain: list[StateVersion] = []
        if version is not None:
            chain = self._read_chain(version)
            checksums = {name: crc for entry in chain for name, crc in entry.checksums.items()}
            oldest = chain[-1]
            if oldest.snapshot:
                parts = [
                    self._read_arrow(
                        f"{p}/{oldest.version}{SNAPSHOT_SUFFIX}", self.schema, checksums
                    )
                    for p in range(self.num_partitions)
                ]
                data = self._keyed(
                    pl.concat(parts, how="vertical").with_columns(
                        self._hash_expr, _file_partitions(parts)
                    )
                )
            else:
                data = self._keyed(pl.DataFrame(schema={**self._mem_schema, _PART: pl.UInt32()}))
            replay = reversed(chain[:-1] if oldest.snapshot else chain)
            self._replay(
                [(entry.version, p) for entry in replay for p in entry.partitions],
                data,
                checksums,
            )
            # Count by the file each row came from: after a change of hash function the
            # rows' current partitions differ from the files' (re-partitioned below).
            data.compact()
            loaded = data.frame()
            counts = np.bincount(
                loaded.get_column(_PART).to_numpy(), minlength=self.num_partitions
            ).tolist()
            data = self._keyed(loaded.drop(_PART), is_sorted=True)
            target = chain[0]
            for p, rows in enumerate(counts):
                if rows != target.rows_per_partition[p]:
                    msg = (
                        f"state of operator {self.operator!r}: partition {p} has {rows} rows "
                        f"after rebuilding version {version}, but "
                        f"{self.storage.display(version_file(version))} records "
                        f"{target.rows_per_partition[p]}; files under "
                        f"{self.storage.display(str(p))} are inconsistent"
                    )
                    raise CheckpointCorruptError(msg)
        self._data = data
        self._pending = None
        self._frame = None
        self._version = version
        self._chain = [
            (m.version, m.snapshot, m.snapshot or m.parent is None) for m in reversed(chain)
        ]
        self._force_snapshot = False
        self._stale_versions = [
            v for v in self.storage.list_numbered(VERSIONS_DIR) if version is None or v > version
        ]
        if chain and chain[0].hash_probe != self._probe:
            logger.warning(
                "state of operator %r was partitioned by another hash function (Polars %s?); "
                "re-partitioning %d rows, a full snapshot follows at the next commit",
                self.operator,
                pl.__version__,
                self.rows,
            )
            self._repartition()

    def commit(self, version: int, *, snapshot: bool = False) -> None:
        """Persist the changes since the last commit as ``version``.

        Writes a delta file for every partition touched since the last commit
        or, every ``snapshot_every`` versions (or when ``snapshot`` is true or
        the state was re-partitioned), a snapshot of every partition; then the
        version's manifest; then removes files that no retained version needs.

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
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            msg = f"state version must be a non-negative integer; got {version!r} instead"
            raise ValueError(msg)
        current = self._version
        if current is not None and version <= current:
            if version == current and self._pending is None:
                return
            msg = (
                f"cannot commit state version {version} of operator {self.operator!r}: the "
                f"store is at version {current}"
                + (" with uncommitted changes" if version == current else "")
                + "; versions only go forward (load an earlier version to re-run a batch)"
            )
            raise CheckpointError(msg)
        if not self._opened:
            self._open()
            if self.storage.list_numbered(VERSIONS_DIR):
                msg = (
                    f"state of operator {self.operator!r} in {self.storage.display('')} has "
                    "committed versions: call load() with the last committed batch id (or None "
                    "to start over) before committing"
                )
                raise CheckpointError(msg)
        if not self._metadata_current:
            self.storage.write_model(METADATA_FILE, self._metadata())
            self._metadata_current = True
        for stale in self._stale_versions:
            if stale != version:
                self.storage.delete(version_file(stale))
        self._stale_versions = []

        deltas_to_replay = 0  # after the newest snapshot (or the empty state)
        for _, was_snapshot, _ in reversed(self._chain):
            if was_snapshot:
                break
            deltas_to_replay += 1
        full = (
            snapshot
            or self._force_snapshot
            or version % self.snapshot_every == 0
            or deltas_to_replay + 1 >= self.snapshot_every
        )
        written: list[int] = []
        checksums: dict[str, int] = {}
        if full:
            for p, part in enumerate(self._data.partitions()):
                data = encode_frame(
                    _project(part, list(self.schema)),
                    _COMPRESSION,
                    pyarrow_io=self._pyarrow_io,
                )
                name = f"{p}/{version}{SNAPSHOT_SUFFIX}"
                self.storage.write_bytes(name, data)
                checksums[name] = checksum(data)
        elif self._pending is not None:
            pending = self._pending
            for p, changes in _split(pending, self._pids(pending.get_column(_HASH))).items():
                data = encode_frame(
                    _project(changes, list(self._delta_schema)),
                    _COMPRESSION,
                    pyarrow_io=self._pyarrow_io,
                )
                name = f"{p}/{version}{DELTA_SUFFIX}"
                self.storage.write_bytes(name, data)
                checksums[name] = checksum(data)
                written.append(p)
            written.sort()
        entry = StateVersion(
            version=version,
            parent=current,
            snapshot=full,
            partitions=written,
            rows_per_partition=self.rows_per_partition(),
            hash_probe=self._probe,
            checksums=checksums,
        )
        self.storage.write_model(version_file(version), entry)

        self._version = version
        self._chain.append((version, full, full or current is None))
        self._pending = None
        self._force_snapshot = False
        self._remove_unneeded_files()

    # -- internals -----------------------------------------------------------------

    def _open(self) -> None:
        """Check the stored metadata against this store (once)."""
        if self._opened:
            return
        try:
            meta = self.storage.read_model(METADATA_FILE, StateMetadata)
        except FileNotFoundError:
            meta = None
        if meta is None:
            if self.storage.list_numbered(VERSIONS_DIR):
                msg = (
                    f"state of operator {self.operator!r} has committed versions but no "
                    f"{self.storage.display(METADATA_FILE)}; restore it from a backup or delete "
                    "the checkpoint to start over"
                )
                raise CheckpointCorruptError(msg)
        else:
            self._check_metadata(meta)
            self._probe_frame = self._decode_metadata_frame(meta.probe_ipc, "probe_ipc")
            self._probe = self._partitions_of(self._probe_frame)
        self._metadata_current = meta is not None and meta == self._metadata()
        self._opened = True

    def _check_metadata(self, meta: StateMetadata) -> None:
        where = self.storage.display(METADATA_FILE)
        if meta.format_version > STATE_FORMAT_VERSION:
            msg = (
                f"{where} has state format version {meta.format_version}; this microstream "
                f"reads version {STATE_FORMAT_VERSION} at most: upgrade microstream"
            )
            raise CheckpointError(msg)
        stored_schema = self._decode_metadata_frame(meta.schema_ipc, "schema_ipc").schema
        problems = []
        if meta.operator != self.operator:
            problems.append(f"operator {meta.operator!r} -> {self.operator!r}")
        if meta.key_columns != self.key_columns:
            problems.append(f"key_columns {meta.key_columns} -> {self.key_columns}")
        if (meta.hash_columns or meta.key_columns) != self.hash_columns:
            problems.append(f"hash_columns {meta.hash_columns} -> {self.hash_columns}")
        if stored_schema != self.schema:
            problems.append(f"schema {describe_schema_change(stored_schema, self.schema)}")
        if meta.num_partitions != self.num_partitions:
            problems.append(f"num_partitions {meta.num_partitions} -> {self.num_partitions}")
        if problems:
            msg = (
                f"the state in {where} was written with other settings than this query uses: "
                + "; ".join(problems)
                + ". Use a new checkpoint for the changed query (the number of partitions is "
                "fixed when the state is created)"
            )
            raise PlanChangedError(msg)

    def _decode_metadata_frame(self, data: str, field: str) -> pl.DataFrame:
        try:
            return frame_from_text(data)
        except (binascii.Error, ValueError, pl.exceptions.PolarsError) as exc:
            msg = (
                f"checkpoint file {self.storage.display(METADATA_FILE)} is corrupt: field {field} "
                f"is not a base64 Arrow IPC file ({exc})"
            )
            raise CheckpointCorruptError(msg) from None

    def _metadata(self) -> StateMetadata:
        return StateMetadata(
            operator=self.operator,
            key_columns=self.key_columns,
            hash_columns=None if self.hash_columns == self.key_columns else self.hash_columns,
            schema={name: str(dtype) for name, dtype in self.schema.items()},
            schema_ipc=self._schema_ipc,
            num_partitions=self.num_partitions,
            snapshot_every=self.snapshot_every,
            hash_seed=_HASH_SEED,
            hash_probe=self._probe,
            probe_ipc=frame_to_text(self._probe_frame),
            polars_version=pl.__version__,
        )

    def _read_chain(self, version: int) -> list[StateVersion]:
        """Manifests from ``version`` back to its base (a snapshot or the empty state)."""
        chain = [self._read_version(version, wanted=version)]
        while not chain[-1].snapshot and chain[-1].parent is not None:
            chain.append(self._read_version(chain[-1].parent, wanted=version))
        return chain

    def _read_version(self, version: int, *, wanted: int) -> StateVersion:
        name = version_file(version)
        try:
            entry = self.storage.read_model(name, StateVersion)
        except FileNotFoundError:
            committed = self.storage.list_numbered(VERSIONS_DIR)
            if version != wanted:
                why = f"it is needed to rebuild version {wanted} but is missing"
            elif not committed:
                why = "no state version was ever committed"
            elif version < committed[0]:
                why = f"version {version} is no longer retained (oldest on disk: {committed[0]})"
            elif version > committed[-1]:
                why = f"version {version} was never committed (newest on disk: {committed[-1]})"
            else:
                why = f"version {version} is missing (versions on disk: {_ranges(committed)})"
            msg = f"state of operator {self.operator!r}: {self.storage.display(name)}: {why}"
            raise CheckpointCorruptError(msg) from None
        if (
            entry.version != version
            or len(entry.rows_per_partition) != self.num_partitions
            or any(not 0 <= p < self.num_partitions for p in entry.partitions)
            or (entry.parent is not None and entry.parent >= version)
        ):
            msg = (
                f"checkpoint file {self.storage.display(name)} is corrupt: it describes version "
                f"{entry.version} (parent {entry.parent}) with {len(entry.rows_per_partition)} "
                f"partitions; expected version {version} with {self.num_partitions}"
            )
            raise CheckpointCorruptError(msg)
        return entry

    def _read_arrow(
        self, name: str, schema: pl.Schema, checksums: Mapping[str, int]
    ) -> pl.DataFrame:
        """Read a state file, checking its checksum (when its version recorded one) and
        that it holds ``schema``."""
        where = self.storage.display(name)
        try:
            data = self.storage.read_bytes(name)
        except FileNotFoundError:
            msg = (
                f"state file {where} of operator {self.operator!r} is missing; the version "
                "manifests list it. Restore it from a backup, or start over with `microstream reset "
                "CHECKPOINT`"
            )
            raise CheckpointCorruptError(msg) from None
        expected = checksums.get(name)
        if expected is not None and (found := checksum(data)) != expected:
            msg = (
                f"state file {where} of operator {self.operator!r} is corrupt: its CRC-32 is "
                f"{found:08x}, the version that wrote it recorded {expected:08x} (a changed "
                "bit or a rewritten file). Restore it from a backup, or start over with "
                "`microstream reset CHECKPOINT`"
            )
            raise CheckpointCorruptError(msg)
        try:
            frame = decode_frame(data, pyarrow_io=self._pyarrow_io)
        except Exception as exc:  # polars and arrow raise various errors on bad bytes
            msg = (
                f"state file {where} is corrupt or truncated ({len(data)} bytes): "
                f"{type(exc).__name__}: {exc}"
            )
            raise CheckpointCorruptError(msg) from None
        if frame.schema != schema:
            msg = (
                f"state file {where} does not hold the state of operator {self.operator!r}: "
                f"{describe_schema_change(schema, frame.schema)}"
            )
            raise CheckpointCorruptError(msg)
        return frame

    def _replay(
        self, deltas: list[tuple[int, int]], data: KeyedRows, checksums: Mapping[str, int]
    ) -> None:
        """Apply the delta files ``(version, partition)``, oldest first, to ``data``.

        All deltas are read into one frame; for each key the rows of its newest
        delta decide (upsert rows, or the deletion marker).
        """
        if not deltas:
            return
        frames = [
            self._read_arrow(
                f"{p}/{version}{DELTA_SUFFIX}", self._delta_schema, checksums
            ).with_columns(
                pl.lit(order, pl.UInt32).alias(_ORDER), pl.lit(p, pl.UInt32).alias(_PART)
            )
            for order, (version, p) in enumerate(deltas)
        ]
        every = pl.concat(frames, how="vertical").with_columns(self._hash_expr)
        newest = every.filter(pl.col(_ORDER) == pl.col(_ORDER).max().over(self.key_columns))
        live = newest.filter(~pl.col(_DELETED))
        data.replace(_project(newest, self._keys_hash), _project(live, [*self._mem_schema, _PART]))

    def _remove_unneeded_files(self) -> None:
        """Delete files older than the base needed by the oldest retained version."""
        assert self._version is not None
        oldest_retained = self._version - self.min_versions_to_retain + 1
        bases = [v for v, _, is_base in self._chain if is_base and v <= oldest_retained]
        if not bases or bases[-1] <= self._cleaned_below:
            return
        keep_from = bases[-1]
        self._chain = [entry for entry in self._chain if entry[0] >= keep_from]
        for v in self.storage.list_numbered(VERSIONS_DIR):
            if v < keep_from:
                self.storage.delete(version_file(v))
        for p in range(self.num_partitions):
            for suffix in (DELTA_SUFFIX, SNAPSHOT_SUFFIX):
                for v in self.storage.list_numbered(str(p), suffix):
                    if v < keep_from:
                        self.storage.delete(f"{p}/{v}{suffix}")
        self._cleaned_below = keep_from

    def _repartition(self) -> None:
        everything = self._data.frame().drop(_HASH).with_columns(self._hash_expr)
        self._data = self._keyed(everything)
        self._force_snapshot = True
        self._frame = None

    def _conform(
        self, frame: pl.DataFrame | None, what: str, columns: list[str], *, exact: bool
    ) -> pl.DataFrame:
        """``frame`` reduced to ``columns`` in order, dtypes checked (Null columns cast)."""
        if frame is None:
            return pl.DataFrame(schema={c: self.schema[c] for c in columns})
        missing = [c for c in columns if c not in frame.schema]
        extra = [c for c in frame.schema if c not in columns] if exact else []
        wrong = [
            f"{c}: {frame.schema[c]} instead of {self.schema[c]}"
            for c in columns
            if c in frame.schema
            and frame.schema[c] != self.schema[c]
            and frame.schema[c] != pl.Null
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
                f"{what} for the state of operator {self.operator!r} do not match its schema: "
                + "; ".join(parts)
                + f"; expected {dict(self.schema) if exact else columns}"
            )
            raise SchemaMismatchError(msg)
        casts = [c for c in columns if frame.schema[c] == pl.Null and self.schema[c] != pl.Null]
        frame = _project(frame, columns)
        if casts:
            frame = frame.with_columns([pl.col(c).cast(self.schema[c]) for c in casts])
        return frame

    def _partitions_of(self, keys: pl.DataFrame) -> list[int]:
        """The partition of each row of ``keys`` (a frame of the key columns)."""
        return self._pids(keys.select(self._hash_expr).to_series()).cast(pl.Int64).to_list()

    def _pids(self, hashes: pl.Series) -> pl.Series:
        return (hashes % self.num_partitions).cast(pl.UInt32)

    def _keyed(self, frame: pl.DataFrame, *, is_sorted: bool = False) -> KeyedRows:
        """``frame`` (memory schema) as the store's in-memory rows."""
        return KeyedRows(
            frame,
            key_columns=self.key_columns,
            hash_column=_HASH,
            num_partitions=self.num_partitions,
            is_sorted=is_sorted,
        )

    def _rows_of(self, keys: pl.DataFrame) -> pl.DataFrame:
        """The state rows (memory schema) of ``keys`` (key columns + hash)."""
        return self._data.rows_of(keys)

    def _deletion_markers(self, keys: pl.DataFrame) -> pl.DataFrame:
        """One row per key: key columns and hash set, values null, ``_DELETED`` true."""
        return keys.select(
            *[
                pl.col(c) if c in self.key_columns else pl.lit(None, dtype=dtype).alias(c)
                for c, dtype in self.schema.items()
            ],
            pl.col(_HASH),
            pl.lit(True).alias(_DELETED),
        )

    def _record(self, keys: pl.DataFrame, changes: pl.DataFrame) -> None:
        """Make ``changes`` the pending delta of ``keys`` (replacing earlier changes)."""
        pending = self._pending
        if pending is not None and pending.height:
            pending = pending.join(
                _project(keys, self.key_columns), on=self.key_columns, how="anti", nulls_equal=True
            )
            changes = pl.concat([pending, changes], how="vertical")
        self._pending = changes
        self._frame = None


# -- helpers ---------------------------------------------------------------------------


def _hash_expr(schema: pl.Schema, keys: list[str]) -> pl.Expr:
    # A Categorical's hash follows its process-local physical codes: hash the strings.
    fields = [
        pl.col(k).cast(pl.String) if isinstance(schema[k], pl.Categorical) else pl.col(k)
        for k in keys
    ]
    return pl.struct(fields).hash(seed=_HASH_SEED).alias(_HASH)


def _project(frame: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """``frame.select(columns)`` for plain column names, without a query plan."""
    return pl.DataFrame([frame.get_column(c) for c in columns])


def _file_partitions(parts: list[pl.DataFrame]) -> pl.Series:
    """A ``_PART`` column: the partition (file) of each row of ``pl.concat(parts)``."""
    heights = [part.height for part in parts]
    return pl.Series(_PART, np.repeat(np.arange(len(parts), dtype=np.uint32), heights))


def _split(frame: pl.DataFrame, pids: pl.Series) -> dict[int, pl.DataFrame]:
    """The rows of ``frame`` by partition id (``pids``, one per row); empty parts left out."""
    if frame.height == 0:
        return {}
    # One stable gather into partition order, then zero-copy slices: partition_by plus a
    # drop per part cost ~6x more on the small frames of a batch (Polars' per-call overhead).
    ids = pids.to_numpy()
    counts = np.bincount(ids).tolist()
    ordered = frame[np.argsort(ids, kind="stable")]
    parts: dict[int, pl.DataFrame] = {}
    start = 0
    for pid, count in enumerate(counts):
        if count:
            parts[pid] = ordered.slice(start, count)
        start += count
    return parts


def _make_probe_frame(schema: pl.Schema, keys: list[str]) -> pl.DataFrame:
    """A fixed frame of key values (and one all-null row) to detect a changed hash."""
    columns = []
    for i, name in enumerate(keys):
        dtype = schema[name]
        values = pl.int_range(i, i + _PROBE_ROWS, eager=True)
        column: pl.Series | None = None
        candidates: list[Any] = [values, values.cast(pl.String)]
        if isinstance(dtype, pl.Enum) and len(dtype.categories):
            cats = dtype.categories
            candidates = [cats.gather(values % len(cats))]
        for candidate in candidates:
            try:
                column = candidate.cast(dtype, strict=True)
                break
            except Exception:  # not castable that way: try the next representation
                continue
        if column is None:
            column = pl.Series(name, [None] * _PROBE_ROWS, dtype=dtype)
        nulls = pl.Series(name, [None], dtype=dtype)
        columns.append(column.alias(name).append(nulls))
    return pl.DataFrame(columns)


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: list[str] = []
    start = prev = values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if v is not None:
            start = prev = v
    return ", ".join(out)
