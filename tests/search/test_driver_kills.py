"""The Tune driver killed (SIGKILL on its process group, as a crash or the OOM killer would) at
several points, and resumed each time: the last `tune --resume` completes the experiment with
every (trial, epoch, split, pattern) row exactly once, and the Optuna study agrees with Tune."""
from __future__ import annotations

import itertools
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import ray

from search.config import load_config
from search.layout import Layout
from search.ray_setup import LOCAL_RAY_SYSTEM_CONFIG
from search.results import ResultsStore
from small_grid import EVAL_GRID_SETTING

ROOT = Path(__file__).resolve().parents[2]
NUM_SAMPLES, EPOCHS = 3, 2
SETTINGS = ["data.scale=0.1", f"train.epochs={EPOCHS}", "train.batch_size=32", "model.hidden_dim=32",
            "model.dim_head=16", "model.num_heads=4", "model.lnln.tokens=4", "train.device=cpu",
            "search.scheduler=none", "train.threads=1", f"search.num_samples={NUM_SAMPLES}",
            "search.max_concurrent=1", "train.checkpoint_every=2", EVAL_GRID_SETTING]
EVENT = re.compile(r"^trial (\w+) (started|epoch \d+ \(\d+/\d+\)|completed|stopped early|errored)")


def env() -> dict[str, str]:
    """A driver's environment, read when it starts (it joins the cluster with what ray.init() set).
    Tune saves its state when a trial checkpoints (here: after its last epoch only) and every
    ~10 s; without the periodic saves, each kill below falls where Tune's saved state lags
    behind the study and the results store, as it can anywhere at any time."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "TUNE_GLOBAL_CHECKPOINT_S": "3600"}


class Driver:
    """One `msa-search tune` process in its own process group, its live view read line by line."""

    def __init__(self, args: list[str], cwd: Path):
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(args, cwd=cwd, env=env(), text=True, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def kill_at(self, event=lambda trial, what: False, when=lambda: False, timeout: float = 300) -> None:
        """SIGKILL the driver and everything it started, as a crash would, as soon as a trial
        event line matches `event(trial_id, what)` or `when()` holds."""
        self._wait_for(event, when, timeout)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def interrupt_at(self, event, timeout: float = 300) -> tuple[int, list[str]]:
        """Ctrl-C (SIGINT to the driver alone) at a trial event; its exit code and every line it wrote."""
        self._wait_for(event, lambda: False, timeout)
        os.kill(self.proc.pid, signal.SIGINT)
        code = self.proc.wait(timeout=120)
        while (line := self._queue.get(timeout=10)) is not None:
            self.lines.append(line)
        return code, self.lines

    def _wait_for(self, event, when, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                line = self._queue.get(timeout=0.05)
            except queue.Empty:
                line = ""
            if line is None:
                pytest.fail("the driver ended before the point to stop it at:\n" + "\n".join(self.lines[-40:]))
            if line:
                self.lines.append(line)
            match = EVENT.match(line)
            if (match and event(match[1], match[2])) or when():
                return
        os.killpg(self.proc.pid, signal.SIGKILL)
        pytest.fail("no such point within the time allowed:\n" + "\n".join(self.lines[-40:]))

    def trials(self) -> set[str]:
        return {m[1] for line in self.lines if (m := EVENT.match(line))}


@pytest.fixture(scope="module")
def cluster_address():
    """One local Ray cluster that every driver below joins (`--address`), as drivers submitted to
    a cluster do: a killed driver takes its trials with it, not the cluster."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.mark.integration
