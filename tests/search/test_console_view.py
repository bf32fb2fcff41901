"""The console view of `msa-search tune` and where Ray's own output goes (no Ray cluster needed;
the end-to-end check of a real `tune` is in test_tune.py)."""
from __future__ import annotations

import io
import json
import logging
import math
import pickle
import sys
from pathlib import Path

import pytest
from rich.console import Console

from search.config import load_config
from search.console_view import ConsoleView, SearchProgress, showing
from search.ray_output import ray_output_to

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def cfg():
    return load_config(ROOT / "configs" / "quick.yaml", ["train.epochs=3", "search.num_samples=4"])


def result(epoch: int, objective: float, weak: str = "inter:L+A", weak_f1: float = 0.2) -> dict:
    valid = {p: {"f1_non0": 0.7} for p in ("intra:0.0", "intra:0.5", "inter:L", "inter:L+A", "intra:0.9")}
    valid[weak] = {"f1_non0": weak_f1}
    valid["intra:0.9"] = {"f1_non0": 0.01}  # held out of the objective: never the weakest searched
    return {"epoch": epoch, "objective": objective, "rows": json.dumps({"valid": valid, "test": valid})}


def test_progress_tracks_states_best_and_weakest_searched_pattern(cfg):
    p = SearchProgress.of("exp", cfg)
    p.started = 1000.0
    p.started_trial("a")
    p.started_trial("b")
    assert p.reported("a", result(0, 0.40)) is True
    assert p.reported("b", result(0, 0.30)) is False, "worse than the best"
    assert p.reported("b", result(1, 0.55, weak="inter:L", weak_f1=0.15)) is True
    assert p.best.trial_id == "b" and p.best.weakest == "inter:L" and p.best.weakest_f1 == pytest.approx(0.15)
    assert p.reported("a", result(1, math.nan)) is False
    p.ended("a")
    assert p.trials["a"].status == "stopped early", "2 of 3 epochs"
    p.reported("b", result(2, 0.5))
    p.ended("b")
    assert p.trials["b"].status == "completed"
    p.started_trial("c")
    p.ended("c", error="RuntimeError: loss is nan")
    assert p.by_state() == {"stopped early": 1, "completed": 1, "errored": 1}
    assert "best robust_f1 0.5500 (trial b epoch 1, weakest pattern inter:L f1_non0 0.1500)" == p.best_line()
    summary = p.summary(now=1075.0)
    assert summary.startswith("trials 3/4: 1 completed, 1 stopped early, 1 errored") and "1m15s elapsed" in summary


def test_a_view_of_added_trials_says_its_counts_and_best_are_theirs(cfg):
    """`tune --resume EXP --add-trials N` (search/rounds.py): the view of that round counts its N
    trials and its best, which can be below the search's; it says so."""
    view = ConsoleView("exp", cfg, added=True)
    p = view.progress
    p.started_trial("a")
    p.reported("a", result(0, 0.40))
    assert p.summary(now=p.started + 5).startswith("added trials 1/4: 1 running")
    assert p.best_line().startswith("best of the added trials robust_f1 0.4000 (trial a epoch 0")
    assert pickle.loads(pickle.dumps(view)).progress.added, "a resumed round's view says so too"


def test_time_left_counts_open_epochs_at_the_pace_so_far_capped_by_the_budget(cfg):
    p = SearchProgress.of("exp", cfg)
    p.started = 0.0
    assert p.time_left_s(now=10.0) is None, "no epoch done: no pace yet"
    p.started_trial("a")
    p.reported("a", result(0, 0.4))
    p.started_trial("b")
    p.reported("b", result(0, 0.4))
    # 2 epochs in 20 s; left: a 2, b 2, and 2 trials not started x 3 epochs = 10 epochs
    assert p.time_left_s(now=20.0) == pytest.approx(100.0)
    p.time_budget_s = 60.0
    assert p.time_left_s(now=20.0) == pytest.approx(40.0)
    # A budget ended the search with trials not run: none left, whatever the count says.
    p.over = True
    assert p.time_left_s(now=20.0) == 0.0 and p.summary(now=20.0).endswith("20s elapsed, up to 0s left")


