"""The model-agnostic training loop: one epoch of forward, weighted loss terms and the
optimizer step (search/optim.py), then evaluation of valid and test on every pattern.

It knows a model only through its registry entry (builder, loss terms, adversarial terms)
and the module interface `forward(batch, progress)` / `losses(outputs, batch, progress)`.
The in-process run, Tune trials and the Ray Train workers all run `train_epoch`.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from data_pipeline.atomic import atomic_file, writing
from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import SplitTensors, batch_rows, make_batch, stage_splits
from models.entry import ModelEntry
from models.dropout import dropout_generator
from models.registry import get_model

from .config import ExperimentConfig
from .devices import autocast, configure_torch, in_process_device
from .evaluate import evaluate_patterns
from .evaluation_plan import TestGridPlan
from .objective import objective_value
from .optim import DeepSpeedStep, OptimizerStep, build_lr_schedule, build_optimizer, closes_group
from .results import EpochReport, EpochResults
from .row_parallel import (eval_streams, one_thread_between_chunks, resolve_chunks, row_parallel_backward,
                           step_generators)


class TrainingDiverged(MsaSearchError):
    """The loss became NaN/Inf: the trial ends with this reason; a search goes on."""


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    entry: ModelEntry
    weights: dict[str, float]
    disc_optimizer: torch.optim.Optimizer | None = None  # extra discriminator steps only
    epoch: int = 0  # next epoch to run
    history: list[EpochReport] = field(default_factory=list)
    best_objectives: list[float] | None = None  # the run's best so far (search/evaluation_plan.py)


def unwrap(model: nn.Module) -> nn.Module:
    """The registry's module inside a DDP wrapper or a DeepSpeed engine."""
    return getattr(model, "module", model)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_dtype(cfg: ExperimentConfig) -> torch.dtype | None:
    """`train.precision: bf16` runs forward passes under bf16 autocast on every path (weights,
    gradients, labels and losses stay fp32); fp16 is DeepSpeed's engine, which casts the weights."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else None


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype batches are cast to: the weights' (half under DeepSpeed fp16, else fp32)."""
    return next(unwrap(model).parameters()).dtype


def build_state(cfg: ExperimentConfig, train: SplitTensors, device: torch.device, world_size: int = 1,
                init_weights: dict[str, torch.Tensor] | None = None) -> TrainState:
    """A fresh state; `init_weights` (search/weights.py, checked to fit) replace the initial weights."""
    configure_torch(cfg, device)
    seed_everything(cfg.train.seed)
    entry = get_model(cfg.model.name)
    weights = entry.loss_weights(cfg.model.loss_weights, train.spec.name)
    model = entry.build(cfg.model, train.spec)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    model = model.to(device)
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_lr_schedule(optimizer, cfg, len(train), world_size)
    disc_optimizer = None
    if cfg.model.adversarial.disc_steps > 1 and hasattr(model, "discriminator_loss"):
        disc_optimizer = build_optimizer(model.discriminator_parameters(), cfg)
    return TrainState(model, optimizer, scheduler, entry, weights, disc_optimizer)


def save_state(state: TrainState, path: Path) -> None:
    """Model, optimizer, scheduler and the next epoch to run, written atomically (a full or
    read-only disk half-way: the previous checkpoint stays, and the error names the file)."""
    # Through a Python file: torch.save to a path turns a failed write into a RuntimeError
    # without its errno ("unexpected pos ..."); this way it is the OSError.
    with writing(path, kept="any previous checkpoint there is kept"), atomic_file(path, force=True) as tmp, \
            open(tmp, "wb") as fh:
        torch.save({"epoch": state.epoch, "model": unwrap(state.model).state_dict(),
                    "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                    "rng": _rng_state(state), "best_objectives": state.best_objectives}, fh)


def _rng_state(state: TrainState) -> dict:
    """The generators training draws from (dropout on a GPU or in a Ray Train worker: torch's),
    so a restored run continues as if it never stopped. In-process CPU steps draw from
    generators of their own, functions of (train.seed, epoch, batch, chunk): nothing to save."""
    device = next(unwrap(state.model).parameters()).device
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(saved: dict | None, device: torch.device) -> None:
    if saved is None:  # a checkpoint from before the generators were saved
        return
    torch.set_rng_state(saved["torch"].cpu())
    np.random.set_state(saved["numpy"])
    random.setstate(saved["python"])
    if saved["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda"].cpu(), device)


# Besides tensors and plain containers, a checkpoint holds numpy's generator state (_rng_state).
# These rebuild its array and dtype and run no code: torch's documented way to allow numpy arrays.
NUMPY_GLOBALS = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: Path, map_location: torch.device | str) -> object:
    """A file `save_state` wrote (or any weights file), unpickled without running code
    (torch.load weights_only): a checkpoint from elsewhere cannot execute anything."""
    with torch.serialization.safe_globals(NUMPY_GLOBALS):
        return torch.load(path, map_location=map_location, weights_only=True)


