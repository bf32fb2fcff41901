"""A Tune trial's parameters file (trial_params/<id>.json): what export, status and the report
build its config from, so it must hold the values the trial trains with, PBT's included."""
from __future__ import annotations

import json

from ray.tune.experiment import Trial

from search.callbacks import TuneResultsCallback
from search.config import ExperimentConfig
from search.layout import Layout
from search.results import ResultsStore

KEY = "model.loss_weights.completeness"


def _result(epoch: int, config: dict | None = None) -> dict:
    """A trial's report; `config`: the values it trained with, as Tune's trainable adds them."""
    rows = {split: {"intra:0.0": {"f1_non0": 0.5, "mae": 0.5}} for split in ("valid", "test")}
    return {"epoch": epoch, "rows": json.dumps(rows), **({"config": config} if config is not None else {})}


def _callback(exp) -> TuneResultsCallback:
    callback = TuneResultsCallback(exp, ExperimentConfig())
    callback.setup()
    return callback


def test_a_trial_given_new_values_by_pbt_has_them_in_its_params_file(tmp_path):
    exp = tmp_path / "exp"
    callback = _callback(exp)
    trial = Trial("__fake", config={KEY: 1.0}, trial_id="t1", stub=True)
    params = Layout(exp).trial_params("t1")
    callback.on_trial_result(0, [trial], trial, _result(0))
    assert json.loads(params.read_text()) == {KEY: 1.0}
    written = params.stat().st_ino
    callback.on_trial_result(1, [trial], trial, _result(1))
    assert params.stat().st_ino == written, "unchanged values: the file is not written again"
    trial.set_config({KEY: 0.8})  # as PBT's exploit does
    callback.on_trial_result(2, [trial], trial, _result(2))
    assert json.loads(params.read_text()) == {KEY: 0.8}
    df = ResultsStore(exp / "results").read()
    assert list(df[df.split == "valid"].sort_values("epoch")[f"hp.{KEY}"]) == [1.0, 1.0, 0.8]


def test_the_epoch_pbt_exploits_on_keeps_the_values_it_trained_with(tmp_path):
    """Tune runs the scheduler before the callbacks: when PBT exploits on an epoch's result the
    trial already holds its next values. That epoch's rows and the params file keep the values
    it was trained with (the report's config); the next epoch's carry PBT's."""
    exp = tmp_path / "exp"
    callback = _callback(exp)
    trial = Trial("__fake", config={KEY: 1.0}, trial_id="t1", stub=True)
    params = Layout(exp).trial_params("t1")
    callback.on_trial_result(0, [trial], trial, _result(0, {KEY: 1.0}))
    trial.set_config({KEY: 0.8})  # PBT's exploit, decided on epoch 1's result, before the callbacks
    callback.on_trial_result(1, [trial], trial, _result(1, {KEY: 1.0}))
    assert json.loads(params.read_text()) == {KEY: 1.0}, "epoch 1 trained with 1.0"
    callback.on_trial_result(2, [trial], trial, _result(2, {KEY: 0.8}))
    assert json.loads(params.read_text()) == {KEY: 0.8}
    df = ResultsStore(exp / "results").read()
    assert list(df[df.split == "valid"].sort_values("epoch")[f"hp.{KEY}"]) == [1.0, 1.0, 0.8]


def test_a_later_driver_compares_with_the_file_an_earlier_one_wrote(tmp_path):
    exp = tmp_path / "exp"
    trial = Trial("__fake", config={KEY: 1.0}, trial_id="t1", stub=True)
    _callback(exp).on_trial_result(0, [trial], trial, _result(0))
    params = Layout(exp).trial_params("t1")
    written = params.stat().st_ino
    resumed = _callback(exp)
    resumed.on_trial_result(1, [trial], trial, _result(1))
    assert params.stat().st_ino == written
    trial.set_config({KEY: 0.5})
    resumed.on_trial_result(2, [trial], trial, _result(2))
    assert json.loads(params.read_text()) == {KEY: 0.5}
