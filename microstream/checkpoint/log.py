"""The checkpoint: metadata, the write-ahead log of offsets, commits, the lock.

Layout (see ``checkpoints/README.md`` for the full format)::

    metadata.json            query id, format version, plan fingerprint, created
    offsets/<batch>.json     WAL entry, written before the batch runs
    commits/<batch>.json     written once the sink and state committed the batch
    lock.json                owner and heartbeat of the process running the query
    sources/<n>/...          each source's own log
    sinks/...                the sink's own log
    progress/<run_id>.jsonl  one progress record per batch

Every record is a pydantic model written atomically as JSON. Nothing in a
checkpoint is code: no pickle.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from microstream.checkpoint.checksums import is_sealed, unseal
from microstream.checkpoint.storage import Storage
from microstream.exceptions import (
    CheckpointConflictError,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointLockedError,
    PlanChangedError,
)
from microstream.runtime.progress import QueryProgress
from microstream.state.key_groups import DEFAULT_KEY_GROUPS

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointMetadata",
    "CommitEntry",
    "LockRecord",
    "OffsetEntry",
    "PlanRecord",
    "SourceOffsets",
    "reset_checkpoint",
]

FORMAT_VERSION = 2
logger = logging.getLogger("microstream")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PlanRecord(_Record):
    """The fingerprinted parts of a query plan.

    ``sources`` and ``stateful`` must match on restart (offsets and state would
    mean something else otherwise); ``stateless`` steps and the sink may change.
    """

    sources: list[dict[str, Any]]
    stateful: list[dict[str, Any]] = Field(default_factory=list)
    stateless: list[str] = Field(default_factory=list)
    output_mode: str
    sink: str

    def incompatibilities(self, new: PlanRecord) -> list[str]:
        """What changed in ``new`` that the checkpoint cannot follow."""
        problems = []
        if len(self.sources) != len(new.sources):
            problems.append(
                f"the number of sources changed from {len(self.sources)} to {len(new.sources)}"
            )
        for i, (old_src, new_src) in enumerate(zip(self.sources, new.sources)):
            if old_src != new_src:
                problems.append(f"source {i} changed from {old_src} to {new_src}")
        if _rendering_neutral(self.stateful) != _rendering_neutral(new.stateful):
            problems.append(f"stateful operators changed from {self.stateful} to {new.stateful}")
        if self.output_mode != new.output_mode:
            problems.append(f"output_mode changed from {self.output_mode!r} to {new.output_mode!r}")
        return problems


# Polars 2.2 stopped printing a literal's dynamic type inside expressions
# (``quantile([dyn float: 0.9])`` became ``quantile([0.9])``). Stateful
# fingerprints hold expression texts, so a Polars upgrade alone must not read as
# a changed query; the tag says how Polars infers the literal's type, not what
# the query computes.
_LITERAL_TYPE_TAG = re.compile(r"dyn (?:int|float|str|bool|uint): ")


def _rendering_neutral(value: Any) -> Any:
    """``value`` with the parts of Polars' expression texts that vary by version removed."""
    if isinstance(value, str):
        return _LITERAL_TYPE_TAG.sub("", value)
    if isinstance(value, list):
        return [_rendering_neutral(v) for v in value]
    if isinstance(value, dict):
        return {k: _rendering_neutral(v) for k, v in value.items()}
    return value


class CheckpointMetadata(_Record):
    format_version: int = FORMAT_VERSION
    id: str
    name: str | None
    created: datetime
    plan: PlanRecord
    key_groups: int = DEFAULT_KEY_GROUPS
    """How many key groups every state store is split into; fixed at creation."""


class SourceOffsets(_Record):
    """One source's range ``(start, end]`` in a batch."""

    index: int
    description: str
    start: dict[str, Any] | None
    end: dict[str, Any]


class OffsetEntry(_Record):
    """A WAL entry: what batch ``batch_id`` reads, fixed before it runs."""

    format_version: int = FORMAT_VERSION
    batch_id: int
    batch_timestamp_ms: int
    watermark_us: int | None = None
    """The watermark that drives emission and eviction in this batch (wm[N])."""
    late_watermark_us: int | None = None
    """The watermark that judges rows late in this batch (the previous batch's, wm[N-1])."""
    sources: list[SourceOffsets]


