"""A locked or corrupt Optuna database: one clear error naming the file from status, export,
report and tune --resume (before Ray starts), and the results store stays intact and readable."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import ray

from search.config import load_config
from search.layout import Layout
from search.objective import OBJECTIVE
from search.results import ResultsStore, RunInfo
from search.study import StudyUnreadableError, load_study

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def experiment(tmp_path) -> Layout:
    """A finished-looking experiment: config, one trial's results, a study with one trial."""
    layout = Layout(tmp_path / "exp")
    layout.tune_state().mkdir(parents=True)
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={layout.root}", "train.epochs=1"])
    layout.config.write_text(cfg.to_yaml())
    metrics = {"f1_non0": 0.6, "acc2_non0": 0.6, "acc2_has0": 0.6, "f1_has0": 0.6, "acc5": 0.3, "acc7": 0.2,
               "mae": 1.0, "corr": 0.3}
    results = {split: {p: dict(metrics) for p in cfg.missing.eval_grid} for split in ("valid", "test")}
    ResultsStore(layout.results).append(RunInfo.of(layout.root.name, "t0", cfg), 0, results, 1.0)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        study = optuna.create_study(study_name=layout.study_name, storage=layout.optuna_storage,
                                    direction="maximize")
        study.enqueue_trial({})
        study.optimize(lambda trial: 0.5, n_trials=1)
        del study
    finally:  # Optuna's level is process-wide: later tests read Optuna's own lines
        optuna.logging.set_verbosity(verbosity)
    return layout


def corrupt(layout: Layout) -> None:
    data = bytearray(layout.optuna_db.read_bytes())
    data[:100] = b"\x00" * 100  # the SQLite header gone: "file is not a database"
    layout.optuna_db.write_bytes(bytes(data))


@pytest.fixture
def cli(msa_cli, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("Ray was started for an experiment whose study cannot be read")

    monkeypatch.setattr(ray, "init", never)
    return msa_cli


def test_a_readable_study_loads(experiment):
    assert len(load_study(experiment).trials) == 1


@pytest.mark.parametrize("command", [["status", "{exp}"], ["report", "{exp}"], ["tune", "--resume", "{exp}"]])
def test_a_corrupt_study_is_one_line_naming_the_file_and_the_results_stay(experiment, cli, command, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    corrupt(experiment)
    before = ResultsStore(experiment.results).read()
    code, out, err = cli(*(arg.format(exp=experiment.root) for arg in command))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code not in (0, None) and len(lines) == 1 and "Traceback" not in err, err
    assert str(experiment.optuna_db) in lines[0] and "cannot be read as an Optuna study" in lines[0]
    assert "stay readable" in lines[0]
    after = ResultsStore(experiment.results).read()
    assert len(after) == len(before) == 32 and after[OBJECTIVE if OBJECTIVE in after else "f1_non0"].notna().all()


def test_a_locked_study_says_so(experiment):
    holder = sqlite3.connect(experiment.optuna_db, timeout=0)
    holder.execute("BEGIN EXCLUSIVE")  # another process writing, as a running tune does
    try:
        with pytest.raises(StudyUnreadableError, match=r"optuna\.db: the Optuna database is locked by another process"):
            load_study(experiment)
    finally:
        holder.rollback()
        holder.close()
    assert len(load_study(experiment).trials) == 1, "readable again once the lock is gone"


def test_export_needs_no_study_and_works_from_the_results(experiment, cli, tmp_path):
    corrupt(experiment)
    code, out, err = cli("export", str(experiment.root), "--out", str(tmp_path / "best.yaml"))
    assert code in (0, None), err
    assert load_config(tmp_path / "best.yaml", stored=True).model.name == "lnln"
