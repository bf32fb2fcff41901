"""Per-pattern evaluator and the in-process training loop, on real synthetic data."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.loader import SplitTensors
from data_pipeline.missing import default_eval_grid, parse_pattern
from data_pipeline.synth import synthesize
from models.metrics import msa_metrics
from search.config import ExperimentConfig
from search.evaluate import evaluate_patterns, predict_patterns
from search.trainer import TrainingDiverged, build_state, fit, train_epoch
from small_grid import EVAL_GRID

SMALL_MODEL = {"hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32, "lnln": {"tokens": 4}}


def small_cfg(eval_grid: list[str] | None = None, **train) -> ExperimentConfig:
    """`eval_grid`: tests about training mechanics evaluate tests/small_grid.py's 4 patterns;
    those about evaluation, the default 16."""
    return ExperimentConfig.model_validate({
        "model": SMALL_MODEL, **({"missing": {"eval_grid": eval_grid}} if eval_grid else {}),
        "train": {"epochs": 4, "batch_size": 32, "lr": 2e-3, "device": "cpu", **train},
    })


@pytest.fixture(scope="module")
def aligned_splits():
    data = synthesize("mosi-aligned", seed=21, scale=0.25)
    return {s: SplitTensors.from_arrays(data.spec, s, data.split(s)) for s in data.splits}


@pytest.fixture(scope="module")
def trained(aligned_splits):
    torch.set_num_threads(1)  # its numbers (and the learning thresholds) at one thread count, as in the suite
    cfg = small_cfg(eval_test="end")  # the test grid at the last epoch only: what these tests read
    return cfg, fit(cfg, aligned_splits, device=torch.device("cpu"))


def test_evaluator_returns_one_row_per_grid_pattern_in_order(trained, aligned_splits):
    cfg, state = trained
    patterns = cfg.missing.patterns()
    rows = evaluate_patterns(state.model, aligned_splits["valid"], patterns, seed=cfg.missing.seed)
    assert list(rows) == default_eval_grid()
    assert all(set(m) >= {"f1_non0", "acc2_has0", "acc7", "mae", "corr"} for m in rows.values())


def test_sixteen_patterns_in_one_call_equal_sixteen_separate_calls(trained, aligned_splits):
    cfg, state = trained
    patterns = cfg.missing.patterns()
    together = evaluate_patterns(state.model, aligned_splits["valid"], patterns, seed=5, batch_size=30)
    for pattern in patterns:
        alone = evaluate_patterns(state.model, aligned_splits["valid"], [pattern], seed=5, batch_size=40)
        assert alone[pattern.name] == pytest.approx(together[pattern.name], abs=1e-6)


def test_patterns_in_parallel_streams_equal_one_stream(trained, aligned_splits):
    cfg, state = trained
    patterns = cfg.missing.patterns()
    one = evaluate_patterns(state.model, aligned_splits["valid"], patterns, seed=5, batch_size=40)
    three = evaluate_patterns(state.model, aligned_splits["valid"], patterns, seed=5, batch_size=40, streams=3)
    assert list(three) == list(one)
    for name in one:
        assert three[name] == pytest.approx(one[name], abs=1e-5)
    assert one["intra:0.0"]["mae"] != one["inter:A+V"]["mae"]  # the patterns do differ


def test_reused_encodings_give_the_same_predictions_from_fewer_encoder_passes(trained, aligned_splits):
    cfg, state = trained
    patterns = cfg.missing.patterns()
    calls = []
    hooks = [state.model.embeddings[m].register_forward_hook(lambda *_, m=m: calls.append(m))
             for m in ("text", "audio", "vision")]
    try:
        runs = {}
        for reuse in (False, True):
            calls.clear()
            runs[reuse] = predict_patterns(state.model, aligned_splits["valid"], patterns, seed=5,
                                           batch_size=1000, reuse_encodings=reuse)
            runs[reuse, "calls"] = len(calls)
    finally:
        for hook in hooks:
            hook.remove()
    np.testing.assert_array_equal(runs[True].preds, runs[False].preds)
    np.testing.assert_array_equal(runs[True].digests, runs[False].digests)
    # One chunk: each modality is encoded for intra:0.0-0.9 and once dropped; the inter
    # patterns reuse those (3 x 16 = 48 encodings without reuse, 3 x 11 = 33 with it).
    assert runs[False, "calls"] == 48 and runs[True, "calls"] == 33
    assert state.model._encodings is None  # closed after evaluation


def test_lnln_learns_and_degrades_with_missing_rate(trained, aligned_splits):
    cfg, state = trained
    test = aligned_splits["test"]
    rows = evaluate_patterns(state.model, test, [parse_pattern(p) for p in ("intra:0.0", "intra:0.9", "inter:L")],
                             seed=1111)
    labels = test.labels.numpy()
    mean_predictor = msa_metrics(np.full_like(labels, aligned_splits["train"].labels.mean().item()), labels)
    complete = rows["intra:0.0"]
    assert complete["mae"] < mean_predictor["mae"] - 0.2
    assert complete["f1_non0"] > 0.70 > mean_predictor["f1_non0"]
    assert rows["intra:0.9"]["f1_non0"] < complete["f1_non0"]
    assert rows["inter:L"]["f1_non0"] < complete["f1_non0"]


def test_training_history_reports_every_term_and_epoch(trained):
    cfg, state = trained
    assert [r.epoch for r in state.history] == [0, 1, 2, 3]
    first, last = state.history[0], state.history[-1]
    assert set(first.losses) == {"task", "completeness", "adversarial", "reconstruction", "sparsity", "total"}
    assert last.losses["task"] < first.losses["task"]
    assert set(last.results) == {"valid", "test"} and len(last.results["test"]) == 16


def test_same_seed_gives_identical_metrics(aligned_splits):
    # Holds on CPU at one thread count. On a GPU it needs train.deterministic (attention
    # backward kernels accumulate with atomics: measured 2.7e-7 apart on an H200 without it).
    cfg = small_cfg(epochs=1, eval_grid=EVAL_GRID)
    a = fit(cfg, aligned_splits, device=torch.device("cpu")).history[-1]
    b = fit(cfg, aligned_splits, device=torch.device("cpu")).history[-1]
    assert a.losses == b.losses
    assert a.results["test"] == b.results["test"]


def test_adversarial_warmup_and_extra_discriminator_steps(aligned_splits):
    cfg = ExperimentConfig.model_validate({
        "model": {**SMALL_MODEL, "adversarial": {"warmup_epochs": 1, "disc_steps": 3}},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu"}})
    state = build_state(cfg, aligned_splits["train"], torch.device("cpu"))
    disc_before = [p.detach().clone() for p in state.model.discriminator_parameters()]
    gen_before = [p.detach().clone() for p in state.model.proxy_generator.parameters()]
    # Warm-up epoch: the adversarial weight is 0, yet extra discriminator steps still train D.
    train_epoch(state, cfg, aligned_splits["train"], torch.device("cpu"))
    assert state.disc_optimizer is not None
    assert any(not torch.equal(a, b) for a, b in zip(disc_before, state.model.discriminator_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(gen_before, state.model.proxy_generator.parameters()))


def test_non_finite_loss_raises_training_diverged(aligned_splits):
    cfg = small_cfg(epochs=1)
    state = build_state(cfg, aligned_splits["train"], torch.device("cpu"))
    with torch.no_grad():
        next(state.model.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 0 step 0"):
        train_epoch(state, cfg, aligned_splits["train"], torch.device("cpu"))


def test_a_run_resumed_from_its_checkpoint_trains_as_if_it_never_stopped(aligned_splits, tmp_path):
    """A trial Tune restores after a crash (or a run resumed with --resume) trains the weights
    and reaches the numbers of a run that never stopped: in-process CPU dropout draws from
    generators seeded by the step, and torch's generator state (dropout on a GPU or in a Ray
    Train worker) travels in the checkpoint."""
    from search.trainer import load_state, save_state

    cfg = ExperimentConfig.model_validate({
        "model": {**SMALL_MODEL, "dropout": 0.2}, "missing": {"eval_grid": EVAL_GRID},
        "train": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "device": "cpu"}})
    cpu = torch.device("cpu")
    straight = fit(cfg, aligned_splits, device=cpu)

    class Crash(Exception):
        pass

    def crash_after_first_epoch(state, report):
        save_state(state, tmp_path / "state.pt")
        raise Crash

    with pytest.raises(Crash):
        fit(cfg, aligned_splits, device=cpu, on_epoch=crash_after_first_epoch)
    torch.rand(7)  # whatever the process drew in between
    restored = build_state(cfg, aligned_splits["train"], cpu)
    load_state(restored, tmp_path / "state.pt", cpu)
    assert restored.epoch == 1
    resumed = fit(cfg, aligned_splits, device=cpu, state=restored)
    assert resumed.history[-1].losses == straight.history[-1].losses
    assert resumed.history[-1].results == straight.history[-1].results
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
