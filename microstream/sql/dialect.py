"""The Flink SQL dialect: sqlglot's parser, extended where Flink's syntax is missing.

sqlglot parses standard SQL; Flink adds four things a streaming query needs, and
this module teaches them to sqlglot's parser (no SQL is parsed by hand):

- table arguments of the window table-valued functions: ``TUMBLE(TABLE bid,
  DESCRIPTOR(date_time), INTERVAL '10' SECOND)``, ``SESSION(TABLE bid PARTITION BY
  auction, ...)`` (:class:`TableArgument`, :class:`Descriptor`);
- ``WATERMARK FOR ts AS ts - INTERVAL '4' SECOND`` in ``CREATE TABLE``
  (sqlglot's ``WatermarkColumnConstraint``, as its RisingWave dialect parses it);
- ``EXPLAIN <statement>`` (:class:`Explain`);
- ``MATCH_RECOGNIZE (...)`` after a table: sqlglot's parser reads it in the dialects
  that have it (Snowflake, Oracle); Flink adds ``WITHIN INTERVAL ...`` after
  ``PATTERN (...)`` and ``AFTER MATCH SKIP TO var`` (:class:`MatchRecognize`);
- ``CREATE TEMPORARY VIEW`` and ``INSERT INTO`` are standard and parse as they are.

:func:`parse` returns the statements of a text; a syntax error is a
:class:`~microstream.PlanError` with the line and column sqlglot reports.
"""

from __future__ import annotations

from typing import Any

from microstream.exceptions import MissingDependencyError, PlanError

try:
    from sqlglot import exp, generator, parser, tokens
    from sqlglot.dialects.dialect import Dialect
    from sqlglot.errors import ParseError, TokenError
    from sqlglot.tokens import TokenType
except ImportError as exc:  # pragma: no cover - the extra is in `dev`
    msg = "microstream's SQL needs sqlglot: pip install 'microstream[sql]'"
    raise MissingDependencyError(msg) from exc

__all__ = ["Descriptor", "Explain", "Flink", "MatchRecognize", "TableArgument", "parse"]

WINDOW_TVFS = ("TUMBLE", "HOP", "CUMULATE", "SESSION")


class TableArgument(exp.Expression):
    """``TABLE name [PARTITION BY cols]``: a table passed to a table-valued function."""

    arg_types = {"this": True, "partition_by": False}


class Descriptor(exp.Expression):
    """``DESCRIPTOR(col, ...)``: the columns a table-valued function works on."""

    arg_types = {"expressions": True}


class Explain(exp.Expression):
    """``EXPLAIN <statement>``."""

    arg_types = {"this": True}


class MatchRecognize(exp.MatchRecognize):
    """``MATCH_RECOGNIZE (...)``: sqlglot's, with Flink's ``WITHIN INTERVAL ...``.

    ``pattern`` is the text between ``PATTERN (`` and its ``)`` (the pattern grammar is
    :mod:`microstream.operators.pattern`'s), positioned at its first token; ``after`` is
    ``AFTER MATCH SKIP ...`` as text, positioned at ``AFTER``.
    """

    arg_types = {**exp.MatchRecognize.arg_types, "within": False}


