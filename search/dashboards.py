"""Grafana dashboards as code (DESIGN.md, "Live metrics"): the robustness dashboard and the
provisioning files that point a Grafana at it, built with Grafana's own Python SDK
(grafana-foundation-sdk, a Grafana 11 build) rather than hand-written JSON.

The queries read the gauges of `search/live_metrics.py` (Ray prefixes them with `ray_`). Ray adds
`SessionName` and `JobId`, and a resumed driver has a new `JobId`, so every query aggregates
with `max by (<our labels>)`. A finished trial's gauges expire ~20 s after its last set, so
panels that must still show finished trials read `last_over_time(...[$__range])`.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders import barchart, common as common_b, dashboard as dash, prometheus
from grafana_foundation_sdk.builders import stat, table, timeseries, trend
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (DashboardCursorSync, DataSourceRef, DataTransformerConfig,
                                                     DynamicConfigValue, FieldColorModeId, VariableOption,
                                                     VariableRefresh, VariableSort)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from data_pipeline.atomic import OutputNotWritableError, unwritable, writing
from data_pipeline.missing import default_eval_grid
from models.metrics import SIMS_METRIC_NAMES

from .gauges import prometheus_name

DASHBOARD_UID = "msa-robustness"
DASHBOARD_TITLE = "msa-search: robustness"
DASHBOARD_FILE = "robustness.json"
DATASOURCE_UID = "msa-prometheus"  # fixed: provisioning, push and the dashboard's default agree on it
DATASOURCE_NAME = "msa-search Prometheus"
FOLDER_UID = "msa-search"
FOLDER_TITLE = "msa-search"
PROVISIONING_DIR = "provisioning"
DATASOURCE_FILE = f"{PROVISIONING_DIR}/datasources/msa-search.yaml"
PROVIDER_FILE = f"{PROVISIONING_DIR}/dashboards/msa-search.yaml"
# Ray's `ray metrics launch-prometheus` listens here; edit the provisioning file or pass
# --prometheus-url when Prometheus runs elsewhere.
DEFAULT_PROMETHEUS_URL = "http://localhost:9090"
# Where Grafana itself sees the dashboards directory (the conventional mount in its container).
DEFAULT_GRAFANA_DIR = "/var/lib/grafana/dashboards/msa-search"

# The gauges of search/live_metrics.py as Prometheus names them.
PATTERN_METRIC = prometheus_name("msa_pattern_metric")
TRIAL_OBJECTIVE = prometheus_name("msa_trial_objective")
TRIAL_EPOCH = prometheus_name("msa_trial_epoch")
BEST_OBJECTIVE = prometheus_name("msa_best_objective")
TRIALS = prometheus_name("msa_trials")
OBJECTIVE_PATTERN = prometheus_name("msa_objective_pattern")

VARIABLES = ("datasource", "experiment", "model", "trial", "split", "metric")
DEFAULT_METRIC = "f1_non0"
DEFAULT_SPLIT = "test"  # the held-out patterns mean most on the split nothing was selected on

_DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
_EXPERIMENT = 'experiment="$experiment", model=~"$model"'
_TRIALS = f'{_EXPERIMENT}, trial=~"$trial"'
_PATTERNS = f'{_TRIALS}, split="$split", metric="$metric"'
_INTRA_ONLY = ', pattern=~"intra:.*"'
_NOT_MAE, _ONLY_MAE = ', metric!="mae"', ', metric="mae"'  # with metric="$metric": one of the two is empty


def _finished(selector: str) -> str:
    """The last value in the dashboard's range: finished trials stay visible after their gauges expire."""
    return f"last_over_time({selector}[$__range])"


def _pattern_metric(extra: str = "") -> str:
    return f"{PATTERN_METRIC}{{{_PATTERNS}{extra}}}"


def _query(expr: str, ref_id: str = "A", legend: str | None = None, instant: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).ref_id(ref_id).datasource(_DS)
    if instant:
        return query.instant().format(PromQueryFormat.TABLE)
    return query.range().legend_format(legend or "__auto")


def _transform(id_val: str, **options) -> DataTransformerConfig:
    return DataTransformerConfig(id_val=id_val, options=options)


def _matrix(rows: str, columns: str) -> DataTransformerConfig:
    """One row per `rows` label, one column per `columns` label (Grafana's "grouping to matrix")."""
    return _transform("groupingToMatrix", rowField=rows, columnField=columns, valueField="Value", emptyValue="null")


