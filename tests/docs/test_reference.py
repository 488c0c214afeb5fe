"""The API reference of the documentation site documents every public name.

The reference pages are generated at every build from one table
(``docs/_tools/reference.py``: ``PAGES``); these tests check that table against the
code without building the site (``make docs`` builds it, strictly, and fails on a
reference that does not resolve or a docstring that does not parse).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

import microstream

TOOLS = Path(__file__).resolve().parents[2] / "docs" / "_tools"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"microstream_docs_{name}", TOOLS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


reference = _load("reference")


def _resolve(path: str) -> object:
    """The object at a dotted path: the longest importable module, then attributes."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attribute in parts[cut:]:
            obj = getattr(obj, attribute)
        return obj
    raise AssertionError(f"nothing importable in {path}")


def test_every_public_name_is_on_a_reference_page() -> None:
    documented = reference.documented_public_names()
    assert set(microstream.__all__) - documented == set()
    # and the table names nothing as public that is not
    assert documented - set(microstream.__all__) == set()


def test_a_public_name_left_out_fails_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(microstream, "__all__", [*microstream.__all__, "scan_the_moon"])
    with pytest.raises(SystemExit, match=r"\['scan_the_moon'\] in microstream.__all__"):
        reference.check_every_public_name()


@pytest.mark.parametrize(
    "path", [e.path for page in reference.PAGES for e in page.entries], ids=str
)
def test_every_entry_is_an_object_of_the_code(path: str) -> None:
    obj = _resolve(path)
    assert inspect.getdoc(obj), f"{path} has no docstring: the reference would show nothing"


def test_aliases_point_at_the_public_objects() -> None:
    for name, path in reference.ALIASES.items():
        assert _resolve(path) is getattr(microstream, name), name


def test_pages_are_directives_only() -> None:
    page = next(p for p in reference.PAGES if p.slug == "streamframe")
    text = reference.page_markdown(page)
    assert text.startswith("# StreamFrame\n\n")
    assert (
        "::: microstream.StreamFrame\n    options:\n      inherited_members: [join, join_asof, join_where, match_recognize]"
        in text
    )
    windows = reference.page_markdown(next(p for p in reference.PAGES if p.slug == "windows"))
    assert "::: microstream.api.groupby.StreamGroupBy\n" in windows


def test_the_checkpoint_format_page_marks_untyped_fences_as_text() -> None:
    text = reference.checkpoint_format_markdown()
    fences = [line for line in text.splitlines() if line.startswith("```")]
    openings = fences[0::2]
    assert openings, "checkpoints/README.md has code blocks"
    assert all(f.strip() != "```" for f in openings), openings
    assert text.startswith("# Checkpoint format")


def test_sphinx_roles_become_links_only_to_documented_objects() -> None:
    roles = _load("griffe_roles").SphinxRoles()
    text = (
        "See :meth:`~microstream.Trigger.once`, :class:`microstream.StreamFrame`, "
        ":func:`polars.scan_parquet`, :class:`~microstream.plan.nodes.PlanNode` and "
        ":attr:`has_timed_out`."
    )
    assert roles._ROLE_PATTERN.sub(roles._replace, text) == (
        "See [`once()`][microstream.Trigger.once], "
        "[`microstream.StreamFrame`][microstream.StreamFrame], "
        "`polars.scan_parquet()`, `PlanNode` and `has_timed_out`."
    )


def test_scan_facades_are_documented_with_their_specs_signature() -> None:
    griffe = pytest.importorskip("griffe")
    facades = _load("griffe_facades").ConnectorFacades()
    package = griffe.load(
        "microstream",
        extensions=griffe.load_extensions(facades),
        docstring_parser="numpy",
        search_paths=[str(TOOLS.parents[1])],
    )
    function = package["api.scan.scan_rate"]
    assert function.is_function
    assert [p.name for p in function.parameters] == list(
        inspect.signature(microstream.scan_rate).parameters
    )
    assert str(function.returns) == "StreamFrame"
    sections = [s.kind.value for s in function.docstring.parse("numpy")]
    assert sections[:2] == ["text", "parameters"]
    assert "examples" in sections


def test_the_docs_build_is_strict_and_shows_its_warnings() -> None:
    """`mkdocs build --strict --quiet` exits 0 on warnings (quiet drops them before
    strict mode counts them), so the Makefile must not pass it."""
    root = TOOLS.parents[1]
    recipe = next(
        line for line in (root / "Makefile").read_text().splitlines() if "mkdocs build" in line
    )
    assert "--strict" in recipe
    assert "--quiet" not in recipe and " -q" not in recipe, recipe
    assert "\nstrict: true\n" in (root / "mkdocs.yml").read_text()