class FlinkParser(parser.Parser):
    """sqlglot's parser with Flink's table arguments, DESCRIPTOR, WATERMARK and EXPLAIN."""

    # SESSION is a keyword to sqlglot; Flink calls it as a function.
    FUNC_TOKENS = {*parser.Parser.FUNC_TOKENS, TokenType.SESSION}

    FUNCTION_PARSERS = {
        **parser.Parser.FUNCTION_PARSERS,
        **{name: (lambda self, n=name: self._parse_tvf_call(n)) for name in WINDOW_TVFS},
        "DESCRIPTOR": lambda self: self.expression(
            Descriptor(expressions=self._parse_csv(self._parse_column))
        ),
    }

    CONSTRAINT_PARSERS = {
        **parser.Parser.CONSTRAINT_PARSERS,
        "WATERMARK": lambda self: self.expression(
            exp.WatermarkColumnConstraint(
                this=self._match(TokenType.FOR) and self._parse_column(),
                expression=self._match(TokenType.ALIAS) and self._parse_disjunction(),
            )
        ),
    }

    SCHEMA_UNNAMED_CONSTRAINTS = {*parser.Parser.SCHEMA_UNNAMED_CONSTRAINTS, "WATERMARK"}

    def _parse_match_recognize(self) -> exp.MatchRecognize | None:
        # sqlglot's own reads every clause but Flink's WITHIN (between PATTERN and DEFINE)
        # and SKIP TO var; this is it with those two, and with positions kept for errors.
        if not self._match(TokenType.MATCH_RECOGNIZE):
            return None
        keyword = self._prev
        self._match_l_paren()
        partition = self._parse_partition_by()
        order = self._parse_order()
        measures = (
            self._parse_csv(self._parse_match_recognize_measure)
            if self._match_text_seq("MEASURES")
            else None
        )
        rows = None
        rows_token = self._curr
        if self._match_text_seq("ONE", "ROW", "PER", "MATCH"):
            rows = exp.var("ONE ROW PER MATCH")
        elif self._match_text_seq("ALL", "ROWS", "PER", "MATCH"):
            text = "ALL ROWS PER MATCH"
            for tail in (("SHOW", "EMPTY", "MATCHES"), ("OMIT", "EMPTY", "MATCHES")):
                if self._match_text_seq(*tail):
                    text += " " + " ".join(tail)
            rows = exp.var(text)
        if rows is not None and rows_token is not None:
            rows.update_positions(rows_token)
        after = None
        after_token = self._curr
        if self._match_text_seq("AFTER", "MATCH", "SKIP"):
            if self._match_text_seq("PAST", "LAST", "ROW"):
                text = "PAST LAST ROW"
            elif self._match_text_seq("TO", "NEXT", "ROW"):
                text = "TO NEXT ROW"
            else:
                self._match_text_seq("TO")
                direction = "LAST"  # SKIP TO var is SKIP TO LAST var
                if self._match_texts(("FIRST", "LAST")):
                    direction = self._prev.text.upper()
                variable = self._advance_any()
                if variable is None:
                    self.raise_error("Expecting a pattern variable after AFTER MATCH SKIP TO")
                text = f"TO {direction} {variable.text if variable else ''}"
            after = exp.var(f"AFTER MATCH SKIP {text}")
            if after_token is not None:
                after.update_positions(after_token)
        pattern = None
        if self._match_text_seq("PATTERN"):
            self._match_l_paren()
            start = self._curr
            if start is None:
                self.raise_error("Expecting a pattern after PATTERN (")
            depth, end = 1, start
            while self._curr and depth:
                depth += {TokenType.L_PAREN: 1, TokenType.R_PAREN: -1}.get(self._curr.token_type, 0)
                end = self._prev
                self._advance()
            if depth:
                self.raise_error("Expecting ) after the pattern")
            if start is not None and end is not None:
                pattern = exp.var(self._find_sql(start, end)).update_positions(start)
        within = self._parse_interval() if self._match_text_seq("WITHIN") else None
        define = (
            self._parse_csv(self._parse_name_as_expression)
            if self._match_text_seq("DEFINE")
            else None
        )
        self._match_r_paren()
        node = MatchRecognize(
            partition_by=partition,
            order=order,
            measures=measures,
            rows=rows,
            after=after,
            pattern=pattern,
            within=within,
            define=define,
            alias=self._parse_table_alias(),
        )
        return self.expression(node.update_positions(keyword))

    def _parse_tvf_call(self, name: str) -> exp.Expr:
        # The same names are the legacy group-window functions (GROUP BY TUMBLE(ts, ...)),
        # whose first argument is a column, not TABLE t.
        token = self._prev
        args: list[exp.Expr] = []
        if self._match(TokenType.TABLE):
            table = self._parse_table_parts()
            partition = None
            if self._match(TokenType.PARTITION_BY) or self._match_text_seq("PARTITION", "BY"):
                # One key, or several in parentheses: a bare list would swallow DESCRIPTOR.
                if self._match(TokenType.L_PAREN):
                    partition = self._parse_csv(self._parse_column)
                    self._match_r_paren()
                else:
                    key = self._parse_column()
                    partition = [key] if key is not None else None
            args.append(self.expression(TableArgument(this=table, partition_by=partition)))
            if not self._match(TokenType.COMMA):
                return self._finish_call(name, args, token)
        args.extend(a for a in self._parse_csv(self._parse_lambda) if a is not None)
        return self._finish_call(name, args, token)

    def _finish_call(self, name: str, args: list[exp.Expr], token: Any) -> exp.Expr:
        call = exp.Anonymous(this=name, expressions=args)
        call.update_positions(token)
        return call

    def _parse_statement(self) -> exp.Expr | None:
        if (
            self._curr
            and self._curr.token_type == TokenType.VAR
            and self._curr.text.upper() == ("EXPLAIN")
        ):
            self._advance()
            return self.expression(Explain(this=super()._parse_statement()))
        return super()._parse_statement()


