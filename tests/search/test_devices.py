"""The device decision (search/devices.py) as a pure function of the config, the cluster's
resources and the GPUs the driver sees; and what trials and workers are handed."""
from __future__ import annotations

import pytest

from search.config import ConfigError, ExperimentConfig, load_config
from search.devices import Cluster, place
from search.tune import trial_resources


def cfg(*overrides: str) -> ExperimentConfig:
    return load_config(None, list(overrides))


def test_head_without_gpu_places_workers_on_the_clusters_gpus():
    # The driver (head) sees no GPU; the cluster's worker nodes have 4.
    placed = place(cfg("train.workers=2"), Cluster(gpus=4, joined=True), visible_gpus=0)
    assert placed.use_gpu and placed.backend == "nccl" and not placed.warnings
    applied = placed.apply(cfg("train.workers=2"))
    assert applied.train.device == "cuda"


def test_driver_gpus_do_not_decide_for_a_cluster_without_any():
    placed = place(cfg("train.workers=2"), Cluster(gpus=0, joined=True), visible_gpus=8)
    assert not placed.use_gpu and placed.backend == "gloo"
    assert placed.apply(cfg("train.workers=2")).train.device == "cpu"


def test_one_gpu_and_two_workers_is_refused_on_a_private_cluster_and_warned_on_a_joined_one():
    with pytest.raises(ConfigError, match=r"'train.workers': 2 workers need one GPU each.*has 1"):
        place(cfg("train.workers=2"), Cluster(gpus=1), visible_gpus=1)
    placed = place(cfg("train.workers=2"), Cluster(gpus=1, joined=True), visible_gpus=0)
    assert placed.use_gpu and "autoscaler" in placed.warnings[0]
    # Asking for CPU explicitly needs no GPU at all.
    assert not place(cfg("train.workers=2", "train.device=cpu"), Cluster(gpus=1), visible_gpus=1).use_gpu


@pytest.mark.parametrize("share, gpus, expect", [
    (None, 0, (False, 0.0)),  # auto without GPUs: CPU trials
    (None, 2, (True, 1.0)),  # auto with GPUs: one GPU per trial
    (0.25, 1, (True, 0.25)),  # four trials share a GPU
    (0.0, 2, (False, 0.0)),  # explicitly on CPU although GPUs exist: the trials see none
])
def test_gpus_per_trial_decides_where_in_process_trials_run(share, gpus, expect):
    overrides = [] if share is None else [f"search.gpus_per_trial={share}"]
    placed = place(cfg(*overrides), Cluster(gpus=gpus), visible_gpus=gpus, tune=True)
    assert (placed.use_gpu, placed.gpus_per_trial) == expect
    applied = placed.apply(cfg(*overrides))
    assert applied.train.device == ("cuda" if expect[0] else "cpu")
    assert applied.search.gpus_per_trial == expect[1]


def test_gpus_per_trial_without_gpus_is_refused_locally_and_warned_when_joined():
    with pytest.raises(ConfigError, match=r"'search.gpus_per_trial': 0.5 GPUs per trial, but the Ray cluster has no GPU"):
        place(cfg("search.gpus_per_trial=0.5"), Cluster(gpus=0), visible_gpus=0, tune=True)
    placed = place(cfg("search.gpus_per_trial=0.5"), Cluster(gpus=0, joined=True), visible_gpus=0, tune=True)
    assert placed.use_gpu and placed.gpus_per_trial == 0.5 and placed.warnings
    with pytest.raises(ConfigError, match="train.device: cpu"):
        place(cfg("search.gpus_per_trial=0.5", "train.device=cpu"), Cluster(gpus=1), visible_gpus=1, tune=True)
    with pytest.raises(ConfigError, match="Ray would give the trials no GPU"):
        place(cfg("search.gpus_per_trial=0", "train.device=cuda"), Cluster(gpus=1), visible_gpus=1, tune=True)


