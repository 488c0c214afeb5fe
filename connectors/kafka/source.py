"""The Kafka source at run time: offsets, bulk consume and decode, data loss, group commits."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from pydantic import ValidationError

from connectors.kafka.client import (
    _CLIENT_LOGGER,
    _FETCH_MAX,
    _FRESH_S,
    _MAX_BACKOFF_S,
    _POLL_S,
    _REQUEST_TIMEOUT_S,
    _STASH_MAX,
    DEAD_LETTER_SCHEMA,
    T,
    TopicPartitionKey,
    _client_options,
    _is_transient,
    _require_kafka,
)
from connectors.kafka.decoding import RecordDecoding
from connectors.kafka.offsets import KafkaOffset, _kafka_offset, _nest
from connectors.kafka.records import (
    _apportion,
    _as_exception,
    _Bounds,
    _Cursor,
    _key_of,
    _Loss,
    _offset_of,
    _range_losses,
    _Records,
    _retryable,
)
from connectors.kafka.source_spec import KafkaSourceSpec
from connectors.kafka.splits import KafkaSplit, plan_kafka_splits
from microstream.exceptions import (
    DataLossError,
    OffsetError,
    SourceError,
)
from microstream.protocols import Offset, SourceContext

if TYPE_CHECKING:
    from confluent_kafka import Consumer, Message
    from confluent_kafka.admin import AdminClient


# -- the runtime source ----------------------------------------------------------------------------


class KafkaSource(RecordDecoding):
    """The runtime side of :class:`KafkaSourceSpec` (see the module docstring).

    Examples
    --------
    >>> import polars as pl
    >>> from microstream.protocols import SourceContext
    >>> from microstream.checkpoint.storage import Storage
    >>> from microstream.testing.tansu import TansuBroker
    >>> with TansuBroker() as broker:
    ...     broker.create_topic("doc-source")
    ...     _ = broker.produce("doc-source", [{"id": 1}, {"id": 2}, {"id": 3}])
    ...     spec = KafkaSourceSpec(
    ...         broker.bootstrap_servers, topic="doc-source", schema={"id": pl.Int64}
    ...     )
    ...     ctx = SourceContext(index=0, storage=Storage("memory://doc-kafka"), query_id="q")
    ...     source = spec.build(ctx)
    ...     start = source.initial_offset()
    ...     end = source.latest_offset(start, rate_limited=False)
    ...     rows = source.read(start, end)["id"].to_list()
    ...     source.stop()
    >>> start.positions(), end.positions(), rows
    ({('doc-source', 0): 0}, {('doc-source', 0): 3}, [1, 2, 3])
    """

    def __init__(self, spec: KafkaSourceSpec, context: SourceContext) -> None:
        _require_kafka()
        from confluent_kafka import Consumer
        from confluent_kafka.admin import AdminClient

        self.spec = spec
        self.description = spec.describe()
        self._storage = context.storage
        self._logger = context.logger
        self._side_output = context.side_output
        options = {k: v for k, v in spec.options.items() if k != "group.id"}
        self.group_id: str = str(spec.options.get("group.id") or f"microstream-{context.query_id}")
        self._read_committed = options.get("isolation.level", "read_committed") == "read_committed"
        base: dict[str, Any] = {
            "bootstrap.servers": spec.bootstrap_servers,
            "logger": _CLIENT_LOGGER,
        }
        self._admin: AdminClient = AdminClient({**base, **_client_options(options, "admin")})
        self._consumer: Consumer = Consumer(
            {
                **base,
                **_client_options(options, "consumer"),
                "group.id": self.group_id,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,  # tells when a range ends in a gap
                "auto.offset.reset": "error",  # an out-of-range seek is never silent
                "on_commit": self._on_commit,
            }
        )
        self._pattern = re.compile(spec.pattern) if spec.pattern is not None else None
        self._bounds: dict[TopicPartitionKey, _Bounds] = {}
        self._seen_high: dict[TopicPartitionKey, int] = {}
        self._available_now: dict[TopicPartitionKey, int] | None = None
        self._metrics: dict[str, int] = {}
        self._ignored: dict[str, None] = {}
        """Extra columns reported in this run (ordered), so each is reported once."""
        self._committed: KafkaOffset | None = None
        self._confirmed: set[TopicPartitionKey] = set()
        """Partitions whose data loss was already confirmed (waited out) in this run."""
        self._cursors: dict[TopicPartitionKey, _Cursor] = {}
        """The assigned partitions: what was consumed of each and not read yet."""
        self._planned: tuple[KafkaOffset, KafkaOffset] | None = None
        """The last batch ``latest_offset`` planned, checked against fresh offsets."""
        self._looked_up: tuple[float, dict[TopicPartitionKey, _Bounds]] | None = None
        """When the offsets were last looked up (``time.monotonic()``), and what was found."""
        if spec.dead_letter is not None:
            self._side_output.declare(spec.dead_letter, DEAD_LETTER_SCHEMA)

    # -- talking to the cluster --------------------------------------------------------------

    def _until_stable(
        self, what: str, attempt: Callable[[float], tuple[T, list[_Loss]]]
    ) -> tuple[T, list[_Loss]]:
        """Run ``attempt`` until it succeeds without losses, retrying transient errors.

        A loss found is retried too (a restarting broker briefly shows no
        topics) and returned once it persisted for ``retry_timeout``, or at
        once if its partitions' losses were confirmed before in this run.
        """
        deadline = time.monotonic() + self.spec.retry_timeout_s
        delay = 0.05
        warned = False
        while True:
            remaining = deadline - time.monotonic()
            timeout = max(0.5, min(_REQUEST_TIMEOUT_S, remaining))
            try:
                result, losses = attempt(timeout)
                if not losses:
                    if warned:
                        self._logger.warning("%s: %s succeeded again", self.description, what)
                    return result, losses
                problem = "; ".join(loss.describe() for loss in losses)
                self._forget()  # what was consumed may be of a log that is gone
                if remaining <= 0 or all(loss.tp in self._confirmed for loss in losses):
                    self._confirmed.update(loss.tp for loss in losses)
                    return result, losses
            except Exception as exc:
                if not _is_transient(exc):
                    msg = f"{self.description}: cannot {what}: {exc}"
                    raise SourceError(msg) from exc
                problem = str(exc)
                self._forget()  # the broker may come back without what was consumed
                if remaining <= 0:
                    msg = (
                        f"{self.description}: cannot {what} on {self.spec.bootstrap_servers}: "
                        f"still failing after retry_timeout={self.spec.retry_timeout_s:g}s: {exc}"
                    )
                    raise SourceError(msg) from exc
            if not warned:
                self._logger.warning(
                    "%s: cannot %s yet (%s); retrying for up to %gs",
                    self.description,
                    what,
                    problem,
                    self.spec.retry_timeout_s,
                )
                warned = True
            time.sleep(min(delay, max(0.0, remaining)))
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def _partitions(self, timeout: float) -> list[TopicPartitionKey]:
        """The subscribed topic-partitions that exist now."""
        metadata = self._admin.list_topics(timeout=timeout)
        found: list[TopicPartitionKey] = []
        for name, topic in metadata.topics.items():
            if self.spec.topics is not None:
                if name not in self.spec.topics:
                    continue
            elif (
                name.startswith("__") or self._pattern is None or not self._pattern.fullmatch(name)
            ):
                continue
            if topic.error is not None:
                if topic.error.name() == "UNKNOWN_TOPIC_OR_PART":
                    continue
                raise _retryable(f"topic {name!r} metadata: {topic.error}")
            found.extend((name, p) for p in topic.partitions)
        return sorted(found)

    def _fetch_bounds(self, timeout: float) -> dict[TopicPartitionKey, _Bounds]:
        """Earliest and end offsets of every subscribed partition (two bulk requests)."""
        from confluent_kafka import IsolationLevel, TopicPartition
        from confluent_kafka.admin import OffsetSpec

        parts = self._partitions(timeout)
        if not parts:
            return {}
        level = (
            IsolationLevel.READ_COMMITTED
            if self._read_committed
            else IsolationLevel.READ_UNCOMMITTED
        )
        # Both requests are sent before either answer is awaited (one round trip).
        requests = {
            name: self._admin.list_offsets(
                {TopicPartition(t, p): spec for t, p in parts},
                isolation_level=level,
                request_timeout=timeout,
            )
            for name, spec in (("low", OffsetSpec.earliest()), ("high", OffsetSpec.latest()))
        }
        found: dict[str, dict[TopicPartitionKey, int]] = {}
        for name, futures in requests.items():
            values: dict[TopicPartitionKey, int] = {}
            for request, future in futures.items():
                offset = future.result(timeout=timeout + 1).offset
                if offset < 0:  # a broker that did not answer in time reports -1001
                    raise _retryable(f"no {name} offset for {request.topic}-{request.partition}")
                values[(request.topic, request.partition)] = offset
            found[name] = values
        bounds = {tp: _Bounds(found["low"][tp], found["high"][tp]) for tp in parts}
        for tp, b in bounds.items():
            self._seen_high[tp] = max(self._seen_high.get(tp, 0), b.high)
        self._looked_up = (time.monotonic(), bounds)
        return bounds

    # -- offsets -----------------------------------------------------------------------------

    def parse_offset(self, data: dict[str, Any]) -> KafkaOffset:
        """The :class:`KafkaOffset` from its JSON form in the write-ahead log."""
        try:
            return KafkaOffset.model_validate(data)
        except ValidationError as exc:
            msg = (
                f"{self.description}: {data!r} is not a Kafka offset (expected "
                f"{{'topics': {{topic: {{partition: offset}}}}, ...}}): {exc.errors()[0]['msg']}"
            )
            raise OffsetError(msg) from None

    def initial_offset(self) -> KafkaOffset:
        """The positions ``starting_offsets`` resolves to, resolved once and kept.

        Written to ``sources/<n>/initial.json`` the first time, so a query
        that stops before its first batch starts again at the same place
        (``"latest"`` does not move on).
        """
        if self._storage.exists("initial.json"):
            return self._storage.read_model("initial.json", KafkaOffset)
        bounds, _ = self._until_stable("look up the starting offsets", self._stable_bounds)
        wanted = self.spec.starting_offsets
        if wanted == "earliest":
            positions = {tp: b.low for tp, b in bounds.items()}
        elif wanted == "latest":
            positions = {tp: b.high for tp, b in bounds.items()}
        elif isinstance(wanted, int):
            positions = self._offsets_for_time(wanted, bounds)
        else:
            assert isinstance(wanted, dict)
            unknown = [
                f"{t}-{p}" for t, parts in wanted.items() for p in parts if (t, p) not in bounds
            ]
            if unknown:
                msg = (
                    f"{self.description}: starting_offsets names partition(s) {unknown} that do "
                    f"not exist; the subscribed partitions are {sorted(bounds)}"
                )
                raise SourceError(msg)
            positions = {}
            for tp, b in bounds.items():
                pos = wanted.get(tp[0], {}).get(tp[1], -2)
                positions[tp] = b.low if pos == -2 else b.high if pos == -1 else pos
        offset = KafkaOffset(topics=_nest(positions))
        self._storage.write_model("initial.json", offset, overwrite=False)
        return offset

    def _stable_bounds(
        self, timeout: float
    ) -> tuple[dict[TopicPartitionKey, _Bounds], list[_Loss]]:
        return self._fetch_bounds(timeout), []

    def _offsets_for_time(
        self, timestamp_ms: int, bounds: Mapping[TopicPartitionKey, _Bounds]
    ) -> dict[TopicPartitionKey, int]:
        from confluent_kafka import TopicPartition

        def attempt(timeout: float) -> tuple[dict[TopicPartitionKey, int], list[_Loss]]:
            request = [TopicPartition(t, p, timestamp_ms) for t, p in bounds]
            found = self._consumer.offsets_for_times(request, timeout=timeout)
            out = {}
            for tp in found:
                key = (tp.topic, tp.partition)
                # -1: no record at or after the timestamp, so start at the end.
                out[key] = bounds[key].high if tp.offset < 0 else tp.offset
            return out, []

        return self._until_stable("look up offsets by timestamp", attempt)[0] if bounds else {}

    def _start_losses(
        self, start: KafkaOffset, bounds: Mapping[TopicPartitionKey, _Bounds]
    ) -> list[_Loss]:
        """Positions of ``start`` that the partitions no longer hold."""
        losses = []
        for tp, pos in start.positions().items():
            seen = self._seen_high.get(tp)
            known_end = seen if seen is not None and seen > pos else None
            b = bounds.get(tp)
            if b is None:
                why = "the partition no longer exists: the topic was deleted or the broker lost it"
                losses.append(_Loss(tp, pos, known_end, None, True, why))
            elif b.high < pos:
                why = (
                    f"the partition now ends at offset {b.high}, before the query's position "
                    f"{pos}: its log was truncated or replaced (a broker that lost its data, a "
                    "topic recreated)"
                )
                losses.append(_Loss(tp, pos, known_end, b.low, True, why))
            elif b.low > pos:
                why = (
                    f"the earliest offset still in the partition is {b.low} (retention or deletion)"
                )
                losses.append(_Loss(tp, pos, b.low, b.low, False, why))
        return losses

    def _data_loss(self, losses: Sequence[_Loss], where: str) -> DataLossError:
        details = "; ".join(loss.describe() for loss in losses)
        msg = (
            f"{self.description}: data loss {where}: {details}. Pass fail_on_data_loss=False "
            "to continue from the earliest available offsets (the loss is counted in progress "
            "as offsets_lost), or start over with a new checkpoint"
        )
        return DataLossError(msg)

    def latest_offset(self, start: Offset, *, rate_limited: bool) -> KafkaOffset:
        """The end of the next batch: every partition's end, within the rate limit.

        Raises
        ------
        DataLossError
            A position of ``start`` no longer exists in its partition (after
            ``retry_timeout``), with ``fail_on_data_loss=True``.
        SourceError
            The cluster stayed unreachable for ``retry_timeout``.
        """
        begin = _kafka_offset(start, "start a batch at")

        def attempt(timeout: float) -> tuple[dict[TopicPartitionKey, _Bounds], list[_Loss]]:
            bounds = self._fetch_bounds(timeout)
            return bounds, self._start_losses(begin, bounds)

        if (
            self._available_now is not None
            and self.spec.fail_on_data_loss
            and not self._start_losses(begin, self._bounds)
        ):
            # Available now: the ends were fixed at start (as Spark does), so the offsets
            # are not looked up again for every batch; a loss since then shows when the
            # batch's records are fetched (``_fetch``).
            bounds, losses = self._bounds, list[_Loss]()
        else:
            bounds, losses = self._until_stable("look up the latest offsets", attempt)
        self._bounds = bounds
        base = begin.positions()
        resets: dict[TopicPartitionKey, int] = {}
        if losses:
            if self.spec.fail_on_data_loss:
                raise self._data_loss(losses, "before the next batch")
            for loss in losses:
                if not loss.replaced:
                    continue  # retention: read() skips to the earliest offset and counts
                lost = loss.lost() + (loss.resume or 0)  # plus the new log's deleted head
                self._count("offsets_lost", lost)
                del base[loss.tp]
                if loss.resume is not None:
                    resets[loss.tp] = loss.resume
                    self._seen_high[loss.tp] = bounds[loss.tp].high  # the new log's
                self._logger.warning(
                    "%s: data loss: %s; continuing from %s (fail_on_data_loss=False)",
                    self.description,
                    loss.describe(),
                    "nothing: the partition is gone"
                    if loss.resume is None
                    else f"offset {loss.resume} of the new log",
                )
        ends: dict[TopicPartitionKey, int] = {}
        available: dict[TopicPartitionKey, int] = {}
        for tp, b in bounds.items():
            first = resets.get(tp, base.get(tp, 0))
            high = b.high
            if self._available_now is not None:
                high = min(high, self._available_now.get(tp, first))
            ends[tp] = first
            available[tp] = max(0, high - first)
            if tp not in base and tp not in resets and available[tp] == 0:
                del ends[tp]  # a new, empty partition: nothing to log yet
        for tp, pos in base.items():
            ends.setdefault(tp, pos)  # gone but not a loss (never happens) or not listed
        limit = self.spec.max_offsets_per_trigger
        grant = _apportion(available, limit) if rate_limited and limit is not None else available
        for tp, n in grant.items():
            if tp in ends:
                ends[tp] += n
        if not resets and ends == begin.positions() and len(base) == len(begin.positions()):
            return begin
        planned = KafkaOffset(
            topics=_nest(ends),
            resets=_nest(resets),
            epoch=begin.epoch + (1 if resets or len(base) != len(begin.positions()) else 0),
        )
        self._planned = None if losses else (begin, planned)
        return planned

    def prepare_for_available_now(self) -> None:
        """Fix the end of every partition as it is now; later records wait for the next run."""
        recent = self._looked_up
        if recent is not None and time.monotonic() - recent[0] < _FRESH_S:
            bounds = recent[1]  # looked up a moment ago, by ``initial_offset``
        else:
            bounds, _ = self._until_stable("look up the latest offsets", self._stable_bounds)
        self._available_now = {tp: b.high for tp, b in bounds.items()}
        self._bounds = bounds

    def lag(self, end: Offset) -> int | None:
        """Offsets available beyond ``end`` at the last look-up (all partitions)."""
        positions = _kafka_offset(end, "measure lag from").positions()
        return sum(max(0, b.high - positions.get(tp, 0)) for tp, b in self._bounds.items())

    def metrics(self) -> dict[str, int]:
        """Counts since the previous call: ``bad_records_skipped``,
        ``bad_records_dead_lettered``, ``new_columns_ignored``, ``offsets_lost``
        (only those not zero)."""
        out, self._metrics = self._metrics, {}
        return out

    # -- reading -----------------------------------------------------------------------------

    def read(self, start: Offset, end: Offset) -> pl.DataFrame:
        """The records of ``(start, end]``, decoded, ordered by topic, partition and offset.

        Raises
        ------
        DataLossError
            Offsets of the range no longer exist, with ``fail_on_data_loss=True``.
        SourceError
            A bad record with ``on_bad_record="fail"``, or the cluster stayed
            unreachable for ``retry_timeout``.
        """
        begin, stop = _kafka_offset(start, "read from"), _kafka_offset(end, "read to")
        ranges = {
            tp: (stop.read_from(tp, begin), pos)
            for tp, pos in stop.positions().items()
            if stop.read_from(tp, begin) < pos
        }
        if not ranges:
            return pl.DataFrame(schema=self.spec.schema)
        planned = self._planned == (begin, stop) and self.spec.fail_on_data_loss
        if not planned:
            # A batch planned by ``latest_offset`` of this run was checked against offsets
            # looked up just before (a loss since then shows when fetching, see ``_fetch``);
            # a replayed batch, or one that may have to skip lost offsets, is checked here.

            def attempt(timeout: float) -> tuple[None, list[_Loss]]:
                bounds = self._fetch_bounds(timeout)
                return None, _range_losses(ranges, bounds)

            _, losses = self._until_stable("look up the offsets of the batch", attempt)
            if losses:
                if self.spec.fail_on_data_loss:
                    raise self._data_loss(losses, "in the logged range of the batch")
                for loss in losses:
                    self._count("offsets_lost", loss.lost())
                    a, b = ranges[loss.tp]
                    if loss.first == a and loss.resume is not None:
                        ranges[loss.tp] = (loss.resume, b)  # the head was deleted
                    else:
                        ranges[loss.tp] = (a, loss.first)  # the tail is gone
                    self._logger.warning(
                        "%s: data loss: %s (fail_on_data_loss=False)",
                        self.description,
                        loss.describe(),
                    )
                ranges = {tp: r for tp, r in ranges.items() if r[0] < r[1]}
        records = self._fetch(ranges) if ranges else _Records.empty()
        return self._decode(records)

    def plan_splits(self, start: Offset, end: Offset) -> list[KafkaSplit] | None:
        """``(start, end]`` as topic-partition offset ranges other processes read
        (:mod:`connectors.kafka.splits`), or None: read on the driver (a policy that
        skips or dead-letters bad records, or ``fail_on_data_loss=False``)."""
        return plan_kafka_splits(self, start, end)

    # The consumer stays assigned between batches: librdkafka keeps fetching the next
    # records while the batch is decoded, computed and written, and records consumed past
    # a partition's end in one batch are kept (``_Cursor.stash``) for the next one, which
    # then starts where this one ended. Any change of the assignment (a seek, a new
    # partition, one unassigned while too far ahead) assigns every partition again at an
    # explicit offset, its cursor's ``next``, so where each partition goes on never
    # depends on what librdkafka had fetched ahead and drops on such a change.

    def _assign(self) -> None:
        """Assign every attached partition at its cursor's ``next`` (the whole assignment)."""
        from confluent_kafka import TopicPartition

        self._consumer.assign(
            [TopicPartition(t, p, c.next) for (t, p), c in self._cursors.items() if not c.detached]
        )

    def _position(self, ranges: Mapping[TopicPartitionKey, tuple[int, int]]) -> None:
        """Make the consumer deliver every partition of ``ranges`` from its range's start."""
        changed = False
        for tp, (a, _) in ranges.items():
            cursor = self._cursors.get(tp)
            if cursor is not None and cursor.start <= a <= cursor.next:
                cursor.drop_before(a)
                if cursor.detached:
                    cursor.detached = False
                    changed = True
            else:
                self._cursors[tp] = _Cursor(a)
                changed = True
        if changed:
            self._assign()

    def _forget(self, tps: Sequence[TopicPartitionKey] | None = None) -> None:
        """Unassign ``tps`` (default: every partition) and drop what was kept of them."""
        gone = [tp for tp in (self._cursors if tps is None else tps) if tp in self._cursors]
        if not gone:
            return
        for tp in gone:
            del self._cursors[tp]
        with contextlib.suppress(Exception):  # a closed consumer
            if self._cursors:
                self._assign()
            else:
                self._consumer.unassign()

    def _fetch(self, ranges: Mapping[TopicPartitionKey, tuple[int, int]]) -> _Records:
        """Every record of ``ranges`` (``{tp: (first, end)}``), by bulk ``consume``."""
        try:
            self._position(ranges)
            self._consume_until(ranges)
        except BaseException:
            self._forget()  # start clean: the next read assigns and seeks again
            raise
        segments = []
        for tp in sorted(ranges):
            segments.append((tp, *self._cursors[tp].take_until(ranges[tp][1])))
        return _Records.join(segments)

    def _consume_until(self, ranges: Mapping[TopicPartitionKey, tuple[int, int]]) -> None:
        """Consume until every partition of ``ranges`` delivered its records up to the end."""
        consumer = self._consumer
        cursors = self._cursors
        pending = {tp: b for tp, (_, b) in ranges.items() if cursors[tp].next < b}
        single = next(iter(cursors)) if len(cursors) == 1 else None
        deadline = time.monotonic() + self.spec.retry_timeout_s
        while pending:
            # As many as the pending partitions still miss (consume returns as soon as it
            # has that many): records of other partitions, or past an end, are kept.
            wanted = sum(b - cursors[tp].next for tp, b in pending.items())
            batch = consumer.consume(num_messages=min(_FETCH_MAX, max(1, wanted)), timeout=_POLL_S)
            if not batch:
                if time.monotonic() > deadline:
                    raise self._stalled(pending)
                continue
            deadline = time.monotonic() + self.spec.retry_timeout_s
            ends: list[tuple[TopicPartitionKey, int]] = []
            if any(m.error() is not None for m in batch):
                batch, ends = self._errors_out(batch, pending)
            if batch:
                # Route the records to their partitions in bulk: one call per record for
                # its offset (and, with several partitions, its partition), numpy for the
                # rest.
                offsets = np.fromiter((m.offset() for m in batch), np.int64, len(batch))
                if single is not None:
                    cursors[single].add(batch, offsets)
                else:
                    self._route(batch, offsets)
            for tp, offset in ends:  # a range may end in a gap (transaction markers)
                if tp in cursors:
                    cursors[tp].reached(offset)
            done = [tp for tp, b in pending.items() if cursors[tp].next >= b]
            for tp in done:
                del pending[tp]
            # A partition far ahead of the others is unassigned (its records wait in the
            # broker, not in memory); the batch that needs it assigns it again at ``next``.
            full = [
                tp
                for tp, c in cursors.items()
                if tp not in pending and not c.detached and len(c.stash) > _STASH_MAX
            ]
            if full:
                for tp in full:
                    cursors[tp].detached = True
                self._assign()

    def _route(self, batch: list[Message], offsets: np.ndarray) -> None:
        """Append each record of ``batch`` to its partition's cursor (partitions interleave)."""
        cursors = self._cursors
        if len({t for t, _ in cursors}) == 1:
            codes = np.fromiter((m.partition() for m in batch), np.int64, len(batch))
            owner = {p: (t, p) for t, p in cursors}
        else:
            index: dict[Any, int] = {tp: i for i, tp in enumerate(cursors)}
            codes = np.fromiter(
                (index.get((m.topic(), m.partition()), -1) for m in batch),
                np.int64,
                len(batch),
            )
            owner = {i: tp for tp, i in index.items()}
        if codes[0] == codes[-1] and (codes == codes[0]).all():
            groups = [np.arange(len(batch))]
        else:
            order = np.argsort(codes, kind="stable")
            groups = np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)
        for group in groups:
            tp = owner.get(int(codes[group[0]]))
            if tp is None:  # a partition unassigned meanwhile: not ours any more
                continue
            if len(group) == len(batch):
                cursors[tp].add(batch, offsets)
            else:
                cursors[tp].add([batch[i] for i in group.tolist()], offsets[group])

    def _errors_out(
        self, batch: list[Message], pending: dict[TopicPartitionKey, int]
    ) -> tuple[list[Message], list[tuple[TopicPartitionKey, int]]]:
        """The records of ``batch``, and the ends of partitions it reached.

        Errors are handled (data loss, fatal errors); an end of partition
        (``_PARTITION_EOF``) is returned, to be applied after the records of
        the same call, which come before it.
        """
        from confluent_kafka import KafkaError

        records = []
        ends: list[tuple[TopicPartitionKey, int]] = []
        for m in batch:
            error = m.error()
            if error is None:
                records.append(m)
                continue
            tp = _key_of(m) if m.topic() is not None else None
            if error.code() == KafkaError._PARTITION_EOF:
                if tp is not None:
                    ends.append((tp, _offset_of(m)))
            elif tp is not None and tp not in pending:
                self._forget([tp])  # not read in this batch: seek afresh when it is
            elif error.code() in (KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET):
                msg = (
                    f"{self.description}: offsets of topic {m.topic()!r} partition "
                    f"{m.partition()} went out of range while reading them: {error}"
                )
                raise DataLossError(msg)
            elif not _is_transient(_as_exception(error)):
                msg = f"{self.description}: consuming failed: {error}"
                raise SourceError(msg)
        return records, ends

    def _stalled(self, pending: Mapping[TopicPartitionKey, int]) -> SourceError:
        """The error for records that did not come for ``retry_timeout``: a loss, if it is one.

        A broker that lost the records may answer a fetch with none (Tansu
        does) rather than an out-of-range error: the offsets are looked up.
        """
        missing = {tp: (self._cursors[tp].next, b) for tp, b in pending.items()}
        text = ", ".join(f"{t}-{p} [{a}, {b})" for (t, p), (a, b) in missing.items())

        def attempt(timeout: float) -> tuple[None, list[_Loss]]:
            return None, _range_losses(missing, self._fetch_bounds(timeout))

        try:
            _, losses = self._until_stable(
                "look up the offsets of records that do not come", attempt
            )
        except SourceError:
            losses = []
        if losses and self.spec.fail_on_data_loss:
            return self._data_loss(losses, "while reading the batch")
        if losses:
            details = "; ".join(loss.describe() for loss in losses)
            msg = (
                f"{self.description}: offsets of the batch were lost while reading it: "
                f"{details}. The query stops; a restart re-reads the batch and continues past "
                "them (fail_on_data_loss=False)"
            )
            return SourceError(msg)
        msg = (
            f"{self.description}: no records from {self.spec.bootstrap_servers} "
            f"for {self.spec.retry_timeout_s:g}s while reading {text}"
        )
        return SourceError(msg)

    # -- after the batch -----------------------------------------------------------------------

    def commit(self, end: Offset) -> None:
        """Commit ``end``'s positions as the group's offsets, for lag monitoring.

        Asynchronous: a synchronous commit blocks for as long as the broker is
        down. Failures are logged, never fatal (the checkpoint is the truth).
        """
        from confluent_kafka import TopicPartition

        offset = _kafka_offset(end, "commit")
        if offset == self._committed or not offset.topics:
            return
        try:
            # Its callback is served by the next ``consume`` (not ``poll``: the consumer
            # stays assigned, and a poll would take a record).
            self._consumer.commit(
                offsets=[TopicPartition(t, p, pos) for (t, p), pos in offset.positions().items()],
                asynchronous=True,
            )
        except Exception as exc:
            self._logger.warning(
                "%s: cannot commit offsets of group %s: %s", self.description, self.group_id, exc
            )
            return
        self._committed = offset

    def _on_commit(self, error: Any, partitions: Any) -> None:
        if error is not None:
            self._logger.warning(
                "%s: committing offsets of group %s failed: %s",
                self.description,
                self.group_id,
                error,
            )

    def stop(self) -> None:
        """Close the consumer (after serving pending commit callbacks)."""
        with contextlib.suppress(RuntimeError):  # already closed
            self._consumer.close()
