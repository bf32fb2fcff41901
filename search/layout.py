"""Every file and folder name of a run or experiment directory (DESIGN.md, "Experiment directory").

The one place these names are spelled: the Tune driver, the trials, `train`, `status` and
`export` all go through `Layout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    """Paths inside one run (`msa-search train`), seed group (`train --seeds`) or experiment
    (`msa-search tune`) directory."""

    root: Path

    # --- shared by runs and experiments ---
    @property
    def config(self) -> Path:  # the resolved ExperimentConfig
        return self.root / "config.yaml"

    @property
    def results(self) -> Path:  # the Parquet results store
        return self.root / "results"

    @property
    def data(self) -> Path:  # the Parquet dataset (synthesized or converted once)
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:  # in-process: last.pt; Ray Train: its checkpoint_* dirs
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def epoch_log(self) -> Path:  # distributed runs: one JSON line per epoch
        return self.root / "epochs.jsonl"

    # --- experiments ---
    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def optuna_storage(self) -> str:  # an SQLAlchemy URL, as Optuna's RDBStorage takes it
        return f"sqlite:///{self.optuna_db.resolve()}"

    @property
    def study_name(self) -> str:
        return f"msa-search-{self.root.name}"

    @property
    def ray(self) -> Path:  # Ray Tune's storage_path
        return self.root / "ray"

    TUNE_NAME = "tune"  # Ray Tune's experiment name: its state lives in ray/tune/

    @property
    def tune_state(self) -> Path:  # what Tuner.restore reads
        return self.ray / self.TUNE_NAME

    @property
    def space(self) -> Path:  # the resolved search space
        return self.root / "space.json"

    @property
    def failures(self) -> Path:  # one JSON line per failed trial
        return self.root / "failures.jsonl"

    @property
    def trial_params_dir(self) -> Path:
        return self.root / "trial_params"

    def trial_params(self, trial_id: str) -> Path:  # a trial's sampled dotted keys
        return self.trial_params_dir / f"{trial_id}.json"

    @property
    def report(self) -> Path:  # the self-contained HTML report (`msa-search report`)
        return self.root / "report.html"

    def protocol_table(self, protocol: str) -> Path:  # `msa-search report --protocol paper|reference-lnln`
        return self.root / f"table-{protocol}.md"

    @property
    def logs(self) -> Path:  # Ray's and Optuna's own output while the console shows the live view
        return self.root / "logs"

    @property
    def ray_log(self) -> Path:
        return self.logs / "ray.log"

    @property
    def nested_trials(self) -> Path:  # storage of the Ray Train runs that trials nest
        return self.root / "trials"

    @property
    def trial_starts(self) -> Path:  # the order in which trials started (search.nan_trial)
        return self.root / ".trial-starts"

    # --- seed groups (`msa-search train --seeds`): one ordinary run directory per seed ---
    @property
    def seed_group(self) -> Path:  # marks a group and names its seeds
        return self.root / "seed_group.json"

    def seed_run(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"
