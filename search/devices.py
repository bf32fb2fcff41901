"""Where training runs: the one device decision, and the torch settings that go with it.

The decision is a pure function of the config, the Ray cluster's resources and the GPUs
this process sees (`place`), made once in the driver after Ray is up, before any trial or
worker starts. Trials and workers never look at `torch.cuda.is_available()` themselves: in
Ray 2.60 a task that asked for no GPU still sees every GPU of its node, so a trial that
decided for itself would land on cuda:0 while Ray believes it uses none, and a head node
without a GPU would decide "CPU" for workers that run on GPU nodes. Instead the driver
writes its decision into the config it hands out (`train.device` becomes cpu or cuda,
`search.gpus_per_trial` a number), and a trial or worker trains on the GPU Ray assigned it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from .config import ConfigError, ExperimentConfig


@dataclass(frozen=True)
class Cluster:
    """What the driver knows about where trials and workers can run."""

    gpus: float  # GPUs the Ray cluster offers now (ray.cluster_resources())
    # A cluster the driver joined (`ray up`): an autoscaler may add nodes later, so a shortfall
    # is a warning there; a private local cluster is all there is, so it is an error.
    joined: bool = False
    cpus: float | None = None  # CPUs it offers now (None: not known, nothing checked)


@dataclass(frozen=True)
class Placement:
    use_gpu: bool  # Ray Train workers (one GPU each) or in-process trials run on GPUs
    gpus_per_trial: float  # in-process Tune trials: the GPU share Ray reserves for each
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    def apply(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """The config trials and workers get: the device decided, the GPU share a number."""
        train = cfg.train.model_copy(update={"device": "cuda" if self.use_gpu else "cpu"})
        search = cfg.search.model_copy(update={"gpus_per_trial": self.gpus_per_trial})
        return cfg.model_copy(update={"train": train, "search": search})


def place(cfg: ExperimentConfig, cluster: Cluster | None, visible_gpus: int = 0, *, tune: bool = False) -> Placement:
    """Decide where training runs.

    `cluster` is None for in-process `msa-search train` (no Ray): then the GPUs this process
    sees decide. `tune`: in-process Tune trials (train.workers 0) take `search.gpus_per_trial`.
    Raises ConfigError with one line naming the key when the setting cannot run here.
    """
    device, workers = cfg.train.device, cfg.train.workers
    if cluster is None:  # in-process, this process's own GPUs
        use_gpu = device == "cuda" or (device == "auto" and visible_gpus > 0)
        if device == "cuda" and visible_gpus == 0:
            raise ConfigError("config key 'train.device': cuda was asked for but no GPU is visible; "
                              "use auto or cpu")
        return _checked(cfg, Placement(use_gpu, 0.0))
    warnings: list[str] = []

    def shortfall(message: str, node: str = "a node with a GPU") -> None:
        if not cluster.joined:
            raise ConfigError(message)
        warnings.append(f"warning: {message.split(': ', 1)[1]}; trials wait until {node} joins "
                        "(an autoscaler may add one)")

    # Ray waits, without a word, for resources a private cluster will never have: refused here.
    cpus = cluster.cpus
    if workers >= 1 and cpus is not None and workers * cfg.train.cpus_per_worker > cpus:
        most = int(cpus // cfg.train.cpus_per_worker)
        shortfall(f"config key 'train.workers': {workers} workers x train.cpus_per_worker "
                  f"{cfg.train.cpus_per_worker:g} need {workers * cfg.train.cpus_per_worker:g} CPUs, but the Ray "
                  f"cluster has {cpus:g} (set train.workers to at most {most}"
                  + (")" if most >= 1 else ", or lower train.cpus_per_worker)"), node="a node with more CPUs")
    if tune and workers == 0 and cpus is not None and cfg.search.cpus_per_trial > cpus:
        shortfall(f"config key 'search.cpus_per_trial': {cfg.search.cpus_per_trial:g} CPUs per trial, but the Ray "
                  f"cluster has {cpus:g} (set search.cpus_per_trial to at most {cpus:g})", node="a node with more CPUs")

    if tune and workers == 0:
        asked = cfg.search.gpus_per_trial
        if device == "cpu":
            if asked:
                raise ConfigError(f"config key 'search.gpus_per_trial': {asked:g} GPUs per trial with "
                                  "train.device: cpu; set train.device to auto or cuda, or gpus_per_trial to 0")
            return _checked(cfg, Placement(False, 0.0))
        if asked is None:  # auto: one GPU per trial where the cluster has GPUs
            asked = 1.0 if (device == "cuda" or cluster.gpus > 0) else 0.0
        if device == "cuda" and asked == 0:
            raise ConfigError("config key 'search.gpus_per_trial': 0 with train.device: cuda; Ray would give the "
                              "trials no GPU. Set a share, e.g. search.gpus_per_trial=0.25 (4 trials per GPU)")
        if asked > 0 and cluster.gpus == 0:
            shortfall(f"config key 'search.gpus_per_trial': {asked:g} GPUs per trial, but the Ray cluster has no GPU "
                      "(set search.gpus_per_trial=0 or train.device=cpu to train on CPU)")
        elif asked > cluster.gpus:
            shortfall(f"config key 'search.gpus_per_trial': {asked:g} GPUs per trial, but the Ray cluster has "
                      f"{cluster.gpus:g} (set search.gpus_per_trial to at most {cluster.gpus:g})",
                      node="a node with more GPUs")
        return _checked(cfg, Placement(asked > 0, asked, tuple(warnings)))

    if device == "cpu":
        return _checked(cfg, Placement(False, 0.0))
    use_gpu = device == "cuda" or cluster.gpus > 0
    if device == "cuda" and cluster.gpus == 0:
        shortfall("config key 'train.device': cuda, but the Ray cluster has no GPU (use auto or cpu)")
    elif use_gpu and workers > cluster.gpus:
        shortfall(f"config key 'train.workers': {workers} workers need one GPU each, but the Ray cluster has "
                  f"{cluster.gpus:g} (set train.workers to at most {int(cluster.gpus)}, or train.device=cpu)")
    return _checked(cfg, Placement(use_gpu, 0.0, tuple(warnings)))


def _checked(cfg: ExperimentConfig, placement: Placement) -> Placement:
    """What the placement rules out (the config's own consistency is ExperimentConfig's)."""
    if cfg.train.precision == "fp16" and not placement.use_gpu:
        raise ConfigError("config key 'train.precision': fp16 needs a GPU (DeepSpeed's CPU accelerator has no "
                          "fp16); use bf16 or fp32 on CPU")
    return placement


def in_process_device(cfg: ExperimentConfig) -> torch.device:
    """Where this process trains without asking Ray: `msa-search train` in-process (auto: this
    process's GPUs), or a trial whose config the driver placed (cpu, or cuda: the GPU Ray gave it)."""
    return torch.device("cuda" if place(cfg, None, visible_gpus()).use_gpu else "cpu")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The forward pass's autocast context (thread-local: enter it in the thread that runs)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def ray_cluster(joined: bool) -> Cluster:
    """The resources of the Ray cluster this driver is connected to."""
    import ray

    resources = ray.cluster_resources()
    return Cluster(gpus=float(resources.get("GPU", 0.0)), joined=joined, cpus=float(resources.get("CPU", 0.0)))


def local_cpus() -> float:
    """The CPUs a private local Ray cluster started here will offer: Ray's own count (its
    container CPU limits included), known before it starts."""
    from ray._private.utils import get_num_cpus

    return float(get_num_cpus())


def visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def configure_torch(cfg: ExperimentConfig, device: torch.device) -> None:
    """Per process, before the model is built: TF32 and determinism as the config says.

    `train.tf32` lets CUDA matmuls and convolutions use TF32 (Ampere and later: several times
    the fp32 matmul rate, ~1e-3 relative error per product). `train.deterministic` makes GPU
    runs repeat bit for bit: deterministic kernels only (an op without one raises), cuBLAS
    with a fixed workspace, no cuDNN autotuning, and attention on SDPA's math kernel (the
    fused kernels' backward accumulates with atomics). It costs speed: attention alone runs
    several times slower. CPU runs repeat bit for bit without it (same thread count).
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.tf32
        # cuDNN's attention (SDPA's pick for bf16/fp16 on Hopper) builds an execution plan per
        # new shape, and the encoders' length buckets give most batches new shapes: bf16 ran
        # 25x slower than fp32 (bench/gpu_check.sh, H200). Flash and memory-efficient kernels
        # take any shape.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if cfg.train.deterministic:
        # cuBLAS reads this when its handle is created: before the first matmul of the process.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        if device.type == "cuda":
            torch.backends.cuda.enable_flash_sdp(False)
            torch.backends.cuda.enable_mem_efficient_sdp(False)
            torch.backends.cuda.enable_cudnn_sdp(False)
