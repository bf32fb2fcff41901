"""HRLF: Hierarchical Representation Learning Framework (spec/hrlf.md).

Li et al., "Toward Robust Incomplete Multimodal Sentiment Analysis via Hierarchical
Representation Learning", NeurIPS 2024. No public code exists: this follows the paper's
description, and every choice it leaves open is an option of `model.hrlf` (models/config.py).

Two networks of one architecture (`HRLFNetwork`): the teacher reads complete inputs, the
student incomplete ones; both train jointly and inference runs the student alone. Modules
below are in data-flow order: modality encoders -> FRF (`factorize` into Q_m and U_m,
translations) -> fusion (multi-scale h^0..h^K) -> the teacher-student objectives
(`hierarchical_mi`, `hierarchical_adversarial`, KD) -> the model and its registry entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.loader import Batch
from data_pipeline.presets import MODALITIES
from data_pipeline.schema import DataSpec

from .config import ModelConfig
from .entry import ModelEntry
from .dropout import Dropout
from .layers import (BilinearCritic, Discriminator, TokenEncoder, grad_reverse, grl_coefficient, infonce_loss,
                     jsd_mi_loss, mlp)
from .space import ADVERSARIAL_SPACE, OPTIMIZER_SPACE, Dist
from .text_bert import bert_features, check_config, load_bert

Tensor = torch.Tensor


@dataclass
class Representations:
    """One network's pass: what the prediction and the objectives read."""

    x: dict[str, Tensor]  # modality -> (B, d), pooled encoder output
    q: dict[str, Tensor]  # sentiment-relevant Q_m (B, d)
    u: dict[str, Tensor]  # modality-specific U_m (B, d)
    scales: list[Tensor]  # h^0 = concat(Q_L, Q_A, Q_V) (B, 3d), then h^1..h^K (B, fusion_dims[k-1])
    prediction: Tensor  # (B,)


def task_error(prediction: Tensor, label: Tensor, kind: str) -> Tensor:
    """In fp32 whatever the model's dtype (every loss term here is)."""
    prediction, label = prediction.float(), label.float()
    return F.mse_loss(prediction, label) if kind == "mse" else F.l1_loss(prediction, label)


def soft_orthogonality(q: Tensor, u: Tensor, kind: str = "cosine") -> Tensor:
    """Disentanglement of Q_m and U_m (B, d). "cosine" (default): ||Q~^T U~||_F^2 / d^2 with every
    feature column L2-normalized over the batch, the mean squared cosine between a feature of
    Q and a feature of U, in [0, 1]. "frobenius": ||Q^T U||_F^2 over the batch (the spec's
    form); it grows with B and with the scale of Q and U (models/config.py says what it does)."""
    with torch.autocast(q.device.type, enabled=False):  # a loss: fp32, also inside autocast
        q, u = q.float(), u.float()
        if kind == "cosine":
            return (F.normalize(q, dim=0).T @ F.normalize(u, dim=0)).pow(2).mean()  # (d, d) -> scalar
        return (q.T @ u).pow(2).sum()


# --- 2. Fine-grained Representation Factorization ---------------------------------------------

