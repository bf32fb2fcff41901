"""Shared building blocks for LNLN and HRLF: pre-norm Transformers, learnable-token
encoders, gradient reversal with its schedule, and small MLP heads.

All attention goes through `F.scaled_dot_product_attention` (fused kernels on CPU and GPU),
except attention dropout under a `dropout_generator` (`attend`). Masks are boolean (B, T_k)
with True = attend, as SDPA expects.
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_pipeline.loader import host_to_device

from .dropout import Dropout, attend


# --- Transformer ---------------------------------------------------------------------------

class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


QKVNorms = Literal["shared", "separate"]


class Attention(nn.Module):
    """Multi-head attention with inner width heads * dim_head (may exceed dim, as in LNLN).

    q/k/v projections share one weight (rows q; k; v), so self-attention over one normalised
    input is a single matmul; cross-attention, query-truncated self-attention and inputs
    normalised apart (qkv_norms "separate") use row slices of the same weight (views, no copy).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dim_head, self.inner = heads, dim_head, heads * dim_head
        self.dropout = dropout
        self.to_qkv = nn.Linear(dim, 3 * self.inner, bias=False)
        self.to_out = nn.Linear(self.inner, dim)
        # Below this many queries, query-truncated self-attention folds the projections
        # (`_absorbed`); it pays while T < d * dim_head / (d - dim_head).
        self._absorb_below = dim * dim_head // (dim - dim_head) if dim > dim_head else 1 << 30

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, query_len: int | None = None,
                values: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, d) normalised, the queries' source; context (B, M, d) the keys' and values'
        source, None for self-attention over x; values (B, M, d): the values' own source where
        it is normalised apart from the keys' (then context is the keys'). mask broadcastable
        to (B, heads, N, M), bool; query_len keeps only the first queries."""
        h = self.heads
        keys = x if context is None else context
        values = keys if values is None else values
        # With dropout, separate norms take the few-query path on CPU only: there it draws the
        # plain path's mask (its (B, 1, heads * T, N) weights are laid out as (B, heads, T, N));
        # CUDA kernels seed their masks by position within a head.
        same_draws = not (self.training and self.dropout > 0) or values is keys or x.device.type == "cpu"
        if query_len is not None and query_len < self._absorb_below and same_draws:
            return self._absorbed(x[:, :query_len], keys, values, mask)
        queries = x if query_len is None else x[:, :query_len]
        if queries is keys and keys is values:  # one source: one matmul
            q, k, v = split_heads(F.linear(x, self.to_qkv.weight), 3, h)
        elif keys is values:
            w_q, w_kv = self.to_qkv.weight.split([self.inner, 2 * self.inner])
            (q,) = split_heads(F.linear(queries, w_q), 1, h)
            k, v = split_heads(F.linear(keys, w_kv), 2, h)
        else:
            w_q, w_k, w_v = self.to_qkv.weight.split(self.inner)
            q, k, v = (split_heads(F.linear(t, w), 1, h)[0] for t, w in ((queries, w_q), (keys, w_k), (values, w_v)))
        out = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, d)

    def _absorbed(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  mask: torch.Tensor | None) -> torch.Tensor:
        """Same attention for a few queries without projecting the N keys and values.

        q.k = (W_k^T q).x and the value mix is (attn . x) W_v^T, so folding W_k into the
        queries and applying W_v after the weighting lets every head attend over the
        normalized sources themselves: one SDPA with heads * T queries of width d. This costs
        about heads * T * N * d instead of N * d * 2 * inner, e.g. 8x less for T = 8.
        """
        h, dh = self.heads, self.dim_head
        b, t, d = queries.shape
        w_q, w_k, w_v = self.to_qkv.weight.view(3, h, dh, d).unbind(0)  # (h, dh, d) each
        q = F.linear(queries, w_q.reshape(h * dh, d)).unflatten(-1, (h, dh))  # (B, T, h, dh)
        q = torch.einsum("bthe,hed->bhtd", q, w_k).reshape(b, 1, h * t, d)  # (B, 1, h*T, d)
        out = attend(q, keys.unsqueeze(1), values.unsqueeze(1), mask,  # keys, values (B, 1, N, d)
                     dropout_p=self.dropout if self.training else 0.0, scale=dh ** -0.5)
        out = torch.einsum("bhtd,hed->bthe", out.view(b, h, t, d), w_v).flatten(2)  # (B, T, inner)
        return self.to_out(out)


def split_heads(projected: torch.Tensor, parts: int, heads: int) -> tuple[torch.Tensor, ...]:
    """(B, N, parts * heads * dh) -> `parts` tensors (B, heads, N, dh), views. Split on the last
    dim, their gradients are one concatenation; unbinding a permuted (parts, ...) view instead
    stacks them and copies that into place (two copies, ~5-10% of an attention sublayer)."""
    return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in projected.chunk(parts, dim=-1))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + Attn(LN(x) [, LN(context)]), then x + MLP(LN(x)).

    qkv_norms "shared": one norm for the block's input, and with `cross=True` a second for the
    keys/values source. "separate": queries, keys and values each through their own norm
    (norm_q, norm_k, norm_v; the reference LNLN's PreNorm_qkv), projected by their slices of
    the attention's weight. (Folding the three affines into one projection after a single
    affine-free norm measured slower: its weight-sized work, forward and backward, comes
    with every call, ~20% of a block over 32 rows of 8 positions.)
    """

    def __init__(self, dim: int, heads: int, dim_head: int, mlp_dim: int, dropout: float = 0.0,
                 cross: bool = False, qkv_norms: QKVNorms = "shared"):
        super().__init__()
        self.cross, self.separate = cross, qkv_norms == "separate"
        if self.separate:
            self.norm_q, self.norm_k, self.norm_v = (nn.LayerNorm(dim) for _ in range(3))
        else:
            self.norm = nn.LayerNorm(dim)
            self.norm_context = nn.LayerNorm(dim) if cross else None
        self.attn = Attention(dim, heads, dim_head, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, query_len: int | None = None) -> torch.Tensor:
        if (context is None) == self.cross:
            raise ValueError("a cross-attention block needs a context, a self-attention block none")
        queries = x if query_len is None else x[:, :query_len]
        if self.separate:
            source = x if context is None else context
            attended = self.attn(self.norm_q(queries), self.norm_k(source), mask, query_len,
                                 values=self.norm_v(source))
        else:
            ctx = None if context is None else self.norm_context(context)
            attended = self.attn(self.norm(x), ctx, mask, query_len)
        x = queries + attended
        return x + self.mlp(self.norm_mlp(x))


