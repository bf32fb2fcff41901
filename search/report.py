"""`msa-search report`: one self-contained HTML file of an experiment (or `train` run), the
dashboard for who has no Grafana (DESIGN.md, "Embedded defaults").

plotly.js is embedded once, in the head; every figure after it is a div and a call into it,
and nothing is fetched from the network (no CDN, no MathJax), so the file opens offline and
can be mailed. A view whose inputs are missing (a `train` run has no study) says why in one
line instead. The file is written to a temporary name and renamed: a reader (a browser, a
`--watch` loop's next render) never sees half a report. The tables come from
search/report_data.py.
"""
from __future__ import annotations

import html
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio

from data_pipeline.atomic import atomic_file

from . import report_data as data
from .objective import objective_mode
from .report_data import ReportInputs, Unavailable

BEST_COLOR = "#111111"
HEATMAP_MAX_TRIALS = 40  # rows beyond this would be unreadable; the best ones matter
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
TEMPLATE = "plotly_white"


@dataclass(frozen=True)
class Section:
    anchor: str  # the section's HTML id
    title: str
    draw: Callable[[ReportInputs], tuple[go.Figure, str]]  # the figure and its caption, or Unavailable


# --- the views, in the order a reader asks: how robust, where it breaks, how the search went, why ---

def robustness_curves(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """Metric vs intra missing rate, one line per trial, test shown first; a menu switches to valid."""
    best = inputs.best.trial_id
    fig = go.Figure()
    splits = ("test", "valid")
    trace_split = []
    for split in splits:
        curves = data.intra_curves(inputs, split)
        for trial_id, row in curves.iterrows():
            is_best = trial_id == best
            fig.add_scatter(x=list(row.index), y=list(row.values), mode="lines+markers", visible=split == "test",
                            name=f"{trial_id} (best)" if is_best else trial_id, legendgroup=trial_id,
                            opacity=1.0 if is_best else 0.6,
                            line={"width": 4 if is_best else 1.5, **({"color": BEST_COLOR} if is_best else {})},
                            hovertemplate=f"{trial_id}<br>rate %{{x}}<br>{inputs.metric} %{{y:.4f}}<extra></extra>")
            trace_split.append(split)
    title = "{metric} vs intra missing rate, {split} split"
    buttons = [{"label": split, "method": "update",
                "args": [{"visible": [s == split for s in trace_split]},
                         {"title.text": title.format(metric=inputs.metric, split=split)}]} for split in splits]
    fig.update_layout(title=title.format(metric=inputs.metric, split="test"), height=460, template=TEMPLATE,
                      xaxis_title="intra missing rate", yaxis_title=inputs.metric,
                      updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.15, "yanchor": "top"}])
    return fig, (f"Each trial at its last epoch; the thick black line is the best trial ({best}, by "
                 f"{inputs.cfg.search.objective} on valid). The menu switches between the test and valid splits. "
                 f"{data.text_missing_note(inputs.cfg)}")


