"""Output piped into a file or a log keeps commands on one line and tables' numbers whole."""
from __future__ import annotations

import io

from rich.table import Table

from search.consoles import PIPED_WIDTH, make_console


def _printed(console, *objects) -> list[str]:
    for obj in objects:
        console.print(obj)
    return console.file.getvalue().splitlines()


def test_piped_output_keeps_a_long_command_on_one_line(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    command = "next: msa-search export " + "/runs/a-long-experiment-name" * 6 + " --out best.yaml"
    lines = _printed(make_console(file=io.StringIO()), command)
    assert lines == [command]  # rich's 80-column default would have broken it in three


def test_piped_table_of_ten_metrics_is_not_folded(monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    table = Table()
    for name in ["entry", "seeds", *(f"metric_{i}" for i in range(8))]:
        table.add_column(name)
    table.add_row("group", "1, 2", *["12.3456 ± 0.0119"] * 8)
    lines = _printed(make_console(file=io.StringIO()), table)
    assert len(lines) == 5  # top rule, header, rule, one row, bottom rule
    assert lines[3].count("12.3456 ± 0.0119") == 8
    assert max(map(len, lines)) <= PIPED_WIDTH


def test_columns_set_by_the_user_still_wins(monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")
    console = make_console(file=io.StringIO())
    assert console.width == 60
