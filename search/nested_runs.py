"""Which nested Ray Train run a trial of Ray Train workers (train.workers >= 1) runs when it
starts, and from which checkpoint.

Ray Train resumes a run of the same name from its own snapshot. That snapshot can hold epochs
the search never recorded: stopped with Ctrl-C (or a driver that died), the Tune driver stops
taking results while the nested run finishes the epoch in flight and saves its checkpoint.
Resumed by name, the trial then went on after that epoch, whose rows were never written, and
ended one epoch short. So a restarted trial goes on from the newest checkpoint whose epoch the
results store holds: in its own run (resumed by name) when that run's newest is such a one,
else in a new run, `<trial id>-<n>`, handed that checkpoint (search/worker.py). Tune records
no checkpoint of such a trial (Ray 2.60's TuneReportCallback passes its path as a metric), so
the results store is what says which epochs the search has.

Each checkpoint carries its epoch in `epoch.json` (search/worker.py writes it); older ones
without it are left to Ray Train's resume by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .layout import Layout
from .storage import filesystem, join

EPOCH_FILE = "epoch.json"  # in each checkpoint of a nested run: {"epoch": <its epoch>}


@dataclass(frozen=True)
class NestedStart:
    name: str  # the nested run's name under Layout.nested_trials
    start_from: str | None  # a checkpoint directory (path or URI) it goes on from, or None


def nested_start(layout: Layout, trial_id: str) -> NestedStart:
    from pyarrow import fs

    root = str(layout.nested_trials)
    filesystem_, base = filesystem(root)
    if filesystem_.get_file_info(base).type != fs.FileType.Directory:
        return NestedStart(trial_id, None)  # a trial's first start (the usual case): nothing to read
    runs = sorted((info.base_name for info in filesystem_.get_file_info(fs.FileSelector(base))
                   if info.type == fs.FileType.Directory and run_index(info.base_name, trial_id) is not None),
                  key=lambda name: run_index(name, trial_id))
    if not runs:
        return NestedStart(trial_id, None)
    checkpoints = []  # (epoch, run index, checkpoint name, run)
    for run in runs:
        for info in filesystem_.get_file_info(fs.FileSelector(f"{base}/{run}")):
            if info.type != fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            try:
                with filesystem_.open_input_stream(f"{info.path}/{EPOCH_FILE}") as fh:
                    epoch = int(json.loads(fh.read())["epoch"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # saved before epoch.json existed, or half-written: not a start point
            checkpoints.append((epoch, run_index(run, trial_id), info.base_name, run))
    if not checkpoints:
        return NestedStart(runs[-1], None)  # Ray Train resumes it by name, as it always did
    recorded = _recorded_epoch(layout, trial_id)
    newest = max(checkpoints)
    if newest[0] <= recorded and newest[3] == runs[-1]:
        return NestedStart(runs[-1], None)  # its own newest is recorded: resumed by name
    usable = [c for c in checkpoints if c[0] <= recorded]
    start = max(usable) if usable else None
    name = f"{trial_id}-{run_index(runs[-1], trial_id) + 1}"
    return NestedStart(name, None if start is None else join(root, start[3], start[2]))


def run_index(name: str, trial_id: str) -> int | None:
    """Which of the trial's nested runs the directory `name` is: 0 for its first (named as the
    trial), n for `<trial id>-<n>`, else None (another trial's)."""
    if name == trial_id:
        return 0
    head, _, index = name.rpartition("-")
    return int(index) if head == trial_id and index.isdigit() else None


def _recorded_epoch(layout: Layout, trial_id: str) -> int:
    """The trial's last epoch in the results store (-1 when it has none)."""
    from .results import ResultsStore

    df = ResultsStore(layout.results).read(hparams=False)
    epochs = df.epoch[df.trial_id == trial_id] if not df.empty else []
    return int(max(epochs)) if len(epochs) else -1
