"""Population training (search/population.py): each member trains as a single model with its
config would, its dropout is its own and repeats, bad member sets are refused, and the
process's functions are its own again after a step."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models.dropout
import models.layers
import models.lnln
from data_pipeline.loader import SplitTensors, batch_rows, make_batch
from data_pipeline.synth import synthesize
from search.config import ExperimentConfig
from search.optim import OptimizerStep
from search.population import Population, check_members, stacked_ops
from search.row_parallel import step_generators
from search.trainer import TrainingDiverged, build_state, epoch_weights, forward_backward

SMALL_MODEL = {"hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32, "lnln": {"tokens": 4}}
CPU = torch.device("cpu")
BATCH = 16
STEPS = 3
# fp32, one intra-op thread on both sides. The population runs the same arithmetic, but its
# matmuls are batched over the members (other kernels, other summation blocking) and on CPU
# its attention is written out (single models: SDPA's fused kernel), so each op rounds
# differently at ~1e-7 relative: losses agree to ~1.5e-7 relative (RTOL 1e-5, ATOL 1e-6).
# Weights get a wider absolute tolerance: AdamW divides each gradient element by its own
# running RMS, so where the true gradient is ~0 (the key LayerNorms' biases: shifting every
# key of a query leaves its softmax unchanged) rounding noise becomes a visible fraction of
# lr per step. Measured: <= 2.4e-6 after three steps at lr <= 2e-3; a wrong lr, loss weight,
# lambda or clip for a member moves weights by >= 1e-4 (asserted below: the members differ).
RTOL, ATOL = 1e-5, 1e-6
WEIGHT_ATOL = 1e-5

# Three members that differ in every member key the step reads: loss weights (one with the
# adversarial warm-up, so its adversarial weight is 0 in epoch 0), GRL schedule and strength,
# learning rate, weight decay and clip.
MEMBERS = [
    {"model": {}, "train": {"lr": 1e-3}},
    {"model": {"loss_weights": {"completeness": 0.3, "adversarial": 1.2, "reconstruction": 0.5, "sparsity": 0.05},
               "adversarial": {"schedule": "linear", "lambda_max": 0.5}},
     "train": {"lr": 3e-4, "weight_decay": 0.01}},
    {"model": {"loss_weights": {"task": 0.7}, "adversarial": {"schedule": "dann", "lambda_max": 2.0, "gamma": 5.0,
                                                             "warmup_epochs": 1}},
     "train": {"lr": 2e-3, "grad_clip": 0.5}},
]


def member_cfg(model: dict | None = None, train: dict | None = None) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "model": {**SMALL_MODEL, **(model or {})},
        "train": {"epochs": 1, "batch_size": BATCH, "device": "cpu", **(train or {})}})


def member_cfgs(dropout: float = 0.0) -> list[ExperimentConfig]:
    return [member_cfg({**m["model"], "dropout": dropout}, m["train"]) for m in MEMBERS]


@pytest.fixture(scope="module")
def train_split():
    data = synthesize("mosi-aligned", seed=3, scale=0.05)  # 64 training rows
    return SplitTensors.from_arrays(data.spec, "train", data.split("train"))


@pytest.fixture(scope="module")
def batches(train_split):
    """STEPS batches with their training progress (spread, so the GRL schedules move)."""
    rows = batch_rows(len(train_split), BATCH, shuffle=True, seed=0, epoch=0)[:STEPS]
    missing = member_cfg().missing.training()
    return [(make_batch(train_split, r, missing, seed=1, epoch=0), (i + 0.5) / STEPS) for i, r in enumerate(rows)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as each row chunk's: the same kernels on both sides, and no
    threads spinning against each other on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def single_run(cfg: ExperimentConfig, train_split, batches, chunks: int):
    """The project's normal step (forward_backward with the step's generators, then
    OptimizerStep): per-step losses and the final weights."""
    state = build_state(cfg, train_split, CPU)
    step = OptimizerStep(state.model, state.optimizer, state.scheduler, cfg)
    state.model.train()
    losses = []
    for i, (batch, progress) in enumerate(batches):
        _, terms, total = forward_backward(state.model, state.model, batch, epoch_weights(state, cfg, 0), progress,
                                           chunks=chunks, scale=step.loss_scale,
                                           generators=step_generators(cfg.train.seed, 0, i, chunks))
        losses.append({**{k: v.item() for k, v in terms.items()}, "total": total.item()})
        step(total, True)
    return losses, {n: p.detach().clone() for n, p in state.model.named_parameters()}


def population_run(cfgs: list[ExperimentConfig], train_split, batches, chunks: int, between=None):
    """Per member: per-step losses and final weights, trained as one population."""
    population = Population(cfgs, train_split, CPU)
    losses = [[] for _ in cfgs]
    for i, (batch, progress) in enumerate(batches):
        if between is not None:
            between()
        for member, result in zip(losses, population.step(batch, progress, epoch=0, index=i, chunks=chunks)):
            member.append(result)
    weights = [{n: p.detach().clone() for n, p in m.model.named_parameters()} for m in population.members]
    return losses, weights


def assert_losses_close(actual: list[dict], expected: list[dict], where: str) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys()
        for term in e:
            assert math.isclose(a[term], e[term], rel_tol=RTOL, abs_tol=ATOL), \
                f"{where} step {step} {term}: {a[term]} vs {e[term]}"


def assert_originals_in_place() -> None:
    assert models.lnln.grad_reverse is models.layers.grad_reverse
    assert models.dropout._dropout is ORIGINAL_DROPOUT
    assert F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention


ORIGINAL_DROPOUT = models.dropout._dropout


@pytest.mark.parametrize("chunks", [1, 2])
def test_each_member_trains_as_a_single_model_with_its_config(train_split, batches, chunks):
    cfgs = member_cfgs()
    losses, weights = population_run(cfgs, train_split, batches, chunks)
    assert_originals_in_place()  # the rest of the process is unaffected after the steps
    start = {n: p.detach().clone() for n, p in build_state(cfgs[0], train_split, CPU).model.named_parameters()}
    for i, cfg in enumerate(cfgs):
        single_losses, single_weights = single_run(cfg, train_split, batches, chunks)
        assert_losses_close(losses[i], single_losses, f"member {i}")
        assert weights[i].keys() == single_weights.keys()
        for name, value in single_weights.items():
            torch.testing.assert_close(weights[i][name], value, rtol=RTOL, atol=WEIGHT_ATOL, msg=f"member {i} {name}")
        assert any(not torch.equal(start[n], w) for n, w in single_weights.items())  # it did train
    # The members really differ: the same weights for all would make these checks vacuous.
    for i in (1, 2):
        assert max((weights[i][n] - weights[0][n]).abs().max().item() for n in start) > 1e-4
        assert abs(losses[i][0]["total"] - losses[0][0]["total"]) > 1e-3


def test_row_chunks_change_nothing_but_rounding(train_split, batches):
    """The same members with one chunk and with two: the same losses and weights (the chunks'
    losses are row means, their gradients summed in a fixed order)."""
    cfgs = member_cfgs()
    whole = population_run(cfgs, train_split, batches, chunks=1)
    split = population_run(cfgs, train_split, batches, chunks=2)
    for i in range(len(cfgs)):
        assert_losses_close(split[0][i], whole[0][i], f"member {i}")
        for name, value in whole[1][i].items():
            torch.testing.assert_close(split[1][i][name], value, rtol=RTOL, atol=WEIGHT_ATOL,
                                       msg=f"member {i} {name}")


@pytest.mark.parametrize("chunks", [1, 2])
def test_dropout_masks_are_each_members_own_and_repeat(train_split, batches, chunks):
    cfgs = [member_cfg({"dropout": 0.3}) for _ in range(3)]  # three identical members
    first = population_run(cfgs, train_split, batches[:2], chunks)
    # Bit for bit again, whatever the process drew from torch's generator in between.
    again = population_run(cfgs, train_split, batches[:2], chunks, between=lambda: torch.rand(7))
    assert first[0] == again[0]
    for ours, theirs in zip(first[1], again[1]):
        assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    # Identical members with dropout differ from each other: each has its own masks.
    totals = [member[0]["total"] for member in first[0]]
    assert len(set(totals)) == len(totals), totals
    # And dropout was on: the same members without it give other losses.
    no_dropout = population_run([member_cfg() for _ in range(3)], train_split, batches[:1], chunks)
    assert all(m[0]["total"] != d[0]["total"] for m, d in zip(first[0], no_dropout[0]))


def test_a_member_at_dropout_zero_keeps_every_value_beside_one_with_dropout(train_split, batches):
    """p is the member's: member 0 at p = 0 beside a member at 0.3 trains as it would alone."""
    cfgs = [member_cfg(), member_cfg({"dropout": 0.3})]
    losses, weights = population_run(cfgs, train_split, batches[:2], chunks=1)
    single_losses, single_weights = single_run(cfgs[0], train_split, batches[:2], chunks=1)
    assert_losses_close(losses[0], single_losses, "member 0")
    for name, value in single_weights.items():
        torch.testing.assert_close(weights[0][name], value, rtol=RTOL, atol=WEIGHT_ATOL, msg=name)
    assert losses[1][0]["task"] != losses[0][0]["task"]


