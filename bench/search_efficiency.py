"""Benchmark: how fast each search strategy finds a good configuration, at one trial-epoch budget.

    python bench/search_efficiency.py [--budget 60] [--epochs 6] [--seeds 0,1,2,3,4]
        [--methods gp+asha,tpe+asha,random+asha,random-sequential] [--target auto]
        [--config configs/quick.yaml] [--set KEY=VALUE ...]

Each method searches `--config`'s space on the same data with the same budget
(`search.max_trial_epochs`), the methods interleaved per seed:

- tpe+asha: Optuna TPE (its defaults) + ASHA, search.max_concurrent trials at once;
- tpe-mv-cl+asha: the same with multivariate TPE and a constant liar for running trials;
- tpe-mv-cl-s4+asha: that, with 4 random startup trials instead of 10;
- gp+asha: Optuna's Gaussian-process sampler + ASHA, concurrent (the product's default);
- gp+asha-deferred: that, with the test grid deferred (train.eval_test: deferred): only a
  trial's last epoch evaluates it during the search;
- tpe+asha-g4: tpe+asha whose ASHA stops no trial before epoch 4 (search.asha.grace_period);
- random+asha: random sampling + ASHA, concurrent;
- random-sequential: random sampling, every trial to the end, one at a time on the whole
  machine (cpus_per_trial and train.threads = all CPUs), the test grid once per trial, after
  its last epoch (train.eval_test: end): what MMSA's tune mode does (it tests each trial once).

Per run, from the results store: the validation objective of every reported (trial, epoch)
in the order reported, its running best, and when it first reached the target: in seconds
(from the results callback's start, just after the data is prepared: the same offset for
every method) and in trial-epochs spent (load-independent). `--target auto`: the lowest of
the methods' median best objectives, so each method reaches it in at least half its seeds.

Prints `name=value` lines: one `run` line per search, then per method the median and range
over seeds of time_to_target_s, trial_epochs_to_target, best, wall_s and
wall_s_per_trial_epoch, and each method's speedup in median time to target over
random-sequential, with its two factors: the ratio of median trial-epochs to target, and of
median wall seconds per trial-epoch (whole runs).

From random-sequential's runs (every trial trained to the end, configurations drawn at random)
it also prints the landscape the methods search, which bounds what any of them can gain:
`landscape.trials_at_target` (the share of random configurations whose best epoch reaches the
target: where most do, sequential search reaches it with its first trials) and
`landscape.rank_corr_epoch<E>` (Spearman rank correlation, over those trials, between the
objective at epoch E and at the last epoch: ASHA's premise, that early ranks predict final
ones; median over seeds).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.config import load_config  # noqa: E402
from search.export import stored_pattern_metrics  # noqa: E402
from search.objective import objective_mode, objective_value  # noqa: E402
from search.results import ResultsStore  # noqa: E402
from search.tune import run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CPUS = os.cpu_count() or 1
METHODS = {
    "tpe+asha": ["search.sampler=tpe", "search.scheduler=asha"],
    "tpe-mv-cl+asha": ["search.sampler=tpe", "search.scheduler=asha", "search.tpe.multivariate=true",
                       "search.tpe.constant_liar=true"],
    "tpe-mv-cl-s4+asha": ["search.sampler=tpe", "search.scheduler=asha", "search.tpe.multivariate=true",
                          "search.tpe.constant_liar=true", "search.tpe.n_startup_trials=4"],
    "gp+asha": ["search.sampler=gp", "search.scheduler=asha"],
    "gp+asha-deferred": ["search.sampler=gp", "search.scheduler=asha", "train.eval_test=deferred"],
    "tpe+asha-g4": ["search.sampler=tpe", "search.scheduler=asha", "search.asha.grace_period=4"],
    "random+asha": ["search.sampler=random", "search.scheduler=asha"],
    "random-sequential": ["search.sampler=random", "search.scheduler=none", "search.max_concurrent=1",
                          f"search.cpus_per_trial={CPUS}", f"train.threads={CPUS}", "train.eval_test=end"],
}
SEQUENTIAL = "random-sequential"


def objectives(exp: Path, cfg) -> pd.DataFrame:
    """The validation objective of every reported (trial, epoch): columns trial_id, epoch,
    seconds (since the search's results callback started) and objective."""
    df = ResultsStore(exp / "results").read(hparams=False)
    valid = df[df.split == "valid"]
    return pd.DataFrame(
        [(trial, epoch, float(rows.wall_time_s.max()),
          objective_value(stored_pattern_metrics(rows), cfg.search.objective, cfg.search.objective_patterns))
         for (trial, epoch), rows in valid.groupby(["trial_id", "epoch"])],
        columns=["trial_id", "epoch", "seconds", "objective"])


def objective_curve(points: pd.DataFrame) -> list[tuple[float, float]]:
    """(seconds, objective) of every reported (trial, epoch), in the order reported."""
    return sorted(zip(points.seconds, points.objective))


def landscape(points: pd.DataFrame, target: float, sign: float) -> dict[str, float]:
    """Of trials that all ran to the same last epoch: the share whose best reaches `target`, and
    the Spearman rank correlation of each earlier epoch's objective with the last one's."""
    table = points.pivot(index="trial_id", columns="epoch", values="objective").dropna()
    best = (sign * table).max(axis=1)  # sign * each trial's best
    figures = {"trials_at_target": float((best >= sign * target).mean())}
    last = table.columns.max()
    for epoch in table.columns[:-1]:  # Spearman: Pearson's correlation of the ranks (no scipy here)
        figures[f"rank_corr_epoch{epoch + 1}"] = float(table[epoch].rank().corr(table[last].rank()))
    return figures


def reached(curve: list[tuple[float, float]], target: float, sign: float) -> tuple[float, float]:
    """(seconds, trial-epochs) until the objective first reached `target`; inf if never."""
    for spent, (seconds, value) in enumerate(curve, start=1):
        if sign * value >= sign * target:
            return seconds, float(spent)
    return math.inf, math.inf


def summary(values: list[float], counted: bool = False) -> str:
    """Median (range), and with `counted` how many are finite (reached the target)."""
    finite = [v for v in values if math.isfinite(v)]
    span = f"{min(finite):.4g}-{max(finite):.4g}" if finite else "none"
    reached_count = f"; reached {len(finite)}/{len(values)}" if counted else ""
    return f"{statistics.median(values):.4g} ({span}{reached_count})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=60, help="trial-epochs per search")
    parser.add_argument("--epochs", type=int, default=6, help="train.epochs (ASHA's max_t)")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--methods", default="gp+asha,tpe+asha,random+asha,random-sequential")
    parser.add_argument("--target", default="auto", help="an objective value, or auto (see above)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"budget={args.budget} epochs={args.epochs} seeds={args.seeds} cpus={CPUS} config={args.config} "
          f"set={' '.join(args.set) or '-'}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="msa-search-eff-"))
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    try:
        for seed in seeds:
            for method in methods:
                import ray

                exp = tmp / f"{method}-{seed}"
                overrides = [*args.set, *METHODS[method], f"search.seed={seed}", f"train.epochs={args.epochs}",
                             f"search.max_trial_epochs={args.budget}", "search.time_budget_s=null",
                             f"output.dir={exp}",
                             # every trial to the end: the budget's worth of whole trials
                             f"search.num_samples={args.budget // args.epochs if method == SEQUENTIAL else args.budget}"]
                cfg = load_config(args.config, overrides)
                start = time.perf_counter()
                run_experiment(cfg)
                wall = time.perf_counter() - start
                ray.shutdown()
                points = objectives(exp, cfg)
                curve = objective_curve(points)
                sign = 1.0 if objective_mode(cfg.search.objective) == "max" else -1.0
                best = sign * max(sign * v for _, v in curve)
                runs[method].append({"seed": seed, "curve": curve, "points": points, "best": best, "wall": wall,
                                     "sign": sign})
                # With a given target, each run's own figures too (a long run cut short keeps them).
                hit = "" if args.target == "auto" else \
                    " time_to_target_s={:.1f} trial_epochs_to_target={:.0f}".format(*reached(curve, float(args.target), sign))
                print(f"run method={method} seed={seed} trials={points.trial_id.nunique()} trial_epochs={len(curve)} "
                      f"best={best:.4f} wall_s={wall:.1f}{hit}", flush=True)
                shutil.rmtree(exp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    sign = next(iter(runs.values()))[0]["sign"]
    if args.target == "auto":
        medians = [statistics.median(r["best"] for r in rs) for rs in runs.values()]
        target = min(medians) if sign > 0 else max(medians)
    else:
        target = float(args.target)
    print(f"target={target:.4f}")
    time_medians, epoch_medians, epoch_seconds = {}, {}, {}
    for method, rs in runs.items():
        hits = [reached(r["curve"], target, sign) for r in rs]
        seconds = [h[0] for h in hits]
        spent = [h[1] for h in hits]
        per_epoch = [r["wall"] / len(r["curve"]) for r in rs]
        time_medians[method] = statistics.median(seconds)
        epoch_medians[method] = statistics.median(spent)
        epoch_seconds[method] = statistics.median(per_epoch)
        print(f"{method}.time_to_target_s={summary(seconds, counted=True)}")
        print(f"{method}.trial_epochs_to_target={summary(spent, counted=True)}")
        print(f"{method}.best={summary([r['best'] for r in rs])}")
        print(f"{method}.wall_s={summary([r['wall'] for r in rs])}")
        print(f"{method}.wall_s_per_trial_epoch={summary(per_epoch)}")
    if SEQUENTIAL in time_medians:
        # The speedup in time is about the product of two: fewer trial-epochs to the target
        # (the sampler and scheduler) and less wall time per trial-epoch (concurrent trials).
        for method, median in time_medians.items():
            if method != SEQUENTIAL:
                print(f"{method}.speedup_vs_sequential={time_medians[SEQUENTIAL] / median:.2f} "
                      f"{method}.trial_epoch_ratio_vs_sequential={epoch_medians[SEQUENTIAL] / epoch_medians[method]:.2f} "
                      f"{method}.throughput_ratio_vs_sequential={epoch_seconds[SEQUENTIAL] / epoch_seconds[method]:.2f}")
        per_seed = [landscape(r["points"], target, sign) for r in runs[SEQUENTIAL]]
        for name in per_seed[0]:
            print(f"landscape.{name}={summary([figures.get(name, math.nan) for figures in per_seed])}")


if __name__ == "__main__":
    main()
