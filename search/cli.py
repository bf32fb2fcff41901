"""The `msa-search` command line (DESIGN.md, CLI contract).

Every failure a user can cause ends with one line on stderr and a non-zero exit;
`--debug` shows the traceback instead.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.atomic import refuse_existing, unwritable
from data_pipeline.errors import MsaSearchError

from .consoles import make_console

app = typer.Typer(help="Hyperparameter and robustness search for multimodal sentiment analysis under missing modalities.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode="markdown")
data_app = typer.Typer(help="Synthesize, convert and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
dashboards_app = typer.Typer(help="Grafana dashboards as code: build the JSON and provisioning files, push them.",
                             no_args_is_help=True)
app.add_typer(dashboards_app, name="dashboards")

console = make_console()
err_console = make_console(stderr=True)
_state = {"debug": False}


class DataFormat(str, Enum):
    parquet = "parquet"
    mmsa_pkl = "mmsa-pkl"


class Protocol(str, Enum):
    search = "search"
    paper = "paper"
    reference_lnln = "reference-lnln"


class Preset(str, Enum):
    mosi = "mosi"
    mosi_aligned = "mosi-aligned"
    mosei = "mosei"
    sims = "sims"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _state["debug"] = debug


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), console=err_console, transient=False,
                    disable=not err_console.is_terminal)  # logs and pipes get the result lines only


@data_app.command("synth")
def data_synth(
    preset: Preset = typer.Option(..., help="Shapes of which real dataset to imitate."),
    out: Path = typer.Option(..., help="Output: a directory (parquet) or a .pkl file (mmsa-pkl)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives byte-identical data."),
    scale: float = typer.Option(1.0, help="Multiply the real split sizes (e.g. 0.1 for quick runs)."),
    format: DataFormat = typer.Option(DataFormat.parquet, "--format", help="parquet store or MMSA pickle."),
    force: bool = typer.Option(False, help="Replace an existing output."),
) -> None:
    """Write a synthetic dataset with a planted, language-dominant sentiment signal."""
    from data_pipeline.mmsa import write_mmsa
    from data_pipeline.store import write_store
    from data_pipeline.synth import split_sizes, synthesize

    refuse_existing(out, force, file=format is DataFormat.mmsa_pkl)
    sizes = split_sizes(preset.value, scale)
    with _progress() as progress:
        task = progress.add_task(f"synthesizing {preset.value}", total=sum(sizes.values()) + 1)
        dataset = synthesize(preset.value, seed=seed, scale=scale, progress=lambda s, n: progress.advance(task, n))
        progress.update(task, description=f"writing {format.value}")
        if format is DataFormat.parquet:
            write_store(dataset, out, force=force)
        else:
            write_mmsa(dataset, out, force=force)
        progress.advance(task)
    console.print(f"wrote {format.value} {out} ({', '.join(f'{k} {v}' for k, v in sizes.items())})")


@data_app.command("convert")
def data_convert(
    src: Path = typer.Argument(..., help="An MMSA pickle (aligned_50.pkl, unaligned_50.pkl, ...)."),
    out: Path = typer.Option(..., help="Output directory for the Parquet dataset."),
    dataset: str = typer.Option(None, help="Dataset family (mosi, mosei, sims); default: guessed from the file."),
    force: bool = typer.Option(False, help="Replace an existing output directory."),
) -> None:
    """Validate an MMSA pickle and convert it to the Parquet store (atomic: all or nothing)."""
    from data_pipeline.mmsa import read_mmsa
    from data_pipeline.store import write_store

    refuse_existing(out, force)
    with _progress() as progress:
        task = progress.add_task(f"reading {src.name}", total=4)
        data = read_mmsa(src, dataset=dataset)
        progress.advance(task)
        progress.update(task, description="writing parquet")
        write_store(data, out, force=force, progress=lambda split: progress.advance(task))
    console.print(f"wrote {out} ({', '.join(f'{k} {v}' for k, v in data.spec.split_sizes.items())})")


@data_app.command("export")
def data_export(
    store: Path = typer.Argument(..., help="A Parquet dataset directory (converted or synthesized)."),
    out: Path = typer.Option(..., "--out", help="Output file (e.g. unaligned_50.pkl)."),
    format: DataFormat = typer.Option(DataFormat.mmsa_pkl, "--format", help="Only mmsa-pkl: the store is Parquet already."),
    force: bool = typer.Option(False, help="Replace an existing output."),
) -> None:
    """Write a Parquet dataset as an MMSA pickle (every key MMSA-style loaders read; atomic)."""
    from data_pipeline.mmsa import write_mmsa
    from data_pipeline.store import read_store

    if format is not DataFormat.mmsa_pkl:
        raise MsaSearchError(f"--format {format.value}: {store} is a Parquet store already; export writes mmsa-pkl")
    refuse_existing(out, force, file=True)
    with _progress() as progress:
        task = progress.add_task(f"reading {store.name}", total=2)
        dataset = read_store(store)
        progress.advance(task)
        progress.update(task, description=f"writing {out.name}")
        write_mmsa(dataset, out, force=force)
        progress.advance(task)
    console.print(f"wrote mmsa-pkl {out} ({', '.join(f'{k} {v}' for k, v in dataset.spec.split_sizes.items())})")


@data_app.command("inspect")
def data_inspect(
    store: Path = typer.Argument(..., help="A Parquet dataset directory, or an MMSA pickle (validated as "
                                           "`data convert` does, nothing written)."),
    dataset: str = typer.Option(None, "--dataset", help="An MMSA pickle's dataset family (mosi, mosei, sims), as "
                                                        "for `data convert`; default: guessed from the file."),
) -> None:
    """Show splits, sizes, dims and the label histogram of a Parquet dataset or an MMSA pickle."""
    from data_pipeline.inspect import render, summarize

    console.print(render(*summarize(store, dataset)))


# Options shared by the commands that run experiments.
DEFAULT_CONFIG = Path("configs/quick.yaml")
CONFIG_OPTION = typer.Option(None, "--config", show_default=str(DEFAULT_CONFIG), help="Experiment config (YAML).")
SET_OPTION = typer.Option([], "--set", help="Override a config key: --set train.epochs=5 (repeatable).")
ADDRESS_OPTION = typer.Option(None, "--address", envvar="RAY_ADDRESS",
                              help="Ray cluster to join (default: start a private local one).")


def _resume_keeps_its_config(resume: Path | None, config: Path | None, overrides: list[str]) -> None:
    """A resumed run or search goes on with the config it started with (DIR/config.yaml), so a
    --config or --set given with --resume would be ignored: refused instead of dropped silently
    (e.g. `--set search.num_samples=50`, meant to extend a search, would otherwise do nothing:
    `--add-trials` does that)."""
    from .config import ConfigError

    given = ([f"--config {config}"] if config is not None else []) + [f"--set {o}" for o in overrides]
    if resume is not None and given:
        raise ConfigError(f"--resume {resume} goes on with the config it started with ({resume / 'config.yaml'}); "
                          f"{' '.join(given)} would be ignored. To change it, start anew from that config: "
                          f"--config {resume / 'config.yaml'} --set ... --set output.dir=NEW"
                          + ("; or run more trials on the same study: msa-search tune --resume "
                             f"{resume} --add-trials N" if any(o.startswith("search.num_samples") for o in overrides)
                             else ""))


@app.command("train")
def train(
    config: Path | None = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    resume: Path = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint "
                                                       "(a seed group: its runs not finished, and its seeds not started)."),
    address: str = ADDRESS_OPTION,
    init_from: Path = typer.Option(None, "--init-from",
                                   help="Start from these weights: a run directory of ours (its newest checkpoint: "
                                        "in-process, DDP or DeepSpeed), a checkpoint file of ours or a state dict, or "
                                        "the reference LNLN code's (.pth); a new run only."),
    seeds: str = typer.Option(None, "--seeds",
                              help="Train one run per seed, e.g. 1111,1112,1113 (sets train.seeds): output.dir "
                                   "becomes a seed group with one run directory per seed (seed-1111/, ...)."),
) -> None:
    """Run one training run: per-epoch metrics on valid and test over the missing-pattern grid.

    train.workers = 0 trains in-process; >= 1 runs Ray Train workers with train.engine
    (deepspeed or ddp). With --seeds (or train.seeds) one run per seed, one after the
    other; `msa-search report DIR --protocol paper` then averages them."""
    from .config import ConfigError, load_config
    from .seed_group import parse_seeds, read_group, resume_group, train_group

    if resume is not None and init_from is not None:
        raise MsaSearchError("--init-from starts a new run; --resume continues one from its own checkpoint")
    if init_from is not None:
        from .storage import local

        init_from = Path(local(init_from))  # a file:// URI, as tune names an output.storage, is a path
    if resume is not None and seeds is not None:
        raise ConfigError("--seeds starts a new seed group; --resume continues a run or a group with its own seeds")
    _resume_keeps_its_config(resume, config, set_)
    overrides = [*set_, f"train.seeds=[{', '.join(map(str, parse_seeds(seeds)))}]"] if seeds is not None else set_
    cfg = None if resume is not None else load_config(config or DEFAULT_CONFIG, overrides)
    if cfg is not None:
        _refuse_unwritable_output(cfg)
    group = read_group(resume) if resume is not None else None
    if group is not None or (cfg is not None and cfg.train.seeds):
        train_one = lambda seed_cfg, run: _train_one(seed_cfg, run, address, init_from)  # noqa: E731
        keep_going = not _state["debug"]
        if group is not None:
            group = resume_group(group, train_one, say=err_console.print, keep_going=keep_going)
        else:
            group = train_group(cfg, train_one, say=err_console.print, keep_going=keep_going)
        console.print(f"done: seed group {group.root} (seeds {', '.join(map(str, group.seeds))}); next: "
                      f"msa-search report {group.root} --protocol paper", soft_wrap=True)
        return
    console.print(_train_one(cfg, resume, address, init_from), soft_wrap=True)


def _train_one(cfg, resume: Path | None, address: str | None, init_from: Path | None) -> str:
    """One run (in-process or on Ray Train workers); returns its result line. Ctrl-C (or a
    SIGINT) says where the run's last checkpoint is and how to go on from it."""
    from .run import config_to_resume, epochs_stored, train_in_process

    if resume is not None:
        cfg = config_to_resume(resume)
    run_dir = Path(resume or cfg.output.dir).resolve()
    try:
        if cfg.train.workers >= 1:
            from .distributed import train_distributed

            out, metrics = train_distributed(cfg, resume_dir=resume, console=err_console,
                                             ray_address=address, init_from=init_from)
            return (f"done: {out} (config.yaml, results/, checkpoints/, logs/ray.log); "
                    f"last epoch valid robust_f1 {metrics.get('robust_f1', float('nan')):.4f}")
        state, out = train_in_process(cfg, console=err_console, init_from=init_from, resume_dir=resume)
    except KeyboardInterrupt:
        from .seed_group import read_group

        group = read_group(run_dir.parent)
        if group is not None and run_dir in dict(group.runs()).values():  # the group goes on, its runs with it
            err_console.print(f"interrupted: go on with seed group {group.root} (its finished runs kept, this one "
                              f"from its last checkpoint) with: msa-search train --resume {group.root}",
                              highlight=False, soft_wrap=True)
        elif run_dir.is_dir() and not epochs_stored(run_dir, cfg):  # (absent: stopped before it had started)
            err_console.print(f"interrupted in its first epoch: {run_dir} has no checkpoint to go on from; remove it "
                              "to train the run anew", highlight=False, soft_wrap=True)
        elif run_dir.is_dir():
            err_console.print(f"interrupted: go on from {run_dir}'s last checkpoint with: "
                              f"msa-search train --resume {run_dir}", highlight=False, soft_wrap=True)
        raise
    last = f"last epoch valid {cfg.search.objective} {state.history[-1].objective:.4f}" if state.history else \
        "nothing left to train"
    return f"done: {out} (config.yaml, results/, checkpoints/); {last}"


