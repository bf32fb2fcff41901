"""Synthetic MSA data with the real datasets' shapes and a planted, language-dominant signal.

A latent sentiment s = c_lang + c_extra drives the label. Text carries c_lang strongly on
every valid position; audio and vision carry c_extra (which text lacks, so fusion helps)
and a little of c_lang, weakly per frame. Per-position noise means fewer observed positions
give a noisier estimate, so accuracy falls as the missing rate rises (spec/data.md).
"""
from __future__ import annotations

import numpy as np

from .mmsa import label_range_for
from .presets import SPLITS, get_preset
from .schema import MSADataset, SplitArrays, spec_for

# Per-position signal gains (noise is unit Gaussian per feature).
TEXT_GAIN = 0.5
AUDIO_GAIN = {"lang": 0.08, "extra": 0.18}
VISION_GAIN = {"lang": 0.06, "extra": 0.14}
LABEL_STEP = 0.2  # MOSI/SIMS labels are averages of annotator scores: multiples of 0.2
CLS_ID, SEP_ID, FIRST_WORD_ID, VOCAB = 101, 102, 1000, 30000
# Sentiment-bearing token ids, so a model that reads token ids (text_encoder: bert) finds the
# language signal too: a share of each utterance's words comes from the positive or the negative
# list, by the sign of its language sentiment, growing with its strength.
POSITIVE_IDS = np.arange(FIRST_WORD_ID, FIRST_WORD_ID + 10)
NEGATIVE_IDS = np.arange(FIRST_WORD_ID + 10, FIRST_WORD_ID + 20)
NEUTRAL_FIRST_ID = FIRST_WORD_ID + 20
SENTIMENT_WORD_SHARE = 0.3  # per unit of |language sentiment|, capped at 0.6
_CHUNK = 1024


def split_sizes(preset_name: str, scale: float) -> dict[str, int]:
    preset = get_preset(preset_name)
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return {s: max(4, int(round(n * scale))) for s, n in preset.split_sizes.items()}


def synthesize(preset_name: str, seed: int = 0, scale: float = 1.0, progress=None) -> MSADataset:
    """Deterministic for (preset, seed, scale). `progress(split, n)` is called per split."""
    preset = get_preset(preset_name)
    family = preset_name.split("-")[0]
    label_max = preset.label_max
    directions = np.random.default_rng([seed, 0])
    unit = lambda d: (v := directions.standard_normal(d)) / np.linalg.norm(v)
    dirs = {"text": unit(preset.text_dim), "audio": unit(preset.audio_dim), "vision": unit(preset.vision_dim)}
    splits = {}
    for index, (split, n) in enumerate(split_sizes(preset_name, scale).items()):
        rng = np.random.default_rng([seed, 1 + index])
        splits[split] = _split(rng, preset, family, split, n, dirs, label_max)
        if progress is not None:
            progress(split, n)
    return MSADataset(spec_for(preset_name, splits, label_range_for(family)), splits)


