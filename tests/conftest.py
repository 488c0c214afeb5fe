from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

import microstream as ms


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--run-slow", action="store_true", help="also run the full soak/chaos tests marked slow"
    )


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