class CommitEntry(_Record):
    format_version: int = FORMAT_VERSION
    batch_id: int
    committed_at: datetime
    num_output_rows: int
    watermark_us: int | None = None
    max_event_us: list[int | None] = Field(default_factory=list)
    """Per watermarked input, the largest event time seen up to this batch."""


class LockRecord(_Record):
    host: str
    pid: int
    run_id: str
    acquired_at: float
    heartbeat_at: float
    timeout_s: float


class Checkpoint:
    """A query's checkpoint directory on any fsspec filesystem.

    Parameters
    ----------
    url
        Local path or fsspec URL of the checkpoint directory.
    storage_options
        Passed to fsspec.

    Examples
    --------
    >>> cp = Checkpoint("memory://doctest-checkpoint")
    >>> cp.latest_offsets() is None
    True
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None):
        self.storage = Storage(url, storage_options, checksums=True)
        self.url = url
        self._lock_state: LockRecord | None = None
        self._heartbeat: threading.Thread | None = None
        self._stop_heartbeat = threading.Event()
        self.lock_lost = threading.Event()
        self.is_new = False
        """Whether :meth:`load_or_create` created the checkpoint (no batch can have run)."""

    def display(self, relative: str = "") -> str:
        return self.storage.display(relative)

    # -- metadata ---------------------------------------------------------------------

    def load_or_create(
        self, query_name: str | None, plan: PlanRecord, *, key_groups: int | None = None
    ) -> CheckpointMetadata:
        """The checkpoint's metadata, created for a new checkpoint.

        ``key_groups``: the number of key groups of a new checkpoint (None: the
        default); for an existing one, None means the recorded number.

        Raises
        ------
        PlanChangedError
            If the existing checkpoint was made by a query that differs in an
            incompatible way (sources, stateful operators, output mode, an explicit
            ``key_groups`` other than the recorded one).
        CheckpointFormatError
            The checkpoint was written in format 1: the message says what to do.
        """
        if self.storage.exists("metadata.json"):
            meta = self.read_metadata()
            problems = meta.plan.incompatibilities(plan)
            if key_groups is not None and key_groups != meta.key_groups:
                problems.append(
                    f"key_groups changed from {meta.key_groups} (recorded when the checkpoint "
                    f"was created) to {key_groups}"
                )
            if problems:
                msg = (
                    f"the query no longer matches checkpoint {self.display()}: "
                    + "; ".join(problems)
                    + ". Use a new checkpoint for the changed query"
                )
                raise PlanChangedError(msg)
            if meta.plan.stateless != plan.stateless or meta.plan.sink != plan.sink:
                logger.info("stateless steps or sink changed since %s; continuing", self.url)
            return meta
        if self.storage.list_numbered("offsets"):
            msg = (
                f"checkpoint {self.display()} has offsets/ but no metadata.json: it is "
                "incomplete; restore metadata.json or start over with a new checkpoint"
            )
            raise CheckpointCorruptError(msg)
        meta = CheckpointMetadata(
            id=str(uuid.uuid4()),
            name=query_name,
            created=datetime.now(timezone.utc),
            plan=plan,
            key_groups=DEFAULT_KEY_GROUPS if key_groups is None else key_groups,
        )
        self.storage.makedirs("")
        self.storage.write_model("metadata.json", meta, overwrite=False)
        self.is_new = True
        return meta

    def format_version(self) -> int | None:
        """The format version ``metadata.json`` records (None: not a checkpoint)."""
        try:
            raw = self.storage.read_bytes("metadata.json")
        except FileNotFoundError:
            return None
        try:
            found = json.loads(raw).get("format_version")
        except (ValueError, AttributeError):
            found = None
        # A sealed file is checked before its version is believed: a flipped digit must
        # not turn it into a format-1 checkpoint. Format 1 had no checksums.
        if found != 1 or is_sealed(raw):
            unseal(raw, self.display("metadata.json"))
        return found if isinstance(found, int) else FORMAT_VERSION  # read_model names a bad file

    def read_metadata(self) -> CheckpointMetadata:
        """The checkpoint's metadata; a checkpoint of another format version is refused.

        Raises
        ------
        CheckpointFormatError
            Format 1 (an older microstream): the message says what to do.
        """
        version = self.format_version()
        if version is None:
            msg = f"{self.display()} is not a microstream checkpoint (no metadata.json)"
            raise CheckpointError(msg)
        if version > FORMAT_VERSION:
            msg = (
                f"checkpoint {self.display()} has format version {version}; "
                f"this microstream reads up to {FORMAT_VERSION}: upgrade microstream"
            )
            raise CheckpointError(msg)
        if version < FORMAT_VERSION:
            msg = (
                f"checkpoint {self.display()} was written by an older microstream in checkpoint "
                f"format {version}; this one reads format {FORMAT_VERSION} (key-group state, "
                "checksummed files). Convert it in place with "
                f"`microstream migrate {self.display()}` (back it up first: the microstream "
                "that wrote it cannot read it afterwards), then start the query again; or "
                "re-run the query from the start of its input with a new checkpoint and a new "
                "output"
            )
            raise CheckpointFormatError(msg)
        return self.storage.read_model("metadata.json", CheckpointMetadata)

    # -- the log ------------------------------------------------------------------------

    def latest_offsets(self) -> OffsetEntry | None:
        ids = self.storage.list_numbered("offsets")
        return self.read_offsets(ids[-1]) if ids else None

    def read_offsets(self, batch_id: int) -> OffsetEntry:
        entry = self.storage.read_model(f"offsets/{batch_id}.json", OffsetEntry)
        self._check_id(entry.batch_id, batch_id, f"offsets/{batch_id}.json")
        return entry

    def write_offsets(self, entry: OffsetEntry) -> None:
        self.storage.write_model(f"offsets/{entry.batch_id}.json", entry, overwrite=False)

    def latest_commit(self) -> CommitEntry | None:
        ids = self.storage.list_numbered("commits")
        if not ids:
            return None
        entry = self.storage.read_model(f"commits/{ids[-1]}.json", CommitEntry)
        self._check_id(entry.batch_id, ids[-1], f"commits/{ids[-1]}.json")
        return entry

    def write_commit(self, entry: CommitEntry) -> None:
        self.storage.write_model(f"commits/{entry.batch_id}.json", entry, overwrite=False)

    def recent_progress(self, limit: int) -> list[QueryProgress]:
        """The last ``limit`` progress records of ``progress/`` (every run), oldest first.

        Reads the newest files from their end, and no further back than ``limit``
        records need: a query that ran for months has a long log, and the
        dashboard asks every second.

        Examples
        --------
        >>> Checkpoint("memory://doctest-no-progress").recent_progress(10)
        []
        """
        fs = self.storage.fs
        try:
            files = fs.ls(self.storage.path("progress"), detail=True)
        except FileNotFoundError:
            return []
        files.sort(key=lambda f: f.get("mtime") or f.get("LastModified") or 0, reverse=True)
        records: list[QueryProgress] = []
        for info in files:  # newest first
            records = self._progress_tail(info["name"], info.get("size"), limit) + records
            if len(records) >= limit:
                break
        records.sort(key=lambda p: (p.batch_id, p.timestamp))
        return records[-limit:]

    def _progress_tail(self, path: str, size: int | None, limit: int) -> list[QueryProgress]:
        """At least ``limit`` records from the end of one progress file (all, if it has fewer)."""
        fs = self.storage.fs
        budget = 64 * 1024
        while True:
            start = max(0, size - budget) if size else 0
            data = fs.cat_file(path, start=start, end=size) if start else fs.cat_file(path)
            lines = data.decode(errors="replace").splitlines()
            if start:
                lines = lines[1:]  # read from mid-line
            records = []
            for line in lines:
                if line.strip():
                    try:
                        records.append(QueryProgress.model_validate_json(line))
                    except ValueError:
                        continue  # a torn last line of a killed run
            if start == 0 or len(records) >= limit:
                return records
            budget *= 4

    def refuse_lost_log(
        self, query_id: str, latest: OffsetEntry | None, sink: str | None, sink_batch: int | None
    ) -> None:
        """Refuse a write-ahead log that no longer reaches batches that ran.

        ``offsets/N`` is written before anything else of batch N, so a sink
        holding batch N (``sink_batch``, from
        :class:`~microstream.protocols.CommittedBatchSink`), or, with an empty
        log, a state version or a progress record, means the log was deleted
        or an older copy of the checkpoint restored. Numbering batches again
        from the log's end would make the sink skip them as replays.

        Raises
        ------
        CheckpointCorruptError
            Naming what is missing and what shows that batches ran.
        """
        logged = -1 if latest is None else latest.batch_id
        evidence = []
        if sink is not None and sink_batch is not None and sink_batch > logged:
            evidence.append(f"{sink} already holds batch {sink_batch} of this query")
        if latest is None:
            found = self._state_versions() + [
                f"progress/{n}" for n in self.storage.list_names("progress")
            ]
            if found:
                shown = ", ".join(self.display(f) for f in found[:3])
                more = f" and {len(found) - 3} more" if len(found) > 3 else ""
                evidence.append(f"earlier batches left {shown}{more}")
        if not evidence:
            return
        if latest is None:
            missing = (
                "its write-ahead log is gone: metadata.json (query id "
                f"{query_id}) is there, but offsets/ and commits/ are empty"
            )
            restore = "offsets/ and commits/"
        else:
            missing = (
                f"its write-ahead log ends at offsets/{logged}.json, so offsets/ and commits/ "
                f"from batch {logged + 1} on are missing (deleted, or an older copy of the "
                "checkpoint was restored)"
            )
            restore = "the missing offsets/ and commits/ files"
        msg = (
            f"checkpoint {self.display()} cannot continue: {missing}, while "
            + " and ".join(evidence)
            + f". Numbering batches from {logged + 1} again would make the sink skip them as "
            f"already written and lose their rows. Restore {restore} from a backup of the "
            "checkpoint; or, to process the input again from the start, use a new checkpoint "
            "location and a new output (or delete both)"
        )
        raise CheckpointCorruptError(msg)

    def _state_versions(self) -> list[str]:
        """Committed state versions (``state/<op>/<store>/versions/<v>.json``), relative paths."""
        found = []
        for op in self.storage.list_names("state"):
            for store in self.storage.list_names(f"state/{op}"):
                versions = f"state/{op}/{store}/versions"
                found += [f"{versions}/{v}.json" for v in self.storage.list_numbered(versions)]
        return found

    def _check_id(self, found: int, expected: int, relative: str) -> None:
        if found != expected:
            msg = (
                f"checkpoint file {self.display(relative)} is corrupt: it holds batch "
                f"{found}, its name says {expected}"
            )
            raise CheckpointCorruptError(msg)

    # -- the lock ------------------------------------------------------------------------

    def acquire_lock(self, run_id: str, *, timeout_s: float = 30.0) -> None:
        """Take the checkpoint for this process, refusing a live owner.

        A lock whose heartbeat is older than its timeout, or whose owner process
        on this host is gone (SIGKILL, crash), is taken over with a warning.

        Raises
        ------
        CheckpointLockedError
            If another live process holds the lock.
        """
        now = time.time()
        lock_exists = self.storage.exists("lock.json")
        if lock_exists:
            try:
                current = self.storage.read_model("lock.json", LockRecord, checksum=False)
            except CheckpointCorruptError:
                logger.warning(
                    "lock file %s is unreadable; taking it over", self.display("lock.json")
                )
                current = None
            if current is not None:
                age = now - current.heartbeat_at
                dead = current.host == socket.gethostname() and not _pid_alive(current.pid)
                if not dead and age < current.timeout_s:
                    msg = (
                        f"checkpoint {self.display()} is in use by run {current.run_id} "
                        f"(pid {current.pid} on {current.host}, heartbeat {age:.1f}s ago); "
                        "stop that query first, or wait "
                        f"{current.timeout_s - age:.0f}s for its lock to expire if it is gone"
                    )
                    raise CheckpointLockedError(msg)
                reason = "its process is gone" if dead else f"no heartbeat for {age:.0f}s"
                logger.warning(
                    "taking over the lock of checkpoint %s from run %s (pid %s on %s): %s",
                    self.display(),
                    current.run_id,
                    current.pid,
                    current.host,
                    reason,
                )
        record = LockRecord(
            host=socket.gethostname(),
            pid=os.getpid(),
            run_id=run_id,
            acquired_at=now,
            heartbeat_at=now,
            timeout_s=timeout_s,
        )
        self.storage.makedirs("")
        try:
            # No lock: create it write-once (a rename-free link locally, a conditional
            # put on object stores), so of two processes starting at once one loses here.
            self.storage.write_model("lock.json", record, overwrite=lock_exists, checksum=False)
        except CheckpointConflictError:
            msg = f"checkpoint {self.display()} was taken by another process just now"
            raise CheckpointLockedError(msg) from None
        # Two processes may have raced to the same stale lock: the last writer wins.
        if self.storage.read_model("lock.json", LockRecord, checksum=False).run_id != run_id:
            msg = f"checkpoint {self.display()} was taken by another process just now"
            raise CheckpointLockedError(msg)
        self._lock_state = record
        self._stop_heartbeat.clear()
        self.lock_lost.clear()
        self._heartbeat = threading.Thread(
            target=self._beat, args=(timeout_s / 3,), name="microstream-lock", daemon=True
        )
        self._heartbeat.start()

    def remove_temporary_files(self) -> list[str]:
        """Delete the temporary files a killed writer left (``.<name>.<hex>.tmp``); which.

        Local writes go to a temporary name and are renamed into place; a process
        killed in between leaves the temporary file. Called with the lock held, so
        no writer of this checkpoint is running and every such file is garbage.
        Object stores write in one PUT and leave none.
        """
        if not self.storage.is_local:
            return []
        stray = [
            f
            for f in self.storage.files()
            if f.rsplit("/", 1)[-1].startswith(".") and f.endswith(".tmp")
        ]
        for relative in stray:
            self.storage.delete(relative)
        if stray:
            logger.warning(
                "removed %d temporary file(s) a killed run left in checkpoint %s: %s",
                len(stray),
                self.display(),
                ", ".join(stray[:5]),
            )
        return stray

    def check_lock(self) -> None:
        """Raise if another process took the lock (so this one must not commit)."""
        if self.lock_lost.is_set():
            msg = (
                f"lost the lock of checkpoint {self.display()} to another process; "
                "stopping without committing"
            )
            raise CheckpointLockedError(msg)

    def _beat(self, interval: float) -> None:
        while not self._stop_heartbeat.wait(interval):
            state = self._lock_state
            if state is None:
                return
            try:
                current = self.storage.read_model("lock.json", LockRecord, checksum=False)
                if current.run_id != state.run_id:
                    self.lock_lost.set()
                    return
                state = state.model_copy(update={"heartbeat_at": time.time()})
                self.storage.write_model("lock.json", state, checksum=False)
                self._lock_state = state
            except Exception:
                logger.exception("heartbeat of checkpoint %s failed", self.display())

    def release_lock(self) -> None:
        self._stop_heartbeat.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        state, self._lock_state = self._lock_state, None
        if state is None:
            return
        try:
            current = self.storage.read_model("lock.json", LockRecord, checksum=False)
            if current.run_id == state.run_id:
                self.storage.delete("lock.json")
        except Exception:
            logger.warning("could not release the lock of checkpoint %s", self.display())


def reset_checkpoint(
    url: str,
    *,
    confirm: Callable[[list[str]], bool],
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Delete a stopped query's checkpoint; the files deleted (none if it was declined).

    The checkpoint's lock is taken first, as a query starting would take it, so a
    running query (a live owner of the lock) is refused by name and no query can
    start while the files go. ``confirm`` gets the files about to be deleted and
    returns whether to go on. The query's outputs (tables, files, topics) are
    never touched: they are not in the checkpoint.

    Raises
    ------
    CheckpointLockedError
        A running query holds the checkpoint (the message names its run and pid).
    CheckpointError
        There is no checkpoint at ``url``.

    Examples
    --------
    >>> cp = Checkpoint("memory://doctest-reset")
    >>> cp.storage.write_bytes("metadata.json", b"{}")
    >>> reset_checkpoint("memory://doctest-reset", confirm=lambda files: True)
    ['metadata.json']
    >>> cp.storage.exists("metadata.json")
    False
    """
    cp = Checkpoint(url, storage_options)
    files = [f for f in cp.storage.files() if f != "lock.json"]
    if not files:
        msg = f"there is no checkpoint at {cp.display()}: nothing to reset"
        raise CheckpointError(msg)
    cp.acquire_lock(f"reset-{uuid.uuid4()}", timeout_s=30.0)
    try:
        if not confirm(files):
            return []
        for relative in files:
            cp.storage.delete(relative)
    finally:
        cp.release_lock()
    cp.storage.delete_tree()
    return files


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
