"""Compaction of the results store (search/results.py): a finished trial's parts merged into one
file, with a part winning over it for its epoch, and no row lost or doubled by a crash."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from data_pipeline.atomic import OutputWriteError
from search import results
from search.results import KEY_COLUMNS, ResultsStore, RunInfo, compact_finished_trial

LNLN = RunInfo("e", "t1", "lnln", {"model.loss_weights.task": 1.0, "train.lr": 1e-3})
HRLF = RunInfo("e", "t2", "hrlf", {"model.loss_weights.kd": 0.1, "model.hrlf.mi_estimator": "infonce"})


def _results(value: float) -> dict:
    return {split: {p: {"f1_non0": value, "mae": 1.0 - value} for p in ("intra:0.3", "inter:A+V")}
            for split in ("valid", "test")}


def _filled(store: ResultsStore, run: RunInfo = LNLN, epochs: int = 3, offset: float = 0.0) -> None:
    for epoch in range(epochs):
        store.append(run, epoch, _results(offset + epoch / 10), wall_time_s=float(epoch))


def _rows(store: ResultsStore) -> pd.DataFrame:
    """The store's rows, by key, with plain values: comparable across reads."""
    df = store.read()
    assert not df.duplicated(list(KEY_COLUMNS)).any(), "a key twice"
    return df.astype({c: object for c in df.columns if isinstance(df[c].dtype, pd.CategoricalDtype)}) \
        .sort_values(list(KEY_COLUMNS)).reset_index(drop=True)


def _files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_compaction_keeps_every_row_and_leaves_one_file_per_trial(tmp_path):
    store = ResultsStore(tmp_path)
    _filled(store, LNLN)
    _filled(store, HRLF, epochs=2)
    before = _rows(store)
    assert store.compact_trial("t1") == 3
    assert _files(tmp_path) == ["part-t2-epoch00000.parquet", "part-t2-epoch00001.parquet", "trial-t1.parquet"]
    pd.testing.assert_frame_equal(_rows(store), before)
    assert store.compact_trial("t1") == 0, "nothing left to compact"
    assert len(before) == 5 * 2 * 2


def test_a_part_written_after_compaction_replaces_that_epochs_rows(tmp_path):
    store = ResultsStore(tmp_path)
    _filled(store)
    store.compact_trial("t1")
    store.append(LNLN, 1, _results(0.9), wall_time_s=9.0)  # a resume, or PBT, repeats epoch 1
    store.append(LNLN, 3, _results(0.8), wall_time_s=9.0)  # and goes on
    df = _rows(store)
    assert len(df) == 4 * 2 * 2
    assert df.groupby("epoch").f1_non0.unique().map(list).to_dict() == {0: [0.0], 1: [0.9], 2: [0.2], 3: [0.8]}
    assert list(store.read().epoch.drop_duplicates()) == [0, 1, 2, 3], "a trial's epochs in order"
    store.compact_trial("t1")
    assert _files(tmp_path) == ["trial-t1.parquet"]
    pd.testing.assert_frame_equal(_rows(store), df)


class _DeletesFailAfter:
    """A pyarrow filesystem whose deletes fail after `n`: a compaction cut short there."""

    def __init__(self, fs, n: int):
        self._fs, self._left = fs, n

    def delete_file(self, path):
        if self._left == 0:
            raise OSError("the driver died here")
        self._left -= 1
        self._fs.delete_file(path)

    def __getattr__(self, name):
        return getattr(self._fs, name)