class FRF(nn.Module):
    """x_m -> sentiment-relevant Q_m = E_s(x_m) and modality-specific U_m = E_p^m(x_m), plus
    decoders D_m([Q ; U_m]) -> x_m and a small label head on Q_m (all shared by L, A, V but
    E_p^m and D_m; E_s per modality when `shared_sentiment_encoder` is off)."""

    def __init__(self, dim: int, shared_sentiment_encoder: bool = True, detach_target: bool = True,
                 disentanglement: str = "cosine"):
        super().__init__()
        shared = mlp([dim, dim, dim])
        # The same module under three names when shared: parameters() counts it once.
        self.sentiment = nn.ModuleDict({m: shared if shared_sentiment_encoder else mlp([dim, dim, dim])
                                        for m in MODALITIES})
        self.specific = nn.ModuleDict({m: mlp([dim, dim, dim]) for m in MODALITIES})
        self.decoders = nn.ModuleDict({m: mlp([2 * dim, dim, dim]) for m in MODALITIES})
        self.semantic_head = mlp([dim, dim // 2, 1])
        self.detach_target = detach_target
        self.disentanglement = disentanglement

    def factorize(self, x: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return ({m: self.sentiment[m](x[m]) for m in x},  # Q_m (B, d)
                {m: self.specific[m](x[m]) for m in x})  # U_m (B, d)

    def objectives(self, rep: Representations, label: Tensor, task_loss: str) -> dict[str, Tensor]:
        """The four FRF sub-terms (unweighted): intra / inter translation, semantic, disentangle."""
        intra, inter, recode = [], [], []
        sources = torch.stack([rep.q[n] for n in MODALITIES])  # (3, B, d): Q_L, Q_A, Q_V
        for i, m in enumerate(MODALITIES):
            target = rep.x[m].detach() if self.detach_target else rep.x[m]
            u = rep.u[m].expand(len(MODALITIES), -1, -1)  # (3, B, d)
            recon = self.decoders[m](torch.cat([sources, u], dim=-1))  # (3, B, d): D_m([Q_n ; U_m]) for every n
            error = (recon.float() - target.float()).pow(2).mean(dim=(1, 2))  # (3,)
            intra.append(error[i])
            inter.extend(error[j] for j in range(len(MODALITIES)) if j != i)
            # Sentiment semantic reconstruction: re-encoding D_m([Q_n ; U_m]) with E_s gives Q_n
            # back. The target is detached so Q cannot meet its re-encoding by collapsing.
            recode.append(F.mse_loss(self.sentiment[m](recon).float(), sources.detach().float()))
        # ... and Q_m alone carries the label (one head shared by the modalities).
        label_fit = torch.stack([task_error(self.semantic_head(rep.q[m]).squeeze(-1), label, task_loss)
                                 for m in MODALITIES]).mean()
        return {"intra": torch.stack(intra).mean(), "inter": torch.stack(inter).mean(),
                "semantic": torch.stack(recode).mean() + label_fit,
                "disentangle": torch.stack([soft_orthogonality(rep.q[m], rep.u[m], self.disentanglement)
                                            for m in MODALITIES]).mean()}


# --- 3. Fusion: the multi-scale representations ------------------------------------------------

class Fusion(nn.Module):
    """concat(Q_L, Q_A, Q_V) (B, 3d) -> K x [Linear, ReLU] (default 256, 128, 64) -> Linear -> (B,)."""

    def __init__(self, dim_in: int, widths: Sequence[int], dropout: float = 0.0):
        super().__init__()
        dims = [dim_in, *widths]
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU(), Dropout(dropout))
                                    for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], 1)

    def forward(self, h0: Tensor) -> tuple[list[Tensor], Tensor]:
        scales = [h0]
        for layer in self.layers:
            scales.append(layer(scales[-1]))  # h^k (B, widths[k-1])
        return scales, self.head(scales[-1]).squeeze(-1)


class HRLFNetwork(nn.Module):
    """One network (teacher or student): [BERT] -> encoders -> FRF -> fusion."""

    def __init__(self, cfg: ModelConfig, spec: DataSpec):
        super().__init__()
        d = cfg.hidden_dim
        block = dict(depth=cfg.depth, heads=cfg.num_heads, dim_head=cfg.dim_head, mlp_dim=cfg.mlp_dim,
                     dropout=cfg.dropout)
        # text_encoder bert: text arrives as token ids and each network fine-tunes its own BERT
        # (two networks of one architecture), the student's reading [UNK] where tokens dropped.
        self.bert = load_bert(cfg, spec) if cfg.text_encoder == "bert" else None
        dims = {m: spec.dim(m) for m in MODALITIES}
        if self.bert is not None:
            dims["text"] = self.bert.config.hidden_size
        # 1. Linear(d_m -> d) + temporal Transformer, pooled by one learnable token: TokenEncoder
        # then skips trailing padding per length group and computes only the token's query in
        # the last block, which mean-pooling over all positions could not.
        self.encoders = nn.ModuleDict({m: TokenEncoder(spec.seq_len(m), d, tokens=1, d_in=dims[m], **block)
                                       for m in MODALITIES})
        # The pre-norm stack leaves its output unnormalized; a final LayerNorm (GPT-2's ln_f)
        # gives x_m a fixed scale, the scale FRF's translation errors are measured in.
        self.norms = nn.ModuleDict({m: nn.LayerNorm(d) for m in MODALITIES})
        self.frf = FRF(d, cfg.hrlf.shared_sentiment_encoder, cfg.hrlf.detach_translation_target,
                       cfg.hrlf.disentanglement)
        self.fusion = Fusion(len(MODALITIES) * d, cfg.hrlf.fusion_dims, cfg.dropout)
        # He init for the MLP stacks: PyTorch's default Linear init divides the variance by 3
        # per layer, and the 6 layers between x_m and the prediction would hand the head a
        # ~30x smaller signal than x_m carries, which a short training run cannot undo.
        for module in (self.frf, self.fusion):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)

    def forward(self, inputs: dict[str, tuple[Tensor, Tensor]],
                lengths: dict[str, np.ndarray | None] | None = None) -> Representations:
        """inputs: modality -> (features (B, T, d_m), valid mask (B, T)), text as (token ids
        (B, 3, L), attention mask) with a BERT; lengths: modality -> host valid lengths (B,), when
        known (the encoders then never read the device)."""
        lengths = lengths or {}
        if self.bert is not None:
            ids, mask = inputs["text"]
            inputs = {**inputs, "text": (bert_features(self.bert, ids), mask)}  # (B, L, hidden)
        x = {m: self.norms[m](self.encoders[m](feats, valid, lengths.get(m))[:, 0])
             for m, (feats, valid) in inputs.items()}  # (B, d)
        q, u = self.frf.factorize(x)
        scales, prediction = self.fusion(torch.cat([q[m] for m in MODALITIES], dim=-1))
        return Representations(x, q, u, scales, prediction)