@app.command("tune")
def tune_cmd(
    config: Path | None = CONFIG_OPTION,
    set_: list[str] = SET_OPTION,
    resume: Path = typer.Option(None, "--resume", help="Continue this experiment: the trials an interrupted search "
                                                       "left unfinished (and with --add-trials, more)."),
    add_trials: int = typer.Option(None, "--add-trials", min=1,
                                   help="With --resume: sample and run this many more trials on the experiment's "
                                        "study (a finished search too), with its config; its sampler and ASHA see "
                                        "every earlier trial."),
    address: str = ADDRESS_OPTION,
    verbose: bool = typer.Option(False, "--verbose",
                                 help="Show Ray's own trial tables and logs too (otherwise in EXP/logs/ray.log)."),
) -> None:
    """Search loss weights and adversarial schedules with Ray Tune + Optuna (the main job).

    Shows a live view of the search on stderr. Exits non-zero when no trial completed (the
    first failure's reason is on stderr)."""
    from .config import load_config
    from .tune import run_experiment

    if add_trials is not None and resume is None:
        raise MsaSearchError("--add-trials adds trials to an experiment: give it with --resume EXP")
    _resume_keeps_its_config(resume, config, set_)
    cfg = None if resume is not None else load_config(config or DEFAULT_CONFIG, set_)
    if cfg is not None:
        _refuse_unwritable_output(cfg)
    try:
        outcome = run_experiment(cfg, resume_dir=resume, ray_address=address, verbose=verbose, add_trials=add_trials)
    except Exception as exc:
        fault = None if _our_error(exc) else _disk_fault(exc, Path(resume or cfg.output.dir).resolve())
        if fault is None:
            raise
        raise fault from exc
    if outcome.interrupted:
        # The view's last line has each trial's state; Tune calls the cut-off ones terminated.
        _print_status(outcome.exp_dir, cut_off_line=False)  # the next line says how to go on
        err_console.print(f"interrupted: the search's state is saved in {outcome.exp_dir}; go on with: "
                          f"msa-search tune --resume {outcome.exp_dir}", highlight=False, soft_wrap=True)
        raise typer.Exit(130)  # the shell's code for a command ended by Ctrl-C (128 + SIGINT)
    if outcome.nothing_to_run:
        err_console.print(f"{outcome.exp_dir}: every trial of this search has ended, nothing to resume (Ray not "
                          f"started); to run more on its study: msa-search tune --resume {outcome.exp_dir} "
                          "--add-trials N", highlight=False, soft_wrap=True)
    counts = ", ".join(f"{n} {state}" for state, n in outcome.trials.items() if n) or "none"
    console.print(f"trials: {counts}")
    deferred = outcome.deferred_tests
    if deferred.evaluated:
        console.print(f"test grid (train.eval_test: deferred) evaluated after the search for "
                      f"{len(deferred.evaluated)} trial(s) that stopped early: {', '.join(deferred.evaluated)}")
    for line in deferred.skipped:
        console.print(f"test grid not evaluated for trial {line}", style="yellow")
    if not outcome.any_completed:
        raise MsaSearchError(f"no trial completed ({counts}); first failure: {outcome.first_failure or 'unknown'}; "
                             f"details in {outcome.exp_dir}")
    layout = _print_status(outcome.exp_dir)
    console.print(f"experiment: {outcome.exp_dir} ({layout.summary()}); "
                  f"next: msa-search export {outcome.exp_dir} --out {outcome.exp_dir}/best.yaml", soft_wrap=True)


