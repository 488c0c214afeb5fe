"""``microstream reset``: deletes a stopped query's checkpoint, never a running one's, never output;
and every message that tells the user to run a command names one that exists."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import microstream as ms
from microstream.cli.main import _parser
from tests.test_cli import cli

pytestmark = pytest.mark.integration


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def run_once(tmp_path: Path, output: str = "out") -> ms.StreamingQuery:
    """A query over three files into a parquet sink, run to the end, checkpoint ``cp``."""
    source = tmp_path / "in"
    source.mkdir(exist_ok=True)
    for i in range(3):
        pl.DataFrame({"x": [i]}).write_parquet(source / f"{i}.parquet")
    query = (
        ms.scan_files(str(source), format="parquet", max_files_per_trigger=1)
        .with_columns(y=pl.col("x") * 10)
        .sink_parquet(
            str(tmp_path / output),
            checkpoint=str(tmp_path / "cp"),
            trigger=ms.Trigger.available_now(),
        )
    )
    query.await_termination(timeout=60)
    assert query.exception() is None
    return query


def test_reset_deletes_the_checkpoint_and_never_the_output(tmp_path: Path) -> None:
    run_once(tmp_path)
    output_before = files_under(tmp_path / "out")
    assert output_before and files_under(tmp_path / "cp")
    done = cli("reset", "cp", "--yes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "offsets/ (3 files)" in done.stdout and "commits/ (3 files)" in done.stdout
    assert "not touched: the query's output" in done.stdout
    assert not (tmp_path / "cp").exists()
    assert files_under(tmp_path / "out") == output_before
    # the query starts over (into a new output, as the message says): batch 0, every file
    again = run_once(tmp_path, "out2")
    assert [p.batch_id for p in again.recent_progress] == [0, 1, 2]


def test_reset_refuses_while_a_query_holds_the_checkpoint(tmp_path: Path) -> None:
    stream = ms.MemoryStream({"x": pl.Int64})
    query = stream.lazy().sink_parquet(str(tmp_path / "out"), checkpoint=str(tmp_path / "cp"))
    try:
        stream.add_data(pl.DataFrame({"x": [1]}))
        query.process_all_available(timeout=30)
        before = files_under(tmp_path / "cp")
        refused = cli("reset", "cp", "--yes", cwd=tmp_path)
        assert refused.returncode == 1
        assert f"in use by run {query.run_id} (pid {__import__('os').getpid()}" in refused.stderr
        assert files_under(tmp_path / "cp") == before
    finally:
        query.stop()


def test_reset_asks_and_without_a_terminal_needs_yes(tmp_path: Path) -> None:
    run_once(tmp_path)
    before = files_under(tmp_path / "cp")
    no_tty = cli("reset", "cp", cwd=tmp_path)  # stdin is not a terminal here
    assert no_tty.returncode == 1
    assert "pass --yes to delete" in no_tty.stderr
    assert files_under(tmp_path / "cp") == before
    # no lock is left behind by a declined reset: the query can start again
    assert not (tmp_path / "cp" / "lock.json").exists()


def test_reset_answered_no_and_yes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from microstream.cli.main import main

    run_once(tmp_path)
    before = files_under(tmp_path / "cp")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert main(["reset", str(tmp_path / "cp")]) == 1
    assert files_under(tmp_path / "cp") == before
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert main(["reset", str(tmp_path / "cp")]) == 0
    assert not (tmp_path / "cp").exists()


def test_reset_of_nothing_is_an_error(tmp_path: Path) -> None:
    done = cli("reset", "nowhere", "--yes", cwd=tmp_path)
    assert done.returncode == 1
    assert "there is no checkpoint at" in done.stderr and "nowhere" in done.stderr


# -- messages name commands that exist --------------------------------------------------------

# ``microstream <word>`` followed by what a command line has next: an option, an
# argument placeholder, a path, an f-string field, the end of a literal or a backtick.
_COMMAND = re.compile(r"microstream ([a-z][a-z-]*)(?=``|`|'|\s*$|\s+(?:-|[A-Z]{2,}|\{|[\w.]*/))")
_OPTION = re.compile(r"\s(--[a-z][a-z-]*)")


def _mentions() -> list[tuple[str, str, str]]:
    """(file:line, command, the literal) for each command the code's strings name."""
    root = Path(__file__).resolve().parents[1]
    found = []
    for path in sorted([*root.glob("microstream/**/*.py"), *root.glob("connectors/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in _COMMAND.finditer(node.value):
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    found.append((where, match.group(1), node.value[match.start() :]))
    return found


def test_every_command_a_message_names_exists() -> None:
    parser = _parser()
    commands = next(
        a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)
    ).choices
    mentions = _mentions()
    # the scan finds the commands messages and docstrings name today (it can fail)
    assert {c for _, c, _ in mentions} >= {"output", "replay", "run", "state", "status"}
    wrong = []
    for where, command, text in mentions:
        if command not in commands:
            wrong.append(f"{where}: microstream {command} does not exist")
            continue
        line = text.split("\n", 1)[0]
        options = {o for a in commands[command]._actions for o in a.option_strings}
        wrong += [
            f"{where}: microstream {command} has no option {opt}"
            for opt in _OPTION.findall(line)
            if opt not in options
        ]
    assert not wrong, "\n".join(wrong)


def test_the_command_scan_catches_a_missing_command() -> None:
    assert _COMMAND.findall("run: microstream vacuum CHECKPOINT") == ["vacuum"]
    assert _COMMAND.findall("``microstream reset``") == ["reset"]
    assert _COMMAND.findall("the microstream checkpoint (no metadata.json)") == []
    assert _COMMAND.findall("microstream raises on purpose.") == []


def test_cli_module_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "microstream.cli", "reset", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and "--yes" in done.stdout


def test_every_install_command_names_an_extra_that_exists() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = set(
        tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    named: list[tuple[str, str]] = []
    for path in sorted([*root.glob("microstream/**/*.py"), *root.glob("connectors/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for group in re.findall(r"pip install '?microstream\[([\w,-]+)\]", node.value):
                    named += [
                        (f"{path.relative_to(root)}:{node.lineno}", e) for e in group.split(",")
                    ]
    assert {e for _, e in named} >= {"kafka", "s3"}  # the scan finds today's messages
    missing = [f"{where}: no extra {extra!r}" for where, extra in named if extra not in extras]
    assert not missing, "\n".join(missing)
