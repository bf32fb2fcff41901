"""Live metrics against real services: a tiny search on a local Ray cluster publishes its
gauges (search/live_metrics.py), a real Prometheus scrapes them through Ray's service-discovery
file, and every query of every panel of the committed dashboard returns data from it."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import ray

from search.config import load_config
from search.ray_setup import LOCAL_RAY_SYSTEM_CONFIG
from search.tune import run_experiment

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "robustness.json"
TINY = ["data.scale=0.1", "train.epochs=2", "train.batch_size=32", "model.hidden_dim=32", "model.dim_head=16",
        "model.num_heads=4", "model.lnln.tokens=4", "train.device=cpu", "search.max_concurrent=2",
        "search.num_samples=2", "search.scheduler=none"]
pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binaries() -> tuple[str, str]:
    found = shutil.which("prometheus"), shutil.which("promtool")
    if None in found:
        reason = "needs Debian's prometheus (prometheus, promtool): `make test` installs it as root"
        if os.geteuid() == 0:
            pytest.fail(reason + "; run `make system-packages`")
        pytest.skip(reason)
    return found


def query(base: str, expr: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.fixture(scope="module")
def scraped(tmp_path_factory):
    """(Prometheus base URL, experiment name) after a finished search, scraped live."""
    prometheus, _ = binaries()
    tmp = tmp_path_factory.mktemp("live")
    ray.init(address="local", num_cpus=2, log_to_driver=False, include_dashboard=True,
             _system_config={**LOCAL_RAY_SYSTEM_CONFIG, "metrics_report_interval_ms": 1000})
    # The head's dashboard writes every node's metrics port here (a stable path in Ray's temp dir).
    discovery = Path(ray._private.worker._global_node.get_temp_dir_path()) / "prom_metrics_service_discovery.json"
    port = free_port()
    (tmp / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    file_sd_configs: [{{files: ['{discovery}'], refresh_interval: 1s}}]\n")
    server = subprocess.Popen([prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=(tmp / "prometheus.log").open("w"))
    base = f"http://127.0.0.1:{port}"
    try:
        exp = tmp / "exp"
        outcome = run_experiment(load_config(ROOT / "configs" / "quick.yaml", [*TINY, f"output.dir={exp}"]))
        assert outcome.trials["completed"] == 2
        deadline = time.time() + 60
        while time.time() < deadline:  # the last reports reach Prometheus a few seconds later
            epochs = query(base, 'max by (trial) (last_over_time(ray_msa_trial_epoch{experiment="exp"}[10m]))')
            done = query(base, 'max(last_over_time(ray_msa_trials{experiment="exp", state="terminated"}[10m]))')
            if [float(r["value"][1]) for r in epochs] == [1.0, 1.0] and done and float(done[0]["value"][1]) == 2:
                break
            time.sleep(1)
        yield base, "exp"
    finally:
        server.terminate()
        server.wait(timeout=10)
        ray.shutdown()


def panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows' panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            for target in inner.get("targets", []):
                if target.get("expr"):
                    found.append((inner.get("title", ""), target["expr"]))
    return found


def substitute(expr: str, values: dict[str, str]) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in values, f"unknown dashboard variable ${name} in {expr}"
        return values[name]
    # Variable names start with a letter or '_'; "$1" (a label_replace group) is no variable.
    return re.sub(r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)", value, expr)


def test_the_search_publishes_every_gauge_with_bounded_labels(scraped):
    base, exp = scraped
    rows = query(base, f'max by (trial, split, pattern, metric) '
                       f'(last_over_time(ray_msa_pattern_metric{{experiment="{exp}"}}[10m]))')
    labels = {key: {r["metric"][key] for r in rows} for key in ("trial", "split", "pattern", "metric")}
    assert len(labels["trial"]) == 2 and labels["split"] == {"valid", "test"}
    assert len(labels["pattern"]) == 16 and "f1_non0" in labels["metric"] and "mae" in labels["metric"]
    assert labels["metric"] <= {"acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr", "acc3"}
    epochs = query(base, f'max by (trial) (last_over_time(ray_msa_trial_epoch{{experiment="{exp}"}}[10m]))')
    assert sorted(float(r["value"][1]) for r in epochs) == [1.0, 1.0]  # both trials reached their last epoch
    roles = query(base, f'max by (pattern, role) (last_over_time(ray_msa_objective_pattern{{experiment="{exp}"}}[10m]))')
    held_out = {r["metric"]["pattern"] for r in roles if r["metric"]["role"] == "held_out"}
    assert held_out == {"intra:0.9", "inter:L+V"} and len(roles) == 16
    assert query(base, f'max(last_over_time(ray_msa_best_objective{{experiment="{exp}"}}[10m]))')
    states = query(base, f'max by (state) (last_over_time(ray_msa_trials{{experiment="{exp}"}}[10m]))')
    assert {r["metric"]["state"]: float(r["value"][1]) for r in states}["terminated"] == 2.0


def test_every_panel_query_returns_data_from_the_real_search(scraped):
    base, exp = scraped
    values = {"experiment": exp, "model": "lnln", "trial": ".*", "split": "test", "metric": "f1_non0",
              "__range": "10m", "__interval": "15s", "__rate_interval": "1m", "datasource": "prometheus"}
    queries = panel_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 7
    grid = [f"intra:{r / 10:.1f}" for r in range(10)] + [f"inter:{d}" for d in ("L", "A", "V", "L+A", "L+V", "A+V")]
    for title, expr in queries:
        rows = query(base, substitute(expr, values))
        assert rows, f"panel '{title}' got no data: {expr}"
        patterns = {r["metric"]["pattern"] for r in rows if "pattern" in r["metric"]}
        if patterns and "bottomk" not in expr and "topk" not in expr:  # a per-pattern panel: every pattern it selects
            selector = re.search(r'pattern=~"([^"]+)"', expr)
            expected = {p for p in grid if selector is None or re.fullmatch(selector.group(1), p)}
            assert patterns == expected, (title, sorted(expected - patterns))


def test_promtool_accepts_every_panel_expression(tmp_path):
    _, promtool = binaries()
    values = {"experiment": "exp", "model": "lnln", "trial": ".*", "split": "test", "metric": "f1_non0",
              "__range": "10m", "__interval": "15s", "__rate_interval": "1m", "datasource": "prometheus"}
    queries = panel_queries(json.loads(DASHBOARD.read_text()))
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"panel_query_{i}", "expr": substitute(e, values)}
                                                         for i, (_, e) in enumerate(queries)]}]}
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_best_so_far_survives_a_resume(tmp_path):
    """Through Tune's own save and restore of callback state (what `tune --resume` runs): the
    experiment's best gauge goes on from the best before the driver died, not from the resumed
    driver's first report."""
    from ray.tune.callback import CallbackList

    from search.live_metrics import LiveMetricsCallback

    cfg = load_config(ROOT / "configs" / "quick.yaml", TINY)
    before = LiveMetricsCallback("exp", cfg)
    before._best = 0.73
    CallbackList([before]).save_to_dir(str(tmp_path))
    resumed = LiveMetricsCallback("exp", cfg)
    CallbackList([resumed]).restore_from_dir(str(tmp_path))
    assert resumed._best == 0.73


def test_trials_added_to_a_search_are_counted_with_the_earlier_rounds():
    """`tune --resume EXP --add-trials N` runs a Tune experiment of its own (search/rounds.py),
    whose Tune knows only its N trials: the experiment's gauges start from the earlier rounds'
    best and trial counts, also in a callback Ray pickled with the Tuner (a resumed round)."""
    import pickle
    from collections import Counter
    from types import SimpleNamespace

    from search.live_metrics import LiveMetricsCallback

    cfg = load_config(ROOT / "configs" / "quick.yaml", TINY)
    callback = pickle.loads(pickle.dumps(LiveMetricsCallback("exp", cfg, earlier_best=0.81,
                                                             earlier_states={"terminated": 6, "error": 1})))
    assert callback._best == 0.81
    callback.on_step_end(0, [SimpleNamespace(status="RUNNING"), SimpleNamespace(status="TERMINATED")])
    assert callback.trial_counts() == Counter({"terminated": 7, "error": 1, "running": 1})