def _disk_fault(exc: Exception, exp: Path) -> MsaSearchError | None:
    """A search that failed inside Ray or Optuna, not in a write of ours, because the experiment's
    disk filled up or turned read-only half-way (its study's database written by Optuna, Ray
    Tune's own files): one line naming the file and why, or None when that was not the cause."""
    from data_pipeline.atomic import OutputWriteError, location_fault

    from .config import load_config
    from .layout import Layout

    layout = Layout(exp)
    try:  # written before the search started; it names where the study and results live
        layout = layout.with_config(load_config(layout.config))
    except (MsaSearchError, OSError, ValueError):
        pass
    in_study = any(type(e).__module__.split(".")[0] in ("sqlalchemy", "optuna", "sqlite3") for e in _chain(exc))
    target = layout.optuna_db if in_study and not layout.study_url else exp
    why = location_fault(target)
    if why is None:
        return None
    return OutputWriteError(f"{target}: cannot write ({why}); the search stopped, the rows written before stay "
                            f"readable in {layout.results}")


def _refuse_unwritable_output(cfg) -> None:
    """An output.dir that cannot be made is refused with the config, before any data or Ray."""
    from .config import ConfigError

    reason = unwritable(Path(cfg.output.dir), inside=True)
    if reason:
        raise ConfigError(f"config key 'output.dir': expected a directory this user can write "
                          f"({cfg.output.dir}), found {reason}")


