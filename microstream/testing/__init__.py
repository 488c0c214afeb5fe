"""Helpers for testing microstream pipelines against real services.

:mod:`microstream.testing.tansu` starts a local Kafka-protocol broker
(Tansu) for tests, notebooks and demos; :mod:`microstream.testing.moto_s3`
a local S3 server.
"""

from __future__ import annotations
