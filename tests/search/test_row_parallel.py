"""Row-parallel CPU training steps: the same gradient as the whole batch, deterministic, and
refused where a split batch would change the loss."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import SplitTensors, batch_rows, make_batch
from data_pipeline.synth import synthesize
from models.registry import get_model
from search.config import ExperimentConfig
from search.row_parallel import resolve_chunks
from search.trainer import build_state, forward_backward, train_epoch

SMALL_MODEL = {"hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32, "lnln": {"tokens": 4}}
CPU = torch.device("cpu")


def cfg_for(model: dict | None = None, **train) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "model": {**SMALL_MODEL, **(model or {})},
        "train": {"epochs": 1, "batch_size": 48, "device": "cpu", **train}})


@pytest.fixture(scope="module")
def train_split():
    data = synthesize("mosi-aligned", seed=3, scale=0.2)
    return SplitTensors.from_arrays(data.spec, "train", data.split("train"))


def batch_gradients(cfg, train_split, chunks: int):
    state = build_state(cfg, train_split, CPU)
    state.model.train()
    rows = batch_rows(len(train_split), 48, shuffle=True, seed=0, epoch=0)[0]
    batch = make_batch(train_split, rows, cfg.missing.training(), seed=1, epoch=0)
    _, terms, total = forward_backward(state.model, state.model, batch, state.weights, 0.5, chunks=chunks, scale=0.5)
    grads = {n: p.grad.clone() for n, p in state.model.named_parameters() if p.grad is not None}
    return terms, total, grads


def test_row_chunks_give_the_whole_batch_loss_and_gradient(train_split):
    threads = torch.get_num_threads()
    cfg = cfg_for()
    terms_1, total_1, grads_1 = batch_gradients(cfg, train_split, chunks=1)
    terms_3, total_3, grads_3 = batch_gradients(cfg, train_split, chunks=3)
    assert torch.get_num_threads() == threads  # the pool's one-thread setting stays in its threads
    terms_1 = {k: v.detach() for k, v in terms_1.items()}
    assert float(total_3) == pytest.approx(float(total_1.detach()), rel=1e-5)
    for name in terms_1:
        assert float(terms_3[name]) == pytest.approx(float(terms_1[name]), rel=1e-4, abs=1e-7), name
    assert grads_3.keys() == grads_1.keys() and len(grads_1) > 50
    for name, grad in grads_1.items():
        torch.testing.assert_close(grads_3[name], grad, rtol=1e-3, atol=1e-6, msg=name)


def test_row_chunk_training_is_deterministic(train_split):
    cfg = cfg_for(batch_chunks=2, grad_accum=2)
    runs = []
    for _ in range(2):
        state = build_state(cfg, train_split, CPU)
        losses = train_epoch(state, cfg, train_split, CPU)
        runs.append((losses, [p.detach().clone() for p in state.model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    before = build_state(cfg, train_split, CPU).model.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, runs[0][1]))  # it did train


def test_auto_chunks_only_where_a_split_is_exact_and_deterministic():
    lnln, hrlf = get_model("lnln"), get_model("hrlf")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert resolve_chunks(cfg_for(), lnln, CPU) == 2  # one chunk per thread
        assert resolve_chunks(cfg_for(batch_size=31), lnln, CPU) == 1  # under 16 rows a chunk
    finally:
        torch.set_num_threads(threads)
    assert resolve_chunks(cfg_for(), hrlf, CPU) == 1  # InfoNCE contrasts rows of the batch
    assert resolve_chunks(cfg_for({"dropout": 0.1}), lnln, CPU) == 1
    assert resolve_chunks(cfg_for({"adversarial": {"disc_steps": 2}}), lnln, CPU) == 1
    assert resolve_chunks(cfg_for(), lnln, CPU, distributed=True) == 1
    assert resolve_chunks(cfg_for(batch_chunks=1), lnln, CPU) == 1
    assert resolve_chunks(cfg_for(batch_chunks=4), lnln, CPU) == 4


@pytest.mark.parametrize("model, train, reason", [
    ({"name": "hrlf"}, {}, "model 'hrlf' has batch-level loss terms"),
    ({"dropout": 0.2}, {}, "model.dropout > 0"),
    ({}, {"device": "cuda"}, "row chunks are for CPU training"),
])
def test_explicit_chunks_that_would_change_the_math_are_refused(model, train, reason):
    cfg = cfg_for(model, batch_chunks=2, **train)
    device = torch.device(cfg.train.device)
    with pytest.raises(MsaSearchError, match=f"train.batch_chunks: 2 is not possible here: {reason}"):
        resolve_chunks(cfg, get_model(cfg.model.name), device)
