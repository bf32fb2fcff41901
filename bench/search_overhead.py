"""Benchmark: where a search's wall time goes, and what train.eval_test saves.

    python bench/search_overhead.py [--config configs/quick.yaml] [--rounds 3]
                                    [--variants every,improved,improved+fresh] [--set KEY=VALUE ...]

Runs the search of `--config` (default `make run`'s) once per variant (a train.eval_test
value; `+fresh`: each trial in a new process, Tune's reuse_actors off; `+cold`: Ray's workers
without search/ray_setup.py's import hook; `+prestart`: Ray's default worker prestart on, which
search/ray_setup.py turns off) per round, the
variants interleaved, each on a Ray cluster started before its timing
(`ray_start_s` is that start alone). From Tune's per-trial result.json files and the results
store, per run:

- wall_s: `run_experiment` from its call to its return;
- busy_share: trial-epoch seconds spent training and evaluating (each epoch's reported
  time/train_s + time/eval_s) over wall_s x concurrency (the trials that can run at once:
  search.max_concurrent, at most CPUs / search.cpus_per_trial); busy_share_running: the same
  over the span from the first epoch's start to the last report (Tune running trials);
- train_s, eval_s: those seconds summed; eval_s_per_epoch, its mean per trial-epoch;
- startup_s_per_trial: a trial's first report minus its first epoch's train and eval time
  (its process start, data mapping, model build), the median over trials;
- head_s: from the call to the first trial's first epoch starting; tail_s: from the last
  report to the return;
- tested_epochs: the share of trial-epochs with test rows; eval_s_tested, eval_s_untested:
  the median evaluation seconds of an epoch with and without the test grid.
Prints `name=value` lines per run, then per variant the median and range over rounds.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search.config import load_config  # noqa: E402
from search.layout import Layout  # noqa: E402
from search.ray_setup import ensure_ray  # noqa: E402
from search.results import ResultsStore  # noqa: E402
from search.tune import run_experiment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def trial_reports(exp: Path) -> list[list[dict]]:
    """Each trial's reports, in order, from Tune's result.json files."""
    trials = []
    for path in sorted((Layout(exp).ray / Layout.TUNE_NAME).glob("*/result.json")):
        reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if reports:
            trials.append(reports)
    return trials


@contextmanager
def fresh_processes():
    """Tune's reuse_actors off, as before search/tune.py turned it on."""
    from ray import tune

    original = tune.TuneConfig

    def without_reuse(*args, **kwargs):
        return original(*args, **{**kwargs, "reuse_actors": False})

    tune.TuneConfig = without_reuse
    try:
        yield
    finally:
        tune.TuneConfig = original


@contextmanager
def cold_workers():
    """Ray's workers without search/ray_setup.py's import hook, as before it."""
    from search import ray_setup

    original = dict(ray_setup.WARM_WORKERS)
    ray_setup.WARM_WORKERS.clear()
    try:
        yield
    finally:
        ray_setup.WARM_WORKERS.update(original)


@contextmanager
def prestarted_workers():
    """Ray's default: the raylet starts one idle worker per CPU, as before search/ray_setup.py
    turned that off."""
    from search import ray_setup

    original = dict(ray_setup.LOCAL_RAY_SYSTEM_CONFIG)
    for key in ray_setup.NO_PRESTART:
        ray_setup.LOCAL_RAY_SYSTEM_CONFIG.pop(key)
    try:
        yield
    finally:
        ray_setup.LOCAL_RAY_SYSTEM_CONFIG.update(original)


def measure(cfg, exp: Path, fresh: bool, cold: bool, prestart: bool = False) -> dict[str, float]:
    import ray

    started = time.perf_counter()
    with cold_workers() if cold else nullcontext(), prestarted_workers() if prestart else nullcontext():
        ensure_ray(None, warm_workers=True)  # as tune does for in-process trials (+cold: an empty hook)
    ray_start = time.perf_counter() - started
    cpus = ray.cluster_resources().get("CPU", 1)
    concurrency = min(cfg.search.max_concurrent, int(cpus // cfg.search.cpus_per_trial) or 1)
    called, called_wall = time.perf_counter(), time.time()
    with fresh_processes() if fresh else nullcontext():
        run_experiment(cfg)
    wall, returned_wall = time.perf_counter() - called, time.time()
    ray.shutdown()
    trials = trial_reports(exp)
    epochs = [r for reports in trials for r in reports if "time/train_s" in r]
    train_s = sum(r["time/train_s"] for r in epochs)
    eval_s = sum(r["time/eval_s"] for r in epochs)
    startups = [reports[0]["time_this_iter_s"] - reports[0]["time/train_s"] - reports[0]["time/eval_s"]
                for reports in trials]
    # Tune's timestamp is whole seconds; the first epoch started time_this_iter_s before it,
    # less the start-up (which came before the epoch).
    first_epoch_start = min(r[0]["timestamp"] - r[0]["time/train_s"] - r[0]["time/eval_s"] for r in trials)
    last_report = max(r[-1]["timestamp"] for r in trials)
    tested = [r["time/eval_s"] for r in epochs if "test" in json.loads(r["rows"])]
    untested = [r["time/eval_s"] for r in epochs if "test" not in json.loads(r["rows"])]
    df = ResultsStore(Layout(exp).results).read()
    parts = df.groupby(["trial_id", "epoch"]).split.agg(lambda s: "test" in set(s))
    return {"ray_start_s": ray_start, "wall_s": wall, "concurrency": concurrency, "trials": len(trials),
            "trial_epochs": len(epochs), "train_s": train_s, "eval_s": eval_s,
            "eval_s_per_epoch": eval_s / max(1, len(epochs)),
            "busy_share": (train_s + eval_s) / (wall * concurrency),
            "busy_share_running": (train_s + eval_s) / ((last_report - first_epoch_start) * concurrency),
            "startup_s_per_trial": statistics.median(startups),
            "head_s": first_epoch_start - called_wall, "tail_s": returned_wall - last_report,
            "tested_epochs": float(parts.mean()),
            "eval_s_tested": statistics.median(tested) if tested else float("nan"),
            "eval_s_untested": statistics.median(untested) if untested else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "quick.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default="every,improved,improved+fresh",
                        help="train.eval_test values, comma-separated; +fresh: reuse_actors off; "
                             "+cold: workers without the import hook; +prestart: Ray's worker prestart on")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="msa-search-overhead-"))
    runs: dict[str, list[dict[str, float]]] = {}
    try:
        for round_ in range(args.rounds):
            for variant in args.variants.split(","):
                exp = tmp / f"{variant}-{round_}"
                eval_test, *flags = variant.split("+")
                cfg = load_config(args.config, [*args.overrides, f"train.eval_test={eval_test}", f"output.dir={exp}"])
                figures = measure(cfg, exp, fresh="fresh" in flags, cold="cold" in flags,
                                  prestart="prestart" in flags)
                runs.setdefault(variant, []).append(figures)
                print(f"round={round_} variant={variant} "
                      + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()),
                      flush=True)
                shutil.rmtree(exp, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for variant, figures in runs.items():
        for name in figures[0]:
            values = [f[name] for f in figures]
            print(f"{variant}.{name}_median={statistics.median(values):.3f} "
                  f"{variant}.{name}_range={min(values):.3f}..{max(values):.3f}")


if __name__ == "__main__":
    main()
