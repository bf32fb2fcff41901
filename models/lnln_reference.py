"""The reference LNLN's state-dict names <-> ours (spec/lnln.md, "Checks an implementation must pass").

The reference is the authors' public code (github.com/Haoyu-ha/LNLN: models/lnln.py,
models/basic_layers.py); its training script saves {"epoch", "state_dict", "optimizer"}.
Its modules, and where each lives in our LNLN (i: block, j: hyper-modality layer):

| reference                                 | ours                                      |
|-------------------------------------------|-------------------------------------------|
| h_p (1, T, d)                             | proxy_input                               |
| h_hyper (1, T, d)                         | hyper_modality.hyper_tokens               |
| proj_{l,a,v}.0 (Linear)                   | embeddings.{text,audio,vision}.in_proj    |
| proj_{l,a,v}.1 (Transformer)              | embeddings.{text,audio,vision}            |
| completeness_check.0 (Transformer)        | completeness_check.encoder                |
| completeness_check.1.{0,2} (MLP)          | completeness_check.head.{0,2}             |
| proxy_dominate_modality_generator         | proxy_generator                           |
| effective_discriminator.{0,2}             | discriminator.net.{0,2}                   |
| dmml.0 (language encoder, Transformer)    | language_encoder                          |
| dmml.1.layers.j.0 (hyper-modality layer)  | hyper_modality.layers.j                   |
| dmml.2 (CrossTransformer)                 | fusion.transformer                        |
| dmml.3 (Linear)                           | fusion.head                               |
| reconstructor.{0,1,2} (audio, vision, language: its order) | reconstructor.{audio,vision,text} |
| bertmodel.model.* (BertModel)             | bert.* (model.text_encoder: bert)         |

A reference `Transformer` (pos_embedding, extra_token, encoder.layers.i) is our `TokenEncoder`
(pos_embedding, tokens, transformer.blocks.i); shapes are the same. The transforms, per block:

| reference (under encoder.layers.i)    | ours (under transformer.blocks.i) | transform                      |
|---------------------------------------|-----------------------------------|--------------------------------|
| 0.norm_q, 0.norm_k, 0.norm_v          | norm_q, norm_k, norm_v            | same                           |
| 0.fn.to_q, 0.fn.to_k, 0.fn.to_v       | attn.to_qkv                       | concatenate rows: [q; k; v]    |
| 0.fn.to_out.0                         | attn.to_out                       | same                           |
| 1.norm, 1.fn.net.0, 1.fn.net.3        | norm_mlp, mlp.net.0, mlp.net.3    | same                           |

The fusion (dmml.2 -> fusion.transformer): pos_embedding_t / pos_embedding_s -> target_pos /
source_pos (target = the language stream, which the queries come from); extra_token ->
target_token and source_token (tie: one token for both streams, model.lnln.fusion_token:
shared); its blocks (CrossTransformerEncoder.layers.i) as above. A hyper-modality layer:
0.norm1..4 -> norm_d, norm_a, norm_v, norm_hyper; 0.fn.to_q -> to_q; [0.fn.to_k_ta;
0.fn.to_v_ta] -> to_kv_a and [0.fn.to_k_tv; 0.fn.to_v_tv] -> to_kv_v (concatenate rows);
0.fn.to_out.0 -> to_out.

With model.lnln.qkv_norms: shared, a block has one norm (self-attention: norm <- the three,
tied; cross-attention: norm <- 0.norm_q, norm_context <- 0.norm_k and 0.norm_v, tied). Tied
rows load only where the reference's norms are equal (an untrained checkpoint); a trained
checkpoint's differ, and loading it raises ValueError naming them and the option.
"""
from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping

import torch
from torch import nn

Kind = Literal["same", "concat", "tie"]


@dataclass(frozen=True)
class Rule:
    """One row of the table. same: one tensor under a new name; concat: ours = the reference's
    tensors concatenated along dim 0 (in that order); tie: one value under every name on both
    sides (the reference's must be equal, ours too)."""

    kind: Kind
    ours: tuple[str, ...]
    reference: tuple[str, ...]


# --- the table, as data ------------------------------------------------------------------------

