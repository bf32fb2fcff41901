"""Row-parallel CPU training steps: the same gradient as the whole batch, deterministic (dropout
included), and refused where a split batch would change the loss."""
from __future__ import annotations

import pytest
import torch

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import SplitTensors, batch_rows, make_batch
from data_pipeline.synth import synthesize
from models.registry import get_model
from search.config import ExperimentConfig
import search.row_parallel as row_parallel
from search.row_parallel import resolve_chunks, step_generators
from search.trainer import build_state, forward_backward, load_state, save_state, train_epoch

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


@pytest.fixture(scope="module")
def small_split():
    """103 rows: batches of 48, 48 and 7 (a tail smaller than the chunks' minimum)."""
    data = synthesize("mosi-aligned", seed=3, scale=0.08)
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


def trained(cfg, train_split, epochs: int = 1, between=None):
    """Losses of the last epoch and the weights after `epochs` epochs from a fresh state."""
    state = build_state(cfg, train_split, CPU)
    for _ in range(epochs):
        if between is not None:
            between()
        losses = train_epoch(state, cfg, train_split, CPU)
        state.epoch += 1
    return losses, [p.detach().clone() for p in state.model.parameters()]


def same_run(a, b) -> bool:
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_row_chunk_training_is_deterministic(train_split, dropout):
    cfg = cfg_for({"dropout": dropout}, batch_chunks=2, grad_accum=2)
    first = trained(cfg, train_split)
    # Whatever the process drew from torch's generator before does not matter either.
    assert same_run(first, trained(cfg, train_split, between=lambda: torch.rand(7)))
    before = build_state(cfg, train_split, CPU).model.parameters()
    assert any(not torch.equal(a, b) for a, b in zip(before, first[1]))  # it did train


@pytest.mark.parametrize("chunks", [1, 2])
def test_dropout_masks_are_the_steps_own(small_split, chunks):
    """In-process CPU steps draw dropout from generators of (seed, epoch, batch, chunk): torch's
    generator, drawn from in between, changes nothing; train.seed does."""
    cfg = cfg_for({"dropout": 0.3}, batch_chunks=chunks)
    first = trained(cfg, small_split)
    assert same_run(first, trained(cfg, small_split, between=lambda: torch.rand(7)))
    no_dropout = trained(cfg_for(batch_chunks=chunks), small_split)
    assert first[0] != no_dropout[0]  # dropout was on


