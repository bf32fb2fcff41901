"""Ray Train + DeepSpeed/DDP training runs on a local Ray cluster (real Ray, real DeepSpeed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from data_pipeline.errors import MsaSearchError
from data_pipeline.loader import load_splits
from data_pipeline.store import read_spec
from search.config import ExperimentConfig
from search.distributed import cpu_layout_hint, train_distributed
from search.layout import Layout
from search.ray_setup import LOCAL_RAY_SYSTEM_CONFIG
from search.results import ResultsStore
from search.run import train_in_process
from search.trainer import build_state, unwrap
from search.shared_data import DATA_PRIVATE_MB
from search.weights import init_weights, read_checkpoint
from search.worker import CLIENT_STATE_FILE
from small_grid import EVAL_GRID

pytestmark = pytest.mark.integration

TINY = {
    "data": {"preset": "mosi-aligned", "scale": 0.1},
    "model": {"hidden_dim": 32, "num_heads": 4, "dim_head": 16, "mlp_dim": 32, "lnln": {"tokens": 4}},
    "train": {"epochs": 2, "batch_size": 32, "lr": 1e-3, "device": "cpu", "cpus_per_worker": 1},
    "missing": {"eval_grid": EVAL_GRID},
}


def tiny_cfg(tmp_path: Path, name: str, **train) -> ExperimentConfig:
    raw = json.loads(json.dumps(TINY))
    raw["train"].update(train)
    raw["output"] = {"dir": str(tmp_path / name)}
    return ExperimentConfig.model_validate(raw)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    # address="local": always a fresh cluster of our own, never one that happens to run here
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield
    ray.shutdown()


def epoch_log(run: Path) -> list[dict]:
    return [json.loads(l) for l in Layout(run).epoch_log.read_text().splitlines()]


def assert_complete_results(run: Path, epochs: int) -> None:
    df = ResultsStore(run / "results").read()
    assert len(df) == epochs * 2 * len(EVAL_GRID)
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert sorted(df.epoch.unique()) == list(range(epochs))
    assert df.f1_non0.notna().all()
    # The last epoch's report compacted the run's parts into one file.
    assert [p.name[:6] for p in (run / "results").iterdir()] == ["trial-"]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2")
    cfg = tiny_cfg(tmp, "zero2", workers=2, engine="deepspeed", zero_stage=2, precision="bf16")
    run, metrics = train_distributed(cfg)
    return run, metrics


def test_two_worker_zero2_bf16_run_writes_every_row_and_checkpoints(zero2_run):
    run, metrics = zero2_run
    assert_complete_results(run, epochs=2)
    assert metrics["epoch"] == 1 and 0.0 <= metrics["robust_f1"] <= 1.0
    assert all(e["checkpoint"] for e in epoch_log(run))
    checkpoints = sorted(p for p in (run / "checkpoints" / "train").glob("checkpoint_*") if p.is_dir())
    assert checkpoints and (checkpoints[-1] / "state").is_dir(), "DeepSpeed checkpoint persisted by Ray"


def test_two_ranks_on_one_node_share_one_copy_of_the_data(zero2_run):
    run, _ = zero2_run
    store = next(Layout(run).data.glob("*/schema.json")).parent
    dataset_mb = sum(s.nbytes for s in load_splits(store).values()) / 2**20
    by_rank = epoch_log(run)[0][DATA_PRIVATE_MB]
    # A rank holding its own copy would take the whole dataset (~35 MB here) privately.
    assert len(by_rank) == 2 and all(mb < 0.25 * dataset_mb for mb in by_rank), (by_rank, dataset_mb)


# 128 rows in batches of 19 = 7 batches an epoch; grad_accum 3 makes groups of 3, 3 and 1 in
# every epoch on every path (the last batch of an epoch closes its group), whatever counter an
# engine keeps across epochs. One thread everywhere: the same float sums.
ACCUM_TRAIN = {"epochs": 2, "batch_size": 19, "grad_accum": 3, "batch_chunks": 1, "threads": 1}


@pytest.fixture(scope="module")
def ddp1_run(tmp_path_factory):
    """One DDP worker with gradient accumulation (shared: a Ray Train start costs 10-20 s here)."""
    return train_distributed(tiny_cfg(tmp_path_factory.mktemp("ddp1"), "ddp", workers=1, engine="ddp",
                                      **ACCUM_TRAIN))[0]


def test_ddp_runs_and_one_or_two_workers_see_identical_evaluation_masks(tmp_path, zero2_run, ddp1_run):
    # Evaluation masks depend on the data and missing.seed only, not on training's batches.
    two = train_distributed(tiny_cfg(tmp_path, "ddp2", workers=2, engine="ddp", epochs=1))[0]
    one = ddp1_run
    assert_complete_results(two, epochs=1)
    assert_complete_results(one, epochs=2)
    fingerprints = [{k: v for k, v in epoch_log(r)[0].items() if k.startswith("mask_fingerprint/")}
                    for r in (one, two, zero2_run[0])]
    assert set(fingerprints[0]) == {"mask_fingerprint/valid", "mask_fingerprint/test"}
    assert fingerprints[0] == fingerprints[1] == fingerprints[2]


def test_two_worker_zero3_run_survives_a_one_row_tail_batch(tmp_path, capsys):
    # 128 training rows, 64 per rank, batches of 63: every rank ends its epoch on one row.
    # ZeRO-3 gathers weights per submodule call, so a forward whose calls depended on the
    # batch (length buckets) once put the ranks' collectives out of step there.
    cfg = tiny_cfg(tmp_path, "zero3", workers=2, engine="deepspeed", zero_stage=3, epochs=1, batch_size=63)
    run, metrics = train_distributed(cfg)
    assert_complete_results(run, epochs=1)
    assert metrics["epoch"] == 0 and 0.0 <= metrics["robust_f1"] <= 1.0
    # `evaluate --checkpoint RUN` and `--init-from RUN`: each rank holds a partition; DeepSpeed's
    # reader gathers them, and the fusion token (tied: one tensor, two names) comes back under both.
    spec = read_spec(next(Layout(run).data.glob("*/schema.json")).parent)
    capsys.readouterr()
    weights = init_weights(read_checkpoint(run), run, cfg, spec)
    assert weights["fusion.transformer.source_token"] is weights["fusion.transformer.target_token"]
    # DeepSpeed's reader prints what it reads: on stderr, so that evaluate's stdout stays its results.
    out, err = capsys.readouterr()
    assert "Processing zero checkpoint" not in out and "Processing zero checkpoint" in err


def test_fp16_on_cpu_is_refused_before_ray_starts(tmp_path):
    with pytest.raises(MsaSearchError, match="fp16 needs a GPU"):
        train_distributed(tiny_cfg(tmp_path, "fp16", workers=2, precision="fp16"))
    assert not (tmp_path / "fp16").exists()


def test_multi_cpu_workers_on_cpu_get_the_one_cpu_per_worker_hint(tmp_path):
    hint = cpu_layout_hint(tiny_cfg(tmp_path, "a", workers=1, cpus_per_worker=2), gpu=False)
    assert hint is not None and "train.workers=2 train.cpus_per_worker=1" in hint
    assert "train.workers=6" in cpu_layout_hint(tiny_cfg(tmp_path, "b", workers=2, cpus_per_worker=3), gpu=False)
    assert cpu_layout_hint(tiny_cfg(tmp_path, "c", workers=2, cpus_per_worker=1), gpu=False) is None
    assert cpu_layout_hint(tiny_cfg(tmp_path, "d", workers=1, cpus_per_worker=4), gpu=True) is None


def test_private_local_cluster_runs_training_workers_at_normal_priority():
    # Ray's default worker niceness (15) made training 20-30% slower than outside Ray on a
    # busy 2-core machine. A fresh process, so that ensure_ray starts its own cluster; with
    # warm_workers (in-process Tune trials) its workers have imported the training code.
    script = (
        "import os, sys, ray\n"
        "from search.ray_setup import ensure_ray\n"
        "ensure_ray(None, warm_workers=True)\n"
        "print('niceness', ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote()))\n"
        "print('warm', ray.get(ray.remote(num_cpus=0)(lambda: 'search.trials' in sys.modules).remote()))\n"
        "ray.shutdown()\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"niceness {os.nice(0)}" in out.stdout and "warm True" in out.stdout


def test_ray_train_runs_start_ray_without_the_import_hook(monkeypatch):
    """The hook runs in every process of the job: Ray Train's six helpers would each import torch
    for nothing (search/ray_setup.py). Only in-process Tune trials ask for it."""
    import ray

    from search.ray_setup import ensure_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    ensure_ray(None)
    ensure_ray(None, warm_workers=True)
    assert calls[0]["runtime_env"] is None
    assert calls[1]["runtime_env"] == {"worker_process_setup_hook": "search.warm_workers.import_training"}


def last_checkpoint(run: Path) -> Path:
    return sorted(p for p in (Layout(run).checkpoints / "train").glob("checkpoint_*") if p.is_dir())[-1]


def test_grad_accum_trains_the_same_weights_in_process_and_in_ddp_and_deepspeed_workers(tmp_path, ddp1_run):
    # ACCUM_TRAIN on each path: bit for bit on CPU; on GPUs only with train.deterministic.
    train = ACCUM_TRAIN
    local = tiny_cfg(tmp_path, "in-process", **train)
    state, _ = train_in_process(local, show_progress=False)
    expected = unwrap(state.model).state_dict()
    store = next(Layout(tmp_path / "in-process").data.iterdir())
    initial = build_state(local, load_splits(store)["train"], torch.device("cpu")).model.state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in expected.items()), "it trained"
    ddp_run = ddp1_run
    ds_run, _ = train_distributed(tiny_cfg(tmp_path, "deepspeed", workers=1, engine="deepspeed", **train))
    # The weights as `evaluate --checkpoint RUN` and `--init-from RUN` read them: each run
    # directory's newest checkpoint (in-process: last.pt; DDP: client_state.pt; DeepSpeed: its
    # model states), through the weights-only reader.
    assert (last_checkpoint(ddp_run) / CLIENT_STATE_FILE).is_file()
    ddp, ds = read_checkpoint(ddp_run), read_checkpoint(ds_run)
    assert ddp.keys() == ds.keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in read_checkpoint(tmp_path / "in-process").items())
    for name, weight in expected.items():
        # DDP runs our optimizer step on the same module: bit-identical. DeepSpeed divides the
        # loss by grad_accum and clips with its own norm: float rounding only (fp32), which
        # AdamW's normalised steps magnify where a gradient is near 0 (seen on a norm's shift).
        torch.testing.assert_close(ddp[name], weight, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(ds[name], weight, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
