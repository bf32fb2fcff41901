"""Benchmark: Optuna TPE + ASHA against sequential random search (what MMSA's tune mode
does) on the same synthetic data and the same total trial-epoch budget, 3 seeds each.

    python bench/search_efficiency.py [--budget 24] [--epochs 3] [--target 0.80] [--seeds 0,1,2]

For each run: wall time until some trial's validation robust_f1 first reached `--target`
(from the results store's wall-clock column), and the best robust_f1 at the end.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.config import load_config  # noqa: E402
from search.results import ResultsStore  # noqa: E402
from search.tune import run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "tpe+asha": ["search.sampler=tpe", "search.scheduler=asha", "search.max_concurrent=2"],
    "random-sequential": ["search.sampler=random", "search.scheduler=none", "search.max_concurrent=1"],
}


def objective_by_epoch(exp: Path, patterns: list[str]):
    df = ResultsStore(exp / "results").read()
    valid = df[(df.split == "valid") & (df.pattern.isin(patterns))]
    return valid.groupby(["trial_id", "epoch"]).agg(robust_f1=("f1_non0", "mean"), wall=("wall_time_s", "max"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=24, help="trial-epochs per search")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.80)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="msa-search-eff-"))
    print(f"budget={args.budget} trial-epochs, epochs/trial={args.epochs}, target robust_f1={args.target}")
    print(f"{'method':18s} {'seed':>4s} {'trials':>6s} {'time_to_target_s':>16s} {'best_robust_f1':>14s} {'wall_s':>7s}")
    try:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for method, overrides in METHODS.items():
                exp = tmp / f"{method}-{seed}"
                cfg = load_config(args.config, [*overrides, f"search.seed={seed}", f"train.epochs={args.epochs}",
                                                f"search.max_trial_epochs={args.budget}",
                                                f"search.num_samples={args.budget}", f"output.dir={exp}",
                                                "search.time_budget_s=null"])
                if method == "random-sequential":
                    cfg = cfg.model_copy(update={"search": cfg.search.model_copy(
                        update={"num_samples": args.budget // args.epochs})})
                start = time.perf_counter()
                run_experiment(cfg)
                wall = time.perf_counter() - start
                table = objective_by_epoch(exp, cfg.search.objective_patterns)
                reached = table[table.robust_f1 >= args.target]
                to_target = f"{reached.wall.min():.0f}" if len(reached) else "not reached"
                print(f"{method:18s} {seed:4d} {table.index.get_level_values(0).nunique():6d} {to_target:>16s} "
                      f"{table.robust_f1.max():14.4f} {wall:7.0f}", flush=True)
                import ray
                ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