def _print_status(exp: Path, cut_off_line: bool = True):
    """Print the experiment's (or run's) state; returns its Layout, storage set from its config."""
    from .driver_presence import driver_state
    from .evaluation_plan import POLICY_EPOCHS, resolved_policy
    from .export import (load_experiment, pattern_table, score_trials, stored_pattern_metrics, trial_states,
                         tune_trial_states)
    from .objective import held_out_patterns
    from .report_data import text_missing_note
    from .rounds import search_rounds
    from .study import uses_study

    layout, cfg, df = load_experiment(exp, hparams=False)  # configs come from the params files
    if layout.is_experiment:
        in_study = uses_study(cfg)
        states = trial_states(layout) if in_study else tune_trial_states(layout)
        console.print(("study: " if in_study else "trials (PBT samples without an Optuna study; Tune's state): ")
                      + (", ".join(f"{k} {v}" for k, v in sorted(states.items())) or "no trials yet"))
        first, *added = search_rounds(layout, cfg)
        if added:
            console.print(f"trials asked for: {first.trials} (search.num_samples), then "
                          f"{' + '.join(str(r.trials) for r in added)} added (tune --add-trials)")
        if cut_off_line and states.get("running") and driver_state(layout) == "stopped":
            console.print(f"no search is running: its {states['running']} running trial(s) were cut off (Ctrl-C or a "
                          f"stopped driver); go on with: msa-search tune --resume {layout.root}", soft_wrap=True)
    else:  # a `train` or `evaluate` run: no study, one trial
        stored = df.epoch.nunique() if not df.empty else 0
        console.print(f"run directory (msa-search train or evaluate; no study): {stored} epoch"
                      f"{'' if stored == 1 else 's'} stored, of train.epochs {cfg.train.epochs}")
    if df.empty:
        return layout
    best = score_trials(layout, cfg, df)[0]
    console.print(f"best so far: trial {best.trial_id} epoch {best.epoch} "
                  f"{cfg.search.objective} (valid) {best.objective:.4f}")
    rows = df[(df.trial_id == best.trial_id) & (df.epoch == best.epoch)]
    console.print(text_missing_note(cfg))
    results = {split: stored_pattern_metrics(rows[rows.split == split]) for split in ("valid", "test")}
    if not results["test"]:
        policy = resolved_policy(cfg, in_search=True)
        console.print(f"epoch {best.epoch} of trial {best.trial_id} has no test results: train.eval_test "
                      f"{policy} evaluates the test grid {POLICY_EPOCHS[policy]}")
    console.print(pattern_table(f"trial {best.trial_id}, epoch {best.epoch} (* = held out of the objective)",
                                results, cfg.missing.eval_grid,
                                held_out_patterns(cfg.missing.eval_grid, cfg.search.objective_patterns)))
    return layout


