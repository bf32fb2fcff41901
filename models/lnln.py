"""LNLN: Language-dominated Noise-resistant Learning Network (spec/lnln.md).

Zhang et al., "Towards Robust Multimodal Sentiment Analysis with Incomplete Data",
NeurIPS 2024. Modules below are in data-flow order: embedding -> Dominant Modality
Correction (completeness check, proxy generator, effectiveness discriminator) -> Dominant
Modality based Multimodal Learning (language encoder, hyper-modality, fusion) ->
reconstructor (training only).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.loader import Batch, ModalityInput, host_to_device
from data_pipeline.presets import MODALITIES
from data_pipeline.schema import DataSpec

from .config import ModelConfig
from .entry import ModelEntry, ReferenceCheckpoints, dataset_family
from .layers import (CrossTransformer, Discriminator, QKVNorms, TokenEncoder, grad_reverse, grl_coefficient, mlp,
                     split_heads)
from .lnln_reference import from_reference, is_reference
from .space import ADVERSARIAL_SPACE, OPTIMIZER_SPACE, Dist
from .text_bert import bert_features, check_config, load_bert


class CompletenessCheck(nn.Module):
    """Transformer over [1 token ; H_L] -> MLP(d -> d/2 -> 1) -> sigmoid = w (B, 1)."""

    def __init__(self, tokens: int, dim: int, **block):
        super().__init__()
        self.encoder = TokenEncoder(tokens, dim, tokens=1, **block)
        self.head = mlp([dim, dim // 2, 1])

    def forward(self, h_l: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.encoder(h_l)[:, 0]))  # (B, 1)


class HyperModalityLayer(nn.Module):
    """Delta for H_hyper: Attn(q=H_D^j, k=v=H_A) + Attn(q=H_D^j, k=v=H_V), pre-norm on each input.

    The T queries come from the language layer; the output is added to the T hyper tokens.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, normalized_base: bool = True):
        super().__init__()
        self.heads, self.dim_head, inner = heads, dim_head, heads * dim_head
        # The reference normalises all four inputs; H_hyper's norm is the base of its update.
        self.norm_hyper = nn.LayerNorm(dim) if normalized_base else nn.Identity()
        self.norm_d, self.norm_a, self.norm_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv_a = nn.Linear(dim, 2 * inner, bias=False)
        self.to_kv_v = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, h_d: torch.Tensor, h_a: torch.Tensor, h_v: torch.Tensor) -> torch.Tensor:
        h, dh = self.heads, self.dim_head
        q = self.to_q(self.norm_d(h_d)).unflatten(-1, (h, dh)).transpose(1, 2)  # (B, h, T, dh)
        out = 0
        for norm, to_kv, x in ((self.norm_a, self.to_kv_a, h_a), (self.norm_v, self.to_kv_v, h_v)):
            k, v = split_heads(to_kv(norm(x)), 2, h)
            out = out + F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, T, d)


class HyperModality(nn.Module):
    """Adaptive hyper-modality learning: one layer per language-encoder output H_D^j, each
    updating H_hyper <- LN_j(H_hyper) + delta_j (or H_hyper + delta_j with `normalized_base` off)."""

    def __init__(self, layers: int, tokens: int, dim: int, heads: int, dim_head: int,
                 normalized_base: bool = True, init: Literal["ones", "normal"] = "ones"):
        super().__init__()
        start = torch.ones(1, tokens, dim) if init == "ones" else torch.randn(1, tokens, dim) * 0.02
        self.hyper_tokens = nn.Parameter(start)
        self.layers = nn.ModuleList(HyperModalityLayer(dim, heads, dim_head, normalized_base) for _ in range(layers))

    def forward(self, h_d_list, h_a, h_v) -> tuple[torch.Tensor, torch.Tensor]:
        """-> H_hyper (B, T, d) and the mean |delta| over layers (the sparsity term)."""
        h_hyper = self.hyper_tokens.expand(h_a.shape[0], -1, -1)
        shift = h_a.new_zeros((), dtype=torch.float32)  # a loss term: fp32 under fp16/bf16 too
        for layer, h_d in zip(self.layers, h_d_list):
            delta = layer(h_d, h_a, h_v)
            h_hyper = layer.norm_hyper(h_hyper) + delta
            shift = shift + delta.abs().mean(dtype=torch.float32)
        return h_hyper, shift / len(self.layers)


