"""Missing-data simulation (spec/missing.md): patterns and seeded, order-free keep masks.

Every random draw is a counter-based hash of (seed, split, sample id, modality, stream,
epoch, position), so a mask is a pure function of those values: identical across trials,
worker counts, batch sizes and orders, with no RNG state to carry around.
Intra-modality masks at different rates share one uniform per position, so the set of
positions dropped at r=0.3 contains the set dropped at r=0.2: curves over r are smooth
rather than noisy, and the comparison across rates is paired.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

from .presets import MODALITIES, MODALITY_LETTERS

LETTER_TO_MODALITY = {v: k for k, v in MODALITY_LETTERS.items()}
INTRA_RATES = tuple(round(0.1 * i, 1) for i in range(10))
INTER_DROPS = ("L", "A", "V", "L+A", "L+V", "A+V")
UNK_TOKEN_ID = 100  # [UNK] in BERT vocabularies


@dataclass(frozen=True)
class Pattern:
    """`intra:r` (every modality loses a fraction r of its valid positions) or
    `inter:<dropped>` (whole modalities dropped, e.g. `inter:A+V`)."""

    kind: Literal["intra", "inter"]
    rate: float = 0.0
    dropped: tuple[str, ...] = ()  # modality names, in the order text, audio, vision

    @property
    def name(self) -> str:
        if self.kind == "intra":
            return f"intra:{self.rate:.1f}"
        return "inter:" + "+".join(MODALITY_LETTERS[m] for m in self.dropped)

    def __str__(self) -> str:
        return self.name


def parse_pattern(text: str) -> Pattern:
    """Parse `complete`, `intra:0.3` or `inter:L+V`; errors list what is allowed."""
    raw = text.strip()
    if raw == "complete":
        return Pattern("intra", 0.0)
    kind, _, arg = raw.partition(":")
    if kind == "intra":
        try:
            rate = float(arg)
        except ValueError:
            rate = -1.0
        # Names carry one decimal (intra:0.3): a rate off that grid would be renamed silently.
        if not 0.0 <= rate <= 1.0 or abs(rate * 10 - round(rate * 10)) > 1e-9:
            raise ValueError(f"bad missing pattern '{text}': intra rate must be one of 0.0, 0.1, ..., 1.0, "
                             "e.g. intra:0.3")
        return Pattern("intra", round(rate, 1))
    if kind == "inter":
        letters = arg.split("+") if arg else []
        if not letters or any(l not in LETTER_TO_MODALITY for l in letters) or len(set(letters)) != len(letters):
            raise ValueError(f"bad missing pattern '{text}': inter needs a '+'-joined subset of L, A, V, e.g. inter:A+V")
        if len(letters) == 3:
            raise ValueError(f"bad missing pattern '{text}': dropping all of L, A, V leaves no input")
        dropped = tuple(m for m in MODALITIES if MODALITY_LETTERS[m] in letters)
        return Pattern("inter", dropped=dropped)
    raise ValueError(f"bad missing pattern '{text}': expected complete, intra:<rate> or inter:<L|A|V[+...]>")


def default_eval_grid() -> list[str]:
    """The 16 default patterns: 10 intra rates then 6 inter drops."""
    return [f"intra:{r:.1f}" for r in INTRA_RATES] + [f"inter:{d}" for d in INTER_DROPS]


# --- counter-based hashing -------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a bijective, well-mixed uint64 -> uint64 map (wraps mod 2^64)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _digest64(text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))


def sample_keys(ids) -> np.ndarray:
    """Stable 64-bit key per sample id: masks follow the sample, not its row number."""
    return np.fromiter((_digest64(str(i)) for i in ids), dtype=np.uint64, count=len(ids))


def _stream(seed: int, split: str, modality: str, stream: str, epoch: int | None) -> np.uint64:
    return _digest64(f"{seed}|{split}|{modality}|{stream}|{'' if epoch is None else epoch}")


def uniforms(keys: np.ndarray, stream_key: np.uint64, n_positions: int | None = None) -> np.ndarray:
    """Uniforms in [0, 1): shape (B,) when n_positions is None, else (B, n_positions)."""
    with np.errstate(over="ignore"):
        base = _mix64(keys.astype(np.uint64) ^ stream_key)
        if n_positions is None:
            h = _mix64(base)
        else:
            pos = (np.arange(1, n_positions + 1, dtype=np.uint64) * _GOLDEN)[None, :]
            h = _mix64(base[:, None] + pos)
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# --- masks -------------------------------------------------------------------------------

def valid_mask(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """(B, T) bool: positions inside each sample's valid length."""
    return np.arange(max_len)[None, :] < np.asarray(lengths)[:, None]


