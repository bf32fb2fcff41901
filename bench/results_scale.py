"""Benchmark: the results store at scale (issue 17, item 6).

    python bench/results_scale.py [--trials 200] [--epochs 200] [--parts 40x25,200x50] [--rounds 3]

Builds, in a temporary directory, a store of TRIALS x EPOCHS compacted trials (each trial's
file written by `ResultsStore.write_compacted`, compaction's own write, from rows made by
`result_rows`: 2 splits x the 16 patterns of the default grid x the SIMS metrics, with a
default `ExperimentConfig`'s hp.* columns, models alternating lnln/hrlf), and for comparison
stores of uncompacted parts (one `append` per trial-epoch) of each size in --parts. Then, in
--rounds interleaved rounds, prints `name=value` lines (median, with _min / _max):
- append_ms_<store>: one epoch's rows appended (a new trial's) into the empty store, each
  parts store and the compacted one (writing does not depend on the store's size),
- compact_s_<epochs>: `compact_trial` of a trial of EPOCHS parts, in the compacted store,
- read_s_<store>: `ResultsStore.read()` to the pandas DataFrame, each in a fresh process
  (as `status`, `export` and `report` read it: fresh memory, files in the page cache);
  read_s_<compacted store>_no_hp: `read(hparams=False)`, without the hp.* columns.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.missing import default_eval_grid  # noqa: E402
from models.metrics import SIMS_METRIC_NAMES  # noqa: E402
from search.config import ExperimentConfig  # noqa: E402
from search.results import ResultsStore, RunInfo, result_rows  # noqa: E402

SPLITS = ("valid", "test")


def trial_id(trial: int) -> str:
    return f"trial_{trial:05d}"


def trial_run(trial: int) -> RunInfo:
    """A trial's shared columns, as a search of two models over the learning rate has them."""
    lr = 10 ** random.Random(trial).uniform(-5, -3)
    cfg = ExperimentConfig.model_validate({"model": {"name": ("lnln", "hrlf")[trial % 2]}, "train": {"lr": lr}})
    return RunInfo.of("bench", trial_id(trial), cfg)


def epoch_results(rng: random.Random):
    return {split: {p: {m: rng.random() for m in SIMS_METRIC_NAMES} for p in default_eval_grid()} for split in SPLITS}


def trial_table(run: RunInfo, epochs: int, seed: int) -> pa.Table:
    """All rows of one trial: one epoch's real rows, repeated, with each epoch's number, wall
    time and metric values (a table per epoch through `result_rows` takes ~100x longer)."""
    one = pa.Table.from_pylist(result_rows(run, 0, epoch_results(random.Random(seed)), 0.0))
    table = pa.concat_tables([one] * epochs).combine_chunks()
    rng = np.random.default_rng(seed)
    epoch = np.repeat(np.arange(epochs), one.num_rows)
    columns = {"epoch": pa.array(epoch), "wall_time_s": pa.array(epoch * 30.0 + rng.random(len(epoch)))}
    columns |= {m: pa.array(rng.random(len(epoch))) for m in SIMS_METRIC_NAMES}
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), name, values)
    return table


def compacted_store(root: Path, trials: int, epochs: int) -> ResultsStore:
    store = ResultsStore(root)
    for trial in range(trials):
        run = trial_run(trial)
        store.write_compacted(run.trial_id, trial_table(run, epochs, trial))
    return store


def append_trial(root: Path, trial: int, epochs: int) -> None:
    store, run, rng = ResultsStore(root), trial_run(trial), random.Random(trial)
    for epoch in range(epochs):
        store.append(run, epoch, epoch_results(rng), 30.0 * epoch)


def parts_store(root: Path, trials: int, epochs: int) -> ResultsStore:
    """Every part through `append`, trials spread over the cores (spawned: no fork of a process
    whose Arrow threads have run)."""
    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(append_trial, [root] * trials, range(trials), [epochs] * trials))
    return ResultsStore(root)


def read_in_fresh_process(root: Path, hparams: bool = True) -> tuple[float, int]:
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from search.results import ResultsStore; "
            "s = ResultsStore(sys.argv[2]); t = time.perf_counter(); df = s.read(hparams=sys.argv[3] == '1'); "
            "print(time.perf_counter() - t, len(df))")
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), str(root), str(int(hparams))],
                          capture_output=True, text=True, check=True)
    seconds, rows = done.stdout.split()
    return float(seconds), int(rows)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def size(text: str) -> tuple[int, int]:
    trials, epochs = text.split("x")
    return int(trials), int(epochs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="trials of the compacted store")
    parser.add_argument("--epochs", type=int, default=200, help="epochs of each of its trials")
    parser.add_argument("--parts", default="40x25,200x50", help="TRIALSxEPOCHS of each uncompacted store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--appends", type=int, default=10, help="appends into each store per round")
    args = parser.parse_args()
    compacted_name = f"compacted_{args.trials}x{args.epochs}"
    times: dict[str, list[float]] = {}
    rows: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="results-scale-") as tmp:
        started = time.perf_counter()
        stores = {"empty": ResultsStore(Path(tmp) / "empty"),
                  compacted_name: compacted_store(Path(tmp) / compacted_name, args.trials, args.epochs)}
        trials_of = {"empty": 0, compacted_name: args.trials}
        for text in args.parts.split(","):
            trials, epochs = size(text)
            stores[f"parts_{trials}x{epochs}"] = parts_store(Path(tmp) / f"parts_{text}", trials, epochs)
            trials_of[f"parts_{trials}x{epochs}"] = trials

        def without_probes(name: str) -> None:
            stores[name].remove_trials_except([trial_id(t) for t in range(trials_of[name])])
        print(f"# stores built in {time.perf_counter() - started:.0f} s", flush=True)
        rng = random.Random(1)
        for round_ in range(args.rounds):
            for name, store in stores.items():
                probe = RunInfo.of("bench", f"probe_{round_}", ExperimentConfig.model_validate({}))
                for epoch in range(args.appends):
                    results = epoch_results(rng)
                    times.setdefault(f"append_ms_{name}", []).append(
                        1000 * timed(lambda: store.append(probe, epoch, results, 1.0)))
                without_probes(name)
            # A trial of EPOCHS parts beside the compacted trials, as at the end of a search.
            store, run = stores[compacted_name], trial_run(args.trials + round_)
            for epoch in range(args.epochs):
                store.append(run, epoch, epoch_results(rng), 1.0)
            times.setdefault(f"compact_s_{args.epochs}", []).append(timed(lambda: store.compact_trial(run.trial_id)))
            without_probes(compacted_name)
            for name, store in stores.items():
                if name != "empty":
                    seconds, rows[name] = read_in_fresh_process(store.root)
                    times.setdefault(f"read_s_{name}", []).append(seconds)
            seconds, _ = read_in_fresh_process(stores[compacted_name].root, hparams=False)
            times.setdefault(f"read_s_{compacted_name}_no_hp", []).append(seconds)
            print(f"# round {round_} done at {time.perf_counter() - started:.0f} s", flush=True)
    for name, values in times.items():
        digits = 2 if name.startswith("append") else 3
        print(f"{name}={statistics.median(values):.{digits}f}")
        print(f"{name}_min={min(values):.{digits}f}")
        print(f"{name}_max={max(values):.{digits}f}")
    for name, count in rows.items():
        print(f"rows_{name}={count}")


if __name__ == "__main__":
    main()
