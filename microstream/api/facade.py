"""Public functions whose options a connector declares: the ``scan_*`` facades and friends.

``ms.scan_files(path, format=..., ...)`` is ``StreamFrame.from_source(FileSourceSpec(path,
format=..., ...))``. Its options are declared once, by the connector: the spec's
``__init__`` (names, types, defaults) and the "Parameters" section of the spec's numpy
docstring. A :class:`ConnectorFacade` shows them as its own:

- ``inspect.signature(ms.scan_files)`` (so ``help()``, IPython and Jupyter completion)
  is the spec's signature returning ``StreamFrame``;
- its ``__doc__`` is the facade's own text with the spec's "Parameters" section
  inserted before its first section (``Examples``...);
- type checkers see the spec's parameters too, through the typed registry handle
  (:class:`microstream.registry.Connector`) the facade is built from.

A new option of the spec therefore appears in the facade with no other edit. The
connector is loaded through the registry only when the facade is called or
inspected, so ``import microstream`` imports no connector.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from microstream.api.frame import StreamFrame

if TYPE_CHECKING:
    from microstream.protocols import SourceSpec
    from microstream.registry import Connector

__all__ = ["ConnectorFacade", "function_facade", "parameters_section", "source_facade"]

P = ParamSpec("P")
R = TypeVar("R")

_SECTION = re.compile(r"^(?P<title>[A-Z][A-Za-z ]*)\n-{3,}$", re.MULTILINE)


def parameters_section(doc: str | None) -> str:
    """The body of the "Parameters" section of a numpy docstring ('' if it has none).

    Examples
    --------
    >>> def f(x, y):
    ...     '''Add.
    ...
    ...     Parameters
    ...     ----------
    ...     x
    ...         One.
    ...     y
    ...         Two.
    ...
    ...     Returns
    ...     -------
    ...     int
    ...     '''
    >>> print(parameters_section(f.__doc__))
    x
        One.
    y
        Two.
    """
    text = inspect.cleandoc(doc or "")
    sections = list(_SECTION.finditer(text))
    for i, section in enumerate(sections):
        if section.group("title") == "Parameters":
            end = sections[i + 1].start() if i + 1 < len(sections) else len(text)
            return text[section.end() : end].strip("\n").rstrip()
    return ""


# A public function standing for a registered connector object, with its options.
#
# Calling it calls the connector object (a spec class, a function) with the same
# arguments and hands the result to ``finish`` (for a source spec: make it a
# stream). Its signature and docstring are computed from the connector object
# when asked for (see the module docstring).
#
# It is a callable object rather than a function so that ``__signature__`` and
# ``__doc__`` can be computed when asked for. It has a ``__get__`` (returning
# itself) so that ``inspect.isroutine`` is true for it: that is what makes
# ``help()`` print it as a function with its signature, and doctest collect its
# examples.
# (This is a comment, not a docstring: the class's ``__doc__`` is the computed property.)
class ConnectorFacade(Generic[P, R]):
    def __init__(
        self,
        connector: Connector[Callable[P, Any]],
        *,
        name: str,
        module: str,
        doc: str,
        finish: Callable[[Any], R],
        returns: str | None,
    ) -> None:
        self._connector = connector
        self._finish = finish
        self._doc = inspect.cleandoc(doc)
        self._returns = returns
        self.__name__ = self.__qualname__ = name
        self.__module__ = module

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        target = self._connector.load()
        try:
            inspect.signature(target).bind(*args, **kwargs)
        except TypeError as exc:  # name the function the user called, not the spec
            msg = f"{self.__name__}(): {exc}"
            raise TypeError(msg) from None
        return self._finish(target(*args, **kwargs))

    def __get__(self, instance: object, owner: type | None = None) -> ConnectorFacade[P, R]:
        return self

    @property
    def __signature__(self) -> inspect.Signature:
        signature = inspect.signature(self._connector.load())
        if self._returns is None:
            return signature
        return signature.replace(return_annotation=self._returns)

    @property
    def __doc__(self) -> str:  # type: ignore[override]  # computed: the point of the class
        parameters = parameters_section(self._connector.load().__doc__)
        block = f"Parameters\n----------\n{parameters}\n\n" if parameters else ""
        first = _SECTION.search(self._doc)
        if first is None:
            return f"{self._doc}\n\n{block}".rstrip() + "\n"
        at = first.start()
        return self._doc[:at] + block + self._doc[at:]

    def __repr__(self) -> str:
        return f"<function {self.__module__}.{self.__name__}>"


def source_facade(
    connector: Connector[Callable[P, SourceSpec]], *, name: str, module: str, doc: str
) -> ConnectorFacade[P, StreamFrame]:
    """A ``scan_*`` function: the source spec of ``connector``, as a stream.

    Examples
    --------
    >>> import inspect
    >>> from microstream.registry import RATE
    >>> scan = source_facade(RATE, name="scan_rate", module=__name__, doc="Rows at a rate.")
    >>> print(inspect.signature(scan))  # doctest: +NORMALIZE_WHITESPACE
    (rows_per_second: 'int', *, num_partitions: 'int' = 1,
     start_timestamp: 'datetime | None' = None,
     max_rows_per_trigger: 'int | None' = None) -> 'StreamFrame'
    >>> scan(10).columns
    ['timestamp', 'value']
    """
    return ConnectorFacade(
        connector,
        name=name,
        module=module,
        doc=doc,
        finish=StreamFrame.from_source,
        returns="StreamFrame",
    )


def function_facade(
    connector: Connector[Callable[P, R]], *, name: str, module: str, doc: str
) -> ConnectorFacade[P, R]:
    """A public function that calls the function ``connector`` stands for.

    Examples
    --------
    >>> from microstream.registry import READ_FILE_SINK
    >>> read = function_facade(READ_FILE_SINK, name="read", module=__name__, doc="Read.")
    >>> "storage_options" in read.__doc__
    True
    """
    return ConnectorFacade(
        connector, name=name, module=module, doc=doc, finish=_unchanged, returns=None
    )


def _unchanged(value: R) -> R:
    return value