# --- 4-5. Teacher-student objectives ----------------------------------------------------------

MI_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"infonce": infonce_loss, "jsd": jsd_mi_loss}


def hierarchical_mi(critics: Sequence[nn.Module], student: Sequence[Tensor], teacher: Sequence[Tensor],
                    estimator: str, scale_weights: Tensor) -> Tensor:
    """HMI as a loss: sum_k w_k * (-MI bound between h_S^k and h_T^k), in-batch negatives,
    teacher side detached (the weights: 1 each by default, or normalised to sum to 1)."""
    bound = MI_ESTIMATORS[estimator]
    terms = torch.stack([bound(critic(s, t.detach())) for critic, s, t in zip(critics, student, teacher)])
    return (terms * scale_weights.float()).sum()


def hierarchical_adversarial(discriminators: Sequence[nn.Module], student: Sequence[Tensor],
                             teacher: Sequence[Tensor], lam: float) -> Tensor:
    """HAL: mean over scales of the discriminators' BCE, teacher = real (1, detached), student =
    fake (0). The student's representation enters through the GRL, so one minimization trains
    each D_k to separate them and the student (gradient times -lam) to fool it."""
    losses = []
    for disc, s, t in zip(discriminators, student, teacher):
        logits = disc(torch.cat([t.detach(), grad_reverse(s, lam)])).squeeze(-1).float()  # (2B,)
        target = torch.cat([torch.ones_like(logits[: len(t)]), torch.zeros_like(logits[len(t):])])
        losses.append(F.binary_cross_entropy_with_logits(logits, target))
    return torch.stack(losses).mean()


# --- the model ---------------------------------------------------------------------------------

