"""LNLN's training-step optimisations keep its math (issue 17, item 2).

The unoptimised computation is kept here (`unoptimised`): each separate-norm block as it was,
one affine-free norm with the q/k/v norms' affines folded into the fused projection on every
call (per length group), heads unbound from a permuted view, and the plain path for the last
encoder block under dropout. The model as optimised (three norms projected by their weight
slices, heads split on the last dim, the few-query path under dropout on CPU) must give the
same outputs, loss terms and parameter gradients in fp32 within atol 1e-6, rtol 1e-5: float
rounding, with the same dropout masks.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models.layers as layers
import models.lnln as lnln_module
from data_pipeline.loader import SplitTensors, make_batch
from data_pipeline.missing import TrainingMissing
from data_pipeline.synth import synthesize
from models.config import LNLNConfig, ModelConfig
from models.dropout import attend, dropout_generator
from models.layers import TransformerBlock
from models.lnln import LNLN
from random_batches import random_batch

TOLERANCE = dict(atol=1e-6, rtol=1e-5)


def config(dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(hidden_dim=32, num_heads=4, dim_head=8, mlp_dim=32, dropout=dropout,
                       lnln=LNLNConfig(tokens=4))


def split_heads_by_unbind(projected: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    return projected.unflatten(-1, (parts, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def folded_block(block: TransformerBlock, x, context=None, mask=None, query_len=None):
    """A separate-norm block before the optimisation (`unoptimised`)."""
    attn, (h, dh) = block.attn, (block.attn.heads, block.attn.dim_head)
    norms = (block.norm_q, block.norm_k, block.norm_v)
    gain, shift = torch.stack([n.weight for n in norms]), torch.stack([n.bias for n in norms])  # (3, d)
    w = attn.to_qkv.weight.view(3, attn.inner, -1)  # (3, inner, d)
    weight, bias = (w * gain[:, None, :]).flatten(0, 1), torch.einsum("kid,kd->ki", w, shift).flatten()
    x_n = F.layer_norm(x, x.shape[-1:], eps=block.norm_q.eps)
    source = x_n if context is None else F.layer_norm(context, context.shape[-1:], eps=block.norm_q.eps)
    p = attn.dropout if attn.training else 0.0
    if context is None and query_len is not None and query_len < attn._absorb_below and p == 0:
        # The few-query path with the key shift dropped (softmax ignores it) and the value shift added after.
        b, t, d = x_n[:, :query_len].shape
        w_q, w_k, w_v = weight.view(3, h, dh, d).unbind(0)
        q = F.linear(x_n[:, :query_len], w_q.reshape(h * dh, d), bias[:attn.inner]).unflatten(-1, (h, dh))
        q = torch.einsum("bthe,hed->bhtd", q, w_k).reshape(b, 1, h * t, d)
        out = attend(q, source.unsqueeze(1), source.unsqueeze(1), mask, scale=dh ** -0.5)
        out = torch.einsum("bhtd,hed->bthe", out.view(b, h, t, d), w_v).flatten(2)
        attended = attn.to_out(out + bias[2 * attn.inner:])
    else:
        queries = x_n if query_len is None else x_n[:, :query_len]
        w_q, w_kv = weight.split([attn.inner, 2 * attn.inner])
        b_q, b_kv = bias.split([attn.inner, 2 * attn.inner])
        q = F.linear(queries, w_q, b_q).unflatten(-1, (h, dh)).transpose(1, 2)
        k, v = split_heads_by_unbind(F.linear(source, w_kv, b_kv), 2, h)
        attended = attn.to_out(attend(q, k, v, mask, dropout_p=p).transpose(1, 2).flatten(2))
    x = (x if query_len is None else x[:, :query_len]) + attended
    return x + block.mlp(block.norm_mlp(x))


@contextmanager
def unoptimised(monkeypatch):
    optimised = TransformerBlock.forward
    with monkeypatch.context() as patch:
        patch.setattr(TransformerBlock, "forward",
                      lambda self, *args: folded_block(self, *args) if self.separate else optimised(self, *args))
        patch.setattr(layers, "split_heads", split_heads_by_unbind)
        patch.setattr(lnln_module, "split_heads", split_heads_by_unbind)
        yield


@pytest.fixture(scope="module")
def pipeline_split() -> SplitTensors:
    ds = synthesize("mosi-aligned", seed=3, scale=0.02)  # 50 positions, lengths 12-50
    return SplitTensors.from_arrays(ds.spec, "train", ds.split("train"))


def step(model: LNLN, batch, dropout_seed: int | None = None) -> tuple[dict, dict, dict]:
    """Outputs, loss terms and gradients of one training step with the default weights
    (dropout from a generator of that seed, as a row chunk's)."""
    model.zero_grad(set_to_none=True)
    generator = None if dropout_seed is None else torch.Generator().manual_seed(dropout_seed)
    with dropout_generator(generator):
        outputs = model(batch, progress=0.5)
    terms = model.losses(outputs, batch, progress=0.5)
    sum(LNLN.LOSS_TERMS[k] * v for k, v in terms.items()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, terms, grads


def assert_same_step(fast, slow):
    (out_f, terms_f, grads_f), (out_s, terms_s, grads_s) = fast, slow
    for key in ("prediction", "completeness", "proxy", "corrected", "hyper_shift", "discriminator_logits"):
        torch.testing.assert_close(out_f[key], out_s[key], **TOLERANCE, msg=key)
    for key in ("features", "complete_features", "reconstructed"):
        for m in out_s[key]:
            torch.testing.assert_close(out_f[key][m], out_s[key][m], **TOLERANCE, msg=f"{key}.{m}")
    for name in terms_s:
        torch.testing.assert_close(terms_f[name], terms_s[name], **TOLERANCE, msg=name)
    assert grads_f.keys() == grads_s.keys() and len(grads_s) > 100
    for name in grads_s:
        torch.testing.assert_close(grads_f[name], grads_s[name], **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


def trained_norms(model: LNLN) -> LNLN:
    """Norms unlike their start (gain 1, shift 0), as in a trained model: folding them is then
    not the identity. The hyper-modality and proxy input tokens too: started at ones, each is
    a constant vector whose norm divides by sqrt(eps), which scales rounding up ~300x."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
        model.hyper_modality.hyper_tokens.normal_(1.0, 0.3)
        model.proxy_input.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("missing", [TrainingMissing(), None], ids=["missing", "complete"])
def test_training_step_equals_the_unoptimised_one_on_pipeline_batches(monkeypatch, pipeline_split, missing):
    """Host-planned length groups (the training loop's batches); with missing, about half the
    rows are changed and encoded twice, without it none are."""
    torch.manual_seed(0)
    model = trained_norms(LNLN(config(), pipeline_split.spec).train())
    batch = make_batch(pipeline_split, np.arange(16), missing, seed=1, epoch=0)
    changed = (batch.text.keep_host.sum(1) != batch.text.lengths).sum()
    assert (changed > 0) == (missing is not None)
    fast = step(model, batch)
    with unoptimised(monkeypatch):
        slow = step(model, batch)
    assert_same_step(fast, slow)


@pytest.mark.parametrize("rate", [0.5, 0.0], ids=["missing", "complete"])
def test_training_step_equals_the_unoptimised_one_with_device_length_groups(monkeypatch, rate):
    """Batches without host masks: the length groups are found on the device."""
    spec = synthesize("mosi-aligned", seed=3, scale=0.01).spec
    torch.manual_seed(0)
    model = trained_norms(LNLN(config(), spec).train())
    batch = random_batch(spec, 12, seed=4, rate=rate, untouched_row=1)
    fast = step(model, batch)
    with unoptimised(monkeypatch):
        slow = step(model, batch)
    assert_same_step(fast, slow)


def test_training_step_with_dropout_draws_the_unoptimised_masks(monkeypatch, pipeline_split):
    """Under dropout each encoder's last block now takes the few-query path, whose attention
    weights are laid out as the plain path's: the same generator drops the same weights."""
    torch.manual_seed(0)
    model = trained_norms(LNLN(config(dropout=0.2), pipeline_split.spec).train())
    batch = make_batch(pipeline_split, np.arange(16), TrainingMissing(), seed=1, epoch=0)
    fast = step(model, batch, dropout_seed=5)
    with unoptimised(monkeypatch):
        slow = step(model, batch, dropout_seed=5)
    assert_same_step(fast, slow)
    assert not torch.allclose(step(model, batch, dropout_seed=6)[0]["prediction"], fast[0]["prediction"])


@torch.no_grad()
def test_evaluation_predictions_equal_the_unoptimised_ones(monkeypatch, pipeline_split):
    torch.manual_seed(0)
    model = trained_norms(LNLN(config(), pipeline_split.spec).eval())
    batch = make_batch(pipeline_split, np.arange(16), TrainingMissing(), seed=1, epoch=0, with_complete=False)
    fast = model(batch)["prediction"]
    with unoptimised(monkeypatch):
        torch.testing.assert_close(fast, model(batch)["prediction"], **TOLERANCE)
