"""Benchmark: training samples/s and evaluation pattern-samples/s of a registered model.

    python bench/step_throughput.py --model lnln --shape mosi-aligned [--batch-size 64] [--threads 2] [--dropout 0.1]

Synthetic data at the real shapes (`mosi-aligned`: 50/50/50 steps; `mosi`: 50 text tokens,
375 audio and 500 video frames), text as precomputed features, the model's default
(reference) sizes; the training loop's own step (row chunks in parallel on CPU where exact,
`--batch-chunks 1` for one stream; dropout from each chunk's own generator). Prints the chunk
count (`batch_chunks=<n>`), `train_samples_per_s=<x>` and `eval_pattern_samples_per_s=<x>`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.step_timing import samples_per_s, training_setup  # noqa: E402
from data_pipeline.loader import SplitTensors, make_batch  # noqa: E402
from data_pipeline.missing import default_eval_grid, parse_pattern  # noqa: E402
from search.evaluate import predict_patterns  # noqa: E402
from search.row_parallel import eval_streams, one_thread_between_chunks, resolve_chunks, step_generators  # noqa: E402
from search.trainer import forward_backward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lnln")
    parser.add_argument("--shape", default="mosi-aligned", choices=["mosi-aligned", "mosi"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=0, help="0: enough for ~20 s")
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--batch-chunks", type=int, default=0,
                        help="train.batch_chunks: 0 = auto (row chunks / patterns in parallel where exact), 1 = off")
    parser.add_argument("--dropout", type=float, default=0.0, help="model.dropout")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override, as the CLI's (e.g. model.lnln.qkv_norms=shared); repeatable")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    setup = training_setup(args.model, args.shape, args.batch_size, args.dropout, args.batch_chunks, args.set)
    cfg, state, model, optimizer = setup.cfg, setup.state, setup.state.model, setup.state.optimizer
    n_params = sum(p.numel() for p in model.parameters())
    chunks = resolve_chunks(cfg, state.entry, torch.device("cpu"))

    def step(i: int) -> None:  # the training loop's step (search/trainer.py)
        batch = make_batch(setup.train, setup.rows[i % len(setup.rows)], setup.missing, seed=1, epoch=0)
        forward_backward(model, model, batch, state.weights, 0.5, chunks=chunks,
                         generators=step_generators(cfg.train.seed, 0, i, chunks))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    with one_thread_between_chunks(chunks):  # as the training loop
        train_rate, n_steps = samples_per_s(step, args.batch_size, args.train_steps)

    test = SplitTensors.from_arrays(setup.data.spec, "test", setup.data.split("test"))
    n_eval = min(args.eval_samples, len(test))
    sub = SplitTensors(spec=test.spec, split="test", ids=test.ids[:n_eval], keys=test.keys[:n_eval],
                       labels=test.labels[:n_eval], features={m: t[:n_eval] for m, t in test.features.items()},
                       lengths={m: l[:n_eval] for m, l in test.lengths.items()},
                       text_bert=None if test.text_bert is None else test.text_bert[:n_eval])
    patterns = [parse_pattern(p) for p in default_eval_grid()]
    streams = eval_streams(cfg, torch.device("cpu"))  # as the training loop's evaluation
    predict_patterns(model, sub, patterns[:streams], seed=1, batch_size=args.batch_size, streams=streams)  # warm-up
    start = time.perf_counter()
    predict_patterns(model, sub, patterns, seed=1, batch_size=args.batch_size, streams=streams)
    eval_rate = n_eval * len(patterns) / (time.perf_counter() - start)

    print(f"model={args.model} shape={args.shape} batch_size={args.batch_size} threads={args.threads} "
          f"dropout={args.dropout} params={n_params} train_steps={n_steps} batch_chunks={chunks} "
          f"eval_streams={streams}")
    print(f"train_samples_per_s={train_rate:.1f}")
    print(f"eval_pattern_samples_per_s={eval_rate:.1f}")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
