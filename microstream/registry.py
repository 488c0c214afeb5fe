"""Connectors by name, through the ``microstream.connectors`` entry points.

The engine never imports a concrete connector at import time; ``scan_*`` and
``sink_*`` look theirs up here when called, so a third-party package adds a
connector by declaring an entry point in that group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from microstream.exceptions import MicrostreamError

if TYPE_CHECKING:
    # For type checkers only (``ms.MemoryStream`` is loaded through the registry at run
    # time): this module is the one place the engine names the connectors package.
    from connectors.memory import MemoryStream

__all__ = ["load_connector", "memory_stream_class"]

# Used when the distribution's metadata is absent (running from a source tree).
_BUILTIN = {
    "files": "connectors.files:FileSourceSpec",
    "rate": "connectors.rate:RateSourceSpec",
    "memory": "connectors.memory:MemoryStream",
    "file_sink": "connectors.file_sink:FileSinkSpec",
    "read_file_sink": "connectors.file_sink:read_file_sink",
    "delta": "connectors.delta:DeltaSinkSpec",
    "delta_static": "connectors.delta:DeltaStaticTable",
    "delta_source": "connectors.delta_source:DeltaSourceSpec",
    "optimize_delta": "connectors.delta:optimize_delta",
    "vacuum_delta": "connectors.delta:vacuum_delta",
    "memory_sink": "connectors.memory:MemorySinkSpec",
    "console": "connectors.console:ConsoleSinkSpec",
    "foreach_batch": "connectors.foreach_batch:ForeachBatchSinkSpec",
    "kafka": "connectors.kafka:KafkaSourceSpec",
    "kafka_sink": "connectors.kafka:KafkaSinkSpec",
}


def load_connector(name: str) -> Any:
    """The object registered under ``name`` in the ``microstream.connectors`` group.

    Examples
    --------
    >>> load_connector("rate").kind
    'rate'
    """
    for ep in entry_points(group="microstream.connectors"):
        if ep.name == name:
            return ep.load()
    target = _BUILTIN.get(name)
    if target is None:
        installed = {ep.name for ep in entry_points(group="microstream.connectors")}
        known = sorted(installed | set(_BUILTIN))
        msg = f"no connector named {name!r}; installed connectors: {', '.join(known)}"
        raise MicrostreamError(msg)
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def memory_stream_class() -> type[MemoryStream]:
    """``ms.MemoryStream``: the memory connector's class, loaded through the registry."""
    cls: type[MemoryStream] = load_connector("memory")
    return cls
