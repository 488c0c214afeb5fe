"""Options of the crash-recovery tests.

``test_crash_recovery_full`` (marked ``slow``) runs the full crash matrix. Ask
for it with any of:

- ``--crash-full``: ``pytest tests/crash --crash-full``. The option is defined
  here, so pytest knows it only when ``tests/crash`` (or a file in it) is on
  the command line;
- ``MICROSTREAM_CRASH_FULL=1`` in the environment, however pytest is started;
- ``--run-slow``, the project's switch for every ``slow`` test.

The first two run the full matrix without turning on the project's other slow
tests: they lift the ``--run-slow`` skip from that one test only.
"""

from __future__ import annotations

import os

import pytest

FULL_TEST = "test_crash_recovery_full"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--crash-full",
        action="store_true",
        default=False,
        help="run the full crash-recovery matrix (slow; also MICROSTREAM_CRASH_FULL=1)",
    )


def crash_full_requested(config: pytest.Config) -> bool:
    return (
        bool(config.getoption("--crash-full", default=False))
        or bool(config.getoption("--run-slow", default=False))
        or os.environ.get("MICROSTREAM_CRASH_FULL", "") not in ("", "0")
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tests/conftest.py skips every slow test without --run-slow; after it ran,
    # take that skip off the full crash test when it was asked for explicitly.
    if not crash_full_requested(config):
        return
    for item in items:
        if getattr(item, "originalname", item.name) == FULL_TEST:
            item.own_markers[:] = [
                m
                for m in item.own_markers
                if not (m.name == "skip" and "--run-slow" in str(m.kwargs.get("reason", "")))
            ]


@pytest.fixture(scope="session")
def crash_full(request: pytest.FixtureRequest) -> bool:
    """Whether the full crash matrix was asked for."""
    return crash_full_requested(request.config)
