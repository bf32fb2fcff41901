"""Dropout from a generator of the caller's (models/layers.py): nn.Dropout's and SDPA's math, bit
for bit, with only the generator changed; torch's own outside the context; identity in eval."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.dropout import Dropout, attend, dropout_generator


def test_dropout_under_a_generator_is_nn_dropout_from_that_state():
    x = torch.randn(16, 10, 32)
    torch.manual_seed(5)
    expected = torch.nn.Dropout(0.1)(x)
    with dropout_generator(torch.Generator().manual_seed(5)):
        got = Dropout(0.1)(x)
    assert torch.equal(got, expected)
    kept = got != 0
    torch.testing.assert_close(got[kept], x[kept] / 0.9)  # inverted: kept values scaled by 1 / (1 - p)


def test_dropout_without_a_generator_is_torchs_and_eval_is_identity():
    x = torch.randn(8, 32)
    torch.manual_seed(1)
    expected = F.dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(Dropout(0.3)(x), expected)
    with dropout_generator(torch.Generator().manual_seed(1)):
        assert Dropout(0.3).eval()(x) is x
        assert Dropout(0.0)(x) is x


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_dropout_under_a_generator_is_sdpa_from_that_state(masked, scale):
    q, k, v = (torch.randn(4, 2, n, 8, requires_grad=True) for n in (5, 9, 9))
    mask = torch.rand(4, 1, 1, 9) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True  # every query has a key, as in the models
    torch.manual_seed(0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.1, scale=scale)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
    with dropout_generator(torch.Generator().manual_seed(0)):
        got = attend(q, k, v, mask, dropout_p=0.1, scale=scale)
    assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), expected_grads))


def test_the_generator_is_per_thread_and_restored():
    g = torch.Generator().manual_seed(0)
    with dropout_generator(g):
        with dropout_generator(None):
            torch.manual_seed(2)
            inner = Dropout(0.5)(torch.ones(64))
        torch.manual_seed(2)
        assert torch.equal(inner, F.dropout(torch.ones(64), 0.5))
        state = g.get_state()
        Dropout(0.5)(torch.ones(64))
        assert not torch.equal(g.get_state(), state)  # drawn from g again
