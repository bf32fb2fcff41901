"""What the later stages assume of a dataset, checked by both readers (the MMSA pickle and the
Parquet store, which `data.path` may name directly) so that bad data is refused on reading,
with one DataValidationError naming the file, split and key, never deep inside a trial.

Each check names the stage that relies on it. Checks are vectorised (MOSEI: ~23k samples);
the finiteness scan is a chunked sum, with an exact scan only where the sum is not finite.
"""
from __future__ import annotations

import warnings

import numpy as np

from .errors import DataValidationError
from .presets import EVALUATED_SPLITS, MODALITIES
from .schema import SplitArrays

_CHUNK = 512  # samples per finiteness check: bounds the temporary memory on MOSEI-size files
INT32_MAX = np.iinfo(np.int32).max


def check_split(arrays: SplitArrays, *, file: str, split: str, keys: dict[str, str],
                label_range: tuple[float, float]) -> None:
    """The invariants of one split. `keys` maps a SplitArrays field to the name the file gives
    it where the two differ (e.g. labels -> regression_labels)."""
    def fail(field: str, expected: str, found: str) -> None:
        raise DataValidationError(file, split, keys.get(field, field), expected, found)

    n = len(arrays)
    if n == 0:  # models/metrics.py: no metric of zero samples
        fail("labels", "a non-empty split", "0 samples")
    _check_unique_ids(arrays.ids, lambda field, e, f: _warn(DataValidationError(file, split, keys.get(field, field),
                                                                                e, f)))
    check_finite(arrays.labels, lambda e, f: fail("labels", e, f))
    lo, hi = label_range
    if arrays.labels.min() < lo or arrays.labels.max() > hi:
        fail("labels", f"values within [{lo:g}, {hi:g}]",
             f"range [{arrays.labels.min():g}, {arrays.labels.max():g}]")
    if split in EVALUATED_SPLITS and not arrays.labels.any():
        # models/metrics.py: acc2_non0 and f1_non0 (robust_f1, the default objective) drop the
        # label-0 samples and are NaN when none is left.
        fail("labels", "at least one non-zero label (acc2_non0 and f1_non0 drop the zeros)",
             f"all {n} labels 0")
    for m in MODALITIES:
        # data_pipeline/missing.py: the valid mask is the prefix of each length, up to seq_len.
        lengths, seq_len = getattr(arrays, f"{m}_lengths"), getattr(arrays, m).shape[1]
        if lengths.min() < 0 or lengths.max() > seq_len:
            fail(f"{m}_lengths", f"lengths within [0, {seq_len}]", f"range [{lengths.min()}, {lengths.max()}]")
        check_finite(getattr(arrays, m), lambda e, f, m=m: fail(m, e, f))
    if arrays.text_bert is not None:
        _check_text_bert(arrays.text_bert, arrays.text_lengths, fail)


def _warn(problem: DataValidationError) -> None:
    """Id problems are warned about, not refused: nothing downstream breaks on them (a repeated
    id only repeats a mask), and a published dataset with a repeated id must stay usable."""
    warnings.warn(f"{problem}; the data is used as it is", DataWarning, stacklevel=3)


class DataWarning(UserWarning):
    """Data that works but is suspect (e.g. a sample in two splits)."""


def _check_unique_ids(ids: np.ndarray, fail) -> None:
    # data_pipeline/missing.py: masks are drawn from a hash of the sample id, so two samples under
    # one id share every mask; the id is also how a sample is told apart across splits.
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if same.size:
        rows = order[same[0]], order[same[0] + 1]
        fail("ids", "unique sample ids", f"id '{ids[rows[0]]}' in samples {min(rows)} and {max(rows)}")


def _check_text_bert(text_bert: np.ndarray, text_lengths: np.ndarray, fail) -> None:
    """(N, 3, L) ids / attention mask / token types, as BERT reads them (models/text_bert.py)."""
    ids, mask, types = text_bert[:, 0], text_bert[:, 1], text_bert[:, 2]
    if ids.min() < 0:  # an embedding lookup: a negative id fails inside the trial
        row = int(np.argwhere(ids < 0)[0][0])
        fail("text_bert", "token ids (row 0) >= 0", f"{int(ids.min())} in sample {row}")
    if not np.isin(mask, (0, 1)).all():
        fail("text_bert", "an attention mask (row 1) of 0/1", f"values {_some(np.setdiff1d(mask, (0, 1)))}")
    # The loader's valid mask is the prefix mask of the text lengths (their sums), and the
    # encoders cut each group of rows at its longest length (models/layers.py): a mask with
    # holes or leading zeros would attend other positions than the ones kept and dropped.
    holes = np.flatnonzero((mask[:, 1:] > mask[:, :-1]).any(axis=1))
    if holes.size:
        fail("text_bert", "an attention mask (row 1) of ones then zeros (a prefix)",
             f"a 0 before a 1 in sample {int(holes[0])}")
    if not np.isin(types, (0, 1)).all():  # BERT has two token types (type_vocab_size 2)
        fail("text_bert", "token types (row 2) of 0/1", f"values {_some(np.setdiff1d(types, (0, 1)))}")
    differ = np.flatnonzero(mask.sum(axis=1) != text_lengths)
    if differ.size:  # the store keeps both: the loader reads the lengths, BERT the mask
        row = int(differ[0])
        fail("text_lengths", "text lengths equal to the sums of text_bert's attention mask",
             f"{int(text_lengths[row])} against {int(mask[row].sum())} in sample {row}")


def check_disjoint_ids(ids: dict[str, np.ndarray], file: str) -> None:
    """Warns of a sample in two splits: one in train and test leaks into the test scores."""
    seen: list[tuple[str, np.ndarray]] = []
    for split, values in ids.items():
        for other, earlier in seen:
            shared = np.intersect1d(values, earlier)
            if shared.size:
                _warn(DataValidationError(file, split, "id", f"ids not in split '{other}' (a sample in both leaks)",
                                          f"{shared.size} shared, e.g. '{shared[0]}'"))
        seen.append((split, values))


def check_finite(arr: np.ndarray, fail) -> None:
    """`fail(expected, found)` at the first NaN/Inf of `arr` (float arrays only)."""
    if arr.dtype.kind != "f":
        return
    for start in range(0, arr.shape[0], _CHUNK):
        chunk = arr[start:start + _CHUNK]
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(chunk.sum()):  # one pass without a temporary mask: ~3x faster
                continue
        bad = np.argwhere(~np.isfinite(chunk))
        if bad.size:  # else the sum of finite values only overflowed
            index = (int(bad[0][0]) + start, *(int(i) for i in bad[0][1:]))
            fail("finite values (no NaN/Inf)", f"{chunk[tuple(bad[0])]} at index {index}")


def _some(values: np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (", ..." if values.size > limit else "")
