"""Row patterns of ``match_recognize``: parse ``"A B+ C"``, compile, find the preferred match.

The grammar is SQL:2016's row pattern (the part Flink's and Oracle's users write):

- a variable is an identifier (``A``, ``fail``, ``Big_1``); concatenation is juxtaposition;
- quantifiers ``*``, ``+``, ``?``, ``{n}``, ``{n,}``, ``{n,m}``, ``{,m}``, each greedy, or
  reluctant with a trailing ``?`` (``+?``, ``{2,4}?``);
- alternation ``|`` (lowest precedence) and grouping ``( )``.

A pattern compiles to a small program (consume a row as a variable, split, jump,
match) run by a backtracking matcher that explores the ways to map rows to
variables in SQL's *preference order*: a greedy quantifier prefers one more
iteration, a reluctant one prefers one fewer, an alternation prefers its left
branch. The first complete mapping found is the match, as in SQL:2016 and Flink.

On a stream the rows after the ones known so far have not arrived yet. When a
mapping that is preferred to every mapping found so far needs a row that has not
arrived (and could still arrive), the answer is *undecided*: the matcher says so
instead of committing to a less preferred match that more rows could overturn.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from microstream.exceptions import PlanError

__all__ = [
    "NEED_MORE",
    "NO_MATCH",
    "Alternation",
    "Concatenation",
    "Found",
    "PatternNode",
    "Program",
    "Quantified",
    "Variable",
    "compile_pattern",
    "parse_pattern",
]

MAX_PROGRAM_SIZE: Final = 10_000
"""Counted quantifiers are unrolled; a pattern whose program would be larger is refused."""


@dataclass(frozen=True)
class Variable:
    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Concatenation:
    items: tuple[PatternNode, ...]

    def __str__(self) -> str:
        return " ".join(_grouped(item, (Alternation,)) for item in self.items)


@dataclass(frozen=True)
class Alternation:
    options: tuple[PatternNode, ...]

    def __str__(self) -> str:
        return " | ".join(str(option) for option in self.options)


@dataclass(frozen=True)
class Quantified:
    node: PatternNode
    low: int
    high: int | None
    """None: unbounded."""
    greedy: bool = True

    def __str__(self) -> str:
        inner = _grouped(self.node, (Alternation, Concatenation, Quantified))
        low, high = self.low, self.high
        if (low, high) == (0, None):
            mark = "*"
        elif (low, high) == (1, None):
            mark = "+"
        elif (low, high) == (0, 1):
            mark = "?"
        elif high is None:
            mark = f"{{{low},}}"
        elif low == high:
            mark = f"{{{low}}}"
        else:
            mark = f"{{{low},{high}}}"
        return inner + mark + ("" if self.greedy else "?")


PatternNode = Variable | Concatenation | Alternation | Quantified


def _grouped(node: PatternNode, kinds: tuple[type, ...]) -> str:
    return f"({node})" if isinstance(node, kinds) else str(node)


# -- parsing ------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<count>\{\s*\d*\s*(?:,\s*\d*\s*)?\})"
    r"|(?P<op>[()|*+?])|(?P<bad>\S))"
)


def parse_pattern(text: str) -> PatternNode:
    """Parse a row pattern.

    Parameters
    ----------
    text
        The pattern, as in SQL's ``PATTERN (...)`` clause without the outer parentheses.

    Returns
    -------
    PatternNode
        The pattern's tree; ``str()`` of it is the pattern in a normal form.

    Raises
    ------
    PlanError
        A construct outside the grammar (``^``, ``$``, ``PERMUTE``, exclusion ``{- -}``),
        unbalanced parentheses, a quantifier with nothing to apply to, ``{n,m}`` with
        ``n > m``; the message gives the position.

    Examples
    --------
    >>> str(parse_pattern("A  B+? (C | D){2,3}"))
    'A B+? (C | D){2,3}'
    >>> parse_pattern("A B) C")
    Traceback (most recent call last):
    ...
    microstream.exceptions.PlanError: pattern 'A B) C': unexpected ')' at position 3
    """
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        for found in _TOKEN.finditer(text):
            kind = found.lastgroup
            if kind is None:  # trailing spaces
                continue
            self.tokens.append((kind, found.group(kind), found.start(kind)))
        self.at = 0

    def fail(self, what: str, position: int) -> PlanError:
        return PlanError(f"pattern {self.text!r}: {what} at position {position}")

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def parse(self) -> PatternNode:
        for kind, value, position in self.tokens:
            if kind == "bad":
                hint = {
                    "^": "anchors ^ and $ are not supported (a stream has no partition start)",
                    "$": "anchors ^ and $ are not supported (a stream has no partition end)",
                    "{": "exclusion {- -} is not supported (ONE ROW PER MATCH has nothing to exclude)",
                    ",": "a comma belongs only inside {n,m}; PERMUTE is not supported",
                }.get(value, f"unexpected {value!r}")
                raise self.fail(hint, position)
            if kind == "name" and value.upper() == "PERMUTE":
                raise self.fail(
                    "PERMUTE is not supported; write the orders as alternatives", position
                )
        if not self.tokens:
            raise PlanError("the pattern is empty; give one or more variables, e.g. 'A B+ C'")
        node = self.alternation()
        token = self.peek()
        if token is not None:
            raise self.fail(f"unexpected {token[1]!r}", token[2])
        return node

    def alternation(self) -> PatternNode:
        options = [self.concatenation()]
        while (token := self.peek()) is not None and token[1] == "|":
            self.at += 1
            options.append(self.concatenation())
        return options[0] if len(options) == 1 else Alternation(tuple(options))

    def concatenation(self) -> PatternNode:
        items: list[PatternNode] = []
        while (token := self.peek()) is not None and (token[0] == "name" or token[1] == "("):
            items.append(self.quantified())
        if not items:
            token = self.peek()
            where = token[2] if token is not None else len(self.text)
            what = f"unexpected {token[1]!r}" if token is not None else "a variable is missing"
            raise self.fail(what, where)
        return items[0] if len(items) == 1 else Concatenation(tuple(items))

    def quantified(self) -> PatternNode:
        kind, value, position = self.tokens[self.at]
        self.at += 1
        node: PatternNode
        if kind == "name":
            node = Variable(value)
        else:
            node = self.alternation()
            token = self.peek()
            if token is None or token[1] != ")":
                raise self.fail("'(' is not closed", position)
            self.at += 1
        quantifiers = 0  # applied here: a group's own quantifier may be quantified again
        while (token := self.peek()) is not None and (
            token[0] == "count" or token[1] in ("*", "+", "?")
        ):
            if (
                quantifiers == 1
                and isinstance(node, Quantified)
                and node.greedy
                and token[1] == "?"
            ):
                node = Quantified(node.node, node.low, node.high, greedy=False)
                self.at += 1
                quantifiers = 2
                continue
            if quantifiers:
                raise self.fail(
                    f"a quantifier {token[1]!r} after a quantifier; group first: (A+)*", token[2]
                )
            node = self.quantifier(node, token)
            self.at += 1
            quantifiers = 1
        return node

    def quantifier(self, node: PatternNode, token: tuple[str, str, int]) -> Quantified:
        _, value, position = token
        if value == "*":
            return Quantified(node, 0, None)
        if value == "+":
            return Quantified(node, 1, None)
        if value == "?":
            return Quantified(node, 0, 1)
        body = value[1:-1].replace(" ", "")
        if "," not in body:
            if not body:
                raise self.fail("'{}' needs a count, as in {3}", position)
            return Quantified(node, int(body), int(body))
        low_text, high_text = body.split(",")
        low = int(low_text) if low_text else 0
        high = int(high_text) if high_text else None
        if high is not None and high < low:
            raise self.fail(f"{value}: the lower bound is above the upper bound", position)
        if high == 0:
            raise self.fail(f"{value} matches nothing; remove it", position)
        return Quantified(node, low, high)


# -- analysis -----------------------------------------------------------------------------


def variables(node: PatternNode) -> tuple[str, ...]:
    """The pattern's variables in order of first appearance.

    Examples
    --------
    >>> variables(parse_pattern("A (B | A)+ C"))
    ('A', 'B', 'C')
    """
    found: dict[str, None] = {}

    def walk(item: PatternNode) -> None:
        if isinstance(item, Variable):
            found.setdefault(item.name)
        elif isinstance(item, Concatenation):
            for child in item.items:
                walk(child)
        elif isinstance(item, Alternation):
            for child in item.options:
                walk(child)
        else:
            walk(item.node)

    walk(node)
    return tuple(found)


def min_length(node: PatternNode) -> int:
    """The fewest rows a match of ``node`` spans.

    Examples
    --------
    >>> min_length(parse_pattern("A{2,} (B | C D)? E"))
    3
    """
    if isinstance(node, Variable):
        return 1
    if isinstance(node, Concatenation):
        return sum(min_length(item) for item in node.items)
    if isinstance(node, Alternation):
        return min(min_length(option) for option in node.options)
    return node.low * min_length(node.node)


def check_pattern(node: PatternNode, text: str) -> None:
    """Refuse patterns SQL semantics would make ambiguous here: a pattern that can
    match no rows (ONE ROW PER MATCH would emit empty matches), and an unbounded
    quantifier over a group that can match no rows (its iterations could be empty
    forever)."""
    if min_length(node) == 0:
        msg = (
            f"pattern {text!r} can match no rows at all (every part is optional), so every "
            "row would start an empty match; make at least one variable mandatory, e.g. 'A+' "
            "instead of 'A*'"
        )
        raise PlanError(msg)

    def walk(item: PatternNode) -> None:
        if isinstance(item, Quantified):
            if item.high is None and min_length(item.node) == 0:
                msg = (
                    f"pattern {text!r}: ({item.node}) can match no rows, so {item} could "
                    "repeat an empty match without end; quantify the variables inside instead, "
                    "e.g. (A | B)* rather than (A? B?)*"
                )
                raise PlanError(msg)
            walk(item.node)
        elif isinstance(item, Concatenation):
            for child in item.items:
                walk(child)
        elif isinstance(item, Alternation):
            for child in item.options:
                walk(child)

    walk(node)


# -- compiling and matching -----------------------------------------------------------------

_CONSUME, _SPLIT, _JUMP, _MATCH = 0, 1, 2, 3


@dataclass(frozen=True)
class Found:
    """A match: rows ``start`` to ``end - 1``, ``labels[i]`` the variable of row ``start + i``
    (an index into :attr:`Program.variables`)."""

    start: int
    end: int
    labels: tuple[int, ...]


NEED_MORE: Final = "need more rows"
"""The preferred mapping needs a row that has not arrived: undecided."""
NO_MATCH: Final = "no match"
"""No match starts at this row, whatever rows come later."""

Outcome = Found | str
Accept = Callable[[int, int, list[int]], bool]
"""``accept(variable, row, labels)``: may ``row`` be ``variable``, given the labels of the
rows from the match's start up to and including ``row`` (the last label is ``variable``)."""


