"""`msa-search tune` on a multi-node Ray cluster, all on this machine: a head with no CPUs (as in
cluster.yaml) plus two worker nodes (`ray.cluster_utils.Cluster`, token auth), joined by address
as a user's driver joins a `ray up` cluster. Trials run on the worker nodes only, the results
store and the Optuna study are complete, and Ray's Prometheus service-discovery file lists every
node. The cluster lives in a subprocess (tests/cluster/multi_node_probe.py) with its own HOME."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest

from search.config import load_config
from search.layout import Layout
from search.results import KEY_COLUMNS, ResultsStore

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TRIALS, EPOCHS = 2, 2
# One CPU per trial, both trials at once: they fill both worker nodes, one each, so neither node
# is left out. One wave of two trial processes: on 2 shared cores, 4 trials (2 per node) took
# the search phase from ~36 s to ~98 s under the same load.
CPUS_PER_WORKER_NODE = TRIALS // 2
# test_tune.py's tiny search.
TINY = ["data.scale=0.1", f"train.epochs={EPOCHS}", "train.batch_size=32", "model.hidden_dim=32", "model.dim_head=16",
        "model.num_heads=4", "model.lnln.tokens=4", "train.device=cpu", f"search.max_concurrent={TRIALS}",
        "search.scheduler=none", "train.threads=1", f"search.num_samples={TRIALS}"]


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("multi_node")
    home = tmp / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("RAY_AUTH_MODE", None)  # as on a machine where nobody set it (another test's ray.init sets it)
    env.pop("RAY_ADDRESS", None)
    exp = tmp / "exp"
    # Ray's temp dir (RAY_TMPDIR/ray instead of /tmp/ray, so not even its "current cluster" file is
    # shared): short, as its Unix socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="mn", dir="/tmp") as ray_tmp:
        env["RAY_TMPDIR"] = ray_tmp
        started = time.monotonic()
        args = [sys.executable, str(Path(__file__).with_name("multi_node_probe.py")), str(exp),
                str(CPUS_PER_WORKER_NODE), str(ROOT / "configs" / "lnln_quick.yaml"), *TINY]
        # Its own process group: the probe and every Ray process it started, killed together on a timeout.
        proc = subprocess.Popen(args, env=env, cwd=home, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=360)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        (tmp / "probe.log").write_text(stderr)
        assert proc.returncode == 0, f"{tmp / 'probe.log'}:\n{stderr[-4000:]}"
        report = json.loads(stdout.strip().splitlines()[-1])
        print(f"multi-node probe: {time.monotonic() - started:.0f}s wall, phases (s) "
              f"{ {k: round(v, 1) for k, v in report['timings'].items()} }")
    return report, exp


def test_the_driver_joined_a_token_auth_cluster_of_a_cpu_less_head_and_two_workers(probe):
    report, _ = probe
    assert report["token_auth"]
    nodes = report["nodes"]
    assert len(nodes) == 3 and all(n["alive"] for n in nodes)
    assert sorted(n["cpus"] for n in nodes if n["head"]) == [0.0]
    assert sum(not n["head"] for n in nodes) == 2


def test_every_trial_ran_on_a_worker_node_and_both_worker_nodes_ran_trials(probe):
    report, _ = probe
    assert report["outcome"] == {"completed": TRIALS}, report["first_failure"]
    workers = {n["node_id"] for n in report["nodes"] if not n["head"]}
    placed = report["trial_nodes"]
    assert len(placed) == TRIALS
    assert set(placed.values()) <= workers, placed
    assert set(placed.values()) == workers, placed


def test_results_hold_every_trial_epoch_split_and_pattern_exactly_once(probe):
    report, exp = probe
    df = ResultsStore(Layout(exp).results).read()
    key = list(KEY_COLUMNS)
    assert not df.duplicated(key).any()
    grid = load_config(Layout(exp).config).missing.eval_grid
    expected = set(itertools.product(report["trial_nodes"], range(EPOCHS), ("valid", "test"), grid))
    assert len(grid) == 16 and set(df[key].itertuples(index=False, name=None)) == expected


def test_the_study_has_every_tune_trial_complete_and_none_running(probe):
    report, exp = probe
    layout = Layout(exp)
    study = optuna.load_study(study_name=layout.study_name, storage=layout.optuna_storage)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == report["outcome"]["completed"] == TRIALS
    assert optuna.trial.TrialState.RUNNING not in states and len(states) == TRIALS


def test_the_prometheus_discovery_file_lists_every_node(probe):
    report, _ = probe
    discovery = report["discovery"]
    # cluster/prometheus.yml reads Ray's temp dir's file: a link to the current session's one.
    assert Path(discovery["resolved"]).parent == Path(discovery["session_dir"]).resolve()
    content = discovery["content"]
    assert content is not None, f"no {discovery['path']}"
    targets = content[0]["targets"]
    node_targets = [n["metrics"] for n in report["nodes"]]
    assert len(set(node_targets)) == 3  # one metrics port per node, though all are on one machine
    # One target per node, plus the head's autoscaler and dashboard metrics endpoints.
    assert sorted(targets) == sorted(node_targets + report["head_daemon_metrics"]), (targets, report["nodes"])
    assert report["scrape_status"] == {target: 200 for target in node_targets}  # and each one answers
