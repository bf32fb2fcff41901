"""How msa-search starts or joins Ray, and the one TorchTrainer factory.

`msa-search train` (train.workers >= 1) and Tune trials that nest Ray Train both build their
TorchTrainer here, so they keep the same checkpoints, failure handling and backend.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .config import ExperimentConfig

# Ray starts its worker processes at niceness 15 so that its own daemons stay responsive.
# A training worker then loses the CPU to every raylet/GCS/dashboard wake-up, and its
# OpenMP threads stall at each barrier while one of them waits: measured 20-30% slower
# epochs than the same loop outside Ray on a 2-core machine. Training is the only work
# these workers do, so they run at normal priority. (`ray start` takes the same setting
# from the environment: RAY_worker_niceness=0.)
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}

# Checkpoints a Ray Train run keeps: the newest, and the one before it in case the newest
# is cut short while it is being persisted.
CHECKPOINTS_KEPT = 2


def ensure_ray(address: str | None) -> None:
    """Join the cluster at `address` (e.g. from `ray up`), or start a private local one.

    Never `ray.init()` with no address: that silently joins whatever local cluster happens
    to run on the machine (another user's, another test's)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", log_to_driver=False, _system_config=LOCAL_RAY_SYSTEM_CONFIG)


def uses_gpu(cfg: ExperimentConfig) -> bool:
    return torch.cuda.is_available() and cfg.train.device != "cpu"


def torch_trainer(cfg: ExperimentConfig, *, store: Path, checkpoint_key: str, storage_path: Path, name: str,
                  callbacks: list):
    """A TorchTrainer of `train.workers` workers running search/worker.py on `store`.

    `checkpoint_key` names the node-local checkpoint staging directories (unique per run);
    Ray Train keeps its checkpoints under `storage_path/name`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import worker_loop

    gpu = uses_gpu(cfg)
    return TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "store": str(store),
                           "checkpoint_key": checkpoint_key},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
    )
