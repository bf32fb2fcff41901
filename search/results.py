"""What an epoch produces, how runs report it, and the Parquet results store (DESIGN.md).

Every path writes rows the same way: the in-process run, the Ray Train callback (from rank
0's report) and the Tune callback (from a trial's report) all call `ResultsStore.append`
with a split -> pattern -> metrics mapping; the pattern columns are derived here, once.
The store holds one row per (trial_id, epoch, split, pattern). Each (trial, epoch) is one
part file written atomically under a name derived from its key, so rows are appended as
they arrive and a repeated epoch (after a resume) replaces its own part instead of
duplicating rows.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from data_pipeline.atomic import atomic_file, writing
from data_pipeline.missing import MODALITY_LETTERS, parse_pattern

from .config import ExperimentConfig, SearchConfig
from .objective import OBJECTIVE, PatternMetrics, objective_value
from .storage import filesystem

KEY_COLUMNS = ("trial_id", "epoch", "split", "pattern")

EpochResults = dict[str, PatternMetrics]  # split -> pattern name -> metric -> value


@dataclass
class EpochReport:
    epoch: int
    losses: dict[str, float]  # mean unweighted term values over the epoch, plus "total"
    results: EpochResults  # valid and test
    objective: float  # search.objective on valid over search.objective_patterns
    train_time_s: float
    eval_time_s: float


def epoch_metrics(report: EpochReport, search: SearchConfig) -> dict[str, Any]:
    """What a run reports each epoch (to Ray Train or Tune): the objective(s), robust_f1,
    the losses, the epoch's training and evaluation seconds, and every per-pattern result as
    one JSON string (Tune's own loggers then keep one column for them)."""
    valid = report.results["valid"]
    return {
        OBJECTIVE: report.objective, "epoch": report.epoch,
        "robust_f1": objective_value(valid, "robust_f1", search.objective_patterns),
        **{f"{OBJECTIVE}/{n}": objective_value(valid, n, search.objective_patterns) for n in search.objectives},
        "f1_non0_complete": valid.get("intra:0.0", {}).get("f1_non0", float("nan")),
        **{f"loss/{k}": v for k, v in report.losses.items()},
        "time/train_s": report.train_time_s, "time/eval_s": report.eval_time_s,
        "rows": json.dumps(report.results),
    }


def reported_results(metrics: dict[str, Any]) -> EpochResults:
    """The per-split pattern metrics inside reported `epoch_metrics`."""
    return json.loads(metrics["rows"])


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(str(v) for v in value)
        else:
            out[name] = value
    return out


@dataclass(frozen=True)
class RunInfo:
    """What every row of one run or trial shares."""

    experiment: str
    trial_id: str
    model: str
    hparams: dict[str, Any]  # the flattened config, as hp.<dotted key> columns

    @classmethod
    def of(cls, experiment: str, trial_id: str, cfg: ExperimentConfig) -> "RunInfo":
        return cls(experiment, trial_id, cfg.model.name, flatten(cfg.model_dump(mode="json")))


def _pattern_columns(name: str) -> dict[str, Any]:
    p = parse_pattern(name)
    return {"pattern": p.name, "pattern_kind": p.kind,
            "missing_rate": p.rate if p.kind == "intra" else None,
            "dropped": "+".join(MODALITY_LETTERS[m] for m in p.dropped) if p.kind == "inter" else None}


def result_rows(run: RunInfo, epoch: int, results: EpochResults, wall_time_s: float) -> list[dict]:
    return [{"experiment": run.experiment, "trial_id": run.trial_id, "model": run.model, "epoch": epoch,
             "split": split, **_pattern_columns(pattern), **{k: float(v) for k, v in metrics.items()},
             "wall_time_s": float(wall_time_s), **{f"hp.{k}": v for k, v in run.hparams.items()}}
            for split, by_pattern in results.items() for pattern, metrics in by_pattern.items()]


_PART = re.compile(r"part-(.+)-epoch\d+\.parquet")  # one (trial, epoch): ResultsStore._part_name


def _safe(trial_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id)


class ResultsStore:
    """`root`: a local directory, or a URI of `output.storage` (search/storage.py)."""

    def __init__(self, root: str | Path):
        self.root = root
        self.fs, self.path = filesystem(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    @staticmethod
    def _part_name(trial_id: str, epoch: int) -> str:
        return f"part-{_safe(trial_id)}-epoch{epoch:05d}.parquet"

    def append(self, run: RunInfo, epoch: int, results: EpochResults, wall_time_s: float) -> Path | str:
        """Write all rows of one (trial, epoch); replaces that epoch's part if it exists."""
        rows = result_rows(run, epoch, results, wall_time_s)
        if not rows:
            raise ValueError(f"trial {run.trial_id} epoch {epoch}: no results to write")
        table = pa.Table.from_pylist(rows)
        name = self._part_name(run.trial_id, epoch)
        if self.local:
            path = Path(self.path) / name
            # A full or read-only disk half-way: the parts written before stay whole (atomic),
            # and the file is closed at once (by path, pyarrow's writer keeps it open as long as
            # the error lives, holding the space of the removed temporary).
            with writing(path, kept=f"the rows written before stay readable in {self.path}"), \
                    atomic_file(path, force=True) as tmp, open(tmp, "wb") as fh:
                pq.write_table(table, fh)
            return path
        # An object store shows an object whole or not at all (it appears when its upload
        # completes), so a part is written in place; a rename there would be a copy.
        self.fs.create_dir(self.path, recursive=True)
        path = f"{self.path.rstrip('/')}/{name}"
        pq.write_table(table, path, filesystem=self.fs)
        return path

    def _parts(self) -> list:
        listing = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [info for info in listing if info.type == pafs.FileType.File and _PART.fullmatch(info.base_name)]

    def remove_trials_except(self, trial_ids) -> int:
        """Remove the rows of every trial not in `trial_ids`; returns how many parts went. A
        resumed search calls it with the trials Tune restored: one that reported after Tune's
        last save of its state is not among them, and is started anew under another id."""
        keep = {_safe(t) for t in trial_ids}
        gone = [info.path for info in self._parts() if _PART.fullmatch(info.base_name)[1] not in keep]
        for path in gone:
            self.fs.delete_file(path)
        return len(gone)

    def read(self) -> pd.DataFrame:
        parts = sorted(info.path for info in self._parts())
        if not parts:
            return pd.DataFrame(columns=list(KEY_COLUMNS))
        # Parts of different models carry different hyperparameter columns: unify schemas.
        table = pa.concat_tables([pq.read_table(p, filesystem=self.fs) for p in parts], promote_options="default")
        return table.to_pandas()
