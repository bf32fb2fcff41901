"""MSA metrics: hand-computed values on tiny arrays, and agreement with an MMSA-style reference."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics import (
    METRIC_NAMES, SIMS_METRIC_NAMES, metric_names, msa_metrics, msa_metrics_grouped, robust_f1, worst_f1,
)

# Shared example. Index:      0     1     2     3    4     5
LABELS = np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 0.5])
PREDS = np.array([-1.5, 0.5, -0.3, 2.6, 1.2, -0.4])


def test_acc2_has0_counts_zero_label_as_non_negative():
    # truth >= 0: F F T T T T ; preds >= 0: F T F T T F -> right at 0, 3, 4 -> 3/6
    assert msa_metrics(PREDS, LABELS)["acc2_has0"] == pytest.approx(0.5)


def test_f1_has0_is_support_weighted_f1():
    # class non-neg: support 4, predicted 3, tp 2 -> F1 = 2*2/(4+3) = 4/7
    # class neg:     support 2, predicted 3, tp 1 -> F1 = 2*1/(2+3) = 2/5
    # weighted: (4*4/7 + 2*2/5) / 6 = 18/35
    assert msa_metrics(PREDS, LABELS)["f1_has0"] == pytest.approx(18 / 35)


def test_f1_non0_excludes_zero_labels():
    # drop index 2 (label 0): truth > 0: F F T T T ; preds > 0: F T T T F -> acc 3/5
    # class pos: support 3, predicted 3, tp 2 -> 4/6 ; class neg: support 2, predicted 2, tp 1 -> 2/4
    # weighted: (3*2/3 + 2*1/2) / 5 = 3/5
    m = msa_metrics(PREDS, LABELS)
    assert m["acc2_non0"] == pytest.approx(0.6)
    assert m["f1_non0"] == pytest.approx(0.6)
    # Changing the prediction on the zero-label sample must not move the non0 metrics.
    flipped = PREDS.copy()
    flipped[2] = 5.0
    assert msa_metrics(flipped, LABELS)["acc2_non0"] == m["acc2_non0"]
    assert msa_metrics(flipped, LABELS)["acc2_has0"] != m["acc2_has0"]


def test_non0_binarizes_zero_prediction_as_negative():
    # MMSA: test_preds[non_zeros] > 0, so a prediction of exactly 0 is "negative" for non0 but
    # "non-negative" for has0 (>= 0).
    m = msa_metrics(np.array([0.0, 0.0]), np.array([1.0, 2.0]))
    assert m["acc2_non0"] == 0.0
    assert m["acc2_has0"] == 1.0


def test_weighted_f1_class_only_in_preds_weighs_zero_and_true_labels_come_first():
    labels = np.array([0.5, 1.0, 1.5, 2.0])  # all positive
    preds = np.array([1.0, 1.0, -1.0, -1.0])
    # true-first: pos support 4, predicted 2, tp 2 -> F1 4/6; neg (only in preds) support 0 -> weight 0
    #   -> weighted 2/3.
    # swapped (MMSA's bug): "true" = preds: pos support 2, pred 4, tp 2 -> 4/6; neg support 2, F1 0
    #   -> (2*2/3 + 2*0) / 4 = 1/3.
    m = msa_metrics(preds, labels)
    assert m["f1_non0"] == pytest.approx(2 / 3)
    assert m["f1_has0"] == pytest.approx(2 / 3)
    assert m["acc2_non0"] == pytest.approx(0.5)


def test_f1_is_one_when_a_single_class_is_predicted_perfectly():
    m = msa_metrics(np.array([1.0, 2.0]), np.array([0.4, 3.0]))
    assert m["f1_non0"] == 1.0 and m["f1_has0"] == 1.0


def test_acc5_and_acc7_clip_then_round():
    # acc7: preds clip to [-3, 3] -> 2.6, 2.6, 3 -> round 3, 3, 3 ; labels 3, 2, 2.6 -> 3, 2, 3 -> 2/3
    # acc5: everything clips to 2 -> 1.0 (pred 2.6 -> 2 for acc5, -> 3 for acc7)
    m = msa_metrics(np.array([2.6, 2.6, 3.4]), np.array([3.0, 2.0, 2.6]))
    assert m["acc7"] == pytest.approx(2 / 3)
    assert m["acc5"] == 1.0


def test_acc7_rounds_half_to_even_like_numpy():
    # np.round(0.5) == 0 and np.round(1.5) == 2 (half-up would give 1 and 2 -> 0.5)
    assert msa_metrics(np.array([0.5, 1.5]), np.array([0.0, 2.0]))["acc7"] == 1.0


def test_acc5_acc7_on_shared_example():
    # acc5 rounds: preds -2, 0, -0, 2, 1, -0 ; labels -2, -1, 0, 1, 2, 0 -> right at 0, 2, 5
    # acc7 rounds: preds -2, 0, -0, 3, 1, -0 ; labels the same -> right at 0, 2, 5
    m = msa_metrics(PREDS, LABELS)
    assert m["acc5"] == pytest.approx(0.5)
    assert m["acc7"] == pytest.approx(0.5)


def test_mae_is_mean_absolute_error_on_unclipped_values():
    # |0.5| + |1.5| + |0.3| + |1.6| + |0.8| + |0.9| = 5.6 over 6
    assert msa_metrics(PREDS, LABELS)["mae"] == pytest.approx(5.6 / 6)
    assert msa_metrics(np.array([10.0]), np.array([0.0]))["mae"] == 10.0


def test_corr_is_pearson():
    assert msa_metrics(2 * LABELS + 1, LABELS)["corr"] == pytest.approx(1.0)
    assert msa_metrics(-LABELS, LABELS)["corr"] == pytest.approx(-1.0)
    assert msa_metrics(PREDS, LABELS)["corr"] == pytest.approx(np.corrcoef(PREDS, LABELS)[0, 1], rel=1e-12)


def test_corr_is_zero_not_nan_when_a_side_is_constant():
    assert msa_metrics(np.full(6, 0.1), LABELS)["corr"] == 0.0
    assert msa_metrics(PREDS, np.full(6, 0.7))["corr"] == 0.0
    assert msa_metrics(np.array([1.0]), np.array([1.0]))["corr"] == 0.0


def test_keys_are_fixed_per_dataset_and_values_are_python_floats():
    for dataset, names in (("mosi", METRIC_NAMES), ("mosei", METRIC_NAMES), ("sims", SIMS_METRIC_NAMES)):
        m = msa_metrics(PREDS / 3, LABELS / 3, dataset)
        assert tuple(m) == names == metric_names(dataset)
        assert all(type(v) is float for v in m.values())
    assert metric_names("SIMS") == SIMS_METRIC_NAMES


def test_unknown_dataset_empty_input_and_size_mismatch_raise():
    with pytest.raises(ValueError, match="unknown dataset"):
        msa_metrics(PREDS, LABELS, "iemocap")
    with pytest.raises(ValueError, match="zero samples"):
        msa_metrics(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="differ in size"):
        msa_metrics(PREDS, LABELS[:3])


def test_all_zero_labels_give_nan_non0_only():
    m = msa_metrics(np.array([0.5, -0.5]), np.zeros(2))
    assert math.isnan(m["acc2_non0"]) and math.isnan(m["f1_non0"])
    assert m["acc2_has0"] == 0.5 and not math.isnan(m["f1_has0"])


def test_non_finite_prediction_makes_every_metric_nan():
    bad = PREDS.copy()
    bad[1] = np.nan
    assert all(math.isnan(v) for v in msa_metrics(bad, LABELS).values())


def test_torch_tensors_match_numpy():
    preds = torch.tensor(PREDS, dtype=torch.float32, requires_grad=True).reshape(-1, 1)
    labels = torch.tensor(LABELS, dtype=torch.float32).reshape(-1, 1)
    expected = msa_metrics(PREDS.astype(np.float32), LABELS.astype(np.float32))
    assert msa_metrics(preds, labels) == expected
    assert msa_metrics(preds.to(torch.bfloat16), labels)["acc2_has0"] == expected["acc2_has0"]


# --- SIMS -------------------------------------------------------------------------------------

def test_sims_acc3_bins_are_left_open_right_closed_at_plus_minus_0_1():
    labels = np.array([-0.2, 0.0, 0.0, 0.2])  # classes 0, 1, 1, 2
    # -0.1 -> class 0 ([-1, -0.1]), -0.09 -> 1, 0.1 -> 1 ((-0.1, 0.1]), 0.11 -> 2
    assert msa_metrics(np.array([-0.1, -0.09, 0.1, 0.11]), labels, "sims")["acc3"] == 1.0
    assert msa_metrics(np.array([-0.09, -0.1, 0.11, 0.1]), labels, "sims")["acc3"] == 0.0


def test_sims_acc5_bins_at_plus_minus_0_7():
    labels = np.array([-0.8, -0.8, 0.8, 0.8])  # classes 0, 0, 4, 4
    # -0.7 -> 0, -0.69 -> 1, 0.7 -> 3, 0.71 -> 4
    assert msa_metrics(np.array([-0.7, -0.69, 0.7, 0.71]), labels, "sims")["acc5"] == pytest.approx(0.5)


def test_sims_acc2_puts_zero_label_with_negatives_unlike_mosi():
    labels = np.array([0.0, 0.2, -0.2])
    preds = np.array([-0.5, 0.0, 0.0])
    # sims ms_2: class 1 iff > 0 -> labels 0 1 0, preds 0 0 0 -> 2/3
    #   F1: class 0 support 2, predicted 3, tp 2 -> 4/5; class 1 support 1, tp 0 -> 0 -> 2*0.8/3
    # mosi has0: labels >= 0 T T F, preds >= 0 F T T -> 1/3
    sims = msa_metrics(preds, labels, "sims")
    assert sims["acc2_has0"] == pytest.approx(2 / 3)
    assert sims["f1_has0"] == pytest.approx(1.6 / 3)
    assert msa_metrics(preds, labels, "mosi")["acc2_has0"] == pytest.approx(1 / 3)
    # non0: drop label 0 -> truth T F, preds > 0 F F -> 1/2 ; F1: pos 0, neg (support 1, pred 2, tp 1) 2/3
    assert sims["acc2_non0"] == pytest.approx(0.5)
    assert sims["f1_non0"] == pytest.approx(1 / 3)


def test_sims_clips_before_mae_and_bins():
    m = msa_metrics(np.array([1.5, -3.0, 0.2]), np.array([1.0, -1.0, 0.2]), "sims")
    assert m["mae"] == 0.0 and m["acc5"] == 1.0 and m["acc3"] == 1.0
    assert msa_metrics(np.array([1.5, -3.0, 0.2]), np.array([1.0, -1.0, 0.2]), "mosi")["mae"] > 0


def test_sims_acc7_scales_by_three():
    # labels 0.6, 3.0 -> round 1, 3 ; preds 0.3, 2.7 -> round 0, 3 -> 1/2
    assert msa_metrics(np.array([0.1, 0.9]), np.array([0.2, 1.0]), "sims")["acc7"] == pytest.approx(0.5)


# --- robust / worst F1 ------------------------------------------------------------------------

ROWS = {"complete": {"f1_non0": 0.8}, "intra:0.5": {"f1_non0": 0.6}, "inter:A+V": {"f1_non0": 0.4}}


def test_robust_and_worst_f1_over_all_and_a_subset():
    assert robust_f1(ROWS) == pytest.approx(0.6)
    assert worst_f1(ROWS) == pytest.approx(0.4)
    assert robust_f1(ROWS, ["complete", "intra:0.5"]) == pytest.approx(0.7)
    assert worst_f1(ROWS, ["complete", "intra:0.5"]) == pytest.approx(0.6)
    assert worst_f1(ROWS, "complete") == pytest.approx(0.8)


def test_missing_pattern_raises_key_error_naming_it():
    with pytest.raises(KeyError, match="intra:0.9"):
        robust_f1(ROWS, ["complete", "intra:0.9"])
    with pytest.raises(KeyError, match="intra:0.9"):
        worst_f1(ROWS, ["intra:0.9"])


def test_nan_f1_propagates_into_robust_and_worst():
    rows = {**ROWS, "inter:L": {"f1_non0": math.nan}}
    assert math.isnan(robust_f1(rows)) and math.isnan(worst_f1(rows))
    assert worst_f1(rows, ["complete"]) == pytest.approx(0.8)


# --- grouped == per row, and == an MMSA-style reference ---------------------------------------

def _weighted_f1_reference(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn's f1_score(y_true, y_pred, average='weighted'), written out with a loop."""
    total = 0.0
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_true == c) & (y_pred == c))
        prec = tp / max(np.sum(y_pred == c), 1)
        rec = tp / max(np.sum(y_true == c), 1)
        f1 = 0.0 if prec + rec == 0 else 2 * prec * rec / (prec + rec)
        total += f1 * np.sum(y_true == c)
    return total / len(y_true)


