"""The package's layout holds together: every module imports, and no module imports a
moved-away path (mypy cannot tell: it is configured to ignore missing imports)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import connectors
import microstream

MODULES = sorted(
    m.name
    for pkg in (microstream, connectors)
    for m in pkgutil.walk_packages(pkg.__path__, f"{pkg.__name__}.")
    if not m.name.endswith("__main__")  # runs the command
)


def test_the_layers_are_there() -> None:
    layers = {"api", "plan", "time", "operators", "state", "checkpoint", "runtime", "cli"}
    assert {f"microstream.{layer}" for layer in layers} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)
