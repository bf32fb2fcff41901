from __future__ import annotations

from data_pipeline.missing import parse_pattern
from search.evaluate import PatternResult
from search.results import ResultsStore, flatten, result_rows


def _rows(trial, epoch, value, hparams):
    results = [PatternResult(parse_pattern(p), {"f1_non0": value, "mae": 1.0}) for p in ("intra:0.3", "inter:A+V")]
    return result_rows(experiment="e", trial_id=trial, model="lnln", epoch=epoch, split="valid", results=results,
                       wall_time_s=1.5, hparams=hparams)


def test_rows_follow_the_design_schema():
    row_intra, row_inter = _rows("t1", 0, 0.5, {"train.lr": 1e-3})
    assert row_intra["pattern"] == "intra:0.3" and row_intra["pattern_kind"] == "intra"
    assert row_intra["missing_rate"] == 0.3 and row_intra["dropped"] is None
    assert row_inter["pattern_kind"] == "inter" and row_inter["dropped"] == "A+V" and row_inter["missing_rate"] is None
    assert row_inter["hp.train.lr"] == 1e-3 and row_inter["f1_non0"] == 0.5


def test_rewriting_an_epoch_replaces_it_and_schemas_are_unified(tmp_path):
    store = ResultsStore(tmp_path / "results")
    store.write_epoch("t1", 0, _rows("t1", 0, 0.1, {"model.loss_weights.task": 1.0}))
    store.write_epoch("t1", 0, _rows("t1", 0, 0.2, {"model.loss_weights.task": 1.0}))  # e.g. after a resume
    store.write_epoch("t2", 0, _rows("t2", 0, 0.3, {"model.loss_weights.kd": 0.1}))
    df = store.read()
    assert len(df) == 4
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert sorted(df[df.trial_id == "t1"].f1_non0.unique()) == [0.2]
    assert {"hp.model.loss_weights.task", "hp.model.loss_weights.kd"} <= set(df.columns)
    assert not list(tmp_path.glob("results/.*")), "no temp files left"


def test_flatten_joins_nested_keys_and_lists():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": "1,2", "e": "x"}
