"""The papers' table (search/protocol.py) as Markdown, CSV, a small HTML page, or a rich table
for the console. Markdown, HTML and the console show mean ± std per row and each run's values
below; the CSV holds the rows' raw means and standard deviations (fractions, not %)."""
from __future__ import annotations

import html
import math
from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from data_pipeline.atomic import atomic_file

from .config import ConfigError
from .protocol import REFERENCE_CHECKPOINTS, ProtocolTable, RunScore

FORMATS = (".md", ".csv", ".html")
UNSCALED = ("mae", "corr")  # shown as they are; accuracies and F1 in %, as the papers print them


def fmt(metric: str, value: float) -> str:
    if value is None or math.isnan(value):
        return "nan"
    return f"{value:.4f}" if metric in UNSCALED else f"{100 * value:.2f}"


def _cell(metric: str, mean: float, std: float) -> str:
    return fmt(metric, mean) if math.isnan(std) else f"{fmt(metric, mean)} ± {fmt(metric, std)}"


def _epochs(run: RunScore) -> str:
    """The chosen epoch, or (reference-lnln) the epoch of each checkpoint, named by its metric."""
    if not run.epochs:
        return "none (diverged)"
    if len(set(run.epochs.values())) == 1:
        return str(next(iter(run.epochs.values())))
    return ", ".join(f"{m} {e}" for m, e in run.epochs.items() if m in REFERENCE_CHECKPOINTS)


def summary_rows(table: ProtocolTable) -> tuple[list[str], list[list[str]]]:
    header = ["entry", "seeds", *table.metrics]
    rows = [[str(r["entry"]), str(r["seeds"]), *(_cell(m, r[m], r[f"{m}_std"]) for m in table.metrics)]
            for _, r in table.summary().iterrows()]
    return header, rows


def run_rows(table: ProtocolTable) -> tuple[list[str], list[list[str]]]:
    header = ["entry", "run", "seed", "epoch", *table.metrics]
    rows = [[r.entry, r.run, str(r.seed), _epochs(r), *(fmt(m, r.values[m]) for m in table.metrics)]
            for r in table.runs]
    return header, rows


def _intro(table: ProtocolTable) -> list[str]:
    return [f"Source: {table.source} ({table.kind}).", f"Epoch: {table.criterion}.", *table.notes]


def to_markdown(table: ProtocolTable) -> str:
    def md(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                *("| " + " | ".join(row) + " |" for row in rows)]

    return "\n".join([f"# {table.title}", "", *(f"- {line}" for line in _intro(table)), "",
                      *md(*summary_rows(table)), "", "## Per run", "", *md(*run_rows(table)), ""])


def to_csv(table: ProtocolTable) -> str:
    summary = table.summary()
    summary.insert(0, "protocol", table.protocol)
    summary["criterion"] = table.criterion
    return summary.to_csv(index=False)


def to_html(table: ProtocolTable) -> str:
    def grid(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}td:first-child,th:first-child"
             "{text-align:left}")
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in _intro(table))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(table.title)}</title>'
            f"<style>{style}</style></head><body>\n<h1>{html.escape(table.title)}</h1>\n<ul>{notes}</ul>\n"
            f"{grid(*summary_rows(table))}\n<h2>Per run</h2>\n{grid(*run_rows(table))}\n</body></html>\n")


def console_view(table: ProtocolTable) -> Group:
    def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
        out = Table(title=title, title_justify="left")
        for i, name in enumerate(header):
            out.add_column(name, justify="left" if i < 2 else "right", overflow="fold")  # narrow: wrap, never cut
        for row in rows:
            out.add_row(*row)
        return out

    return Group(Text(table.title, style="bold"), *(Text(line) for line in _intro(table)),
                 rich_table("mean ± std over runs", *summary_rows(table)), rich_table("per run", *run_rows(table)))


def write_table(table: ProtocolTable, out: str | Path) -> Path:
    """Write `table` to `out` in the format its extension names (.md, .csv, .html)."""
    path = Path(out)
    render = {".md": to_markdown, ".csv": to_csv, ".html": to_html}.get(path.suffix.lower())
    if render is None:
        raise ConfigError(f"--out {out}: the table is written as {', '.join(FORMATS)} (by the file's extension)")
    with atomic_file(path, force=True) as tmp:  # like the HTML report: replacing the last one is the point
        tmp.write_text(render(table), encoding="utf-8")
    return path
