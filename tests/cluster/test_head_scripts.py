"""The scripts and configs `ray up` runs on the nodes (cluster/): shell syntax, Prometheus's own
check of its config, Grafana's settings (loopback, no anonymous access, no password in the file),
and the refusal to start without the secrets rather than fall back to a default."""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
SCRIPTS = sorted(CLUSTER.glob("*.sh"))


def test_the_cluster_has_its_scripts():
    assert {p.name for p in SCRIPTS} == {"install.sh", "head_setup.sh", "head_services.sh", "gpu_sharing.sh"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_as_bash(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian `prometheus`; `make test` installs it as root)")
def test_prometheus_config_passes_promtool():
    proc = subprocess.run(["promtool", "check", "config", str(CLUSTER / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "/tmp/ray/prom_metrics_service_discovery.json" in (CLUSTER / "prometheus.yml").read_text()


def test_grafana_listens_on_loopback_without_anonymous_access_or_a_password():
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(CLUSTER / "grafana.ini")
    assert ini["server"]["http_addr"] == "127.0.0.1"
    assert ini["auth.anonymous"]["enabled"] == "false"
    assert ini["users"]["allow_sign_up"] == "false"
    assert ini["security"]["allow_embedding"] == "true"  # Ray's dashboard embeds the panels
    assert not [key for section in ini.sections() for key in ini[section] if "password" in key or "secret" in key]
    services = (CLUSTER / "head_services.sh").read_text()
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE=" in services and "GF_SECURITY_SECRET_KEY__FILE=" in services


def test_head_env_keeps_every_service_on_the_head_and_tunnels_the_browser():
    env = subprocess.run(["bash", "-c", f". {CLUSTER / 'head.env'}; env"], capture_output=True, text=True,
                         timeout=30, env={"PATH": os.environ["PATH"]}).stdout
    values = dict(line.split("=", 1) for line in env.splitlines() if line.startswith("RAY_"))
    assert values == {"RAY_PROMETHEUS_HOST": "http://127.0.0.1:9090", "RAY_GRAFANA_HOST": "http://127.0.0.1:3000",
                      "RAY_GRAFANA_IFRAME_HOST": "http://localhost:3000"}
    datasource = (ROOT / "dashboards" / "provisioning" / "datasources" / "msa-search.yaml").read_text()
    assert "url: http://localhost:9090" in datasource  # the committed data source finds that Prometheus


@pytest.mark.parametrize("script, secret", [("install.sh", ".ray/auth_token"),
                                            ("head_services.sh", ".msa-search/grafana_admin_password")])
def test_a_node_without_its_secret_stops_with_one_clear_line(tmp_path, script, secret):
    """No token, no Ray; no password file, no Grafana: never a default in their place."""
    proc = subprocess.run(["bash", str(CLUSTER / script)], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)})
    assert proc.returncode == 1
    assert secret in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / ".bashrc").exists() and not (tmp_path / ".msa-search").exists()


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster.local.yaml"])
def test_gpu_workers_start_mps_before_ray(name):
    """Trials sharing a GPU are separate processes: MPS must be up before Ray starts them."""
    import yaml

    commands = yaml.safe_load((ROOT / name).read_text())["worker_start_ray_commands"]
    mps = next(i for i, cmd in enumerate(commands) if "cluster/gpu_sharing.sh" in cmd)
    start = next(i for i, cmd in enumerate(commands) if "ray start" in cmd)
    assert mps < start


@pytest.mark.parametrize("env, line", [({}, "no NVIDIA GPU on this node"),
                                       ({"MSA_SEARCH_MPS": "0"}, "MPS left off (MSA_SEARCH_MPS=0)")])
def test_gpu_sharing_leaves_a_node_without_gpu_or_opted_out_alone(tmp_path, env, line):
    """Here there is no GPU (nor nvidia-smi on PATH): the worker still starts Ray."""
    path = ":".join(p for p in os.environ["PATH"].split(":") if not (Path(p) / "nvidia-smi").exists())
    proc = subprocess.run(["bash", str(CLUSTER / "gpu_sharing.sh")], capture_output=True, text=True, timeout=30,
                          env={"PATH": path, "HOME": str(tmp_path), **env})
    assert proc.returncode == 0 and line in proc.stdout, proc.stdout + proc.stderr
