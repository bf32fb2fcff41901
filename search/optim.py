"""The optimizer, its learning-rate schedule, and the one optimizer step of every training path.

Gradient accumulation is the same everywhere (in-process, DDP workers, DeepSpeed workers):
groups of `train.grad_accum` batches, each batch's loss scaled by 1/grad_accum, one update
per group, and the last batch of an epoch always closes its group (a shorter one), so an
epoch never leaves gradients behind for the next. The learning-rate schedule counts those
updates.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from data_pipeline.loader import batch_rows

from .config import ExperimentConfig


def build_optimizer(params, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    # fused: one kernel per parameter doing the whole AdamW update (CPU and CUDA), the same
    # arithmetic. Measured on CPU: 3.5x faster than foreach=True (whose CPU path is a slow
    # per-tensor fallback) and 2.6x faster than the default loop; ~3% of an LNLN step.
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base lr, then cosine decay to 0 (LNLN's reference schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        rest = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / rest)))
    return factor


def updates_per_epoch(n_train: int, cfg: ExperimentConfig, world_size: int = 1) -> int:
    batches = len(batch_rows(n_train, cfg.train.batch_size, shuffle=False, seed=0, epoch=0,
                             rank=0, world_size=world_size))
    return -(-batches // cfg.train.grad_accum)


def build_lr_schedule(optimizer: torch.optim.Optimizer, cfg: ExperimentConfig, n_train: int,
                      world_size: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    per_epoch = updates_per_epoch(n_train, cfg, world_size)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.train.warmup_epochs * per_epoch, cfg.train.epochs * per_epoch))


def closes_group(step: int, n_batches: int, grad_accum: int) -> bool:
    """Whether batch `step` (0-based) of an epoch of `n_batches` ends an accumulation group."""
    return (step + 1) % grad_accum == 0 or step + 1 == n_batches


class OptimizerStep:
    """In-process and DDP: the caller's backward adds `loss_scale * d(loss)` to the gradients;
    at the end of each group: clip, step, clear the gradients, advance the lr schedule."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: ExperimentConfig):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.grad_clip = cfg.train.grad_clip
        self.loss_scale: float | None = 1.0 / cfg.train.grad_accum

    def begin(self, closes: bool) -> None:
        pass

    def __call__(self, total: torch.Tensor, closes: bool) -> None:
        if not closes:
            return
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


class DeepSpeedStep:
    """A DeepSpeed engine runs backward (scaled by 1/gradient_accumulation_steps), clipping,
    the update and the lr schedule itself; we tell it where each group ends, which its own
    micro-step counter (running across epochs) would place elsewhere."""

    loss_scale = None  # the engine's backward, not the caller's

    def __init__(self, engine):
        self.engine = engine

    def begin(self, closes: bool) -> None:
        # Before the batch's forward, as DeepSpeed asks (ZeRO reduces gradients by it).
        self.engine.set_gradient_accumulation_boundary(closes)

    def __call__(self, total: torch.Tensor, closes: bool) -> None:
        self.engine.backward(total)
        self.engine.step()
