"""Population training (prototype, issue 17 item 7): N members of one model shape trained
as one stacked model on the same batches, each with its own loss weights, GRL schedule,
dropout, learning rate, weight decay and gradient clip.

Each member is an ordinary `TrainState` (search/trainer.py: its own module, AdamW, lr
schedule; `save_state` checkpoints it as any trial's). Only forward and backward are shared:
a step stacks the members' parameters (N, ...) and runs the registry module once under
`torch.vmap` (`torch.func.functional_call` on a weightless copy), so each op runs once for
all members; the gradients flow back through the stack into each member's own parameters,
and each member then takes the project's optimizer step (`OptimizerStep`). Row chunks run
in parallel as in the trainer (search/row_parallel.py), each chunk vmapping over the members.
At dropout 0 a member's losses and weights are a single model's with its config, up to
float rounding (batched matmuls and attention written out round differently).

models/ does not run under vmap as it is. While `stacked_ops()` is open, three functions are
replaced for the threads inside a population step (elsewhere they run as before):
- `models.lnln.grad_reverse`: `GradReverse` is an autograd.Function without `setup_context`,
  which torch.func transforms refuse ("it must override the setup_context staticmethod"),
  and its lambda is a Python float from the shared module: here it is each member's (N,)
  lambda, through `x.detach() - lambda * (x - x.detach())` (identity forward, gradient
  times -lambda, as GradReverse).
- `models.dropout._dropout`: p is the shared module's float; here each member's own p. The
  masks come from the step's generators (one per row chunk, seeded from train.seed, epoch,
  batch index and chunk as the trainer's), drawn for all members at once (vmap randomness
  "different"): a population run repeats bit for bit, but a member with dropout does not
  repeat a single model's masks.
- `F.scaled_dot_product_attention` (`math_attention`): on CPU vmap has no batching rule for
  its kernel and falls back to a loop over the members; on a GPU its memory-efficient
  kernel's backward fails under vmap ("LSE is not correctly aligned (strideH)", torch 2.11,
  H200, 2026-11-29). The math form (matmuls and softmax) batches on both.
A change to models/ would remove all three (GRL with `setup_context` and a tensor lambda;
lambda and p as inputs of `forward`). Supported: LNLN (its forward is checked under vmap),
fp32, features text input, one discriminator step, no gradient accumulation. A member whose
loss is not finite stops the whole step (no masking of one member yet).
Not used by the rest of search/ yet; throughput against single models: bench/population.py.
"""
from __future__ import annotations

import copy
import math
import threading
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import models.dropout
import models.lnln
from data_pipeline.loader import Batch, SplitTensors
from models.dropout import dropout_generator
from models.layers import grl_coefficient

from .config import ExperimentConfig
from .optim import OptimizerStep
from .results import flatten
from .row_parallel import row_parallel_backward, step_generators
from .trainer import TrainState, TrainingDiverged, build_state, epoch_weights

# Config keys (and sections) in which members may differ; everything else that training
# reads (data, missing, model, train) must be equal, so one module shape and one batch
# stream serve them all.
MEMBER_KEYS = ("model.loss_weights", "model.adversarial.schedule", "model.adversarial.lambda_max",
               "model.adversarial.gamma", "model.adversarial.warmup_epochs", "model.dropout", "train.lr",
               "train.weight_decay", "train.grad_clip")
_SHARED_SECTIONS = ("data", "missing", "model", "train")
# Models whose forward has been run under vmap; the GRL substitution patches this module's name.
_SUPPORTED_MODELS = ("lnln",)

# Inside a population step: this member's lambda and dropout p (vmapped), and whether
# attention is written out; set by the thread that runs the step (a row chunk's own).
_member = threading.local()
_patch_lock = threading.Lock()
_patch_depth = 0
_originals: dict = {}  # the functions stacked_ops replaced, while it is open


