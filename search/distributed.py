"""`msa-search train` on Ray Train (train.workers >= 1): a TorchTrainer whose workers run
search/worker.py.

The driver prepares the Parquet store once, starts the run, and prints a line per epoch; a
Ray Train callback (in the controller process) appends every reported epoch to the results
store, keyed by (run, epoch), so a resumed run never duplicates rows.
"""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console

from data_pipeline.errors import MsaSearchError
from data_pipeline.source import prepare_store
from data_pipeline.store import read_spec

from .config import ExperimentConfig
from .consoles import make_console
from .layout import Layout
from .devices import place, visible_gpus
from .ray_output import ray_output_to
from .ray_setup import cluster_of, ensure_ray, torch_trainer
from .results import epoch_label
from .run import check_new_run_dir, config_to_resume, new_run_dir
from .shared_data import share_splits
from .storage import check_location
from .weights import init_weights, read_checkpoint


def cpu_layout_hint(cfg: ExperimentConfig, gpu: bool) -> str | None:
    """Advice for CPU runs whose workers run multi-threaded ops (README: one CPU per worker)."""
    cpus = cfg.train.cpus_per_worker
    if gpu or cpus < 2:
        return None
    total = int(cfg.train.workers * cpus)
    return (f"note: on CPU, {total} workers x 1 CPU usually train faster than {cfg.train.workers} x {cpus:g}: "
            "a multi-threaded worker stalls whenever Ray's own processes wake on one of its cores "
            f"(set train.workers={total} train.cpus_per_worker=1)")


def train_distributed(cfg: ExperimentConfig | None, *, resume_dir: Path | None = None,
                      console: Console | None = None, ray_address: str | None = None,
                      init_from: Path | None = None) -> tuple[Path, dict]:
    """Run (or resume) one distributed training run. Returns the run dir and the last metrics.
    `resume_dir`: the run to continue, with `cfg` its config (config_to_resume) or None to read
    it. `init_from` (a new run only): a checkpoint whose weights every worker starts from."""
    import ray

    from .callbacks import TrainResultsCallback

    console = console or make_console(stderr=True)
    if resume_dir is not None:
        layout = Layout(Path(resume_dir).resolve())
        cfg = cfg if cfg is not None else config_to_resume(resume_dir)
    else:
        layout = Layout(Path(cfg.output.dir).resolve())
    if cfg.train.workers < 1:
        raise MsaSearchError("train.workers must be >= 1 for a distributed run")
    layout = layout.with_config(cfg)  # Ray Train's checkpoints and the results in output.storage when set
    if resume_dir is None:
        check_new_run_dir(layout.root)
    if layout.storage:
        check_location(layout.storage, new=resume_dir is None, resume_hint=f"msa-search train --resume {layout.root}")
    saved = read_checkpoint(init_from) if init_from is not None else None
    # Decided before anything is written: a refusal leaves no half-made run directory.
    placement = place(cfg, cluster_of(ray_address), visible_gpus())
    with new_run_dir(layout.root) if resume_dir is None else nullcontext():  # undone if the run cannot start
        if resume_dir is None:
            layout.config.write_text(cfg.to_yaml())  # as written: a resume may run on another cluster
        store = prepare_store(cfg.data, layout.data)
        init = None if saved is None else init_weights(saved, init_from, cfg, read_spec(store), console.print)
    # Ray's own output (its start-up lines, Ray Train's logs) goes to RUN/logs/ray.log, as a search's.
    with ray_output_to(layout.ray_log):
        ensure_ray(ray_address)
        for line in placement.warnings:
            console.print(line, highlight=False)
        cfg = placement.apply(cfg)  # the workers' config: train.device cpu or cuda
        hint = cpu_layout_hint(cfg, placement.use_gpu)
        if hint:
            console.print(hint, highlight=False)
        run_id = layout.root.name
        trainer = torch_trainer(cfg, data=share_splits(store), name="train", storage_path=layout.ray_train_storage,
                                checkpoint_key=hashlib.blake2b(str(layout.root).encode(), digest_size=6).hexdigest(),
                                callbacks=[TrainResultsCallback(layout.root, run_id, cfg)],
                                init_weights=None if init is None else ray.put(init))
        stop = threading.Event()
        watcher = threading.Thread(target=_print_epochs, args=(layout, cfg, console, stop), daemon=True)
        watcher.start()
        try:
            result = trainer.fit()
        except SystemExit as exc:
            # Ray Train takes Ctrl-C itself (a handler it sets in the driver's main thread): it aborts
            # the run, and the driver's wait for it then ends in a silent SystemExit(1) (Ray 2.60).
            # Said as the interrupt it is: the CLI names the resume, and the exit code is 130.
            raise KeyboardInterrupt from exc
        except Exception as exc:  # TrainingFailedError and friends: one actionable line
            raise MsaSearchError(f"training failed: {_worker_error(exc)}; continue from the last checkpoint with: "
                                 f"msa-search train --resume {layout.root}") from exc
        finally:
            stop.set()
            watcher.join(timeout=5)
    return layout.root, dict(result.metrics or {})


def _print_epochs(layout: Layout, cfg: ExperimentConfig, console: Console, stop: threading.Event) -> None:
    """Print a line per finished epoch (the callback writes them from another process)."""
    path, seen = layout.epoch_log, 0
    while not stop.is_set() or (path.exists() and len(path.read_text().splitlines()) > seen):
        lines = path.read_text().splitlines() if path.exists() else []
        for raw in lines[seen:]:
            e = json.loads(raw)
            terms = "  ".join(f"{k} {v:.3f}" for k, v in e["losses"].items() if k != "total")
            console.print(f"{epoch_label(e['epoch'], cfg.train.epochs)}  loss {e['losses']['total']:.4f}  {terms}  "
                          f"valid {cfg.search.objective} {e['objective']:.4f}"
                          + ("  (checkpoint)" if e["checkpoint"] else ""), highlight=False)
        seen = len(lines)
        stop.wait(0.5)


def _worker_error(exc: Exception) -> str:
    """The root cause out of Ray's multi-line worker error report (its last 'XxxError: ...' line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if not line.startswith(("File ", "Traceback", "[Rank", "The above"))
              and ": " in line and line.split(":", 1)[0].replace(".", "").isidentifier()]
    return causes[-1] if causes else (lines[0] if lines else repr(exc))
