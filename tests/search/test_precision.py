"""Precision and device handling of the training loop, on CPU: the batch dtype is the
weights' dtype in training and evaluation, bf16 is autocast with fp32 labels and losses, the
loop makes one host sync per step, and checkpoints load onto the run's device."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.loader import SplitTensors
from data_pipeline.synth import synthesize
from host_syncs import count_host_syncs
from search.config import ExperimentConfig
from search.evaluate import predict_patterns
from search.trainer import autocast_dtype, build_state, load_state, param_dtype, save_state, train_epoch, unwrap
from search.worker import deepspeed_config

SMALL_MODEL = {"hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32, "lnln": {"tokens": 4}}


def small_cfg(name: str = "lnln", **train) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "model": {"name": name, **SMALL_MODEL},
        "train": {"epochs": 1, "batch_size": 16, "device": "cpu", "batch_chunks": 1, **train},
    })


@pytest.fixture(scope="module")
def splits():
    data = synthesize("mosi-aligned", seed=3, scale=0.04)
    return {s: SplitTensors.from_arrays(data.spec, s, data.split(s)) for s in data.splits}


class Spy:
    """Records, at each forward, the batch's dtypes and whether autocast is on."""

    def __init__(self, model):
        self.seen: list[dict] = []
        self._forward = model.forward
        model.forward = self

    def __call__(self, batch, progress=0.0):
        self.seen.append({"features": batch.text.observed.dtype, "label": batch.label.dtype,
                          "fraction": batch.text_missing_fraction.dtype,
                          "autocast": torch.is_autocast_enabled("cpu")})
        return self._forward(batch, progress)


@pytest.mark.parametrize("model", ["lnln", "hrlf"])
def test_bf16_is_autocast_with_fp32_batches_labels_and_losses(splits, model):
    cfg = small_cfg(model, precision="bf16")
    state = build_state(cfg, splits["train"], torch.device("cpu"))
    spy = Spy(unwrap(state.model))
    losses = train_epoch(state, cfg, splits["train"], torch.device("cpu"), dtype=param_dtype(state.model),
                         autocast_to=autocast_dtype(cfg))
    assert param_dtype(state.model) == torch.float32
    assert spy.seen and all(s == {"features": torch.float32, "label": torch.float32, "fraction": torch.float32,
                                  "autocast": True} for s in spy.seen)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    # The losses themselves are fp32 though the forward ran in bf16.
    batch_terms = {}
    original = type(unwrap(state.model)).losses

    def recording(self, outputs, batch, progress=0.0):
        terms = original(self, outputs, batch, progress)
        batch_terms.update(terms)
        return terms

    type(unwrap(state.model)).losses = recording
    try:
        train_epoch(state, cfg, splits["train"], torch.device("cpu"), autocast_to=torch.bfloat16)
    finally:
        type(unwrap(state.model)).losses = original
    assert batch_terms and all(v.dtype == torch.float32 for v in batch_terms.values()), \
        {k: v.dtype for k, v in batch_terms.items()}
    # Evaluation runs the same precision.
    spy.seen.clear()
    predict_patterns(state.model, splits["valid"], cfg.missing.patterns()[:2], seed=0, dtype=param_dtype(state.model),
                     autocast=autocast_dtype(cfg))
    assert spy.seen and all(s["autocast"] and s["features"] == torch.float32 for s in spy.seen)


def test_half_weights_get_half_features_and_fp32_labels_in_training_and_evaluation(splits):
    # What DeepSpeed's fp16 engine does to the module: the batch must follow the weights.
    cfg = small_cfg()
    state = build_state(cfg, splits["train"], torch.device("cpu"))
    state.model.half()
    spy = Spy(state.model)
    dtype = param_dtype(state.model)
    assert dtype == torch.float16
    batch_terms = {}
    original = type(state.model).losses

    def recording(self, outputs, batch, progress=0.0):
        terms = original(self, outputs, batch, progress)
        batch_terms.update(terms)
        return terms

    type(state.model).losses = recording
    try:
        train_epoch(state, cfg, splits["train"], torch.device("cpu"), dtype=dtype)
    finally:
        type(state.model).losses = original
    assert all(s["features"] == torch.float16 and s["label"] == torch.float32 and s["fraction"] == torch.float32
               for s in spy.seen)
    assert all(v.dtype == torch.float32 for v in batch_terms.values())
    spy.seen.clear()
    predict_patterns(state.model, splits["valid"], cfg.missing.patterns()[:1], seed=0, dtype=dtype)
    assert spy.seen and all(s["features"] == torch.float16 for s in spy.seen)


def test_deepspeed_bf16_is_its_torch_autocast_with_fp32_gradients():
    ds = deepspeed_config(small_cfg(workers=1, precision="bf16"))
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not ds["fp16"]["enabled"] and "bf16" not in ds
    ds = deepspeed_config(small_cfg(workers=1, precision="fp16"))
    assert ds["fp16"]["enabled"] and not ds["torch_autocast"]["enabled"]


@pytest.mark.parametrize("model", ["lnln", "hrlf"])
def test_a_training_step_makes_one_host_sync(splits, model):
    """On a GPU each host read waits for the queue to drain; the loop's one per step is the
    stacked loss values (the model and batch side make none: tests/models/test_host_syncs.py)."""
    cfg = small_cfg(model)
    state = build_state(cfg, splits["train"], torch.device("cpu"))
    steps = []
    with count_host_syncs() as syncs:
        train_epoch(state, cfg, splits["train"], torch.device("cpu"), on_step=lambda i, n, losses: steps.append(i))
    assert len(steps) >= 2 and syncs.count == len(steps), str(syncs)


def test_checkpoint_loads_onto_the_runs_device(splits, tmp_path: Path, monkeypatch):
    cfg = small_cfg()
    state = build_state(cfg, splits["train"], torch.device("cpu"))
    train_epoch(state, cfg, splits["train"], torch.device("cpu"))
    state.epoch = 1
    save_state(state, tmp_path / "state.pt")
    fresh = build_state(cfg, splits["train"], torch.device("cpu"))
    seen = {}
    load = torch.load

    def spying_load(*args, **kwargs):
        seen.update(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    load_state(fresh, tmp_path / "state.pt", torch.device("cpu"))
    assert seen["map_location"] == torch.device("cpu")
    assert fresh.epoch == 1
    for a, b in zip(state.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    assert fresh.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()
