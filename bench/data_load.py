"""Benchmark: Parquet store -> batched, masked tensors (all 16 eval patterns), vs the MMSA pickle.

    python bench/data_load.py [--preset mosi] [--scale 1.0] [--batch-size 64]

Prints one `name=value` line per figure. The pickle path is what MMSA-style loaders do
(pickle.load of the whole file); ours reads Parquet columns and reshapes.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.loader import SplitTensors, batch_rows, load_split, make_batch  # noqa: E402
from data_pipeline.missing import default_eval_grid, parse_pattern  # noqa: E402
from data_pipeline.mmsa import read_mmsa, write_mmsa  # noqa: E402
from data_pipeline.presets import SPLITS  # noqa: E402
from data_pipeline.store import read_spec, write_store  # noqa: E402
from data_pipeline.synth import synthesize  # noqa: E402


def timed(fn, repeats: int = 3):
    """Best of `repeats` wall times (the files are in the page cache after the first)."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def batches_per_second(data: SplitTensors, batch_size: int) -> tuple[float, int]:
    patterns = [parse_pattern(p) for p in default_eval_grid()]
    rows = batch_rows(len(data), batch_size, shuffle=False, seed=0, epoch=0)
    start, n = time.perf_counter(), 0
    for pattern in patterns:
        for r in rows:
            batch = make_batch(data, r, pattern, seed=1111)
            n += len(batch)
    return n / (time.perf_counter() - start), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mosi")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = synthesize(args.preset, seed=0, scale=args.scale)
        n_samples = sum(len(s) for s in data.splits.values())
        pkl = write_mmsa(data, tmp / "data.pkl")
        store = write_store(data, tmp / "store")
        del data
        _, pickle_s = timed(lambda: pickle.loads(pkl.read_bytes()))
        _, read_mmsa_s = timed(lambda: read_mmsa(pkl))
        spec = read_spec(store)
        splits, parquet_s = timed(lambda: {s: load_split(store, s, spec) for s in SPLITS})
        # Pickle path to tensors, for a like-for-like figure: pickle.load + validation + tensors.
        _, pickle_tensors_s = timed(lambda: {s: SplitTensors.from_arrays(spec, s, a)
                                             for s, a in read_mmsa(pkl).splits.items()})
        rate, n = batches_per_second(splits["test"], args.batch_size)
    print(f"preset={args.preset} scale={args.scale} samples={n_samples} batch_size={args.batch_size} "
          f"threads={args.threads}")
    print(f"pickle_load_s={pickle_s:.3f}  (raw pickle.load, no validation)")
    print(f"mmsa_read_validated_s={read_mmsa_s:.3f}")
    print(f"pickle_to_tensors_s={pickle_tensors_s:.3f}")
    print(f"parquet_to_tensors_s={parquet_s:.3f}")
    print(f"parquet_load_samples_per_s={n_samples / parquet_s:.0f}")
    print(f"pickle_load_samples_per_s={n_samples / pickle_tensors_s:.0f}")
    print(f"masked_batch_pattern_samples_per_s={rate:.0f}  ({n} pattern-samples over 16 patterns)")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