@pytest.mark.parametrize("deleted", [0, 1])
def test_a_crash_after_the_compacted_write_loses_and_doubles_nothing(tmp_path, deleted):
    store = ResultsStore(tmp_path)
    _filled(store, epochs=4)
    store.compact_trial("t1")
    store.append(LNLN, 2, _results(0.7), wall_time_s=9.0)  # reported after the first compaction
    store.append(LNLN, 4, _results(0.6), wall_time_s=9.0)
    before = _rows(store)
    store.fs = _DeletesFailAfter(store.fs, deleted)
    with pytest.raises(OSError, match="died"):
        store.compact_trial("t1")
    after_crash = ResultsStore(tmp_path)
    assert len([f for f in _files(tmp_path) if f.startswith("part-")]) == 2 - deleted
    pd.testing.assert_frame_equal(_rows(after_crash), before)
    after_crash.compact_trial("t1")  # the next compaction finishes the job
    assert _files(tmp_path) == ["trial-t1.parquet"]
    pd.testing.assert_frame_equal(_rows(after_crash), before)


def test_a_compaction_that_fails_while_writing_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    _filled(store, epochs=2)
    store.compact_trial("t1")
    store.append(LNLN, 2, _results(0.5), wall_time_s=9.0)
    before, files = _rows(store), _files(tmp_path)
    real_write = results.pq.write_table

    def disk_full_half_way(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.pq, "write_table", disk_full_half_way)
    with pytest.raises(OutputWriteError, match="no space left on device"):
        store.compact_trial("t1")
    monkeypatch.undo()
    assert _files(tmp_path) == files, "the compacted file replaced whole or not at all, no temporary left"
    pd.testing.assert_frame_equal(_rows(store), before)


def test_a_failed_compaction_at_a_trials_end_is_logged_not_raised(tmp_path, monkeypatch, caplog):
    _filled(ResultsStore(tmp_path))

    def fails(self, trial_id):
        raise OSError("read-only file system")

    monkeypatch.setattr(ResultsStore, "compact_trial", fails)
    with caplog.at_level(logging.WARNING, logger=results.__name__):
        compact_finished_trial(tmp_path, "t1")
    assert "results of t1 stay in parts" in caplog.text and "read-only" in caplog.text
    assert len(ResultsStore(tmp_path).read()) == 3 * 2 * 2


def test_remove_trials_except_removes_compacted_trials_too(tmp_path):
    store = ResultsStore(tmp_path)
    _filled(store, LNLN)
    _filled(store, HRLF)
    store.compact_trial("t1")
    store.compact_trial("t2")
    store.append(HRLF, 3, _results(0.5), wall_time_s=9.0)
    assert store.remove_trials_except(["t1"]) == 2
    assert _files(tmp_path) == ["trial-t1.parquet"]
    assert set(store.read().trial_id) == {"t1"}


def test_a_resumed_search_compacts_trials_that_ended_before_the_crash(tmp_path):
    """The driver died between a trial's last report and its compaction: the next driver, on
    its first step, compacts every trial Tune restored as ended and leaves a running one's parts."""
    from types import SimpleNamespace

    from ray.tune.experiment import Trial

    from search.callbacks import TuneResultsCallback
    from search.config import ExperimentConfig

    exp = tmp_path / "exp"
    store = ResultsStore(exp / "results")
    _filled(store, LNLN)
    _filled(store, HRLF)
    _filled(store, RunInfo("e", "t3", "lnln", {}))
    callback = TuneResultsCallback(exp, ExperimentConfig())
    callback.setup()
    restored = [SimpleNamespace(trial_id="t1", status=Trial.TERMINATED),
                SimpleNamespace(trial_id="t2", status=Trial.ERROR),
                SimpleNamespace(trial_id="t3", status=Trial.RUNNING)]
    callback.on_step_begin(0, restored)
    assert _files(exp / "results") == [*(f"part-t3-epoch0000{e}.parquet" for e in range(3)),
                                       "trial-t1.parquet", "trial-t2.parquet"]
    assert len(store.read()) == 3 * 3 * 2 * 2


