"""Benchmark: Ray Train (+ DeepSpeed / DDP) overhead against a bare in-process loop.

    python bench/train_overhead.py [--preset mosi-aligned] [--scale 1.0] [--epochs 2]

Runs the same epochs (train + per-pattern evaluation of valid and test) as
1. the bare in-process loop (search.trainer.fit),
2. `msa-search train` on Ray Train with 1 and 2 workers, engine deepspeed and ddp,
and prints the ratio of epoch wall time (sum of the workers' per-epoch train + eval time,
which excludes the one-time Ray start and worker start-up) to the bare loop, plus the
whole-command wall time for reference. Goal: ratio <= 1.1 at MOSI-size data.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.config import ExperimentConfig  # noqa: E402
from search.distributed import EPOCH_LOG, train_distributed  # noqa: E402
from search.run import load_splits  # noqa: E402
from search.trainer import fit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mosi-aligned")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in total (split across workers)")
    parser.add_argument("--configs", default="deepspeed:1,deepspeed:2,ddp:1,ddp:2")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="msa-bench-"))
    base = {
        "data": {"preset": args.preset, "scale": args.scale},
        "model": {"hidden_dim": 64, "num_heads": 4, "dim_head": 32, "mlp_dim": 64},
        "train": {"epochs": args.epochs, "batch_size": 64, "device": "cpu"},
    }
    try:
        cfg = ExperimentConfig.model_validate({**base, "output": {"dir": str(tmp / "bare")}})
        torch.set_num_threads(args.threads)
        splits = load_splits(cfg, tmp / "data")
        start = time.perf_counter()
        state = fit(cfg, splits, device=torch.device("cpu"))
        bare_wall = time.perf_counter() - start
        bare_epochs = sum(r.train_time_s + r.eval_time_s for r in state.history)
        print(f"bare: epochs_s={bare_epochs:.1f} wall_s={bare_wall:.1f}")
        for spec in args.configs.split(","):
            engine, workers = spec.split(":")
            workers = int(workers)
            run_cfg = ExperimentConfig.model_validate({
                **base, "data": {**base["data"], "path": str(tmp / "data" / next(p.name for p in (tmp / "data").iterdir()))},
                "train": {**base["train"], "workers": workers, "engine": engine,
                          "cpus_per_worker": max(1, args.threads // workers)},
                "output": {"dir": str(tmp / f"{engine}-{workers}")}})
            start = time.perf_counter()
            run, _ = train_distributed(run_cfg)
            wall = time.perf_counter() - start
            log = [json.loads(l) for l in (run / EPOCH_LOG).read_text().splitlines()]
            epochs_s = sum(e["time/train_s"] + e["time/eval_s"] for e in log)
            print(f"{engine} workers={workers}: epochs_s={epochs_s:.1f} wall_s={wall:.1f} "
                  f"ratio_epochs={epochs_s / bare_epochs:.2f} ratio_wall={wall / bare_wall:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
