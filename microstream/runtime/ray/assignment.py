"""The key-group -> worker assignment of RayRuntime, versioned in the checkpoint.

Every stateful operator's key groups are cut into contiguous ranges, one per Ray
worker (:func:`microstream.state.key_groups.key_group_ranges`). When a run starts
with an assignment other than the last one recorded (the first run on Ray, another
``num_workers``), the driver writes the next ``assignments/<n>.json`` of the
checkpoint: which worker owns which range of which operator, from which batch on,
and the run that chose it. A restart with the same assignment writes nothing. So
the checkpoint says where every key group lived for every batch run on Ray, and a
rescale (1 -> 3 -> 2 workers) is a record of the move, not only a change of the
files' names. Runs on LocalRuntime are not recorded: one process owns every group.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from microstream.exceptions import CheckpointCorruptError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from microstream.checkpoint.storage import Storage

__all__ = ["ASSIGNMENTS_DIR", "Assignment", "OwnedRange", "record_assignment"]

ASSIGNMENTS_DIR = "assignments"


class OwnedRange(BaseModel):
    """Key groups ``[lo, hi)`` of one operator, owned by worker ``worker``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    lo: int
    hi: int
    worker: int


class Assignment(BaseModel):
    """``assignments/<id>.json``: who owns which key groups, from batch ``since_batch`` on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = 1
    id: int
    since_batch: int
    """The first batch run under this assignment (a re-run uncommitted batch included)."""
    num_key_groups: int
    num_workers: int
    operators: dict[str, list[OwnedRange]]
    """Per operator id, its ranges in key-group order."""
    run_id: str
    """The run that chose it."""
    created: datetime

    def same_placement(self, other: Assignment) -> bool:
        """Whether both put every key group of every operator on the same worker."""
        return (
            self.num_key_groups == other.num_key_groups
            and self.num_workers == other.num_workers
            and self.operators == other.operators
        )


def record_assignment(
    checkpoint: Storage,
    operators: Mapping[str, Sequence[tuple[int, int, int]]],
    *,
    num_workers: int,
    num_key_groups: int,
    since_batch: int,
    run_id: str,
) -> Assignment:
    """The assignment this run uses; written as the next ``assignments/<n>.json`` unless
    it places every key group as the last one recorded (then that one is returned).

    Parameters
    ----------
    checkpoint
        The checkpoint's root (the caller holds its lock).
    operators
        Per operator id, its ``(lo, hi, worker)`` ranges.

    Raises
    ------
    CheckpointCorruptError
        The last recorded assignment covers another number of key groups than the
        checkpoint has.

    Examples
    --------
    >>> from microstream.checkpoint.storage import Storage
    >>> cp = Storage("memory://doctest-assignment")
    >>> first = record_assignment(cp, {"op0": [(0, 64, 0), (64, 128, 1)]}, num_workers=2,
    ...                           num_key_groups=128, since_batch=0, run_id="r1")
    >>> again = record_assignment(cp, {"op0": [(0, 64, 0), (64, 128, 1)]}, num_workers=2,
    ...                           num_key_groups=128, since_batch=7, run_id="r2")
    >>> moved = record_assignment(cp, {"op0": [(0, 128, 0)]}, num_workers=1,
    ...                           num_key_groups=128, since_batch=9, run_id="r3")
    >>> (first.id, again.id, again.since_batch), (moved.id, moved.since_batch)
    ((0, 0, 0), (1, 9))
    >>> cp.list_numbered("assignments")
    [0, 1]
    """
    proposed = Assignment(
        id=0,
        since_batch=since_batch,
        num_key_groups=num_key_groups,
        num_workers=num_workers,
        operators={
            op: [OwnedRange(lo=lo, hi=hi, worker=w) for lo, hi, w in ranges]
            for op, ranges in operators.items()
        },
        run_id=run_id,
        created=datetime.now(timezone.utc),
    )
    recorded = checkpoint.list_numbered(ASSIGNMENTS_DIR)
    if recorded:
        name = f"{ASSIGNMENTS_DIR}/{recorded[-1]}.json"
        last = checkpoint.read_model(name, Assignment)
        if last.num_key_groups != num_key_groups:
            msg = (
                f"checkpoint file {checkpoint.display(name)} assigns {last.num_key_groups} key "
                f"groups, but the checkpoint has {num_key_groups}; restore the file from a "
                "backup of the checkpoint or delete it"
            )
            raise CheckpointCorruptError(msg)
        if last.same_placement(proposed):
            return last
        proposed = proposed.model_copy(update={"id": recorded[-1] + 1})
    checkpoint.write_model(f"{ASSIGNMENTS_DIR}/{proposed.id}.json", proposed, overwrite=False)
    return proposed
