"""RayRuntime: the same query and checkpoint, its stateful operators on a Ray cluster.

1. ``RayRuntime(...)`` is passed as ``runtime=`` to any sink verb (or chosen with
   ``microstream run --runtime ray``). Ray is imported when a query is prepared,
   never when microstream is: without it the error names ``pip install
   'microstream[ray]'``.
2. ``prepare`` refuses, before anything runs, what cannot work across processes
   (:func:`check_runs_on_ray`): a checkpoint in this process's memory, a user
   function that cannot be pickled.
3. The query runs the local driver (:class:`~microstream.runtime.driver.StreamExecution`:
   trigger loop, write-ahead log, watermark, sink commit, recovery) with a
   :class:`~microstream.runtime.ray.executor.RayStageExecutor`, which places every
   stateful operator's key groups in Ray actors, reads splittable sources in Ray
   tasks that run the stateless steps after them, and routes rows to the actors
   (an operator's owners cut the rows for the next operator themselves).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from microstream.checkpoint.storage import Storage
from microstream.exceptions import CheckpointError, MissingDependencyError, PlanError
from microstream.operators.stateful_fn import StatefulFunctionNode
from microstream.plan.nodes import MapBatchesNode, PlanNode, StatefulNode
from microstream.runtime.driver import ExecutionConfig, StreamExecution
from microstream.runtime.ray.executor import RayStageExecutor, detached
from microstream.time.duration import format_duration, parse_duration

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["RayRuntime", "check_runs_on_ray", "import_ray"]

INSTALL = "pip install 'microstream[ray]'"


def import_ray() -> Any:
    """The ``ray`` module; a one-line error naming the install command without it."""
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        msg = f"RayRuntime needs Ray, which is not installed ({exc}); run: {INSTALL}"
        raise MissingDependencyError(msg) from None


class RayRuntime:
    """Runs a query's stateful operators in Ray actors that each own a range of key groups.

    The driver (this process) keeps the trigger loop, the write-ahead log, the
    watermark and the sink's commit exactly as :class:`~microstream.LocalRuntime`
    does. Sources that split (files, Delta, Kafka) are read by Ray tasks, one per
    split, which also run the stateless steps after them and hand their rows to the
    actors that own their keys (or write the sink's pieces); other sources and
    stateless stages run on the driver, and so does a batch of one split whose rows
    all come back to the driver anyway (``read_splits``). Every stateful operator's key groups are
    split into ``num_workers`` contiguous ranges, one per Ray actor; each actor
    loads exactly its range from the checkpoint, processes the rows routed to it
    (rows for a next operator go to that operator's owners, actor to actor) and writes
    its range's state files, in one call per batch; once the sink committed the batch,
    the driver writes the version's manifest and ``commits/N``. The same checkpoint runs on either
    runtime and with any ``num_workers`` between restarts: key groups move with
    their state, and the checkpoint records the move (``assignments/``).

    A worker that dies, or does not answer within ``worker_timeout``, is replaced
    within the run: the lost actors restart, every owner reloads its range as of the
    last committed version, and the batch runs again from its write-ahead log entry
    (same offsets, watermark and timestamp), exactly once.

    Parameters
    ----------
    address
        The Ray cluster: ``None`` joins the one this process is connected to, or
        the one ``RAY_ADDRESS`` names, or starts a local one; ``"auto"`` or
        ``"ray://host:port"`` joins a cluster.
    num_workers
        How many actors share every operator's key groups (an operator without
        keys, ``SINGLE_PARTITION``, lives whole in one of them).
    worker_options
        Passed to the actors' ``.options(...)``: ``num_cpus`` (default 0),
        ``resources``, ``runtime_env``, ``max_concurrency``...
    worker_timeout
        How long the driver waits for the workers' answer to one call (a batch's
        step of an operator, a state commit, loading state) before the workers that
        did not answer are treated as dead: a duration (``"60s"``), a timedelta or
        seconds; ``None`` waits for ever. Starting the actors and loading their state
        may take at least a minute, whatever this is.
    max_worker_restarts
        How many times one batch may lose workers and run again before the query
        stops with :class:`~microstream.exceptions.WorkerRestartsExhaustedError`
        (0: the first loss stops it; a restart of the query re-runs the batch).
    read_splits
        Where the splits of a stateless stage whose rows all come back to the driver
        (into ``foreach_batch``, the console, a memory table, a sink that does not take
        pieces) are read. ``"auto"``: a batch of one split on the driver (it would wait
        for the one task's rows anyway: a task only adds its round trip), a batch of
        several in tasks, in parallel. ``"tasks"``: every split in a task (the decode,
        and the rows a filter drops, stay off the driver: only the rows kept come back).
        A stage whose rows go to operators, or whose sink takes pieces, is read in
        tasks either way.

    Notes
    -----
    The checkpoint must be where every worker can read and write it: a local
    path for a Ray on this machine, ``s3://...`` for a cluster.

    Examples
    --------
    >>> import microstream as ms
    >>> ms.RayRuntime(num_workers=3, worker_timeout="90s")
    RayRuntime(address=None, num_workers=3, worker_timeout='1m30s', max_worker_restarts=3)
    >>> ms.RayRuntime(read_splits="tasks")
    RayRuntime(address=None, num_workers=2, worker_timeout='10m', max_worker_restarts=3, read_splits='tasks')
    >>> ms.RayRuntime(num_workers=0)
    Traceback (most recent call last):
    ...
    ValueError: num_workers must be a positive integer; got 0 instead
    >>> ms.RayRuntime(read_splits="driver")
    Traceback (most recent call last):
    ...
    ValueError: read_splits must be 'auto' or 'tasks'; got 'driver' instead
    """

    def __init__(
        self,
        address: str | None = None,
        num_workers: int = 2,
        worker_options: Mapping[str, Any] | None = None,
        *,
        worker_timeout: str | timedelta | float | None = "10m",
        max_worker_restarts: int = 3,
        read_splits: Literal["auto", "tasks"] = "auto",
    ) -> None:
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            msg = f"num_workers must be a positive integer; got {num_workers!r} instead"
            raise ValueError(msg)
        if (
            isinstance(max_worker_restarts, bool)
            or not isinstance(max_worker_restarts, int)
            or max_worker_restarts < 0
        ):
            msg = (
                "max_worker_restarts must be a non-negative integer; "
                f"got {max_worker_restarts!r} instead"
            )
            raise ValueError(msg)
        self.address = address
        self.num_workers = num_workers
        self.worker_options = dict(worker_options or {})
        self.worker_timeout = (
            None
            if worker_timeout is None
            else parse_duration(worker_timeout, name="worker_timeout")
        )
        if self.worker_timeout is not None and self.worker_timeout <= timedelta(0):
            msg = f"worker_timeout must be positive or None; got {worker_timeout!r} instead"
            raise ValueError(msg)
        self.max_worker_restarts = max_worker_restarts
        if read_splits not in ("auto", "tasks"):
            msg = f"read_splits must be 'auto' or 'tasks'; got {read_splits!r} instead"
            raise ValueError(msg)
        self.read_splits = read_splits

    def prepare(self, config: ExecutionConfig) -> StreamExecution:
        """A run of ``config`` whose operators run in Ray actors (refused at once when the
        query cannot run on Ray, :func:`check_runs_on_ray`)."""
        ray = import_ray()
        check_runs_on_ray(config, ray.cloudpickle.dumps)
        executor = RayStageExecutor(
            ray,
            lambda: self._connect(ray),
            self.num_workers,
            self.worker_options,
            worker_timeout_s=(
                None if self.worker_timeout is None else self.worker_timeout.total_seconds()
            ),
            max_worker_restarts=self.max_worker_restarts,
            checkpoint=Storage(config.checkpoint_url, config.storage_options),
            read_splits=self.read_splits,
        )
        execution = StreamExecution(config, executor=executor)
        executor.run_id = execution.run_id  # the fence of the owners' state files
        return execution

    def _connect(self, ray: Any) -> None:
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)

    def __repr__(self) -> str:
        timeout = (
            None
            if self.worker_timeout is None
            else format_duration(self.worker_timeout // timedelta(microseconds=1))
        )
        reads = "" if self.read_splits == "auto" else f", read_splits={self.read_splits!r}"
        return (
            f"RayRuntime(address={self.address!r}, num_workers={self.num_workers}, "
            f"worker_timeout={timeout!r}, max_worker_restarts={self.max_worker_restarts}{reads})"
        )


def check_runs_on_ray(config: ExecutionConfig, dumps: Callable[[Any], bytes]) -> None:
    """Refuse what a query on Ray cannot do, saying why and what to use.

    - A checkpoint in this process's memory (``memory://``) when the query has
      stateful operators: the workers write their state into it from other processes.
    - A ``map_groups_with_state`` / ``map_batches_with_state`` function, or a
      ``map_batches`` function, that ``dumps`` (Ray's cloudpickle) cannot pickle:
      the first is sent to the workers; ``map_batches`` runs in the actor that
      reads its source when one actor takes all its rows
      (:mod:`~microstream.runtime.ray.owner_reads`), else on the driver.

    A ``MemoryStream`` fed from this process is read by the driver (it does not
    split) and sinks are written by the driver, so it and ``sink_memory`` work.

    Raises
    ------
    CheckpointError
        The checkpoint is in memory and the query has stateful operators.
    PlanError
        A user function cannot be pickled; the message names it.
    """
    plan = config.plan
    stateful = plan.stateful_nodes()
    storage = Storage(config.checkpoint_url, config.storage_options)
    if stateful and "memory" in _protocols(storage):
        msg = (
            f"checkpoint {storage.display('')} is in this process's memory, where Ray workers "
            "cannot write their state; give the query a checkpoint on disk (a local path for "
            "Ray on this machine) or on s3:// for a cluster"
        )
        raise CheckpointError(msg)
    for node in plan.walk():
        if isinstance(node, StatefulNode):
            try:
                dumps(detached(node))
            except Exception as exc:
                raise PlanError(_unpicklable(node, exc)) from exc
        elif isinstance(node, MapBatchesNode):
            try:
                dumps(node.function)
            except Exception as exc:
                raise PlanError(_unpicklable(node, exc, node.function)) from exc


def _protocols(storage: Storage) -> tuple[str, ...]:
    protocol = storage.fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _unpicklable(node: PlanNode, exc: Exception, function: Any = None) -> str:
    if function is None and isinstance(node, StatefulFunctionNode):
        function = node.function
    name = getattr(function, "__qualname__", None) or repr(function)
    what = f"function {name!r} of {node.describe()}" if function is not None else node.describe()
    return (
        f"RayRuntime cannot send {what} to its workers: it cannot be pickled "
        f"({type(exc).__name__}: {exc}). Define the function at module level and keep "
        "locks, open files, connections and clients out of what it refers to (create them "
        "inside it), or run the query on LocalRuntime"
    )