def load_state(state: TrainState, path: Path, device: torch.device) -> None:
    """Restore what `save_state` wrote onto `device` (a GPU checkpoint resumes on a CPU node,
    and each rank loads onto its own GPU); training continues at the saved next epoch."""
    saved = load_checkpoint(path, device)
    unwrap(state.model).load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.epoch = int(saved["epoch"])
    state.best_objectives = saved.get("best_objectives")
    _set_rng_state(saved.get("rng"), device)


def checkpoint_due(state: TrainState, cfg: ExperimentConfig) -> bool:
    """After an epoch (state.epoch is the next one): every `train.checkpoint_every` epochs and after the last."""
    return state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == cfg.train.epochs


def epoch_weights(state: TrainState, cfg: ExperimentConfig, epoch: int) -> dict[str, float]:
    """Loss weights for an epoch: adversarial terms are off during the adversarial warm-up."""
    if epoch < cfg.model.adversarial.warmup_epochs:
        return {k: (0.0 if k in state.entry.adversarial_terms else w) for k, w in state.weights.items()}
    return state.weights


def train_epoch(state: TrainState, cfg: ExperimentConfig, train: SplitTensors, device: torch.device, *,
                rank: int = 0, world_size: int = 1, on_step: Callable[[int, int, dict], None] | None = None,
                step: OptimizerStep | DeepSpeedStep | None = None, dtype: torch.dtype | None = None,
                autocast_to: torch.dtype | None = None) -> dict[str, float]:
    """One epoch over this rank's shard. Returns the mean of each loss term and of the total.

    `step` is the optimizer step (search/optim.py; default: the in-process one); `dtype`
    casts the batch's features (DeepSpeed fp16 holds half weights; labels stay fp32);
    `autocast_to` runs each forward under autocast (bf16). A step makes one host sync: the
    stacked loss values, read once for the epoch's means and the divergence check.
    """
    epoch, model = state.epoch, state.model
    core = unwrap(model)  # the model's own methods (losses); wrappers only run forward
    # Ray Train workers pass their step: DDP and DeepSpeed need their own backward(), while
    # in-process CPU training may split each batch into row chunks that run in parallel, each
    # chunk's dropout drawing from its own generator (one chunk too: the same reproducibility).
    distributed = step is not None or core is not model
    chunks = resolve_chunks(cfg, state.entry, device, distributed=distributed)
    own_generators = device.type == "cpu" and not distributed
    step = step or OptimizerStep(model, state.optimizer, state.scheduler, cfg)
    model.train()
    weights = epoch_weights(state, cfg, epoch)
    training_missing = cfg.missing.training()
    batches = batch_rows(len(train), cfg.train.batch_size, shuffle=True, seed=cfg.train.seed, epoch=epoch,
                         rank=rank, world_size=world_size)
    sums: dict[str, float] = {}
    with one_thread_between_chunks(chunks):  # the main thread's share of each step
        for i, rows in enumerate(batches):
            closes = closes_group(i, len(batches), cfg.train.grad_accum)
            step.begin(closes)
            batch = make_batch(train, rows, training_missing, seed=cfg.missing.seed, epoch=epoch, device=device,
                               dtype=dtype)
            progress = (epoch + i / len(batches)) / cfg.train.epochs
            generators = step_generators(cfg.train.seed, epoch, i, chunks) if own_generators else None
            outputs, terms, total = forward_backward(model, core, batch, weights, progress, chunks=chunks,
                                                     scale=step.loss_scale, inject_nan=cfg.train.inject_nan,
                                                     autocast_to=autocast_to, generators=generators)
            # The step's one host sync: every logged value in one copy (each float() would be one).
            values = dict(zip([*terms, "total"], torch.stack([*(v.detach() for v in terms.values()), total.detach()])
                              .float().tolist()))
            if not math.isfinite(values["total"]):  # before any optimizer step
                detail = ", ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "total")
                raise TrainingDiverged(f"loss is {values['total']} at epoch {epoch} step {i} ({detail})")
            step(total, closes)
            extra_discriminator_steps(state, cfg, outputs)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value
            if on_step is not None:
                on_step(i + 1, len(batches), {k: v / (i + 1) for k, v in sums.items()})
    return {k: v / len(batches) for k, v in sums.items()}


