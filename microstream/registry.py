"""Connectors by name, through the ``microstream.connectors`` entry points.

The engine never imports a concrete connector at import time; ``scan_*`` and
``sink_*`` look theirs up here when called, so a third-party package adds a
connector by declaring an entry point in that group: one line in its
``pyproject.toml``. The built-in connectors are declared the same way, in
microstream's own ``pyproject.toml`` (the one list of them). A connector's
table object that ``StreamFrame.join`` should take (a ``deltalake.DeltaTable``)
is adapted by an entry point in the ``microstream.static_tables`` group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from microstream.exceptions import MicrostreamError

if TYPE_CHECKING:
    # For type checkers only (the objects are loaded by name at run time): this module is
    # the one place the engine names the connectors package. The handles below carry these
    # types, so ``ms.scan_files(...)`` is checked against ``FileSourceSpec``'s own options.
    from connectors.delta import optimize_delta, vacuum_delta
    from connectors.delta_source import DeltaSourceSpec
    from connectors.file_sink import read_file_sink
    from connectors.files import FileSourceSpec
    from connectors.kafka import KafkaSourceSpec
    from connectors.kinesis import KinesisSourceSpec
    from connectors.memory import MemoryStream
    from connectors.postgres import PostgresCdcSourceSpec
    from connectors.pubsub import PubSubSourceSpec
    from connectors.rabbitmq import RabbitMQStreamSourceSpec
    from connectors.rate import RateSourceSpec
    from connectors.socket_source import SocketSourceSpec
    from microstream.protocols import StaticTableAdapter

__all__ = [
    "DELTA_SOURCE",
    "FILES",
    "KAFKA",
    "KINESIS",
    "OPTIMIZE_DELTA",
    "POSTGRES_CDC",
    "PUBSUB",
    "RABBITMQ_STREAM",
    "RATE",
    "READ_FILE_SINK",
    "SOCKET",
    "VACUUM_DELTA",
    "Connector",
    "load_connector",
    "memory_stream_class",
    "static_table_adapters",
]

T_co = TypeVar("T_co", covariant=True)

STATIC_TABLES_GROUP = "microstream.static_tables"
"""Entry-point group of the adapters that let ``StreamFrame.join`` take a connector's
table object (a ``deltalake.DeltaTable``) as its static side."""

CONNECTORS_GROUP = "microstream.connectors"
"""Entry-point group of sources, sinks and connector functions, by name."""


def _targets(group: str) -> dict[str, str]:
    """``name -> "module:attr"`` of an entry-point group, from the installed distributions'
    metadata (microstream's own built-ins are declared in its ``pyproject.toml``)."""
    return {ep.name: ep.value for ep in entry_points(group=group)}


def _own_targets(group: str) -> dict[str, str]:
    """:func:`_targets` of microstream's own distribution only: its metadata alone is read
    (about 0.3 ms), where :func:`_targets` reads every installed distribution's (10-20 ms
    with a few hundred installed, paid by every ``scan_*`` and ``sink_*`` call)."""
    try:
        own = distribution("microstream").entry_points
    except PackageNotFoundError:  # run from a source tree without its metadata
        return {}
    return {ep.name: ep.value for ep in own if ep.group == group}


def load_connector(name: str) -> Any:
    """The object registered under ``name`` in the ``microstream.connectors`` group.

    A built-in connector's name is looked up in microstream's own metadata first (so a
    built-in name always means the built-in); other names in every installed package's.

    Examples
    --------
    >>> load_connector("rate").kind
    'rate'
    >>> load_connector("nope")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    microstream.exceptions.MicrostreamError: no connector named 'nope'; installed connectors: console, ...
    """
    target = _own_targets(CONNECTORS_GROUP).get(name)
    if target is not None:
        return _import(target)
    targets = _targets(CONNECTORS_GROUP)
    target = targets.get(name)
    if target is None:
        msg = f"no connector named {name!r}; installed connectors: {', '.join(sorted(targets))}"
        raise MicrostreamError(msg)
    return _import(target)


def _import(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class Connector(Generic[T_co]):
    """A registered connector object by name, loaded when asked for, with its static type.

    The engine's public functions that stand for a connector (``ms.scan_files``,
    ``ms.optimize_delta``) hold one of these instead of importing the connector, so
    ``import microstream`` imports no connector, while type checkers still see the
    connector's own signature.

    Examples
    --------
    >>> RATE.name, RATE.load().kind
    ('rate', 'rate')
    """

    __slots__ = ("name",)

    def __init__(self, name: str, typed_as: T_co | None = None) -> None:
        # typed_as: the connector object, for its static type (always None when run)
        self.name = name

    def load(self) -> T_co:
        """The object registered under :attr:`name` (imports its module)."""
        loaded: T_co = load_connector(self.name)
        return loaded

    def __repr__(self) -> str:
        return f"Connector({self.name!r})"


# The connectors the engine's own facades stand for (the scan_* functions, Delta maintenance).
# The second argument exists for type checkers only (``TYPE_CHECKING`` is False when run):
# it gives each handle its connector's type without importing the connector.
FILES = Connector("files", FileSourceSpec if TYPE_CHECKING else None)
RATE = Connector("rate", RateSourceSpec if TYPE_CHECKING else None)
KAFKA = Connector("kafka", KafkaSourceSpec if TYPE_CHECKING else None)
POSTGRES_CDC = Connector("postgres_cdc", PostgresCdcSourceSpec if TYPE_CHECKING else None)
KINESIS = Connector("kinesis", KinesisSourceSpec if TYPE_CHECKING else None)
SOCKET = Connector("socket", SocketSourceSpec if TYPE_CHECKING else None)
PUBSUB = Connector("pubsub", PubSubSourceSpec if TYPE_CHECKING else None)
RABBITMQ_STREAM = Connector("rabbitmq_stream", RabbitMQStreamSourceSpec if TYPE_CHECKING else None)
DELTA_SOURCE = Connector("delta_source", DeltaSourceSpec if TYPE_CHECKING else None)
READ_FILE_SINK = Connector("read_file_sink", read_file_sink if TYPE_CHECKING else None)
OPTIMIZE_DELTA = Connector("optimize_delta", optimize_delta if TYPE_CHECKING else None)
VACUUM_DELTA = Connector("vacuum_delta", vacuum_delta if TYPE_CHECKING else None)


def static_table_adapters() -> list[StaticTableAdapter]:
    """The adapters registered in the ``microstream.static_tables`` entry-point group.

    Loaded only when ``StreamFrame.join`` meets a static side that is neither a polars
    frame nor a :class:`~microstream.protocols.StaticSide`, so a connector's library
    (``deltalake``) is imported only by a join that uses it.

    Examples
    --------
    >>> [adapter.__name__ for adapter in static_table_adapters()]
    ['DeltaStaticTable']
    """
    targets = _targets(STATIC_TABLES_GROUP)
    return [_import(targets[name]) for name in sorted(targets)]


def memory_stream_class() -> type[MemoryStream]:
    """``ms.MemoryStream``: the memory connector's class, loaded through the registry."""
    cls: type[MemoryStream] = load_connector("memory")
    return cls
