"""Small helpers shared by the tests."""

from __future__ import annotations

import polars as pl

import microstream as ms


def run_memory(frame: ms.StreamFrame, batches: list[pl.DataFrame], name: str) -> pl.DataFrame:
    """Feed ``batches`` one by one through a memory-sink query and return the table."""
    source = _memory_source(frame)
    query = frame.sink_memory(name)
    try:
        for batch in batches:
            source.add_data(batch)
            query.process_all_available(timeout=30)
    finally:
        query.stop()
    exc = query.exception()
    if exc is not None:
        raise exc
    return ms.table(name)


def _memory_source(frame: ms.StreamFrame) -> ms.MemoryStream:
    scans = frame.plan.scans()
    assert len(scans) == 1
    source = scans[0].source
    assert isinstance(source, ms.MemoryStream)
    return source
