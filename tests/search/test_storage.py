"""`output.storage` and `search.storage` (search/storage.py): an experiment whose results, Ray
state and checkpoints live in shared storage (here a directory outside the experiment directory,
named by a file:// URI, the way an NFS mount or a bucket would be) and whose Optuna study lives
in a database elsewhere; `status`, `export` and `report` read them from there. Bad settings are
one line before Ray starts, and never show a password."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import ray

from search.config import ConfigError, load_config
from search.layout import Layout
from search.results import ResultsStore
from small_grid import EVAL_GRID, EVAL_GRID_SETTING

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "configs" / "lnln_quick.yaml"
TINY = [EVAL_GRID_SETTING, "data.scale=0.1", "train.epochs=2", "train.batch_size=32", "model.hidden_dim=32", "model.dim_head=16",
        "model.num_heads=4", "model.lnln.tokens=4", "train.device=cpu", "search.max_concurrent=2",
        "search.scheduler=none", "train.threads=1", "search.num_samples=2", "output.live_metrics=false"]


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.parametrize("key, value, expected", [
    ("output.storage", "ftp://host/x", "unknown filesystem 'ftp://'"),
    ("output.storage", "s3://", "no bucket or path after 's3://'"),
    ("search.storage", "sqlite:///relative.db", "a relative SQLite path depends on where the driver starts"),
    ("search.storage", "not a url", "not an SQLAlchemy database URL"),
])
def test_malformed_storage_settings_are_refused_when_read(key, value, expected):
    with pytest.raises(ConfigError, match=f"config key '{key}': {expected}"):
        load_config(QUICK, [f"{key}={value}"])


def test_a_password_in_the_study_url_is_refused_without_showing_it():
    url = "postgresql://msa:hunter2@db.internal/optuna"  # pragma: allowlist secret
    with pytest.raises(ConfigError) as refused:
        load_config(QUICK, [f"search.storage={url}"])
    assert "the URL holds a password" in str(refused.value) and "~/.pgpass" in str(refused.value)
    assert "hunter2" not in str(refused.value)
    assert "postgresql://msa:***@db.internal/optuna" in str(refused.value)  # pragma: allowlist secret


def test_a_local_storage_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(QUICK, ["output.storage=shared/"]).output.storage == str(tmp_path / "shared")


@pytest.fixture(scope="module")
def stored(tmp_path_factory, local_ray):
    """One tiny search with its files in 'shared storage' and its study in another database."""
    from search.config import load_config as load
    from search.tune import run_experiment

    base = tmp_path_factory.mktemp("storage")
    shared, exp, db = base / "shared", base / "exp", base / "db" / "studies.db"
    db.parent.mkdir()
    cfg = load(QUICK, [*TINY, f"output.dir={exp}", f"output.storage=file://{shared}",
                       f"search.storage=sqlite:///{db}"])
    outcome = run_experiment(cfg)
    assert dict(outcome.trials) == {"completed": 2}
    return base, shared, exp, db


def test_results_state_and_study_live_in_their_storage(stored):
    base, shared, exp, db = stored
    root = shared / exp.name  # <output.storage>/<experiment name>
    df = ResultsStore(root / "results").read()
    assert df.trial_id.nunique() == 2 and not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert (root / "ray" / "tune").is_dir(), "Ray Tune's experiment state and checkpoints"
    assert list((root / "ray" / "tune").glob("*/checkpoint_*")), "the trials' checkpoints"
    # The experiment directory keeps the driver's small files only.
    assert not (exp / "results").exists() and not (exp / "ray").exists() and not (exp / "optuna.db").exists()
    assert (exp / "config.yaml").is_file() and (exp / "space.json").is_file()
    study = optuna.load_study(study_name=Layout(exp).study_name, storage=f"sqlite:///{db}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 2
    layout = Layout(exp).with_config(load_config(exp / "config.yaml"))
    assert layout.results == f"file://{root}/results"
    # What `tune` names at its end: where each part went.
    assert layout.summary() == f"config.yaml, study: sqlite:///{db}, results: file://{root}/results, " \
                               f"ray: file://{root}/ray"


def test_an_experiment_names_a_study_only_where_it_has_one(tmp_path):
    layout = Layout(tmp_path)
    assert layout.summary() == "config.yaml, results/, ray/", "a PBT search samples without Optuna"
    layout.optuna_db.touch()
    assert layout.summary() == "config.yaml, optuna.db, results/, ray/"


def test_status_export_and_report_read_from_the_storage(stored, msa_cli, tmp_path):
    base, shared, exp, db = stored
    code, out, err = msa_cli("status", str(exp))
    assert code == 0, err
    assert "complete" in out.lower() and "2" in out
    code, out, err = msa_cli("export", str(exp), "--out", str(tmp_path / "best.yaml"))
    assert code == 0, err
    best = load_config(tmp_path / "best.yaml")
    assert best.output.storage == f"file://{shared}" and best.search.storage == f"sqlite:///{db}"
    code, out, err = msa_cli("report", str(exp), "--out", str(tmp_path / "report.html"))
    assert code == 0, err
    html = (tmp_path / "report.html").read_text()
    assert "no Optuna study" not in html and len(html) > 10_000


def test_a_second_experiment_of_the_same_name_in_that_storage_is_refused_before_ray(stored, msa_cli, monkeypatch):
    base, shared, exp, db = stored
    again = base / "elsewhere" / exp.name  # a new directory, the same name in the shared storage
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a refused experiment"))
    code, out, err = msa_cli("tune", "--config", str(QUICK), *sets(*TINY, f"output.dir={again}",
                                                                   f"output.storage=file://{shared}"))
    assert code == 1 and not again.exists()
    assert err.strip().splitlines()[-1] == (
        f"error: output.storage: file://{shared}/{exp.name} holds files already (from an earlier run of the same "
        f"name?); choose another output.dir name, or continue it with: msa-search tune --resume {again}")
    code, out, err = msa_cli("tune", "--config", str(QUICK), *sets(*TINY, f"output.dir={again}",
                                                                   f"search.storage=sqlite:///{db}"))
    assert code == 1 and not again.exists()
    assert f"search.storage: {f'sqlite:///{db}'} holds a study 'msa-search-{exp.name}' already" in err


@pytest.mark.parametrize("setting, expected", [
    # A path under a regular file: no directory can be made there (what a read-only or
    # missing mount gives), whoever runs the test.
    ("output.storage={blocker}/shared", "output.storage: cannot write to {blocker}/shared/exp"),
    ("search.storage=postgresql://127.0.0.1:9/optuna", "search.storage: the database driver is not installed"),
])
def test_unreachable_storage_is_one_line_before_anything_is_written(tmp_path, msa_cli, monkeypatch, setting,
                                                                    expected):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    exp = tmp_path / "exp"
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started for a refused experiment"))
    code, out, err = msa_cli("tune", "--config", str(QUICK),
                             *sets(*TINY, f"output.dir={exp}", setting.format(blocker=blocker)))
    assert code == 1 and not exp.exists()
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("error: " + expected.format(blocker=blocker)), err


def test_an_in_process_run_keeps_its_results_in_the_storage_and_its_checkpoint_here(tmp_path, msa_cli):
    run, shared = tmp_path / "run", tmp_path / "shared"
    code, out, err = msa_cli("train", "--config", str(QUICK),
                             *sets(*TINY[:-4], "train.workers=0", f"output.dir={run}", f"output.storage={shared}"))
    assert code == 0, err
    assert len(ResultsStore(shared / "run" / "results").read()) == 2 * 2 * len(EVAL_GRID) and not (run / "results").exists()
    assert (run / "checkpoints" / "last.pt").is_file(), "an in-process run keeps its checkpoint here (its --resume reads it)"
    code, out, err = msa_cli("report", str(run), "--protocol", "paper", "--out", str(tmp_path / "table.md"))
    assert code == 0, err
    assert "| run |" in (tmp_path / "table.md").read_text()
