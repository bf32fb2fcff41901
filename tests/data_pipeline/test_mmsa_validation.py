"""Every class of bad MMSA input gets one clear error and leaves nothing behind."""
from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from data_pipeline.errors import DataValidationError
from data_pipeline.mmsa import read_mmsa, to_mmsa_dict
from data_pipeline.synth import synthesize


@pytest.fixture(scope="module")
def good_raw():
    return to_mmsa_dict(synthesize("mosi-aligned", seed=2, scale=0.01))


def _with(raw, split, key, value):
    bad = copy.deepcopy(raw)
    if value is _DELETE:
        del bad[split][key]
    else:
        bad[split][key] = value(bad[split]) if callable(value) else value
    return bad


_DELETE = object()


def _nan_at(arr):
    arr = arr.copy()
    arr[1, 2, 3] = np.nan
    return arr


CASES = {
    # name: (mutation, split, key, phrase expected in the message)
    "missing key": (lambda r: _with(r, "valid", "audio", _DELETE), "valid", "audio", "required key"),
    "sample count differs": (lambda r: _with(r, "train", "vision", lambda s: s["vision"][:-1]),
                             "train", "vision", "samples"),
    "wrong rank": (lambda r: _with(r, "test", "text", lambda s: s["text"][:, :, 0]), "test", "text", "shape (N, T, d)"),
    "dims differ across splits": (lambda r: _with(r, "test", "audio", lambda s: s["audio"][:, :, :3]),
                                  "test", "audio", "as in split 'train'"),
    "non-numeric": (lambda r: _with(r, "train", "audio", lambda s: s["audio"].astype(str)),
                    "train", "audio", "numeric"),
    "nan": (lambda r: _with(r, "valid", "vision", lambda s: _nan_at(s["vision"])), "valid", "vision", "finite"),
    "label out of range": (lambda r: _with(r, "train", "regression_labels",
                                           lambda s: s["regression_labels"] + 3.5), "train", "regression_labels",
                           "within [-3, 3]"),
    "empty split": (lambda r: _with(_with(_with(_with(_with(r, "test", "regression_labels",
                                                            lambda s: s["regression_labels"][:0]),
                                                      "test", "text", lambda s: s["text"][:0]),
                                                "test", "audio", lambda s: s["audio"][:0]),
                                          "test", "vision", lambda s: s["vision"][:0]),
                                    "test", "id", lambda s: s["id"][:0]), "test", "regression_labels", "non-empty"),
    "text_bert shape": (lambda r: _with(r, "train", "text_bert", lambda s: s["text_bert"][:, :2]),
                        "train", "text_bert", "(ids, attention mask"),
    "length beyond sequence": (lambda r: _with(r, "train", "audio_lengths", lambda s: s["audio_lengths"] + 100),
                               "train", "audio_lengths", "within [0, 50]"),
    "missing split": (lambda r: {k: v for k, v in r.items() if k != "valid"}, "valid", None, "splits train, valid"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_names_file_split_and_key(tmp_path, good_raw, case):
    mutate, split, key, phrase = CASES[case]
    path = tmp_path / "aligned_50.pkl"
    path.write_bytes(pickle.dumps(mutate(good_raw)))
    with pytest.raises(DataValidationError) as info:
        read_mmsa(path)
    message = str(info.value)
    assert str(path) in message and f"split '{split}'" in message and phrase in message
    if key:
        assert f"key '{key}'" in message


def test_audio_minus_inf_becomes_zero_but_plus_inf_is_rejected(tmp_path, good_raw):
    raw = copy.deepcopy(good_raw)
    raw["train"]["audio"][0, 0, 0] = -np.inf
    path = tmp_path / "a.pkl"
    path.write_bytes(pickle.dumps(raw))
    assert read_mmsa(path).split("train").audio[0, 0, 0] == 0.0
    raw["train"]["audio"][0, 0, 0] = np.inf
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(DataValidationError, match="finite"):
        read_mmsa(path)


def test_sims_label_range_is_minus_one_to_one(tmp_path):
    raw = to_mmsa_dict(synthesize("sims", seed=2, scale=0.005))
    raw["valid"]["regression_labels"][0] = 1.4
    path = tmp_path / "unaligned_39.pkl"
    path.write_bytes(pickle.dumps(raw))
    with pytest.raises(DataValidationError, match=r"within \[-1, 1\]"):
        read_mmsa(path)


def test_not_a_pickle_and_not_a_dict(tmp_path):
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"this is not a pickle")
    with pytest.raises(DataValidationError, match="readable pickle"):
        read_mmsa(garbage)
    listy = tmp_path / "list.pkl"
    listy.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataValidationError, match="dict with keys train"):
        read_mmsa(listy)


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_failed_convert_leaves_no_partial_output_and_keeps_old_output(tmp_path, good_raw):
    bad = _with(good_raw, "test", "vision", lambda s: _nan_at(s["vision"]))
    src = tmp_path / "aligned_50.pkl"
    src.write_bytes(pickle.dumps(bad))
    result = _cli("data", "convert", str(src), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "split 'test'" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned_50.pkl"], "no partial dataset, no temp dirs"

    # An existing dataset survives a failed --force convert untouched.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    result = _cli("data", "convert", str(src), "--out", str(tmp_path / "out"), "--force", cwd=tmp_path)
    assert result.returncode == 1
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned_50.pkl", "out"]


def test_convert_refuses_to_overwrite_without_force(tmp_path, tiny_pickle):
    (tmp_path / "out").mkdir()
    result = _cli("data", "convert", str(tiny_pickle), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 1 and "already exists" in result.stderr and "--force" in result.stderr
