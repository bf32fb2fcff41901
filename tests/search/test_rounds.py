"""Trials added to a search (search/rounds.py) without Ray: the rounds file, the refusals, the
sampler's seed per round, and ASHA's rungs holding the earlier rounds' trials."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
from ray.tune.schedulers import TrialScheduler

from data_pipeline.errors import MsaSearchError
from search import cli
from search.config import load_config
from search.layout import Layout
from search.objective import OBJECTIVE
from search.rounds import Round, add_round, search_rounds
from search.strategy import scheduler

ROOT = Path(__file__).resolve().parents[2]


def quick(tmp_path: Path, *extra: str):
    return load_config(ROOT / "configs" / "quick.yaml", [f"output.dir={tmp_path / 'exp'}", *extra])


def test_added_rounds_are_recorded_in_order_each_with_its_own_sampler_seed(tmp_path):
    cfg = quick(tmp_path, "search.num_samples=8", "search.seed=5")
    layout = Layout(tmp_path / "exp")
    layout.root.mkdir()
    assert search_rounds(layout, cfg) == [Round(0, 8)], "no rounds file: the search as it started"
    add_round(layout, cfg, 3)
    add_round(layout, cfg, 2)
    rounds = search_rounds(layout, cfg)
    assert [(r.index, r.trials, r.name) for r in rounds] == [(0, 8, "tune"), (1, 3, "tune-2"), (2, 2, "tune-3")]
    # The same seed would start a random sampler (or TPE's and GP's random start-up) on the same values.
    assert [r.sampler_seed(cfg) for r in rounds] == [5, 6, 7]


def test_a_damaged_rounds_file_and_a_pbt_search_are_refused_naming_why(tmp_path):
    layout = Layout(tmp_path / "exp")
    layout.root.mkdir()
    layout.rounds.write_text('{"added_trials": [3, 0]}')
    with pytest.raises(MsaSearchError, match=r"rounds.json: cannot be read .*trial counts >= 1"):
        search_rounds(layout, quick(tmp_path))
    layout.rounds.unlink()
    pbt = quick(tmp_path, "search.scheduler=pbt")
    with pytest.raises(MsaSearchError, match="PBT search .* larger search.num_samples"):
        add_round(layout, pbt, 4)
    assert not layout.rounds.exists(), "nothing recorded"


@dataclass
class FakeTrial:  # what ASHA reads of a trial
    trial_id: str


@pytest.mark.parametrize("objective, earlier_values, new_value",
                         [("robust_f1", (0.8, 0.9), 0.5), ("mae@complete", (1.0, 1.1), 1.5)])
def test_asha_stops_an_added_trial_that_is_worse_than_the_earlier_rounds_at_a_rung(tmp_path, objective,
                                                                                   earlier_values, new_value):
    cfg = quick(tmp_path, "search.scheduler=asha", "search.asha.grace_period=1", "train.epochs=4",
                f"search.objective={objective}")
    mode = cfg.search.mode
    earlier = [(f"old{i}", 1, v) for i, v in enumerate(earlier_values)]

    def decision(asha) -> str:
        asha.set_search_properties(OBJECTIVE, mode)  # as Tune does before the first trial
        trial = FakeTrial("new")
        asha.on_trial_add(None, trial)
        return asha.on_trial_result(None, trial, {"training_iteration": 1, OBJECTIVE: new_value})

    # Alone at the first rung the new trial goes on; measured against the earlier trials it stops.
    assert decision(scheduler(cfg, cfg.search_space())) == TrialScheduler.CONTINUE
    assert decision(scheduler(cfg, cfg.search_space(), earlier=earlier)) == TrialScheduler.STOP


def test_add_trials_without_resume_is_refused_before_ray_starts(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["msa-search", "tune", "--add-trials", "4"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code != 0 and "--add-trials adds trials to an experiment: give it with --resume EXP" in err
    assert list(tmp_path.iterdir()) == []


def test_resume_with_a_larger_num_samples_points_to_add_trials(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    monkeypatch.setattr(sys, "argv", ["msa-search", "tune", "--resume", str(tmp_path), "--set", "search.num_samples=20"])
    with pytest.raises(SystemExit):
        cli.main()
    assert f"msa-search tune --resume {tmp_path} --add-trials N" in capsys.readouterr().err


def test_resume_is_refused_while_a_driver_runs_the_search(monkeypatch, tmp_path):
    """Adding trials to a search that is still running (from a second terminal, say) would make
    two drivers restore and run the same trials: refused before Ray starts."""
    from search.driver_presence import driver_marked
    from search.tune import run_experiment

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray was started"))
    cfg = quick(tmp_path)
    layout = Layout(tmp_path / "exp")
    layout.root.mkdir()
    layout.config.write_text(cfg.to_yaml())
    with driver_marked(layout):  # this process: a running driver on this host
        with pytest.raises(MsaSearchError, match="its search is running .* wait for it to end, or stop it"):
            run_experiment(None, resume_dir=layout.root, add_trials=2)
    assert not layout.rounds.exists(), "nothing recorded"
