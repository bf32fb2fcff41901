"""LNLN and its shared layers: shapes, loss terms, GRL, DMC gating, eval economy (spec/lnln.md)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models.lnln as lnln_module
from data_pipeline.loader import Batch, SplitTensors, make_batch
from data_pipeline.missing import TrainingMissing
from data_pipeline.schema import DataSpec
from data_pipeline.synth import synthesize
from models.config import AdversarialConfig, LNLNConfig, ModelConfig
from models.layers import Attention, TokenEncoder, TransformerBlock, grad_reverse, grl_coefficient
from models.lnln import LNLN
from random_batches import random_batch

SPEC = DataSpec(name="mosi-aligned", text_len=12, audio_len=10, vision_len=9, text_dim=16, audio_dim=5,
                vision_dim=7, label_min=-3.0, label_max=3.0, has_text_bert=False, text_special_tokens=False)
B = 6


def tiny_config(lambda_max: float = 1.0, task_loss: str = "mse", **lnln_options) -> ModelConfig:
    return ModelConfig(hidden_dim=32, num_heads=4, dim_head=8, mlp_dim=32, task_loss=task_loss,
                       adversarial=AdversarialConfig(lambda_max=lambda_max),
                       lnln=LNLNConfig(tokens=4, **lnln_options))


CFG = tiny_config()


def tiny_model(**options) -> LNLN:
    torch.manual_seed(0)
    return LNLN(tiny_config(**options), SPEC)


def tiny_batch(seed: int = 0, rate: float = 0.5) -> Batch:
    return random_batch(SPEC, B, seed=seed, rate=rate, untouched_row=1)


def grads(model, loss, module) -> torch.Tensor:
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


# --- shapes and loss terms -------------------------------------------------------------------

def test_forward_shapes_in_train_and_eval():
    model, batch = tiny_model(), tiny_batch()
    out = model.train()(batch)
    assert out["prediction"].shape == (B,)
    assert out["completeness"].shape == (B, 1)
    assert out["discriminator_logits"].shape == (2 * B, 4, 2)
    for m in ("text", "audio", "vision"):
        assert out["features"][m].shape == out["complete_features"][m].shape == (B, 4, 32)
        assert out["reconstructed"][m].shape == (B, 4, 32)
    with torch.no_grad():
        out = model.eval()(batch)
    assert out["prediction"].shape == (B,) and out["corrected"].shape == (B, 4, 32)


def test_losses_are_exactly_the_named_terms_finite_and_nonzero():
    model, batch = tiny_model(), tiny_batch()
    terms = model.train().losses(model(batch), batch)
    assert set(terms) == set(LNLN.LOSS_TERMS) == {"task", "completeness", "adversarial", "reconstruction", "sparsity"}
    for name, value in terms.items():
        assert value.dim() == 0, name
        assert torch.isfinite(value) and value.item() != 0.0, name
    assert LNLN.LOSS_TERMS == {"task": 1.0, "completeness": 0.9, "adversarial": 0.8, "reconstruction": 0.1,
                               "sparsity": 0.0}


def test_train_step_on_pipeline_batch_updates_every_trained_module():
    ds = synthesize("mosi-aligned", seed=3, scale=0.01)
    data = SplitTensors.from_arrays(ds.spec, "train", ds.split("train"))
    batch = make_batch(data, np.arange(min(8, len(data))), TrainingMissing(), seed=1, epoch=0)
    torch.manual_seed(0)
    model = LNLN(CFG, ds.spec).train()
    terms = model.losses(model(batch, progress=0.5), batch, progress=0.5)
    sum(LNLN.LOSS_TERMS[k] * v for k, v in terms.items()).backward()
    for name in ("embeddings", "completeness_check", "proxy_generator", "discriminator", "language_encoder",
                 "hyper_modality", "fusion", "reconstructor"):
        module = getattr(model, name)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name


def test_l1_task_loss_option_gives_mean_absolute_error():
    model, batch = tiny_model(task_loss="l1"), tiny_batch()
    out = model.eval()(batch)
    expected = (out["prediction"] - batch.label).abs().mean()
    assert torch.allclose(model.losses(out, batch)["task"], expected)


# --- gradient reversal -------------------------------------------------------------------------

def adversarial_grad_on_proxy(model, batch, progress=0.0):
    out = model.train()(batch, progress=progress)
    return grads(model, model.losses(out, batch, progress=progress)["adversarial"], model.proxy_generator)


@pytest.mark.parametrize("lambda_max", [1.0, 0.5])
def test_grl_reverses_adversarial_gradient_reaching_proxy_generator(monkeypatch, lambda_max):
    model, batch = tiny_model(lambda_max=lambda_max), tiny_batch()
    reversed_grad = adversarial_grad_on_proxy(model, batch)
    monkeypatch.setattr(lnln_module, "grad_reverse", lambda x, lambd: x)  # GRL as plain identity
    plain_grad = adversarial_grad_on_proxy(model, batch)
    assert plain_grad.abs().sum() > 0
    assert torch.allclose(reversed_grad, -lambda_max * plain_grad, atol=1e-7)
    cosine = torch.nn.functional.cosine_similarity(reversed_grad, plain_grad, dim=0)
    assert cosine < -0.999


def test_task_gradient_is_reversed_by_default_and_not_with_adversarial_grl_placement(monkeypatch):
    batch = tiny_batch()

    def task_grad(model):
        return grads(model, model.losses(model.train()(batch), batch)["task"], model.proxy_generator)

    default, adversarial = tiny_model(), tiny_model(grl_placement="adversarial")
    g_default, g_adversarial = task_grad(default), task_grad(adversarial)
    monkeypatch.setattr(lnln_module, "grad_reverse", lambda x, lambd: x)
    g_plain = task_grad(tiny_model())
    assert g_plain.abs().sum() > 0
    assert torch.allclose(g_default, -g_plain, atol=1e-7)  # the reference: GRL on the shared path
    assert torch.allclose(g_adversarial, g_plain, atol=1e-7)  # DANN: only the discriminator path reverses


def test_grad_reverse_is_identity_forward_and_scaled_negation_backward():
    x = torch.randn(3, 4, requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    y.backward(torch.ones_like(y))
    assert torch.allclose(x.grad, torch.full_like(x, -0.3))


def test_grl_coefficient_schedules():
    assert [grl_coefficient(p, "constant", 2.0) for p in (0.0, 0.5, 1.0)] == [2.0, 2.0, 2.0]
    assert [grl_coefficient(p, "linear", 2.0) for p in (0.0, 0.5, 1.0)] == [0.0, 1.0, 2.0]
    dann = [grl_coefficient(p, "dann", 1.0, gamma=10.0) for p in (0.0, 0.5, 1.0)]
    assert dann[0] == 0.0
    assert math.isclose(dann[1], 2 / (1 + math.exp(-5)) - 1) and math.isclose(dann[2], 2 / (1 + math.exp(-10)) - 1)
    with pytest.raises(ValueError, match="constant, linear, dann"):
        grl_coefficient(0.5, "cosine")


# --- Dominant Modality Correction gating -------------------------------------------------------

@torch.no_grad()
def test_completeness_one_makes_prediction_ignore_proxy_generator():
    model, batch = tiny_model().eval(), tiny_batch()

    def perturbed_change(w):
        model.fixed_completeness = w
        before = model(batch)["prediction"]
        saved = [p.clone() for p in model.proxy_generator.parameters()]
        for p in model.proxy_generator.parameters():
            p.add_(torch.randn_like(p))
        after = model(batch)["prediction"]
        for p, s in zip(model.proxy_generator.parameters(), saved):
            p.copy_(s)
        return (after - before).abs().max().item()

    assert perturbed_change(1.0) == 0.0
    assert perturbed_change(0.5) > 1e-4  # the same perturbation matters when the proxy is mixed in


@torch.no_grad()
def test_completeness_zero_makes_prediction_ignore_language_input():
    model, batch = tiny_model(fixed_completeness=0.0).eval(), tiny_batch()
    other = tiny_batch(seed=1)  # same audio/vision, different text
    other = Batch(text=other.text, audio=batch.audio, vision=batch.vision, label=batch.label,
                  text_missing_fraction=batch.text_missing_fraction)
    assert torch.equal(model(batch)["prediction"], model(other)["prediction"])
    model.fixed_completeness = 1.0
    assert not torch.allclose(model(batch)["prediction"], model(other)["prediction"])


# --- efficiency contracts ---------------------------------------------------------------------

def test_eval_mode_skips_complete_input_discriminator_and_reconstructor():
    model, batch = tiny_model(), tiny_batch()
    calls = []
    for name in ("discriminator", "reconstructor"):
        for module in getattr(model, name).modules():
            module.register_forward_hook(lambda *args, name=name: calls.append(name))
    for m in ("text", "audio", "vision"):  # a complete-input pass would turn everything NaN
        batch.modality(m).complete.fill_(float("nan"))
    with torch.no_grad():
        out = model.eval()(batch)
    assert calls == []
    assert torch.isfinite(out["prediction"]).all()
    assert "discriminator_logits" not in out and "reconstructed" not in out
    model.train()(batch)
    assert "discriminator" in calls and "reconstructor" in calls


def test_complete_features_equal_encoding_the_complete_input():
    model, batch = tiny_model().train(), tiny_batch()
    out = model(batch)
    for m in ("text", "audio", "vision"):
        x = batch.modality(m)
        direct = model.embeddings[m](x.complete, x.valid)
        assert torch.allclose(out["complete_features"][m], direct, atol=1e-5), m


def test_token_encoder_ignores_padding_and_length_buckets():
    torch.manual_seed(0)
    enc = TokenEncoder(20, 32, depth=2, heads=4, dim_head=8, mlp_dim=32, tokens=4, d_in=5, length_buckets=1)
    x = torch.randn(7, 20, 5)
    mask = torch.arange(20)[None, :] < torch.tensor([20, 3, 17, 8, 11, 5, 14])[:, None]
    reference = enc(x, mask)
    enc.length_buckets = 4
    assert torch.allclose(enc(x, mask), reference, atol=1e-5)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 100)  # garbage in the padding
    assert torch.allclose(enc(noisy, mask), reference, atol=1e-5)
    assert reference.shape == (7, 4, 32)


def test_token_encoder_makes_the_same_submodule_calls_for_any_batch_size():
    # ZeRO-3 gathers weights per submodule call: ranks with a 1-row tail batch and a full
    # batch must call the same submodules the same number of times.
    torch.manual_seed(0)
    enc = TokenEncoder(20, 32, depth=2, heads=4, dim_head=8, mlp_dim=32, tokens=4, d_in=5, length_buckets=4)
    calls = []
    enc.in_proj.register_forward_pre_hook(lambda *_: calls.append(1))
    lengths = torch.tensor([20, 3, 17, 8, 11, 5, 14])
    outputs = {}
    for rows in (7, 2, 1):
        calls.clear()
        x, mask = torch.randn(rows, 20, 5), torch.arange(20)[None, :] < lengths[:rows, None]
        outputs[rows] = (enc(x, mask), len(calls), x, mask)
    assert [outputs[r][1] for r in (7, 2, 1)] == [4, 4, 4]
    for rows in (2, 1):  # empty groups change nothing: each row as if encoded alone
        out, _, x, mask = outputs[rows]
        for i in range(rows):
            alone = enc._encode(x[i:i + 1, :int(lengths[i])], mask[i:i + 1, :int(lengths[i])])
            assert torch.allclose(out[i:i + 1], alone, atol=1e-5)


def test_absorbed_few_query_attention_matches_full_attention():
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8).double()
    x = torch.randn(3, 15, 32, dtype=torch.float64)
    mask = (torch.rand(3, 15) > 0.3)
    mask[:, :2] = True
    mask = mask[:, None, None, :]
    full = attn(x, mask=mask)[:, :2]
    assert 2 < attn._absorb_below
    assert torch.allclose(attn(x, mask=mask, query_len=2), full, atol=1e-12)


@pytest.mark.parametrize("cross", [False, True])
def test_separate_qkv_norms_equal_three_layer_norms_on_every_attention_path(cross):
    """The three norms, each projected by its slice of the attention's weight, compute
    LN_q(x), LN_k(x or context), LN_v(x or context) -> attention, on the full and the
    absorbed (few-query) paths, and the gradients reach the three norms."""
    torch.manual_seed(0)
    block = TransformerBlock(32, heads=4, dim_head=8, mlp_dim=16, cross=cross, qkv_norms="separate").double()
    for norm in (block.norm_q, block.norm_k, block.norm_v):
        torch.nn.init.normal_(norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = torch.randn(3, 15, 32, dtype=torch.float64)
    context = torch.randn(3, 11, 32, dtype=torch.float64) if cross else None
    source = x if context is None else context
    mask = torch.rand(3, source.shape[1]) > 0.3
    mask[:, :2] = True
    mask = mask[:, None, None, :]

    def by_hand(query_len=None):
        attn, (h, dh) = block.attn, (block.attn.heads, block.attn.dim_head)
        w_q, w_k, w_v = attn.to_qkv.weight.split(attn.inner)
        queries = x if query_len is None else x[:, :query_len]
        q, k, v = (F.linear(norm(t), w).unflatten(-1, (h, dh)).transpose(1, 2)
                   for norm, t, w in ((block.norm_q, queries, w_q), (block.norm_k, source, w_k),
                                      (block.norm_v, source, w_v)))
        out = attn.to_out(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2))
        y = queries + out
        return y + block.mlp(block.norm_mlp(y))

    assert torch.allclose(block(x, context, mask), by_hand(), atol=1e-10)
    if not cross:  # the absorbed path: a few queries of self-attention
        assert 2 < block.attn._absorb_below
        assert torch.allclose(block(x, None, mask, query_len=2), by_hand(2), atol=1e-10)
    block(x, context, mask).sum().backward()
    assert all(n.weight.grad.abs().sum() > 0 and n.bias.grad.abs().sum() > 0
               for n in (block.norm_q, block.norm_k, block.norm_v))


def test_attend_padding_attends_over_padded_positions():
    torch.manual_seed(0)
    model = LNLN(tiny_config(attend_padding=True), SPEC).eval()
    batch = tiny_batch()
    padded = batch.audio.valid.logical_not()
    assert padded.any(), "the test needs padded audio"
    with torch.no_grad():
        before = model(batch)["prediction"]
        batch.audio.observed[padded] = 3.0
        assert not torch.allclose(model(batch)["prediction"], before)


# --- construction -------------------------------------------------------------------------------

def test_parameter_count_at_mosi_shapes_is_about_6_4m():
    spec = DataSpec(name="mosi", text_len=50, audio_len=375, vision_len=500, text_dim=768, audio_dim=5,
                    vision_dim=20, label_min=-3.0, label_max=3.0, has_text_bert=True, text_special_tokens=True)
    model = LNLN(ModelConfig(), spec)
    count = sum(p.numel() for p in model.parameters())
    assert 6.0e6 < count < 7.0e6, count


def test_fusion_depth_follows_dataset_family():
    assert len(tiny_model().fusion.transformer.transformer.blocks) == 2
    mosei = LNLN(CFG, DataSpec(**{**SPEC.__dict__, "name": "mosei"}))
    assert len(mosei.fusion.transformer.transformer.blocks) == 4


def test_bert_text_encoder_without_local_weights_raises_clear_error(tmp_path):
    spec = DataSpec(**{**SPEC.__dict__, "has_text_bert": True})
    cfg = CFG.model_copy(update={"text_encoder": "bert", "bert_path": str(tmp_path / "missing")})
    with pytest.raises(ValueError, match="bert_path"):
        LNLN(cfg, spec)


def test_every_lnln_option_is_reachable_from_the_config():
    # Built from its config alone: each option of model.lnln changes the module it builds.
    model = LNLN(tiny_config(fusion_depth=3, hyper_dim_head=4, grl_placement="adversarial", fusion_query="hyper",
                             fusion_token="separate", hyper_update="raw", hyper_init="normal",
                             proxy_input_tokens=False, detach_reconstruction_target=True, fixed_completeness=0.5,
                             length_buckets=2, qkv_norms="shared", attend_padding=True), SPEC)
    assert len(model.fusion.transformer.transformer.blocks) == 3 and model.fusion.query == "hyper"
    assert model.fusion.transformer.source_token is not model.fusion.transformer.target_token
    assert model.hyper_modality.layers[0].dim_head == 4
    assert isinstance(model.hyper_modality.layers[0].norm_hyper, torch.nn.Identity)
    assert model.hyper_modality.hyper_tokens.abs().max() < 0.5, "N(0, 0.02^2), not ones"
    assert model.proxy_input is None and model.proxy_generator.seq_len == 2 * 4
    assert model.grl_placement == "adversarial" and model.detach_reconstruction_target
    assert model.fixed_completeness == 0.5 and model.embeddings["text"].length_buckets == 2
    assert model.embeddings["text"].num_tokens == 4 and model.attend_padding
    blocks = [*model.embeddings["audio"].transformer.blocks, *model.fusion.transformer.transformer.blocks]
    assert all(not b.separate and not hasattr(b, "norm_q") for b in blocks)


def test_defaults_are_the_reference_forward_pass():
    model = tiny_model()
    assert model.grl_placement == "shared" and model.fusion.query == "language"
    assert model.fusion.transformer.source_token is model.fusion.transformer.target_token, "one shared token"
    assert torch.equal(model.hyper_modality.hyper_tokens, torch.ones_like(model.hyper_modality.hyper_tokens))
    assert torch.equal(model.proxy_input, torch.ones(1, 4, 32))
    # [H_p0 ; H_A ; H_V] plus the generator's own T tokens: 4T positions.
    assert model.proxy_generator.seq_len == 3 * 4 and model.proxy_generator.pos_embedding.shape[1] == 4 * 4
    assert all(isinstance(layer.norm_hyper, torch.nn.LayerNorm) for layer in model.hyper_modality.layers)
    assert model.hyper_modality.layers[0].dim_head == 32 // 4  # d / heads
    assert not model.attend_padding
    blocks = [*model.proxy_generator.transformer.blocks, *model.fusion.transformer.transformer.blocks]
    assert all(b.separate and not hasattr(b, "norm") for b in blocks), "three pre-norms per attention block"


def test_each_hyper_modality_layer_updates_the_normalised_hyper_tokens():
    # The reference: H_hyper <- LN_j(H_hyper) + delta_j, so the raw start never survives as a base.
    torch.manual_seed(0)
    model = tiny_model()
    hyper = model.hyper_modality
    h = [torch.randn(2, 4, 32) for _ in range(3)]
    h_a, h_v = torch.randn(2, 4, 32), torch.randn(2, 4, 32)
    with torch.no_grad():
        hyper.hyper_tokens.normal_()
        got, _ = hyper(h, h_a, h_v)
        expected = hyper.hyper_tokens.expand(2, -1, -1)
        for layer, h_d in zip(hyper.layers, h):
            expected = layer.norm_hyper(expected) + layer(h_d, h_a, h_v)
        raw = hyper.hyper_tokens.expand(2, -1, -1) + sum(layer(h_d, h_a, h_v) for layer, h_d in zip(hyper.layers, h))
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, raw, atol=1e-3)


@torch.no_grad()
def test_fusion_takes_its_queries_from_the_language_stream():
    # Cross-attention only: output position i of the queried stream depends on that stream's
    # position i and on every key/value position. Perturbing H_D^3 at one position must change
    # one output position; perturbing H_hyper changes them all.
    torch.manual_seed(0)
    fusion = tiny_model().eval().fusion.transformer
    h_language, h_hyper = torch.randn(2, 4, 32), torch.randn(2, 4, 32)

    def changed_positions(language, hyper):
        before = fusion(h_language, h_hyper)  # what Fusion calls for query "language"
        after = fusion(language, hyper)
        return ((after - before).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()

    bumped = h_language.clone()
    bumped[:, 2] += torch.randn(2, 32)  # not a constant: the pre-norms would remove it
    assert changed_positions(bumped, h_hyper) == [1 + 2], "the prepended token sits at 0"
    assert changed_positions(h_language, h_hyper + torch.randn_like(h_hyper)) == list(range(5))
    model = tiny_model().eval()
    calls = []
    model.fusion.transformer.forward = lambda target, source: calls.append((target, source)) or torch.zeros(2, 5, 32)
    model.fusion(h_hyper, h_language)
    assert calls[0][0] is h_language and calls[0][1] is h_hyper
