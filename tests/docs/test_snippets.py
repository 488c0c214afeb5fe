"""Every code block of the documentation site (``docs/**/*.md``) runs as a test or says
what it needs.

The rule, for authors of pages:

- A ``python`` block runs: the blocks of one page run in order in one namespace (a later
  block may use what an earlier one defined), in a fresh temporary directory.
- A block that needs a service the tests do not start here (a Kafka broker, an S3
  endpoint, a Ray cluster, a terminal) is preceded by a marker line
  ``<!-- needs: kafka -->`` (see :data:`NEEDS`); it is not run, but a ``python`` one must
  still compile.
- Display blocks (output, data, configuration: :data:`DISPLAY`) are shown only; every
  other block (``bash``, ``sql``, ...) runs or carries a marker. A fence without a
  language fails: the reader cannot tell code from output.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"

NEEDS = frozenset(
    {"kafka", "s3", "ray", "postgres", "kinesis", "rabbitmq", "pubsub", "spark", "http", "shell"}
)
"""What a marker may name: the services a block can need, ``shell`` for a terminal."""

RUN = frozenset({"python", "py"})
DISPLAY = frozenset({"text", "output", "json", "toml", "yaml", "ini", "mermaid", "csv"})

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+.-]*)")
_MARKER = re.compile(r"^\s*<!--\s*needs:\s*(?P<what>[\w, -]+?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    """The line of the opening fence (1-based)."""
    lang: str
    code: str
    needs: tuple[str, ...]
    """What its marker names; empty when the block has none."""

    def where(self) -> str:
        return f"{self.page.relative_to(DOCS)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, dedented (blocks inside admonitions and tabs are
    indented), with the marker on the last non-blank line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    previous = ""  # the last non-blank line outside a block
    i = 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.relative_to(DOCS)}:{i + 1}: a code fence is never closed")
        body = "\n".join(
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        )
        marker = _MARKER.match(previous)
        needs = tuple(w.strip() for w in marker["what"].split(",")) if marker else ()
        found.append(Block(page, i + 1, opening["lang"].lower(), textwrap.dedent(body), needs))
        previous = ""
        i = end + 1
    return found


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md")) if DOCS.is_dir() else []


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_every_block_runs_or_says_what_it_needs(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    for block in blocks(page):
        unknown = set(block.needs) - NEEDS
        assert not unknown, (
            f"{block.where()}: a marker names {sorted(unknown)}; known: {sorted(NEEDS)}"
        )
        if not block.lang:
            raise AssertionError(f"{block.where()}: a code block without a language")
        if block.lang in RUN:
            code = compile(block.code, block.where(), "exec", dont_inherit=True)
            if not block.needs:
                exec(code, namespace)  # the page's own example
        elif block.lang not in DISPLAY and not block.needs:
            raise AssertionError(
                f"{block.where()}: a {block.lang} block neither runs nor says what it needs "
                "(put <!-- needs: ... --> on the line before it)"
            )


def test_the_rule_reads_markers_and_indented_blocks(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Intro\n\n<!-- needs: kafka -->\n```python\nbroker()\n```\n\n"
        "!!! example\n    ```python\n    x = 1\n    ```\n\n```text\nout\n```\n",
        encoding="utf-8",
    )
    found = blocks(page)
    assert [(b.lang, b.code.strip(), b.needs, b.line) for b in found] == [
        ("python", "broker()", ("kafka",), 4),
        ("python", "x = 1", (), 9),
        ("text", "out", (), 13),
    ]
