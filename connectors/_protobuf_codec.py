"""Protocol Buffers payloads (``format="protobuf"``): decoded into Arrow columns in bulk.

The message type is given as a generated message class, or as a descriptor set file
(``protoc --descriptor_set_out=types.desc --include_imports ...``) and the message's
full name: ``schema={"descriptor_set": "types.desc", "message": "shop.Order"}``.

Each payload is parsed by the protobuf runtime (upb, in C: one call a record); the
parsed messages are then turned into Arrow columns field by field by ``protarrow``
(nested messages as structs, repeated fields as lists, maps as lists of key/value
structs, enums as their names, well-known ``Timestamp`` as Datetime(ns, UTC)), and
the Arrow table into polars without a copy. A payload that does not parse (or lacks
a proto2 required field) is a bad record, found without bisection since each payload
is parsed on its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from connectors._kafka_codecs import Decoded, PayloadDecoder
from microstream.exceptions import MissingDependencyError, PlanError

__all__ = ["ProtobufDecoder", "message_class"]


def _require() -> tuple[Any, Any]:
    try:
        import protarrow
        import pyarrow as pa
    except ImportError:
        msg = "format='protobuf' needs protobuf and protarrow: pip install 'microstream[protobuf]'"
        raise MissingDependencyError(msg) from None
    return protarrow, pa


def message_class(schema: object) -> type:
    """The message class that ``schema`` names: a generated class as it is, or
    ``{"descriptor_set": path, "message": full name}`` loaded from the file.

    Raises
    ------
    PlanError
        Not a message class nor such a mapping; an unreadable file; no such message.
    """
    _require()
    from google.protobuf import descriptor_pb2, descriptor_pool, message, message_factory

    if isinstance(schema, type) and issubclass(schema, message.Message):
        return schema
    if not (isinstance(schema, Mapping) and set(schema) == {"descriptor_set", "message"}):
        msg = (
            "format='protobuf' needs schema= as a generated message class, or as "
            "{'descriptor_set': <file from protoc --descriptor_set_out --include_imports>, "
            f"'message': <full message name>}}; got {schema!r}"
        )
        raise PlanError(msg)
    path, name = Path(str(schema["descriptor_set"])), str(schema["message"])
    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(path.read_bytes())
    except (OSError, message.DecodeError) as exc:
        msg = f"cannot read the descriptor set {str(path)!r}: {exc}"
        raise PlanError(msg) from None
    # The files go into protobuf's default pool, as importing their generated modules
    # would: the well-known types (Timestamp, wrappers) must be the default pool's own
    # for protarrow to map them to Arrow types. A file already there (a generated module
    # imported, or an earlier descriptor set) is used as loaded.
    pool = descriptor_pool.Default()
    try:
        for proto in files.file:  # --include_imports lists dependencies first
            try:
                pool.FindFileByName(proto.name)
            except KeyError:
                pool.Add(proto)
        descriptor = pool.FindMessageTypeByName(name)
    except (KeyError, TypeError) as exc:
        known = sorted(
            f"{f.package}.{m.name}" if f.package else m.name
            for f in files.file
            for m in f.message_type
        )
        msg = (
            f"the descriptor set {str(path)!r} has no message {name!r} ({exc}); its top-level "
            f"messages: {known}. Was it written with --include_imports?"
        )
        raise PlanError(msg) from None
    cls: type = message_factory.GetMessageClass(descriptor)
    return cls


class ProtobufDecoder(PayloadDecoder):
    """Decodes serialised messages of one type into rows (see the module docstring).

    Examples
    --------
    >>> from google.protobuf import wrappers_pb2
    >>> dict(ProtobufDecoder(wrappers_pb2.DoubleValue).schema)
    {'value': Float64}
    >>> from google.protobuf import struct_pb2
    >>> ProtobufDecoder(struct_pb2.Struct)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    microstream.exceptions.PlanError: message google.protobuf.Struct is recursive ...
    """

    def __init__(self, schema: object) -> None:
        protarrow, pa = _require()
        self.message_type = message_class(schema)
        self._config = protarrow.ProtarrowConfig(enum_type=pa.string())
        try:
            arrow = protarrow.message_type_to_schema(self.message_type, self._config)
        except TypeError as exc:
            name = self.message_type.DESCRIPTOR.full_name  # type: ignore[attr-defined]
            msg = (
                f"message {name} is recursive ({exc}); columns cannot nest without end: "
                "decode it with format='raw' and parse it in map_batches"
            )
            raise PlanError(msg) from None
        self.schema = pl.Schema(pl.from_arrow(arrow.empty_table()).schema)  # type: ignore[union-attr]

    def _bulk(self, payloads: Sequence[bytes], seen: Sequence[str] = ()) -> pl.DataFrame:
        return self._frame([self.message_type.FromString(p) for p in payloads])  # type: ignore[attr-defined]

    def _frame(self, messages: list[Any]) -> pl.DataFrame:
        protarrow, _ = _require()
        batch = protarrow.messages_to_record_batch(messages, self.message_type, self._config)
        frame = pl.from_arrow(batch)
        assert isinstance(frame, pl.DataFrame)
        return frame.cast(self.schema) if frame.schema != self.schema else frame

    def decode(self, payloads: Sequence[bytes | None], *, seen: Sequence[str] = ()) -> Decoded:
        """Parse every payload on its own; the parsed ones become rows in one pass.

        Examples
        --------
        >>> from google.protobuf import wrappers_pb2
        >>> decoder = ProtobufDecoder(wrappers_pb2.Int64Value)
        >>> good = wrappers_pb2.Int64Value(value=7).SerializeToString()
        >>> out = decoder.decode([good, b"\\xff\\xff", None])
        >>> out.frame["value"].to_list(), out.index, out.bad[0][0]
        ([7, None], [0, 2], 1)
        """
        from google.protobuf.message import DecodeError

        parse = self.message_type.FromString  # type: ignore[attr-defined]
        messages: list[Any] = []
        kept: list[int] = []
        bad: list[tuple[int, str]] = []
        tombstones: list[int] = []
        for i, payload in enumerate(payloads):
            if payload is None:
                tombstones.append(i)
                continue
            try:
                messages.append(parse(payload))
            except DecodeError as exc:
                bad.append((i, f"not a {self.message_type.__name__} message: {exc}"))
            else:
                kept.append(i)
        frame = self._frame(messages)
        if not bad and not tombstones:
            return Decoded(frame, None, [])
        nulls = pl.DataFrame(schema=self.schema).clear(len(tombstones))
        merged = (
            pl.concat([frame, nulls])
            .with_columns(pl.Series("__position", kept + tombstones, pl.Int64))
            .sort("__position")
        )
        order = merged.get_column("__position").to_list()
        return Decoded(merged.drop("__position"), order, bad)