# Single tensors: reference name -> ours.
TENSORS = {
    "h_p": "proxy_input",
    "h_hyper": "hyper_modality.hyper_tokens",
    "dmml.2.pos_embedding_t": "fusion.transformer.target_pos",
    "dmml.2.pos_embedding_s": "fusion.transformer.source_pos",
}
# Linear layers (weight and bias): reference module -> ours.
LINEARS = {
    "proj_l.0": "embeddings.text.in_proj",
    "proj_a.0": "embeddings.audio.in_proj",
    "proj_v.0": "embeddings.vision.in_proj",
    "completeness_check.1.0": "completeness_check.head.0",
    "completeness_check.1.2": "completeness_check.head.2",
    "effective_discriminator.0": "discriminator.net.0",
    "effective_discriminator.2": "discriminator.net.2",
    "dmml.3": "fusion.head",
}
# Reference Transformer (basic_layers.Transformer) -> our TokenEncoder.
ENCODERS = {
    "proj_l.1": "embeddings.text",
    "proj_a.1": "embeddings.audio",
    "proj_v.1": "embeddings.vision",
    "completeness_check.0": "completeness_check.encoder",
    "proxy_dominate_modality_generator": "proxy_generator",
    "dmml.0": "language_encoder",
    "reconstructor.0": "reconstructor.audio",
    "reconstructor.1": "reconstructor.vision",
    "reconstructor.2": "reconstructor.text",
}
ENCODER_TENSORS = {"pos_embedding": "pos_embedding", "extra_token": "tokens"}
ENCODER_BLOCKS = ("encoder.layers", "transformer.blocks")
# The fusion's one token, held by both of our streams.
FUSION_TOKEN = ("dmml.2.extra_token", ("fusion.transformer.target_token", "fusion.transformer.source_token"))
FUSION_BLOCKS = ("dmml.2.CrossTransformerEncoder.layers", "fusion.transformer.transformer.blocks")
HYPER_LAYERS = ("dmml.1.layers", "hyper_modality.layers")
BERT = ("bertmodel.model.", "bert.")
# A BERT buffer of constants that some transformers versions save and others do not.
CONSTANT_BUFFERS = ("embeddings.position_ids",)

# Inside a block: (kind, our module, reference modules); weight and bias where ours has them.
# Both forms of the pre-norms are listed; a model's keys hold one (model.lnln.qkv_norms).
SEPARATE_NORMS: tuple[tuple[Kind, str, tuple[str, ...]], ...] = tuple(
    ("same", f"norm_{x}", (f"0.norm_{x}",)) for x in "qkv")
SELF_BLOCK: tuple[tuple[Kind, str, tuple[str, ...]], ...] = (
    *SEPARATE_NORMS,
    ("tie", "norm", ("0.norm_q", "0.norm_k", "0.norm_v")),
    ("concat", "attn.to_qkv", ("0.fn.to_q", "0.fn.to_k", "0.fn.to_v")),
    ("same", "attn.to_out", ("0.fn.to_out.0",)),
    ("same", "norm_mlp", ("1.norm",)),
    ("same", "mlp.net.0", ("1.fn.net.0",)),
    ("same", "mlp.net.3", ("1.fn.net.3",)),
)
CROSS_BLOCK = (*SEPARATE_NORMS, ("same", "norm", ("0.norm_q",)), ("tie", "norm_context", ("0.norm_k", "0.norm_v")),
               *SELF_BLOCK[4:])
HYPER_LAYER: tuple[tuple[Kind, str, tuple[str, ...]], ...] = (
    ("same", "norm_d", ("0.norm1",)),
    ("same", "norm_a", ("0.norm2",)),
    ("same", "norm_v", ("0.norm3",)),
    ("same", "norm_hyper", ("0.norm4",)),
    ("same", "to_q", ("0.fn.to_q",)),
    ("concat", "to_kv_a", ("0.fn.to_k_ta", "0.fn.to_v_ta")),
    ("concat", "to_kv_v", ("0.fn.to_k_tv", "0.fn.to_v_tv")),
    ("same", "to_out", ("0.fn.to_out.0",)),
)
# Why a reference tensor may find no home: the option that builds it.
HINTS = {
    "h_p": "model.lnln.proxy_input_tokens: true builds it",
    "norm4": "model.lnln.hyper_update: normalized builds it",
    "CrossTransformerEncoder": "model.lnln.fusion_depth sets the fusion's blocks",
    "encoder": "model.depth sets each Transformer's blocks",
}
NORM_NOTE = ("this LNLN's attention blocks have one LayerNorm (model.lnln.qkv_norms: shared) where the reference "
             "normalises queries, keys and values separately (basic_layers.PreNorm_qkv); a trained reference "
             "checkpoint loads with model.lnln.qkv_norms: separate (the default)")
