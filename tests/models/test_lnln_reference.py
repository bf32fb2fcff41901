"""Reference LNLN checkpoints load through the documented name mapping (models/lnln_reference.py).

The reference's tensor names and shapes below were read from the authors' code
(github.com/Haoyu-ha/LNLN: models/lnln.py, models/basic_layers.py, configs/train_mosi.yaml)
for the MOSI defaults: d = 128, 8 heads of dim 64 (inner 512), MLP 128, T = 8, text 50 x 768,
audio 375 x 5, vision 500 x 20, hyper-modality heads of dim 128 / 8 = 16, fusion depth 2.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from data_pipeline.loader import Batch, ModalityInput
from data_pipeline.schema import DataSpec
from models.config import LNLNConfig, ModelConfig
from models.lnln import LNLN
from models.lnln_reference import from_reference, is_reference, mapping_table, to_reference

D, INNER, MLP, T, HYPER_INNER = 128, 8 * 64, 128, 8, 8 * 16
MOSI = DataSpec(name="mosi", text_len=50, audio_len=375, vision_len=500, text_dim=768, audio_dim=5, vision_dim=20,
                label_min=-3.0, label_max=3.0, has_text_bert=False, text_special_tokens=False)

# basic_layers.Transformer instances: name -> (positions = input length + tokens, tokens or None).
REFERENCE_TRANSFORMERS = {
    "proj_l.1": (50 + T, T), "proj_a.1": (375 + T, T), "proj_v.1": (500 + T, T),
    "completeness_check.0": (T + 1, 1),
    "proxy_dominate_modality_generator": (3 * T + T, T),  # input_length 24: [h_p ; H_A ; H_V]
    "dmml.0": (T, None),
    "reconstructor.0": (T, None), "reconstructor.1": (T, None), "reconstructor.2": (T, None),
}
# One TransformerEncoder layer i (under encoder.layers.i): PreNorm_qkv(Attention), PreNorm(FeedForward).
SELF_LAYER = {
    **{f"0.norm_{x}.{p}": (D,) for x in "qkv" for p in ("weight", "bias")},
    **{f"0.fn.to_{x}.weight": (INNER, D) for x in "qkv"},
    "0.fn.to_out.0.weight": (D, INNER), "0.fn.to_out.0.bias": (D,),
    "1.norm.weight": (D,), "1.norm.bias": (D,),
    "1.fn.net.0.weight": (MLP, D), "1.fn.net.0.bias": (MLP,), "1.fn.net.3.weight": (D, MLP), "1.fn.net.3.bias": (D,),
}
# One HhyperLearningEncoder layer j (under dmml.1.layers.j): PreNorm_hyper(HhyperLearningLayer).
HYPER_LAYER = {
    **{f"0.norm{n}.{p}": (D,) for n in (1, 2, 3, 4) for p in ("weight", "bias")},
    **{f"0.fn.{name}.weight": (HYPER_INNER, D) for name in ("to_q", "to_k_ta", "to_k_tv", "to_v_ta", "to_v_tv")},
    "0.fn.to_out.0.weight": (D, HYPER_INNER), "0.fn.to_out.0.bias": (D,),
}
OTHER = {
    "h_hyper": (1, T, D), "h_p": (1, T, D),
    "proj_l.0.weight": (D, 768), "proj_l.0.bias": (D,), "proj_a.0.weight": (D, 5), "proj_a.0.bias": (D,),
    "proj_v.0.weight": (D, 20), "proj_v.0.bias": (D,),
    "effective_discriminator.0.weight": (64, D), "effective_discriminator.0.bias": (64,),
    "effective_discriminator.2.weight": (2, 64), "effective_discriminator.2.bias": (2,),
    "completeness_check.1.0.weight": (D // 2, D), "completeness_check.1.0.bias": (D // 2,),
    "completeness_check.1.2.weight": (1, D // 2), "completeness_check.1.2.bias": (1,),
    "dmml.2.pos_embedding_s": (1, T + 1, D), "dmml.2.pos_embedding_t": (1, T + 1, D), "dmml.2.extra_token": (1, 1, D),
    "dmml.3.weight": (1, D), "dmml.3.bias": (1,),
}


def reference_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor of the reference LNLN's state dict at MOSI defaults, without BERT."""
    shapes = dict(OTHER)
    for name, (positions, tokens) in REFERENCE_TRANSFORMERS.items():
        shapes[f"{name}.pos_embedding"] = (1, positions, D)
        if tokens is not None:
            shapes[f"{name}.extra_token"] = (1, tokens, D)
        shapes.update({f"{name}.encoder.layers.{i}.{k}": s for i in range(2) for k, s in SELF_LAYER.items()})
    shapes.update({f"dmml.1.layers.{j}.{k}": s for j in range(3) for k, s in HYPER_LAYER.items()})
    # The fusion's CrossTransformerEncoder layers: the same as a TransformerEncoder's.
    shapes.update({f"dmml.2.CrossTransformerEncoder.layers.{i}.{k}": s
                   for i in range(2) for k, s in SELF_LAYER.items()})
    return shapes


