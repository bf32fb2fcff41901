"""Profile: where one LNLN training step spends its time, by operator and by part of the model.

    python bench/step_profile.py [--shape mosi-aligned] [--batch-size 32] [--threads 1] [--steps 6] [--dropout 0]

The step of `bench/step_throughput.py` (synthetic data at the real shapes, the model's default
sizes, forward + losses + backward + clip + AdamW), run as one stream: by default 32 rows on
one intra-op thread, i.e. one of the two row chunks the 2-core step runs in parallel. Prints

- wall time per phase (batch, forward by part, losses, backward, optimizer), plain timers,
  no profiler attached; medians over the steps;
- forward and backward CPU time per part under torch.profiler: backward nodes are put
  with the part whose forward op made them (the autograd sequence number);
- the top operators by self CPU time (forward and backward together).

Parts: encoders (the three modality embeddings, incomplete and complete rows), dominant
modality (completeness check, proxy generator), language encoder, hyper-modality, fusion,
reconstructor, discriminator, losses. Across parts, the same split for the few-query
attention of the encoders' last blocks (models/layers.py, `Attention._absorbed`), and the
SDPA kernels of every attention.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.autograd.profiler import record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_timing import training_setup  # noqa: E402
from data_pipeline.loader import make_batch  # noqa: E402
from models.layers import Attention  # noqa: E402

MECHANISMS = {"few-query attention": (Attention, "_absorbed")}
PARTS = {  # part -> the model's submodules (top-level names) whose forward it times
    "encoders": ("embeddings.text", "embeddings.audio", "embeddings.vision"),
    "dominant modality": ("completeness_check", "proxy_generator"),
    "language encoder": ("language_encoder",),
    "hyper-modality": ("hyper_modality",),
    "fusion": ("fusion",),
    "reconstructor": ("reconstructor.text", "reconstructor.audio", "reconstructor.vision"),
    "discriminator": ("discriminator",),
}


def tag_parts(model: torch.nn.Module, timers: dict[str, list[float]]) -> None:
    """Wrap each part's forward in a profiler scope and a wall-clock timer (this script only)."""
    for part, names in PARTS.items():
        for name in names:
            module = model.get_submodule(name)
            module.forward = _scoped(module.forward, part, timers)
    model.losses = _scoped(model.losses, "losses", timers)
    for name, (cls, method) in MECHANISMS.items():  # this process only
        setattr(cls, method, _scoped(getattr(cls, method), name, timers, prefix="mech::"))


def _scoped(fn, part: str, timers: dict[str, list[float]], prefix: str = "part::"):
    def wrapped(*args, **kwargs):
        with record_function(f"{prefix}{part}"):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            timers[part].append(time.perf_counter() - start)
            return out
    return wrapped


