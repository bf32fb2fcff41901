"""train.eval_test: which epochs evaluate the test grid (search/evaluation_plan.py), in the
in-process loop, through checkpoints, and in what status and the protocols read."""
from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from data_pipeline.loader import SplitTensors
from data_pipeline.synth import synthesize
from search.config import ConfigError, ExperimentConfig
from search.evaluation_plan import TestGridPlan, asha_milestones, ending_epochs, resolved_policy
from search.protocol import reference_epochs
from search.trainer import build_state, fit, load_state, save_state

SMALL_MODEL = {"hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32, "lnln": {"tokens": 4}}
CPU = torch.device("cpu")


def cfg_of(epochs: int = 4, eval_test: str = "auto", scheduler: str = "none", **search) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "model": SMALL_MODEL,
        "train": {"epochs": epochs, "batch_size": 32, "lr": 2e-3, "device": "cpu", "eval_test": eval_test},
        "search": {"scheduler": scheduler, **search}})


def valid_with(cfg: ExperimentConfig, f1: float, mae: float = 1.0) -> dict:
    """Valid results whose robust_f1 is `f1` (every objective pattern at `f1`)."""
    return {p: {"f1_non0": f1, "mae": mae} for p in cfg.search.objective_patterns}


@pytest.mark.parametrize("max_t,grace_period,reduction_factor",
                         [(1, 1, 2), (2, 1, 2), (3, 1, 2), (7, 1, 2), (8, 1, 2), (9, 1, 2), (50, 1, 2),
                          (200, 1, 2), (6, 3, 2), (6, 6, 2), (40, 2, 3), (10, 1, 1.5)])
def test_asha_milestones_are_the_rungs_ray_builds(max_t, grace_period, reduction_factor):
    """A contract with Ray: the rungs of the ASHAScheduler search/strategy.py builds from
    search.asha (a private attribute; this test fails if Ray changes how it places them)."""
    from search.strategy import scheduler

    cfg = cfg_of(epochs=max_t, scheduler="asha",
                 asha={"grace_period": grace_period, "reduction_factor": reduction_factor})
    built = scheduler(cfg, {})
    rungs = sorted(m for bracket in built._brackets for m, _ in bracket._rungs)
    assert asha_milestones(max_t, grace_period, reduction_factor) == pytest.approx(rungs)


def test_asha_grace_period_past_the_last_epoch_is_refused():
    with pytest.raises(ValueError, match=r"search\.asha\.grace_period.*at most train\.epochs \(4\)"):
        cfg_of(epochs=4, scheduler="asha", asha={"grace_period": 5})
    assert cfg_of(epochs=4, scheduler="none", asha={"grace_period": 5}).search.asha.grace_period == 5  # unused


def test_the_epochs_where_a_trial_may_end():
    assert ending_epochs(cfg_of(8), in_search=False) == {7}
    assert ending_epochs(cfg_of(8, scheduler="asha"), in_search=False) == {7}, "train has no scheduler"
    assert ending_epochs(cfg_of(8, scheduler="asha"), in_search=True) == {0, 1, 3, 7}
    assert ending_epochs(cfg_of(10, scheduler="asha"), in_search=True) == {0, 1, 3, 7, 9}
    assert ending_epochs(cfg_of(8, scheduler="pbt"), in_search=True) == {7}
    asha = {"grace_period": 3, "reduction_factor": 2}
    assert ending_epochs(cfg_of(8, scheduler="asha", asha=asha), in_search=True) == {2, 5, 7}
    asha = {"grace_period": 1, "reduction_factor": 1.5}  # rungs 1, 1.5, 2.25, 3.375, 5.06: judged at 1, 2, 3, 4, 6
    assert ending_epochs(cfg_of(7, scheduler="asha", asha=asha), in_search=True) == {0, 1, 2, 3, 5, 6}
    assert resolved_policy(cfg_of(), in_search=True) == "improved"
    assert resolved_policy(cfg_of(), in_search=False) == "every"
    assert resolved_policy(cfg_of(eval_test="end"), in_search=False) == "end"


def test_improved_tests_each_improvement_and_the_last_epoch_and_nan_never_improves():
    cfg = cfg_of(epochs=7)
    plan = TestGridPlan(cfg, in_search=True)
    f1s = [0.5, 0.4, 0.6, 0.6, math.nan, 0.7, 0.1]
    assert [plan.due(e, valid_with(cfg, f)) for e, f in enumerate(f1s)] == [True, False, True, False, False, True,
                                                                           True]
    assert plan.best == [0.7]
    first_nan = TestGridPlan(cfg, in_search=True)
    assert [first_nan.due(e, valid_with(cfg, f)) for e, f in enumerate([math.nan, 0.2, 0.1])] == [False, True, False]


