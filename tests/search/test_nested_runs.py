"""Where a restarted trial of Ray Train workers goes on from (search/nested_runs.py): the newest
checkpoint whose epoch the results store holds, never one the search did not record (no Ray:
the nested runs' directories and the store are made here as the search writes them)."""
from __future__ import annotations

import json
from pathlib import Path

from search.layout import Layout
from search.nested_runs import EPOCH_FILE, NestedStart, nested_start
from search.results import ResultsStore, RunInfo

ROWS = {"valid": {"intra:0.0": {"f1_non0": 0.5, "mae": 0.5}}}


def checkpoint(layout: Layout, run: str, name: str, epoch: int | None) -> Path:
    path = Path(layout.nested_trials) / run / name
    path.mkdir(parents=True)
    (path / "client_state.pt").write_bytes(b"weights")
    if epoch is not None:
        (path / EPOCH_FILE).write_text(json.dumps({"epoch": epoch}))
    return path


def recorded(layout: Layout, trial_id: str, epochs: int) -> None:
    for epoch in range(epochs):
        ResultsStore(layout.results).append(RunInfo("exp", trial_id, "lnln", {}), epoch, ROWS, 1.0 + epoch)


def test_a_first_start_and_a_resume_of_recorded_epochs_run_under_the_trials_name(tmp_path):
    layout = Layout(tmp_path)
    assert nested_start(layout, "t1") == NestedStart("t1", None), "no nested run yet"
    checkpoint(layout, "t1", "checkpoint_2026-01-01_00-00-01", 0)
    checkpoint(layout, "t1", "checkpoint_2026-01-01_00-00-02", 1)
    checkpoint(layout, "t2", "checkpoint_2026-01-01_00-00-03", 5)  # another trial's
    recorded(layout, "t1", 2)
    assert nested_start(layout, "t1") == NestedStart("t1", None), "Ray Train resumes it by name at epoch 1"


def test_an_epoch_the_search_never_recorded_is_trained_again_in_a_new_run(tmp_path):
    """Ctrl-C: the nested run finished epoch 2 and saved it after the driver stopped taking
    results. Resumed by name it went on after epoch 2, whose rows were never written."""
    layout = Layout(tmp_path)
    first = checkpoint(layout, "t1", "checkpoint_2026-01-01_00-00-01", 1)
    checkpoint(layout, "t1", "checkpoint_2026-01-01_00-00-02", 2)
    recorded(layout, "t1", 2)  # epochs 0 and 1
    assert nested_start(layout, "t1") == NestedStart("t1-1", str(first))
    # That run saves epochs 2 and 3, the store records both: its own newest goes on by name.
    checkpoint(layout, "t1-1", "checkpoint_2026-01-01_00-00-05", 2)
    checkpoint(layout, "t1-1", "checkpoint_2026-01-01_00-00-06", 3)
    recorded(layout, "t1", 4)
    assert nested_start(layout, "t1") == NestedStart("t1-1", None)


def test_with_no_recorded_checkpoint_a_new_run_starts_afresh(tmp_path):
    layout = Layout(tmp_path)
    checkpoint(layout, "t1", "checkpoint_2026-01-01_00-00-01", 0)
    assert nested_start(layout, "t1") == NestedStart("t1-1", None), "epoch 0 has no rows"


def test_checkpoints_without_their_epoch_are_left_to_ray_trains_resume(tmp_path):
    layout = Layout(tmp_path)
    checkpoint(layout, "t1", "checkpoint_2026-01-01_00-00-01", None)  # saved before epoch.json
    assert nested_start(layout, "t1") == NestedStart("t1", None)
