"""One training run in-process (`msa-search train` with train.workers = 0).

Writes the run layout of DESIGN.md: DIR/config.yaml, DIR/results/ (Parquet), DIR/checkpoints/.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import SplitTensors, load_split
from data_pipeline.presets import SPLITS
from data_pipeline.source import prepare_store
from data_pipeline.store import read_spec

from models.registry import get_model

from .config import ExperimentConfig
from .results import ResultsStore, flatten, result_rows
from .trainer import EpochReport, TrainState, fit, resolve_device, save_state


def load_splits(cfg: ExperimentConfig, cache_dir: Path) -> dict[str, SplitTensors]:
    store = prepare_store(cfg.data, cache_dir)
    spec = read_spec(store)
    return {s: load_split(store, s, spec) for s in SPLITS}


def prepare_run_dir(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise MsaSearchError(f"{out}: run directory exists and is not empty; set output.dir to a new directory")
    out.mkdir(parents=True, exist_ok=True)


def train_in_process(cfg: ExperimentConfig, *, run_id: str | None = None, show_progress: bool = True,
                     console: Console | None = None) -> tuple[TrainState, Path]:
    get_model(cfg.model.name).loss_weights(cfg.model.loss_weights)  # fail before writing anything
    out = Path(cfg.output.dir)
    prepare_run_dir(out)
    (out / "config.yaml").write_text(cfg.to_yaml())
    run_id = run_id or out.name
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    splits = load_splits(cfg, out / "data")
    store = ResultsStore(out / "results")
    (out / "checkpoints").mkdir(exist_ok=True)
    hparams = flatten(cfg.model_dump(mode="json"))
    console = console or Console(stderr=True, markup=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                        disable=not (show_progress and console.is_terminal))
    started = time.perf_counter()

    def on_epoch(state: TrainState, report: EpochReport) -> None:
        wall = time.perf_counter() - started
        store.write_epoch(run_id, report.epoch, [
            row for split, results in report.results.items()
            for row in result_rows(experiment=out.name, trial_id=run_id, model=cfg.model.name, epoch=report.epoch,
                                   split=split, results=results, wall_time_s=wall, hparams=hparams)])
        if (report.epoch + 1) % cfg.train.checkpoint_every == 0 or state.epoch == cfg.train.epochs:
            save_state(state, out / "checkpoints" / "last.pt")
        console.print(f"epoch {report.epoch + 1}/{cfg.train.epochs}  loss {report.losses['total']:.4f}  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in report.losses.items() if k != "total")
                      + f"  valid robust_f1 {report.objective:.4f}"
                      + f"  ({report.train_time_s:.1f}s train, {report.eval_time_s:.1f}s eval)", highlight=False)

    with progress if show_progress else nullcontext():
        task = progress.add_task(f"train {cfg.model.name}", total=cfg.train.epochs, info="")

        def on_step(step: int, total: int, losses: dict) -> None:
            progress.update(task, info=f"step {step}/{total} loss {losses['total']:.4f}")

        def on_epoch_progress(state, report):
            on_epoch(state, report)
            progress.update(task, advance=1, info=f"robust_f1 {report.objective:.4f}")

        state = fit(cfg, splits, device=device, on_epoch=on_epoch_progress, on_step=on_step)
    return state, out
