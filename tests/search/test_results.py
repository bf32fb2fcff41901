from __future__ import annotations

import pytest

from search.results import ResultsStore, RunInfo, flatten, result_rows


def _results(value):
    return {"valid": {p: {"f1_non0": value, "mae": 1.0} for p in ("intra:0.3", "inter:A+V")}}


def test_rows_follow_the_design_schema():
    run = RunInfo("e", "t1", "lnln", {"train.lr": 1e-3})
    row_intra, row_inter = result_rows(run, 0, _results(0.5), wall_time_s=1.5)
    assert row_intra["pattern"] == "intra:0.3" and row_intra["pattern_kind"] == "intra"
    assert row_intra["missing_rate"] == 0.3 and row_intra["dropped"] is None
    assert row_inter["pattern_kind"] == "inter" and row_inter["dropped"] == "A+V" and row_inter["missing_rate"] is None
    assert row_inter["hp.train.lr"] == 1e-3 and row_inter["f1_non0"] == 0.5
    assert (row_inter["experiment"], row_inter["trial_id"], row_inter["epoch"], row_inter["split"]) == ("e", "t1", 0, "valid")


def test_rewriting_an_epoch_replaces_it_and_schemas_are_unified(tmp_path):
    store = ResultsStore(tmp_path / "results")
    t1 = RunInfo("e", "t1", "lnln", {"model.loss_weights.task": 1.0})
    store.append(t1, 0, _results(0.1), 1.0)
    store.append(t1, 0, _results(0.2), 2.0)  # e.g. after a resume
    store.append(RunInfo("e", "t2", "hrlf", {"model.loss_weights.kd": 0.1}), 0, _results(0.3), 1.0)
    df = store.read()
    assert len(df) == 4
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert sorted(df[df.trial_id == "t1"].f1_non0.unique()) == [0.2]
    assert {"hp.model.loss_weights.task", "hp.model.loss_weights.kd"} <= set(df.columns)
    assert not list(tmp_path.glob("results/.*")), "no temp files left"


def test_flatten_joins_nested_keys_and_lists():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": "1,2", "e": "x"}


def test_a_deferred_split_joins_its_stored_epoch_whether_compacted_or_not(tmp_path):
    store = ResultsStore(tmp_path / "results")
    run = RunInfo("e", "t1", "lnln", {"train.lr": 1e-3, "model.name": "lnln"})
    for epoch in range(3):
        store.append(run, epoch, _results(0.1 * epoch), 10.0 + epoch)
    store.compact_trial("t1")
    test = {"test": {p: {"f1_non0": 0.9, "mae": 0.5} for p in ("intra:0.3", "inter:A+V")}}
    store.add_splits(run, 1, test)  # into the compacted file's epoch 1
    store.append(run, 3, _results(0.4), 13.0)
    store.add_splits(run, 3, test)  # into a part not yet compacted
    store.compact_trial("t1")
    df = store.read()
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    added = df[df.split == "test"]
    assert sorted(added.epoch.unique()) == [1, 3] and (added.f1_non0 == 0.9).all()
    # The stored rows are kept as they were; the new ones carry the epoch's report time and hparams.
    valid = df[df.split == "valid"].sort_values(["epoch", "pattern"])
    assert valid.f1_non0.round(6).tolist() == [0.0, 0.0, 0.1, 0.1, 0.2, 0.2, 0.4, 0.4]
    assert added.set_index("epoch").wall_time_s.to_dict() == {1: 11.0, 3: 13.0}
    assert (added["hp.model.name"] == "lnln").all() and (added["hp.train.lr"] == 1e-3).all()
    store.add_splits(run, 1, {"test": {p: {"f1_non0": 0.7, "mae": 0.5} for p in ("intra:0.3", "inter:A+V")}})
    again = store.read()
    assert (again[(again.split == "test") & (again.epoch == 1)].f1_non0 == 0.7).all(), "a split added again replaces"
    assert len(again) == len(df)
    store.add_splits(run, 0, {"valid": {"intra:0.3": {"f1_non0": 0.5, "mae": 1.0}}})  # every stored split replaced
    assert store.read().query("epoch == 0").f1_non0.tolist() == [0.5]
    with pytest.raises(KeyError, match="no rows of trial t1 epoch 7"):
        store.add_splits(run, 7, test)