def test_driver_killed_four_times_resumes_to_a_complete_experiment_the_study_agrees_with(tmp_path, msa_cli,
                                                                                       cluster_address):
    exp = tmp_path / "exp"
    layout = Layout(exp)
    tune = [sys.executable, "-m", "search.cli", "tune", "--address", cluster_address]
    fresh = [*tune, "--config", str(ROOT / "configs" / "lnln_quick.yaml")]
    for item in [*SETTINGS, f"output.dir={exp}"]:
        fresh += ["--set", item]
    resume = [*tune, "--resume", str(exp)]

    # 1. At its very start: the experiment has its config, Ray Tune has nothing yet.
    Driver(fresh, tmp_path).kill_at(when=layout.space.is_file)
    assert not Path(layout.tune_state()).exists()

    # 2. While the first trials run: the second one has just started. Its Optuna trial is
    # asked, Tune has not saved its state since the first trial's last epoch.
    first = Driver(resume, tmp_path)
    first.kill_at(lambda trial, what: what == "started" and len(first.trials()) >= 2)
    assert ResultsStore(layout.results).read().trial_id.nunique() == 1

    # 3. A resume killed at its start: a trial started (the first, run again), none reported.
    second = Driver(resume, tmp_path)
    second.kill_at(lambda trial, what: what == "started")
    seen = first.trials() | second.trials()

    # 4. A resume killed as a trial it started reports its first epoch: its rows are written,
    # Tune's saved state does not know the trial.
    Driver(resume, tmp_path).kill_at(lambda trial, what: what.startswith("epoch") and trial not in seen)

    # 5. The last resume completes the experiment.
    resumed = subprocess.run(resume, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The console shows the live view's lines, not Ray's trial tables (those are in the log).
    view = [line for line in resumed.stderr.splitlines() if line.startswith(("trial ", "search ended"))]
    assert any(f" completed after {EPOCHS} epochs | best robust_f1 " in line for line in view), resumed.stderr[-3000:]
    # Trials that ended before a crash count as ended after the resume too. No scheduler
    # stops trials here: every one ran all its epochs, the one run again from its last
    # checkpoint (which reports nothing new) included.
    assert view[-1].startswith("search ended | best robust_f1 "), view
    assert f" trials {NUM_SAMPLES}/{NUM_SAMPLES}: {NUM_SAMPLES} completed | " in view[-1], view[-1]
    assert f"trials: {NUM_SAMPLES} completed" in resumed.stdout, resumed.stdout[-3000:]
    for ray_table in ("Trial status", "Trial name", "Configuration for experiment", "Current best trial"):
        assert ray_table not in resumed.stdout + resumed.stderr
    assert "Trial status" in layout.ray_log.read_text()

    # Results: every (trial, epoch, split, pattern) row once, of the trials Tune ran, none else.
    cfg = load_config(layout.config, stored=True)
    df = ResultsStore(layout.results).read()
    assert df.trial_id.nunique() == NUM_SAMPLES
    keys = ["trial_id", "epoch", "split", "pattern"]
    assert not df.duplicated(keys).any(), df[df.duplicated(keys, keep=False)][keys]
    expected = set(itertools.product(set(df.trial_id), range(EPOCHS), ("valid", "test"), cfg.missing.eval_grid))
    assert set(df[keys].itertuples(index=False, name=None)) == expected
    params = {p.stem: json.loads(p.read_text()) for p in layout.trial_params_dir.glob("*.json")}
    assert set(params) == set(df.trial_id)

    # The study: one trial per Tune trial, each ended as Tune ended it (completed: COMPLETE; an
    # ASHA-stopped trial is COMPLETE too, with its last value; errored: FAIL), none RUNNING or
    # WAITING, with the parameters that trial ran and the objective its last epoch's rows give.
    study = optuna.load_study(study_name=layout.study_name, storage=layout.optuna_storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * NUM_SAMPLES, \
        [(t.number, t.state.name) for t in study.trials]
    as_set = lambda p: tuple(sorted(p.items()))  # noqa: E731
    assert sorted(as_set(t.params) for t in study.trials) == sorted(as_set(p) for p in params.values())
    last = df[(df.epoch == EPOCHS - 1) & (df.split == "valid") & df.pattern.isin(cfg.search.objective_patterns)]
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(last.groupby("trial_id").f1_non0.mean()),
                                                                  abs=1e-9)
    code, out, err = msa_cli("status", str(exp))
    assert code in (0, None), err
    assert f"study: complete {NUM_SAMPLES}\n" in out and "running" not in out, out


@pytest.mark.integration
def test_ctrl_c_says_the_search_was_interrupted_and_how_to_go_on_and_that_works(tmp_path, cluster_address):
    """Tune takes the first Ctrl-C itself and returns as if the search were done (it used to end
    with 'search ended', the cut-off trials 'stopped early', exit 0 and 'next: msa-search export')."""
    exp = tmp_path / "exp"
    tune = [sys.executable, "-m", "search.cli", "tune", "--address", cluster_address]
    fresh = [*tune, "--config", str(ROOT / "configs" / "lnln_quick.yaml")]
    for item in [*SETTINGS, "search.num_samples=1", f"output.dir={exp}"]:  # one trial: the resume stays short
        fresh += ["--set", item]
    code, lines = Driver(fresh, tmp_path).interrupt_at(lambda trial, what: what.startswith("epoch"))
    said = "\n".join(lines)
    assert code == 130, said[-3000:]
    ended = [line for line in lines if line.startswith("search ")]
    assert len(ended) == 1 and ended[0].startswith("search interrupted | best robust_f1 0."), said[-3000:]
    assert "1 interrupted" in ended[0] and "stopped early" not in ended[0] and " left" not in ended[0], ended[0]
    assert f"interrupted: the search's state is saved in {exp}; go on with: msa-search tune --resume {exp}" in said
    assert "next: msa-search export" not in said
    # The study still calls the trial running (Optuna's state until a driver ends it); status
    # says that nothing runs it any more.
    status = subprocess.run([sys.executable, "-m", "search.cli", "status", str(exp)], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "study: running 1\n" in status.stdout, status.stdout + status.stderr
    assert (f"no search is running: its 1 running trial(s) were cut off (Ctrl-C or a stopped driver); go on with: "
            f"msa-search tune --resume {exp}") in status.stdout, status.stdout
    # As it says: the resumed search completes, the cut-off trial included.
    resumed = subprocess.run([*tune, "--resume", str(exp)], cwd=tmp_path, env=env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trials: 1 completed" in resumed.stdout, resumed.stdout[-3000:]


def study_search(db: Path):
    from ray import tune

    from search.strategy import StudySearch

    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    search = StudySearch(sampler=optuna.samplers.RandomSampler(seed=0), storage=storage, study_name="s",
                         metric="objective", mode="max")
    search.set_search_properties(None, None, {"x": tune.uniform(0, 1), "k": tune.choice(["a", "b"])})
    return search


@pytest.fixture
def quiet_optuna():
    """Optuna's verbosity is process-wide: set back after, or later tests lose its log lines."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    yield
    optuna.logging.set_verbosity(level)


def test_a_resumed_searcher_takes_over_the_optuna_trials_its_saved_state_missed(tmp_path, monkeypatch, quiet_optuna):
    from ray.tune.search.optuna import optuna_search

    warnings = []
    monkeypatch.setattr(optuna_search.logger, "warning", lambda *args, **kwargs: warnings.append(args))
    first = study_search(tmp_path / "optuna.db")
    first.suggest("t1")
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's last save of its state
    asked = first.suggest("t2")
    first.on_trial_complete("t1", {"objective": 0.5})  # then the driver is killed
    resumed = study_search(tmp_path / "optuna.db")
    resumed.restore(str(tmp_path / "searcher.pkl"))
    assert resumed.suggest("t2-anew") == asked, "the trial started anew runs the parameters asked for it"
    resumed.on_trial_complete("t1", {"objective": 0.5})  # run again from its last checkpoint
    resumed.on_trial_complete("t2-anew", {"objective": 0.7})
    assert not warnings, warnings
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [(t.state, t.value) for t in study.trials] == [(optuna.trial.TrialState.COMPLETE, 0.5),
                                                           (optuna.trial.TrialState.COMPLETE, 0.7)]


def test_a_trial_killed_while_being_asked_gets_its_missing_parameters(tmp_path, quiet_optuna):
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}", direction="maximize")
    x = study.ask().suggest_float("x", 0, 1)  # "k" not stored yet when the driver was killed
    search = study_search(tmp_path / "optuna.db")  # no saved state: killed before Tune's first save
    config = search.suggest("t1")
    assert config["x"] == x and config["k"] in ("a", "b") and len(study.trials) == 1
    assert search.suggest("t2")["x"] != x and len(study.trials) == 2


def test_trials_tune_ended_without_telling_the_searcher_are_told_at_the_rounds_end(tmp_path, quiet_optuna):
    """A budget ends the running trials, and Tune fails a trial outside its function (an actor it
    could not reuse), without the searcher's on_trial_complete (Ray 2.60): each Optuna trial
    names its Tune trial, and the round's end tells those still RUNNING how they ended."""
    from ray import tune

    from search.strategy import TUNE_TRIAL_ATTR, StudySearch, settle_ended_trials

    layout = Layout(tmp_path / "exp")
    layout.root.mkdir()
    cfg = load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={layout.root}"])
    search = StudySearch(sampler=optuna.samplers.RandomSampler(seed=0),
                         storage=optuna.storages.RDBStorage(layout.optuna_storage),
                         study_name=layout.study_name, metric="objective", mode="max")
    search.set_search_properties(None, None, {"x": tune.uniform(0, 1)})
    for trial_id in ("done", "cut", "silent", "failed", "running"):
        search.suggest(trial_id)
    search.on_trial_complete("done", {"objective": 0.9})
    ended = {"done": {"objective": 0.1}, "cut": {"objective": 0.6, "epoch": 1}, "silent": {}}
    assert settle_ended_trials(layout, cfg, ended, errored={"failed"}) == 3
    study = optuna.load_study(study_name=layout.study_name, storage=layout.optuna_storage)
    states = {t.user_attrs[TUNE_TRIAL_ATTR]: (t.state.name, t.value) for t in study.trials}
    assert states == {"done": ("COMPLETE", 0.9), "cut": ("COMPLETE", 0.6), "silent": ("PRUNED", None),
                      "failed": ("FAIL", None), "running": ("RUNNING", None)}
