from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.loader import load_split
from data_pipeline.mmsa import read_mmsa, write_mmsa
from data_pipeline.presets import PRESETS, SPLITS
from data_pipeline.store import read_store, write_store
from data_pipeline.synth import synthesize

ARRAY_FIELDS = ("ids", "labels", "text", "audio", "vision", "text_lengths", "audio_lengths", "vision_lengths",
                "text_bert", "raw_text")


def assert_same_split(a, b):
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    if a.unimodal_labels is not None:
        for k in a.unimodal_labels:
            np.testing.assert_array_equal(a.unimodal_labels[k], b.unimodal_labels[k])


def test_synth_pickle_parquet_tensors_roundtrip_is_lossless(tmp_path, tiny_mosi):
    pkl = write_mmsa(tiny_mosi, tmp_path / "unaligned_50.pkl")
    from_pickle = read_mmsa(pkl)
    assert from_pickle.spec == tiny_mosi.spec
    store = write_store(from_pickle, tmp_path / "store")
    from_parquet = read_store(store)
    assert from_parquet.spec == tiny_mosi.spec
    for split in SPLITS:
        assert_same_split(tiny_mosi.split(split), from_pickle.split(split))
        assert_same_split(tiny_mosi.split(split), from_parquet.split(split))
        tensors = load_split(store, split)
        original = tiny_mosi.split(split)
        assert torch.equal(tensors.features["audio"], torch.from_numpy(original.audio))
        assert torch.equal(tensors.features["text"], torch.from_numpy(original.text))
        assert torch.equal(tensors.labels, torch.from_numpy(original.labels))
        assert torch.equal(tensors.text_bert, torch.from_numpy(original.text_bert.astype(np.int64)))


def test_sims_unimodal_labels_survive_roundtrip(tmp_path):
    sims = synthesize("sims", seed=3, scale=0.01)
    back = read_store(write_store(read_mmsa(write_mmsa(sims, tmp_path / "unaligned_39.pkl")), tmp_path / "s"))
    assert back.spec.label_max == 1.0 and back.spec.name == "sims"
    assert_same_split(sims.split("test"), back.split("test"))


def test_store_has_schema_file_and_arrow_metadata(tiny_store):
    schema = json.loads((tiny_store / "schema.json").read_text())
    assert schema["audio_len"] == 375 and schema["vision_dim"] == 20 and schema["label_max"] == 3.0
    meta = pq.read_schema(tiny_store / "train.parquet").metadata
    assert json.loads(meta[b"msa_search.schema"]) == schema


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_synth_matches_preset_shapes_and_pads_with_zeros(preset):
    p = PRESETS[preset]
    data = synthesize(preset, seed=1, scale=0.005)
    for split, n in p.split_sizes.items():
        s = data.split(split)
        assert len(s) == max(4, round(n * 0.005))
        assert s.text.shape[1:] == (p.text_len, p.text_dim)
        assert s.audio.shape[1:] == (p.audio_len, p.audio_dim)
        assert s.vision.shape[1:] == (p.vision_len, p.vision_dim)
        assert np.abs(s.labels).max() <= p.label_max
        for m in ("text", "audio", "vision"):
            arr, lengths = getattr(s, m), getattr(s, f"{m}_lengths")
            pad = np.arange(arr.shape[1])[None, :] >= lengths[:, None]
            assert not arr[pad].any(), f"{m} padding must be zero"
            assert (np.abs(arr).sum(-1)[~pad] > 0).all(), f"{m} valid positions must carry data"
            assert lengths.min() < arr.shape[1] or preset == "mosi-aligned"
    assert (data.split("train").unimodal_labels is not None) == (preset == "sims")


def test_synth_is_deterministic_for_a_seed():
    a, b, c = (synthesize("mosi-aligned", seed=s, scale=0.01) for s in (5, 5, 6))
    assert_same_split(a.split("train"), b.split("train"))
    assert not np.array_equal(a.split("train").text, c.split("train").text)


def _ridge_corr(train_x, train_y, test_x, test_y, alpha=10.0):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    xt, xs = (train_x - mu) / sd, (test_x - mu) / sd
    w = np.linalg.solve(xt.T @ xt + alpha * np.eye(xt.shape[1]), xt.T @ (train_y - train_y.mean()))
    return float(np.corrcoef(xs @ w, test_y)[0, 1])


def _pooled(split, keep_rate=1.0, rng=None):
    feats = []
    for m in ("text", "audio", "vision"):
        arr = getattr(split, m)
        mask = np.arange(arr.shape[1])[None, :] < getattr(split, f"{m}_lengths")[:, None]
        if keep_rate < 1.0:
            mask &= rng.random(mask.shape) < keep_rate
        feats.append((arr * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1))
    return feats


def test_synthetic_signal_is_language_dominant_complementary_and_degrades_with_missing():
    data = synthesize("mosi-aligned", seed=11, scale=1.0)
    train, test = data.split("train"), data.split("test")
    tr, te = _pooled(train), _pooled(test)
    text_only = _ridge_corr(tr[0], train.labels, te[0], test.labels, alpha=2000.0)
    audio_vision = _ridge_corr(np.hstack(tr[1:]), train.labels, np.hstack(te[1:]), test.labels)
    full = _ridge_corr(np.hstack(tr), train.labels, np.hstack(te), test.labels, alpha=2000.0)
    te_missing = _pooled(test, keep_rate=0.1, rng=np.random.default_rng(0))
    degraded = _ridge_corr(np.hstack(tr), train.labels, np.hstack(te_missing), test.labels, alpha=2000.0)
    assert text_only > 0.5, "text alone must beat chance clearly"
    assert audio_vision < text_only, "language must dominate"
    assert full > text_only + 0.02, "fusion must help (audio/vision carry what text lacks)"
    assert degraded < full - 0.1, "a 90% missing rate must hurt"


def test_a_store_without_transcripts_exports_empty_raw_text_for_mmsa_loaders(tmp_path, tiny_mosi):
    import pickle
    from dataclasses import replace

    from data_pipeline.schema import MSADataset

    bare = MSADataset(tiny_mosi.spec, {k: replace(v, raw_text=None) for k, v in tiny_mosi.splits.items()})
    back = read_store(write_store(bare, tmp_path / "store"))
    data = pickle.loads(write_mmsa(back, tmp_path / "x.pkl").read_bytes())
    for split in SPLITS:
        assert list(data[split]["raw_text"]) == [""] * len(data[split]["regression_labels"])
        assert {"id", "text", "text_bert", "audio", "vision", "audio_lengths", "vision_lengths",
                "regression_labels", "raw_text"} <= set(data[split])


def test_synthetic_token_ids_carry_the_language_sentiment():
    from data_pipeline.synth import NEGATIVE_IDS, POSITIVE_IDS

    ds = synthesize("mosi-aligned", seed=5, scale=0.2)
    train = ds.split("train")
    ids, attention = train.text_bert[:, 0], train.text_bert[:, 1].astype(bool)
    positive = (np.isin(ids, POSITIVE_IDS) & attention).sum(axis=1)
    negative = (np.isin(ids, NEGATIVE_IDS) & attention).sum(axis=1)
    score = (positive - negative) / attention.sum(axis=1)
    # A bag-of-words count alone predicts the label's sign well above chance.
    nonzero = train.labels != 0
    agreement = (np.sign(score[nonzero]) == np.sign(train.labels[nonzero])).mean()
    assert agreement > 0.7, agreement
    assert np.corrcoef(score, train.labels)[0, 1] > 0.5
