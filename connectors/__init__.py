"""Sources and sinks of microstream, one module per system.

Each module implements the contracts of :mod:`microstream.protocols` and is
found by the engine through the ``microstream.connectors`` entry points.
"""