def _mmsa_mosei_reference(test_preds: np.ndarray, test_truth: np.ndarray) -> dict[str, float]:
    """MMSA __eval_mosei_regression, unrounded, F1 with the truth first."""
    non_zeros = np.array([i for i, e in enumerate(test_truth) if e != 0])
    nz_truth, nz_preds = test_truth[non_zeros] > 0, test_preds[non_zeros] > 0
    bt, bp = test_truth >= 0, test_preds >= 0

    def mult(b):
        return np.sum(np.round(np.clip(test_preds, -b, b)) == np.round(np.clip(test_truth, -b, b))) / len(test_truth)

    return {"acc2_has0": np.mean(bp == bt), "f1_has0": _weighted_f1_reference(bt, bp),
            "acc2_non0": np.mean(nz_preds == nz_truth), "f1_non0": _weighted_f1_reference(nz_truth, nz_preds),
            "acc5": mult(2.0), "acc7": mult(3.0), "mae": np.mean(np.abs(test_preds - test_truth)),
            "corr": np.corrcoef(test_preds, test_truth)[0][1]}


def _mmsa_sims_bins(v: np.ndarray, ms: list[float]) -> np.ndarray:
    out = v.copy()
    for i in range(len(ms) - 1):
        out[np.logical_and(v > ms[i], v <= ms[i + 1])] = i
    return out