class Transformer(nn.Module):
    """A stack of pre-norm blocks (self- or cross-attention)."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 dropout: float = 0.0, cross: bool = False, qkv_norms: QKVNorms = "shared"):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, dim_head, mlp_dim, dropout, cross, qkv_norms)
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, keep_first: int | None = None,
                return_hidden: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """mask (B, M) bool over the keys (True = attend). keep_first: only the first outputs are
        wanted, so the last block computes just those queries (exact; saves most of its cost).
        return_hidden: the input plus every block's output, depth + 1 tensors."""
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, M)
        hidden = [x]
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x = block(x, context, attn_mask, keep_first if last and not return_hidden else None)
            hidden.append(x)
        if return_hidden:
            return hidden
        return x if keep_first is None else x[:, :keep_first]


# --- encoders with learnable tokens --------------------------------------------------------

class TokenEncoder(nn.Module):
    """Linear(d_in -> d), prepend T learnable tokens, add learned positions (seq_len + T),
    Transformer; returns the T token outputs (B, T, d). With tokens=0 it is a plain
    positional Transformer returning every position (B, N, d).

    Padded positions (mask False) are never attended. With a mask, rows are grouped by their
    valid length and each group is cut to its own longest row: trailing padding is then
    neither a key (masked anyway) nor a query (its outputs are never read), so the result is
    the same while long, mostly padded sequences (MOSI audio/vision) cost far less.
    """

    def __init__(self, seq_len: int, dim: int, depth: int, heads: int, dim_head: int, mlp_dim: int,
                 tokens: int = 8, d_in: int | None = None, dropout: float = 0.0,
                 length_buckets: int = 4, qkv_norms: QKVNorms = "shared"):
        super().__init__()
        self.seq_len, self.num_tokens, self.length_buckets = seq_len, tokens, length_buckets
        self.in_proj = nn.Linear(d_in, dim) if d_in is not None else nn.Identity()
        self.tokens = nn.Parameter(torch.zeros(1, tokens, dim)) if tokens else None
        # N(0, 1) positions as the reference; the zero tokens are told apart by them.
        self.pos_embedding = nn.Parameter(torch.randn(1, seq_len + tokens, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, qkv_norms=qkv_norms)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, lengths: np.ndarray | None = None,
                return_hidden: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """x (B, N, d_in), N <= seq_len; mask (B, N) bool, True = a real position. `lengths`
        (B,) host (numpy) valid lengths, when the mask is their prefix mask: the groups are
        then cut without reading the device (no host sync); without them the mask is read."""
        if x.shape[1] > self.seq_len:
            raise ValueError(f"input length {x.shape[1]} exceeds the encoder's seq_len {self.seq_len}")
        if mask is None or not self.num_tokens or return_hidden:
            full = None if mask is None or lengths is None else bool((np.asarray(lengths) >= x.shape[1]).all())
            return self._encode(x, mask, return_hidden, all_valid=full)
        if lengths is not None:
            return self._encode_grouped_host(x, mask, np.asarray(lengths))
        # Effective length: one past the last real position (works for any mask, not only prefixes).
        positions = torch.arange(1, x.shape[1] + 1, device=x.device)
        lengths = (mask * positions).amax(dim=1)  # (B,)
        order = torch.argsort(lengths, stable=True)
        # Always `length_buckets` groups, empty ones included (a batch of fewer rows): every
        # batch then makes the same submodule calls, which ZeRO-3 needs (each rank gathers the
        # same weights in the same order; a 1-row tail batch on one rank once broke that).
        groups = torch.tensor_split(order, self.length_buckets)
        maxima = lengths[order].tensor_split(self.length_buckets)
        outs = []
        for rows, lens in zip(groups, maxima):
            cut = int(lens[-1]) if len(lens) else 1  # sorted ascending: the last is the group's longest
            outs.append(self._encode(x[rows, :cut], mask[rows, :cut]))
        return torch.cat(outs).index_select(0, torch.argsort(order))  # back to batch order

    def _encode_grouped_host(self, x: torch.Tensor, mask: torch.Tensor, lengths: np.ndarray) -> torch.Tensor:
        """The grouping of `forward` planned on the host: same groups (stable order), same cuts,
        and a group whose rows all fill its cut drops its mask; one non-blocking index copy."""
        order = np.argsort(lengths, kind="stable")
        groups = np.array_split(order, self.length_buckets)  # the sizes torch.tensor_split gives
        index = np.concatenate([order, np.argsort(order)])  # then back to batch order
        rows_all, inverse = host_to_device(index, x.device).split(len(order))
        outs, start = [], 0
        for group in groups:
            rows = rows_all[start:start + len(group)]
            start += len(group)
            cut = min(int(lengths[group[-1]]), x.shape[1]) if len(group) else 1
            full = not len(group) or int(lengths[group[0]]) >= cut  # sorted: the first is the shortest
            outs.append(self._encode(x[:, :cut].index_select(0, rows), mask[:, :cut].index_select(0, rows),
                                     all_valid=full))
        return torch.cat(outs).index_select(0, inverse)  # back to batch order

    def _encode(self, x, mask, return_hidden=False, all_valid: bool | None = None):
        """all_valid: whether the mask hides nothing, when the caller knows (else it is read)."""
        x = self.in_proj(x)  # (B, N, d)
        b, n, _ = x.shape
        if mask is not None and (all_valid if all_valid is not None else bool(mask.all())):
            mask = None  # nothing to hide: let SDPA take its unmasked path
        if self.tokens is not None:
            x = torch.cat([self.tokens.expand(b, -1, -1), x], dim=1)  # (B, T + N, d)
            if mask is not None:
                mask = F.pad(mask, (self.num_tokens, 0), value=True)  # tokens always attend
        x = x + self.pos_embedding[:, : x.shape[1]]
        keep = self.num_tokens or None
        return self.transformer(x, mask=mask, keep_first=keep, return_hidden=return_hidden)


class CrossTransformer(nn.Module):
    """Cross-modal Transformer: queries from `target`, keys/values from `source`, each with a
    learnable token prepended (one token for both with `shared_token`) and learned positions.
    Returns all target outputs (B, 1 + N_t, d)."""

    def __init__(self, target_len: int, source_len: int, dim: int, depth: int, heads: int,
                 dim_head: int, mlp_dim: int, dropout: float = 0.0, shared_token: bool = False,
                 qkv_norms: QKVNorms = "shared"):
        super().__init__()
        self.target_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.source_token = self.target_token if shared_token else nn.Parameter(torch.zeros(1, 1, dim))
        self.target_pos = nn.Parameter(torch.randn(1, target_len + 1, dim))
        self.source_pos = nn.Parameter(torch.randn(1, source_len + 1, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head, mlp_dim, dropout, cross=True, qkv_norms=qkv_norms)

    def forward(self, target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        b = target.shape[0]
        target = torch.cat([self.target_token.expand(b, -1, -1), target], dim=1)
        source = torch.cat([self.source_token.expand(b, -1, -1), source], dim=1)
        target = target + self.target_pos[:, : target.shape[1]]
        source = source + self.source_pos[:, : source.shape[1]]
        return self.transformer(target, context=source)


# --- gradient reversal (Ganin & Lempitsky, 2015) ---------------------------------------------

class GradReverse(torch.autograd.Function):
    """Identity forward; gradient times -lambda backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * -ctx.lambd, None


def grad_reverse(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    return GradReverse.apply(x, float(lambd))


GRLKind = Literal["constant", "linear", "dann"]


def grl_coefficient(progress: float, kind: GRLKind = "constant", lambda_max: float = 1.0,
                    gamma: float = 10.0) -> float:
    """GRL coefficient at training progress p in [0, 1] (spec/lnln.md, adversarial schedule):
    constant = lambda_max, linear = lambda_max * p, dann = lambda_max * (2 / (1 + exp(-gamma p)) - 1)
    (Ganin et al., 2016). Warm-up is the trainer's: it holds the adversarial terms' weights at 0.
    """
    p = min(max(float(progress), 0.0), 1.0)
    if kind == "constant":
        return float(lambda_max)
    if kind == "linear":
        return float(lambda_max * p)
    if kind == "dann":
        return float(lambda_max * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0))
    raise ValueError(f"unknown GRL schedule '{kind}'; allowed: constant, linear, dann")


# --- small heads ---------------------------------------------------------------------------

def mlp(dims: Sequence[int], negative_slope: float = 0.1) -> nn.Sequential:
    """Linear layers through `dims` with LeakyReLU between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i:
            layers.append(nn.LeakyReLU(negative_slope))
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class Discriminator(nn.Module):
    """Per-token classifier d -> hidden -> out (LeakyReLU 0.1); logits (..., out)."""

    def __init__(self, dim: int, hidden_dim: int = 64, out_dim: int = 2):
        super().__init__()
        self.net = mlp([dim, hidden_dim, out_dim])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# --- mutual-information critics and bounds (HRLF's HMI) -------------------------------------

class BilinearCritic(nn.Module):
    """Scores f(a_i, b_j) = a_i^T W b_j for every pair of a batch: (B, d_a), (B, d_b) -> (B, B).

    Matched pairs sit on the diagonal, the other rows of the batch are the negatives
    (CPC, van den Oord et al., 2018). A square W starts at I / sqrt(d): a scaled dot product,
    so the student is pulled towards its own teacher sample from the first step.
    """

    def __init__(self, dim_a: int, dim_b: int | None = None):
        super().__init__()
        dim_b = dim_a if dim_b is None else dim_b
        if dim_a == dim_b:
            weight = torch.eye(dim_a) / math.sqrt(dim_a)
        else:
            weight = nn.init.xavier_uniform_(torch.empty(dim_a, dim_b))
        self.weight = nn.Parameter(weight)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ self.weight) @ b.T  # (B, B)


def infonce_loss(scores: torch.Tensor) -> torch.Tensor:
    """-(InfoNCE bound) + log B: cross-entropy of each row of a (B, B) score matrix against its
    diagonal. Minimizing it maximizes the bound I >= log B - loss."""
    target = torch.arange(scores.shape[0], device=scores.device)
    return F.cross_entropy(scores.float(), target)  # fp32 loss whatever the critic's dtype


def jsd_mi_loss(scores: torch.Tensor) -> torch.Tensor:
    """-(Jensen-Shannon MI estimate) in Deep InfoMax's softplus form (Hjelm et al., 2019):
    E_pos[softplus(-T)] + E_neg[softplus(T)], the diagonal of (B, B) scores the positives.
    The negatives' mean is a masked sum (boolean indexing would make the host wait)."""
    scores = scores.float()
    b = scores.shape[0]
    positive = F.softplus(-scores.diagonal()).mean()
    if b == 1:
        return positive + scores.new_zeros(())
    eye = torch.eye(b, dtype=torch.bool, device=scores.device)
    negative = F.softplus(scores).masked_fill(eye, 0.0).sum() / (b * (b - 1))
    return positive + negative
