"""Every file and folder name of a run or experiment directory (DESIGN.md, "Experiment directory").

The one place these names are spelled: the Tune driver, the trials, `train`, `status` and
`export` all go through `Layout`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .storage import experiment_storage, is_uri, join, shown


@dataclass(frozen=True)
class Layout:
    """Paths inside one run (`msa-search train`), seed group (`train --seeds`) or experiment
    (`msa-search tune`) directory.

    `storage` (from `output.storage`, search/storage.py): where the results store, Ray's state
    and checkpoints of an experiment live instead, a path or URI (`with_config` sets it);
    `study_url` (from `search.storage`): the Optuna study's database instead of `optuna.db`."""

    root: Path
    storage: str = ""
    study_url: str = ""

    def with_config(self, cfg) -> "Layout":
        """This layout with the storage the config (an ExperimentConfig) names."""
        return replace(self, storage=experiment_storage(cfg.output.storage, self.root),
                       study_url=cfg.search.storage)

    def _stored(self, *names: str) -> Path | str:
        """`names` in the experiment's storage: a Path when local, a URI string otherwise."""
        if not self.storage:
            return self.root.joinpath(*names)
        location = join(self.storage, *names)
        return location if is_uri(location) else Path(location)

    # --- shared by runs and experiments ---
    @property
    def config(self) -> Path:  # the resolved ExperimentConfig
        return self.root / "config.yaml"

    @property
    def results(self) -> Path | str:  # the Parquet results store (in output.storage when set)
        return self._stored("results")

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
        return self.study_url or f"sqlite:///{self.optuna_db.resolve()}"

    @property
    def has_study(self) -> bool:  # an experiment's: a `train` run has none
        return bool(self.study_url) or self.optuna_db.is_file()

    @property
    def study_location(self) -> str:  # the study's database, as messages name it
        return shown(self.study_url) if self.study_url else str(self.optuna_db)

    @property
    def study_name(self) -> str:
        return f"msa-search-{self.root.name}"

    @property
    def ray(self) -> Path | str:  # Ray Tune's storage_path (in output.storage when set)
        return self._stored("ray")

    TUNE_NAME = "tune"  # Ray Tune's experiment name: its state lives in ray/tune/

    @staticmethod
    def tune_name(round_index: int) -> str:  # trials added later (search/rounds.py): ray/tune-2/, ...
        return Layout.TUNE_NAME if round_index == 0 else f"{Layout.TUNE_NAME}-{round_index + 1}"

    def tune_state(self, round_index: int = 0) -> Path | str:  # what Tuner.restore reads
        return self._stored("ray", self.tune_name(round_index))

    @property
    def rounds(self) -> Path:  # trials added to the search after it started (tune --add-trials)
        return self.root / "rounds.json"

    def summary(self) -> str:
        """What the experiment holds and where, as `tune` names it at its end: its study only
        where it has one (a PBT search samples without Optuna), storage named where set."""
        def where(location: Path | str, name: str) -> str:
            return f"{name}/" if location == self.root / name else f"{name}: {shown(str(location))}"

        study = ([self.optuna_db.name] if self.optuna_db.is_file() else
                 [f"study: {shown(self.study_url)}"] if self.study_url else [])
        return ", ".join([self.config.name, *study, where(self.results, "results"), where(self.ray, "ray")])

    @property
    def space(self) -> Path:  # the resolved search space
        return self.root / "space.json"

    @property
    def is_experiment(self) -> bool:  # `msa-search tune` made it (a `train` run has neither file)
        return self.space.is_file() or self.optuna_db.is_file()

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
    def driver(self) -> Path:  # the running search's driver: host, pid (search/driver_presence.py)
        return self.root / ".driver"

    @property
    def logs(self) -> Path:  # Ray's and Optuna's own output while the console shows the live view
        return self.root / "logs"

    @property
    def ray_log(self) -> Path:
        return self.logs / "ray.log"

    @property
    def nested_trials(self) -> Path | str:  # storage of the Ray Train runs that trials nest
        return self._stored("trials")

    @property
    def ray_train_storage(self) -> Path | str:  # `train.workers >= 1`: Ray Train's storage_path
        return self._stored("checkpoints")

    @property
    def trial_starts(self) -> Path:  # the order in which trials started (search.nan_trial)
        return self.root / ".trial-starts"

    # --- seed groups (`msa-search train --seeds`): one ordinary run directory per seed ---
    @property
    def seed_group(self) -> Path:  # marks a group and names its seeds
        return self.root / "seed_group.json"

    def seed_run(self, seed: int) -> Path:
        return self.root / f"seed-{seed}"
