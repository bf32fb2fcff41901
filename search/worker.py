"""The Ray Train worker: the training loop of trainer.py under DeepSpeed (or DDP).

Every rank maps the node's one read-only copy of the splits in Ray's object store
(search/shared_data.py), trains on its shard, evaluates its shard of valid/test on every pattern, gathers
the predictions, and reports metrics + per-pattern results + a checkpoint every epoch.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.loader import SplitTensors, stage_splits
from data_pipeline.presets import EVALUATED_SPLITS

from .config import TRIAL_CONTEXT, ExperimentConfig
from .evaluation_plan import TestGridPlan
from .nested_runs import EPOCH_FILE
from .evaluate import ShardPredictions, pattern_metrics, predict_patterns, scatter_rows, split_fingerprint
from .optim import DeepSpeedStep, OptimizerStep
from .results import EpochReport, EpochResults, epoch_metrics
from .shared_data import DATA_PRIVATE_MB
from .row_parallel import eval_streams
from .trainer import (TrainState, autocast_dtype, build_state, checkpoint_due, load_state, param_dtype, save_state,
                      search_objective, train_epoch, unwrap)

CLIENT_STATE_FILE = "client_state.pt"  # DDP checkpoints: model/optimizer/scheduler + epoch


@dataclass(frozen=True)
class Rank:
    """Where this worker stands: its ranks and the device Ray assigned it."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def worker_loop(loop_config: dict) -> None:
    import ray

    cfg = ExperimentConfig.model_validate(loop_config["config"], context=TRIAL_CONTEXT)  # checked by the driver
    me = _rank(cfg)
    splits, data_mb = loop_config["data"].load_measured()  # the node's one copy in the object store
    init = loop_config.get("init_weights")  # train --init-from: in the object store, checked by the driver
    state = build_state(cfg, splits["train"], me.device, world_size=me.world_size,
                        init_weights=None if init is None else ray.get(init))
    engine, step = setup_engine(state, cfg)
    resume_from_checkpoint(state, engine, me.device, loop_config.get("start_from"))
    splits = stage_splits(splits, me.device)
    # DeepSpeed's engine runs its forward under its own torch_autocast (deepspeed_config); the
    # losses, outside the engine, need the same context (the engine's nested one matches it).
    autocast_to = autocast_dtype(cfg)
    # Every rank gathers the same valid results, so all take the same decision (ZeRO-3's
    # evaluation is collective).
    plan = TestGridPlan(cfg, loop_config.get("in_search", False), state.best_objectives)
    while state.epoch < cfg.train.epochs:
        started = time.perf_counter()
        losses = train_epoch(state, cfg, splits["train"], me.device, rank=me.rank, world_size=me.world_size,
                             step=step, dtype=param_dtype(state.model), autocast_to=autocast_to)
        trained = time.perf_counter()
        results, fingerprints = evaluate_shard(state, engine, cfg, splits, me, ("valid",))
        if plan.due(state.epoch, results["valid"]):
            test, test_fingerprints = evaluate_shard(state, engine, cfg, splits, me, ("test",))
            results, fingerprints = results | test, fingerprints | test_fingerprints
        state.best_objectives = plan.best
        extra = {**fingerprints, DATA_PRIVATE_MB: data_mb}
        report = EpochReport(state.epoch, losses, results, search_objective(results, cfg), trained - started,
                             time.perf_counter() - trained)
        state.epoch += 1
        report_epoch(state, engine, cfg, report, extra, me, loop_config["checkpoint_key"])
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        # ZeRO-3 otherwise sometimes aborts at interpreter exit (measured).
        dist.destroy_process_group()


def _rank(cfg: ExperimentConfig) -> Rank:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    device = torch.device("cpu")
    if cfg.train.device == "cuda":  # the driver's placement: Ray gave this worker a GPU
        device = ray.train.torch.get_device()  # that GPU (not cuda:<local rank>: Ray may assign another)
        torch.cuda.set_device(device)
    return Rank(ctx.get_world_rank(), ctx.get_local_rank(), ctx.get_world_size(), device)


def deepspeed_config(cfg: ExperimentConfig) -> dict:
    """bf16 is DeepSpeed's torch_autocast: fp32 weights and gradients, so gradients accumulate
    and reduce in fp32 on every ZeRO stage (its bf16 mode holds bf16 weights, and at stage 0
    cannot accumulate in fp32: 0.19.8 raises for grad_accum_dtype fp32) and the numbers match
    in-process bf16. `lower_precision_safe_modules: []` keeps gradient communication in fp32
    (by default Linear weights reduce in bf16). fp16 is its fp16 engine with loss scaling."""
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "torch_autocast": {"enabled": t.precision == "bf16", "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def setup_engine(state: TrainState, cfg: ExperimentConfig):
    """Wrap the model for `train.engine`; returns (the DeepSpeed engine or None, the optimizer step)."""
    if cfg.train.engine == "deepspeed":
        import deepspeed

        # DeepSpeed reuses the process group Ray Train created (gloo on CPU, nccl on GPU).
        lr_lambda = state.scheduler.lr_lambdas[0]
        engine, _, _, _ = deepspeed.initialize(
            model=state.model, optimizer=state.optimizer, config=deepspeed_config(cfg),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), dist_init_required=False)
        state.model = engine
        return engine, DeepSpeedStep(engine)
    import ray.train.torch

    state.model = ray.train.torch.prepare_model(state.model, move_to_device=False)
    return None, OptimizerStep(state.model, state.optimizer, state.scheduler, cfg)


