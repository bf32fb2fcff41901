"""Benchmark: Ray Train (+ DeepSpeed / DDP) overhead against a bare in-process loop.

    python bench/train_overhead.py [--preset mosi-aligned] [--scale 1.0] [--epochs 2] [--repeats 2]
                                   [--batch-chunks 1]

Runs the same epochs (train + per-pattern evaluation of valid and test) as
1. the bare in-process loop (search.trainer.fit), with no Ray running,
2. `msa-search train` on Ray Train with 1 and 2 workers, engine deepspeed and ddp,
and prints, per configuration, the median over `--repeats` rounds of
- ratio_epochs: the workers' per-epoch train + eval time over the bare loop's (and, as
  ratio_train / ratio_eval, each phase alone),
- ratio_wall: the run's wall time, excluding the one-time Ray start, over the bare loop's
  wall time (worker start-up, DeepSpeed set-up, checkpoints and teardown included; both
  read the Parquet store inside their timing),
- startup_s: what the run spends outside its epochs (the fixed cost a longer run amortises),
- ray_train_s: of that, what an empty TorchTrainer with the same workers costs on a fresh
  cluster (Ray Train's own worker-group start and teardown: 7-22 s on 2-core machines here),
- ratio_wall_excl_ray: the wall ratio without ray_train_s either.
`--batch-chunks` is `train.batch_chunks` on both sides: 1 (default) runs the same math in
both, one stream on all threads; 0 is what each gets by default (in-process: row chunks and
patterns in parallel, one thread each; a worker: patterns in parallel, whole batches).
Each round runs the bare loop and then every configuration on a fresh local cluster, so a
ratio compares runs minutes apart: on a shared machine single runs swing by 20%.
Goal: ratio <= 1.1 at MOSI-size data.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.config import ExperimentConfig  # noqa: E402
from data_pipeline.loader import load_splits  # noqa: E402
from data_pipeline.source import prepare_store  # noqa: E402
from search.distributed import train_distributed  # noqa: E402
from search.layout import Layout  # noqa: E402
from search.ray_setup import ensure_ray  # noqa: E402
from search.trainer import fit  # noqa: E402


def _empty_fn(config: dict) -> None:
    pass


def ray_train_start_s(workers: int, cpus_per_worker: float, storage: Path) -> float:
    """Wall time of an empty TorchTrainer (gloo, same workers) on a fresh local cluster."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(None)
    start = time.perf_counter()
    TorchTrainer(_empty_fn, torch_config=TorchConfig(backend="gloo"),
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
                 run_config=RunConfig(name="empty", storage_path=str(storage))).fit()
    elapsed = time.perf_counter() - start
    ray.shutdown()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mosi-aligned")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total (split across workers)")
    parser.add_argument("--configs", default="deepspeed:1,deepspeed:2,ddp:1,ddp:2")
    parser.add_argument("--batch-chunks", type=int, default=1, help="train.batch_chunks on both sides (0: auto)")
    args = parser.parse_args()
    import ray

    tmp = Path(tempfile.mkdtemp(prefix="msa-bench-"))
    base = {
        "data": {"preset": args.preset, "scale": args.scale},
        "model": {"hidden_dim": 64, "num_heads": 4, "dim_head": 32, "mlp_dim": 64},
        # --batch-chunks 1: the bare loop runs the math a worker runs, one stream on all threads
        # (by default in-process CPU training splits batches into parallel row chunks).
        "train": {"epochs": args.epochs, "batch_size": 64, "device": "cpu", "batch_chunks": args.batch_chunks},
    }
    specs = [(engine, int(workers)) for engine, workers in (s.split(":") for s in args.configs.split(","))]
    ratios: dict[tuple[str, int], list[tuple[float, ...]]] = {s: [] for s in specs}
    try:
        cfg = ExperimentConfig.model_validate({**base, "output": {"dir": str(tmp / "bare")}})
        torch.set_num_threads(args.threads)
        store = prepare_store(cfg.data, tmp / "data")  # synthesizes the Parquet store once
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"path": str(store)})})
        for round_ in range(args.repeats):
            # Like a worker, the bare loop reads the Parquet store inside its timing.
            start = time.perf_counter()
            splits = load_splits(prepare_store(cfg.data, tmp / "bare-data"))
            state = fit(cfg, splits, device=torch.device("cpu"))
            bare_wall = time.perf_counter() - start
            bare_epochs = sum(r.train_time_s + r.eval_time_s for r in state.history)
            bare_train = sum(r.train_time_s for r in state.history)
            bare_eval = bare_epochs - bare_train
            print(f"round {round_} bare: epochs_s={bare_epochs:.1f} (train {bare_train:.1f} "
                  f"eval {bare_eval:.1f}) wall_s={bare_wall:.1f}", flush=True)
            for engine, workers in specs:
                cpus = max(1, args.threads // workers)
                empty_s = ray_train_start_s(workers, cpus, tmp / "empty")
                run_cfg = ExperimentConfig.model_validate({
                    **base, "data": {**base["data"], "path": str(store)},
                    "train": {**base["train"], "workers": workers, "engine": engine,
                              "cpus_per_worker": cpus},
                    "output": {"dir": str(tmp / f"{engine}-{workers}-{round_}")}})
                ray_start = time.perf_counter()
                ensure_ray(None)
                start = time.perf_counter()
                run, _ = train_distributed(run_cfg)
                wall = time.perf_counter() - start
                ray.shutdown()
                log = [json.loads(l) for l in Layout(run).epoch_log.read_text().splitlines()]
                train_s = sum(e["time/train_s"] for e in log)
                eval_s = sum(e["time/eval_s"] for e in log)
                epochs_s = train_s + eval_s
                row = (epochs_s / bare_epochs, train_s / bare_train, eval_s / bare_eval,
                       wall / bare_wall, (wall - empty_s) / bare_wall, wall - epochs_s, empty_s)
                ratios[(engine, workers)].append(row)
                print(f"round {round_} {engine} workers={workers}: epochs_s={epochs_s:.1f} (train {train_s:.1f} "
                      f"eval {eval_s:.1f}) wall_s={wall:.1f} ray_start_s={start - ray_start:.1f} "
                      f"ray_train_s={empty_s:.1f} ratio_epochs={row[0]:.2f} (train {row[1]:.2f} eval {row[2]:.2f}) "
                      f"ratio_wall={row[3]:.2f} ratio_wall_excl_ray={row[4]:.2f}", flush=True)
        for (engine, workers), rows in ratios.items():
            epochs_ratio, train_ratio, eval_ratio, wall_ratio, excl_ratio, startup, empty = (
                statistics.median(col) for col in zip(*rows))
            print(f"{engine} workers={workers}: ratio_epochs={epochs_ratio:.2f} ratio_train={train_ratio:.2f} "
                  f"ratio_eval={eval_ratio:.2f} ratio_wall={wall_ratio:.2f} "
                  f"ratio_wall_excl_ray={excl_ratio:.2f} startup_s={startup:.1f} ray_train_s={empty:.1f} "
                  f"(median of {len(rows)})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