def test_threaded_chunks_with_dropout_equal_the_same_chunks_one_after_another(small_split, monkeypatch):
    """The chunks' threads change nothing: the same chunks, each with its generator, run in turn
    in the main thread give bit-identical losses and weights (one intra-op thread for both)."""
    cfg = cfg_for({"dropout": 0.2}, batch_chunks=2, grad_accum=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each chunk's thread: the same kernels, the same rounding
    try:
        threaded = trained(cfg, small_split, epochs=2)
        monkeypatch.setattr(row_parallel, "parallel_map", lambda fn, items, streams: [fn(x) for x in items])
        in_turn = trained(cfg, small_split, epochs=2)
    finally:
        torch.set_num_threads(threads)
    assert same_run(threaded, in_turn)


def test_a_chunked_run_with_dropout_resumes_as_if_it_never_stopped(small_split, tmp_path):
    cfg = cfg_for({"dropout": 0.2}, batch_chunks=2, epochs=2)
    straight = trained(cfg, small_split, epochs=2)
    state = build_state(cfg, small_split, CPU)
    train_epoch(state, cfg, small_split, CPU)
    state.epoch = 1
    save_state(state, tmp_path / "state.pt")
    torch.rand(7)  # whatever the process drew in between
    restored = build_state(cfg, small_split, CPU)
    load_state(restored, tmp_path / "state.pt", CPU)
    resumed = train_epoch(restored, cfg, small_split, CPU)
    assert same_run(straight, (resumed, [p.detach().clone() for p in restored.model.parameters()]))


def test_step_generators_differ_by_chunk_and_step_and_repeat():
    def draws(*key):
        return [torch.rand(4, generator=g) for g in step_generators(*key)]

    a, b = draws(1111, 0, 0, 2)
    assert not torch.equal(a, b)
    assert all(torch.equal(x, y) for x, y in zip(draws(1111, 0, 0, 2), (a, b)))
    assert not torch.equal(draws(1111, 0, 1, 2)[0], a)
    assert not torch.equal(draws(1111, 1, 0, 2)[0], a)
    assert not torch.equal(draws(1112, 0, 0, 2)[0], a)


def test_auto_chunks_only_where_a_split_is_exact_and_deterministic():
    lnln, hrlf = get_model("lnln"), get_model("hrlf")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert resolve_chunks(cfg_for(), lnln, CPU) == 2  # one chunk per thread
        assert resolve_chunks(cfg_for({"dropout": 0.1}), lnln, CPU) == 2  # each chunk its own generator
        assert resolve_chunks(cfg_for(batch_size=31), lnln, CPU) == 1  # under 16 rows a chunk
        assert resolve_chunks(with_bert(cfg_for()), lnln, CPU) == 1  # BERT's dropout is torch's
    finally:
        torch.set_num_threads(threads)
    assert resolve_chunks(cfg_for(), hrlf, CPU) == 1  # InfoNCE contrasts rows of the batch
    assert resolve_chunks(cfg_for({"adversarial": {"disc_steps": 2}}), lnln, CPU) == 1
    assert resolve_chunks(cfg_for(), lnln, CPU, distributed=True) == 1
    assert resolve_chunks(cfg_for(batch_chunks=1), lnln, CPU) == 1
    assert resolve_chunks(cfg_for(batch_chunks=4), lnln, CPU) == 4


def with_bert(cfg: ExperimentConfig) -> ExperimentConfig:
    """`model.text_encoder: bert` without the weights validation would look for."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"text_encoder": "bert"})})


@pytest.mark.parametrize("model, train, reason", [
    ({"name": "hrlf"}, {}, "model 'hrlf' has batch-level loss terms"),
    ("bert", {}, "model.text_encoder 'bert' has dropout of its own"),
    ({}, {"device": "cuda"}, "row chunks are for CPU training"),
])
def test_explicit_chunks_that_would_change_the_math_are_refused(model, train, reason):
    cfg = with_bert(cfg_for(batch_chunks=2)) if model == "bert" else cfg_for(model, batch_chunks=2, **train)
    device = torch.device(cfg.train.device)
    with pytest.raises(MsaSearchError, match=f"train.batch_chunks: 2 is not possible here: {reason}"):
        resolve_chunks(cfg, get_model(cfg.model.name), device)


class _TransposedGradient(torch.autograd.Function):
    """Identity whose backward returns the gradient as a transposed view (the same values)."""

    @staticmethod
    def forward(ctx, w):
        return w.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.t().contiguous().t()


def test_a_gradient_in_another_layout_trains_as_with_backward(train_split):
    """Fused AdamW reads a gradient as laid out like its parameter: the chunked backward must
    hand it one in that layout, as .backward() does."""
    cfg = cfg_for()
    rows = batch_rows(len(train_split), 48, shuffle=True, seed=0, epoch=0)[0]
    batch = make_batch(train_split, rows, cfg.missing.training(), seed=1, epoch=0)

    def trained_weight(chunks: int) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)

        def loss_fn(part):
            weight = _TransposedGradient.apply(model.weight)
            total = (part.label[:, None, None] * weight).square().mean()
            return {"total": total}, total

        if chunks == 1:
            loss_fn(batch)[1].backward()
        else:
            row_parallel.row_parallel_backward(model, batch, chunks, 1.0, loss_fn)
            assert model.weight.grad.stride() == model.weight.stride()
        optimizer.step()
        return model.weight.detach().clone()

    torch.testing.assert_close(trained_weight(2), trained_weight(1), rtol=1e-5, atol=1e-6)


def test_the_main_thread_runs_one_intra_op_thread_between_chunks(small_split):
    """Its share of a chunked step (the batch, the gradient sum, clipping, AdamW) is memory-bound
    work that a second OpenMP thread barely speeds up and a busy core stalls; one chunk keeps
    the threads (the step itself runs there), and the count comes back after the epoch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = {}
        for chunks in (2, 1):
            cfg = cfg_for(batch_chunks=chunks)
            state = build_state(cfg, small_split, CPU)
            train_epoch(state, cfg, small_split, CPU,
                        on_step=lambda *_, chunks=chunks: seen.setdefault(chunks, []).append(torch.get_num_threads()))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == {2: [1, 1, 1], 1: [2, 2, 2]}  # 103 rows: 3 batches