REFERENCE_MARKERS = ("h_hyper", "dmml.", "proj_l.", "proxy_dominate_modality_generator.")


def is_reference(state_dict: Mapping[str, object]) -> bool:
    """Whether a state dict has the reference code's names (else it is taken as ours)."""
    return any(key.startswith(REFERENCE_MARKERS) for key in state_dict)


def mapping_table(our_keys: Iterable[str]) -> list[Rule]:
    """The table for a model with these state-dict keys (its depths and options decide the rows).
    Every reference name occurs in exactly one rule."""
    keys = set(our_keys)
    rules: list[Rule] = []

    def module(kind: Kind, ours: str, refs: tuple[str, ...]) -> None:
        for param in ("weight", "bias"):
            if f"{ours}.{param}" in keys:
                rules.append(Rule(kind, (f"{ours}.{param}",), tuple(f"{r}.{param}" for r in refs)))

    def blocks(ref_prefix: str, our_prefix: str, layout) -> None:
        for i in _indices(keys, our_prefix):
            for kind, ours, refs in layout:
                module(kind, f"{our_prefix}.{i}.{ours}", tuple(f"{ref_prefix}.{i}.{r}" for r in refs))

    rules += [Rule("same", (ours,), (ref,)) for ref, ours in TENSORS.items() if ours in keys]
    for ref, ours in LINEARS.items():
        module("same", ours, (ref,))
    for ref, ours in ENCODERS.items():
        rules += [Rule("same", (f"{ours}.{o}",), (f"{ref}.{r}",)) for r, o in ENCODER_TENSORS.items()
                  if f"{ours}.{o}" in keys]
        blocks(f"{ref}.{ENCODER_BLOCKS[0]}", f"{ours}.{ENCODER_BLOCKS[1]}", SELF_BLOCK)
    ref_token, our_tokens = FUSION_TOKEN
    if all(name in keys for name in our_tokens):
        rules.append(Rule("tie", our_tokens, (ref_token,)))
    blocks(*FUSION_BLOCKS, CROSS_BLOCK)
    blocks(*HYPER_LAYERS, HYPER_LAYER)
    rules += [Rule("same", (key,), (BERT[0] + key[len(BERT[1]):],)) for key in sorted(keys)
              if key.startswith(BERT[1]) and not key.endswith(CONSTANT_BUFFERS)]
    used = Counter(name for rule in rules for name in rule.reference)
    twice = [name for name, n in used.items() if n > 1]
    if twice:  # a mistake in the table above, never the checkpoint's
        raise RuntimeError(f"reference name(s) mapped twice: {', '.join(twice)}")
    return rules


