"""The Parquet results store (DESIGN.md): one row per (trial_id, epoch, split, pattern).

Each (trial, epoch) is one part file written atomically under a name derived from its key,
so rows are appended as they arrive and a repeated epoch (after a resume) replaces its own
part instead of duplicating rows.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.atomic import atomic_file
from data_pipeline.missing import MODALITY_LETTERS, parse_pattern

from .evaluate import PatternResult

KEY_COLUMNS = ("trial_id", "epoch", "split", "pattern")


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


def result_rows(*, experiment: str, trial_id: str, model: str, epoch: int, split: str,
                results: list[PatternResult], wall_time_s: float, hparams: dict[str, Any]) -> list[dict]:
    rows = []
    for r in results:
        p = r.pattern
        rows.append({
            "experiment": experiment, "trial_id": trial_id, "model": model, "epoch": epoch, "split": split,
            "pattern": p.name, "pattern_kind": p.kind,
            "missing_rate": p.rate if p.kind == "intra" else None,
            "dropped": "+".join(MODALITY_LETTERS[m] for m in p.dropped) if p.kind == "inter" else None,
            **{k: float(v) for k, v in r.metrics.items()},
            "wall_time_s": float(wall_time_s),
            **{f"hp.{k}": v for k, v in hparams.items()},
        })
    return rows


OBJECTIVE = "objective"


def epoch_metrics(report, objectives: dict[str, float] | None = None) -> dict[str, Any]:
    """What a run reports each epoch (to Ray Train or Tune): the objective, losses and every
    per-pattern row as one JSON string (Tune's own loggers then keep one column for them)."""
    valid = {r.pattern.name: r.metrics for r in report.results["valid"]}
    return {
        OBJECTIVE: report.objective, "robust_f1": report.objective, "epoch": report.epoch,
        **{f"{OBJECTIVE}/{k}": v for k, v in (objectives or {}).items()},
        "f1_non0_complete": valid.get("intra:0.0", {}).get("f1_non0", float("nan")),
        **{f"loss/{k}": v for k, v in report.losses.items()},
        "rows": json.dumps({split: [{"pattern": r.pattern.name, **r.metrics} for r in rows]
                            for split, rows in report.results.items()}),
    }


def reported_results(metrics: dict[str, Any]) -> dict[str, list[PatternResult]]:
    """The per-split pattern results inside reported `epoch_metrics`."""
    return {split: [PatternResult(parse_pattern(e["pattern"]), {k: v for k, v in e.items() if k != "pattern"})
                    for e in entries]
            for split, entries in json.loads(metrics["rows"]).items()}


class ResultsStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _part(self, trial_id: str, epoch: int) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", trial_id)
        return self.root / f"part-{safe}-epoch{epoch:05d}.parquet"

    def write_report(self, metrics: dict[str, Any], *, experiment: str, trial_id: str, model: str,
                     wall_time_s: float, hparams: dict[str, Any]) -> Path:
        """Store one reported epoch (`epoch_metrics`) of a run or trial."""
        epoch = int(metrics["epoch"])
        rows = [row for split, results in reported_results(metrics).items()
                for row in result_rows(experiment=experiment, trial_id=trial_id, model=model, epoch=epoch,
                                       split=split, results=results, wall_time_s=wall_time_s, hparams=hparams)]
        return self.write_epoch(trial_id, epoch, rows)

    def write_epoch(self, trial_id: str, epoch: int, rows: list[dict]) -> Path:
        """Write all rows of one (trial, epoch); replaces that epoch's part if it exists."""
        if not rows:
            raise ValueError("no rows to write")
        path = self._part(trial_id, epoch)
        table = pa.Table.from_pylist(rows)
        with atomic_file(path, force=True) as tmp:
            pq.write_table(table, tmp)
        return path

    def read(self) -> pd.DataFrame:
        parts = sorted(self.root.glob("part-*.parquet"))
        if not parts:
            return pd.DataFrame(columns=list(KEY_COLUMNS))
        # Parts of different models carry different hyperparameter columns: unify schemas.
        table = pa.concat_tables([pq.read_table(p) for p in parts], promote_options="default")
        return table.to_pandas()
