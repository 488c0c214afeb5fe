"""The package's layout holds together: every module imports, and no module imports a
moved-away path (mypy cannot tell: it is configured to ignore missing imports)."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

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


# The connector contract (connectors/README.md): what a connector may import from microstream.
CONNECTOR_CONTRACT = {
    "microstream": {"StreamFrame"},
    "microstream.protocols": None,  # None: any name
    "microstream.exceptions": None,
    "microstream._typing": None,
    "microstream.checkpoint.storage": {"Storage"},
    "microstream.time.duration": {"parse_duration"},
    "microstream.api.frame": {"StreamFrame"},
}


def engine_imports(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(module, name, line) of every import from microstream in ``tree``, wherever it is
    (in functions and under TYPE_CHECKING too)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("microstream"):
            found += [(node.module or "", alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [
                (alias.name, "*", node.lineno)
                for alias in node.names
                if alias.name.startswith("microstream.")
            ]
    return found


def test_connectors_import_only_the_connector_contract() -> None:
    root = Path(connectors.__file__).parent
    outside = []
    for path in sorted(root.rglob("*.py")):
        for module, name, line in engine_imports(ast.parse(path.read_text())):
            allowed = CONNECTOR_CONTRACT.get(module, set())
            if allowed is not None and name not in allowed:
                outside.append(f"{path.relative_to(root.parent)}:{line}: {module}.{name}")
    assert outside == []


def test_the_contract_check_finds_an_internal_import() -> None:
    tree = ast.parse(
        "def f():\n    from microstream.state.store import StateStore\n"
        "from microstream.protocols import Source\n"
    )
    assert sorted(engine_imports(tree)) == [
        ("microstream.protocols", "Source", 3),
        ("microstream.state.store", "StateStore", 2),
    ]
    assert "microstream.state.store" not in CONNECTOR_CONTRACT