def from_reference(state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                   on_skip: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """The reference's state dict as ours, for `model` (the LNLN it will load into).

    Every reference tensor is used exactly once. BERT weights (bertmodel.*) are skipped when
    the model reads precomputed text features (model.text_encoder: features); each skip is
    reported through `on_skip` (default: a warning). Raises ValueError naming the tensor on a
    missing or homeless name, a shape that does not fit, or tied tensors that differ."""
    if getattr(getattr(model, "fusion", None), "query", "language") != "language":
        # Same shapes either way round, so nothing below would notice the streams swapped.
        raise ValueError("the reference's fusion takes its queries from the language stream; this LNLN's from "
                         "H_hyper (model.lnln.fusion_query: hyper): its fusion weights would load swapped")
    expected = model.state_dict()
    source = dict(state_dict)
    report = on_skip or (lambda line: warnings.warn(line, stacklevel=3))
    for line in _skip(source, has_bert=any(k.startswith(BERT[1]) for k in expected)):
        report(line)
    out: dict[str, torch.Tensor] = {}
    for rule in mapping_table(expected):
        target = expected[rule.ours[0]].shape
        parts = [_take(source, name, rule, target) for name in rule.reference]
        value = torch.cat(parts) if rule.kind == "concat" else parts[0]
        if rule.kind == "tie":
            _check_equal(rule.reference, parts, "reference tensors",
                         f"they load into one tensor of ours, '{rule.ours[0]}'")
        for name in rule.ours:
            out[name] = value
    if source:
        _no_home("reference tensor", source, "has no home in this LNLN")
    for key in expected:  # constant buffers the reference did not save keep their values
        if key not in out and key.startswith(BERT[1]) and key.endswith(CONSTANT_BUFFERS):
            out[key] = expected[key]
    return out


def to_reference(our_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LNLN's state dict under the reference's names (the inverse of `from_reference`).
    Raises ValueError for a tensor the reference has no name for, or tied tensors that differ
    (e.g. model.lnln.fusion_token: separate, whose two tokens the reference holds as one). It sees
    names only: a state dict of an LNLN with model.lnln.fusion_query: hyper converts with its
    fusion streams swapped."""
    ours = dict(our_state_dict)
    out: dict[str, torch.Tensor] = {}
    for rule in mapping_table(ours):
        values = [ours.pop(name) for name in rule.ours]
        if rule.kind == "tie":
            _check_equal(rule.ours, values, "our tensors",
                         f"the reference holds one tensor, '{rule.reference[0]}'")
        parts = values[0].chunk(len(rule.reference)) if rule.kind == "concat" else [values[0]] * len(rule.reference)
        out.update({name: part.clone() for name, part in zip(rule.reference, parts)})
    leftover = {k: v for k, v in ours.items() if not k.endswith(CONSTANT_BUFFERS)}
    if leftover:
        _no_home("our tensor", leftover, "has no name in the reference LNLN")
    return out


def _indices(keys: set[str], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def _skip(source: dict[str, torch.Tensor], has_bert: bool) -> list[str]:
    """Remove (from `source`) what this model knowingly lacks; one line per skipped group."""
    if has_bert:
        gone = [k for k in source if k.startswith(BERT[0]) and k.endswith(CONSTANT_BUFFERS)]
        why = "a constant buffer the model keeps its own of"
    else:
        gone = [k for k in source if k.startswith("bertmodel.")]
        why = "model.text_encoder is 'features': the text input is precomputed BERT features"
    for key in gone:
        del source[key]
    prefix = "bertmodel.*" if not has_bert else ", ".join(gone)
    return [f"skipped {prefix} ({len(gone)} tensors): {why}"] if gone else []


def _take(source: dict[str, torch.Tensor], name: str, rule: Rule, target: torch.Size) -> torch.Tensor:
    """Pop a reference tensor, checking its shape against what `rule` makes of it."""
    if name not in source:
        raise ValueError(f"reference checkpoint lacks '{name}' (for our '{rule.ours[0]}', shape {tuple(target)})")
    tensor = source.pop(name)
    want = tuple(target)
    if rule.kind == "concat":  # our rows hold the reference's tensors one after another
        want = (target[0] // len(rule.reference), *target[1:])
    if tuple(tensor.shape) != want:
        raise ValueError(f"reference tensor '{name}': expected shape {want} (for our '{rule.ours[0]}'), "
                         f"found {tuple(tensor.shape)}")
    return tensor


def _no_home(what: str, tensors: dict[str, torch.Tensor], problem: str) -> None:
    name = next(iter(tensors))
    hint = next((f" ({h})" for key, h in HINTS.items() if key in name.split(".")), "")
    more = f"; and {len(tensors) - 1} more" if len(tensors) > 1 else ""
    raise ValueError(f"{what} '{name}' {tuple(tensors[name].shape)} {problem}{hint}{more}")


def _check_equal(names: tuple[str, ...], values: list[torch.Tensor], what: str, into: str) -> None:
    for name, value in zip(names[1:], values[1:]):
        if not torch.equal(value, values[0]):
            norms = any(n.rsplit(".", 2)[-2] in ("norm_k", "norm_v") for n in names)
            note = f"; {NORM_NOTE}" if norms else ""
            raise ValueError(f"{what} '{names[0]}' and '{name}' differ, but {into}{note}")
