"""cluster.yaml and cluster.local.yaml through Ray's own config checks (prepare + validate, the
steps of `ray up` before any cloud call), and the promises their comments make: token auth on
every `ray start`, nothing served on 0.0.0.0, a head without CPUs for trials, the secrets shipped
from outside the repository, and one Ray version: pyproject.toml's."""
from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_FILES = ("cluster.yaml", "cluster.local.yaml")
TOKEN_FILE = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes it, and Ray reads it


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before its provider's bootstrap (the first cloud call)."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def start_commands(config: dict) -> list[str]:
    return config["head_start_ray_commands"] + config["worker_start_ray_commands"]


def pins_module():
    spec = importlib.util.spec_from_file_location("cluster_pins", ROOT / "cluster" / "pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_rays_own_validation(name):
    prepared = ray_validate(load(name))
    assert prepared["cluster_name"].startswith("msa-search")


def test_aws_head_offers_no_cpus_and_gpu_workers_autoscale():
    prepared = ray_validate(load("cluster.yaml"))
    types = prepared["available_node_types"]
    head, workers = types[prepared["head_node_type"]], [t for n, t in types.items() if n != prepared["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert len(workers) == 1 and workers[0]["min_workers"] < workers[0]["max_workers"] <= prepared["max_workers"]
    assert prepared["provider"]["cache_stopped_nodes"] is True  # the README says `ray down` stops, not terminates


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_ray_start_has_token_auth_and_nothing_listens_on_all_interfaces(name):
    prepared = ray_validate(load(name))  # after Ray merged its defaults: none of theirs slipped in
    starts = [cmd for cmd in start_commands(prepared) if "ray start" in cmd]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in cmd for cmd in starts), starts
    head_start = next(cmd for cmd in starts if "--head" in cmd)
    assert "--dashboard-host=127.0.0.1" in head_start and "--num-cpus=0" in head_start
    assert all("--metrics-export-port=" in cmd for cmd in starts)
    assert "0.0.0.0" not in yaml.safe_dump(prepared)


def test_both_cluster_files_start_ray_and_install_the_same_way():
    aws, local = load("cluster.yaml"), load("cluster.local.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands", "setup_commands", "file_mounts",
                "rsync_filter"):
        assert aws[key] == local[key], key


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_secrets_are_shipped_from_outside_the_repository(name):
    mounts = load(name)["file_mounts"]
    assert mounts[TOKEN_FILE] == TOKEN_FILE
    secrets = [local for remote, local in mounts.items() if local != "."]
    assert secrets and all(local.startswith("~/") for local in secrets)
    assert load(name)["rsync_filter"] == [".gitignore"]  # the checkout travels without .venv, runs/


@pytest.mark.parametrize("change", ["misspelled top-level key", "misspelled node-type key"])
def test_misspelled_keys_are_refused(change):
    config = load("cluster.yaml")
    if change == "misspelled top-level key":
        config["setup_comands"] = config.pop("setup_commands")
    else:
        config["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        ray_validate(config)


def test_misspelled_key_in_the_local_cluster_is_refused():
    config = load("cluster.local.yaml")
    config["head_start_ray_comands"] = config.pop("head_start_ray_commands")
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        ray_validate(config)


def test_a_fractional_gpu_count_is_refused():
    config = load("cluster.yaml")
    config["available_node_types"]["gpu_worker"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError, match="0.5 is not of type 'integer'"):
        ray_validate(config)


def test_ray_on_the_nodes_is_the_version_pyproject_pins():
    pins = pins_module()
    assert pins.pinned("ray") == f"ray=={ray.__version__}"  # the `ray up` client too
    install = (ROOT / "cluster" / "install.sh").read_text()
    assert "cluster/pins.py torch deepspeed ray" in install and '"$installed_ray" != "$ray_pin"' in install
    # No other Ray version anywhere in the cluster's files: pyproject.toml is its one home.
    files = [ROOT / name for name in CLUSTER_FILES] + [p for p in (ROOT / "cluster").iterdir() if p.is_file()]
    literal_version = re.compile(r"\bray(\[[^\]]*\])?==\d|\bray-\d+\.\d+")
    assert not [p.name for p in files if literal_version.search(p.read_text())]


def test_nodes_install_as_the_readme_says():
    """The README's GPU-cluster steps, in order, with pyproject's pins: CUDA torch, deepspeed
    without build isolation, the project."""
    pins = pins_module()
    readme = (ROOT / "README.md").read_text()
    block = readme.split("### GPU cluster", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    steps = [line.split("#")[0].split() for line in block.splitlines()
             if line.startswith("pip install") and "--upgrade pip" not in line]
    assert "pip install --upgrade pip setuptools" in block, "deepspeed's build needs setuptools (Python 3.12)"
    assert steps[0][2] == pins.pinned("torch") and "--index-url" in steps[0]
    assert steps[1][2:] == ["--no-build-isolation", pins.pinned("deepspeed")]
    assert steps[2][2:] == ["-e", "."]
    index_url = steps[0][steps[0].index("--index-url") + 1]

    install = [line.strip() for line in (ROOT / "cluster" / "install.sh").read_text().splitlines()]
    pip_lines = [line for line in install if line.startswith("pip install") and "--upgrade pip" not in line]
    assert pip_lines == ['pip install --quiet "$torch_pin" --index-url "$torch_index"',
                         'pip install --quiet --no-build-isolation "$deepspeed_pin"',
                         "pip install --quiet -e ."]
    assert f'torch_index="${{MSA_TORCH_INDEX:-{index_url}}}"' in install
