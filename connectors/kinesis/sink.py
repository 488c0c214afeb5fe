"""``sink_kinesis``: each batch's rows as records of a Kinesis stream, at least once.

Rows are encoded in bulk (the Kafka sink's encoders), then sent with ``PutRecords`` in
calls of at most 500 records and 5 MiB. Kinesis accepts or refuses each record of a
call on its own (throttling, an internal error); the refused ones are sent again,
with backoff, until ``retry_timeout``. Kinesis records have no headers, so with
``format="json"`` the batch's identity travels in the payload: every object gets
``microstream_query_id``, ``microstream_batch_id`` and ``microstream_row`` (the row's
position in the batch), on which consumers deduplicate.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import polars as pl

from connectors._kafka_codecs import encode_values
from connectors.kinesis.client import make_client, retrying
from microstream.exceptions import PlanError, SinkError
from microstream.protocols import SinkContext
from microstream.time.duration import parse_duration

if TYPE_CHECKING:
    from microstream._typing import KinesisSinkFormat

__all__ = ["BATCH_FIELDS", "KinesisSink", "KinesisSinkSpec"]

BATCH_FIELDS = ("microstream_query_id", "microstream_batch_id", "microstream_row")
"""The fields ``format="json"`` adds to every record: the query, the batch, the row."""

_MAX_RECORDS = 500  # PutRecords' limits
_MAX_BYTES = 5 * 1024 * 1024
_FIRST_BACKOFF_S = 0.05
_MAX_BACKOFF_S = 1.0


@dataclass(frozen=True)
class KinesisSinkSpec:
    """Write each batch's rows as records of a Kinesis stream (at least once).

    Parameters
    ----------
    stream
        The stream written to (it must exist).
    partition_key
        The records' partition key (which shard a record goes to, and the
        order Kinesis keeps): a column name or a polars expression over the
        batch, cast to text; a null or empty key is a ``SinkError``.
    format
        ``"json"``: every column as one JSON object, plus ``microstream_query_id``,
        ``microstream_batch_id`` and ``microstream_row``; ``"raw"``: the
        ``value`` column's bytes (String or Binary) as they are.
    retry_timeout
        How long refused records (throttling, internal errors), connection
        errors and 5xx replies are retried with backoff before the batch fails.
    options
        Keyword arguments of ``boto3.client("kinesis", ...)`` (``region_name``,
        ``endpoint_url``, credentials). Never shown.

    Notes
    -----
    Guarantee: **at-least-once**. A batch re-run after a crash (or after a
    failure) is sent again whole: records accepted before are written twice,
    with the same ``(microstream_query_id, microstream_batch_id,
    microstream_row)`` in JSON. Within a batch, records of one partition key
    keep their order unless some of them are refused and sent again.

    Examples
    --------
    >>> spec = KinesisSinkSpec("alerts", partition_key="user")
    >>> spec.describe(), sorted(spec.output_modes)
    ('KinesisSink[alerts]', ['append', 'complete', 'update'])
    """

    kind: ClassVar[str] = "kinesis_sink"
    output_modes: ClassVar[frozenset[str]] = frozenset({"append", "update", "complete"})
    durable: ClassVar[bool] = True

    stream: str
    _: KW_ONLY
    partition_key: str | pl.Expr = field(compare=False)
    format: KinesisSinkFormat = "json"
    retry_timeout: str | timedelta | float = "30s"
    options: Mapping[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.stream, str) or not self.stream:
            msg = f"stream must be a stream name; got {self.stream!r}"
            raise ValueError(msg)
        if not isinstance(self.partition_key, (str, pl.Expr)) or (
            isinstance(self.partition_key, str) and not self.partition_key
        ):
            msg = f"partition_key must be a column name or a polars expression; got {self.partition_key!r}"
            raise ValueError(msg)
        if self.format not in ("json", "raw"):
            msg = f"format must be 'json' or 'raw'; got {self.format!r}"
            raise ValueError(msg)
        parse_duration(self.retry_timeout, name="retry_timeout")

    def describe(self) -> str:
        """One line: ``KinesisSink[stream]``."""
        return f"KinesisSink[{self.stream}]"

    def build(self, context: SinkContext) -> KinesisSink:
        """The runtime sink."""
        return KinesisSink(self, context)


class KinesisSink:
    """The runtime side of :class:`KinesisSinkSpec` (see the module docstring)."""

    def __init__(self, spec: KinesisSinkSpec, context: SinkContext) -> None:
        self.spec = spec
        self.description = spec.describe()
        self.query_id = context.query_id
        self._logger = context.logger
        self._retry_s = parse_duration(spec.retry_timeout).total_seconds()
        if spec.format == "raw" and context.schema is not None and "value" not in context.schema:
            msg = (
                f"{self.description}: format='raw' sends the 'value' column, which the query lacks"
            )
            raise PlanError(msg)
        self._client = make_client(spec.options)

    def add_batch(self, batch_id: int, data: pl.DataFrame) -> None:
        """Send every row of the batch; return when Kinesis accepted all of them.

        Raises
        ------
        SinkError
            A null or empty partition key, a record over 1 MiB, or records still
            refused after ``retry_timeout``.
        """
        if data.height == 0:
            return
        key = self.spec.partition_key
        keys = data.select(
            (pl.col(key) if isinstance(key, str) else key).cast(pl.String)
        ).to_series()
        bad = keys.is_null() | (keys.str.len_bytes() == 0)
        if bad.any():
            row = int(bad.arg_true()[0])
            msg = (
                f"{self.description}: batch {batch_id} row {row} has a null or empty partition key"
            )
            raise SinkError(msg)
        if self.spec.format == "json":
            frame = data.with_columns(
                pl.lit(self.query_id).alias(BATCH_FIELDS[0]),
                pl.lit(batch_id, dtype=pl.Int64).alias(BATCH_FIELDS[1]),
                pl.int_range(data.height, dtype=pl.Int64).alias(BATCH_FIELDS[2]),
            )
            payloads = encode_values(frame, "json")
        else:
            payloads = encode_values(data, "raw")
        entries = [
            {"Data": payload, "PartitionKey": partition_key}
            for payload, partition_key in zip(payloads, keys.to_list())
        ]
        for row, entry in enumerate(entries):
            if len(entry["Data"]) + len(entry["PartitionKey"].encode()) > 1024 * 1024:
                msg = f"{self.description}: batch {batch_id} row {row} is over Kinesis' 1 MiB record limit"
                raise SinkError(msg)
        for chunk in _chunks(entries):
            self._put(batch_id, chunk)

    def _put(self, batch_id: int, entries: list[dict[str, Any]]) -> None:
        deadline = time.monotonic() + self._retry_s
        backoff = _FIRST_BACKOFF_S
        pending = entries
        while True:
            remaining = max(deadline - time.monotonic(), 0.0)
            try:
                reply = retrying(
                    lambda records=pending: self._client.put_records(  # type: ignore[misc]
                        StreamName=self.spec.stream, Records=records
                    ),
                    retry_timeout_s=remaining,
                    what=f"{self.description}: batch {batch_id}",
                    error=SinkError,
                    on_retry=lambda why: self._logger.warning(
                        "%s: batch %d: %s; retrying", self.description, batch_id, why
                    ),
                )
            except SinkError:
                raise
            except Exception as exc:  # refused outright: a missing stream, bad credentials
                msg = f"{self.description}: batch {batch_id}: {type(exc).__name__}: {exc}"
                raise SinkError(msg) from None
            if not reply.get("FailedRecordCount"):
                return
            refused = [
                (entry, result)
                for entry, result in zip(pending, reply["Records"])
                if result.get("ErrorCode")
            ]
            if time.monotonic() + backoff > deadline:
                code, text = refused[0][1]["ErrorCode"], refused[0][1].get("ErrorMessage", "")
                msg = (
                    f"{self.description}: batch {batch_id}: {len(refused)} records still refused "
                    f"after retry_timeout={self.spec.retry_timeout!r}; the first: {code}: {text}. "
                    "Restart the query to send the batch again"
                )
                raise SinkError(msg)
            time.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
            pending = [entry for entry, _ in refused]

    def stop(self) -> None:
        """Close the client's connections."""
        self._client.close()


def _chunks(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """``entries`` cut into PutRecords calls (500 records, 5 MiB)."""
    chunks: list[list[dict[str, Any]]] = []
    current: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        weight = len(entry["Data"]) + len(entry["PartitionKey"].encode())
        if current and (len(current) == _MAX_RECORDS or size + weight > _MAX_BYTES):
            chunks.append(current)
            current, size = [], 0
        current.append(entry)
        size += weight
    if current:
        chunks.append(current)
    return chunks