def _rename(names: dict[str, str], order: dict[str, int] | None = None) -> DataTransformerConfig:
    return _transform("organize", excludeByName={"Time": True}, renameByName=names, indexByName=order or {})


def _fixed_color(color: str) -> list[DynamicConfigValue]:
    return [DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color})]


_COLOURED_CELLS = common.TableColoredBackgroundCellOptions(mode=common.TableCellBackgroundDisplayMode.GRADIENT)
_PLAIN_CELLS = [DynamicConfigValue(id_val="custom.cellOptions", value={"type": "auto"})]


def _color_scale() -> dash.FieldColor:
    # Red = bad for every metric but mae (lower is better there): the panels say so.
    return dash.FieldColor().mode(FieldColorModeId.CONTINUOUS_RD_YL_GR)


def best_so_far() -> timeseries.Panel:
    expr = f'max by (experiment, model) ({BEST_OBJECTIVE}{{{_EXPERIMENT}}})'
    return (timeseries.Panel().id(1).title("Best objective so far").datasource(_DS)
            .description("The experiment's best search objective (valid split) over time.")
            .with_target(_query(expr, legend="{{model}} best")).decimals(4)
            .show_points(common.VisibilityMode.AUTO).height(8).span(10))


def trials_by_state() -> stat.Panel:
    expr = f'sum by (state) (max by (experiment, model, state) ({_finished(f"{TRIALS}{{{_EXPERIMENT}}}")}))'
    return (stat.Panel().id(2).title("Trials by state").datasource(_DS)
            .description("The latest count of trials in each state within the dashboard's time range.")
            .with_target(_query(expr, instant=True).format(PromQueryFormat.TIME_SERIES).legend_format("{{state}}"))
            .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
            .graph_mode(common.BigValueGraphMode.NONE).color_mode(common.BigValueColorMode.NONE)
            .height(8).span(4))


def trials_table() -> table.Panel:
    objective = f'max by (trial) ({_finished(f"{TRIAL_OBJECTIVE}{{{_TRIALS}}}")})'
    epoch = f'max by (trial) ({_finished(f"{TRIAL_EPOCH}{{{_TRIALS}}}")})'
    return (table.Panel().id(3).title("Trials: latest objective and epoch").datasource(_DS)
            .description("Each trial's latest search objective (valid split) and finished epoch (0-based).")
            .with_target(_query(objective, "A", instant=True)).with_target(_query(epoch, "B", instant=True))
            .with_transformation(_transform("merge"))
            .with_transformation(_rename({"Value #A": "objective (valid)", "Value #B": "epoch"},
                                         {"trial": 0, "Value #A": 1, "Value #B": 2}))
            .sort_by([common_b.TableSortByFieldState().display_name("objective (valid)").desc(True)])
            .decimals(4).align(common.FieldTextAlignment.AUTO)
            .override_by_name("epoch", [DynamicConfigValue(id_val="decimals", value=0)])
            .height(8).span(10))


def robustness_curve() -> trend.Panel:
    # The x axis is the missing rate: label_replace turns `intra:0.3` into missing_rate="0.3",
    # the matrix makes one column per trial, and the trend panel draws them over that number.
    intra = f"max by (trial, pattern) ({_finished(_pattern_metric(_INTRA_ONLY))})"
    expr = f'label_replace({intra}, "missing_rate", "$1", "pattern", "intra:(.*)")'
    x = "missing_rate\\trial"  # the name groupingToMatrix gives its first column
    return (trend.Panel().id(4).title("Robustness curve: $metric vs missing rate ($split)").datasource(_DS)
            .description("Each trial's $metric on the intra-modality patterns (every modality loses a fraction "
                         "of its positions), one line per trial.")
            .with_target(_query(expr, instant=True))
            .with_transformation(_matrix("missing_rate", "trial"))
            .with_transformation(_transform("convertFieldType", fields={},
                                            conversions=[{"targetField": x, "destinationType": "number"}]))
            .with_transformation(_transform("sortBy", fields={}, sort=[{"field": x, "desc": False}]))
            .with_transformation(_rename({x: "missing rate"}))
            .x_field("missing rate").show_points(common.VisibilityMode.ALWAYS).decimals(3)
            .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                    .placement(common.LegendPlacement.BOTTOM).show_legend(True))
            .height(9).span(12))