def droppable_mask(valid: np.ndarray, lengths: np.ndarray, special_tokens: bool) -> np.ndarray:
    """Valid positions that intra-modality missing may drop ([CLS]/[SEP] are kept for BERT-style text)."""
    if not special_tokens:
        return valid
    lengths = np.asarray(lengths)
    t = np.arange(valid.shape[1])[None, :]
    return valid & (t > 0) & (t < lengths[:, None] - 1)


@dataclass(frozen=True)
class TrainingMissing:
    """How training batches are made incomplete (fresh masks every epoch).

    mode `lnln`: per sample and modality r ~ U(0, 1), and r = 0 for a random half (LNLN).
    mode `fixed`: every modality at rate `rate`.
    mode `mixture`: a fraction `inter_fraction` of samples get a random inter-modality
    pattern (kept modalities complete), the rest follow `lnln` (HRLF's setting).
    """

    mode: Literal["lnln", "fixed", "mixture"] = "lnln"
    rate: float = 0.5
    inter_fraction: float = 0.3


MissingSpec = Pattern | TrainingMissing | None


def keep_masks(
    keys: np.ndarray,
    lengths: dict[str, np.ndarray],
    seq_lens: dict[str, int],
    spec: MissingSpec,
    *,
    seed: int,
    split: str,
    epoch: int | None = None,
    text_special_tokens: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Keep masks (B, T) per modality, and the valid masks they were drawn inside.

    A kept position is valid and not dropped; padding is never kept nor dropped.
    `epoch` only matters for TrainingMissing (evaluation masks are the same every epoch).
    """
    valid = {m: valid_mask(lengths[m], seq_lens[m]) for m in MODALITIES}
    if spec is None:
        return {m: valid[m].copy() for m in MODALITIES}, valid
    if isinstance(spec, Pattern):
        if spec.kind == "inter":
            return {m: (np.zeros_like(valid[m]) if m in spec.dropped else valid[m].copy()) for m in MODALITIES}, valid
        rates = {m: np.full(len(keys), spec.rate) for m in MODALITIES}
        inter_drop = {m: np.zeros(len(keys), dtype=bool) for m in MODALITIES}
        epoch_for_positions = None
    else:
        rates, inter_drop = _training_rates(keys, spec, seed=seed, split=split, epoch=epoch)
        epoch_for_positions = epoch
    keep = {}
    for m in MODALITIES:
        special = text_special_tokens and m == "text"
        droppable = droppable_mask(valid[m], lengths[m], special)
        u = uniforms(keys, _stream(seed, split, m, "positions", epoch_for_positions), seq_lens[m])
        dropped = droppable & (u < rates[m][:, None])
        dropped |= valid[m] & inter_drop[m][:, None]
        keep[m] = valid[m] & ~dropped
    return keep, valid


def _training_rates(keys, spec: TrainingMissing, *, seed, split, epoch):
    n = len(keys)
    rates, inter_drop = {}, {m: np.zeros(n, dtype=bool) for m in MODALITIES}
    for m in MODALITIES:
        if spec.mode == "fixed":
            rates[m] = np.full(n, spec.rate)
        else:
            zero = uniforms(keys, _stream(seed, split, m, "train-zero", epoch)) < 0.5
            rate = uniforms(keys, _stream(seed, split, m, "train-rate", epoch))
            rates[m] = np.where(zero, 0.0, rate)
    if spec.mode == "mixture":
        gets_inter = uniforms(keys, _stream(seed, split, "*", "train-inter", epoch)) < spec.inter_fraction
        which = (uniforms(keys, _stream(seed, split, "*", "train-inter-kind", epoch)) * len(INTER_DROPS)).astype(int)
        for i, drop in enumerate(INTER_DROPS):
            chosen = gets_inter & (which == i)
            for m in parse_pattern(f"inter:{drop}").dropped:
                inter_drop[m] |= chosen
        for m in MODALITIES:
            rates[m] = np.where(gets_inter, 0.0, rates[m])
    return rates, inter_drop


def drop_fraction(keep: np.ndarray, droppable: np.ndarray) -> np.ndarray:
    """Observed fraction of droppable positions that were dropped, per sample (0 if none)."""
    n = droppable.sum(axis=1)
    dropped = (droppable & ~keep).sum(axis=1)
    return np.where(n > 0, dropped / np.maximum(n, 1), 0.0)