def reference_state_dict(seed: int = 0, tied_norms: bool = False) -> dict[str, torch.Tensor]:
    """Random values, all distinct (a trained reference's); with `tied_norms` the q/k/v norms
    of each block equal (an untrained reference's are)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(reference_shapes().items()):
        value = torch.randn(shape, generator=g) * 0.1
        layer_norm_scale = name.split(".")[-2:] in ([f"norm{n}", "weight"] for n in ("", 1, 2, 3, 4, "_q", "_k", "_v"))
        state[name] = value + 1.0 if layer_norm_scale else value
    if tied_norms:
        for name in state:
            for x in ("norm_k", "norm_v"):
                if f".{x}." in name:
                    state[name] = state[name.replace(x, "norm_q")].clone()
    return state


def mosi_model(**options) -> LNLN:
    torch.manual_seed(0)
    return LNLN(ModelConfig(lnln=LNLNConfig(**options)), MOSI)


@pytest.fixture(scope="module")
def model() -> LNLN:
    return mosi_model()


def test_reference_shapes_add_up_to_the_reference_model():
    shapes = reference_shapes()
    # Counted by building the authors' LNLN at configs/train_mosi.yaml (BERT left out).
    assert len(shapes) == 420
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 6_483_012


def test_our_lnln_has_the_reference_parameter_count(model):
    assert sum(p.numel() for p in model.parameters()) == 6_483_012  # the shared fusion token counted once


def test_every_reference_tensor_is_used_exactly_once_and_every_one_of_ours_is_filled(model):
    rules = mapping_table(model.state_dict())
    uses = Counter(name for rule in rules for name in rule.reference)
    assert uses == Counter(dict.fromkeys(reference_shapes(), 1)), "each reference tensor in exactly one rule"
    ours = Counter(name for rule in rules for name in rule.ours)
    assert ours == Counter(dict.fromkeys(model.state_dict(), 1))


def test_reference_checkpoint_loads_with_the_documented_transforms(model):
    ref = reference_state_dict()
    loaded = mosi_model()
    loaded.load_state_dict(from_reference(ref, loaded))
    ours = loaded.state_dict()
    cat = torch.cat
    expected = {
        "proxy_input": ref["h_p"],
        "hyper_modality.hyper_tokens": ref["h_hyper"],
        "embeddings.audio.in_proj.weight": ref["proj_a.0.weight"],
        "embeddings.vision.tokens": ref["proj_v.1.extra_token"],
        "embeddings.text.pos_embedding": ref["proj_l.1.pos_embedding"],
        "embeddings.text.transformer.blocks.1.attn.to_qkv.weight": cat(
            [ref[f"proj_l.1.encoder.layers.1.0.fn.to_{x}.weight"] for x in "qkv"]),
        "embeddings.text.transformer.blocks.1.norm_q.bias": ref["proj_l.1.encoder.layers.1.0.norm_q.bias"],
        "embeddings.text.transformer.blocks.1.norm_k.weight": ref["proj_l.1.encoder.layers.1.0.norm_k.weight"],
        "embeddings.text.transformer.blocks.1.norm_v.bias": ref["proj_l.1.encoder.layers.1.0.norm_v.bias"],
        "embeddings.text.transformer.blocks.1.norm_mlp.weight": ref["proj_l.1.encoder.layers.1.1.norm.weight"],
        "embeddings.text.transformer.blocks.1.mlp.net.3.weight": ref["proj_l.1.encoder.layers.1.1.fn.net.3.weight"],
        "completeness_check.encoder.tokens": ref["completeness_check.0.extra_token"],
        "completeness_check.head.2.weight": ref["completeness_check.1.2.weight"],
        "proxy_generator.pos_embedding": ref["proxy_dominate_modality_generator.pos_embedding"],
        "discriminator.net.0.bias": ref["effective_discriminator.0.bias"],
        "language_encoder.transformer.blocks.0.attn.to_out.weight": ref["dmml.0.encoder.layers.0.0.fn.to_out.0.weight"],
        # The reference's reconstructors are in the order audio, vision, language.
        "reconstructor.audio.pos_embedding": ref["reconstructor.0.pos_embedding"],
        "reconstructor.vision.transformer.blocks.0.mlp.net.0.bias":
            ref["reconstructor.1.encoder.layers.0.1.fn.net.0.bias"],
        "reconstructor.text.pos_embedding": ref["reconstructor.2.pos_embedding"],
        "hyper_modality.layers.2.norm_d.weight": ref["dmml.1.layers.2.0.norm1.weight"],
        "hyper_modality.layers.2.norm_a.weight": ref["dmml.1.layers.2.0.norm2.weight"],
        "hyper_modality.layers.2.norm_v.weight": ref["dmml.1.layers.2.0.norm3.weight"],
        "hyper_modality.layers.2.norm_hyper.weight": ref["dmml.1.layers.2.0.norm4.weight"],
        "hyper_modality.layers.0.to_q.weight": ref["dmml.1.layers.0.0.fn.to_q.weight"],
        "hyper_modality.layers.0.to_kv_a.weight": cat([ref["dmml.1.layers.0.0.fn.to_k_ta.weight"],
                                                      ref["dmml.1.layers.0.0.fn.to_v_ta.weight"]]),
        "hyper_modality.layers.1.to_kv_v.weight": cat([ref["dmml.1.layers.1.0.fn.to_k_tv.weight"],
                                                      ref["dmml.1.layers.1.0.fn.to_v_tv.weight"]]),
        "hyper_modality.layers.1.to_out.bias": ref["dmml.1.layers.1.0.fn.to_out.0.bias"],
        # Fusion: target = the language stream (queries), source = H_hyper; one shared token.
        "fusion.transformer.target_pos": ref["dmml.2.pos_embedding_t"],
        "fusion.transformer.source_pos": ref["dmml.2.pos_embedding_s"],
        "fusion.transformer.target_token": ref["dmml.2.extra_token"],
        "fusion.transformer.source_token": ref["dmml.2.extra_token"],
        "fusion.transformer.transformer.blocks.1.norm_q.weight":
            ref["dmml.2.CrossTransformerEncoder.layers.1.0.norm_q.weight"],
        "fusion.transformer.transformer.blocks.1.norm_k.weight":
            ref["dmml.2.CrossTransformerEncoder.layers.1.0.norm_k.weight"],
        "fusion.transformer.transformer.blocks.1.norm_v.weight":
            ref["dmml.2.CrossTransformerEncoder.layers.1.0.norm_v.weight"],
        "fusion.transformer.transformer.blocks.0.attn.to_qkv.weight": cat(
            [ref[f"dmml.2.CrossTransformerEncoder.layers.0.0.fn.to_{x}.weight"] for x in "qkv"]),
        "fusion.head.weight": ref["dmml.3.weight"],
    }
    for name, value in expected.items():
        assert torch.equal(ours[name], value), name
    # Found by value (all values are distinct), whatever the names: each tensor of ours is one
    # reference tensor, or reference tensors stacked by rows; every reference value lands.
    by_first = {v.flatten()[0].item(): name for name, v in ref.items()}
    assert len(by_first) == len(ref), "the values tell every reference tensor apart"
    landed = set()
    for name, value in ours.items():
        row = 0
        while row < (value.shape[0] if value.dim() == 2 else 1):
            piece = value[row] if value.dim() == 2 else value
            source = by_first[piece.flatten()[0].item()]
            n = ref[source].shape[0] if value.dim() == 2 else 1
            assert torch.equal(value[row:row + n] if value.dim() == 2 else value, ref[source]), name
            landed.add(source)
            row += n
    assert landed == set(by_first.values())


# Valid lengths of the two rows in the padded case (the rest of each row is zeros, as MMSA pads).
PADDED_LENGTHS = {"text": (50, 23), "audio": (375, 120), "vision": (310, 500)}


def reference_inputs(padded: bool) -> Batch:
    g = torch.Generator().manual_seed(1)
    x = {m: torch.randn(2, MOSI.seq_len(m), MOSI.dim(m), generator=g) for m in ("text", "audio", "vision")}
    valid = {m: torch.ones(2, MOSI.seq_len(m), dtype=torch.bool) for m in x}
    if padded:
        for m in x:
            for row, n in enumerate(PADDED_LENGTHS[m]):
                x[m][row, n:] = 0
                valid[m][row, n:] = False
    return Batch(**{m: ModalityInput(complete=None, observed=x[m], valid=valid[m], keep=valid[m]) for m in x},
                 label=torch.zeros(2), text_missing_fraction=torch.zeros(2))


@pytest.mark.parametrize("padded", [False, True], ids=["full-length", "padded"])
def test_loaded_model_predicts_what_the_reference_predicts(padded):
    """Golden values: the authors' code (BERT replaced by the identity) with a trained-like
    checkpoint (every q/k/v norm different) on these inputs. The reference attends over
    padding, so padded rows match with model.lnln.attend_padding: true."""
    loaded = mosi_model(attend_padding=padded).eval()
    loaded.load_state_dict(from_reference(reference_state_dict(), loaded))
    with torch.no_grad():
        out = loaded(reference_inputs(padded))
    golden = GOLDEN["padded" if padded else "full"]
    assert torch.allclose(out["prediction"], torch.tensor(golden[0]), atol=1e-4)
    assert torch.allclose(out["completeness"].reshape(-1), torch.tensor(golden[1]), atol=1e-5)


def test_masking_padding_makes_a_row_independent_of_its_padding():
    """The default (model.lnln.attend_padding: false) differs from the reference on padded rows
    exactly because padding is not attended: lengthening the padding changes nothing."""
    model = mosi_model().eval()
    model.load_state_dict(from_reference(reference_state_dict(), model))
    batch = reference_inputs(padded=True)
    with torch.no_grad():
        masked = model(batch)["prediction"]
        attended = mosi_model(attend_padding=True).eval()
        attended.load_state_dict(from_reference(reference_state_dict(), attended))
        assert not torch.allclose(attended(batch)["prediction"], masked, atol=1e-3)
        batch.audio.observed[1, 120:] = 5.0  # different padding values, same valid positions
        assert torch.equal(model(batch)["prediction"], masked)


# The authors' models/lnln.py (HEAD of github.com/Haoyu-ha/LNLN), configs/train_mosi.yaml,
# reference_state_dict(0) loaded strictly, bertmodel replaced by the identity, eval mode, CPU fp32:
# (prediction, completeness w) of the two rows.
GOLDEN = {
    "full": ([-1.3088250160217285, 1.047844409942627], [0.39570969343185425, 0.8015398979187012]),
    "padded": ([-2.303149461746216, 2.402498483657837], [0.39570969343185425, 0.8538611531257629]),
}


def test_round_trip_ours_to_reference_and_back_is_identical(model):
    ours = model.state_dict()
    ref = to_reference(ours)
    assert {k: tuple(v.shape) for k, v in ref.items()} == reference_shapes()
    back = from_reference(ref, model)
    assert set(back) == set(ours)
    for name, value in ours.items():
        assert torch.equal(back[name], value), name


def test_shared_norms_take_an_untrained_checkpoint_and_refuse_a_trained_one():
    """model.lnln.qkv_norms: shared holds one LayerNorm where the reference holds three."""
    shared = mosi_model(qkv_norms="shared")
    untrained = reference_state_dict(tied_norms=True)
    loaded = from_reference(untrained, shared)
    assert torch.equal(loaded["embeddings.audio.transformer.blocks.1.norm.weight"],
                       untrained["proj_a.1.encoder.layers.1.0.norm_k.weight"])
    assert torch.equal(loaded["fusion.transformer.transformer.blocks.0.norm_context.bias"],
                       untrained["dmml.2.CrossTransformerEncoder.layers.0.0.norm_v.bias"])
    assert set(to_reference(loaded)) == set(untrained)
    with pytest.raises(ValueError, match=r"'proj_l\.1\.encoder\.layers\.0\.0\.norm_q\.weight' and "
                                         r"'proj_l\.1\.encoder\.layers\.0\.0\.norm_k\.weight' differ.*"
                                         r"'embeddings\.text\.transformer\.blocks\.0\.norm\.weight'.*"
                                         r"qkv_norms: separate"):
        from_reference(reference_state_dict(), shared)


def test_separate_norms_are_the_shared_form_when_they_are_equal():
    """Folding the three norms' affines into the projections computes what one norm computes."""
    separate, shared = mosi_model().eval(), mosi_model(qkv_norms="shared").eval()
    untrained = reference_state_dict(tied_norms=True)
    separate.load_state_dict(from_reference(untrained, separate))
    shared.load_state_dict(from_reference(untrained, shared))
    batch = reference_inputs(padded=True)
    with torch.no_grad():
        assert torch.allclose(separate(batch)["prediction"], shared(batch)["prediction"], atol=1e-5)


