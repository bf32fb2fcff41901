"""The search end to end: Ray Tune + Optuna on a local Ray cluster, real SQLite storage."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
import ray
import ray.tune
import torch

from data_pipeline.loader import load_splits
from search import cli
from search.cli import _print_status
from search.config import ConfigError, load_config
from search.export import export_best, score_trials
from search.layout import Layout
from search.objective import OBJECTIVE
from search.results import ResultsStore
from search.rounds import add_round, ended_results
from search.run import train_in_process
from search.shared_data import DATA_PRIVATE_MB
from search.tune import run_experiment
from search.weights import checkpoint_name, read_checkpoint
from small_grid import EVAL_GRID, EVAL_GRID_SETTING

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.scale=0.1", "train.epochs=2", "train.batch_size=32", "model.hidden_dim=32", "model.dim_head=16",
        "model.num_heads=4", "model.lnln.tokens=4", "train.device=cpu", "search.max_concurrent=2",
        "search.scheduler=none", "train.threads=1", EVAL_GRID_SETTING]


def tiny(exp: Path, *extra: str):
    return load_config(ROOT / "configs" / "lnln_quick.yaml", [*TINY, f"output.dir={exp}", *extra])


def load_study(exp: Path) -> optuna.Study:
    layout = Layout(exp)
    return optuna.load_study(study_name=layout.study_name, storage=layout.optuna_storage)


def per_trial_epochs(df):
    return df.groupby("trial_id").epoch.agg(lambda e: sorted(set(e)))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, local_ray):
    exp = tmp_path_factory.mktemp("tune") / "exp"
    outcome = run_experiment(tiny(exp, "search.num_samples=6", "search.nan_trial=2", "search.seed=3"))
    assert dict(outcome.trials) == {"completed": 5, "errored": 1} and "loss is nan" in outcome.first_failure
    return exp


def test_six_trials_write_study_results_and_only_the_nan_trial_fails(experiment):
    study = load_study(experiment)
    assert len(study.trials) == 6
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 5 and states.count(optuna.trial.TrialState.FAIL) == 1
    failures = [json.loads(l) for l in Layout(experiment).failures.read_text().splitlines()]
    assert len(failures) == 1 and "loss is nan" in failures[0]["reason"]
    df = ResultsStore(experiment / "results").read()
    assert df.trial_id.nunique() == 5, "the failed trial reported nothing"
    assert all(epochs == [0, 1] for epochs in per_trial_epochs(df))
    assert len(df) == 5 * 2 * 2 * len(EVAL_GRID)
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    # Each trial that ended was compacted into one file: no part is left.
    files = sorted(p.name for p in (experiment / "results").iterdir())
    assert len(files) == 5 and all(f.startswith("trial-") for f in files), files
    # Every trial's sampled values are in its rows, so results can be sliced by hyperparameter.
    assert df.groupby("trial_id")["hp.train.lr"].nunique().eq(1).all() and df["hp.train.lr"].nunique() == 5


def test_concurrent_trials_share_one_copy_of_the_data(experiment):
    store = next(Layout(experiment).data.glob("*/schema.json")).parent
    dataset_mb = sum(s.nbytes for s in load_splits(store).values()) / 2**20
    results = [json.loads(line) for path in (Layout(experiment).ray / Layout.TUNE_NAME).glob("*/result.json")
               for line in path.read_text().splitlines()]
    private = [r[DATA_PRIVATE_MB] for r in results if DATA_PRIVATE_MB in r]
    # Two trials at a time; one holding its own copy would take the whole dataset privately.
    assert len(private) >= 5 and max(private) < 0.25 * dataset_mb, (private, dataset_mb)


def test_export_then_train_reproduces_the_exported_metrics(experiment, tmp_path):
    best = export_best(experiment, tmp_path / "best.yaml")[0]
    text = best.read_text()
    assert text.startswith("# exported from") and "objective robust_f1 on valid" in text
    cfg = load_config(best, [f"output.dir={tmp_path / 'retrain'}"])
    trial_id = text.split(" trial ")[1].split()[0]
    train_in_process(cfg, show_progress=False)
    retrained = ResultsStore(tmp_path / "retrain" / "results").read()
    assert [p.name[:6] for p in (tmp_path / "retrain" / "results").iterdir()] == ["trial-"], "compacted at the end"
    original = ResultsStore(experiment / "results").read()
    original = original[(original.trial_id == trial_id) & (original.epoch == cfg.train.epochs - 1)]
    retrained = retrained[retrained.epoch == cfg.train.epochs - 1]
    key = ["split", "pattern"]
    a, b = original.sort_values(key).reset_index(), retrained.sort_values(key).reset_index()
    assert list(a.pattern) == list(b.pattern) and len(a) == 2 * len(EVAL_GRID)
    for metric in ("f1_non0", "acc2_has0", "acc7", "mae", "corr"):
        assert (a[metric] - b[metric]).abs().max() <= 1e-6, metric
    # The trial's own weights, as `evaluate --checkpoint TRIAL_DIR` reads them (its newest
    # Tune checkpoint), are the retrained run's (`--checkpoint RUN_DIR`: its last.pt).
    trial_dir = next((Layout(experiment).ray / Layout.TUNE_NAME).glob(f"*_{trial_id}_*"))
    trial_weights, retrained_weights = read_checkpoint(trial_dir), read_checkpoint(tmp_path / "retrain")
    assert checkpoint_name(trial_dir) == checkpoint_name(next(trial_dir.glob("checkpoint_*/state.pt"))) == trial_id
    assert trial_weights.keys() == retrained_weights.keys()
    for name, weight in trial_weights.items():
        torch.testing.assert_close(retrained_weights[name], weight, rtol=1e-5, atol=1e-6, msg=name)


def test_resuming_a_finished_search_reads_its_outcome_without_starting_ray(experiment, monkeypatch, capsys):
    """Every trial ended: `tune --resume` says so and prints the summary, from Tune's saved state
    (a 10-20 s Ray start and data load saved), and writes nothing."""
    import search.tune

    monkeypatch.setattr(search.tune, "ensure_ray", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(search.tune, "prepare_store", lambda *a, **k: pytest.fail("the data was prepared"))
    before = sorted((p, p.stat().st_mtime_ns) for p in experiment.rglob("*") if p.is_file())
    monkeypatch.setattr(sys, "argv", ["msa-search", "tune", "--resume", str(experiment)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    captured = capsys.readouterr()
    assert exit_info.value.code in (0, None), captured.err
    assert f"{experiment}: every trial of this search has ended, nothing to resume" in captured.err
    assert "trials: 5 completed, 1 errored" in captured.out and "best so far: trial" in captured.out
    assert sorted((p, p.stat().st_mtime_ns) for p in experiment.rglob("*") if p.is_file()) == before


def test_existing_experiment_dir_is_refused(experiment):
    with pytest.raises(Exception, match="experiment directory exists.*--resume"):
        run_experiment(tiny(experiment, "search.num_samples=1"))


def test_tune_exits_non_zero_with_the_reason_when_no_trial_completed(tmp_path, local_ray, monkeypatch, capsys):
    from search import cli

    args = ["msa-search", "tune", "--config", str(ROOT / "configs" / "lnln_quick.yaml")]
    for item in [*TINY, "search.num_samples=1", "search.nan_trial=0", "train.epochs=1", f"output.dir={tmp_path / 'x'}"]:
        args += ["--set", item]
    monkeypatch.setattr(sys, "argv", args)
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "no trial completed (1 errored)" in err and "loss is nan" in err


def test_multi_objective_search_exports_its_pareto_front(tmp_path, local_ray):
    exp = tmp_path / "multi"
    objectives = "search.objectives=[f1_non0@intra:0.0, robust_f1]"
    run_experiment(tiny(exp, "search.num_samples=3", objectives, "train.epochs=1"))
    study = load_study(exp)
    assert len(study.directions) == 2 and len(study.trials) == 3
    written = export_best(exp, tmp_path / "front.yaml")
    assert 1 <= len(written) <= 3
    df = ResultsStore(exp / "results").read()
    valid = df[df.split == "valid"]
    points = {}
    for path in written:
        trial = path.read_text().split(" trial ")[1].split()[0]
        rows = valid[valid.trial_id == trial].set_index("pattern")
        points[trial] = (rows.loc["intra:0.0", "f1_non0"], rows.loc[load_config(path).search.objective_patterns, "f1_non0"].mean())
    others = set(valid.trial_id) - set(points)
    for other in others:  # every trial left out is dominated by one on the front
        rows = valid[valid.trial_id == other].set_index("pattern")
        p = (rows.loc["intra:0.0", "f1_non0"], rows.loc[load_config(written[0]).search.objective_patterns, "f1_non0"].mean())
        assert any(q[0] >= p[0] and q[1] >= p[1] for q in points.values())


def test_pbt_runs_trials_to_the_end_with_complete_results(tmp_path, local_ray, msa_cli):
    exp = tmp_path / "pbt"
    run_experiment(tiny(exp, "search.scheduler=pbt", "search.num_samples=2", "train.epochs=3"))
    df = ResultsStore(exp / "results").read()
    assert df.trial_id.nunique() == 2
    assert all(epochs == [0, 1, 2] for epochs in per_trial_epochs(df))
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert not Layout(exp).has_study, "PBT samples without Optuna: no study database"
    # Each params file (what export and status build a config from) holds the values its trial
    # trained its last epoch with, as its rows do, PBT's mutations included. (Whether PBT
    # mutates in so short a run depends on the trials' timing: test_tune_params_file.py.)
    valid = df[df.split == "valid"].sort_values("epoch")
    for trial_id, rows in valid.groupby("trial_id"):
        params = json.loads(Layout(exp).trial_params(str(trial_id)).read_text())
        assert {f"hp.{k}": v for k, v in params.items()} == pytest.approx(rows.iloc[-1][list(
            f"hp.{k}" for k in params)].to_dict())
    # No study to count its trials: status counts them in Tune's state.
    code, out, err = msa_cli("status", str(exp))
    assert code == 0 and "trials (PBT samples without an Optuna study; Tune's state): terminated 2" in out, err
    # Its export says that its values alone need not reproduce it (PBT may have changed them);
    # asked for more trials than finished, it says how many it wrote.
    code, out, err = msa_cli("export", str(exp), "--out", str(tmp_path / "best.yaml"), "--top", "3")
    assert code == 0 and "PBT may have\n# changed them" in (tmp_path / "best.yaml").read_text(), err
    assert out.count("wrote ") == 2 and "note: 2 of the 3 asked for (--top): only 2 trial(s) finished" in err
    code, out, err = msa_cli("report", str(exp), "--out", str(tmp_path / "report.html"))
    assert code == 0 and "Tune&#x27;s state: 2 terminated (PBT: no Optuna study)" in \
        (tmp_path / "report.html").read_text(), err


def test_the_trial_epoch_budget_counts_epochs(tmp_path, local_ray):
    """search.max_trial_epochs counts reported epochs, not the result Tune adds when a trial's
    function returns (which once made a 6-epoch trial cost 7): 4 epochs are 2 whole trials."""
    exp = tmp_path / "budget"
    run_experiment(tiny(exp, "search.num_samples=5", "search.max_trial_epochs=4", "search.max_concurrent=1"))
    df = ResultsStore(exp / "results").read(hparams=False)
    assert list(per_trial_epochs(df)) == [[0, 1], [0, 1]]
    # Tune ends the trial running when the budget runs out without telling the searcher (Ray
    # 2.60): the study is told here, and that trial's rows compacted like the others'.
    last = {t.trial_id: t.last_result for t in ray.tune.ExperimentAnalysis(str(Layout(exp).tune_state())).trials}
    told = {t.user_attrs["tune_trial_id"]: (t.state, t.values[0]) for t in load_study(exp).trials}
    assert told == {trial_id: (optuna.trial.TrialState.COMPLETE, r[OBJECTIVE]) for trial_id, r in last.items()}
    assert all(r["epoch"] == 1 for r in last.values()) and set(told) == set(df.trial_id)
    assert ResultsStore(exp / "results").trials_with_parts(df.trial_id.unique()) == []


def test_multi_objective_needs_no_scheduler():
    with pytest.raises(ConfigError, match="search.scheduler.: a multi-objective search .* needs none"):
        load_config(ROOT / "configs" / "lnln_quick.yaml", ["search.objectives=[robust_f1, worst_f1]"])


def test_trials_can_nest_ray_train_workers(tmp_path, local_ray):
    """One after the other: Tune reuses no trial's actor for the next (its Ray Train run may still
    be shutting down when the next trial would reset it, which then failed). Each trial's two
    workers take both CPUs of the cluster: the trial's own process takes none (with 0.01 CPU the
    workers never fitted and the search waited forever; the time budget turns that into a failure)."""
    exp = tmp_path / "nested"
    run_experiment(tiny(exp, "search.num_samples=2", "train.workers=2", "train.engine=ddp", "train.epochs=1",
                        "search.max_concurrent=1", "search.time_budget_s=400"))
    reports = [json.loads(p.read_text().splitlines()[0]) for p in Path(Layout(exp).tune_state()).glob("*/result.json")]
    assert len({r["pid"] for r in reports}) == len(reports) == 2, "each trial in a process of its own"
    df = ResultsStore(exp / "results").read()
    assert df.trial_id.nunique() == 2 and len(df) == 2 * 1 * 2 * len(EVAL_GRID)
    study = load_study(exp)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    # What Optuna was told is the robust_f1 of the rows the workers reported.
    patterns = tiny(exp).search.objective_patterns
    valid = df[(df.split == "valid") & df.pattern.isin(patterns)]
    from_rows = sorted(valid.groupby("trial_id").f1_non0.mean())
    assert sorted(t.values[0] for t in study.trials) == pytest.approx(from_rows, abs=1e-9)
    # `evaluate --checkpoint TRIAL_DIR` of such a trial: Tune's directory holds no checkpoint,
    # its nested run's does (EXP/trials/<id>/checkpoint_<time>): the newest is read from there.
    trial_dir = next(Path(Layout(exp).tune_state()).glob(f"*_{study.trials[0].user_attrs['tune_trial_id']}_*"))
    assert not list(trial_dir.glob("checkpoint_*"))
    trial_id = checkpoint_name(trial_dir)
    newest = max(p for p in (Path(Layout(exp).nested_trials) / trial_id).glob("checkpoint_*") if p.is_dir())
    weights = read_checkpoint(trial_dir)
    assert weights.keys() == read_checkpoint(newest).keys()
    for name, weight in read_checkpoint(newest).items():
        assert torch.equal(weights[name], weight), name


def test_a_deferred_test_grid_is_evaluated_after_the_search_as_in_the_trial(tmp_path, local_ray):
    """train.eval_test: deferred: while the search runs only last epochs evaluate the test grid;
    after it, the best search.test_top trials that ASHA stopped get theirs from their latest
    checkpoints: the same numbers as a search that evaluates it where a trial may stop (end)."""
    common = ["search.scheduler=asha", "search.sampler=random", "search.num_samples=6", "search.max_concurrent=1",
              "train.epochs=3", "search.seed=5"]
    run_experiment(tiny(tmp_path / "end", *common, "train.eval_test=end"))
    outcome = run_experiment(tiny(tmp_path / "deferred", *common, "train.eval_test=deferred", "search.test_top=4"))
    end = ResultsStore(tmp_path / "end" / "results").read(hparams=False)
    deferred = ResultsStore(tmp_path / "deferred" / "results").read(hparams=False)
    for exp, df in (("end", end), ("deferred", deferred)):  # the same sampled trials in both: matched by values
        df["order"] = [Layout(tmp_path / exp).trial_params(str(t)).read_text() for t in df.trial_id]
    key, metrics = ["order", "epoch", "split", "pattern"], ["f1_non0", "acc2_non0", "mae", "corr"]
    last = deferred[deferred.split == "valid"].groupby("order").epoch.max()
    stopped = last[last < 2]
    assert outcome.trials["stopped early"] == len(stopped) >= 2, "ASHA stopped trials before their last epoch"
    layout = Layout(tmp_path / "deferred")
    ranked = [layout.trial_params(s.trial_id).read_text()
              for s in score_trials(layout, load_config(layout.config), deferred)]
    tested = deferred[deferred.split == "test"].groupby("order").epoch.agg(set).to_dict()
    for order, epoch in last.items():
        expected = {epoch} if epoch == 2 or order in ranked[:4] else set()
        assert tested.get(order, set()) == expected, f"trial {order} (last epoch {epoch}) test epochs"
    assert sorted(layout.trial_params(t).read_text() for t in outcome.deferred_tests.evaluated) == \
        sorted(o for o in stopped.index if o in ranked[:4]) and not outcome.deferred_tests.skipped
    # Where both have rows, identical: the deferred grid comes from the weights the trial stopped with.
    both = deferred.merge(end, on=key, suffixes=("", "_end"))
    assert len(both) == len(deferred) and len(end) > len(deferred)
    for m in metrics:
        assert both[m].equals(both[f"{m}_end"]), m


def test_trials_added_to_a_finished_search_are_sampled_anew_on_its_study(tmp_path, local_ray, capsys):
    """`tune --resume EXP --add-trials N`: more trials on the same study, as a round of their
    own (search/rounds.py); a round recorded but not run (a driver stopped after recording it)
    runs on the next resume, before those it adds; a finished search then runs nothing more."""
    exp = tmp_path / "more"
    run_experiment(tiny(exp, "search.num_samples=2", "search.sampler=random", "search.scheduler=asha",
                        "train.epochs=1"))
    first = [dict(t.params) for t in load_study(exp).trials]
    layout = Layout(exp)
    add_round(layout, load_config(layout.config), 1)  # recorded, then the driver stopped: runs first
    outcome = run_experiment(None, resume_dir=exp, add_trials=2)
    assert sum(outcome.trials.values()) == 5 and not outcome.trials["errored"], outcome.trials
    study = load_study(exp)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 5
    params = [dict(t.params) for t in study.trials]
    assert params[:2] == first
    # Each round's sampler draws anew: search.seed again would have repeated the first round's values.
    assert len({json.dumps(p, sort_keys=True) for p in params}) == 5, params
    assert sorted(p.name for p in layout.ray.iterdir() if p.is_dir()) == ["tune", "tune-2", "tune-3"]
    df = ResultsStore(layout.results).read(hparams=False)
    assert df.trial_id.nunique() == 5 and not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert {s.trial_id for s in score_trials(layout, load_config(layout.config), df)} == set(df.trial_id)
    # Nothing left to run: a plain resume asks no trial, and reads the outcome without Ray...
    outcome = run_experiment(None, resume_dir=exp)
    assert outcome.nothing_to_run and outcome.trials == {"completed": 5}, outcome
    assert len(load_study(exp).trials) == 5
    # ... unless a round is recorded and not run yet: Tune then runs it.
    add_round(layout, load_config(layout.config), 1)
    assert ended_results(layout, load_config(layout.config)) is None
    layout.rounds.write_text(json.dumps({"added_trials": [1, 2]}) + "\n")  # as it was
    capsys.readouterr()
    _print_status(exp)
    out = capsys.readouterr().out
    assert "study: complete 5" in out and "trials asked for: 2 (search.num_samples), then 1 + 2 added" in out, out