def _split(rng, preset, family, split, n, dirs, label_max) -> SplitArrays:
    unit_scale = label_max / 3.0  # SIMS labels live in [-1, 1]
    c_lang = rng.normal(0.0, 1.2, n) * unit_scale
    c_extra = rng.normal(0.0, 0.7, n) * unit_scale
    noisy = c_lang + c_extra + rng.normal(0.0, 0.15 * unit_scale, n)
    labels = np.clip(np.round(noisy / LABEL_STEP) * LABEL_STEP, -label_max, label_max).astype(np.float32)

    L, Ta, Tv = preset.text_len, preset.audio_len, preset.vision_len
    text_len = rng.integers(max(4, L // 4), L + 1, n).astype(np.int32)
    if preset.aligned:
        audio_len, vision_len = text_len.copy(), text_len.copy()
    else:
        audio_len = rng.integers(max(2, Ta // 3), Ta + 1, n).astype(np.int32)
        vision_len = rng.integers(max(2, Tv // 3), Tv + 1, n).astype(np.int32)
    z_lang, z_extra = c_lang / unit_scale, c_extra / unit_scale  # unit-free signal strengths
    # Long frame sequences average away more noise: scale per-frame gains by sqrt(50 / T) so
    # audio and vision stay the weaker modalities at unaligned lengths (375-500 frames) too.
    a_gain, v_gain = np.sqrt(50.0 / Ta), np.sqrt(50.0 / Tv)
    text = _sequences(rng, n, L, dirs["text"], TEXT_GAIN * z_lang, text_len)
    audio = _sequences(rng, n, Ta, dirs["audio"],
                       a_gain * (AUDIO_GAIN["lang"] * z_lang + AUDIO_GAIN["extra"] * z_extra), audio_len)
    vision = _sequences(rng, n, Tv, dirs["vision"],
                        v_gain * (VISION_GAIN["lang"] * z_lang + VISION_GAIN["extra"] * z_extra), vision_len)

    positions = np.arange(L)[None, :]
    ids = _token_ids(rng.integers(FIRST_WORD_ID, VOCAB, (n, L)), z_lang)
    ids = np.where(positions == 0, CLS_ID, ids)
    ids = np.where(positions == text_len[:, None] - 1, SEP_ID, ids)
    attention = (positions < text_len[:, None]).astype(np.int32)
    text_bert = np.stack([ids * attention, attention, np.zeros_like(attention)], axis=1).astype(np.int32)

    unimodal = None
    if family == "sims":
        def unimodal_label(z):
            return np.clip(np.round(z * unit_scale / LABEL_STEP) * LABEL_STEP, -label_max, label_max).astype(np.float32)
        unimodal = {"T": unimodal_label(z_lang), "A": unimodal_label(z_extra + 0.3 * z_lang),
                    "V": unimodal_label(z_extra + 0.2 * z_lang)}
    return SplitArrays(
        ids=np.array([f"{preset.name}_{split}_{i:05d}" for i in range(n)]),
        labels=labels, text=text, audio=audio, vision=vision,
        text_lengths=text_len, audio_lengths=audio_len, vision_lengths=vision_len,
        text_bert=text_bert, unimodal_labels=unimodal,
        raw_text=np.array([f"synthetic utterance {i} of {split}" for i in range(n)]),
    )


def _token_ids(draws: np.ndarray, z_lang: np.ndarray) -> np.ndarray:
    """Word ids from uniform draws in [FIRST_WORD_ID, VOCAB) (n, L): a draw in the lowest share
    of the range (share = SENTIMENT_WORD_SHARE * |z|, at most 0.6) becomes a sentiment word of
    the utterance's sign, any other a neutral word. Derived from the same draws as before, so
    every other array of a synthetic dataset keeps its values."""
    span = VOCAB - FIRST_WORD_ID
    u = (draws - FIRST_WORD_ID) / span  # uniform in [0, 1)
    share = np.minimum(SENTIMENT_WORD_SHARE * np.abs(z_lang), 0.6)[:, None]
    words = np.where(z_lang[:, None] >= 0, POSITIVE_IDS[draws % 10], NEGATIVE_IDS[draws % 10])
    neutral = NEUTRAL_FIRST_ID + (draws - FIRST_WORD_ID) % (VOCAB - NEUTRAL_FIRST_ID)
    return np.where(u < share, words, neutral)


def _sequences(rng, n, T, direction, strength, lengths) -> np.ndarray:
    """(n, T, d) float32: unit noise + direction * strength on valid positions, zero padding."""
    d = direction.shape[0]
    out = np.empty((n, T, d), dtype=np.float32)
    direction = direction.astype(np.float32)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        block = rng.standard_normal((stop - start, T, d), dtype=np.float32)
        block += strength[start:stop, None, None].astype(np.float32) * direction[None, None, :]
        block *= (np.arange(T)[None, :] < lengths[start:stop, None])[..., None]
        out[start:stop] = block
    return out