def test_the_terminal_panel_shows_running_trials_best_errors_and_ray_warnings(cfg):
    p = SearchProgress.of("exp", cfg)
    p.started_trial("a")
    p.reported("a", result(1, 0.61))
    p.started_trial("z")
    p.ended("z", error="RuntimeError: loss is nan")
    p.ray_warnings, p.log_path = 7, "/x/logs/ray.log"
    console = Console(record=True, width=120, force_terminal=True)
    console.print(p.panel())
    text = console.export_text()
    assert "msa-search tune exp" in text and "trials 2/4: 1 running, 1 errored" in text
    assert "best robust_f1 0.6100 (trial a epoch 1" in text
    assert [line.split() for line in text.splitlines() if line.startswith("a ")] == [["a", "running", "2/3", "0.6100"]]
    assert not any(line.startswith("z ") for line in text.splitlines()), "ended trials leave the table"
    assert "trial z errored: RuntimeError: loss is nan" in text
    assert "Ray: 7 warnings/errors in /x/logs/ray.log" in text


class FakeTrial:  # what Tune hands callbacks: an id, a status, an error file, its directory
    def __init__(self, trial_id: str, status: str = "RUNNING", last_result: dict | None = None):
        self.trial_id, self.status, self.error_file = trial_id, status, None
        self.last_result = last_result or {}
        self.path, self.checkpoint = f"/x/ray/tune/trial_{trial_id}_0_lr=0.1", None


def test_a_trial_that_starts_again_says_from_which_weights(cfg):
    """PBT's exploit restarts a trial from another trial's checkpoint with that trial's values
    mutated; a retried or resumed trial restarts from its own. Neither is a new trial."""
    from ray.train import Checkpoint

    view = ConsoleView("exp", cfg, "/x/logs/ray.log")
    stream = io.StringIO()
    a, b = FakeTrial("a"), FakeTrial("b")
    with showing(stream):
        view.setup()
        for t in (a, b):
            view.on_trial_start(0, [a, b], t)
            view.on_trial_result(1, [a, b], t, result(0, 0.4))
        b.checkpoint = Checkpoint(f"{a.path}/checkpoint_000000")
        view.on_trial_start(2, [a, b], b)
        a.checkpoint = Checkpoint(f"{a.path}/checkpoint_000000")
        view.on_trial_start(3, [a, b], a)
    lines = [line.split(" | ")[0] for line in stream.getvalue().splitlines()]
    assert [lines[0], lines[2]] == ["trial a started", "trial b started"]
    assert lines[-2:] == ["trial b restarted from trial a's weights with its values mutated (PBT)",
                          "trial a restarted from its last checkpoint"]
    assert view.progress.by_state() == {"running": 2}


def test_the_view_writes_one_line_per_event_off_a_terminal_and_survives_pickling(cfg):
    view = ConsoleView("exp", cfg, "/x/logs/ray.log")
    stream = io.StringIO()
    with showing(stream):
        view.setup()
        trial = FakeTrial("t1")
        view.on_trial_start(0, [trial], trial)
        view.on_trial_result(1, [trial], trial, result(0, 0.42))
        view.on_step_end(2, [trial, FakeTrial("t2", "PENDING")])
        view.on_trial_complete(3, [trial], trial)
        # A resumed search restores trials that ended before the crash, with no event.
        view.on_experiment_end([trial, FakeTrial("t2", "TERMINATED", {"epoch": 2}), FakeTrial("t0", "ERROR")])
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == [
        "trial t1 started", "trial t1 epoch 0 (1/3) robust_f1 0.4200 (new best)", "trial t1 stopped early after 1 epoch",
        "search ended"]
    assert "(trial t1 epoch 0," in lines[1]  # the best is named by the index the line gave it
    assert "trials 2/4: 1 pending, 1 stopped early" in lines[-2]
    assert "trials 3/4: 1 completed, 1 stopped early, 1 errored" in lines[-1]
    # Ray snapshots callbacks with the experiment; the restored one keeps the state and the time spent.
    restored = pickle.loads(pickle.dumps(view))
    assert restored.progress.best.objective == pytest.approx(0.42) and restored.progress.prior_s > 0
    restored.setup()
    assert restored.progress.elapsed_s() >= restored.progress.prior_s
    # No display lent (e.g. a library call without the CLI): events are recorded, nothing printed.
    restored.on_trial_start(0, [trial], FakeTrial("t3"))
    assert "t3" in restored.progress.trials


