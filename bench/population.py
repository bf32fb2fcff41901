"""Benchmark: population training (search/population.py) against single models one after another.

    python bench/population.py [--members 1,2,4,8] [--rounds 3] [--seconds 8] [--threads 2]
                               [--dropout 0.0] [--device cpu]

LNLN at its default (reference) sizes on synthetic mosi-aligned data (50/50/50 steps, text
as precomputed features), batch 64. For each N in `--members`, a population of N members
that differ in loss weights, GRL schedule and strength and learning rate (all at
`--dropout`), trained on the same batches, against the baseline: single models trained one
after another with the training loop's own step (forward_backward with the auto row chunks
and the step's dropout generators, the one host sync, OptimizerStep), as
bench/step_throughput.py; the singles are the largest population's members, so they have
the members' configs. N models one after another train at one model's rate, so one
baseline figure serves every N.

Every variant runs once per round, in an order rotated each round (a busy machine drifts;
rounds interleave the variants so drift hits all), for `--seconds` (or `--steps` steps) after
one warm-up step each before the first round. Each step makes its batch, as the training
loop does: one batch serves a population's N members. Prints `name=value` lines: the
settings, the ops vmap ran as a loop over the members (`vmap_fallbacks`), a loss check (the
largest population's losses against each member's own forward on the same weights, dropout
0 only: max relative difference, rtol 1e-5), one line per round, then medians with ranges
over the rounds:
- single_samples_per_s: training samples/s of the single models,
- pop_member_samples_per_s_n<N>: member-samples/s of the population (batch rows x N per s),
- speedup_n<N>: the population's rate over the single models' in the same round,
- peak_rss_mb (process peak) and, on CPU, peak_rss_mb_after_<variant> (the process's peak
  after each variant's warm-up: variants warm up smallest first, so each step of it is what
  that variant adds; parameters and optimizer states of every population are already in
  it), or on a GPU peak_gpu_mb_<variant> (each variant's own peak, from its warm-up).
A default run takes ~3-5 min on 2 cores (most of it the rounds: 5 variants x 3 x 8 s).
"""
from __future__ import annotations

import argparse
import re
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.loader import SplitTensors, batch_rows, make_batch  # noqa: E402
from data_pipeline.synth import synthesize  # noqa: E402
from search.config import ExperimentConfig  # noqa: E402
from search.optim import OptimizerStep  # noqa: E402
from search.population import Population  # noqa: E402
from search.row_parallel import resolve_chunks, step_generators  # noqa: E402
from search.trainer import epoch_weights, forward_backward  # noqa: E402

PROGRESS = 0.5  # training progress passed to every step (the GRL schedules' midpoint)
LOSS_RTOL = 1e-5


def member_config(i: int, args) -> ExperimentConfig:
    """Member i: its own loss weights, GRL schedule and strength, learning rate."""
    return ExperimentConfig.model_validate({
        "model": {"name": "lnln", "dropout": args.dropout,
                  "loss_weights": {"completeness": 0.9 * (1 + 0.1 * i), "adversarial": 0.8 * (1 - 0.05 * i),
                                   "reconstruction": 0.1 * (1 + i % 3)},
                  "adversarial": {"schedule": ("constant", "linear", "dann")[i % 3],
                                  "lambda_max": 0.5 + 0.25 * (i % 4)}},
        "train": {"batch_size": args.batch_size, "epochs": 1, "batch_chunks": args.batch_chunks,
                  "lr": 1e-4 * 2 ** (i % 4 - 1), "device": args.device}})


class Singles:
    """Single models trained one after another, each step the training loop's own."""

    def __init__(self, population: Population, chunks: int, device: torch.device):
        self.members = list(zip(population.members, population.cfgs, population.optimizer_steps))
        self.chunks, self.own_generators = chunks, device.type == "cpu"
        self.next = 0

    def step(self, batch, index: int) -> dict[str, float]:
        state, cfg, optimizer_step = self.members[self.next % len(self.members)]
        self.next += 1
        generators = step_generators(cfg.train.seed, 0, index, self.chunks) if self.own_generators else None
        _, terms, total = forward_backward(state.model, state.model, batch, epoch_weights(state, cfg, 0), PROGRESS,
                                           chunks=self.chunks, scale=optimizer_step.loss_scale, generators=generators)
        values = torch.stack([*(v.detach() for v in terms.values()), total.detach()]).tolist()  # the one host sync
        optimizer_step(total, True)
        return dict(zip([*terms, "total"], values))


