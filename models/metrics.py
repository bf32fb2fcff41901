"""MSA regression metrics, defined as MMSA's `MetricsTop` (MMSA/utils/metricsTop.py).

`__eval_mosei_regression` (used for MOSI and MOSEI) and `__eval_sims_regression` are reproduced
with numpy only (no sklearn), vectorized over samples and over pattern rows, in float64.
Deliberate differences from MMSA:
- weighted F1 takes the TRUE labels first, as sklearn's `f1_score(y_true, y_pred)` expects
  (some MMSA versions pass them swapped, which changes the weights);
- values are not rounded to 4 decimals;
- `corr` is 0.0, not NaN, when preds or labels are constant (np.corrcoef would give NaN);
- `acc2_non0`/`f1_non0` are NaN when every label is 0 (MMSA crashes on the empty index);
- a row with any non-finite prediction or label gets NaN for every metric, so a diverged model
  can never be selected on a metric that happened to look fine;
- SIMS also reports `acc2_non0`, `f1_non0` and `acc7` (MMSA reports acc2/3/5, F1, MAE, Corr).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

METRIC_NAMES: tuple[str, ...] = ("acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr")
SIMS_METRIC_NAMES: tuple[str, ...] = (
    "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc3", "acc5", "acc7", "mae", "corr")

# MMSA's SIMS bins: sample v is in class i when ms[i] < v <= ms[i + 1] (left-open, right-closed).
_SIMS_MS_3 = np.array([-1.01, -0.1, 0.1, 1.01])
_SIMS_MS_5 = np.array([-1.01, -0.7, -0.1, 0.1, 0.7, 1.01])


def _family(dataset: str) -> str:
    name = dataset.lower()
    if name.startswith("sims"):
        return "sims"
    if name.startswith(("mosi", "mosei")):
        return "mosi"  # MMSA: __eval_mosi_regression is __eval_mosei_regression
    raise ValueError(f"unknown dataset {dataset!r} for MSA metrics: expected mosi, mosei or sims")


def metric_names(dataset: str) -> tuple[str, ...]:
    """The keys `msa_metrics` returns for `dataset` (always the same set for a dataset)."""
    return SIMS_METRIC_NAMES if _family(dataset) == "sims" else METRIC_NAMES


def _as_float64(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        # .double() before .numpy(): bfloat16 tensors have no numpy dtype; exact for other floats.
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _class_f1(tp: np.ndarray, support: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    # sklearn's per-class F1 = 2tp / (2tp + fp + fn) = 2tp / (support + predicted); 0 when tp == 0.
    denom = support + predicted
    return np.divide(2.0 * tp, denom, out=np.zeros(tp.shape), where=denom > 0)


def _binary_scores(truth: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy and weighted F1 per row of boolean (P, N) arrays, over the samples in `mask`.

    Weighted F1 as sklearn's f1_score(truth, pred, average='weighted'): per-class F1 weighted by
    TRUE support, so a class present only in `pred` counts with weight 0. NaN for an empty row.
    """
    n = mask.sum(1)
    pos = (truth & mask).sum(1)
    neg = n - pos
    pred_pos = (pred & mask).sum(1)
    tp_pos = (truth & pred & mask).sum(1)
    tp_neg = (~truth & ~pred & mask).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        acc = (tp_pos + tp_neg) / n
        f1 = (pos * _class_f1(tp_pos, pos, pred_pos) + neg * _class_f1(tp_neg, neg, n - pred_pos)) / n
    return acc, f1