@dataclass(frozen=True)
class Program:
    """A compiled pattern: instructions ``(op, a, b)`` run by :meth:`match`."""

    code: tuple[tuple[int, int, int], ...]
    variables: tuple[str, ...]

    def match(
        self,
        start: int,
        available: int,
        accept: Accept,
        *,
        fits: Callable[[int], bool],
        more_may_come: bool,
        memo: bool,
    ) -> Outcome:
        """The preferred match starting at row ``start``, :data:`NO_MATCH`, or :data:`NEED_MORE`.

        Parameters
        ----------
        start
            The row the match starts at.
        available
            How many rows are known: rows ``available`` and beyond have not arrived.
        accept
            Whether a row may be mapped to a variable (the DEFINE conditions).
        fits
            Whether a row is within the match's time bound (``WITHIN``) from ``start``.
        more_may_come
            Whether rows beyond ``available`` that fit the time bound may still arrive.
        memo
            The conditions depend on the row alone (not on the rows mapped before it), so
            a (step, row) pair that failed once fails again: remember it.
        """
        code = self.code
        labels: list[int] = []
        stack: list[tuple[int, int]] = [(0, start)]
        failed: set[tuple[int, int]] = set()
        while stack:
            pc, pos = stack.pop()
            del labels[pos - start :]
            while True:
                if memo:
                    if (pc, pos) in failed:
                        break
                    failed.add((pc, pos))
                op, a, b = code[pc]
                if op == _CONSUME:
                    if pos >= available:
                        if more_may_come:
                            return NEED_MORE
                        break
                    if not fits(pos):
                        break
                    labels.append(a)
                    if not accept(a, pos, labels):
                        labels.pop()
                        break
                    pc, pos = pc + 1, pos + 1
                elif op == _SPLIT:
                    stack.append((b, pos))
                    pc = a
                elif op == _JUMP:
                    pc = a
                else:
                    return Found(start, pos, tuple(labels))
        return NO_MATCH


