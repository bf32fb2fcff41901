"""Benchmark: what torch.compile would buy LNLN's training step on the CPU (not in the product).

    python bench/step_compile.py [--shape mosi-aligned] [--batch-size 32] [--threads 1] [--rounds 6]

The step of `bench/step_profile.py` (one stream: 32 rows on one intra-op thread, one of the two
row chunks a 2-core step runs), eager against the same model with every Transformer stack's
forward under `torch.compile(dynamic=True)`, which fuses the small operators (layer norms,
adds, bias sums, views) that the profile shows between the matrix products. The whole model
does not compile in one graph: the length groups and the changed rows are planned on the host
per batch. Both copies start from the same weights; prints

- `first_loss_reldiff`: the compiled step's first loss against eager's (inductor may reorder
  floating-point sums, so a small difference is expected, not zero by contract);
- `compile_s`: the first 12 compiled steps' wall time (compilation, recompiles for new shapes);
- per round, 8 steps of each, the order alternating; then medians and ranges of samples/s and
  the median speedup.

Its inductor cache is per thread count (`TORCHINDUCTOR_CACHE_DIR`, under the system's temp
directory), so a second run measures a warm cache's compile time.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mosi-aligned", choices=["mosi-aligned", "mosi"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                          str(Path(tempfile.gettempdir()) / f"msa-search-inductor-t{args.threads}"))

    import torch

    from bench.step_timing import training_setup
    from data_pipeline.loader import make_batch
    from models.layers import Transformer
    from search.trainer import forward_backward

    torch.set_num_threads(args.threads)
    setup = training_setup("lnln", args.shape, args.batch_size, args.dropout, 1, [])
    eager, weights = setup.state.model.train(), setup.state.weights
    # One deepcopy for both: the copied optimizer then holds the copied model's parameters.
    compiled, compiled_optimizer = copy.deepcopy((eager, setup.state.optimizer))
    stacks = 0
    for module in compiled.modules():
        if isinstance(module, Transformer):
            module.forward = torch.compile(module.forward, dynamic=True)
            stacks += 1
    optimizers = {"eager": setup.state.optimizer, "compiled": compiled_optimizer}
    models = {"eager": eager, "compiled": compiled}
    print(f"shape={args.shape} batch_size={args.batch_size} threads={args.threads} dropout={args.dropout} "
          f"compiled_stacks={stacks}", flush=True)

    def step(name: str, i: int) -> float:
        batch = make_batch(setup.train, setup.rows[i % len(setup.rows)], setup.missing, seed=1, epoch=0)
        generators = [torch.Generator().manual_seed(i)]  # the same dropout masks for both
        _, _, total = forward_backward(models[name], models[name], batch, weights, 0.5, generators=generators)
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return float(total.detach())

    first_eager = step("eager", 0)
    start = time.perf_counter()
    first_compiled = step("compiled", 0)
    print(f"first_loss_reldiff={abs(first_eager - first_compiled) / abs(first_eager):.2e}", flush=True)
    for i in range(1, 12):
        step("compiled", i)
    print(f"compile_s={time.perf_counter() - start:.1f}", flush=True)
    for i in range(1, 3):
        step("eager", i)

    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    i = 20
    for r in range(args.rounds):
        for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
            start = time.perf_counter()
            for k in range(8):
                step(name, i + k)
            rates[name].append(8 * args.batch_size / (time.perf_counter() - start))
        i += 8
        print(f"round={r} eager_samples_per_s={rates['eager'][-1]:.1f} "
              f"compiled_samples_per_s={rates['compiled'][-1]:.1f}", flush=True)
    for name, values in rates.items():
        print(f"{name}.samples_per_s_median={statistics.median(values):.1f} "
              f"{name}.samples_per_s_range={min(values):.1f}..{max(values):.1f}")
    print(f"speedup_median={statistics.median(rates['compiled']) / statistics.median(rates['eager']):.2f}")


if __name__ == "__main__":
    main()
