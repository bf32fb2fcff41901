"""How msa-search starts or joins Ray, and the one TorchTrainer factory.

`msa-search train` (train.workers >= 1) and Tune trials that nest Ray Train both build their
TorchTrainer here, so they keep the same checkpoints, failure handling and backend.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from .config import ExperimentConfig
from .devices import Cluster, local_cpus, ray_cluster, visible_gpus
from .shared_data import SharedSplits

# Ray starts its worker processes at niceness 15 so that its own daemons stay responsive.
# A training worker then loses the CPU to every raylet/GCS/dashboard wake-up, and its
# OpenMP threads stall at each barrier while one of them waits: measured 20-30% slower
# epochs than the same loop outside Ray on a 2-core machine. Training is the only work
# these workers do, so they run at normal priority. (`ray start` takes the same setting
# from the environment: RAY_worker_niceness=0.)
#
# No prestarted workers: the raylet would start one idle worker per CPU as it starts (~0.7 s of
# CPU each, inside ray.init), yet no trial runs in them: Tune gives each trial actor a runtime
# environment of its own (see WARM_WORKERS below), and Ray starts a worker for that when the
# actor is made.
# bench/search_overhead.py's +prestart variant measures the difference.
NO_PRESTART = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0, **NO_PRESTART}

# Each worker process of a private local cluster that runs in-process Tune trials imports the
# training code as it starts (bench/search_overhead.py: head_s, and its +cold variant). Traced on
# Ray 2.60: Tune gives each trainable actor a runtime environment of its own (env_vars), so trials
# never run in the workers the cluster starts with; Ray starts their processes when Tune first asks
# for trial actors, and this hook imports then. (Ray's preload_python_modules, which would import in
# those prestarted workers too, measured slower: they import for nothing.) Not where Ray Train runs
# (train.workers >= 1): the hook runs in every process of the job, and Ray Train starts six of its
# own besides the workers (controller, synchronization, placement-group cleaner, Ray Data's
# coordinator and dataset manager, preemption watcher), each then importing torch for nothing:
# `msa-search train --set train.workers=2` of one epoch took 44.8 / 46.2 s with it against
# 40.5 / 41.4 s without (2026-11-30, 2-vCPU AMD EPYC, interleaved).
WARM_WORKERS = {"worker_process_setup_hook": "search.warm_workers.import_training"}


# Checkpoints a Ray Train run keeps: the newest, and the one before it in case the newest
# is cut short while it is being persisted.
CHECKPOINTS_KEPT = 2


def ensure_ray(address: str | None, warm_workers: bool = False) -> None:
    """Join the cluster at `address` (e.g. from `ray up`), or start a private local one, whose
    workers import the training code as they start where `warm_workers` (in-process Tune trials).

    Never `ray.init()` with no address: that silently joins whatever local cluster happens
    to run on the machine (another user's, another test's)."""
    import ray

    if ray.is_initialized():
        return
    if address:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False)
    else:
        # Token auth is on: Ray 2.60's default for a new local cluster, which reads the token from
        # ~/.ray/auth_token (written owner-only here first; Ray's own would be world-readable).
        # Setting RAY_AUTH_MODE=token ourselves is not needed. The Jobs API on the dashboard's
        # port runs any command it is sent (CVE-2023-48022); tests/cluster/test_private_cluster.py
        # checks that it refuses a request without the token. What listens where: README, "Cluster".
        note = owner_only_token()
        if note:
            print(note, file=sys.stderr)
        ray.init(address="local", log_to_driver=False, dashboard_host="127.0.0.1",
                 _system_config=LOCAL_RAY_SYSTEM_CONFIG, runtime_env=WARM_WORKERS if warm_workers else None)


def owner_only_token(home: Path | None = None) -> str | None:
    """Make the private cluster's token file (~/.ray/auth_token) readable by its owner alone.

    Ray 2.60 writes a new one with the process's umask: readable by every user of the machine
    under the usual 022, and any of them could then run commands as you through the Jobs API,
    which listens on loopback for all of them. So the token is written here first, owner-only
    (Ray then finds it and uses it), and an existing one others can read is made owner-only.
    Returns a line for the user when a file changed mode, else None. Left alone: token auth
    turned off (RAY_AUTH_MODE) and a token the user points Ray to (RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH)."""
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token" or \
            os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    path = (home or Path.home()) / ".ray" / "auth_token"  # Ray's default path (`ray get-auth-token`)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode & 0o777
        if not mode & 0o077:
            return None
        try:
            os.chmod(path, 0o600)
        except OSError as exc:
            return (f"warning: {path} is readable by other users (mode {mode:o}) and could not be made "
                    f"owner-only ({exc.strerror}): whoever reads it can run commands through your Ray clusters")
        return (f"note: {path} was readable by other users (mode {mode:o}); made it owner-only (600): "
                "whoever reads it can run commands through your Ray clusters")
    with os.fdopen(fd, "w") as f:
        f.write(generate_new_authentication_token())
    return None


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """A GCS address (host:port) that nothing answers on is one line now: `ray.init` would retry
    it for about 13 minutes before it gave up (measured, Ray 2.60). Other forms (auto, ray://,
    a dashboard URL) are left to Ray."""
    import socket

    from data_pipeline.errors import MsaSearchError

    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise MsaSearchError(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start "
                             "one (`ray up`, `ray start --head`) or leave --address and RAY_ADDRESS unset for a "
                             "private local cluster") from None


def cluster_of(address: str | None) -> Cluster:
    """The cluster trials will run on. A private local cluster (no address, Ray not up yet)
    will hold this machine's GPUs, so the device decision, and any refusal, comes before Ray
    starts; a cluster to join is asked once the driver has joined it."""
    import ray

    if address or ray.is_initialized():
        ensure_ray(address)
        return ray_cluster(joined=bool(address))
    return Cluster(float(visible_gpus()), joined=False, cpus=local_cpus())


def torch_trainer(cfg: ExperimentConfig, *, data: SharedSplits, checkpoint_key: str, storage_path: Path | str, name: str,
                  callbacks: list, init_weights=None, in_search: bool = False, start_from=None):
    """A TorchTrainer of `train.workers` workers running search/worker.py on the shared splits `data`.

    `cfg` is the driver's placed config (search/devices.py): train.device is cpu or cuda, and
    with cuda each worker gets one GPU from Ray and NCCL. `checkpoint_key` names the node-local
    checkpoint staging directories (unique per run); Ray Train keeps its checkpoints under
    `storage_path/name`. `init_weights`: an object-store reference to the state dict every
    worker starts from (search/weights.py), or None. `in_search`: a search's trial (its
    test grid follows search/evaluation_plan.py's search default). `start_from`: a checkpoint
    of an earlier run the run goes on from while it has none of its own (search/nested_runs.py;
    Ray Train V2 has no resume_from_checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import worker_loop

    if cfg.train.device not in ("cpu", "cuda"):
        raise ValueError(f"torch_trainer needs a placed config (train.device cpu or cuda, got {cfg.train.device})")
    gpu = cfg.train.device == "cuda"
    return TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "data": data,
                           "checkpoint_key": checkpoint_key, "init_weights": init_weights,
                           "in_search": in_search, "start_from": start_from},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name=name, storage_path=str(storage_path), callbacks=callbacks,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
    )
