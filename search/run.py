"""One training run in-process (`msa-search train` with train.workers = 0).

Writes the run layout of DESIGN.md: DIR/config.yaml, DIR/results/ (Parquet), DIR/checkpoints/.
"""
from __future__ import annotations

import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import load_splits
from data_pipeline.source import prepare_store

from .config import ExperimentConfig, load_config
from .consoles import make_console
from .layout import Layout
from .results import EpochReport, ResultsStore, RunInfo, compact_finished_trial, epoch_label
from .storage import check_location
from .devices import in_process_device
from .trainer import TrainState, build_state, checkpoint_due, fit, load_state, save_state
from .weights import init_weights, read_checkpoint


def check_new_run_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise MsaSearchError(f"{out}: run directory exists and is not empty; set output.dir to a new directory")


@contextmanager
def new_run_dir(out: Path) -> Iterator[None]:
    """Make `out` (absent or empty) for a run; if the block fails (bad data, weights that do not
    fit), remove what it wrote, so that the same command can run again once the cause is fixed."""
    check_new_run_dir(out)
    existed = out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
            raise
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        raise


def config_to_resume(run_dir: Path) -> ExperimentConfig:
    """The config a run started with (RUN/config.yaml), which its resume goes on with."""
    path = Layout(Path(run_dir).resolve()).config
    if not path.is_file():
        raise MsaSearchError(f"{path.parent}: nothing to resume (no {path.name})")
    return load_config(path)


def epochs_stored(run_dir: Path, cfg: ExperimentConfig) -> int:
    """How many epochs of the run of `cfg` in `run_dir` have their rows in its results store (in
    output.storage when set): an epoch's rows are stored before its checkpoint is written."""
    epochs = ResultsStore(Layout(Path(run_dir)).with_config(cfg).results).read(hparams=False).epoch
    return 0 if epochs.empty else int(epochs.max()) + 1


def train_in_process(cfg: ExperimentConfig, *, run_id: str | None = None, show_progress: bool = True,
                     console: Console | None = None, init_from: Path | None = None,
                     resume_dir: Path | None = None) -> tuple[TrainState, Path]:
    """`init_from`: a checkpoint (ours or a reference code's) whose weights the run starts from.
    `resume_dir`: a run of `cfg` (config_to_resume) to continue from its checkpoints/last.pt;
    the epochs after it run again, their rows replacing any written before the stop, and the
    run ends as the same run never stopped would (the CPU steps' generators are functions of
    the seed, the epoch and the batch; torch's and numpy's are in the checkpoint)."""
    # The results in output.storage when set; last.pt stays in output.dir.
    layout = Layout(Path(resume_dir or cfg.output.dir).resolve()).with_config(cfg)
    saved = read_checkpoint(init_from) if init_from is not None else None  # before anything is written
    if resume_dir is not None and not layout.last_checkpoint.is_file():
        every = cfg.train.checkpoint_every
        raise MsaSearchError(f"{layout.root}: no checkpoint to go on from ({layout.last_checkpoint} is absent: the "
                             f"run stopped before its first, due after {every} epoch{'s' if every > 1 else ''} "
                             f"(train.checkpoint_every)); remove {layout.root} to train it anew")
    if layout.storage:
        check_location(layout.storage, new=resume_dir is None, resume_hint=f"msa-search train --resume {layout.root}")
    console = console or make_console(stderr=True)
    with new_run_dir(layout.root) if resume_dir is None else nullcontext():  # undone if the run cannot start
        if resume_dir is None:
            layout.config.write_text(cfg.to_yaml())
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        device = in_process_device(cfg)
        splits = load_splits(prepare_store(cfg.data, layout.data))
        init = None if saved is None else init_weights(saved, init_from, cfg, splits["train"].spec, console.print)
        state = build_state(cfg, splits["train"], device, init_weights=init)
    if resume_dir is not None:
        load_state(state, layout.last_checkpoint, device)
        if state.epoch >= cfg.train.epochs:
            console.print(f"{layout.root} ran all its {cfg.train.epochs} epochs already: nothing to resume",
                          highlight=False, soft_wrap=True)
            return state, layout.root
        console.print(f"resuming {layout.root} at {epoch_label(state.epoch, cfg.train.epochs)} from "
                      f"{layout.last_checkpoint}", highlight=False, soft_wrap=True)  # paths whole, to copy
    run = RunInfo.of(layout.root.name, run_id or layout.root.name, cfg)
    store = ResultsStore(layout.results)
    layout.checkpoints.mkdir(exist_ok=True)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                        disable=not (show_progress and console.is_terminal))
    started = time.perf_counter() - (store.elapsed_s(run.trial_id) if resume_dir is not None else 0.0)

    def on_epoch(state: TrainState, report: EpochReport) -> None:
        store.append(run, report.epoch, report.results, time.perf_counter() - started)
        if checkpoint_due(state, cfg):
            save_state(state, layout.last_checkpoint)
        console.print(f"{epoch_label(report.epoch, cfg.train.epochs)}  loss {report.losses['total']:.4f}  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in report.losses.items() if k != "total")
                      + f"  valid {cfg.search.objective} {report.objective:.4f}"
                      + f"  ({report.train_time_s:.1f}s train, {report.eval_time_s:.1f}s eval)", highlight=False)
        progress.update(task, advance=1, info=f"{cfg.search.objective} {report.objective:.4f}")

    def on_step(step: int, total: int, losses: dict) -> None:
        progress.update(task, info=f"step {step}/{total} loss {losses['total']:.4f}")

    with progress if show_progress else nullcontext():
        task = progress.add_task(f"train {cfg.model.name}", total=cfg.train.epochs, completed=state.epoch, info="")
        state = fit(cfg, splits, device=device, on_epoch=on_epoch, on_step=on_step, state=state)
    compact_finished_trial(layout.results, run.trial_id)
    return state, layout.root
