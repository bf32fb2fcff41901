"""`msa-search train` on Ray Train: a TorchTrainer whose workers run search/worker.py.

The driver prepares the Parquet store once, starts the run, and shows progress; a Ray
Train callback (in the controller process) appends every reported epoch to the Parquet
results store, keyed by (run, epoch), so a resumed run never duplicates rows.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import torch
from rich.console import Console

from data_pipeline.errors import MsaSearchError
from data_pipeline.source import prepare_store
from models.registry import get_model

from .config import ExperimentConfig, load_config
from .results import ResultsStore, flatten
from .run import prepare_run_dir

EPOCH_LOG = "epochs.jsonl"


def check_distributed_config(cfg: ExperimentConfig) -> None:
    """Errors Ray would only show after start-up, raised before anything starts."""
    gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    if cfg.train.precision == "fp16" and not gpu:
        raise MsaSearchError("train.precision: fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16); "
                             "use bf16 or fp32 on CPU")
    if cfg.train.precision != "fp32" and cfg.train.engine == "ddp":
        raise MsaSearchError(f"train.precision: {cfg.train.precision} needs train.engine: deepspeed; "
                             "the ddp engine trains in fp32")
    if cfg.train.zero_stage and cfg.train.engine == "ddp":
        raise MsaSearchError("train.zero_stage needs train.engine: deepspeed")
    if cfg.model.adversarial.disc_steps > 1:
        raise MsaSearchError("model.adversarial.disc_steps > 1 is supported in-process only (train.workers: 0): "
                             "extra discriminator steps bypass the distributed engine's gradient sync")
    get_model(cfg.model.name).loss_weights(cfg.model.loss_weights)


def cpu_layout_hint(cfg: ExperimentConfig, gpu: bool) -> str | None:
    """Advice for CPU runs whose workers run multi-threaded ops (README: one CPU per worker)."""
    cpus = cfg.train.cpus_per_worker
    if gpu or cpus < 2:
        return None
    total = int(cfg.train.workers * cpus)
    return (f"note: on CPU, {total} workers x 1 CPU usually train faster than {cfg.train.workers} x {cpus:g}: "
            "a multi-threaded worker stalls whenever Ray's own processes wake on one of its cores "
            f"(set train.workers={total} train.cpus_per_worker=1)")


def _make_callback(run_dir: Path, run_id: str, cfg: ExperimentConfig):
    from ray.train import UserCallback

    hparams = flatten(cfg.model_dump(mode="json"))
    experiment, model = run_dir.name, cfg.model.name

    class ResultsCallback(UserCallback):
        """Runs in the Ray Train controller: rank 0's report -> results store + epoch log."""

        def __init__(self):
            self.started = time.time()

        def after_report(self, run_context, metrics, checkpoint):
            report = metrics[0]
            if "rows" not in report:
                return
            epoch = int(report["epoch"])
            ResultsStore(run_dir / "results").write_report(
                report, experiment=experiment, trial_id=run_id, model=model,
                wall_time_s=time.time() - self.started, hparams=hparams)
            line = {"epoch": epoch, "robust_f1": report["robust_f1"], "checkpoint": checkpoint is not None,
                    **{k: v for k, v in report.items() if k.startswith(("mask_fingerprint/", "time/"))},
                    "losses": {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith("loss/")}}
            with (run_dir / EPOCH_LOG).open("a") as fh:
                fh.write(json.dumps(line) + "\n")

    return ResultsCallback()


def _watch_progress(run_dir: Path, epochs: int, console: Console, stop: threading.Event) -> None:
    """Print a line per finished epoch (the callback writes them from another process)."""
    path, seen = run_dir / EPOCH_LOG, 0
    while not stop.is_set() or (path.exists() and len(path.read_text().splitlines()) > seen):
        lines = path.read_text().splitlines() if path.exists() else []
        for raw in lines[seen:]:
            e = json.loads(raw)
            terms = "  ".join(f"{k} {v:.3f}" for k, v in e["losses"].items() if k != "total")
            console.print(f"epoch {e['epoch'] + 1}/{epochs}  loss {e['losses']['total']:.4f}  {terms}  "
                          f"valid robust_f1 {e['robust_f1']:.4f}" + ("  (checkpoint)" if e["checkpoint"] else ""),
                          highlight=False)
        seen = len(lines)
        stop.wait(0.5)


def _worker_error(exc: Exception) -> str:
    """The root cause out of Ray's multi-line worker error report (its last 'XxxError: ...' line)."""
    lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
    causes = [l for l in lines if not l.startswith(("File ", "Traceback", "[Rank", "The above")) and ": " in l
              and l.split(":", 1)[0].replace(".", "").isidentifier()]
    return causes[-1] if causes else (lines[0] if lines else repr(exc))


# Ray starts its worker processes at niceness 15 so that its own daemons stay responsive.
# A training worker then loses the CPU to every raylet/GCS/dashboard wake-up, and its
# OpenMP threads stall at each barrier while one of them waits: measured 20-30% slower
# epochs than the same loop outside Ray on a 2-core machine. Training is the only work
# these workers do, so they run at normal priority. (`ray start` takes the same setting
# from the environment: RAY_worker_niceness=0.)
LOCAL_RAY_SYSTEM_CONFIG = {"worker_niceness": 0}


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


def train_distributed(cfg: ExperimentConfig | None, *, resume_dir: Path | None = None,
                      console: Console | None = None, ray_address: str | None = None) -> tuple[Path, dict]:
    """Run (or resume) one distributed training run. Returns the run dir and the last metrics."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .worker import worker_loop

    console = console or Console(stderr=True, markup=False)
    if resume_dir is not None:
        run_dir = Path(resume_dir).resolve()
        if not (run_dir / "config.yaml").is_file():
            raise MsaSearchError(f"{run_dir}: nothing to resume (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
    else:
        run_dir = Path(cfg.output.dir).resolve()
    if cfg.train.workers < 1:
        raise MsaSearchError("train.workers must be >= 1 for a distributed run")
    check_distributed_config(cfg)
    if resume_dir is None:
        prepare_run_dir(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    store = prepare_store(cfg.data, run_dir / "data")
    gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    hint = cpu_layout_hint(cfg, gpu)
    if hint:
        console.print(hint, highlight=False)
    ensure_ray(ray_address)
    run_id = run_dir.name
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "store": str(store), "run_id": run_id,
                           # names the node-local checkpoint staging dirs: unique per run directory
                           "checkpoint_key": hashlib.blake2b(str(run_dir).encode(), digest_size=6).hexdigest()},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(
            name="train", storage_path=str(run_dir / "checkpoints"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[_make_callback(run_dir, run_id, cfg)]),
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(run_dir, cfg.train.epochs, console, stop), daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: one actionable line
        raise MsaSearchError(f"training failed: {_worker_error(exc)}; continue from the last checkpoint with: "
                             f"msa-search train --resume {run_dir}") from exc
    finally:
        stop.set()
        watcher.join(timeout=5)
    return run_dir, dict(result.metrics or {})
