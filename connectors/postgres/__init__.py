"""PostgreSQL: change data capture through a logical replication slot, and an exactly-once sink.

**Source** (:class:`PostgresCdcSourceSpec`, ``ms.scan_postgres_cdc``): offsets
are LSNs, the positions of a logical replication slot; a batch reads exactly
the transactions whose commit ends in its logged ``(start, end]`` range, and
the slot is advanced only after the batch's ``commits/N``, so a re-run after a
crash reads the same changes. See :mod:`connectors.postgres.cdc`.

**Sink** (:class:`PostgresSinkSpec`, ``StreamFrame.sink_postgres``): each
batch's rows and a progress row ``(query id, table, batch id)`` commit in one
transaction; a batch id at or below the progress row's is skipped. See
:mod:`connectors.postgres.sink`.

``psycopg`` (3) is an optional dependency, imported only when used
(``pip install 'microstream[postgres]'``); the source needs the ``wal2json``
output plugin on the server.
"""

from connectors.postgres.cdc import (
    CDC_COLUMNS,
    PostgresCdcSource,
    PostgresCdcSourceSpec,
    PostgresLsn,
)
from connectors.postgres.sink import PostgresSink, PostgresSinkSpec

__all__ = [
    "CDC_COLUMNS",
    "PostgresCdcSource",
    "PostgresCdcSourceSpec",
    "PostgresLsn",
    "PostgresSink",
    "PostgresSinkSpec",
]
