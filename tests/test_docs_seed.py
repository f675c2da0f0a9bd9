"""docs/SEED.md (the notebook's prompt file run through promptshift) names what the code
has: every command line parses against the CLI, every figure id is a report figure, every
table is one metrics writes. Its columns are checked against real tables in
tests/test_notebook_example.py."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import REPO

SEED = REPO / "docs" / "SEED.md"


def _seed() -> str:
    return SEED.read_text(encoding="utf-8")


FILE_SUFFIXES = {"csv", "json", "html", "png", "svg"}


def outputs_table() -> list[tuple[str, str, str]]:
    """(notebook output, where promptshift gives it, definition differences) per row of
    SEED.md's table of the notebook's outputs."""
    text = _seed()
    section = text[text.index("| notebook output | promptshift |"):]
    section = section[: section.index("\n\n")]
    rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in section.splitlines()[2:]]
    assert rows and all(len(r) == 3 for r in rows), [r for r in rows if len(r) != 3]
    return [tuple(r) for r in rows]


def named_tables_and_columns(cell: str) -> tuple[set[str], set[tuple[str, str]]]:
    """`table.parquet` and `table.column` names in one cell (files like `summary.json` left out)."""
    refs = re.findall(r"`(\w+)\.(\w+)`", cell)
    tables = {t for t, c in refs if c == "parquet"}
    columns = {(t, c) for t, c in refs if c != "parquet" and c not in FILE_SUFFIXES}
    return tables | {t for t, _ in columns}, columns


def _command_lines() -> list[list[str]]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", _seed(), flags=re.DOTALL):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                lines.append(shlex.split(line))
    return lines


def test_every_command_in_seed_parses_against_the_cli():
    import click
    import typer

    from promptshift.cli import app

    cli = typer.main.get_command(app)
    lines = _command_lines()
    assert {a[1] for a in lines} >= {"plan", "run", "extract", "causal", "metrics", "report"}
    for argv in lines:
        assert argv[0] == "promptshift", argv
        sub = cli.commands[argv[1]]
        try:
            sub.make_context(argv[1], list(argv[2:]))  # unknown options, missing ones, bad values raise
        except click.exceptions.Exit:  # --help only
            pass
    # the options the text names exist on the commands it names
    for cmd in ("plan", "extract", "causal", "run"):
        assert "--baseline" in {o for p in cli.commands[cmd].params for o in p.opts}, cmd
    assert "--recent-k" in {o for p in cli.commands["metrics"].params for o in p.opts}


def test_seed_names_only_figures_and_tables_that_exist():
    from promptshift.metrics import CAUSAL_TABLES, PLACEMENT_TABLES, TABLES
    from promptshift.report import FIGURE_IDS

    text = _seed()
    figs = set(re.findall(r"`(fig-[a-z-]+)`", text))
    assert figs and figs <= set(FIGURE_IDS), figs - set(FIGURE_IDS)
    tables = set(re.findall(r"`(\w+)\.parquet`", text))
    for _, where, _ in outputs_table():
        tables |= named_tables_and_columns(where)[0]
    known = set(TABLES) | set(CAUSAL_TABLES) | set(PLACEMENT_TABLES)
    assert tables and tables <= known, tables - known


@pytest.mark.parametrize("path", ["examples/notebook_prompts.json", "tests/metrics/test_notebook_reference.py"])
def test_seed_links_exist(path):
    assert path in _seed() and (REPO / path).is_file()
