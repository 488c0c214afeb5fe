"""A local S3 API (moto's server, on 127.0.0.1) for the S3 tests.

One server per test session, started by :class:`microstream.testing.moto_s3.MotoS3Server`
(never by hand); every test gets a fresh bucket, so tests share nothing.
"""

from __future__ import annotations

import pytest

from microstream.testing.moto_s3 import MotoS3Server, S3Bucket


@pytest.fixture
def s3(moto_server: MotoS3Server) -> S3Bucket:
    """A fresh, empty bucket on the session's server (``moto_server``: tests/conftest.py)."""
    pytest.importorskip("s3fs", reason="needs s3fs")
    return moto_server.create_bucket()