@contextmanager
def timed(timers: dict[str, list[float]], name: str):
    start = time.perf_counter()
    with record_function(f"phase::{name}"):
        yield
    timers[name].append(time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mosi-aligned", choices=["mosi-aligned", "mosi"])
    parser.add_argument("--batch-size", type=int, default=32, help="rows of one stream (one row chunk of 64)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    setup = training_setup("lnln", args.shape, args.batch_size, args.dropout, 1, args.set)
    model, optimizer, weights = setup.state.model.train(), setup.state.optimizer, setup.state.weights
    train, missing, rows = setup.train, setup.missing, setup.rows
    timers: dict[str, list[float]] = defaultdict(list)
    tag_parts(model, timers)

    def step(i: int) -> None:
        with timed(timers, "batch"):
            batch = make_batch(train, rows[i % len(rows)], missing, seed=1, epoch=0)
        with timed(timers, "forward + losses"):
            outputs = model(batch, progress=0.5)
            terms = model.losses(outputs, batch, 0.5)
            total = sum(weights[k] * v for k, v in terms.items() if k in weights)
        with timed(timers, "backward"):
            total.backward()
        with timed(timers, "optimizer"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for i in range(2):  # warm-up
        step(i)
    timers.clear()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i + 2)
    per_step = (time.perf_counter() - start) / args.steps
    print(f"shape={args.shape} batch_size={args.batch_size} threads={args.threads} dropout={args.dropout} "
          f"steps={args.steps}")
    print(f"step wall {per_step * 1e3:.1f} ms ({args.batch_size / per_step:.1f} samples/s in this one stream)")
    print("\nwall time per phase, median ms per step (no profiler):")
    for name in ("batch", "forward + losses", "backward", "optimizer"):
        print(f"  {name:<22} {statistics.median(timers[name]) * 1e3:8.1f}")
    print("  forward by part (inside forward + losses):")
    for part in (*PARTS, "losses"):
        calls = len(timers[part]) // args.steps
        value = statistics.median(sum(timers[part][s * calls:(s + 1) * calls]) for s in range(args.steps))
        print(f"    {part:<20} {value * 1e3:8.1f}")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(args.steps):
            step(i + 2 + args.steps)
    report_profile(prof, args.steps, args.top)


def _scope(event, prefix: str) -> str | None:
    """The innermost enclosing profiler scope whose name starts with `prefix`."""
    while event is not None:
        if event.name.startswith(prefix):
            return event.name[len(prefix):]
        event = event.cpu_parent
    return None


def split_by_scope(events, prefix: str, other: str) -> tuple[dict[str, float], dict[str, float]]:
    """Forward self CPU (us) of the ops inside each `prefix` scope, and the inclusive CPU of the
    autograd nodes those ops made (matched by sequence number)."""
    part_of_seq: dict[int, str] = {}
    forward, backward = defaultdict(float), defaultdict(float)
    for e in events:
        if e.name.startswith(("part::", "mech::", "phase::", "autograd::engine::evaluate_function")):
            continue
        if _scope(e, "phase::") == "forward + losses":
            part = _scope(e, prefix) or other
            forward[part] += e.self_cpu_time_total
            if e.sequence_nr >= 0:
                part_of_seq.setdefault(e.sequence_nr, part)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function: "):
            node = e.name.split(": ", 1)[1]
            part = "AccumulateGrad (into .grad)" if node == "torch::autograd::AccumulateGrad" \
                else part_of_seq.get(e.sequence_nr, "other backward")
            backward[part] += e.cpu_time_total
    return forward, backward


def report_profile(prof, steps: int, top: int) -> None:
    events = list(prof.events())
    phase_total = defaultdict(float)
    for e in events:
        if e.name.startswith("phase::"):
            phase_total[e.name[7:]] += e.cpu_time_total
    forward, backward = split_by_scope(events, "part::", "other forward (gating, cat, expand)")
    print("\nunder torch.profiler, ms per step (CPU time; the profiler adds per-op overhead):")
    for name in ("batch", "forward + losses", "backward", "optimizer"):
        print(f"  {name:<22} {phase_total[name] / steps / 1e3:8.1f}")
    print("  forward by part (self CPU of its ops) | backward of what that part's forward made:")
    for part in (*PARTS, "losses", "other forward (gating, cat, expand)"):
        print(f"    {part:<38} {forward[part] / steps / 1e3:8.1f} | {backward[part] / steps / 1e3:8.1f}")
    for part in ("AccumulateGrad (into .grad)", "other backward"):
        print(f"    {part:<38} {'':>8} | {backward[part] / steps / 1e3:8.1f}")
    total_backward = phase_total["backward"]
    print(f"    backward engine overhead (backward minus nodes) {'':>0}"
          f"{(total_backward - sum(backward.values())) / steps / 1e3:8.1f}")
    forward, backward = split_by_scope(events, "mech::", "")
    print("  across parts, forward | backward:")
    for name in MECHANISMS:
        print(f"    {name:<38} {forward[name] / steps / 1e3:8.1f} | {backward[name] / steps / 1e3:8.1f}")
    sdpa = {k: sum(e.self_cpu_time_total for e in events if e.name == k) / steps / 1e3
            for k in ("aten::_scaled_dot_product_flash_attention_for_cpu",
                      "aten::_scaled_dot_product_flash_attention_for_cpu_backward")}
    print(f"    {'SDPA kernels (every attention)':<38} {sdpa['aten::_scaled_dot_product_flash_attention_for_cpu']:8.1f}"
          f" | {sdpa['aten::_scaled_dot_product_flash_attention_for_cpu_backward']:8.1f}")

    print(f"\ntop {top} operators by self CPU time (forward + backward + optimizer), ms per step:")
    averages = prof.key_averages()
    rows = sorted((a for a in averages if not a.key.startswith(("part::", "mech::", "phase::", "autograd::engine"))),
                  key=lambda a: a.self_cpu_time_total, reverse=True)
    grand = sum(a.self_cpu_time_total for a in rows)
    print(f"  {'operator':<48} {'self ms':>8} {'share':>6} {'calls':>7}")
    for a in rows[:top]:
        print(f"  {a.key[:48]:<48} {a.self_cpu_time_total / steps / 1e3:8.2f} "
              f"{100 * a.self_cpu_time_total / grand:5.1f}% {a.count // steps:7d}")
    calls = sum(a.count for a in rows) // steps
    print(f"  all operators: {grand / steps / 1e3:.1f} ms self CPU per step, {calls} calls per step")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
