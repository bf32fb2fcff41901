"""Row-parallel training steps on CPU: one batch, split into chunks, one thread per chunk.

On a few CPU cores, intra-op threading of this size of model scales poorly (LNLN at
mosi-aligned shapes: 1.56x from 1 to 2 threads; fused attention 1.3x), while two
single-threaded streams of half the rows each run ~1.9x. So on CPU the batch is split into
`chunks` row ranges; each runs forward + backward in its own thread with one intra-op thread,
and the gradients are summed in chunk order.

Exact only for models whose loss is a mean of per-row terms with no interaction between rows
(the registry's `rows_independent`): then the batch loss is the size-weighted sum of the chunk
losses, and so is its gradient. Deterministic: each chunk runs single-threaded, the sum order
is fixed, and its dropout draws from a generator of its own (`step_generators`, seeded from
train.seed, the step and the chunk index), not from torch's global one in whatever order the
threads run. So a run repeats bit for bit at a fixed chunk count, a restored one included: the
masks depend on where the step is, not on what the process drew before. In-process CPU
training uses these generators with one chunk too. Not used with extra discriminator steps
(they reuse the step's whole outputs), with a BERT text encoder (its own dropout draws from
the global generator), or under DDP/DeepSpeed (their gradient hooks need `backward()`).
"""
from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import Batch
from models.entry import ModelEntry
from models.dropout import dropout_generator

from .config import ExperimentConfig