def _rounded_acc(x: np.ndarray, y: np.ndarray, bound: float) -> np.ndarray:
    # MMSA __multiclass_acc on clipped values; np.round rounds half to even (2.5 -> 2), as MMSA.
    return (np.round(np.clip(x, -bound, bound)) == np.round(np.clip(y, -bound, bound))).mean(1)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xm = x - x.mean(1, keepdims=True)
    ym = y - y.mean(1, keepdims=True)
    # max == min, not var == 0: the mean of a constant row is not always exact in floating point.
    constant = (x.max(1) == x.min(1)) | (y.max(1) == y.min(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (xm * ym).sum(1) / (np.sqrt((xm * xm).sum(1)) * np.sqrt((ym * ym).sum(1)))
    return np.where(constant, 0.0, np.clip(r, -1.0, 1.0))  # np.corrcoef clips to [-1, 1] as well


def _mosi_columns(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    # MMSA __eval_mosei_regression: has0 is (>= 0) vs (< 0), so label 0 counts as positive;
    # non0 drops label-0 samples and binarizes both sides with > 0.
    acc2_has0, f1_has0 = _binary_scores(y >= 0, x >= 0, np.ones(x.shape, dtype=bool))
    acc2_non0, f1_non0 = _binary_scores(y > 0, x > 0, y != 0)
    return {"acc2_has0": acc2_has0, "f1_has0": f1_has0, "acc2_non0": acc2_non0, "f1_non0": f1_non0,
            "acc5": _rounded_acc(x, y, 2.0), "acc7": _rounded_acc(x, y, 3.0),
            "mae": np.abs(x - y).mean(1), "corr": _pearson(x, y)}


def _sims_bins(v: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # side="left" gives j with edges[j-1] < v <= edges[j]: MMSA's (ms[i], ms[i+1]] with i = j - 1.
    return np.searchsorted(edges, v, side="left") - 1


def _sims_columns(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    # MMSA __eval_sims_regression clips both sides to [-1, 1] first; MAE and Corr then use the
    # clipped values too (unlike MOSI).
    x, y = np.clip(x, -1.0, 1.0), np.clip(y, -1.0, 1.0)
    # ms_2 = [-1.01, 0.0, 1.01]: class 1 iff v > 0, so here label 0 joins the NEGATIVE class
    # (the opposite of MOSI's has0). F1 is on this 2-class version, as MMSA's F1_score.
    acc2_has0, f1_has0 = _binary_scores(y > 0, x > 0, np.ones(x.shape, dtype=bool))
    # Not in MMSA for SIMS: the same binarization with label-0 samples dropped, as for MOSI.
    acc2_non0, f1_non0 = _binary_scores(y > 0, x > 0, y != 0)
    return {"acc2_has0": acc2_has0, "f1_has0": f1_has0, "acc2_non0": acc2_non0, "f1_non0": f1_non0,
            "acc3": (_sims_bins(x, _SIMS_MS_3) == _sims_bins(y, _SIMS_MS_3)).mean(1),
            "acc5": (_sims_bins(x, _SIMS_MS_5) == _sims_bins(y, _SIMS_MS_5)).mean(1),
            # Not in MMSA for SIMS: Acc-7 as for MOSI after mapping [-1, 1] onto [-3, 3] (x3), the
            # same rescaling the data inspector's Acc-7 histogram uses, so the bins are comparable.
            "acc7": _rounded_acc(3.0 * x, 3.0 * y, 3.0),
            "mae": np.abs(x - y).mean(1), "corr": _pearson(x, y)}


def msa_metrics_grouped(preds: Any, labels: Any, dataset: str = "mosi") -> list[dict[str, float]]:
    """Metrics for each of P prediction rows at once: preds (P, N), labels (N,) or (P, N).

    Row i equals `msa_metrics(preds[i], labels or labels[i], dataset)`. P == 0 gives [].
    """
    family = _family(dataset)
    x = _as_float64(preds)
    y = _as_float64(labels)
    if x.ndim != 2:
        raise ValueError(f"preds must be (patterns, samples), got shape {x.shape}")
    if y.shape not in (x.shape[1:], x.shape):
        raise ValueError(f"labels must be ({x.shape[1]},) or {x.shape} to match preds, got shape {y.shape}")
    if x.shape[1] == 0:
        raise ValueError("cannot compute MSA metrics on zero samples")
    y = np.broadcast_to(y, x.shape)
    columns = _sims_columns(x, y) if family == "sims" else _mosi_columns(x, y)
    broken = ~(np.isfinite(x).all(1) & np.isfinite(y).all(1))
    names = metric_names(family)
    return [{k: math.nan if broken[i] else float(columns[k][i]) for k in names} for i in range(x.shape[0])]


def msa_metrics(preds: Any, labels: Any, dataset: str = "mosi") -> dict[str, float]:
    """MMSA's regression metrics for one set of predictions (numpy arrays or torch tensors).

    Both inputs are flattened first, as MMSA's `.view(-1)`. Raises ValueError on empty input or
    on a size mismatch. Keys: `metric_names(dataset)`; values are Python floats.
    """
    x = _as_float64(preds).reshape(-1)
    y = _as_float64(labels).reshape(-1)
    if x.size != y.size:
        raise ValueError(f"preds and labels differ in size: {x.size} vs {y.size}")
    return msa_metrics_grouped(x[None, :], y, dataset)[0]


def _metric_by_pattern(by_pattern: Mapping[Any, Mapping[str, float]], patterns: Iterable[Any] | None,
                       metric: str) -> np.ndarray:
    table = {str(k): v for k, v in by_pattern.items()}
    if isinstance(patterns, str):
        patterns = [patterns]
    wanted = list(table) if patterns is None else [str(p) for p in patterns]
    missing = [p for p in wanted if p not in table]
    if missing:
        raise KeyError(f"no metrics for pattern(s) {', '.join(missing)}; evaluated: {', '.join(table) or 'none'}")
    if not wanted:
        raise ValueError("no patterns to aggregate")
    return np.array([float(table[p][metric]) for p in wanted], dtype=np.float64)


def robust_f1(by_pattern: Mapping[Any, Mapping[str, float]], patterns: Iterable[Any] | None = None, *,
              metric: str = "f1_non0") -> float:
    """Mean of `metric` over `patterns` (all evaluated patterns when None) of a
    {pattern name: metrics} mapping. KeyError names a requested pattern that was not
    evaluated. NaN is propagated, never skipped: a NaN metric means a broken evaluation and
    must not be averaged away.
    """
    return float(np.mean(_metric_by_pattern(by_pattern, patterns, metric)))


def worst_f1(by_pattern: Mapping[Any, Mapping[str, float]], patterns: Iterable[Any] | None = None, *,
             metric: str = "f1_non0") -> float:
    """Minimum of `metric` over `patterns`; same inputs, errors and NaN rule as `robust_f1`."""
    return float(np.min(_metric_by_pattern(by_pattern, patterns, metric)))  # np.min propagates NaN
