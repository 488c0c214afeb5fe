"""The worker side of RayRuntime: one Ray actor that owns key-group ranges of operators.

An :class:`OperatorWorker` runs in a Ray worker process. For every stateful
operator the driver places on it, it builds the runtime operator from the
operator's node exactly as the driver does locally
(``node.build_operator(operator_id, storage)``), tells it the checkpoint's number
of key groups and loads its state for exactly the range it owns
(``load(version, key_groups=range(lo, hi))``, reading only the files of that range).
Per batch, in one call, it runs the operator over the rows the driver routed to it
(or that split tasks and the previous operator's owners cut for it, by reference),
writes its range's state files of the batch's version (:class:`StateWrite`,
:meth:`StoreBackedOperator.write_parts`) and returns the operator's output, its
progress and what it wrote, or, when a next operator's owners take the output, the
output cut for them (:meth:`OperatorWorker.process_pieces_into_exchanges`). The files
are fenced with the run id and attempt and no manifest names them yet: the driver
writes the one manifest per store and version after the sink committed the batch, so
writing them before the sink costs the batch no second call and makes nothing visible.

The class is plain Python: :mod:`microstream.runtime.ray.executor` turns it into an
actor with ``ray.remote``, so this module never imports Ray.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import polars as pl

from microstream.operators.base import StoreBackedOperator
from microstream.plan.nodes import TimedOperator
from microstream.runtime.ray.operator_exchange import cut_for_exchanges
from microstream.runtime.ray.owner_prefetch import OwnerReadAhead
from microstream.runtime.ray.owner_reads import OwnerRead, read_for_owner
from microstream.runtime.ray.shared_reads import read_share
from microstream.runtime.ray.sink_parts import write_piece
from microstream.runtime.ray.wire import Wire

if TYPE_CHECKING:
    from microstream.checkpoint.storage import Storage
    from microstream.plan.nodes import OperatorContext, OperatorOutput, StatefulNode
    from microstream.protocols import SinkPart
    from microstream.runtime.progress import StateOperatorProgress
    from microstream.runtime.ray.operator_exchange import ExchangeTail
    from microstream.runtime.ray.scan_tasks import SplitReport
    from microstream.runtime.ray.shared_reads import SharedRead
    from microstream.runtime.ray.sink_parts import SinkTail
    from microstream.state.format import StatePart

__all__ = ["LAZY_MODULES", "OperatorWorker", "StateWrite", "import_lazy_modules"]


@dataclass(frozen=True)
class StateWrite:
    """What an owner needs to write its range of the batch's state version in the call
    that processes the batch (the driver's manifest commits it later)."""

    version: int
    """The batch id: the state version the batch makes."""
    leader: bool
    """Whether this owner keeps the stores' shared files (the owner of key group 0)."""
    fence: str
    """The run id's first part and the attempt, put in the files' names."""


Written = dict[str, "StatePart"] | None
"""Per store, the part an owner wrote of the batch's version (None: asked to write none)."""


class OperatorWorker:
    """The operators (or their key-group ranges) one Ray actor owns.

    Parameters
    ----------
    storage
        The checkpoint's ``state/`` directory (any fsspec URL every worker can reach).

    Examples
    --------
    Outside Ray it is an ordinary object (the driver makes it an actor):

    >>> import polars as pl
    >>> import microstream as ms
    >>> from microstream.checkpoint.storage import Storage
    >>> from microstream.plan.nodes import OperatorContext
    >>> frame = ms.MemoryStream({"k": pl.String}).lazy().unique(subset=["k"])
    >>> worker = OperatorWorker(Storage("memory://doctest-operator-worker/state"))
    >>> node = frame.plan
    >>> worker.open("op0", node, num_key_groups=4, key_groups=(0, 4), version=None)
    >>> ctx = OperatorContext(batch_id=0, late_watermark_us=0, watermark_us=0,
    ...                       output_mode="append")
    >>> piece = Wire.of(pl.DataFrame({"k": ["a", "a", "b"]}))
    >>> write = StateWrite(version=0, leader=True, fence="doctest.0")
    >>> rows, late, progress, written, _ = worker.process_pieces(
    ...     "op0", ctx, (1,), piece, write=write
    ... )
    >>> rows.frame()["k"].to_list(), progress.num_rows_total
    (['a', 'b'], 2)
    >>> [(store, part.version, part.key_groups) for store, part in written.items()]
    [('op0/keys', 0, (0, 4))]
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.operators: dict[str, StoreBackedOperator] = {}
        self.read_ahead = OwnerReadAhead()
        """The next batch's splits of the sources this worker reads, read ahead."""

    def pid(self) -> int:
        """The worker's process id (crash tests kill it)."""
        return os.getpid()

    def open(
        self,
        operator_id: str,
        node: StatefulNode,
        *,
        num_key_groups: int,
        key_groups: tuple[int, int],
        version: int | None,
    ) -> None:
        """Build ``operator_id`` from ``node`` and load its state of ``key_groups``
        ``[lo, hi)`` as of committed ``version`` (None: empty), replacing what this worker
        held of it (the driver re-opens every owner to re-run a batch that lost workers)."""
        operator = node.build_operator(operator_id, self.storage.sub(operator_id))
        if not isinstance(operator, StoreBackedOperator):
            msg = (
                f"operator {operator_id} ({node.describe()}) keeps its state outside "
                "microstream's state stores, so RayRuntime cannot split it by key groups; "
                "run the query on LocalRuntime"
            )
            raise TypeError(msg)
        operator.use_key_groups(num_key_groups)
        lo, hi = key_groups
        operator.load(version, key_groups=range(lo, hi))
        self.operators[operator_id] = operator
        import_lazy_modules()

    def process(
        self, operator_id: str, inputs: tuple[pl.DataFrame, ...], ctx: OperatorContext
    ) -> tuple[OperatorOutput, StateOperatorProgress]:
        """One batch of ``operator_id`` over this worker's rows; its output and progress."""
        operator = self.operators[operator_id]
        output = operator.process(inputs, ctx)
        return output, operator.progress()

    def process_pieces(
        self,
        operator_id: str,
        ctx: OperatorContext,
        counts: tuple[int, ...],
        *pieces: Any,
        write: StateWrite | None = None,
    ) -> tuple[Wire, tuple[Wire, ...], StateOperatorProgress, Written, tuple[SplitReport, ...]]:
        """:meth:`process` over inputs given in pieces, ``counts[i]`` of them (in order) for
        input ``i``: rows the driver routed, or that Ray tasks cut per split (Ray hands
        those over as arguments), or a source's splits this worker reads itself (an
        :class:`OwnerRead` and its stage, :mod:`~microstream.runtime.ray.owner_reads`);
        with ``write``, then this worker's range of the batch's state version written.
        Frames come and go as Arrow tables (:class:`Wire`): the output rows, the late
        rows, then the progress, what was written and the report of every read."""
        output, progress, written, reports = self._processed(
            operator_id, ctx, counts, pieces, write
        )
        late = tuple(Wire.of(frame) for frame in output.late_rows)
        return Wire.of(output.rows), late, progress, written, reports

    def process_pieces_into_sink(
        self,
        operator_id: str,
        ctx: OperatorContext,
        counts: tuple[int, ...],
        sink: tuple[SinkTail, OperatorContext, str],
        *pieces: Any,
        write: StateWrite | None = None,
    ) -> tuple[
        Wire, tuple[Wire, ...], StateOperatorProgress, Written, tuple[SplitReport, ...], SinkPart
    ]:
        """As :meth:`process_pieces`, then this worker's output through the sink's tail into
        its piece of the batch (``sink``: the tail, the batch's context, the piece's name;
        :func:`~microstream.runtime.ray.sink_parts.write_piece`): the output without its
        rows, the late rows, the progress, the state written, the reads' reports and the
        piece written."""
        tail, batch, piece = sink
        output, progress, written, reports = self._processed(
            operator_id, ctx, counts, pieces, write
        )
        part = write_piece(output.rows, tail, batch, piece)
        late = tuple(Wire.of(frame) for frame in output.late_rows)
        return Wire.of(output.rows.clear()), late, progress, written, reports, part

    def process_pieces_into_exchanges(
        self,
        operator_id: str,
        ctx: OperatorContext,
        counts: tuple[int, ...],
        tail: ExchangeTail,
        batch: OperatorContext,
        *pieces: Any,
        write: StateWrite | None = None,
    ) -> tuple[Any, ...]:
        """As :meth:`process_pieces`, then this worker's output through ``tail``'s stages
        and cut for the owners of the next operators
        (:func:`~microstream.runtime.ray.operator_exchange.cut_for_exchanges`; ``batch``:
        the batch's context). Returned as separate values (the driver asks for
        ``1 + tail.pieces``): first the late rows, the progress, the state written and
        the reads' reports, which the driver gathers, then every piece, which it hands to
        the next owners by reference."""
        output, progress, written, reports = self._processed(
            operator_id, ctx, counts, pieces, write
        )
        late = tuple(Wire.of(frame) for frame in output.late_rows)
        return ((late, progress, written, reports), *cut_for_exchanges(output.rows, tail, batch))

    def _processed(
        self,
        operator_id: str,
        ctx: OperatorContext,
        counts: tuple[int, ...],
        pieces: tuple[Any, ...],
        write: StateWrite | None,
    ) -> tuple[OperatorOutput, StateOperatorProgress, Written, tuple[SplitReport, ...]]:
        inputs, reports = _inputs(counts, pieces, self.read_ahead)
        output, progress = self.process(operator_id, inputs, ctx)
        written = None
        if write is not None:
            # The batch's state is final here: written now, it needs no second call at commit.
            written = self.operators[operator_id].write_parts(
                write.version, leader=write.leader, fence=write.fence
            )
        self.read_ahead.start_deferred()  # the next batch's splits, now the operator ran
        return output, progress, written, reports

    def read_share(self, read: SharedRead, stage: Any) -> tuple[Any, ...]:
        """This worker's share of a batch's splits of ``stage``'s source, read (from its
        read-ahead where it read them ahead), the stage run and its rows cut for the
        owners of the next operator (:func:`~microstream.runtime.ray.shared_reads.read_share`):
        the share's report, then per split one piece per owner, as separate returns. The
        next batch's share is read ahead once this worker's operator ran in its call of
        the batch."""
        return read_share(read, stage, self.read_ahead)

    def warm(self, *stages: Any) -> int:
        """Nothing but receive ``stages`` (the stages this worker will read sources for,
        :mod:`~microstream.runtime.ray.owner_reads`): unpickling them imports the code
        they run (the source's connector, a ``map_batches`` function's module) at the
        start of the query, not in its first batch. How many it got."""
        return len(stages)

    def timers_due(self, operator_id: str, watermark_us: int | None, now_ms: int) -> bool:
        """Whether ``operator_id`` needs a batch without rows now, for this worker's keys."""
        operator = self.operators[operator_id]
        return isinstance(operator, TimedOperator) and operator.timers_due(watermark_us, now_ms)


LAZY_MODULES = ("numpy.ma",)
"""Modules the batch path imports on first use, imported when an operator is opened: in a
fresh actor the first batch would pay for them. ``numpy.ma``: Polars looks up ``np.ma``
whenever it builds a Series from a numpy array (the state stores' key hashes, the
operators' numpy paths), and importing it costs 8-13 ms on this project's test machine."""


def import_lazy_modules() -> None:
    """Import :data:`LAZY_MODULES` (once per process; later calls find them loaded)."""
    for name in LAZY_MODULES:
        importlib.import_module(name)


def _inputs(
    counts: tuple[int, ...], pieces: tuple[Any, ...], ahead: OwnerReadAhead
) -> tuple[tuple[pl.DataFrame, ...], tuple[SplitReport, ...]]:
    """Per input, its ``counts[i]`` pieces (in order) as one frame: a :class:`Wire`, or an
    :class:`OwnerRead` followed by its stage, which this worker reads (or takes from
    ``ahead``) and runs (:func:`read_for_owner`); and the report of every such read, in
    input order."""
    inputs = []
    reports = []
    at = 0
    for count in counts:
        part = []
        end = at + count
        while at < end:
            piece = pieces[at]
            if isinstance(piece, OwnerRead):
                frame, read = read_for_owner(piece, pieces[at + 1], ahead)
                part.append(frame)
                reports.append(read)
                at += 2
            else:
                part.append(piece.frame())
                at += 1
        inputs.append(part[0] if len(part) == 1 else pl.concat(part, how="vertical"))
    return tuple(inputs), tuple(reports)