def check_members(cfgs: list[ExperimentConfig]) -> None:
    """Raises ValueError naming the first key outside MEMBER_KEYS where members differ, or an
    option the stacked step does not support."""
    if not cfgs:
        raise ValueError("a population needs at least one member config")
    shared = [flatten({s: cfg.model_dump()[s] for s in _SHARED_SECTIONS}) for cfg in cfgs]
    for i, flat in enumerate(shared[1:], start=1):
        for key in sorted(set(flat) | set(shared[0])):
            if not key.startswith(MEMBER_KEYS) and flat.get(key) != shared[0].get(key):
                raise ValueError(f"population member {i} differs from member 0 in '{key}' ({flat.get(key)!r} vs "
                                 f"{shared[0].get(key)!r}); members may differ only in {', '.join(MEMBER_KEYS)}")
    cfg = cfgs[0]
    if cfg.model.name not in _SUPPORTED_MODELS:
        raise ValueError(f"population: model '{cfg.model.name}' has not been run under vmap; "
                         f"supported: {', '.join(_SUPPORTED_MODELS)}")
    if cfg.model.adversarial.disc_steps != 1:
        raise ValueError("population: model.adversarial.disc_steps must be 1 (extra discriminator steps are per model)")
    if cfg.model.text_encoder != "features" or cfg.train.precision != "fp32" or cfg.train.workers:
        raise ValueError("population: only features text input, fp32 and in-process training (train.workers: 0)")
    if cfg.train.grad_accum != 1:
        raise ValueError("population: train.grad_accum must be 1 (every step updates every member)")