class Flink(Dialect):
    """The Flink SQL dialect microstream reads (sqlglot's default, extended)."""

    class Tokenizer(tokens.Tokenizer):
        # Flink quotes identifiers with backticks (`day`, `timestamp`); sqlglot's double
        # quotes stay identifiers too.
        IDENTIFIERS = ['"', "`"]
        # sqlglot reads EXPLAIN as an opaque command; Flink's EXPLAIN takes a query.
        KEYWORDS = {
            **{k: v for k, v in tokens.Tokenizer.KEYWORDS.items() if k != "EXPLAIN"},
            "MATCH_RECOGNIZE": TokenType.MATCH_RECOGNIZE,
        }

    Parser = FlinkParser

    class Generator(generator.Generator):
        # Error messages quote the statement's constructs back as SQL.
        TRANSFORMS = {
            **generator.Generator.TRANSFORMS,
            TableArgument: lambda self, e: (
                f"TABLE {self.sql(e, 'this')}"
                + (
                    f" PARTITION BY ({self.expressions(e, key='partition_by', flat=True)})"
                    if e.args.get("partition_by")
                    else ""
                )
            ),
            Descriptor: lambda self, e: f"DESCRIPTOR({self.expressions(e, flat=True)})",
            Explain: lambda self, e: f"EXPLAIN {self.sql(e, 'this')}",
            MatchRecognize: lambda self, e: self.matchrecognize_sql(e),
        }

        def matchrecognize_sql(self, expression: exp.MatchRecognize) -> str:
            text = super().matchrecognize_sql(expression)
            within = expression.args.get("within")
            if within is None:
                return text
            pattern = f"PATTERN ({self.sql(expression, 'pattern')})"
            return text.replace(pattern, f"{pattern} WITHIN {self.sql(within)}", 1)


def parse(text: str) -> list[exp.Expr]:
    """The statements of ``text`` (separated by ``;``), parsed in the Flink dialect.

    Examples
    --------
    >>> [type(s).__name__ for s in parse("CREATE TEMPORARY VIEW v AS SELECT 1 AS x; SELECT x FROM v")]
    ['Create', 'Select']
    >>> parse("SELECT a FROM t WHERE")
    Traceback (most recent call last):
    ...
    microstream.exceptions.PlanError: SQL syntax error at line 1, column 21: ...
    """
    try:
        statements = Flink().parse(text)
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        line, col = first.get("line", "?"), first.get("col", "?")
        description = first.get("description", str(exc))
        msg = f"SQL syntax error at line {line}, column {col}: {description}"
        raise PlanError(msg) from exc
    except TokenError as exc:
        msg = f"SQL syntax error: {exc}"
        raise PlanError(msg) from exc
    return [s for s in statements if s is not None]
