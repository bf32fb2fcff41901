"""Run by tests/cluster/test_multi_node.py in a fresh process (its own HOME, so its own token;
and its cluster never meets the Ray of another test module): starts a multi-node Ray cluster on
this machine shaped like cluster.yaml's (token auth, a head with no CPUs, so nothing can run
there, plus two worker nodes), runs a tiny `tune` whose driver joins it by address as a user's
driver joins a `ray up` cluster, and prints as JSON what the test checks: the nodes, the node
every trial ran on, and Ray's Prometheus service-discovery file.

Usage: RAY_TMPDIR=DIR multi_node_probe.py EXP_DIR CPUS_PER_WORKER_NODE CONFIG [KEY=VALUE ...]
(Ray's temp dir: DIR/ray)
"""
from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

import ray
from ray._common.utils import get_default_ray_temp_dir
from ray._private.authentication.authentication_token_setup import (
    enable_token_auth_by_default, ensure_token_if_auth_enabled)
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray._raylet import AuthenticationMode, get_authentication_mode
from ray.cluster_utils import Cluster

WORKER_NODES = 2
TRAINABLE = "ImplicitFunc"  # the actor class Ray Tune runs a function trainable in
# Besides one target per node, the file lists these metrics endpoints of the head's own daemons.
HEAD_DAEMON_METRICS_KEYS = (b"AutoscalerMetricsAddress", b"DashboardMetricsAddress")


def main(exp: Path, cpus_per_worker_node: int, config: Path, overrides: list[str]) -> None:
    timings: dict[str, float] = {}
    last = [time.monotonic()]

    def lap(phase: str) -> None:
        now = time.monotonic()
        timings[phase], last[0] = now - last[0], now

    # Token auth as on cluster.yaml's nodes, by Ray's own steps for a new local cluster: write
    # ~/.ray/auth_token (this process's private HOME) first, then turn token mode on for this
    # process and the nodes it starts. The driver, in this process, then sends the token too.
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    # The dashboard writes the service-discovery file (and serves the state API). Port 0: never
    # the 8265 another test's private cluster may be asserting on. Node addresses stay Ray's
    # default (this machine's own IP): `ray.init(address=...)` rewrites 127.0.0.1 to it, so a
    # cluster bound to loopback cannot be joined by address from this machine.
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0))
    lap("head_s")
    try:
        for _ in range(WORKER_NODES):
            cluster.add_node(wait=False, num_cpus=cpus_per_worker_node)  # the two start side by side
        # torch and the search import while the worker nodes start
        from search.config import load_config
        from search.tune import run_experiment

        cluster.wait_for_nodes()
        lap("workers_s")

        cfg = load_config(config, [*overrides, f"output.dir={exp}"])
        outcome = run_experiment(cfg, ray_address=cluster.address)
        lap("tune_s")

        nodes = [{"node_id": n["NodeID"], "alive": n["Alive"], "cpus": n["Resources"].get("CPU", 0.0),
                  "metrics": f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}",
                  "head": n["NodeID"] == cluster.head_node.node_id} for n in ray.nodes()]
        gcs = ray._private.worker.global_worker.gcs_client
        head_daemons = [v.decode() for v in (gcs.internal_kv_get(k, None) for k in HEAD_DAEMON_METRICS_KEYS) if v]
        report = {"token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
                  "outcome": dict(outcome.trials), "first_failure": outcome.first_failure,
                  "nodes": nodes, "trial_nodes": trial_nodes(cluster, exp), "head_daemon_metrics": head_daemons,
                  "discovery": discovery_file(cluster, len(nodes) + len(head_daemons)),
                  "scrape_status": {n["metrics"]: scrape_status(n["metrics"]) for n in nodes}}
        lap("checks_s")
    finally:
        ray.shutdown()  # the driver first: Cluster refuses to remove the node a driver is on
        cluster.shutdown()
    lap("shutdown_s")
    print(json.dumps({**report, "timings": timings}), flush=True)


def trial_nodes(cluster: Cluster, exp: Path) -> dict[str, str]:
    """trial_id -> the node its trainable ran on: the pid Tune records in each trial's results,
    matched to the node of the trainable actor with that pid (Ray's state API keeps dead actors)."""
    from ray.util.state import list_actors

    from search.layout import Layout

    actors = list_actors(address=cluster.address, filters=[("class_name", "=", TRAINABLE)], limit=1000,
                         raise_on_missing_output=False)
    node_of_pid = {a.pid: a.node_id for a in actors}
    placed: dict[str, set] = {}
    for result_file in Layout(exp).tune_state().glob("*/result.json"):
        for line in result_file.read_text().splitlines():
            result = json.loads(line)
            placed.setdefault(result["trial_id"], set()).add(node_of_pid.get(result["pid"], f"pid {result['pid']}?"))
    return {trial: sorted(where)[0] if len(where) == 1 else f"several: {sorted(where)}"
            for trial, where in placed.items()}


def scrape_status(target: str) -> int:
    """What Prometheus would get from a node's metrics endpoint (HTTP status)."""
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=10) as response:
        return response.status


def discovery_file(cluster: Cluster, n_targets: int, timeout_s: float = 30.0) -> dict:
    """Ray's Prometheus file_sd targets at the path cluster/prometheus.yml reads (in Ray's temp
    dir, /tmp/ray on a real head: a link into the session's directory), once they are complete
    (the dashboard rewrites the file every 5 s)."""
    path = Path(get_default_ray_temp_dir()) / PROMETHEUS_SERVICE_DISCOVERY_FILE
    deadline = time.monotonic() + timeout_s
    content = None
    while time.monotonic() < deadline:
        if path.is_file():
            content = json.loads(path.read_text())
            if len(content[0]["targets"]) >= n_targets:
                break
        time.sleep(0.5)
    return {"path": str(path), "resolved": str(path.resolve()),
            "session_dir": cluster.head_node.get_session_dir_path(), "content": content}


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:])
