"""A griffe extension: the ``scan_*`` facades documented as the functions they are.

``ms.scan_files`` and its siblings are :class:`microstream.api.facade.ConnectorFacade`
objects whose signature and numpy "Parameters" section are their connector spec's,
computed when asked for (so that the options are declared once, by the connector).
Griffe reads source code, where they are assignments; this extension replaces each
with a function built from the object itself: the same ``inspect.signature`` and
``__doc__`` that ``help()`` shows. A facade whose documentation does not parse is a
warning of the docstring parser, as for any function, so ``mkdocs build --strict``
fails on it.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import griffe

FACADE_MODULES = ("microstream.api.scan",)
"""The modules whose module-level facades are documented as functions."""

_KINDS = {
    inspect.Parameter.POSITIONAL_ONLY: griffe.ParameterKind.positional_only,
    inspect.Parameter.POSITIONAL_OR_KEYWORD: griffe.ParameterKind.positional_or_keyword,
    inspect.Parameter.VAR_POSITIONAL: griffe.ParameterKind.var_positional,
    inspect.Parameter.KEYWORD_ONLY: griffe.ParameterKind.keyword_only,
    inspect.Parameter.VAR_KEYWORD: griffe.ParameterKind.var_keyword,
}


def _annotation(value: Any) -> str | None:
    if value is inspect.Parameter.empty:
        return None
    return value if isinstance(value, str) else inspect.formatannotation(value)


class ConnectorFacades(griffe.Extension):
    """Turn each facade of :data:`FACADE_MODULES` into a documented function."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "microstream":
            return
        from microstream.api.facade import ConnectorFacade

        for path in FACADE_MODULES:
            module = pkg.get_member(path.split(".", 1)[1])
            runtime = importlib.import_module(path)
            for name, attribute in list(module.members.items()):
                facade = getattr(runtime, name, None)
                if not isinstance(facade, ConnectorFacade):
                    continue
                module.set_member(name, self._function(name, facade, attribute, loader))

    @staticmethod
    def _function(
        name: str, facade: Any, attribute: griffe.Object, loader: griffe.GriffeLoader
    ) -> griffe.Function:
        signature = inspect.signature(facade)
        parameters = griffe.Parameters(
            *(
                griffe.Parameter(
                    p.name,
                    annotation=_annotation(p.annotation),
                    kind=_KINDS[p.kind],
                    default=None if p.default is inspect.Parameter.empty else repr(p.default),
                )
                for p in signature.parameters.values()
            )
        )
        function = griffe.Function(
            name,
            lineno=attribute.lineno,
            endlineno=attribute.endlineno,
            parameters=parameters,
            returns=_annotation(signature.return_annotation),
        )
        function.docstring = griffe.Docstring(
            inspect.cleandoc(facade.__doc__),
            lineno=attribute.lineno,
            parent=function,
            parser=loader.docstring_parser,
            parser_options=loader.docstring_options,
        )
        return function
