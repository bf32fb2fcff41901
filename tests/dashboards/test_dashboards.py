"""The committed Grafana files are exactly what `msa-search dashboards build` writes, the dashboard
is a fixed point of Grafana's own SDK decoder, and its queries follow DESIGN.md's "Live metrics"
rules (our label names only, `max by (...)` over Ray's SessionName/JobId, `last_over_time` for
finished trials)."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard
from grafana_foundation_sdk.models.prometheus import Dataquery

from models.metrics import SIMS_METRIC_NAMES
from search import cli, dashboards

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "dashboards"
OUR_LABELS = {"experiment", "trial", "model", "split", "pattern", "metric", "state", "role"}
PATTERN_PANELS = ("Robustness curve", "Trial × pattern", "Worst pattern", "Held-out patterns", "Per-pattern")


@pytest.fixture(scope="module")
def board() -> dict:
    return json.loads(dashboards.dashboard_json())


def _exprs(panel: dict) -> list[str]:
    return [t["expr"] for t in panel.get("targets", [])]


def test_committed_files_equal_what_build_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["msa-search", "dashboards", "build", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0 and "wrote" in capsys.readouterr().out
    built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert built == sorted(dashboards.render())
    for rel in built:
        committed = COMMITTED / rel
        assert committed.is_file(), f"{rel} is not committed: run `msa-search dashboards build --out dashboards/`"
        assert committed.read_text(encoding="utf-8") == (tmp_path / rel).read_text(encoding="utf-8"), (
            f"dashboards/{rel} is stale: run `msa-search dashboards build --out dashboards/`")


def test_build_is_deterministic():
    assert dashboards.dashboard_json() == dashboards.dashboard_json()
    assert dashboards.render() == dashboards.render()


def test_dashboard_round_trips_through_the_sdk_decoder_unchanged():
    register_default_plugins()  # so that queries and panel options decode to their typed models
    text = (COMMITTED / dashboards.DASHBOARD_FILE).read_text(encoding="utf-8")
    decoded = Dashboard.from_json(json.loads(text))
    assert json.dumps(decoded, cls=JSONEncoder, indent=2, sort_keys=True) + "\n" == text
    queries = [q for p in decoded.panels for q in p.targets]
    assert queries and all(isinstance(q, Dataquery) for q in queries), "every query decodes as a Prometheus query"


def test_variables_are_present_with_their_defaults(board):
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert tuple(variables) == dashboards.VARIABLES
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["experiment"]["query"] == "label_values(ray_msa_trials, experiment)"
    assert variables["trial"]["multi"] and variables["trial"]["includeAll"]
    assert variables["split"]["query"] == "valid,test" and variables["split"]["current"]["value"] == "test"
    assert variables["metric"]["query"].split(",") == list(SIMS_METRIC_NAMES)
    assert variables["metric"]["current"]["value"] == "f1_non0"


def test_every_panel_queries_prometheus_through_the_datasource_variable(board):
    assert len(board["panels"]) >= 7
    for panel in board["panels"]:
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for expr in _exprs(panel):
            assert "ray_msa_" in expr, expr


def test_pattern_panels_aggregate_with_max_by_over_our_labels_only(board):
    panels = [p for p in board["panels"] if p["title"].startswith(PATTERN_PANELS)]
    assert len(panels) == len(PATTERN_PANELS)
    for panel in panels:
        for expr in _exprs(panel):
            assert "max by (" in expr, (panel["title"], expr)
            for group in re.findall(r"\b(?:by|on|group_left) \(([^)]*)\)", expr):
                labels = {label.strip() for label in group.split(",")}
                assert labels <= OUR_LABELS, (panel["title"], labels - OUR_LABELS)
            for selector in re.findall(r"ray_msa_\w+\{([^}]*)\}", expr):
                assert {m.split("=")[0].rstrip("!~") for m in selector.replace(" ", "").split(",")} <= OUR_LABELS


def test_panels_over_finished_trials_use_last_over_time(board):
    by_title = {p["title"].split(":")[0]: p for p in board["panels"]}
    for title in ("Trials by state", "Trials", "Robustness curve", "Held-out patterns vs searched", "Trial × pattern",
                  "Worst pattern per trial"):
        panel = by_title[title]
        assert all(t.get("instant") for t in panel["targets"]), title
        for expr in _exprs(panel):
            assert "last_over_time(" in expr and "[$__range])" in expr, (title, expr)


def test_panels_cover_the_issue_list(board):
    types = {p["title"].split(":")[0]: p["type"] for p in board["panels"]}
    assert types["Robustness curve"] == "trend"  # metric over the missing rate, one line per trial
    assert types["Trial × pattern"] == "table"
    assert types["Best objective so far"] == "timeseries"
    assert types["Per-pattern $metric over epochs"] == "trend"
    heatmap = next(p for p in board["panels"] if p["title"].startswith("Trial × pattern"))
    assert heatmap["fieldConfig"]["defaults"]["custom"]["cellOptions"]["type"] == "color-background"
    assert heatmap["transformations"][0]["id"] == "groupingToMatrix"
    per_trial = next(p for p in board["panels"] if p["title"].startswith("Per-pattern"))
    assert per_trial["repeat"] == "trial"
    held_out = next(p for p in board["panels"] if p["title"].startswith("Held-out"))
    assert "group_left (role)" in held_out["targets"][0]["expr"]


def test_provisioning_datasource_uid_is_fixed_and_used_by_the_dashboard(board):
    files = dashboards.render()
    datasources = yaml.safe_load(files[dashboards.DATASOURCE_FILE])["datasources"]
    assert [(d["uid"], d["type"]) for d in datasources] == [("msa-prometheus", "prometheus")]
    variable = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert variable["current"]["value"] == datasources[0]["uid"]
    provider = yaml.safe_load(files[dashboards.PROVIDER_FILE])["providers"][0]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards.DEFAULT_GRAFANA_DIR
    assert board["uid"] == dashboards.DASHBOARD_UID
