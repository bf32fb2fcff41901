"""Read and write MMSA feature pickles (spec/data.md), validating every split.

A pickle can run code when loaded: read only files you trust (your own MMSA exports).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .atomic import atomic_file
from .errors import DataValidationError
from .invariants import INT32_MAX, check_disjoint_ids, check_finite, check_split
from .presets import SPLITS
from .schema import MSADataset, SplitArrays, spec_for

REQUIRED_KEYS = ("text", "audio", "vision", "regression_labels", "id")
UNIMODAL_KEYS = {"T": "regression_labels_T", "A": "regression_labels_A", "V": "regression_labels_V"}
# The MMSA key behind each SplitArrays field, for check_split's messages (text lengths are the
# attention mask's sums where text_bert is given).
PICKLE_KEYS = {"ids": "id", "labels": "regression_labels", "text_lengths": "text_bert"}


def infer_dataset_name(path: Path, raw_train: dict) -> str:
    lowered = str(path).lower()
    if "regression_labels_T" in raw_train or "sims" in lowered:
        return "sims"
    if "mosei" in lowered:
        return "mosei"
    return "mosi"


def label_range_for(name: str) -> tuple[float, float]:
    return (-1.0, 1.0) if name.startswith("sims") else (-3.0, 3.0)


def read_mmsa(path: str | Path, dataset: str | None = None) -> MSADataset:
    """Load an MMSA pickle into an MSADataset; any violation raises one DataValidationError."""
    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise DataValidationError(file, None, None, "an existing MMSA pickle file", "no such file")
    try:
        with path.open("rb") as fh:
            raw = pickle.load(fh)
    except Exception as exc:  # a truncated or non-pickle file
        raise DataValidationError(file, None, None, "a readable pickle", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise DataValidationError(file, None, None, "a dict with keys train, valid, test", type(raw).__name__)
    for split in SPLITS:
        if split not in raw:
            raise DataValidationError(file, split, None, "splits train, valid, test", f"keys {sorted(raw)}")
        if not isinstance(raw[split], dict):
            raise DataValidationError(file, split, None, "a dict of arrays", type(raw[split]).__name__)
    name = dataset or infer_dataset_name(path, raw["train"])
    label_range = label_range_for(name)
    splits = {s: _read_split(file, s, raw[s], label_range) for s in SPLITS}
    reference = splits["train"]
    for split in ("valid", "test"):
        for key in ("text", "audio", "vision"):
            want, got = getattr(reference, key).shape[1:], getattr(splits[split], key).shape[1:]
            if want != got:
                raise DataValidationError(file, split, key, f"(N, {want[0]}, {want[1]}) as in split 'train'",
                                          f"(N, {got[0]}, {got[1]})")
        if (reference.text_bert is None) != (splits[split].text_bert is None):
            raise DataValidationError(file, split, "text_bert", "present in every split or in none")
    check_disjoint_ids({s: a.ids for s, a in splits.items()}, file)
    return MSADataset(spec_for(name, splits, label_range), splits)


def _read_split(file: str, split: str, raw: dict, label_range: tuple[float, float]) -> SplitArrays:
    def fail(key, expected, found=None):
        raise DataValidationError(file, split, key, expected, found)

    for key in REQUIRED_KEYS:
        if key not in raw:
            fail(key, "this required key", f"keys {sorted(raw)}")

    labels = _numeric(raw["regression_labels"], fail, "regression_labels")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        fail("regression_labels", "shape (N,)", str(labels.shape))
    n = labels.shape[0]
    if n == 0:
        fail("regression_labels", "a non-empty split", "0 samples")

    def sequence(key):
        arr = _numeric(raw[key], fail, key)
        if arr.ndim != 3:
            fail(key, "shape (N, T, d)", str(arr.shape))
        if arr.shape[0] != n:
            fail(key, f"{n} samples as in regression_labels", f"{arr.shape[0]}")
        return arr.astype(np.float32, copy=False)

    text, audio, vision = sequence("text"), sequence("audio"), sequence("vision")
    # MMSA audio features may hold -inf (log of zero energy): the protocol maps it to 0 first.
    if np.isneginf(audio).any():
        audio = np.where(np.isneginf(audio), np.float32(0.0), audio)

    text_bert = None
    if "text_bert" in raw:
        tb = _numeric(raw["text_bert"], fail, "text_bert")
        if tb.ndim != 3 or tb.shape[0] != n or tb.shape[1] != 3 or tb.shape[2] != text.shape[1]:
            fail("text_bert", f"shape ({n}, 3, {text.shape[1]}) (ids, attention mask, token types)", str(tb.shape))
        check_finite(tb, lambda expected, found: fail("text_bert", expected, found))
        if not np.array_equal(tb, np.round(tb)):
            fail("text_bert", "integer token ids and masks", "non-integer values")
        if np.abs(tb).max() > INT32_MAX:  # kept as int32 (the Parquet store's column)
            fail("text_bert", f"values within int32 (|v| <= {INT32_MAX})", f"{np.abs(tb).max():g}")
        text_bert = tb.astype(np.int32)
        text_lengths = text_bert[:, 1].sum(axis=1).astype(np.int32)
    else:
        text_lengths = _infer_lengths(text)

    def lengths(key, arr):
        if key not in raw:
            return _infer_lengths(arr)
        ln = _numeric(raw[key], fail, key).reshape(-1)
        if ln.shape[0] != n:
            fail(key, f"{n} lengths as in regression_labels", f"{ln.shape[0]}")
        if not np.isfinite(ln).all() or not np.array_equal(ln, np.round(ln)):
            fail(key, "integer lengths", "non-integer values")
        if ln.min() < 0 or ln.max() > arr.shape[1]:
            fail(key, f"lengths within [0, {arr.shape[1]}]", f"range [{ln.min():g}, {ln.max():g}]")
        return ln.astype(np.int32)

    ids = np.asarray(raw["id"]).reshape(-1).astype(str)
    if ids.shape[0] != n:
        fail("id", f"{n} ids as in regression_labels", f"{ids.shape[0]}")
    unimodal = None
    if all(k in raw for k in UNIMODAL_KEYS.values()):
        unimodal = {}
        for letter, key in UNIMODAL_KEYS.items():
            arr = _numeric(raw[key], fail, key).reshape(-1)
            if arr.shape[0] != n:
                fail(key, f"{n} labels as in regression_labels", f"{arr.shape[0]}")
            check_finite(arr, lambda expected, found, key=key: fail(key, expected, found))
            unimodal[letter] = arr.astype(np.float32)
    raw_text = None
    if "raw_text" in raw:
        raw_text = np.asarray(raw["raw_text"]).reshape(-1).astype(str)
        if raw_text.shape[0] != n:
            fail("raw_text", f"{n} transcripts as in regression_labels", f"{raw_text.shape[0]}")
    arrays = SplitArrays(
        ids=ids, labels=labels.astype(np.float32), text=text, audio=audio, vision=vision,
        text_lengths=text_lengths, audio_lengths=lengths("audio_lengths", audio),
        vision_lengths=lengths("vision_lengths", vision), text_bert=text_bert,
        unimodal_labels=unimodal, raw_text=raw_text,
    )
    check_split(arrays, file=file, split=split, keys=PICKLE_KEYS, label_range=label_range)
    return arrays


def _numeric(value, fail, key) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:
        fail(key, "an array", f"{type(value).__name__} ({exc})")
    if arr.dtype.kind not in "fiub":
        fail(key, "a numeric array", f"dtype {arr.dtype}")
    return arr


def _infer_lengths(arr: np.ndarray) -> np.ndarray:
    """Valid length = 1 + index of the last non-zero frame (0 for an all-zero sample)."""
    nonzero = np.abs(arr).sum(axis=2) > 0  # (N, T)
    last = arr.shape[1] - np.argmax(nonzero[:, ::-1], axis=1)
    return np.where(nonzero.any(axis=1), last, 0).astype(np.int32)


def to_mmsa_dict(dataset: MSADataset) -> dict:
    """The MMSA pickle layout of a dataset (what other MMSA-format tools read)."""
    out = {}
    for name, s in dataset.splits.items():
        split = {
            "id": s.ids.astype(object), "text": s.text, "audio": s.audio, "vision": s.vision,
            "audio_lengths": s.audio_lengths.astype(np.int64), "vision_lengths": s.vision_lengths.astype(np.int64),
            "regression_labels": s.labels,
        }
        if s.text_bert is not None:
            split["text_bert"] = s.text_bert.astype(np.int64)
        # MMSA-style loaders read raw_text: empty transcripts where the source had none.
        split["raw_text"] = (s.raw_text if s.raw_text is not None else np.full(len(s.labels), "")).astype(object)
        if s.unimodal_labels is not None:
            for letter, key in UNIMODAL_KEYS.items():
                split[key] = s.unimodal_labels[letter]
        out[name] = split
    return out


def write_mmsa(dataset: MSADataset, path: str | Path, force: bool = False) -> Path:
    """Write an MMSA pickle atomically (a failed write leaves no file behind)."""
    path = Path(path)
    with atomic_file(path, force=force) as tmp:
        with tmp.open("wb") as fh:
            pickle.dump(to_mmsa_dict(dataset), fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path