def test_a_resumed_search_view_goes_on_from_the_state_tune_saved(cfg, tmp_path):
    """Through Tune's own save and restore of callback state (what `tune --resume` runs): the
    trials, the best and the time spent come back; a view restored from the Tuner's pickle alone
    (taken before any trial ran) said 'best: none yet, 0s elapsed' after a resume."""
    from ray.tune.callback import CallbackList

    view = ConsoleView("exp", cfg, "/x/logs/ray.log")
    view.setup()
    view.progress.started -= 90  # 90 s spent searching before the driver died
    trial = FakeTrial("t1")
    view.on_trial_start(0, [trial], trial)
    view.on_trial_result(1, [trial], trial, result(0, 0.42))
    view.on_trial_complete(2, [trial], trial)
    CallbackList([view]).save_to_dir(str(tmp_path))

    resumed = ConsoleView("exp", cfg, "/x/logs/ray.log")  # as unpickled from the Tuner: empty
    restored = CallbackList([resumed])
    assert restored.can_restore(str(tmp_path))
    restored.restore_from_dir(str(tmp_path))
    resumed.setup()
    p = resumed.progress
    assert p.best is not None and p.best.trial_id == "t1" and p.best.objective == pytest.approx(0.42)
    assert p.trials["t1"].status == "stopped early" and 90 <= p.elapsed_s() < 120
    stream = io.StringIO()
    with showing(stream):
        resumed.on_experiment_end([FakeTrial("t1", "TERMINATED", {"epoch": 0})])
    assert "search ended | best robust_f1 0.4200 (trial t1 epoch 0" in stream.getvalue()
    assert "1m3" in stream.getvalue() and "trials 1/4: 1 stopped early" in stream.getvalue()


def test_ray_and_optuna_output_go_to_the_log_and_their_warnings_are_counted(tmp_path, capsys):
    import optuna

    log = tmp_path / "logs" / "ray.log"
    before = {name: list(logging.getLogger(name).handlers) for name in ("ray", "optuna")}
    with ray_output_to(log) as counts:
        logging.getLogger("ray.tune").warning("snapshotting is slow")
        logging.getLogger("ray").info("started")
        optuna.create_study(study_name="s1")
        print("Trial status: 2 RUNNING")  # how Tune prints its tables
        print("a user-facing line", file=sys.stderr)
    out, err = capsys.readouterr()
    text = log.read_text()
    assert "snapshotting is slow" in text and "started" in text and "s1" in text and "Trial status" in text
    assert "Trial status" not in out and "snapshotting" not in err and "s1" not in err
    assert "a user-facing line" in err, "stderr itself is not captured: the view and warnings stay visible"
    assert counts == {"warning": 1}
    assert {name: list(logging.getLogger(name).handlers) for name in ("ray", "optuna")} == before


def test_verbose_keeps_ray_output_on_the_console_and_in_the_log(tmp_path, capsys):
    log = tmp_path / "ray.log"
    with ray_output_to(log, verbose=True):
        print("Trial status: 1 RUNNING")
    assert "Trial status" in capsys.readouterr().out