@app.command("status")
def status_cmd(exp: Path = typer.Argument(..., help="Experiment directory.")) -> None:
    """Trials by state, the best so far, and its per-pattern table."""
    _print_status(exp)


@app.command("export")
def export_cmd(
    exp: Path = typer.Argument(..., help="Experiment directory."),
    out: Path = typer.Option(..., "--out", help="Output YAML (with --top K: FILE, FILE-2, ...)."),
    top: int = typer.Option(None, "--top", min=1,
                            help="How many of the best trials to export (default 1; multi-objective: the Pareto front)."),
    objective: str = typer.Option(None, "--objective", help="Rank by this instead of search.objective."),
) -> None:
    """Write the best trials as complete configs; `msa-search train --config FILE` retrains one."""
    from .export import export_best

    refuse_existing(out, force=True, file=True)  # before reading the experiment
    written = export_best(exp, out, top=top, objective=objective)
    for path in written:
        console.print(f"wrote {path}")
    if top is not None and len(written) < top:
        err_console.print(f"note: {len(written)} of the {top} asked for (--top): only {len(written)} trial(s) "
                          "finished all train.epochs (a multi-objective search's: on its Pareto front)",
                          highlight=False, soft_wrap=True)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint",
                                    help="Weights: a run directory or a Tune trial's directory of ours (its newest "
                                         "checkpoint: in-process, DDP or DeepSpeed, ZeRO-3 included), a checkpoint "
                                         "file of ours or a state dict, or "
                                         "the reference LNLN code's (.pth), told apart by its names."),
    config: Path = typer.Option(..., "--config", help="Config that builds the model and names the data and the grid."),
    set_: list[str] = SET_OPTION,
    out: Path = typer.Option(None, "--out",
                             help="New run directory (default: ./eval-NAME, NAME the checkpoint's file or directory "
                                  "name without its extension, or a Tune trial's id)."),
) -> None:
    """Evaluate a checkpoint over missing.eval_grid on valid and test, without training.

    Writes DIR/config.yaml and DIR/results/ (epoch 0, trial_id = the checkpoint's NAME, see --out),
    which `msa-search report DIR` reads like a run."""
    from .config import load_config
    from .evaluate_checkpoint import evaluate_checkpoint, results_table
    from .storage import local
    from .weights import checkpoint_name

    checkpoint = Path(local(checkpoint))  # a file:// URI, as tune names an output.storage, is a path
    cfg = load_config(config, set_)
    with err_console.status(f"evaluating {checkpoint.name} on {len(cfg.missing.eval_grid)} patterns"):
        evaluation = evaluate_checkpoint(checkpoint, cfg, out or Path(f"eval-{checkpoint_name(checkpoint)}"),
                                         on_skip=err_console.print)
    console.print(results_table(evaluation, cfg))
    console.print(f"wrote {evaluation.out} (config.yaml, results/)")