@pytest.mark.parametrize("key, member", [
    ("train.batch_size", member_cfg(train={"batch_size": 8})),
    ("model.hidden_dim", member_cfg({"hidden_dim": 64})),
    ("model.adversarial.disc_steps", member_cfg({"adversarial": {"disc_steps": 2}})),
    ("train.seed", member_cfg(train={"seed": 7})),
])
def test_members_differing_outside_the_member_keys_are_refused(key, member):
    with pytest.raises(ValueError, match=f"population member 1 differs from member 0 in '{key}'"):
        check_members([member_cfg(), member])
    check_members(member_cfgs(dropout=0.1))  # member keys may differ


@pytest.mark.parametrize("cfg, reason", [
    (member_cfg({"name": "hrlf"}), "model 'hrlf' has not been run under vmap"),
    (member_cfg(train={"grad_accum": 2}), "train.grad_accum must be 1"),
    (member_cfg({"adversarial": {"disc_steps": 2}}), "disc_steps must be 1"),
])
def test_options_the_stacked_step_does_not_support_are_refused(cfg, reason):
    with pytest.raises(ValueError, match=reason):
        check_members([cfg, cfg])


def test_a_member_with_a_non_finite_loss_stops_the_step_naming_it(train_split, batches):
    population = Population(member_cfgs(), train_split, CPU)
    with torch.no_grad():
        population.members[1].model.fusion.head.bias.fill_(float("nan"))  # a diverged member
    before = [[p.detach().clone() for p in m.model.parameters()] for m in population.members]
    batch, progress = batches[0]
    with pytest.raises(TrainingDiverged, match=r"population member 1: loss is nan at epoch 0 step 0 \(task=nan"):
        population.step(batch, progress)
    assert_originals_in_place()
    for member, weights in zip(population.members, before):  # raised before any update, gradients cleared
        for param, weight in zip(member.model.parameters(), weights):
            torch.testing.assert_close(param.detach(), weight, rtol=0, atol=0, equal_nan=True)
            assert param.grad is None


def test_stacked_ops_restore_the_originals_and_leave_other_calls_alone(train_split, batches):
    """Open, the substitutions call the originals outside a population step (a single model's
    forward in the same thread gives the same losses); closed, even by an exception, nested
    or not, the originals are back."""
    cfg = member_cfg({"dropout": 0.2})
    model = build_state(cfg, train_split, CPU).model.train()
    batch, progress = batches[0]

    def losses():
        with models.dropout.dropout_generator(torch.Generator().manual_seed(5)):
            return {k: v.item() for k, v in model.losses(model(batch, progress=progress), batch, progress).items()}

    plain = losses()
    with stacked_ops():
        with stacked_ops():
            pass
        assert models.lnln.grad_reverse is not models.layers.grad_reverse  # still open after the inner exit
        assert losses() == plain
    assert_originals_in_place()
    with pytest.raises(RuntimeError, match="inside"):
        with stacked_ops():
            raise RuntimeError("inside")
    assert_originals_in_place()