def test_a_lower_is_better_objective_improves_downwards_and_any_of_several_objectives_counts():
    cfg = cfg_of(epochs=9, objective="mae@intra:0.0")
    plan = TestGridPlan(cfg, in_search=True)
    maes = [1.0, 1.2, 0.9]
    assert [plan.due(e, {"intra:0.0": {"f1_non0": 0.5, "mae": m}}) for e, m in enumerate(maes)] == [True, False, True]
    multi = cfg_of(epochs=9, objectives=["robust_f1", "mae@intra:0.0"])
    plan = TestGridPlan(multi, in_search=True)
    steps = [(0.5, 1.0), (0.4, 1.1), (0.4, 0.9), (0.6, 1.2), (0.6, 1.2)]
    due = [plan.due(e, {**valid_with(multi, f), "intra:0.0": {"f1_non0": f, "mae": m}})
           for e, (f, m) in enumerate(steps)]
    assert due == [True, False, True, True, False]


def test_end_tests_only_where_an_asha_trial_may_stop_and_every_tests_all():
    cfg = cfg_of(epochs=8, eval_test="end", scheduler="asha")
    plan = TestGridPlan(cfg, in_search=True)
    assert [e for e in range(8) if plan.due(e, valid_with(cfg, 0.1 * e))] == [0, 1, 3, 7]
    every = TestGridPlan(cfg_of(epochs=8, eval_test="every"), in_search=True)
    assert all(every.due(e, valid_with(cfg, 0.0)) for e in range(8))


def test_deferred_tests_only_the_last_epoch_in_a_search_and_is_end_in_train():
    cfg = cfg_of(epochs=8, eval_test="deferred", scheduler="asha")
    plan = TestGridPlan(cfg, in_search=True)
    assert [e for e in range(8) if plan.due(e, valid_with(cfg, 0.1 * e))] == [7], "no rung, no improvement"
    assert resolved_policy(cfg, in_search=False) == "end"
    assert [e for e in range(8) if TestGridPlan(cfg, in_search=False).due(e, valid_with(cfg, 0.0))] == [7]


@pytest.fixture(scope="module")
def splits():
    data = synthesize("mosi-aligned", seed=21, scale=0.15)
    return {s: SplitTensors.from_arrays(data.spec, s, data.split(s)) for s in data.splits}


def test_a_search_trial_evaluates_test_at_improvements_with_the_numbers_every_epoch_gives(splits):
    """Skipping the test grid changes nothing else: the same weights, valid results and (where
    evaluated) test results as a run that tests every epoch, and less evaluation time."""
    torch.set_num_threads(1)
    cfg = cfg_of(epochs=5)
    every = fit(cfg, splits, device=CPU, in_search=False)
    improved = fit(cfg, splits, device=CPU, in_search=True)
    assert all("test" in r.results for r in every.history)
    objectives = [r.objective for r in every.history]
    best, expected = -math.inf, []
    for epoch, value in enumerate(objectives):
        expected.append(value > best or epoch == cfg.train.epochs - 1)
        best = max(best, value)
    assert ["test" in r.results for r in improved.history] == expected
    assert not all(expected), f"the run improved every epoch ({objectives}): pick another seed"
    for a, b in zip(every.history, improved.history):
        assert a.results["valid"] == b.results["valid"] and a.losses == b.losses
        if "test" in b.results:
            assert a.results["test"] == b.results["test"]
    assert improved.best_objectives == [max(objectives)]


def test_the_best_objective_travels_in_the_checkpoint(splits, tmp_path):
    cfg = cfg_of(epochs=2)
    state = fit(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})}), splits, device=CPU,
                in_search=True)
    save_state(state, tmp_path / "state.pt")
    restored = build_state(cfg, splits["train"], CPU)
    load_state(restored, tmp_path / "state.pt", CPU)
    assert restored.best_objectives == state.best_objectives and restored.best_objectives is not None


def test_the_reference_protocol_refuses_runs_without_test_results_at_every_epoch():
    rows = pd.DataFrame([{"epoch": e, "split": s, "pattern": "intra:0.5", "acc2_non0": 0.5}
                         for e in range(4) for s in ("valid", "test") if not (s == "test" and e in (1, 2))])
    with pytest.raises(ConfigError, match=r"every epoch, and epochs 1, 2 have no test results .*eval_test: every"):
        reference_epochs(rows, ["acc2_non0"])


def test_status_table_shows_a_dash_where_test_was_not_evaluated():
    from rich.console import Console

    from search.export import pattern_table

    table = pattern_table("t", {"valid": {"intra:0.0": {"f1_non0": 0.5}}, "test": {}}, ["intra:0.0", "intra:0.5"],
                          [])
    console = Console(width=200, record=True)
    console.print(table)
    text = console.export_text()
    assert "intra:0.0" in text and "0.5000" in text and "-" in text.split("intra:0.0")[1].splitlines()[0]
    assert "intra:0.5" not in text, "a pattern with no results at all is left out"