@app.command("report")
def report_cmd(
    exp: Path = typer.Argument(..., help="Experiment directory (msa-search tune), run directory (msa-search train) "
                                         "or, with --protocol paper|reference-lnln, a seed group (train --seeds)."),
    out: Path = typer.Option(None, "--out",
                             help="Output file. search: HTML (default EXP/report.html); paper, reference-lnln: "
                                  ".md, .csv or .html by its extension (default EXP/table-PROTOCOL.md)."),
    protocol: Protocol = typer.Option(Protocol.search, "--protocol",
                                      help="search: the HTML report of a search or run. paper: the papers' table "
                                           "(test metrics averaged over intra rates 0.0-0.9, mean ± std over "
                                           "seeds, epoch chosen on valid). reference-lnln: the same with the "
                                           "reference code's choice on the TEST split at r=0.5, labelled so."),
    top: int = typer.Option(None, "--top", min=1,
                            help="paper, reference-lnln on an experiment: one row for each of the trials "
                                 "`export --top K` writes (default 1; multi-objective: the Pareto front)."),
    metric: str = typer.Option(None, "--metric",
                               help="search: metric of the robustness curves, pattern heat map and per-pattern "
                                    "importance (default f1_non0)."),
    watch: bool = typer.Option(False, "--watch", help="search: re-render every --interval seconds until Ctrl-C."),
    interval: float = typer.Option(10.0, "--interval", min=0.1, help="Seconds between renders with --watch."),
) -> None:
    """Write one self-contained HTML report (plotly, nothing loaded from the network), or the papers' table.

    search (default): robustness curves, trial x pattern heat map, best objective over time,
    parallel coordinates of the hyperparameters, hyperparameter importance, Pareto front
    (multi-objective searches) and importance per missing pattern.

    paper / reference-lnln: one row per seed group, run, or exported trial of an experiment,
    printed and written to --out."""
    from .config import ConfigError

    if out is not None:
        refuse_existing(out, force=True, file=True)  # before reading the experiment
    if protocol is not Protocol.search:
        for given, name in ((metric is not None, "--metric"), (watch, "--watch")):
            if given:
                raise ConfigError(f"{name} is an option of --protocol search, not of --protocol {protocol.value}")
        from .layout import Layout
        from .protocol import build_table
        from .protocol_render import console_view, write_table

        table = build_table(exp, protocol.value, top=top)
        path = write_table(table, out or Layout(exp).protocol_table(protocol.value))
        console.print(console_view(table))
        console.print(f"wrote {path}", soft_wrap=True)
        return
    from .report import watch_report, write_report
    from .seed_group import read_group

    if top is not None:
        raise ConfigError("--top is an option of --protocol paper|reference-lnln on an experiment")
    group = read_group(exp)
    if group is not None:
        raise ConfigError(f"{exp}: a seed group; --protocol paper averages its seeds, and the search report draws "
                          f"one run: msa-search report {group.runs()[0][1]}")
    metric = metric or "f1_non0"
    if not watch:
        console.print(f"wrote {write_report(exp, out, metric)}", soft_wrap=True)
        return
    try:
        with ctrl_c_latch() as sleep:
            watch_report(exp, out, metric, interval, on_render=lambda line: console.print(line, soft_wrap=True),
                         sleep=sleep)
    except KeyboardInterrupt:  # Ctrl-C is how a watch ends
        console.print("stopped")


