"""GPU check (issue 14): the project's own training code on one GPU, in one short run.

    python bench/gpu_check.py --out DIR [--cpu] [--budget-s S]     (bench/gpu_check.sh wraps it)

Sections, each on its own (a failing one records `section_<name>_ok=0` and the others go on):
  env        torch, CUDA device, Python; `device=...`
  data       synthetic MOSI at the real shapes (50 text / 375 audio / 500 video steps), Parquet store
  inprocess  LNLN and HRLF, fp32 and bf16 (autocast), through `train_epoch` as `fit` calls it:
             samples/s over a fixed number of steps after warm-up, peak GPU memory, host syncs
             per step (torch.cuda.set_sync_debug_mode("warn") warnings per training step)
  cpu_match  the first 3 training steps (fp32, TF32 off, no dropout) on CPU and on the GPU from
             the same weights: the largest relative difference of any loss term
  trials     1, 4 and 8 LNLN trials sharing the GPU, one process each, `fit` for the same epochs
             on the same store: trials/hour and the speed-up over one trial alone
  determinism  two LNLN runs of a few steps from the same seed, bit for bit equal or not,
             without and with `train.deterministic` (each setting in its own process)
  deepspeed  LNLN through the DeepSpeed engine (`search.worker.setup_engine`), world size 1 in one
             child process: bf16 and fp16
Figures are `name=value` lines on stdout and in DIR/figures.txt. `--cpu` runs every section at
tiny sizes on the CPU (CPU against CPU in cpu_match, 1 and 2 trials, no fp16): the plumbing.
Exit status 1 when a section failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.loader import SplitTensors, load_splits, stage_splits  # noqa: E402
from data_pipeline.store import write_store  # noqa: E402
from data_pipeline.synth import synthesize  # noqa: E402
from search.config import ExperimentConfig  # noqa: E402
from search.trainer import (autocast_dtype, build_state, evaluate_epoch, fit, param_dtype, train_epoch,  # noqa: E402
                            unwrap)

MATCH_TOLERANCE = 1e-3  # relative, per loss term and step, against max(|cpu value|, MATCH_FLOOR)
MATCH_FLOOR = 1e-3
MATCH_STEPS = 3


@dataclasses.dataclass(frozen=True)
class Sizes:
    scale: float  # of the synthetic MOSI store (1.0: 1284 / 229 / 686 samples)
    model: dict  # overrides of the model section (both models)
    eval_grid: tuple[str, ...] | None  # missing.eval_grid (None: the default 16 patterns)
    batch: int
    warmup_steps: int
    timed_steps: int
    sync_steps: int
    match_batch: int
    trial_counts: tuple[int, ...]
    trial_threads: int
    trial_fit_s: float  # one trial's fit alone, in seconds (0: one epoch)
    deepspeed_reserve_s: float  # kept for the determinism and deepspeed sections when the trials start
    budget_s: float


GPU = Sizes(scale=1.0, model={}, eval_grid=None, batch=64, warmup_steps=3, timed_steps=20, sync_steps=5,
            match_batch=16, trial_counts=(1, 4, 8), trial_threads=2, trial_fit_s=24.0, deepspeed_reserve_s=150.0,
            budget_s=435.0)
# The dry run: every code path at tiny sizes (~45 s on 2 cores).
CPU = Sizes(scale=0.01, model={"hidden_dim": 16, "num_heads": 2, "dim_head": 8, "mlp_dim": 16},
            eval_grid=("intra:0.0", "intra:0.5"), batch=2, warmup_steps=1, timed_steps=2, sync_steps=1,
            match_batch=2, trial_counts=(1, 2), trial_threads=1, trial_fit_s=0.0, deepspeed_reserve_s=40.0,
            budget_s=330.0)  # ~45 s alone on 2 cores; the rest is room for a busy machine (a CI box)


class Figures:
    """`name=value` lines, on stdout and appended to DIR/figures.txt as they come."""

    def __init__(self, out: Path):
        self.path = out / "figures.txt"

    def __call__(self, name: str, value) -> None:
        if isinstance(value, float):
            value = f"{value:.6g}"
        line = f"{name}={value}"
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def log(message: str) -> None:
    print(f"# {message}", flush=True)


def make_config(sizes: Sizes, device: torch.device, *, model: str = "lnln", precision: str = "fp32",
                batch: int | None = None, epochs: int = 1, **train) -> ExperimentConfig:
    missing = {"eval_grid": list(sizes.eval_grid)} if sizes.eval_grid else {}
    return ExperimentConfig.model_validate({
        "missing": missing, "model": {"name": model, "dropout": 0.0, **sizes.model},
        "train": {"batch_size": batch or sizes.batch, "epochs": epochs, "precision": precision,
                  "device": device.type, "batch_chunks": 1, **train}})


def head(split: SplitTensors, n: int) -> SplitTensors:
    """The first n rows of a split (views)."""
    rows = len(split)

    def cut(value):
        if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim and value.shape[0] == rows:
            return value[:n]
        if isinstance(value, dict):
            return {k: cut(v) for k, v in value.items()}
        return value
    return dataclasses.replace(split, **{f.name: cut(getattr(split, f.name)) for f in dataclasses.fields(split)})


def stage(split: SplitTensors, device: torch.device) -> SplitTensors:
    """Where `fit` puts a split before training."""
    return stage_splits({"train": split}, device)["train"]


def train(state, cfg: ExperimentConfig, split: SplitTensors, device: torch.device, **kw) -> dict[str, float]:
    """`train_epoch` as `fit` and the Ray Train workers call it: under the config's autocast."""
    return train_epoch(state, cfg, split, device, autocast_to=autocast_dtype(cfg), **kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "na"


@contextmanager
def autocast_probe(model: torch.nn.Module):
    """Records the output dtypes of the model's Linear layers (bf16 with fp32 weights: autocast is on)."""
    seen: set[torch.dtype] = set()
    handles = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
               for m in unwrap(model).modules() if isinstance(m, torch.nn.Linear)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def measure_training(prefix: str, state, cfg: ExperimentConfig, split: SplitTensors, device: torch.device,
                     sizes: Sizes, figure: Figures, **kw) -> float:
    """Warm-up, then samples/s over `timed_steps` full batches, host syncs per step, peak memory."""
    b = cfg.train.batch_size
    with autocast_probe(state.model) as seen:
        train(state, cfg, head(split, sizes.warmup_steps * b), device, **kw)
    figure(f"{prefix}_autocast_bf16", int(torch.bfloat16 in seen))
    timed = head(split, sizes.timed_steps * b)
    sync(device)
    start = time.perf_counter()
    losses = train(state, cfg, timed, device, **kw)
    sync(device)
    rate = len(timed) / (time.perf_counter() - start)
    figure(f"{prefix}_train_samples_per_s", rate)
    figure(f"{prefix}_loss", losses["total"])
    figure(f"{prefix}_loss_finite", int(all(np.isfinite(v) for v in losses.values())))
    figure(f"{prefix}_host_syncs_per_step", host_syncs(state, cfg, split, device, sizes.sync_steps, **kw))
    figure(f"{prefix}_peak_gpu_mb", peak_mb(device))
    return rate


def host_syncs(state, cfg: ExperimentConfig, split: SplitTensors, device: torch.device, steps: int, **kw):
    """Synchronizing CUDA calls per training step, counted as set_sync_debug_mode's warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            sync(device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            train(state, cfg, head(split, steps * cfg.train.batch_size), device, **kw)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    # The per-call warning; not the one-time notice that the debug mode is a prototype.
    syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
    if device.type != "cuda":
        return "na"
    for where in sorted({f"{w.filename}:{w.lineno}" for w in syncs}):
        log(f"host sync at {where}: {sum(f'{w.filename}:{w.lineno}' == where for w in syncs)} in {steps} steps")
    return len(syncs) / steps


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.sizes = CPU if args.cpu else GPU
        self.device = torch.device("cpu" if args.cpu else "cuda")
        self.figure = Figures(args.out)
        self.figure.path.write_text("")  # children append to it
        self.started = time.perf_counter()
        self.deadline = self.started + (args.budget_s or self.sizes.budget_s)
        self.tmp = Path(tempfile.mkdtemp(prefix="msa-gpu-check-"))
        self.store = self.tmp / "store"
        self.args = args
        self.splits: dict[str, SplitTensors] = {}
        self.lnln_epoch_s: float | None = None  # one LNLN fp32 epoch (train + evaluation), sizes the trials

    def section(self, name: str, fn) -> bool:
        start = time.perf_counter()
        log(f"section {name}")
        try:
            fn()
            ok = True
        except Exception:
            traceback.print_exc(file=sys.stdout)
            sys.stdout.flush()
            ok = False
        self.figure(f"section_{name}_ok", int(ok))
        self.figure(f"section_{name}_s", time.perf_counter() - start)
        return ok

    def env(self) -> None:
        from importlib.metadata import version
        f = self.figure
        f("python_version", platform.python_version())
        f("torch_version", torch.__version__)
        f("cuda_version", torch.version.cuda or "none")
        for package in ("numpy", "pyarrow", "pandas", "pydantic", "deepspeed"):
            f(f"{package}_version", version(package))
        f("cpu_count", os.cpu_count())
        f("mode", "cpu" if self.args.cpu else "gpu")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("no GPU visible to torch (use --cpu for the CPU dry run)")
            f("device", torch.cuda.get_device_name(0))
            f("gpu_count", torch.cuda.device_count())
            f("gpu_memory_gb", torch.cuda.get_device_properties(0).total_memory / 2**30)
        else:
            f("device", "cpu")

    def data(self) -> None:
        start = time.perf_counter()
        write_store(synthesize("mosi", seed=0, scale=self.sizes.scale), self.store)
        self.splits = load_splits(self.store)
        self.figure("data_s", time.perf_counter() - start)
        for name, split in self.splits.items():
            self.figure(f"data_{name}_samples", len(split))

    def inprocess(self) -> None:
        failed = []
        for model in ("lnln", "hrlf"):
            for precision in ("fp32", "bf16"):
                prefix = f"{model}_{precision}"
                try:
                    self._inprocess(model, precision, prefix)
                except Exception:
                    traceback.print_exc(file=sys.stdout)
                    failed.append(prefix)
                    self.figure(f"{prefix}_ok", 0)
        if failed:
            raise RuntimeError(f"in-process runs failed: {', '.join(failed)}")

    def _inprocess(self, model: str, precision: str, prefix: str) -> None:
        cfg = make_config(self.sizes, self.device, model=model, precision=precision)
        reset_peak(self.device)
        split = stage(self.splits["train"], self.device)
        state = build_state(cfg, split, self.device)
        rate = measure_training(prefix, state, cfg, split, self.device, self.sizes, self.figure)
        if (model, precision) == ("lnln", "fp32"):  # the trials' epoch: train + evaluation of valid and test
            evaluated = {k: stage(self.splits[k], self.device) for k in ("valid", "test")}
            start = time.perf_counter()
            evaluate_epoch(state.model, cfg, evaluated, self.device)
            sync(self.device)
            eval_s = time.perf_counter() - start
            self.figure(f"{prefix}_eval_epoch_s", eval_s)
            self.lnln_epoch_s = len(split) / rate + eval_s
        del state
        reset_peak(self.device)

    def cpu_match(self) -> None:
        f = self.figure
        worst = 0.0
        for model in ("lnln", "hrlf"):
            diff = self._match(model)
            f(f"{model}_cpu_match_max_rel_diff", diff)
            worst = max(worst, diff)
        f("cpu_match_max_rel_diff", worst)
        f("cpu_match_tolerance", MATCH_TOLERANCE)
        f("cpu_match_ok", int(worst <= MATCH_TOLERANCE))

    def _match(self, model: str) -> float:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        cpu = torch.device("cpu")
        split = head(self.splits["train"], MATCH_STEPS * self.sizes.match_batch)
        steps: dict[str, list[dict[str, float]]] = {}
        weights = None
        for side, device in (("cpu", cpu), ("device", self.device)):
            cfg = make_config(self.sizes, device, model=model, batch=self.sizes.match_batch)
            state = build_state(cfg, split, device)
            if weights is None:  # the CPU model's weights, copied to the other side before any step
                weights = {k: v.detach().clone() for k, v in state.model.state_dict().items()}
            else:
                state.model.load_state_dict(weights)
            means: list[dict[str, float]] = []
            train(state, cfg, stage(split, device), device, on_step=lambda i, n, m: means.append(dict(m)))
            # on_step gives running means: recover each step's own values
            steps[side] = [{k: m[k] * (i + 1) - (means[i - 1][k] * i if i else 0.0) for k in m}
                           for i, m in enumerate(means)]
        worst = 0.0
        for i, (a, b) in enumerate(zip(steps["cpu"], steps["device"])):
            for term in a:
                rel = abs(b[term] - a[term]) / max(abs(a[term]), MATCH_FLOOR)
                log(f"{model} step {i} {term}: cpu={a[term]:.8g} {self.device.type}={b[term]:.8g} rel={rel:.3g}")
                worst = max(worst, rel)
        if len(steps["cpu"]) != MATCH_STEPS or len(steps["device"]) != MATCH_STEPS:
            raise RuntimeError(f"expected {MATCH_STEPS} steps, got {len(steps['cpu'])} and {len(steps['device'])}")
        return worst

    def trials(self) -> None:
        f, sizes = self.figure, self.sizes
        epochs = 1
        if self.args.trial_epochs:
            epochs = self.args.trial_epochs
        elif sizes.trial_fit_s and self.lnln_epoch_s:
            epochs = int(min(60, max(1, round(sizes.trial_fit_s / self.lnln_epoch_s))))
        elif sizes.trial_fit_s:
            epochs = 10  # the in-process section failed: a guess
        f("trial_epochs", epochs)
        threads = self.args.trial_threads or sizes.trial_threads
        f("trial_threads", threads)
        counts = tuple(int(k) for k in self.args.trial_counts.split(",")) if self.args.trial_counts \
            else sizes.trial_counts
        # train.eval_batch_size variants: figures get an _eval<N> suffix when asked for.
        eval_sizes = [int(n) for n in self.args.eval_batch_sizes.split(",")] if self.args.eval_batch_sizes else [None]
        for eval_rows in eval_sizes:
            suffix = f"_eval{eval_rows}" if eval_rows else ""
            cfg = make_config(sizes, self.device, epochs=epochs, threads=threads,
                              eval_batch_size=eval_rows)
            config_file = self.tmp / f"trial{suffix}.json"
            config_file.write_text(json.dumps(cfg.model_dump(mode="json")))
            reset_peak(self.device)
            rates = {}
            for k in counts:
                reserve = self.args.reserve_s if self.args.reserve_s >= 0 else sizes.deepspeed_reserve_s
                timeout = self.deadline - time.perf_counter() - reserve
                if timeout <= 10:
                    raise RuntimeError(f"no time left for {k} trials (budget)")
                rates[k] = self._trial_group(k, config_file, timeout, suffix)
                f(f"trials_per_hour_{k}{suffix}", rates[k])
            for k in counts[1:]:
                f(f"speedup_{k}_vs_1{suffix}", rates[k] / rates[1])

    def _trial_group(self, k: int, config_file: Path, timeout: float, suffix: str = "") -> float:
        f = self.figure
        outs = [self.tmp / f"trial-{k}-{i}.log" for i in range(k)]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.args.trial_threads or self.sizes.trial_threads)}
        cmd = [sys.executable, __file__, "--trial", str(config_file), "--store", str(self.store),
               "--out", str(self.args.out)] + (["--cpu"] if self.args.cpu else [])
        files = [open(o, "w") for o in outs]
        launched = time.time()
        procs = [subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env) for fh in files]
        try:
            for p in procs:
                p.wait(timeout=max(1.0, launched + timeout - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
                p.wait()
            raise RuntimeError(f"{k} trials still running after {timeout:.0f} s (budget)") from None
        finally:
            for fh in files:
                fh.close()
        wall = time.time() - launched
        results = []
        for p, o in zip(procs, outs):
            text = o.read_text()
            lines = [l for l in text.splitlines() if l.startswith("TRIAL ")]
            if p.returncode != 0 or not lines:
                print(text[-4000:], flush=True)
                raise RuntimeError(f"a trial of {k} exited with {p.returncode}")
            results.append(json.loads(lines[-1][6:]))
        for i, r in enumerate(results):
            log(f"{k} trials, trial {i}: start-up {r['fit_start'] - launched:.1f} s, fit {r['fit_s']:.1f} s "
                f"(train {r['train_s']:.1f} s, eval {r['eval_s']:.1f} s), peak GPU {r['peak_gpu_mb']} MB, "
                f"objective {r['objective']:.4f}")
        name = f"trials_{k}{suffix}"
        f(f"{name}_wall_s", wall)
        f(f"{name}_startup_s_mean", float(np.mean([r["fit_start"] - launched for r in results])))
        f(f"{name}_fit_s_mean", float(np.mean([r["fit_s"] for r in results])))
        f(f"{name}_train_s_mean", float(np.mean([r["train_s"] for r in results])))
        f(f"{name}_eval_s_mean", float(np.mean([r["eval_s"] for r in results])))
        f(f"{name}_train_s_max", float(max(r["train_s"] for r in results)))
        f(f"{name}_peak_gpu_mb_max", max(r["peak_gpu_mb"] for r in results) if self.device.type == "cuda"
          else "na")
        return k * 3600.0 / wall

    def determinism(self) -> None:
        for deterministic in (False, True):  # its settings are process-wide: one child each
            cmd = [sys.executable, __file__, "--determinism", str(int(deterministic)), "--store", str(self.store),
                   "--out", str(self.args.out)] + (["--cpu"] if self.args.cpu else [])
            proc = subprocess.run(cmd, timeout=max(10.0, self.deadline - time.perf_counter() - 60))
            if proc.returncode != 0:
                raise RuntimeError(f"the determinism process exited with {proc.returncode}")

    def deepspeed(self) -> None:
        timeout = max(10.0, self.deadline - time.perf_counter())
        cmd = [sys.executable, __file__, "--deepspeed", "--store", str(self.store), "--out", str(self.args.out)]
        proc = subprocess.run(cmd + (["--cpu"] if self.args.cpu else []), timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"the DeepSpeed process exited with {proc.returncode}")


def trial_child(args: argparse.Namespace) -> None:
    """One trial: `fit` on the store, its figures as one JSON line."""
    cfg = ExperimentConfig.model_validate(json.loads(Path(args.trial).read_text()))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = torch.device(cfg.train.device)
    splits = load_splits(args.store)
    fit_start = time.time()
    state = fit(cfg, splits, device=device)
    sync(device)
    print("TRIAL " + json.dumps({
        "fit_start": fit_start, "fit_s": time.time() - fit_start,
        "train_s": sum(r.train_time_s for r in state.history), "eval_s": sum(r.eval_time_s for r in state.history),
        "peak_gpu_mb": round(peak_mb(device), 1) if device.type == "cuda" else "na",
        "objective": state.history[-1].objective}), flush=True)


def determinism_child(args: argparse.Namespace) -> None:
    """Two runs of the same steps from the same seed: are losses and weights bit for bit equal?"""
    sizes, device = (CPU, torch.device("cpu")) if args.cpu else (GPU, torch.device("cuda", 0))
    deterministic = bool(int(args.determinism))
    split = stage(head(load_splits(args.store)["train"], 4 * sizes.batch), device)
    runs = []
    for _ in range(2):
        cfg = make_config(sizes, device, deterministic=deterministic)
        state = build_state(cfg, split, device)  # applies train.deterministic (search/devices.py)
        sync(device)
        start = time.perf_counter()
        losses = train(state, cfg, split, device)
        sync(device)
        weights = torch.cat([p.detach().float().flatten().cpu() for p in state.model.parameters()])
        runs.append((losses, weights, time.perf_counter() - start))
    same = runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    figure = Figures(args.out)
    figure(f"deterministic_{int(deterministic)}_bitwise_repeat", int(same))
    figure(f"deterministic_{int(deterministic)}_max_weight_diff", float((runs[0][1] - runs[1][1]).abs().max()))
    figure(f"deterministic_{int(deterministic)}_train_s", runs[1][2])


def deepspeed_child(args: argparse.Namespace) -> None:
    """LNLN through DeepSpeed's engine, world size 1, bf16 then fp16 (GPU only). Exits 1 if one failed."""
    sizes, device = (CPU, torch.device("cpu")) if args.cpu else (GPU, torch.device("cuda", 0))
    figure = Figures(args.out)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    import torch.distributed as dist
    from search.worker import setup_engine

    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes on 2 cores)
        # that one rank never uses; its CUDA backend has none, so without it the dry run is the GPU path.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    from deepspeed.accelerator import get_accelerator
    figure("deepspeed_accelerator", get_accelerator().device_name())
    split = stage(load_splits(args.store)["train"], device)
    failed = []
    for precision in ("bf16", "fp16"):
        prefix = f"lnln_ds_{precision}"
        if precision == "fp16" and device.type != "cuda":
            figure(prefix, "skipped_cpu")  # DeepSpeed's CPU accelerator has no fp16
            continue
        try:
            cfg = make_config(sizes, device, precision=precision, workers=1, engine="deepspeed")
            reset_peak(device)
            state = build_state(cfg, split, device)
            engine, step = setup_engine(state, cfg)
            dtype = param_dtype(engine)
            figure(f"{prefix}_param_dtype", str(dtype).removeprefix("torch."))
            # As in a Ray Train worker: batches in the weights' dtype, bf16 under autocast.
            measure_training(prefix, state, cfg, split, device, sizes, figure, step=step, dtype=dtype)
            del engine, state, step
        except Exception:
            traceback.print_exc(file=sys.stdout)
            failed.append(prefix)
            figure(f"{prefix}_ok", 0)
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="figures.txt goes here")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny sizes")
    parser.add_argument("--budget-s", type=float, default=0.0, help="0: 435 on a GPU, 330 with --cpu")
    parser.add_argument("--sections", default="", help="comma-separated subset of the sections after data")
    parser.add_argument("--trial-counts", default="", help="e.g. 1,8 (default: 1,4,8; --cpu 1,2)")
    parser.add_argument("--trial-epochs", type=int, default=0, help="0: sized from the LNLN epoch time")
    parser.add_argument("--trial-threads", type=int, default=0, help="CPU threads per trial (default: 2; --cpu 1)")
    parser.add_argument("--eval-batch-sizes", default="",
                        help="trials: repeat for each train.eval_batch_size, e.g. 128,1024 (default: the config's)")
    parser.add_argument("--reserve-s", type=float, default=-1.0,
                        help="seconds the trials leave for the sections after them (default: 150 GPU, 40 CPU)")
    parser.add_argument("--trial", help=argparse.SUPPRESS)  # child: one trial's config (JSON file)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)  # child: the DeepSpeed section
    parser.add_argument("--determinism", help=argparse.SUPPRESS)  # child: 0 or 1 (train.deterministic)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    np.seterr(all="ignore")
    if args.cpu:
        # One thread: on a small shared box an OpenMP team whose cores are busy elsewhere
        # runs a tiny model's step 50x slower (measured: 17 s against 0.3 s).
        torch.set_num_threads(1)
    if args.trial:
        return trial_child(args)
    if args.deepspeed:
        return deepspeed_child(args)
    if args.determinism is not None:
        return determinism_child(args)
    bench = Bench(args)
    try:
        ok = [bench.section("env", bench.env), bench.section("data", bench.data)]
        for name in ("inprocess", "cpu_match", "trials", "determinism", "deepspeed"):
            if args.sections and name not in args.sections.split(","):
                continue
            if ok[1]:
                ok.append(bench.section(name, getattr(bench, name)))
            else:  # no data to train on
                bench.figure(f"section_{name}_ok", 0)
                ok.append(False)
        bench.figure("total_s", time.perf_counter() - bench.started)
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