def held_out_vs_searched() -> barchart.Panel:
    per_trial = f'max by (experiment, trial, pattern) ({_finished(_pattern_metric())})'
    roles = f'max by (experiment, pattern, role) ({_finished(f"{OBJECTIVE_PATTERN}{{{_EXPERIMENT}}}")})'
    expr = f'avg by (pattern, role) ({per_trial} * on (experiment, pattern) group_left (role) {roles})'
    return (barchart.Panel().id(5).title("Held-out patterns vs searched: $metric ($split)").datasource(_DS)
            .description("Mean $metric over the selected trials per pattern, coloured by whether the search "
                         "objective saw the pattern (searched) or not (held_out): a gap shows overfitting.")
            .with_target(_query(expr, instant=True))
            .with_transformation(_matrix("pattern", "role"))
            .with_transformation(_rename({"pattern\\role": "pattern"}))
            .x_field("pattern").x_tick_label_rotation(-45).decimals(3).fill_opacity(80)
            .override_by_name("searched", _fixed_color("blue"))
            .override_by_name("held_out", _fixed_color("orange"))
            .height(9).span(12))


def trial_pattern_heatmap() -> table.Panel:
    expr = f'max by (trial, pattern) ({_finished(_pattern_metric())})'
    grid = default_eval_grid()
    return (table.Panel().id(6).title("Trial × pattern: $metric ($split)").datasource(_DS)
            .description("One row per trial, one column per missing pattern (intra-modality rates, then "
                         "inter-modality drops); green is better except for mae.")
            .with_target(_query(expr, instant=True))
            .with_transformation(_matrix("trial", "pattern"))
            .with_transformation(_rename({"trial\\pattern": "trial"},
                                         {"trial\\pattern": 0, **{p: i + 1 for i, p in enumerate(grid)}}))
            .cell_options(_COLOURED_CELLS)
            .color_scheme(_color_scale()).decimals(3)
            .override_by_name("trial", _PLAIN_CELLS)
            .height(10).span(16))


def worst_pattern() -> table.Panel:
    # The worst is the lowest value, except for mae (an error): the two halves select on the
    # metric so that exactly one of them returns series.
    low = f"bottomk by (trial) (1, max by (trial, pattern) ({_finished(_pattern_metric(_NOT_MAE))}))"
    high = f"topk by (trial) (1, max by (trial, pattern) ({_finished(_pattern_metric(_ONLY_MAE))}))"
    return (table.Panel().id(7).title("Worst pattern per trial: $metric ($split)").datasource(_DS)
            .description("Each trial's worst missing pattern on $metric (the highest for mae).")
            .with_target(_query(f"{low} or {high}", instant=True))
            .with_transformation(_rename({"Value": "worst value"}, {"trial": 0, "pattern": 1, "Value": 2}))
            .sort_by([common_b.TableSortByFieldState().display_name("worst value").desc(False)])
            .cell_options(_COLOURED_CELLS)
            .color_scheme(_color_scale()).decimals(3)
            .override_by_name("trial", _PLAIN_CELLS).override_by_name("pattern", _PLAIN_CELLS)
            .height(10).span(8))


def per_trial_epochs() -> trend.Panel:
    # Ray publishes a trial's latest epoch beside its metrics; joined on time, the epoch becomes
    # the x axis. Repeated once per selected trial.
    metric = f'max by (pattern) ({_pattern_metric()})'
    epoch = f'max by (trial) ({TRIAL_EPOCH}{{{_TRIALS}}})'
    return (trend.Panel().id(8).title("Per-pattern $metric over epochs: trial $trial ($split)").datasource(_DS)
            .description("One trial's $metric on every missing pattern after each epoch (0-based).")
            .with_target(_query(metric, "A", legend="{{pattern}}"))
            .with_target(_query(epoch, "B", legend="epoch"))
            .with_transformation(_transform("joinByField", byField="Time", mode="outer"))
            .with_transformation(_rename({}))  # drops Time: the epoch is the x axis
            .x_field("epoch").show_points(common.VisibilityMode.ALWAYS).decimals(3)
            .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.LIST)
                    .placement(common.LegendPlacement.RIGHT).show_legend(True))
            .repeat("trial").repeat_direction("h").max_per_row(2)
            .height(9).span(12))