def test_more_cpus_or_gpus_than_the_cluster_has_are_refused_locally_and_warned_when_joined():
    """Ray would wait for them without a word: a worker group, or a trial, larger than a private
    cluster never starts (a search hung there). A joined cluster may grow: a warning."""
    with pytest.raises(ConfigError, match=r"'train.workers': 3 workers x train.cpus_per_worker 1 need 3 CPUs, but "
                                          r"the Ray cluster has 2 \(set train.workers to at most 2\)"):
        place(cfg("train.workers=3"), Cluster(gpus=0, cpus=2), visible_gpus=0)
    with pytest.raises(ConfigError, match=r"need 6 CPUs, but the Ray cluster has 2 \(set train.workers to at most 0, "
                                          r"or lower train.cpus_per_worker\)"):
        place(cfg("train.workers=2", "train.cpus_per_worker=3"), Cluster(gpus=0, cpus=2), visible_gpus=0, tune=True)
    assert not place(cfg("train.workers=2"), Cluster(gpus=0, cpus=2), visible_gpus=0, tune=True).warnings
    joined = place(cfg("train.workers=3"), Cluster(gpus=0, cpus=2, joined=True), visible_gpus=0)
    assert joined.warnings == ("warning: 3 workers x train.cpus_per_worker 1 need 3 CPUs, but the Ray cluster has 2 "
                               "(set train.workers to at most 2); trials wait until a node with more CPUs joins "
                               "(an autoscaler may add one)",)
    with pytest.raises(ConfigError, match=r"'search.cpus_per_trial': 4 CPUs per trial, but the Ray cluster has 2"):
        place(cfg("search.cpus_per_trial=4"), Cluster(gpus=0, cpus=2), visible_gpus=0, tune=True)
    with pytest.raises(ConfigError, match=r"'search.gpus_per_trial': 2 GPUs per trial, but the Ray cluster has 1 "
                                          r"\(set search.gpus_per_trial to at most 1\)"):
        place(cfg("search.gpus_per_trial=2"), Cluster(gpus=1, cpus=8), visible_gpus=1, tune=True)
    assert place(cfg("search.gpus_per_trial=2"), Cluster(gpus=1, cpus=8, joined=True), visible_gpus=1,
                 tune=True).warnings


def test_device_cuda_with_no_gpu_is_refused():
    with pytest.raises(ConfigError, match=r"'train.device': cuda, but the Ray cluster has no GPU"):
        place(cfg("train.device=cuda", "train.workers=1"), Cluster(gpus=0), visible_gpus=0)
    with pytest.raises(ConfigError, match=r"'search.gpus_per_trial': 1 GPUs per trial"):
        place(cfg("train.device=cuda"), Cluster(gpus=0), visible_gpus=0, tune=True)
    with pytest.raises(ConfigError, match=r"'train.device': cuda was asked for but no GPU is visible"):
        place(cfg("train.device=cuda"), None, visible_gpus=0)  # in-process `msa-search train`
    assert place(cfg(), None, visible_gpus=1).use_gpu and not place(cfg(), None, visible_gpus=0).use_gpu


def test_fp16_needs_a_gpu_and_the_deepspeed_engine():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        place(cfg("train.workers=1", "train.precision=fp16"), Cluster(gpus=0), visible_gpus=0)
    assert place(cfg("train.workers=1", "train.precision=fp16"), Cluster(gpus=1), visible_gpus=0).use_gpu
    with pytest.raises(ConfigError, match="fp16 needs train.workers >= 1"):
        cfg("train.precision=fp16")  # in-process: no loss scaling
    with pytest.raises(ConfigError, match="fp16 needs train.engine: deepspeed"):
        cfg("train.workers=1", "train.engine=ddp", "train.precision=fp16")
    cfg("train.workers=1", "train.engine=ddp", "train.precision=bf16")  # autocast: every engine


def test_gpu_share_options_are_checked_in_the_config():
    with pytest.raises(ConfigError, match="search.gpus_per_trial.*fractions below 1"):
        cfg("search.gpus_per_trial=1.5")
    with pytest.raises(ConfigError, match="for in-process trials"):
        cfg("search.gpus_per_trial=0.5", "train.workers=1")
    assert cfg("search.gpus_per_trial=2").search.gpus_per_trial == 2


def test_in_process_trials_ask_ray_for_their_gpu_share():
    base = cfg("search.gpus_per_trial=0.25", "search.cpus_per_trial=2")
    placed = place(base, Cluster(gpus=1), visible_gpus=1, tune=True).apply(base)
    assert trial_resources(placed) == {"cpu": 2.0, "gpu": 0.25}
    on_cpu = place(cfg(), Cluster(gpus=0), visible_gpus=0, tune=True).apply(cfg())
    assert trial_resources(on_cpu) == {"cpu": 1.0, "gpu": 0.0}
    # A distributed trial's process only drives its workers: no CPU of theirs (test_tune.py runs
    # one whose two workers take both CPUs of the cluster).
    assert trial_resources(cfg("train.workers=2"))["cpu"] == 0