def forward_backward(model: nn.Module, core: nn.Module, batch, weights: dict[str, float], progress: float, *,
                     chunks: int = 1, scale: float | None = 1.0, inject_nan: bool = False,
                     autocast_to: torch.dtype | None = None, generators: list[torch.Generator] | None = None,
                     ) -> tuple[dict | None, dict[str, torch.Tensor], torch.Tensor]:
    """One batch's outputs, loss terms and weighted total; with `scale`, also adds
    `scale * d(total)` to the gradients (None: the caller's engine runs backward). With
    `chunks` > 1 the rows run in parallel chunks (search/row_parallel.py) and the outputs,
    which no single chunk has, are None. Chunk i's dropout draws from `generators[i]` (None:
    torch's generator). With `autocast_to` the forward and the losses run under autocast
    (entered here: chunks run in threads, and autocast state is per thread); losses read some
    outputs through modules (HRLF's decoders), and compute their arithmetic in fp32."""
    def batch_loss(part) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
        with autocast(part.label.device, autocast_to):
            outputs = model(part, progress=progress)
            terms = core.losses(outputs, part, progress)
        # Terms outside `weights` (a model's LOGGED_TERMS, e.g. HRLF's FRF sub-terms) are logged, not trained.
        total = sum(weights[name] * value for name, value in terms.items() if name in weights)
        return outputs, terms, total * float("nan") if inject_nan else total

    if chunks > 1:
        terms, total = row_parallel_backward(model, batch, chunks, scale, lambda part: batch_loss(part)[1:],
                                             generators)
        return None, terms, total
    with dropout_generator(generators[0] if generators else None):
        outputs, terms, total = batch_loss(batch)
    if scale is not None:
        (total * scale).backward()
    return outputs, terms, total


def extra_discriminator_steps(state: TrainState, cfg: ExperimentConfig, outputs: dict) -> None:
    """`model.adversarial.disc_steps - 1` extra updates of the discriminator alone, on the
    step's detached features (models expose `discriminator_loss` / `discriminator_parameters`)."""
    if state.disc_optimizer is None:
        return
    for _ in range(cfg.model.adversarial.disc_steps - 1):
        state.disc_optimizer.zero_grad(set_to_none=True)
        unwrap(state.model).discriminator_loss(outputs).backward()
        state.disc_optimizer.step()
    # Leave no discriminator gradient behind for the next generator step.
    state.disc_optimizer.zero_grad(set_to_none=True)


def evaluate_epoch(model: nn.Module, cfg: ExperimentConfig, splits: dict[str, SplitTensors],
                   device: torch.device) -> EpochResults:
    """Every pattern's metrics on each of `splits`, in the training precision (in-process models)."""
    patterns = cfg.missing.patterns()
    streams = eval_streams(cfg, device) if unwrap(model) is model else 1
    return {name: evaluate_patterns(model, data, patterns, seed=cfg.missing.seed,
                                    batch_size=cfg.train.eval_rows(device), device=device, streams=streams,
                                    dtype=param_dtype(model), autocast=autocast_dtype(cfg))
            for name, data in splits.items()}


def search_objective(results: EpochResults, cfg: ExperimentConfig) -> float:
    """`search.objective` on the validation split over `search.objective_patterns`."""
    return objective_value(results["valid"], cfg.search.objective, cfg.search.objective_patterns)


def fit(cfg: ExperimentConfig, splits: dict[str, SplitTensors], *, device: torch.device | None = None,
        on_epoch: Callable[[TrainState, EpochReport], None] | None = None,
        on_step: Callable[[int, int, dict], None] | None = None,
        state: TrainState | None = None, in_search: bool = False) -> TrainState:
    """Train for `cfg.train.epochs` (from `state.epoch` when resuming), evaluating the grid on
    valid after every epoch, and on test after the epochs `train.eval_test` names (`in_search`:
    a search's trial, where auto means improved)."""
    device = device or in_process_device(cfg)
    state = state or build_state(cfg, splits["train"], device)
    splits = stage_splits(splits, device)  # on the GPU where they fit
    plan = TestGridPlan(cfg, in_search, state.best_objectives)
    while state.epoch < cfg.train.epochs:
        start = time.perf_counter()
        losses = train_epoch(state, cfg, splits["train"], device, on_step=on_step, autocast_to=autocast_dtype(cfg))
        mid = time.perf_counter()
        results = evaluate_epoch(state.model, cfg, {"valid": splits["valid"]}, device)
        if plan.due(state.epoch, results["valid"]):
            results |= evaluate_epoch(state.model, cfg, {"test": splits["test"]}, device)
        state.best_objectives = plan.best
        report = EpochReport(state.epoch, losses, results, search_objective(results, cfg), mid - start,
                             time.perf_counter() - mid)
        state.history.append(report)
        state.epoch += 1
        if on_epoch is not None:
            on_epoch(state, report)
    return state
