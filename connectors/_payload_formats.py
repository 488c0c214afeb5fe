"""The payload decoder of a message connector's ``format=`` (Kafka, Kinesis).

``"json"``, ``"csv"``, ``"avro"`` and ``"raw"`` are decoded by
:mod:`connectors._kafka_codecs`; ``"protobuf"`` by :mod:`connectors._protobuf_codec`,
imported only when asked for (protobuf and protarrow are optional).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import polars as pl

from connectors._kafka_codecs import PayloadDecoder, make_decoder

if TYPE_CHECKING:
    from microstream._typing import KafkaFormat, MissingColumnsPolicy

__all__ = ["payload_decoder"]


def payload_decoder(
    fmt: KafkaFormat,
    schema: Mapping[str, Any] | pl.Schema | str | type | None,
    *,
    missing_columns: MissingColumnsPolicy = "insert",
) -> PayloadDecoder:
    """The decoder of ``fmt``: ``schema`` is a message class (or descriptor set) for
    ``"protobuf"``, else as :func:`connectors._kafka_codecs.make_decoder` takes it.

    Examples
    --------
    >>> from google.protobuf import wrappers_pb2
    >>> dict(payload_decoder("protobuf", wrappers_pb2.StringValue).schema)
    {'value': String}
    """
    if fmt == "protobuf":
        from connectors._protobuf_codec import ProtobufDecoder

        return ProtobufDecoder(schema)
    if isinstance(schema, type):
        msg = f"schema= is a class ({schema.__name__}), which only format='protobuf' takes; got format={fmt!r}"
        from microstream.exceptions import PlanError

        raise PlanError(msg)
    return make_decoder(fmt, schema, missing_columns=missing_columns)