def test_shape_mismatch_names_the_tensor_the_expected_and_the_found_shape(model):
    ref = reference_state_dict()
    ref["proj_a.0.weight"] = torch.zeros(D, 6)
    with pytest.raises(ValueError, match=r"'proj_a\.0\.weight': expected shape \(128, 5\).*found \(128, 6\)"):
        from_reference(ref, model)
    ref = reference_state_dict()
    ref["dmml.1.layers.0.0.fn.to_v_tv.weight"] = torch.zeros(HYPER_INNER + 1, D)
    with pytest.raises(ValueError, match=r"to_v_tv\.weight': expected shape \(128, 128\).*found \(129, 128\)"):
        from_reference(ref, model)


def test_missing_and_homeless_reference_tensors_are_named(model):
    ref = reference_state_dict()
    del ref["dmml.3.bias"]
    with pytest.raises(ValueError, match=r"lacks 'dmml\.3\.bias'"):
        from_reference(ref, model)
    ref = reference_state_dict()
    ref["dmml.4.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"'dmml\.4\.weight' \(3,\) has no home"):
        from_reference(ref, model)
    raw_update = mosi_model(hyper_update="raw")  # no LN(H_hyper): the reference's norm4 has no home
    with pytest.raises(ValueError, match=r"'dmml\.1\.layers\.0\.0\.norm4\.bias' \(128,\) has no home.*"
                                         r"hyper_update: normalized"):
        from_reference(reference_state_dict(), raw_update)


def test_bert_weights_are_skipped_by_prefix_and_reported(model):
    ref = {**reference_state_dict(), "bertmodel.model.embeddings.word_embeddings.weight": torch.zeros(30, 4),
           "bertmodel.model.pooler.dense.bias": torch.zeros(4)}
    lines = []
    assert set(from_reference(ref, model, on_skip=lines.append)) == set(model.state_dict())
    assert len(lines) == 1 and lines[0].startswith("skipped bertmodel.* (2 tensors)") and "features" in lines[0]
    with pytest.warns(UserWarning, match=r"skipped bertmodel\.\*"):
        from_reference(ref, model)


def test_bert_weights_load_into_a_model_that_has_bert():
    class TinyBert(nn.Module):
        def __init__(self):
            super().__init__()
            self.embeddings = nn.Module()
            self.embeddings.word_embeddings = nn.Embedding(30, 4)
            self.embeddings.register_buffer("position_ids", torch.arange(6)[None])

    with_bert = mosi_model()
    with_bert.bert = TinyBert()
    ref = {**reference_state_dict(), "bertmodel.model.embeddings.word_embeddings.weight": torch.randn(30, 4),
           "bertmodel.model.embeddings.position_ids": torch.arange(6)[None]}
    lines = []
    ours = from_reference(ref, with_bert, on_skip=lines.append)
    assert torch.equal(ours["bert.embeddings.word_embeddings.weight"],
                       ref["bertmodel.model.embeddings.word_embeddings.weight"])
    assert torch.equal(ours["bert.embeddings.position_ids"], torch.arange(6)[None])
    assert lines == ["skipped bertmodel.model.embeddings.position_ids (1 tensors): a constant buffer the model keeps "
                     "its own of"]


def test_separate_fusion_tokens_have_one_reference_token():
    separate = mosi_model(fusion_token="separate")
    loaded = from_reference(reference_state_dict(), separate)
    assert torch.equal(loaded["fusion.transformer.target_token"], loaded["fusion.transformer.source_token"])
    ours = separate.state_dict()
    ours["fusion.transformer.source_token"] = ours["fusion.transformer.source_token"] + 1.0
    with pytest.raises(ValueError, match=r"'fusion\.transformer\.target_token' and 'fusion\.transformer\.source_token'"
                                         r" differ.*'dmml\.2\.extra_token'"):
        to_reference(ours)


def test_a_model_whose_fusion_queries_come_from_h_hyper_is_refused():
    with pytest.raises(ValueError, match="fusion_query: hyper"):
        from_reference(reference_state_dict(), mosi_model(fusion_query="hyper"))


def test_reference_and_our_state_dicts_are_told_apart(model):
    assert is_reference(reference_state_dict())
    assert not is_reference(model.state_dict())