def pattern_heatmap(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """Trials (best first) x every pattern of the grid on the test split."""
    table = data.pattern_table(inputs, "test")
    shown = table.iloc[:HEATMAP_MAX_TRIALS]
    held = data.held_out_patterns(inputs.cfg)
    columns = [p + ("*" if p in held else "") for p in shown.columns]
    # Red is bad whichever way the metric points (mae: lower is better).
    scale = "RdYlGn_r" if objective_mode(inputs.metric) == "min" else "RdYlGn"
    fig = go.Figure(go.Heatmap(z=shown.values, x=columns, y=list(shown.index), colorscale=scale,
                               texttemplate="%{z:.3f}", colorbar={"title": {"text": inputs.metric}},
                               hovertemplate="trial %{y}<br>%{x}<br>" + inputs.metric + " %{z:.4f}<extra></extra>"))
    fig.update_xaxes(type="category", side="top")
    fig.update_yaxes(type="category", autorange="reversed", title="trial (best first)")
    fig.update_layout(height=120 + 26 * len(shown), template=TEMPLATE, margin={"t": 50, "b": 20})
    more = f" Showing the best {HEATMAP_MAX_TRIALS} of {len(table)} trials." if len(table) > len(shown) else ""
    note = (f"* = held out of the search objective ({', '.join(held)}): never searched on, so a drop there "
            "shows the search overfit its patterns." if held else "Every pattern is in the search objective.")
    return fig, f"{inputs.metric} on the test split at each trial's last epoch. {note}{more}"


def best_so_far(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """Every trial-epoch's valid objective over time and the running best as a step line."""
    points = data.objective_over_time(inputs)
    name = inputs.cfg.search.objective
    fig = go.Figure()
    fig.add_scatter(x=points.time_s, y=points.objective, mode="markers", name="trial-epoch", opacity=0.7,
                    marker={"size": 9},
                    customdata=points[["trial_id", "epoch"]].values,
                    hovertemplate="trial %{customdata[0]} epoch %{customdata[1]}<br>%{x:.0f} s<br>"
                                  + name + " %{y:.4f}<extra></extra>")
    fig.add_scatter(x=points.time_s, y=points.best, mode="lines", line_shape="hv", name="best so far",
                    line={"color": BEST_COLOR, "width": 3})
    fig.update_layout(height=400, template=TEMPLATE, xaxis_title="seconds since the start",
                      yaxis_title=f"{name} (valid)", title=f"{name} per trial-epoch and the best so far")
    better = "higher" if inputs.cfg.search.mode == "max" else "lower"
    return fig, f"{len(points)} trial-epochs (markers; hover for trial and epoch); {better} {name} is better."


def parallel_coordinates(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """One line per trial across the searched hyperparameters, coloured by the objective."""
    table = data.varying_hparams(inputs)
    if len(table) < 2:
        raise Unavailable("one trial only: there are no hyperparameters to compare")
    if not len(table.columns):
        raise Unavailable("no hyperparameter differs between the trials")
    log_keys = data.log_scaled(inputs.layout)
    labels = _short_names(list(table.columns))
    dims = [_dimension(table[key], labels[key], key in log_keys) for key in table.columns]
    objective = [s.objective for s in inputs.scores]
    name = inputs.cfg.search.objective
    dims.append({"label": name, "values": objective})
    fig = go.Figure(go.Parcoords(dimensions=dims, labelangle=-20, labelside="top",
                                 line={"color": objective, "colorscale": "Viridis", "showscale": True,
                                       "colorbar": {"title": {"text": name}}}))
    fig.update_layout(height=480, template=TEMPLATE, margin={"t": 140, "l": 130, "r": 60})
    logs = ", ".join(labels[k] for k in table.columns if k in log_keys)
    return fig, (f"The {len(table.columns)} hyperparameters that differ between the {len(table)} trials, "
                 f"coloured by {name} (valid, last epoch). Drag along an axis to filter."
                 + (f" Log10 axes: {logs}." if logs else ""))


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of at least two parts that no other key shares."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(min(2, len(parts)), len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if sum(k.endswith(suffix) for k in keys) == 1:
                break
        names[key] = suffix
    return names


def _dimension(values, label: str, log: bool) -> dict:
    """A numeric axis (log10 for log-uniform keys) or a categorical one with its values as ticks."""
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = None
    if numbers is not None and not any(math.isnan(v) for v in numbers):
        if log and all(v > 0 for v in numbers):
            return {"label": f"log10 {label}", "values": [math.log10(v) for v in numbers]}
        return {"label": label, "values": numbers}
    categories = sorted({str(v) for v in values})
    return {"label": label, "values": [categories.index(str(v)) for v in values],
            "tickvals": list(range(len(categories))), "ticktext": categories}


def importance_bars(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """Optuna's hyperparameter importance for the study's objective."""
    importance, n = data.study_importance(inputs)
    keys = list(reversed(importance))  # plotly draws the first bar at the bottom
    fig = go.Figure(go.Bar(x=[importance[k] for k in keys], y=keys, orientation="h",
                           hovertemplate="%{y}<br>importance %{x:.3f}<extra></extra>"))
    fig.update_yaxes(type="category")
    fig.update_layout(height=120 + 28 * len(keys), template=TEMPLATE, xaxis_title="importance (sums to 1)",
                      margin={"t": 30, "l": 260})
    target = ("reaching the Pareto front of " + ", ".join(inputs.cfg.search.objectives)
              if inputs.cfg.search.objectives else inputs.cfg.search.objective)
    return fig, (f"optuna.importance.get_param_importances (PED-ANOVA, Optuna's default; deterministic) on "
                 f"the study's {n} completed trials, for {target}. Few trials give rough estimates.")


def pareto(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """The first two objectives of a multi-objective search, its Pareto front highlighted."""
    table, names = data.pareto_points(inputs)
    x, y = names[0], names[1]
    front = table[table.on_front].sort_values(x)
    rest = table[~table.on_front]
    hover = "%{text}<br>%{x:.4f}, %{y:.4f}<extra></extra>"
    fig = go.Figure()
    fig.add_scatter(x=rest[x], y=rest[y], mode="markers", name="dominated", text=list(rest.index),
                    marker={"color": "#9aa5b1", "size": 9}, hovertemplate=hover)
    fig.add_scatter(x=front[x], y=front[y], mode="lines+markers", name="Pareto front", text=list(front.index),
                    marker={"color": "#d62728", "size": 12}, line={"color": "#d62728", "dash": "dot"},
                    hovertemplate=hover)
    fig.update_layout(height=440, template=TEMPLATE, xaxis_title=f"{x} (valid)", yaxis_title=f"{y} (valid)")
    more = f" The front is over all {len(names)} objectives; the first two are drawn." if len(names) > 2 else ""
    return fig, f"{len(front)} of {len(table)} trials on the front (each at its last epoch).{more}"


def pattern_importance_map(inputs: ReportInputs) -> tuple[go.Figure, str]:
    """Which hyperparameter matters for which missing pattern (hyperparameter x pattern)."""
    table, n = data.pattern_importance(inputs)
    table = table.loc[table.mean(axis=1).sort_values(ascending=False).index]  # the most important first
    held = data.held_out_patterns(inputs.cfg)
    fig = go.Figure(go.Heatmap(z=table.values, x=[p + ("*" if p in held else "") for p in table.columns],
                               y=list(table.index), colorscale="Blues", zmin=0, texttemplate="%{z:.2f}",
                               colorbar={"title": {"text": "importance"}},
                               hovertemplate="%{y}<br>%{x}<br>importance %{z:.3f}<extra></extra>"))
    fig.update_xaxes(type="category", side="top")
    fig.update_yaxes(type="category", autorange="reversed")
    fig.update_layout(height=140 + 28 * len(table), template=TEMPLATE, margin={"t": 70, "b": 20, "l": 260})
    flat = [p for p in table.columns if table[p].isna().all()]
    return fig, (f"Importance (PED-ANOVA) of each searched hyperparameter for {inputs.metric} on each pattern "
                 f"(valid, last epoch), from an in-memory Optuna study per pattern over {n} trials; "
                 f"each column sums to 1. * = held out of the search objective."
                 + (f" Blank: every trial scored the same ({', '.join(flat)})." if flat else ""))


SECTIONS = (
    Section("robustness", "Robustness curves", robustness_curves),
    Section("patterns", "Trial × pattern", pattern_heatmap),
    Section("progress", "Best objective so far", best_so_far),
    Section("hyperparameters", "Hyperparameters (parallel coordinates)", parallel_coordinates),
    Section("importance", "Hyperparameter importance", importance_bars),
    Section("pareto", "Pareto front", pareto),
    Section("pattern-importance", "Importance per missing pattern", pattern_importance_map),
)


# --- the page ---

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1280px; padding: 0 24px 48px; color: #222; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
table.facts td { padding: 2px 14px 2px 0; vertical-align: top; } table.facts td:first-child { color: #666; }
p.caption { color: #444; margin: 4px 0 8px; } p.missing { color: #8a5a00; font-style: italic; }
nav a { margin-right: 14px; }
"""


def render_html(inputs: ReportInputs, refresh_s: float | None = None) -> str:
    """The whole page; `refresh_s` makes an open browser tab reload itself (used by --watch)."""
    from plotly.offline import get_plotlyjs

    sections = [_section_html(section, inputs) for section in SECTIONS]
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in SECTIONS)
    refresh = f'<meta http-equiv="refresh" content="{max(1, round(refresh_s))}">' if refresh_s is not None else ""
    name = html.escape(inputs.layout.root.resolve().name)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{refresh}'
            f"<title>msa-search report: {name}</title><style>{STYLE}</style>\n"
            f'<script type="text/javascript">{get_plotlyjs()}</script>\n</head><body>\n'
            f"<h1>msa-search report: {name}</h1>\n{_header_html(inputs)}\n<nav>{nav}</nav>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def _section_html(section: Section, inputs: ReportInputs) -> str:
    head = f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>'
    try:
        fig, caption = section.draw(inputs)
    except Unavailable as why:
        return f'{head}<p class="missing">Not shown: {html.escape(str(why))}</p></section>'
    div = pio.to_html(fig, full_html=False, include_plotlyjs=False, include_mathjax=False, config=PLOT_CONFIG,
                      div_id=f"figure-{section.anchor}")
    return f'{head}<p class="caption">{html.escape(caption)}</p>{div}</section>'


def _header_html(inputs: ReportInputs) -> str:
    cfg, best = inputs.cfg, inputs.best
    layout = inputs.layout
    kind = "search (msa-search tune)" if layout.is_experiment else "training run (msa-search train)"
    states = ", ".join(f"{n} {state}" for state, n in sorted(inputs.states.items()))
    epochs = inputs.results.groupby("trial_id").epoch.max() + 1
    facts = [
        ("directory", str(layout.root.resolve())),
        ("kind", kind),
        ("model", f"{cfg.model.name} on {cfg.data.preset}" + (f" ({cfg.data.path})" if cfg.data.path else "")),
        ("trials so far", f"{len(inputs.scores)} with results; "
                   + (f"study: {states or 'no trials'}" if inputs.study is not None else
                      f"Tune's state: {states} (PBT: no Optuna study)" if states else "no Optuna study")),
        ("epochs reported", f"{int(epochs.sum())} trial-epochs (train.epochs = {cfg.train.epochs})"),
        ("best trial", f"{best.trial_id} at epoch {best.epoch}: {cfg.search.objective} (valid) = {best.objective:.4f}"
                       + ("" if best.finished else " (not finished)")),
        ("objective patterns", ", ".join(cfg.search.objective_patterns)),
        ("written", datetime.now().astimezone().isoformat(timespec="seconds")),
    ]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in facts)
    return f'<table class="facts">{rows}</table>'


# --- writing ---

def _render(exp_dir: str | Path, out: str | Path | None, metric: str,
            refresh_s: float | None) -> tuple[Path, ReportInputs]:
    inputs = data.load_inputs(exp_dir, metric)
    path = Path(out) if out is not None else inputs.layout.report
    page = render_html(inputs, refresh_s)
    with atomic_file(path, force=True) as tmp:  # replacing the previous report is the point
        tmp.write_text(page, encoding="utf-8")
    return path, inputs


def write_report(exp_dir: str | Path, out: str | Path | None = None, metric: str = "f1_non0") -> Path:
    """Write the report of `exp_dir` to `out` (default: the directory's report.html)."""
    return _render(exp_dir, out, metric, None)[0]


def watch_report(exp_dir: str | Path, out: str | Path | None = None, metric: str = "f1_non0",
                 interval_s: float = 10.0, on_render: Callable[[str], None] = print,
                 max_renders: int | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
    """Re-render every `interval_s` seconds, one line to `on_render` each time, until
    `max_renders` (None: until interrupted). An experiment that has no results yet is
    waited for; any other error ends the loop."""
    renders = 0
    while max_renders is None or renders < max_renders:
        clock = datetime.now().strftime("%H:%M:%S")
        try:
            path, inputs = _render(exp_dir, out, metric, interval_s)
            n = len(inputs.scores)
            # Trials are ranked at their latest epoch (as status and export rank them), so while a
            # search runs the best can fall: say which epoch the figure is from.
            on_render(f"{clock} wrote {path} ({n} trial{'s' if n != 1 else ''}; best {inputs.best.trial_id} "
                      f"{inputs.cfg.search.objective} {inputs.best.objective:.4f} at its epoch {inputs.best.epoch})")
        except data.NoResultsYet as exc:
            on_render(f"{clock} waiting: {exc}")
        renders += 1
        if max_renders is None or renders < max_renders:
            sleep(interval_s)