def _variables() -> list:
    def current(value: str, text: str | None = None) -> VariableOption:
        return VariableOption(selected=True, text=text or value, value=value)

    def custom(name: str, label: str, values: tuple[str, ...], default: str) -> dash.CustomVariable:
        return (dash.CustomVariable(name).label(label).values(",".join(values)).current(current(default))
                .options([VariableOption(selected=v == default, text=v, value=v) for v in values]))

    def labels(name: str, label: str, query: str) -> dash.QueryVariable:
        return (dash.QueryVariable(name).label(label).datasource(_DS).query(query)
                .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.NATURAL_ASC))

    return [
        dash.DatasourceVariable("datasource").label("Prometheus").type("prometheus")
        .current(current(DATASOURCE_UID, DATASOURCE_NAME)),
        labels("experiment", "Experiment", f"label_values({TRIALS}, experiment)"),
        labels("model", "Model", f'label_values({TRIALS}{{experiment="$experiment"}}, model)')
        .multi(True).include_all(True).all_value(".*").current(current("$__all", "All")),
        labels("trial", "Trial", f'label_values({TRIAL_EPOCH}{{{_EXPERIMENT}}}, trial)')
        .multi(True).include_all(True).all_value(".*").current(current("$__all", "All")),
        custom("split", "Split", ("valid", "test"), DEFAULT_SPLIT),
        custom("metric", "Metric", SIMS_METRIC_NAMES, DEFAULT_METRIC),
    ]


def build_dashboard() -> dash.Dashboard:
    """The robustness dashboard, panel by panel (the SDK lays them out left to right)."""
    board = (dash.Dashboard(DASHBOARD_TITLE).uid(DASHBOARD_UID).tags(["msa-search", "robustness"])
             .description("Live robustness of an msa-search experiment: per-pattern metrics of every trial.")
             .time("now-6h", "now").refresh("10s").tooltip(DashboardCursorSync.CROSSHAIR)
             .variables(_variables())
             .annotation(dash.AnnotationQuery().name("Annotations & Alerts").built_in(1).type("dashboard")
                         .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                         .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)")))
    for panel in (best_so_far(), trials_by_state(), trials_table(), robustness_curve(), held_out_vs_searched(),
                  trial_pattern_heatmap(), worst_pattern(), per_trial_epochs()):
        board = board.with_panel(panel)
    return board


def dashboard_json(board: dash.Dashboard | None = None) -> str:
    """The dashboard as committed: sorted keys, so a rebuild is byte-identical."""
    return json.dumps((board or build_dashboard()).build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def datasource_settings(prometheus_url: str = DEFAULT_PROMETHEUS_URL) -> dict:
    """The Prometheus data source, as provisioning and Grafana's HTTP API both take it."""
    return {"name": DATASOURCE_NAME, "type": "prometheus", "uid": DATASOURCE_UID, "access": "proxy",
            "url": prometheus_url, "isDefault": False,
            "jsonData": {"httpMethod": "POST", "timeInterval": "10s"}}  # Ray's Prometheus config scrapes every 10 s


def provisioning_files(prometheus_url: str = DEFAULT_PROMETHEUS_URL,
                       grafana_dir: str = DEFAULT_GRAFANA_DIR) -> dict[str, str]:
    """Grafana's provisioning layout: a data source with a fixed uid and a file dashboard provider."""
    datasources = {"apiVersion": 1, "datasources": [{**datasource_settings(prometheus_url), "editable": False}]}
    providers = {"apiVersion": 1, "providers": [{
        "name": "msa-search", "orgId": 1, "folder": FOLDER_TITLE, "folderUid": FOLDER_UID, "type": "file",
        "disableDeletion": False, "allowUiUpdates": False, "updateIntervalSeconds": 30,
        "options": {"path": grafana_dir, "foldersFromFilesStructure": False}}]}
    header = "# Generated by `msa-search dashboards build`; edit search/dashboards.py instead.\n"
    return {DATASOURCE_FILE: header + yaml.safe_dump(datasources, sort_keys=False),
            PROVIDER_FILE: header + yaml.safe_dump(providers, sort_keys=False)}


def render(prometheus_url: str = DEFAULT_PROMETHEUS_URL, grafana_dir: str = DEFAULT_GRAFANA_DIR) -> dict[str, str]:
    """Every generated file: relative path -> text."""
    return {DASHBOARD_FILE: dashboard_json(), **provisioning_files(prometheus_url, grafana_dir)}


def write_dashboards(out_dir: Path, prometheus_url: str = DEFAULT_PROMETHEUS_URL,
                     grafana_dir: str = DEFAULT_GRAFANA_DIR) -> list[Path]:
    """Writes the dashboard JSON and the provisioning files under `out_dir`; returns their paths."""
    reason = unwritable(Path(out_dir), inside=True)
    if reason:
        raise OutputNotWritableError(f"{out_dir}: expected a directory this user can write, found {reason}")
    written = []
    for rel, text in render(prometheus_url, grafana_dir).items():
        path = Path(out_dir) / rel
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
