"""The Ray Train worker: the model-agnostic loop of trainer.py under DeepSpeed (or DDP).

Every rank reads the Parquet store itself (nothing large travels through the object
store), trains on its shard, evaluates its shard of valid/test on every pattern, gathers
the predictions, and reports metrics + result rows + a checkpoint every epoch.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.loader import load_split
from data_pipeline.presets import SPLITS
from data_pipeline.store import read_spec

from .config import ExperimentConfig
from .results import epoch_metrics
from .evaluate import ShardPredictions, metrics_rows, predict_patterns, scatter_rows, split_fingerprint
from .row_parallel import eval_streams
from .trainer import (EpochReport, build_state, load_state, objective_value, resolve_device, save_state, train_epoch,
                      unwrap)

CLIENT_STATE_FILE = "client_state.pt"  # DDP checkpoints: model/optimizer/scheduler + epoch


def deepspeed_config(cfg: ExperimentConfig) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _gather(shard: ShardPredictions, n: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Whole-split (P, N) predictions and mask digests from every rank's shard."""
    pieces = [shard]
    if world_size > 1:
        pieces = [None] * world_size
        dist.all_gather_object(pieces, shard)
    rows = np.concatenate([p.rows for p in pieces])
    return (scatter_rows(n, np.concatenate([p.preds for p in pieces], axis=1), rows),
            scatter_rows(n, np.concatenate([p.digests for p in pieces], axis=1), rows))


def worker_loop(loop_config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    cfg = ExperimentConfig.model_validate(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)

    store = loop_config["store"]
    spec = read_spec(store)
    splits = {s: load_split(store, s, spec) for s in SPLITS}
    state = build_state(cfg, splits["train"], device, world_size=world_size)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None

    if cfg.train.engine == "deepspeed":
        import deepspeed

        # DeepSpeed reuses the process group Ray Train created (gloo on CPU, nccl on GPU).
        lr_lambda = state.scheduler.lr_lambdas[0]
        engine, _, _, _ = deepspeed.initialize(
            model=state.model, optimizer=state.optimizer, config=deepspeed_config(cfg),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda), dist_init_required=False)
        state.model = engine

        def step_fn(total: torch.Tensor) -> None:
            engine.backward(total)
            engine.step()
    else:
        state.model = ray.train.torch.prepare_model(state.model, move_to_device=False)
        engine = None

        def step_fn(total: torch.Tensor) -> None:
            (total / cfg.train.grad_accum).backward()
            step_fn.calls += 1
            if step_fn.calls % cfg.train.grad_accum == 0:
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.train.grad_clip)
                state.optimizer.step()
                state.optimizer.zero_grad(set_to_none=True)
                state.scheduler.step()
        step_fn.calls = 0

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            _load(state, engine, Path(ckpt_dir))

    patterns = cfg.missing.patterns()
    # ZeRO-3 partitions the weights and gathers them module by module in the engine's
    # forward: evaluate through the engine, one pattern at a time, and with several ranks
    # run the same forward passes on every rank (no encodings reused, which depends on rows).
    # Otherwise each rank holds whole weights: evaluate the bare module (no DDP buffer
    # broadcast, no engine hooks), several patterns at a time on CPU.
    zero3 = engine is not None and cfg.train.zero_stage == 3
    zero3_sharded = zero3 and world_size > 1
    eval_model = state.model if zero3 else unwrap(state.model)
    streams = 1 if zero3 else eval_streams(cfg, device)
    while state.epoch < cfg.train.epochs:
        epoch = state.epoch
        started = time.perf_counter()
        losses = train_epoch(state, cfg, splits["train"], device, rank=rank, world_size=world_size,
                             step_fn=step_fn, dtype=dtype)
        trained = time.perf_counter()
        results, fingerprints = {}, {}
        for split in ("valid", "test"):
            data = splits[split]
            shard = predict_patterns(eval_model, data, patterns, seed=cfg.missing.seed,
                                     batch_size=max(cfg.train.batch_size, 128), device=device, dtype=dtype,
                                     rank=rank, world_size=world_size, streams=streams,
                                     reuse_encodings=not zero3_sharded)
            preds, digests = _gather(shard, len(data), world_size)
            results[split] = metrics_rows(preds, data, patterns)
            fingerprints[f"mask_fingerprint/{split}"] = split_fingerprint(digests)
        report = EpochReport(epoch, losses, results, objective_value(results, cfg), trained - started,
                             time.perf_counter() - trained)
        metrics = {**epoch_metrics(report, {n: objective_value(results, cfg, n) for n in cfg.search.objectives}),
                   **fingerprints, "time/train_s": report.train_time_s, "time/eval_s": report.eval_time_s}
        state.epoch += 1
        if state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == cfg.train.epochs:
            # DeepSpeed: one directory per node that all its ranks write their partitions into;
            # DDP: rank 0 writes the state, other ranks report an empty directory.
            suffix = f"e{epoch}" if engine is not None else f"e{epoch}-r{rank}"
            ckpt_dir = Path(tempfile.gettempdir()) / f"msa-ckpt-{loop_config['checkpoint_key']}-{suffix}"
            if engine is None or ctx.get_local_rank() == 0:
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # stale, from an attempt that died here
            if world_size > 1:
                dist.barrier()
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            _save(state, engine, ckpt_dir, epoch, rank)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt_dir)))
            if world_size > 1:
                dist.barrier()  # every rank has uploaded before the shared directory goes
            if engine is None or ctx.get_local_rank() == 0:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        else:
            ray.train.report(metrics)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        # ZeRO-3 otherwise sometimes aborts at interpreter exit (measured).
        dist.destroy_process_group()


def _save(state, engine, ckpt_dir: Path, epoch: int, rank: int) -> None:
    if engine is not None:
        # Collective: every rank writes its ZeRO partition into the same directory layout.
        engine.save_checkpoint(str(ckpt_dir), tag="state", client_state={"epoch": epoch})
    elif rank == 0:
        save_state(state, ckpt_dir / CLIENT_STATE_FILE)  # state.epoch is already the next epoch


def _load(state, engine, ckpt_dir: Path) -> None:
    """Restore a checkpoint; state.epoch becomes the next epoch to run."""
    if engine is not None:
        _, client_state = engine.load_checkpoint(str(ckpt_dir), tag="state")
        state.epoch = int(client_state["epoch"]) + 1
    else:
        load_state(state, ckpt_dir / CLIENT_STATE_FILE)