# Below this many rows per chunk, per-op overhead and smaller matmuls eat the gain.
MIN_ROWS_PER_CHUNK = 16

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def resolve_chunks(cfg: ExperimentConfig, entry: ModelEntry, device: torch.device, *, distributed: bool = False) -> int:
    """How many row chunks a training step uses: `train.batch_chunks`, or for 0 (auto) the
    intra-op thread count where it is exact and deterministic, else 1."""
    asked = cfg.train.batch_chunks
    why_not = _unsupported(cfg, entry, device, distributed)
    if asked == 0:
        threads = torch.get_num_threads()
        return 1 if why_not else max(1, min(threads, cfg.train.batch_size // MIN_ROWS_PER_CHUNK))
    if asked > 1 and why_not:
        raise MsaSearchError(f"train.batch_chunks: {asked} is not possible here: {why_not}; "
                             "use 0 (auto) or 1 (off)")
    return asked


def _unsupported(cfg: ExperimentConfig, entry: ModelEntry, device: torch.device, distributed: bool) -> str | None:
    if distributed:
        return "DDP and DeepSpeed workers reduce gradients in their own backward(); use train.workers: 0"
    if device.type != "cpu":
        return "row chunks are for CPU training (a GPU runs the whole batch in one stream)"
    if not entry.rows_independent:
        return f"model '{entry.name}' has batch-level loss terms, so a split batch would change its loss"
    if cfg.model.text_encoder == "bert":
        return ("model.text_encoder 'bert' has dropout of its own, which would draw from torch's generator "
                "in several threads in no fixed order")
    if cfg.model.adversarial.disc_steps > 1:
        return "model.adversarial.disc_steps > 1 reuses the whole step's outputs"
    return None


def step_generators(seed: int, epoch: int, batch: int, chunks: int) -> list[torch.Generator]:
    """The dropout generators of one training step, one per row chunk, each seeded from a
    stable hash of (train.seed, epoch, batch index, chunk index)."""
    def seeded(chunk: int) -> torch.Generator:
        digest = hashlib.blake2b(f"dropout|{seed}|{epoch}|{batch}|{chunk}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little"))
    return [seeded(chunk) for chunk in range(chunks)]


def _pool(chunks: int) -> ThreadPoolExecutor:
    """One pool per chunk count per process, its threads fixed at one intra-op thread each."""
    with _pools_lock:
        pool = _pools.get(chunks)
        if pool is None:
            main_threads = torch.get_num_threads()
            # torch.set_num_threads sets the calling thread's OpenMP team size (what its ops
            # use) and a process-wide default for threads not yet started; the barrier makes
            # every pool thread start now, then the main thread's default is put back.
            started = threading.Barrier(chunks + 1)
            pool = ThreadPoolExecutor(chunks, thread_name_prefix="row-chunk", initializer=_one_intra_op_thread)
            for _ in range(chunks):
                pool.submit(started.wait)
            started.wait()
            torch.set_num_threads(main_threads)
            _pools[chunks] = pool
        return pool


def eval_streams(cfg: ExperimentConfig, device: torch.device) -> int:
    """Patterns evaluated at a time in one process: on CPU, one per intra-op thread (exact for
    any model: each pattern's batch runs whole); `train.batch_chunks: 1` turns it off."""
    if device.type != "cpu" or cfg.train.batch_chunks == 1:
        return 1
    return cfg.train.batch_chunks or torch.get_num_threads()


def parallel_map(fn: Callable[[T], R], items: Sequence[T], streams: int) -> list[R]:
    """`[fn(x) for x in items]`, with `streams` > 1 run on that many one-thread workers."""
    if streams <= 1 or len(items) <= 1:
        return [fn(x) for x in items]
    return list(_pool(streams).map(fn, items))


@contextmanager
def one_thread_between_chunks(chunks: int) -> Iterator[None]:
    """A training loop's own work between the row-parallel parts (batches, the chunks' gradient
    sum, clipping, the optimizer step) on one intra-op thread, when steps run `chunks` > 1.

    That work is memory-bound, so a second OpenMP thread gains little (fused AdamW on LNLN's
    6.4M weights: ~16 ms against ~19 ms), while on a loaded machine a team of two stalls at
    every barrier whenever the other core is taken: with a fresh-clone CI run alongside on 2
    cores, the serial part of a step took ~1.9 s instead of ~50 ms, more than the chunks."""
    if chunks <= 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _one_intra_op_thread() -> None:
    # get_num_threads first: a thread's lazy first-use init would otherwise later reset its
    # team size to the process-wide default (the main thread's count, restored above).
    torch.get_num_threads()
    torch.set_num_threads(1)


def row_parallel_backward(
    model: nn.Module, batch: Batch, chunks: int, scale: float,
    loss_fn: Callable[[Batch], tuple[dict[str, torch.Tensor], torch.Tensor]],
    generators: Sequence[torch.Generator] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward + backward of `loss_fn` over `chunks` row ranges of `batch` in parallel, chunk
    i's dropout drawing from `generators[i]` (None: torch's global generator).

    Adds `scale * d(batch loss)/d(param)` to each parameter's `.grad`, as
    `(scale * total).backward()` would. Returns the batch's terms and total (detached), each
    the size-weighted sum over the chunks, i.e. the batch mean.
    """
    parts = batch.split(chunks)
    params = [p for p in model.parameters() if p.requires_grad]
    generators = generators or [None] * len(parts)

    def run(chunk: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple]:
        part = parts[chunk]
        with dropout_generator(generators[chunk]):  # set in the chunk's own thread
            terms, total = loss_fn(part)
        weight = len(part) / len(batch)
        grads = torch.autograd.grad(total * (weight * scale), params, allow_unused=True)
        return {k: v.detach() * weight for k, v in terms.items()}, total.detach() * weight, grads

    results = parallel_map(run, range(len(parts)), chunks)
    with torch.no_grad():
        for i, param in enumerate(params):
            grads = [r[2][i] for r in results if r[2][i] is not None]
            if not grads:
                continue
            grad = grads[0]
            for more in grads[1:]:
                grad = grad + more
            if param.grad is None:
                # In the parameter's layout, as .backward() leaves it: torch 2.13's fused AdamW
                # on CPU reads a gradient as laid out like its parameter, so a transposed one (an
                # op's backward, or vmap's, may return one) would update the wrong elements.
                param.grad = grad if grad.stride() == param.stride() else torch.empty_like(param).copy_(grad)
            else:
                param.grad.add_(grad)
    terms = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    return terms, sum(r[1] for r in results)