def _random_rows(dataset: str, p: int = 5, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    scale = 1.0 if dataset == "sims" else 3.0
    labels = np.round(rng.uniform(-scale, scale, n) / 0.2) * 0.2  # multiples of 0.2, several zeros
    labels[:4] = 0.0
    preds = rng.normal(0, scale, (p, n))
    preds[1, :3] = [0.0, 0.1, -0.1]  # exact bin edges
    return preds, labels


def test_mosi_metrics_match_mmsa_reference():
    preds, labels = _random_rows("mosi")
    for row in preds:
        ours, ref = msa_metrics(row, labels), _mmsa_mosei_reference(row, labels)
        for k in METRIC_NAMES:
            assert ours[k] == pytest.approx(ref[k], rel=1e-12, abs=1e-15), k


def test_sims_acc_match_mmsa_reference():
    preds, labels = _random_rows("sims")
    yt = np.clip(labels, -1, 1)
    for row in preds:
        ours, yp = msa_metrics(row, labels, "sims"), np.clip(row, -1, 1)
        a2p, a2t = _mmsa_sims_bins(yp, [-1.01, 0.0, 1.01]), _mmsa_sims_bins(yt, [-1.01, 0.0, 1.01])
        assert ours["acc2_has0"] == pytest.approx(np.mean(a2p == a2t))
        assert ours["f1_has0"] == pytest.approx(_weighted_f1_reference(a2t, a2p))
        for key, ms in (("acc3", [-1.01, -0.1, 0.1, 1.01]), ("acc5", [-1.01, -0.7, -0.1, 0.1, 0.7, 1.01])):
            assert ours[key] == pytest.approx(np.mean(_mmsa_sims_bins(yp, ms) == _mmsa_sims_bins(yt, ms))), key
        assert ours["corr"] == pytest.approx(np.corrcoef(yp, yt)[0, 1], rel=1e-12)


@pytest.mark.parametrize("dataset", ["mosi", "sims"])
def test_grouped_equals_per_row(dataset):
    preds, labels = _random_rows(dataset)
    preds[2] = 0.3  # constant row: corr 0.0
    assert msa_metrics_grouped(preds, labels, dataset) == [msa_metrics(r, labels, dataset) for r in preds]
    per_row_labels = np.stack([labels, -labels, np.zeros_like(labels), labels[::-1], labels])
    grouped = msa_metrics_grouped(torch.from_numpy(preds), per_row_labels, dataset)
    expected = [msa_metrics(r, y, dataset) for r, y in zip(preds, per_row_labels)]
    assert len(grouped) == len(preds)
    for g, e in zip(grouped, expected):  # row 2 has all-zero labels: NaN non0 on both sides
        assert g.keys() == e.keys()
        assert all(g[k] == e[k] or (math.isnan(g[k]) and math.isnan(e[k])) for k in g)
    assert math.isnan(grouped[2]["f1_non0"]) and not math.isnan(grouped[0]["f1_non0"])


def test_grouped_rejects_bad_shapes_and_allows_no_rows():
    with pytest.raises(ValueError, match="patterns, samples"):
        msa_metrics_grouped(PREDS, LABELS)
    with pytest.raises(ValueError, match="labels must be"):
        msa_metrics_grouped(np.zeros((2, 6)), np.zeros(5))
    assert msa_metrics_grouped(np.zeros((0, 6)), LABELS) == []
