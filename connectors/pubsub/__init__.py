"""Google Cloud Pub/Sub: a source acknowledged after commit and replayed from its log, and a sink.

**Source** (:class:`PubSubSourceSpec`, ``ms.scan_pubsub``): each batch's pulled
messages are logged whole in the checkpoint before the batch runs, read from
there (a re-run reads the same messages), acknowledged only after the batch's
``commits/N``, and redeliveries of logged messages are dropped by message id
for ``dedup_retention``. See :mod:`connectors.pubsub.source`.

**Sink** (:class:`PubSubSinkSpec`, ``StreamFrame.sink_pubsub``): at least once,
ordered per ordering key, with ``(query id, batch id, row)`` attributes. See
:mod:`connectors.pubsub.sink`.

``google-cloud-pubsub`` is an optional dependency, imported only when used
(``pip install 'microstream[pubsub]'``).
"""

from connectors.pubsub.sink import PubSubSink, PubSubSinkSpec
from connectors.pubsub.source import METADATA_COLUMNS, PubSubOffset, PubSubSource, PubSubSourceSpec

__all__ = [
    "METADATA_COLUMNS",
    "PubSubOffset",
    "PubSubSink",
    "PubSubSinkSpec",
    "PubSubSource",
    "PubSubSourceSpec",
]