def resume_from_checkpoint(state: TrainState, engine, device: torch.device, start_from=None) -> None:
    """Continue from this run's latest checkpoint, else from `start_from` (an earlier run's,
    search/nested_runs.py), if any: state.epoch becomes the next epoch."""
    import ray.train

    checkpoint = ray.train.get_checkpoint() or start_from
    if checkpoint is None:
        return
    with checkpoint.as_directory() as ckpt_dir:
        if engine is not None:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag="state")
            state.epoch = int(client_state["epoch"]) + 1
            state.best_objectives = client_state.get("best_objectives")
        else:
            load_state(state, Path(ckpt_dir) / CLIENT_STATE_FILE, device)


def evaluate_shard(state: TrainState, engine, cfg: ExperimentConfig, splits: dict[str, SplitTensors],
                   me: Rank, evaluated: tuple[str, ...] = EVALUATED_SPLITS) -> tuple[EpochResults, dict[str, str]]:
    """Each evaluated split's per-pattern metrics from every rank's shard, and its mask fingerprint.

    ZeRO-3 partitions the weights and gathers them module by module in the engine's forward:
    evaluate through the engine, one pattern at a time, and with several ranks run the same
    forward passes on every rank (no encodings reused, which depends on rows). Otherwise each
    rank holds whole weights: evaluate the bare module (no DDP buffer broadcast, no engine
    hooks), several patterns at a time on CPU."""
    zero3 = engine is not None and cfg.train.zero_stage == 3
    model = state.model if zero3 else unwrap(state.model)
    patterns = cfg.missing.patterns()
    results, fingerprints = {}, {}
    for split in evaluated:
        data = splits[split]
        shard = predict_patterns(model, data, patterns, seed=cfg.missing.seed,
                                 batch_size=cfg.train.eval_rows(me.device), device=me.device,
                                 dtype=param_dtype(state.model), autocast=autocast_dtype(cfg),
                                 rank=me.rank, world_size=me.world_size,
                                 streams=1 if zero3 else eval_streams(cfg, me.device),
                                 reuse_encodings=not (zero3 and me.world_size > 1))
        preds, digests = _gather(shard, len(data), me.world_size)
        results[split] = pattern_metrics(preds, data, patterns)
        fingerprints[f"mask_fingerprint/{split}"] = split_fingerprint(digests)
    return results, fingerprints


def _gather(shard: ShardPredictions, n: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-split (P, N) predictions and mask digests from every rank's shard."""
    pieces = [shard]
    if world_size > 1:
        pieces = [None] * world_size
        dist.all_gather_object(pieces, shard)
    rows = np.concatenate([p.rows for p in pieces])
    return (scatter_rows(n, np.concatenate([p.preds for p in pieces], axis=1), rows),
            scatter_rows(n, np.concatenate([p.digests for p in pieces], axis=1), rows))


def report_epoch(state: TrainState, engine, cfg: ExperimentConfig, report: EpochReport,
                 extra: dict, me: Rank, checkpoint_key: str) -> None:
    """Report the epoch (with `extra` metrics: mask fingerprints, memory) to Ray Train (its
    callback stores rank 0's results), with a checkpoint every `train.checkpoint_every`
    epochs and after the last."""
    import ray.train

    metrics = {**epoch_metrics(report, cfg.search), **extra}
    if not checkpoint_due(state, cfg):
        ray.train.report(metrics)
        return
    # DeepSpeed: one directory per node that all its ranks write their partitions into;
    # DDP: rank 0 writes the state, other ranks report an empty directory.
    owner = engine is None or me.local_rank == 0  # who creates and removes the directory
    suffix = f"e{report.epoch}" if engine is not None else f"e{report.epoch}-r{me.rank}"
    ckpt_dir = Path(tempfile.gettempdir()) / f"msa-ckpt-{checkpoint_key}-{suffix}"
    if owner:
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # stale, from an attempt that died here
    if me.world_size > 1:
        dist.barrier()
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        # Collective: every rank writes its ZeRO partition into the same directory layout.
        engine.save_checkpoint(str(ckpt_dir), tag="state",
                               client_state={"epoch": report.epoch, "best_objectives": state.best_objectives})
    elif me.rank == 0:
        save_state(state, ckpt_dir / CLIENT_STATE_FILE)  # state.epoch is already the next epoch
    if me.rank == 0:  # which epoch it holds, read without loading it (search/nested_runs.py)
        (ckpt_dir / EPOCH_FILE).write_text(json.dumps({"epoch": report.epoch}))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(ckpt_dir)))
    if me.world_size > 1:
        dist.barrier()  # every rank has uploaded before the shared directory goes
    if owner:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
