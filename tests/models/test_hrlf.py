"""HRLF: input routing, loss terms, HMI critic, HAL gradient reversal, eval economy, learning
(the checks of spec/hrlf.md)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import models.hrlf as hrlf_module
from data_pipeline.loader import Batch, SplitTensors
from data_pipeline.missing import parse_pattern
from data_pipeline.schema import DataSpec
from data_pipeline.synth import synthesize
from models.config import ModelConfig
from models.hrlf import HRLF, hierarchical_adversarial, soft_orthogonality
from models.layers import Discriminator
from models.metrics import msa_metrics
from models.registry import get_model
from search.config import ExperimentConfig, load_config
from search.evaluate import evaluate_patterns
from search.trainer import fit
from random_batches import random_batch

ROOT = Path(__file__).resolve().parents[2]
MODALITIES = ("text", "audio", "vision")
SPEC = DataSpec(name="mosi-aligned", text_len=12, audio_len=10, vision_len=9, text_dim=16, audio_dim=5,
                vision_dim=7, label_min=-3.0, label_max=3.0, has_text_bert=False, text_special_tokens=False)
TINY = {"hidden_dim": 16, "num_heads": 2, "dim_head": 8, "mlp_dim": 16, "hrlf": {"fusion_dims": [24, 12, 8]}}
B = 8


def tiny_model(**hrlf) -> HRLF:
    torch.manual_seed(0)
    return HRLF(ModelConfig.model_validate({**TINY, "hrlf": {**TINY["hrlf"], **hrlf}}), SPEC)


def tiny_batch(seed: int = 0, rate: float = 0.5) -> Batch:
    return random_batch(SPEC, B, seed=seed, rate=rate)


def encoder_inputs(network) -> dict[str, list[torch.Tensor]]:
    """Record the features each modality encoder of `network` receives."""
    seen = {m: [] for m in MODALITIES}
    for m in MODALITIES:
        network.encoders[m].register_forward_pre_hook(lambda mod, args, m=m: seen[m].append(args[0].detach()))
    return seen


# --- input routing and the inference path ------------------------------------------------------

def test_teacher_sees_complete_inputs_and_student_observed_ones():
    model, batch = tiny_model().train(), tiny_batch()
    teacher_seen, student_seen = encoder_inputs(model.teacher), encoder_inputs(model.student)
    model(batch, progress=0.5)
    for m in MODALITIES:
        x = batch.modality(m)
        assert not torch.equal(x.observed, x.complete), m  # the batch really is incomplete
        assert len(teacher_seen[m]) == len(student_seen[m]) == 1
        assert torch.equal(teacher_seen[m][0], x.complete), m
        assert torch.equal(student_seen[m][0], x.observed), m


def test_evaluation_runs_the_student_alone():
    model, batch = tiny_model(), tiny_batch()
    calls = []
    for module in model.teacher.modules():
        module.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        out = model.eval()(batch)
        alone = model.student({m: (batch.modality(m).observed, batch.modality(m).valid) for m in MODALITIES})
    assert calls == [] and "teacher" not in out
    assert torch.equal(out["prediction"], alone.prediction) and out["prediction"].shape == (B,)
    model.train()(batch)
    assert calls  # the hooks do fire when the teacher runs


def test_multi_scale_representations_follow_the_fusion_widths():
    model = tiny_model()
    out = model.train()(tiny_batch())
    for rep in (out["student"], out["teacher"]):
        assert [tuple(h.shape) for h in rep.scales] == [(B, 48), (B, 24), (B, 12), (B, 8)]
        assert all(rep.q[m].shape == rep.u[m].shape == rep.x[m].shape == (B, 16) for m in MODALITIES)
    default = ModelConfig().hrlf.fusion_dims
    assert default == [256, 128, 64]


# --- loss terms --------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
def test_losses_are_the_named_terms_finite_and_nonzero(estimator):
    model, batch = tiny_model(mi_estimator=estimator), tiny_batch()
    terms = model.train().losses(model(batch, progress=0.5), batch, 0.5)
    assert list(terms) == ["task", "task_teacher", "frf", "hmi", "hal", "kd", *HRLF.LOGGED_TERMS]
    assert HRLF.LOGGED_TERMS == ("frf_intra", "frf_inter", "frf_semantic", "frf_disentangle")
    for name, value in terms.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value) and value.item() != 0.0, name
        assert value.requires_grad == (name in HRLF.LOSS_TERMS), name  # sub-terms are logged only
    assert HRLF.LOSS_TERMS == {"task": 1.0, "task_teacher": 1.0, "frf": 1.0, "hmi": 0.1, "hal": 0.1, "kd": 0.1}
    subs = sum(w * terms[f"frf_{k}"] for k, w in model.frf_weights.items())
    assert terms["frf"].item() == pytest.approx(subs.item(), rel=1e-5)


def test_soft_orthogonality_is_scale_free_and_the_frobenius_option_is_the_spec_norm():
    g = torch.Generator().manual_seed(0)
    q, u = torch.randn(32, 6, generator=g), torch.randn(32, 6, generator=g)
    frobenius = soft_orthogonality(q, u, "frobenius").item()
    assert frobenius == pytest.approx(torch.linalg.matrix_norm(q.T @ u).item() ** 2, rel=1e-5)
    assert tiny_model(disentanglement="frobenius").student.frf.disentanglement == "frobenius"
    value = soft_orthogonality(q, u)
    assert 0.0 < value.item() < 1.0
    assert soft_orthogonality(3.0 * q, 0.01 * u, "cosine").item() == pytest.approx(value.item(), rel=1e-5)
    basis = torch.eye(8)
    for kind in ("frobenius", "cosine"):
        assert soft_orthogonality(basis[:, :4], basis[:, 4:], kind).item() == 0.0
        assert soft_orthogonality(q, q, kind).item() > soft_orthogonality(q, u, kind).item()


def test_teacher_pretraining_trains_the_teacher_alone():
    model, batch = tiny_model(teacher_pretrain_fraction=0.5).train(), tiny_batch()
    for progress, student_trains in ((0.2, False), (0.7, True)):
        model.zero_grad()
        terms = model.losses(model(batch, progress=progress), batch, progress)
        sum(w * terms[k] for k, w in HRLF.LOSS_TERMS.items()).backward()
        student = [p.grad for p in model.student.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        teacher = [p.grad for p in model.teacher.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert bool(student) == student_trains and teacher, progress
        assert terms["task"].item() > 0  # still logged while pre-training


# --- HMI and HAL -------------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["infonce", "jsd"])
def test_hmi_critic_scores_matched_pairs_above_shuffled_after_a_few_steps(estimator):
    model, batch = tiny_model(mi_estimator=estimator).train(), tiny_batch(rate=0.3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        optimizer.zero_grad()
        model.losses(model(batch), batch)["hmi"].backward()
        optimizer.step()
    with torch.no_grad():
        out = model(batch)
        off_diagonal = ~torch.eye(B, dtype=torch.bool)
        for critic, s, t in zip(model.critics, out["student"].scales, out["teacher"].scales):
            scores = critic(s, t)  # (B, B): row = student sample, column = teacher sample
            assert scores.diagonal().mean() > scores[off_diagonal].mean()


def test_hal_gradient_through_the_grl_is_the_negated_discriminator_gradient(monkeypatch):
    torch.manual_seed(0)
    discriminators = [Discriminator(d, 64, 1) for d in (6, 4)]
    student = [torch.randn(B, d, requires_grad=True) for d in (6, 4)]
    teacher = [torch.randn(B, d) for d in (6, 4)]

    def gradients(lam: float):
        for p in (p for disc in discriminators for p in disc.parameters()):
            p.grad = None
        loss = hierarchical_adversarial(discriminators, student, teacher, lam)
        reps = torch.autograd.grad(loss, student, retain_graph=True)
        loss.backward()
        return reps, [p.grad.clone() for disc in discriminators for p in disc.parameters()]

    reversed_reps, reversed_disc = gradients(1.0)
    half_reps, _ = gradients(0.5)
    monkeypatch.setattr(hrlf_module, "grad_reverse", lambda x, lam: x)  # what D itself would want
    plain_reps, plain_disc = gradients(1.0)
    for rev, half, plain in zip(reversed_reps, half_reps, plain_reps):
        assert plain.abs().sum() > 0
        assert torch.equal(rev, -plain)
        assert torch.allclose(half, -0.5 * plain)
    for rev, plain in zip(reversed_disc, plain_disc):  # the discriminators' own update is untouched
        assert torch.equal(rev, plain)


def test_discriminator_loss_reaches_only_the_discriminators():
    model, batch = tiny_model().train(), tiny_batch()
    model.discriminator_loss(model(batch, progress=0.5)).backward()
    disc = {id(p) for p in model.discriminator_parameters()}
    for p in model.parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in disc)


def test_shared_sentiment_encoder_is_one_module_unless_asked_otherwise():
    shared, separate = tiny_model(), tiny_model(shared_sentiment_encoder=False)
    frf = shared.student.frf
    assert frf.sentiment["text"] is frf.sentiment["audio"] is frf.sentiment["vision"]
    assert separate.student.frf.sentiment["text"] is not separate.student.frf.sentiment["audio"]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(separate) - count(shared) == 2 * 2 * count(frf.sentiment["text"])  # 2 extra E_s per network


# --- registry, config, training ----------------------------------------------------------------

def test_registry_entry_defaults_and_search_space():
    entry = get_model("hrlf")
    assert entry.loss_terms == HRLF.LOSS_TERMS and entry.adversarial_terms == ("hal",)
    for key in ("model.loss_weights.frf", "model.loss_weights.hmi", "model.loss_weights.hal",
                "model.loss_weights.kd", "model.hrlf.frf_weights.intra", "model.hrlf.frf_weights.inter",
                "model.hrlf.frf_weights.semantic", "model.hrlf.frf_weights.disentangle",
                "model.hrlf.mi_estimator", "model.hrlf.teacher_pretrain_fraction", "missing.inter_fraction",
                "model.adversarial.schedule", "model.adversarial.lambda_max", "model.adversarial.warmup_epochs",
                "model.adversarial.disc_steps", "train.lr"):
        assert key in entry.search_space, key
    assert set(entry.search_space["model.hrlf.mi_estimator"].choices) == {"infonce", "jsd"}
    inter = entry.search_space["missing.inter_fraction"]
    assert (inter.kind, inter.low, inter.high) == ("uniform", 0.0, 0.6)


def test_quick_config_builds_hrlf_with_mixture_training():
    cfg = load_config(ROOT / "configs" / "hrlf_quick.yaml")
    assert cfg.model.name == "hrlf" and cfg.missing.train_mode == "mixture"
    spec = synthesize(cfg.data.preset, seed=0, scale=0.01).spec
    model = get_model("hrlf").build(cfg.model, spec)
    assert isinstance(model, HRLF)
    assert [c.weight.shape[0] for c in model.critics] == [3 * cfg.model.hidden_dim, *cfg.model.hrlf.fusion_dims]


def test_hmi_scale_weights_must_match_the_scales():
    with pytest.raises(ValueError, match="hmi_scale_weights needs 4 values"):
        ModelConfig.model_validate({"hrlf": {"hmi_scale_weights": [1.0, 1.0]}})
    # spec/hrlf.md: HMI is the sum over scales, weights 1 each unless given; "mean" normalises.
    assert tiny_model().hmi_scale_weights.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert tiny_model(hmi_scale_weights=[2.0, 1.0, 1.0, 0.0]).hmi_scale_weights.tolist() == [2.0, 1.0, 1.0, 0.0]
    model = tiny_model(hmi_scale_weights=[2.0, 1.0, 1.0, 0.0], hmi_reduction="mean")
    assert model.hmi_scale_weights.tolist() == [0.5, 0.25, 0.25, 0.0]


def test_hrlf_trains_on_the_spec_mixture_unless_told_otherwise():
    cfg = ExperimentConfig.model_validate({"model": {"name": "hrlf"}})
    assert cfg.missing.train_mode == "mixture" and cfg.missing.inter_fraction == 0.3
    assert ExperimentConfig.model_validate({"model": {"name": "lnln"}}).missing.train_mode == "lnln"
    told = ExperimentConfig.model_validate({"model": {"name": "hrlf"}, "missing": {"train_mode": "lnln"}})
    assert told.missing.train_mode == "lnln"


def test_hrlf_learns_on_synthetic_mosi_aligned_and_dropping_text_hurts():
    torch.set_num_threads(1)  # its numbers (and the learning thresholds) at one thread count, as in the suite
    data = synthesize("mosi-aligned", seed=21, scale=0.25)
    splits = {s: SplitTensors.from_arrays(data.spec, s, data.split(s)) for s in data.splits}
    # disc_steps 2: the trainer's extra discriminator steps run on HRLF too.
    cfg = ExperimentConfig.model_validate({
        "model": {"name": "hrlf", "hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32,
                  "hrlf": {"fusion_dims": [64, 32, 16]}, "adversarial": {"disc_steps": 2}},
        "missing": {"eval_grid": ["intra:0.0"]},  # HRLF's default training distribution: the mixture
        "train": {"epochs": 4, "batch_size": 32, "lr": 2e-3, "device": "cpu"}})
    state = fit(cfg, splits, device=torch.device("cpu"))
    # The trainer logs the FRF sub-terms next to the weighted terms.
    assert set(state.history[0].losses) == {*HRLF.LOSS_TERMS, *HRLF.LOGGED_TERMS, "total"}
    test = splits["test"]
    rows = evaluate_patterns(state.model, test, [parse_pattern(p) for p in ("intra:0.0", "inter:L")], seed=1111)
    labels = test.labels.numpy()
    mean_predictor = msa_metrics(np.full_like(labels, splits["train"].labels.mean().item()), labels)
    complete = rows["intra:0.0"]
    assert complete["mae"] < mean_predictor["mae"] - 0.2
    assert complete["f1_non0"] > 0.70 > mean_predictor["f1_non0"]
    assert rows["inter:L"]["f1_non0"] < complete["f1_non0"]