def test_two_models_hyperparameter_columns_unify_across_compacted_files_and_parts(tmp_path):
    store = ResultsStore(tmp_path)
    _filled(store, LNLN)
    _filled(store, HRLF, epochs=2)
    store.compact_trial("t1")
    # A third trial whose one hp value is None: a column of nulls in its part.
    store.append(RunInfo("e", "t3", "hrlf", {"model.hrlf.mi_estimator": None}), 0, _results(0.5), 1.0)
    df = store.read()
    assert {"hp.model.loss_weights.task", "hp.train.lr", "hp.model.loss_weights.kd"} <= set(df.columns)
    missing = df.groupby("trial_id")[["hp.train.lr", "hp.model.hrlf.mi_estimator"]].agg(lambda c: c.isna().all())
    assert missing.to_dict("index") == {"t1": {"hp.train.lr": False, "hp.model.hrlf.mi_estimator": True},
                                        "t2": {"hp.train.lr": True, "hp.model.hrlf.mi_estimator": False},
                                        "t3": {"hp.train.lr": True, "hp.model.hrlf.mi_estimator": True}}
    assert df[df.trial_id == "t1"]["hp.train.lr"].eq(1e-3).all()
    assert df[df.trial_id == "t2"]["hp.model.hrlf.mi_estimator"].eq("infonce").all()


def test_string_columns_read_as_categoricals_that_sort_and_compare_as_strings(tmp_path):
    store = ResultsStore(tmp_path)
    _filled(store, RunInfo("e", "b", "lnln", {}), epochs=1)
    store.compact_trial("b")
    _filled(store, RunInfo("e", "a", "lnln", {}), epochs=1)
    df = store.read()
    assert isinstance(df.trial_id.dtype, pd.CategoricalDtype)
    assert list(df.sort_values(["trial_id", "split", "pattern"]).trial_id.drop_duplicates()) == ["a", "b"]
    assert list(df.groupby("split").size().index) == ["test", "valid"]
    assert len(df[df.split == "valid"]) == 4 and df.sort_values("pattern").pattern.iloc[0] == "inter:A+V"
    assert df.trial_id.astype(str).map({"a": 0, "b": 1}).tolist() == [int(t == "b") for t in df.trial_id]


def test_a_read_lists_again_when_a_listed_part_was_compacted_meanwhile(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    _filled(store)
    before = _rows(store)
    stale = store._listing()  # what a `status --watch` listed just before the driver compacted
    store.compact_trial("t1")
    listings = iter([stale])
    real_listing = ResultsStore._listing
    monkeypatch.setattr(ResultsStore, "_listing", lambda self: next(listings, None) or real_listing(self))
    pd.testing.assert_frame_equal(_rows(store), before)


@pytest.mark.parametrize("in_place", [False, True])
def test_a_store_on_a_file_uri_compacts_and_reads_back(tmp_path, in_place):
    store = ResultsStore(f"file://{tmp_path}/results")
    # in_place: written as on an object store (s3://, gs://), where a file is written in place.
    store.local = not in_place
    _filled(store)
    _filled(store, HRLF, epochs=1)
    before = _rows(store)
    assert store.compact_trial("t1") == 3
    assert _files(tmp_path / "results") == ["part-t2-epoch00000.parquet", "trial-t1.parquet"]
    pd.testing.assert_frame_equal(_rows(ResultsStore(f"file://{tmp_path}/results")), before)
    assert store.remove_trials_except(["t2"]) == 1 and set(store.read().trial_id) == {"t2"}


def test_a_trials_parts_read_in_epoch_order(tmp_path):
    store = ResultsStore(tmp_path)
    for epoch in (3, 0, 12, 7, 1):
        store.append(LNLN, epoch, _results(epoch / 100), wall_time_s=float(epoch))
    assert list(store.read().epoch.drop_duplicates()) == [0, 1, 3, 7, 12]


def test_a_read_without_hyperparameters_has_the_same_rows_less_the_hp_columns(tmp_path):
    store = ResultsStore(tmp_path)
    _filled(store, LNLN)
    _filled(store, HRLF, epochs=2)
    store.compact_trial("t1")
    full, lean = store.read(), store.read(hparams=False)
    assert not [c for c in lean.columns if c.startswith("hp.")]
    pd.testing.assert_frame_equal(lean, full[[c for c in full.columns if not c.startswith("hp.")]])
