"""Seed groups: `msa-search train --seeds 1111,1112,1113` (or `train.seeds`) trains one run
per seed into one directory, as the papers train three seeds (LNLN: 1111-1113):

    DIR/seed_group.json   the seeds, in order; written first, so a group that stopped part-way is one
    DIR/seed-1111/        exactly what `msa-search train` writes with train.seed 1111
    DIR/seed-1112/        ...

Each run's config.yaml has train.seed set and train.seeds empty: `train --config` on it
retrains that one run. `train --resume DIR` goes on with a group stopped part-way
(resume_group): finished runs kept, unfinished ones resumed, seeds not started started.
`msa-search report DIR --protocol paper` averages the seeds (search/protocol.py). The names
come from search/layout.py.
"""
from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.atomic import atomic_file
from data_pipeline.errors import MsaSearchError

from .config import ConfigError, ExperimentConfig
from .layout import Layout


@dataclass(frozen=True)
class SeedGroup:
    root: Path
    seeds: list[int]

    def runs(self) -> list[tuple[int, Path]]:
        """(seed, run directory) in the order the seeds were given."""
        layout = Layout(self.root)
        return [(seed, layout.seed_run(seed)) for seed in self.seeds]


def parse_seeds(text: str) -> list[int]:
    """`--seeds 1111,1112,1113` -> [1111, 1112, 1113]. ConfigError for what is not an integer;
    TrainConfig checks the rest (distinct, non-negative) for YAML and --seeds alike."""
    items = [item.strip() for item in text.split(",")]
    for item in items:
        if not item.lstrip("-").isdigit():
            raise ConfigError(f"--seeds '{text}': '{item}' is not an integer; give distinct integers separated by "
                              "commas, e.g. --seeds 1111,1112,1113")
    return [int(item) for item in items]


def read_group(root: str | Path) -> SeedGroup | None:
    """The group in `root`, or None when `root` is not one."""
    marker = Layout(Path(root)).seed_group
    if not marker.is_file():
        return None
    return SeedGroup(Path(root), [int(s) for s in json.loads(marker.read_text())["seeds"]])


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """One seed's run: train.seed set, train.seeds emptied, output.dir inside the group."""
    run_dir = Layout(Path(cfg.output.dir)).seed_run(seed)
    return cfg.with_params({"train.seed": seed, "train.seeds": [], "output.dir": str(run_dir)})


TrainOne = Callable[[ExperimentConfig | None, Path | None], str]  # (a new run's config, or the run to resume)


def train_group(cfg: ExperimentConfig, train_one: TrainOne, *, say: Callable[[str], None],
                keep_going: bool = True) -> SeedGroup:
    """Train `cfg.train.seeds` one after the other into `cfg.output.dir` (a new directory).

    `train_one(config, None)` trains one seed's config and returns its result line. A seed that
    fails is reported and the next one starts (`keep_going`; a config refusal stops the group, it
    would refuse every seed); finished seeds always stay. Raises MsaSearchError at the end naming
    the failed seeds. A group in which no run was left is removed, so the command can run again."""
    from .run import check_new_run_dir  # run.py brings torch; reading a group needs none

    layout = Layout(Path(cfg.output.dir))
    check_new_run_dir(layout.root)
    configs = [seed_config(cfg, seed) for seed in cfg.train.seeds]  # every seed validated before anything starts
    existed = layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    with atomic_file(layout.seed_group, force=True) as tmp:
        tmp.write_text(json.dumps({"seeds": cfg.train.seeds}) + "\n")
    group = SeedGroup(layout.root, list(cfg.train.seeds))
    try:
        _train_seeds(group, [(c.train.seed, lambda c=c: train_one(c, None)) for c in configs], say, keep_going)
    finally:
        if not any(run.exists() for _, run in group.runs()):
            layout.seed_group.unlink(missing_ok=True)
            if not existed:
                shutil.rmtree(layout.root, ignore_errors=True)
    return group


def resume_group(group: SeedGroup, train_one: TrainOne, *, say: Callable[[str], None],
                 keep_going: bool = True) -> SeedGroup:
    """Go on with a group that stopped part-way (Ctrl-C, a crash, a failed seed): a run that
    trained all its epochs is kept as it is, one that did not goes on from its last checkpoint
    (`train_one(None, run)`), and a seed not started yet starts (`train_one(config, None)`,
    the config a started run's with that seed: they differ in nothing else)."""
    from .run import config_to_resume, epochs_stored

    runs = group.runs()
    started = {run: config_to_resume(run) for _, run in runs if Layout(run).config.is_file()}
    if not started:
        raise MsaSearchError(f"seed group {group.root}: no run of it started; train it anew")
    base = next(iter(started.values()))
    steps = []
    for seed, run in runs:
        cfg = started.get(run)
        done = 0 if cfg is None else epochs_stored(run, cfg)
        if cfg is not None and done >= cfg.train.epochs:
            steps.append((seed, lambda: "ran all its epochs already: kept as it is"))
        elif done:
            steps.append((seed, lambda run=run: train_one(None, run)))
        else:  # not started, or stopped in its first epoch (nothing stored, no checkpoint): anew
            cfg = base.with_params({"train.seed": seed, "output.dir": str(run)})
            steps.append((seed, functools.partial(_anew, run, cfg, train_one)))
    _train_seeds(group, steps, say, keep_going)
    return group


def _anew(run: Path, cfg: ExperimentConfig, train_one: TrainOne) -> str:
    """A seed's run from the start, in a clean directory (one stopped in its first epoch holds
    only its config and data: nothing to keep)."""
    shutil.rmtree(run, ignore_errors=True)
    return train_one(cfg, None)


def _train_seeds(group: SeedGroup, steps: list[tuple[int, Callable[[], str]]], say: Callable[[str], None],
                 keep_going: bool) -> None:
    """Run each seed's step in order, saying which; see train_group for failures."""
    failed: list[tuple[int, Exception]] = []
    runs = dict(group.runs())
    for k, (seed, step) in enumerate(steps, start=1):
        say(f"seed {seed} ({k}/{len(steps)}): {runs[seed]}")
        try:
            say(step())
        except ConfigError:
            raise
        except Exception as exc:  # a diverged or crashed seed: the others still run
            if not keep_going:
                raise
            failed.append((seed, exc))
            say(f"seed {seed} ({k}/{len(steps)}) failed: {exc}")
    if failed:
        finished = [seed for seed in group.seeds if seed not in dict(failed)]
        first_seed, first_error = failed[0]
        if not finished:
            raise first_error
        raise MsaSearchError(f"seed group {group.root}: seed{'s' if len(failed) > 1 else ''} "
                             f"{', '.join(str(s) for s, _ in failed)} failed (seed {first_seed}: {first_error}); "
                             f"finished: {', '.join(map(str, finished))}, kept in {group.root}; `msa-search train "
                             f"--resume {group.root}` retries the failed from their last checkpoints")