def compile_pattern(node: PatternNode) -> Program:
    """Compile a parsed pattern (see :func:`check_pattern` for what is refused first).

    Examples
    --------
    >>> program = compile_pattern(parse_pattern("A B+"))
    >>> rows = ["a", "b", "b", "x"]
    >>> def accept(var, row, labels):
    ...     return rows[row] == program.variables[var].lower()
    >>> program.match(0, 4, accept, fits=lambda row: True, more_may_come=False, memo=True)
    Found(start=0, end=3, labels=(0, 1, 1))
    >>> program.match(0, 3, accept, fits=lambda row: True, more_may_come=True, memo=True)
    'need more rows'
    """
    names = variables(node)
    index = {name: i for i, name in enumerate(names)}
    code: list[list[int]] = []

    def emit(op: int, a: int = 0, b: int = 0) -> int:
        if len(code) >= MAX_PROGRAM_SIZE:
            msg = (
                f"the pattern {node} is too large once its counted quantifiers are unrolled "
                f"(over {MAX_PROGRAM_SIZE} steps); use smaller counts or + and *"
            )
            raise PlanError(msg)
        code.append([op, a, b])
        return len(code) - 1

    def optional(item: PatternNode, greedy: bool, then: Callable[[], None]) -> None:
        split = emit(_SPLIT)
        body = len(code)
        gen(item)
        then()
        end = len(code)
        code[split][1:] = [body, end] if greedy else [end, body]

    def gen(item: PatternNode) -> None:
        if isinstance(item, Variable):
            emit(_CONSUME, index[item.name])
        elif isinstance(item, Concatenation):
            for child in item.items:
                gen(child)
        elif isinstance(item, Alternation):
            jumps = []
            for option in item.options[:-1]:
                split = emit(_SPLIT)
                code[split][1] = len(code)
                gen(option)
                jumps.append(emit(_JUMP))
                code[split][2] = len(code)
            gen(item.options[-1])
            for jump in jumps:
                code[jump][1] = len(code)
        else:
            for _ in range(item.low):
                gen(item.node)
            if item.high is None:
                loop = emit(_SPLIT)
                body = len(code)
                gen(item.node)
                emit(_JUMP, loop)
                end = len(code)
                code[loop][1:] = [body, end] if item.greedy else [end, body]
            else:
                # (x (x (x)?)?)? for the optional iterations: each nested in the previous
                def nest(left: int) -> None:
                    if left:
                        optional(item.node, item.greedy, lambda: nest(left - 1))

                nest(item.high - item.low)

    gen(node)
    emit(_MATCH)
    return Program(code=tuple((op, a, b) for op, a, b in code), variables=names)