class Fusion(nn.Module):
    """Cross-modal Transformer, then mean over the non-prepended outputs -> Linear(d -> 1)."""

    def __init__(self, tokens: int, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float, query: Literal["hyper", "language"], shared_token: bool = True,
                 qkv_norms: QKVNorms = "separate"):
        super().__init__()
        self.query = query
        self.transformer = CrossTransformer(tokens, tokens, dim, depth, heads, dim_head, mlp_dim, dropout,
                                            shared_token=shared_token, qkv_norms=qkv_norms)
        self.head = nn.Linear(dim, 1)

    def forward(self, h_hyper: torch.Tensor, h_language: torch.Tensor) -> torch.Tensor:
        if self.query == "language":  # the reference: queries from H_D^3, keys/values from H_hyper
            out = self.transformer(h_language, h_hyper)
        else:  # queries from H_hyper (an earlier reading of the paper's figure)
            out = self.transformer(h_hyper, h_language)
        return self.head(out[:, 1:].mean(dim=1)).squeeze(-1)  # (B,)


class LNLN(nn.Module):
    # Reference defaults (spec/lnln.md, "Losses"); the trainer weights the terms.
    LOSS_TERMS = {"task": 1.0, "completeness": 0.9, "adversarial": 0.8, "reconstruction": 0.1, "sparsity": 0.0}

    def __init__(self, cfg: ModelConfig, spec: DataSpec):
        super().__init__()
        opts, adv = cfg.lnln, cfg.adversarial
        d, heads, tokens = cfg.hidden_dim, cfg.num_heads, opts.tokens
        fusion_depth = opts.fusion_depth or (4 if dataset_family(spec.name) in ("mosei", "sims") else 2)
        self.task_loss = cfg.task_loss
        # The GRL strength follows model.adversarial; its warm-up (the term's weight at 0 for
        # the first epochs) is the trainer's.
        self.grl_schedule = dict(kind=adv.schedule, lambda_max=adv.lambda_max, gamma=adv.gamma)
        self.grl_placement = opts.grl_placement
        self.detach_reconstruction_target = opts.detach_reconstruction_target
        self.fixed_completeness = opts.fixed_completeness
        self._encodings: dict | None = None  # open inside reuse_encodings()
        self.attend_padding = opts.attend_padding
        block = dict(depth=cfg.depth, heads=heads, dim_head=cfg.dim_head, mlp_dim=cfg.mlp_dim, dropout=cfg.dropout,
                     qkv_norms=opts.qkv_norms)

        # 1. Embedding: per modality, Linear + Transformer over [T tokens ; sequence] -> H_m (B, T, d).
        self.bert = load_bert(cfg, spec) if cfg.text_encoder == "bert" else None
        text_dim = self.bert.config.hidden_size if self.bert is not None else spec.text_dim
        dims = {"text": text_dim, "audio": spec.audio_dim, "vision": spec.vision_dim}
        self.embeddings = nn.ModuleDict({
            m: TokenEncoder(spec.seq_len(m), d, tokens=tokens, d_in=dims[m], length_buckets=opts.length_buckets,
                            **block)
            for m in MODALITIES
        })
        # 2. Dominant Modality Correction.
        self.completeness_check = CompletenessCheck(tokens, d, **block)
        # Its input: [H_p0 ; H_A ; H_V] with H_p0 learnable and started at ones (the reference),
        # or [H_A ; H_V]; it prepends its own T tokens to either.
        self.proxy_input = nn.Parameter(torch.ones(1, tokens, d)) if opts.proxy_input_tokens else None
        proxy_len = (3 if opts.proxy_input_tokens else 2) * tokens
        self.proxy_generator = TokenEncoder(proxy_len, d, tokens=tokens, **block)
        self.discriminator = Discriminator(d, 64, 2)
        # 3. Dominant Modality based Multimodal Learning.
        self.language_encoder = TokenEncoder(tokens, d, tokens=0, **block)  # keeps depth + 1 outputs
        self.hyper_modality = HyperModality(cfg.depth + 1, tokens, d, heads, opts.hyper_dim_head or d // heads,
                                            normalized_base=opts.hyper_update == "normalized", init=opts.hyper_init)
        self.fusion = Fusion(tokens, d, fusion_depth, heads, cfg.dim_head, cfg.mlp_dim, cfg.dropout, opts.fusion_query,
                             shared_token=opts.fusion_token == "shared", qkv_norms=opts.qkv_norms)
        # 4. Reconstructor (training only): incomplete H_m -> complete H_m.
        self.reconstructor = nn.ModuleDict({m: TokenEncoder(tokens, d, tokens=0, **block) for m in MODALITIES})

    def forward(self, batch: Batch, progress: float = 0.0) -> dict:
        """Returns prediction (B,), completeness w (B, 1), features H_m, proxy H_P, corrected H_D,
        hyper_shift (scalar), grl_lambda; in training mode also
        complete_features, reconstructed (dicts of (B, T, d)) and discriminator_logits (2B, T, 2)."""
        training = self.training
        h, h_complete = self._embed(batch, with_complete=training)
        h_l, h_a, h_v = h["text"], h["audio"], h["vision"]  # (B, T, d)

        w = self.completeness_check(h_l)  # (B, 1)
        if self.fixed_completeness is not None:
            w = torch.full_like(w, self.fixed_completeness)
        proxy_in = [h_a, h_v] if self.proxy_input is None else [self.proxy_input.expand(h_a.shape[0], -1, -1), h_a, h_v]
        h_p = self.proxy_generator(torch.cat(proxy_in, dim=1))  # (B, T, d)
        w3 = w.unsqueeze(-1)  # (B, 1, 1)
        lam = grl_coefficient(progress, **self.grl_schedule)
        # H_D = w * H_L + (1 - w) * H_P; H_P enters the adversarial path through the GRL.
        h_d_adv = None
        if training or self.grl_placement == "shared":
            h_d_adv = w3 * h_l + (1 - w3) * grad_reverse(h_p, lam)
        h_d = h_d_adv if self.grl_placement == "shared" else w3 * h_l + (1 - w3) * h_p

        h_d_list = self.language_encoder(h_d, return_hidden=True)  # [H_D^1, H_D^2, H_D^3]
        h_hyper, hyper_shift = self.hyper_modality(h_d_list, h_a, h_v)
        prediction = self.fusion(h_hyper, h_d_list[-1])  # (B,)

        out = {"prediction": prediction, "completeness": w, "features": h, "proxy": h_p,
               "corrected": h_d, "hyper_shift": hyper_shift, "grl_lambda": lam}
        if training:
            # Effectiveness discriminator: tokens of H_D (label 1) vs complete-input H_L (label 0).
            out["discriminator_inputs"] = torch.cat([h_d_adv, h_complete["text"]])  # (2B, T, d)
            out["discriminator_logits"] = self.discriminator(out["discriminator_inputs"])
            out["reconstructed"] = {m: self.reconstructor[m](h[m]) for m in MODALITIES}
            out["complete_features"] = h_complete
        return out

    def _embed(self, batch: Batch, with_complete: bool):
        """H_m of the incomplete input and, when asked, of the complete input (same modules).

        The complete pass only runs on rows that missing changed: elsewhere the complete
        features are the same tensor as the incomplete ones, which gives the same values and
        the same gradients as encoding them twice.
        """
        h, h_complete = {}, {}
        for m in MODALITIES:
            observed, complete, mask = self._inputs(batch, m)
            x = batch.modality(m)
            if not with_complete:
                h[m] = self._encode_once(m, x, observed, mask)
                continue
            b, lengths = observed.shape[0], x.lengths
            if x.keep_host is not None and lengths is not None:
                # Rows where keep differs from valid (a superset of the rows whose values
                # changed; encoding an unchanged row twice is exact too), found on the host.
                rows = np.flatnonzero(x.keep_host.sum(axis=1) != lengths)
                changed = host_to_device(rows, observed.device)  # (k,)
                lengths = np.concatenate([lengths, lengths[rows]])
            else:  # a batch without host masks: find them on the device (a host sync)
                changed = (observed != complete).flatten(1).any(dim=1).nonzero().squeeze(1)  # (k,)
                lengths = None
            both = self._encode(m, torch.cat([observed, complete.index_select(0, changed)]),
                                torch.cat([mask, mask.index_select(0, changed)]), lengths)  # (B + k, T, d)
            h[m] = both[:b]
            h_complete[m] = both[:b].index_copy(0, changed, both[b:])
        return h, h_complete

    @contextmanager
    def reuse_encodings(self):
        """While open, forward passes over the same rows (the evaluator's patterns) encode each
        distinct modality input once: an input is its rows' complete features under a keep
        mask, so equal masks mean equal H_m. Inter-modality patterns leave every modality
        either complete (as intra:0.0) or dropped, so the default 16-pattern grid runs 33
        modality encodings instead of 48. Evaluation only; every batch must hold the same rows."""
        self._encodings = {}
        try:
            yield
        finally:
            self._encodings = None

    def _encode_once(self, m: str, x: ModalityInput, observed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._encodings is None or self.training:
            return self._encode(m, observed, mask, x.lengths)
        keep = x.keep_host if x.keep_host is not None else x.keep.cpu().numpy()  # host copy: no sync
        key = (m, keep.tobytes())
        encoded = self._encodings.get(key)
        if encoded is None:  # two threads may both miss: same result, computed twice
            encoded = self._encodings[key] = self._encode(m, observed, mask, x.lengths)
        return encoded

    def _inputs(self, batch: Batch, m: str):
        """(observed, complete, key mask) in the form the modality's embedding consumes."""
        if m == "text" and self.bert is not None:
            ids = batch.text_bert_observed  # (B, 3, L): ids / attention mask / token types
            return ids, batch.text_bert_complete, ids[:, 1].bool()
        x = batch.modality(m)
        # Dropped positions are zeros but stay attended (missing.md); only padding is masked.
        return x.observed, x.complete, x.valid

    def _encode(self, m: str, x: torch.Tensor, mask: torch.Tensor, lengths: np.ndarray | None = None) -> torch.Tensor:
        """lengths: host valid lengths of the rows (the BERT attention mask is their prefix mask
        too: MMSA text lengths are its sums), so the encoder plans its groups on the host."""
        if m == "text" and self.bert is not None:
            x = bert_features(self.bert, x)  # (B, 3, L) ids -> (B, L, hidden)
        if self.attend_padding:  # the reference: every position attended, padding included
            return self.embeddings[m](x)
        return self.embeddings[m](x, mask, lengths)

    def discriminator_parameters(self):
        return self.discriminator.parameters()

    def discriminator_loss(self, outputs: dict) -> torch.Tensor:
        """The discriminator's own loss on detached features: extra discriminator steps
        (model.adversarial.disc_steps > 1) update the discriminator alone."""
        return self._discriminator_ce(self.discriminator(outputs["discriminator_inputs"].detach()))

    @staticmethod
    def _discriminator_ce(logits: torch.Tensor) -> torch.Tensor:
        # First half of the rows are H_D tokens (label 1), second half complete H_L (label 0).
        half = logits.shape[0] // 2 * logits.shape[1]
        target = (torch.arange(2 * half, device=logits.device) < half).long()  # made on the logits' device
        return F.cross_entropy(logits.flatten(0, 1).float(), target)

    def losses(self, outputs: dict, batch: Batch, progress: float = 0.0) -> dict[str, torch.Tensor]:
        """The unweighted terms named in LOSS_TERMS (scalars); the trainer weights them. Outside
        training mode the adversarial and reconstruction terms are 0."""
        # Every term in fp32 (fp16/bf16 models give half outputs); labels are never rounded.
        pred, label = outputs["prediction"].float(), batch.label.float()
        task = F.mse_loss(pred, label) if self.task_loss == "mse" else F.l1_loss(pred, label)
        w = outputs["completeness"].squeeze(-1).float()  # (B,)
        completeness = F.mse_loss(w, 1.0 - batch.text_missing_fraction.float())
        adversarial = reconstruction = pred.new_zeros(())
        logits = outputs.get("discriminator_logits")
        if logits is not None:
            adversarial = self._discriminator_ce(logits)
            # The reference regresses onto complete features that keep their gradient (the
            # embeddings also move towards what the reconstructor predicts); the option detaches.
            terms = []
            for m in MODALITIES:
                target_m = outputs["complete_features"][m]
                if self.detach_reconstruction_target:
                    target_m = target_m.detach()
                terms.append(F.mse_loss(outputs["reconstructed"][m].float(), target_m.float()))
            reconstruction = torch.stack(terms).mean()
        # Sparsity: L1 of the hyper-modality updates. (L1 of softmax attention weights is
        # constant, each row sums to 1, so it could not steer anything.)
        return {"task": task, "completeness": completeness, "adversarial": adversarial,
                "reconstruction": reconstruction, "sparsity": outputs["hyper_shift"].float()}


ENTRY = ModelEntry(
    name="lnln",
    builder=LNLN,
    loss_terms=dict(LNLN.LOSS_TERMS),
    search_space={
        "model.loss_weights.completeness": Dist("uniform", 0.0, 1.5),
        "model.loss_weights.adversarial": Dist("uniform", 0.0, 1.5),
        "model.loss_weights.reconstruction": Dist("loguniform", 1e-3, 1.0),
        "model.loss_weights.sparsity": Dist("uniform", 0.0, 0.1),
        **ADVERSARIAL_SPACE,
        **OPTIMIZER_SPACE,
    },
    adversarial_terms=("adversarial",),
    dataset_loss_terms={"sims": {"adversarial": 0.6}},  # the reference's SIMS setting (spec/lnln.md)
    rows_independent=True,  # task/completeness/reconstruction MSE, discriminator CE, sparsity: row means
    check_config=check_config,
    reference_checkpoints=ReferenceCheckpoints("the authors' LNLN (github.com/Haoyu-ha/LNLN)", is_reference,
                                               from_reference),
)