def member_losses(population: Population, batch) -> list[dict[str, float]]:
    """Each member's losses on `batch` from its own module (train mode, no update)."""
    found = []
    with torch.no_grad():
        for state in population.members:
            outputs = state.model(batch, progress=PROGRESS)
            found.append({k: v.item() for k, v in state.model.losses(outputs, batch, PROGRESS).items()})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="1,2,4,8", help="population sizes N, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per variant per round")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per variant per round instead (0: --seconds)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-chunks", type=int, default=0, help="train.batch_chunks (0 = auto), both sides")
    parser.add_argument("--dropout", type=float, default=0.0, help="model.dropout of every member")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--attention", default="auto", choices=["auto", "math", "sdpa"],
                        help="the population's attention under vmap: auto = math (SDPA loops over the members "
                             "on CPU and fails in its backward on a GPU)")
    args = parser.parse_args()
    sizes = sorted({int(n) for n in args.members.split(",")})
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    data = synthesize("mosi-aligned", seed=0, scale=0.3)
    train = SplitTensors.from_arrays(data.spec, "train", data.split("train"))
    cfgs = [member_config(i, args) for i in range(max(sizes))]
    math_attention = {"auto": None, "math": True, "sdpa": False}[args.attention]
    populations = {n: Population(cfgs[:n], train, device, math_attention=math_attention) for n in sizes}
    largest = populations[max(sizes)]
    singles = Singles(largest, resolve_chunks(cfgs[0], largest.members[0].entry, device), device)
    chunks = singles.chunks
    missing = cfgs[0].missing.training()
    rows = [r for r in batch_rows(len(train), args.batch_size, shuffle=True, seed=0, epoch=0)
            if len(r) == args.batch_size]
    n_params = sum(p.numel() for p in largest.members[0].model.parameters())
    print(f"model=lnln shape=mosi-aligned batch_size={args.batch_size} threads={args.threads} device={device} "
          f"dropout={args.dropout} params={n_params} batch_chunks={chunks} members={','.join(map(str, sizes))} "
          f"rounds={args.rounds} seconds={args.seconds} steps={args.steps} attention={args.attention}", flush=True)
    print(f"rss_mb_after_build={_rss_mb():.0f}", flush=True)

    def run(variant: str, index: int) -> int:
        """One step of `variant` on batch `index`; the member-samples it trained."""
        batch = make_batch(train, rows[index % len(rows)], missing, seed=1, epoch=0, device=device)
        if variant == "single":
            singles.step(batch, index)
            return args.batch_size
        population = populations[int(variant[1:])]
        population.step(batch, PROGRESS, epoch=0, index=index, chunks=chunks)
        return args.batch_size * len(population)

    variants = ["single", *(f"n{n}" for n in sizes)]
    # Warm-up (allocator, lazy init), smallest first, noting any op vmap ran as a loop over
    # the members (no batching rule: "There is a performance drop ...").
    fallbacks: set[str] = set()
    for variant in variants:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(variant, 1)
            _sync(device)
        fallbacks |= {m.group(1) for w in caught if (m := re.search(r"batching rule for (\S+?)\. ", str(w.message)))}
        if device.type == "cuda":
            print(f"peak_gpu_mb_{variant}={torch.cuda.max_memory_allocated(device) / 2**20:.0f}", flush=True)
        else:
            print(f"peak_rss_mb_after_{variant}={_peak_rss_mb():.0f}", flush=True)
    print(f"vmap_fallbacks={'; '.join(sorted(fallbacks)) or 'none'}", flush=True)
    # The largest population's losses against its members' own forward passes on the same
    # weights (dropout 0: no masks to differ).
    if args.dropout == 0:
        batch = make_batch(train, rows[0], missing, seed=1, epoch=0, device=device)
        expected = member_losses(largest, batch)
        found = largest.step(batch, PROGRESS, epoch=0, index=0, chunks=chunks)
        worst = max(abs(f[k] - e[k]) / max(abs(e[k]), 1e-12) for f, e in zip(found, expected) for k in e)
        verdict = "ok" if worst <= LOSS_RTOL else "MISMATCH"
        print(f"loss_check_n{max(sizes)}_max_rel_diff={worst:.2e} (rtol {LOSS_RTOL:g}: {verdict})", flush=True)

    rates: dict[str, list[float]] = {v: [] for v in variants}
    index = 2
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for variant in order:
            _sync(device)
            start, steps, samples = time.perf_counter(), 0, 0
            while (steps < args.steps) if args.steps else (steps < 2 or time.perf_counter() - start < args.seconds):
                samples += run(variant, index)
                index += 1
                steps += 1
                if not args.steps:
                    _sync(device)  # the time check reads finished work
            _sync(device)
            rates[variant].append(samples / (time.perf_counter() - start))
        figures = " ".join(f"{_rate_name(v)}={rates[v][-1]:.1f}" for v in variants)
        print(f"round={r + 1} {figures}", flush=True)

    for variant in variants:
        print(f"{_rate_name(variant)}={_spread(rates[variant], '.1f')}")
    for n in sizes:
        speedups = [p / s for p, s in zip(rates[f"n{n}"], rates["single"])]
        print(f"speedup_n{n}={_spread(speedups, '.2f')}")
    print(f"peak_rss_mb={_peak_rss_mb():.0f}")


def _rate_name(variant: str) -> str:
    return "single_samples_per_s" if variant == "single" else f"pop_member_samples_per_s_{variant}"


def _spread(values: list[float], fmt: str) -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
