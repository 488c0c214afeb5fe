"""A griffe extension: Sphinx cross-reference roles in docstrings, as mkdocstrings links.

The docstrings are numpy style and read by ``help()`` and IPython too, where Sphinx's
roles (``:class:`~microstream.Trigger```, ``:meth:`stop```) are the convention. On
the site, a role whose target is an object the reference documents (or one of its
members) becomes an autorefs link, so a reference to something that does not exist
fails the strict build; any other target (Polars, the standard library, internals
the reference leaves out) is shown as inline code, as ``help()`` would read it.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

import griffe

_ROLE_PATTERN = re.compile(
    r":(?:py:)?(?P<role>func|meth|class|mod|data|attr|exc|obj|const):"
    r"`(?P<tilde>~?)(?P<target>[^`<>]+?)`"
)


def _documented() -> tuple[str, ...]:
    """The import paths the reference pages render (``reference.PAGES``)."""
    path = Path(__file__).with_name("reference.py")
    spec = importlib.util.spec_from_file_location("microstream_docs_reference", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return tuple(entry.path for page in module.PAGES for entry in page.entries)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring of ``microstream`` and ``connectors``."""

    _ROLE_PATTERN = _ROLE_PATTERN

    def __init__(self) -> None:
        self._documented = _documented()

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name in {"microstream", "connectors"}:
            self._walk(pkg, seen=set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = self._ROLE_PATTERN.sub(self._replace, obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, seen)  # type: ignore[arg-type]

    def _linked(self, target: str) -> bool:
        return any(target == p or target.startswith(p + ".") for p in self._documented)

    def _replace(self, match: re.Match[str]) -> str:
        target = match["target"].strip()
        shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
        if match["role"] in {"func", "meth"}:
            shown += "()"
        if self._linked(target):
            return f"[`{shown}`][{target}]"
        return f"`{shown}`"