class HRLF(nn.Module):
    # Spec defaults ("Loss"); the trainer weights the terms.
    LOSS_TERMS = {"task": 1.0, "task_teacher": 1.0, "frf": 1.0, "hmi": 0.1, "hal": 0.1, "kd": 0.1}
    # Returned by `losses` for the epoch log only (detached, not in the weighted sum).
    LOGGED_TERMS = ("frf_intra", "frf_inter", "frf_semantic", "frf_disentangle")

    def __init__(self, cfg: ModelConfig, spec: DataSpec):
        super().__init__()
        h = cfg.hrlf
        self.task_loss, self.adversarial = cfg.task_loss, cfg.adversarial
        self.mi_estimator, self.teacher_pretrain_fraction = h.mi_estimator, h.teacher_pretrain_fraction
        self.frf_weights = h.frf_weights.model_dump()
        self.teacher = HRLFNetwork(cfg, spec)  # complete inputs, training only
        self.student = HRLFNetwork(cfg, spec)  # incomplete inputs; the inference path
        dims = [len(MODALITIES) * cfg.hidden_dim, *h.fusion_dims]  # h^0..h^K
        self.critics = nn.ModuleList(BilinearCritic(k) for k in dims)
        self.discriminators = nn.ModuleList(Discriminator(k, 64, 1) for k in dims)
        weights = torch.tensor(h.hmi_scale_weights or [1.0] * len(dims))
        if h.hmi_reduction == "mean":
            weights = weights / weights.sum()
        self.register_buffer("hmi_scale_weights", weights, persistent=False)

    def forward(self, batch: Batch, progress: float = 0.0) -> dict:
        """prediction (B,) and the student's Representations; in training mode also the
        teacher's, from complete inputs. Evaluation never runs the teacher."""
        lengths = {m: batch.modality(m).lengths for m in MODALITIES}
        student = self.student(self._inputs(batch, complete=False), lengths)
        out = {"prediction": student.prediction, "student": student}
        if self.training:
            out["teacher"] = self.teacher(self._inputs(batch, complete=True), lengths)
        return out

    def _inputs(self, batch: Batch, complete: bool) -> dict[str, tuple[Tensor, Tensor]]:
        """modality -> (complete or observed features, valid mask). With a BERT, text is its
        token ids (B, 3, L), dropped ones [UNK] in the observed ids (spec/missing.md), masked by
        BERT's attention mask (the prefix mask of the text lengths, as `valid`)."""
        inputs = {m: (batch.modality(m).complete if complete else batch.modality(m).observed,
                      batch.modality(m).valid) for m in MODALITIES}
        if self.student.bert is not None:
            ids = batch.text_bert_complete if complete else batch.text_bert_observed
            inputs["text"] = (ids, ids[:, 1].bool())
        return inputs

    def losses(self, outputs: dict, batch: Batch, progress: float = 0.0) -> dict[str, Tensor]:
        """The terms of LOSS_TERMS (unweighted scalars; the trainer weights them) plus the
        detached LOGGED_TERMS. Without a teacher pass (eval mode)
        the teacher-student terms are 0. During teacher pre-training the student's terms are
        returned detached: logged, but they train nothing."""
        s, t = outputs["student"], outputs.get("teacher")
        label = batch.label.float()  # every term in fp32; labels are never rounded to the model's dtype
        gate = (lambda v: v.detach()) if progress < self.teacher_pretrain_fraction else (lambda v: v)
        frf_student = self.student.frf.objectives(s, label, self.task_loss)
        zero = s.prediction.new_zeros((), dtype=torch.float32)
        task_teacher = hmi = hal = kd = zero
        frf_teacher = dict.fromkeys(frf_student, zero)
        if t is not None:
            frf_teacher = self.teacher.frf.objectives(t, label, self.task_loss)
            task_teacher = task_error(t.prediction, label, self.task_loss)
            hmi = hierarchical_mi(self.critics, s.scales, t.scales, self.mi_estimator, self.hmi_scale_weights)
            adv = self.adversarial
            lam = grl_coefficient(progress, adv.schedule, adv.lambda_max, adv.gamma)
            hal = hierarchical_adversarial(self.discriminators, s.scales, t.scales, lam)
            kd = F.mse_loss(s.prediction.float(), t.prediction.detach().float())
        sub = {k: frf_teacher[k] + gate(frf_student[k]) for k in frf_student}  # FRF of both networks
        frf = sum(self.frf_weights[k] * v for k, v in sub.items())
        terms = {"task": gate(task_error(s.prediction, label, self.task_loss)), "task_teacher": task_teacher,
                 "frf": frf, "hmi": gate(hmi), "hal": gate(hal), "kd": gate(kd)}
        terms.update({f"frf_{k}": v.detach() for k, v in sub.items()})
        return terms

    def discriminator_parameters(self):
        return self.discriminators.parameters()

    def discriminator_loss(self, outputs: dict) -> Tensor:
        """HAL on detached representations: the trainer's extra discriminator steps
        (model.adversarial.disc_steps > 1) update the discriminators alone."""
        student = [h.detach() for h in outputs["student"].scales]
        return hierarchical_adversarial(self.discriminators, student, outputs["teacher"].scales, 1.0)


ENTRY = ModelEntry(
    name="hrlf",
    builder=HRLF,
    loss_terms=dict(HRLF.LOSS_TERMS),
    search_space={
        "model.loss_weights.frf": Dist("loguniform", 0.01, 3.0),
        "model.loss_weights.hmi": Dist("loguniform", 1e-3, 1.0),
        "model.loss_weights.hal": Dist("loguniform", 1e-3, 1.0),
        "model.loss_weights.kd": Dist("loguniform", 1e-3, 3.0),
        "model.hrlf.frf_weights.intra": Dist("uniform", 0.0, 2.0),
        "model.hrlf.frf_weights.inter": Dist("uniform", 0.0, 2.0),
        "model.hrlf.frf_weights.semantic": Dist("uniform", 0.0, 2.0),
        "model.hrlf.frf_weights.disentangle": Dist("uniform", 0.0, 2.0),
        "model.hrlf.mi_estimator": Dist("choice", choices=("infonce", "jsd")),
        "model.hrlf.teacher_pretrain_fraction": Dist("choice", choices=(0.0, 0.1, 0.2, 0.3)),
        # Share of training samples with a whole-modality drop; read by missing.train_mode
        # mixture, HRLF's training distribution (its default: train_missing below).
        "missing.inter_fraction": Dist("uniform", 0.0, 0.6),
        **ADVERSARIAL_SPACE,
        **OPTIMIZER_SPACE,
    },
    adversarial_terms=("hal",),
    check_config=check_config,
    train_missing="mixture",  # spec/hrlf.md: LNLN's draw plus 30% of samples with an inter pattern
)