class Population:
    """N members (one `TrainState` each) stepped together; `step` trains all on one batch.

    `math_attention`: attention as matmuls and softmax under vmap (None: yes, on every
    device; False keeps SDPA, which loops over the members on CPU and fails in its backward
    on a GPU)."""

    def __init__(self, cfgs: list[ExperimentConfig], train: SplitTensors, device: torch.device,
                 math_attention: bool | None = None):
        check_members(cfgs)
        self.cfgs = cfgs
        # Each member as a trial would start: the same seeding, so a single model built from
        # the member's config has the member's initial weights.
        self.members: list[TrainState] = [build_state(cfg, train, device) for cfg in cfgs]
        self.optimizer_steps = [OptimizerStep(m.model, m.optimizer, m.scheduler, cfg)
                                for m, cfg in zip(self.members, cfgs)]
        self.holder = nn.ModuleList(m.model for m in self.members)  # every member's parameters
        self.terms = list(self.members[0].weights)
        # The shared module runs the members' weights; it takes the code paths of dropout
        # when any member has dropout (a member with p = 0 then keeps every value).
        shape = cfgs[0].model.model_copy(update={"dropout": max(cfg.model.dropout for cfg in cfgs)})
        self.module = self.members[0].entry.build(shape, train.spec).to("meta").train()
        # Tied parameters (LNLN's shared fusion token) get one tensor under each name (the
        # move to meta has untied them).
        first = self.members[0].model
        canonical = {id(p): name for name, p in first.named_parameters()}
        self.names = {name: canonical[id(p)] for name, p in first.named_parameters(remove_duplicate=False)}
        self.member_params = [dict(m.model.named_parameters()) for m in self.members]
        self.math_attention = True if math_attention is None else math_attention
        self._local = threading.local()  # functional_call swaps a module's tensors: one module per thread

    def __len__(self) -> int:
        return len(self.members)

    def step(self, batch: Batch, progress: float, *, epoch: int = 0, index: int = 0,
             chunks: int = 1) -> list[dict[str, float]]:
        """One training step of every member on `batch`, batch `index` of `epoch` (forward and
        backward stacked, then each member's optimizer step). Returns each member's terms and
        weighted `total` (one host sync); a member whose loss is not finite raises
        TrainingDiverged before any update."""
        device = batch.label.device
        weights = torch.tensor([[epoch_weights(m, cfg, epoch).get(t, 0.0) for t in self.terms]
                                for m, cfg in zip(self.members, self.cfgs)], device=device)  # (N, K)
        lam = torch.tensor([grl_coefficient(progress, cfg.model.adversarial.schedule, cfg.model.adversarial.lambda_max,
                                            cfg.model.adversarial.gamma) for cfg in self.cfgs], device=device)  # (N,)
        p = torch.tensor([cfg.model.dropout for cfg in self.cfgs], device=device)  # (N,)
        scale = self.optimizer_steps[0].loss_scale

        def loss_fn(part: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            values = self._member_losses(part, progress, lam, p)  # (N, K)
            return {"values": values}, (values * weights).sum()  # the members' totals, summed

        # The trainer's generators for this step (a function of where the step is, not of what
        # the process drew before), on the batch's device: the members' masks come from them.
        generators = [torch.Generator(device).manual_seed(g.initial_seed())
                      for g in step_generators(self.cfgs[0].train.seed, epoch, index, chunks)]
        with stacked_ops():
            if chunks > 1:
                # (vmap may return a weight's gradient transposed: row_parallel_backward stores
                # it in the parameter's layout, which fused AdamW needs.)
                terms, _ = row_parallel_backward(self.holder, batch, chunks, scale, loss_fn, generators)
            else:
                with dropout_generator(generators[0]):
                    terms, total = loss_fn(batch)
                (total * scale).backward()
        values = terms["values"].detach()
        rows = torch.cat([values, (values * weights).sum(1, keepdim=True)], dim=1).tolist()  # the host sync
        results = [dict(zip([*self.terms, "total"], row)) for row in rows]
        for i, result in enumerate(results):
            if not math.isfinite(result["total"]):
                detail = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k != "total")
                self.zero_grad()  # leave no half step's gradients for a next step
                raise TrainingDiverged(f"population member {i}: loss is {result['total']} at epoch {epoch} "
                                       f"step {index} ({detail})")
        for optimizer_step in self.optimizer_steps:
            optimizer_step(None, True)  # clip, AdamW, lr schedule; OptimizerStep reads no loss
        return results

    def zero_grad(self) -> None:
        for member in self.members:
            member.optimizer.zero_grad(set_to_none=True)

    def _member_losses(self, batch: Batch, progress: float, lam: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """(N, K) unweighted loss terms: the module once under vmap over the stacked weights."""
        stacked = {name: torch.stack([params[name] for params in self.member_params])
                   for name in self.member_params[0]}  # (N, ...) each; gradients reach every member
        params = {name: stacked[canonical] for name, canonical in self.names.items()}

        module = getattr(self._local, "module", None)
        if module is None:
            module = self._local.module = copy.deepcopy(self.module)

        def one_member(member_params, member_lam, member_p):
            _member.lam, _member.p, _member.math_attention = member_lam, member_p, self.math_attention
            try:
                outputs = functional_call(module, member_params, (batch,), {"progress": progress})
                terms = module.losses(outputs, batch, progress)
            finally:
                _member.lam = _member.p = _member.math_attention = None
            return torch.stack([terms[t] for t in self.terms])  # (K,)

        return torch.vmap(one_member, randomness="different")(params, lam, p)


@contextmanager
def stacked_ops() -> Iterator[None]:
    """The substitutions of the module docstring, process-wide while open (nested or from
    several threads: the first entry patches, the last exit restores, exceptions included);
    each acts only in a thread inside a population step and calls the original elsewhere."""
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            _originals.update(grad_reverse=models.lnln.grad_reverse, dropout=models.dropout._dropout,
                              sdpa=F.scaled_dot_product_attention)
            models.lnln.grad_reverse = _member_grad_reverse
            models.dropout._dropout = _member_dropout
            F.scaled_dot_product_attention = _member_attention
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                models.lnln.grad_reverse = _originals["grad_reverse"]
                models.dropout._dropout = _originals["dropout"]
                F.scaled_dot_product_attention = _originals["sdpa"]
                _originals.clear()


def _in_step() -> bool:
    return getattr(_member, "lam", None) is not None


def _member_grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    if not _in_step():
        return _originals["grad_reverse"](x, lambd)
    frozen = x.detach()
    return frozen - _member.lam * (x - frozen)  # value x; gradient times -lambda of this member


def _member_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`p` is the shared module's (0: no member has dropout); the member's own p applies, its
    mask drawn from the thread's step generator (one draw for all members under vmap)."""
    if not _in_step():
        return _originals["dropout"](x, p, training)
    if not training or p == 0:
        return x
    generator = getattr(models.dropout._drawing, "generator", None)  # set by Population.step
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= _member.p
    return x * keep / (1 - _member.p)


def _member_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if not (_in_step() and getattr(_member, "math_attention", False)) or is_causal or kwargs:
        return _originals["sdpa"](q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                  scale=scale, **kwargs)
    # Its dropout is models.dropout._dropout, which stacked_ops has made _member_dropout.
    return models.dropout.written_attention(q, k, v, attn_mask, dropout_p, scale)