@contextmanager
def ctrl_c_latch() -> Iterator[Callable[[float], None]]:
    """Yield a sleep that raises KeyboardInterrupt once Ctrl-C was pressed in the block, even
    where that press's KeyboardInterrupt was lost: Python raises it in whatever code runs when
    the signal arrives, and C code that clears every error (some attribute lookups do) can
    swallow it. Main thread only."""
    pressed = threading.Event()

    def on_sigint(signum, frame):
        pressed.set()
        raise KeyboardInterrupt

    def sleep(seconds: float) -> None:
        if pressed.wait(seconds):
            raise KeyboardInterrupt

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started so (a shell's background job): keep it
        yield time.sleep
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield sleep
    finally:
        signal.signal(signal.SIGINT, previous)


@dashboards_app.command("build")
def dashboards_build(
    out: Path = typer.Option(Path("dashboards"), "--out", help="Directory for robustness.json and provisioning/."),
    prometheus_url: str = typer.Option(None, "--prometheus-url",
                                       help="Prometheus the provisioned data source reads (default: "
                                            "http://localhost:9090, where `ray metrics launch-prometheus` listens)."),
    grafana_dir: str = typer.Option(None, "--grafana-dir",
                                    help="Where Grafana sees the --out directory: the file provider's options.path "
                                         "(default: /var/lib/grafana/dashboards/msa-search)."),
) -> None:
    """Write the robustness dashboard (Grafana JSON) and Grafana provisioning files.

    provisioning/ holds datasources/ (Prometheus, fixed uid) and dashboards/ (a file provider).
    Point Grafana's provisioning directory (paths.provisioning) at it."""
    from . import dashboards

    for path in dashboards.write_dashboards(out, prometheus_url or dashboards.DEFAULT_PROMETHEUS_URL,
                                            grafana_dir or dashboards.DEFAULT_GRAFANA_DIR):
        console.print(f"wrote {path}")


@dashboards_app.command("push")
def dashboards_push(
    url: str = typer.Option(..., "--url", help="Grafana's base URL, e.g. http://grafana:3000."),
    prometheus_url: str = typer.Option(None, "--prometheus-url",
                                       help="Prometheus the data source reads, as Grafana reaches it "
                                            "(default: http://localhost:9090)."),
    timeout: float = typer.Option(10.0, "--timeout", min=0.1, help="Seconds to wait for each Grafana request."),
) -> None:
    """Create or update the dashboard, its folder and its Prometheus data source in a running Grafana.

    Token: GRAFANA_TOKEN (a service-account token, Editor role); no default user or password is tried.
    Pushing again overwrites the same uids. If Grafana cannot query the Prometheus at --prometheus-url,
    nothing is changed and the push fails."""
    import os

    from .dashboards import DEFAULT_PROMETHEUS_URL
    from .grafana_push import push_dashboards

    token = os.environ.get("GRAFANA_TOKEN", "")
    if not token:
        raise MsaSearchError("GRAFANA_TOKEN is not set: export a Grafana service-account token (Editor role); "
                             "no default user or password is tried")
    result = push_dashboards(url, token, prometheus_url or DEFAULT_PROMETHEUS_URL, timeout=timeout)
    console.print(f"pushed: folder {result.folder}, data source {result.datasource} (Prometheus {result.prometheus}), "
                  f"dashboard {result.dashboard_url}", soft_wrap=True)


def main() -> None:
    # Standalone mode: click itself reports usage errors (exit 2); our errors propagate here.
    # A config refused at the edge exits 2 as well (nothing was started or written); any
    # other failure exits 1.
    from .config import ConfigError

    try:
        app()
    except Exception as exc:
        error = exc if isinstance(exc, (ValueError, FileNotFoundError, PermissionError)) else _our_error(exc)
        if error is None or _state["debug"]:
            raise
        err_console.print(f"error: {error}", highlight=False, soft_wrap=True)
        sys.exit(2 if isinstance(error, ConfigError) else 1)


def _our_error(exc: BaseException) -> MsaSearchError | None:
    """`exc` when it is ours, or the one of ours it was raised from or while handling: Ray
    Tune re-raises what a callback raised (a results file that cannot be written) as a
    TuneError that holds only the traceback's text."""
    return next((e for e in _chain(exc) if isinstance(e, MsaSearchError)), None)


def _chain(exc: BaseException | None):
    """`exc`, then what it was raised from or while handling, and so on."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


if __name__ == "__main__":
    main()
