"""A distributed run whose worker is killed resumes from its last checkpoint, as a user does it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from search.layout import Layout
from search.results import ResultsStore
from small_grid import EVAL_GRID, EVAL_GRID_SETTING

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--config", str(ROOT / "configs" / "lnln_quick.yaml"),
        "--set", "data.scale=0.1", "--set", "train.epochs=3", "--set", "train.workers=2",
        "--set", "train.engine=ddp", "--set", "train.device=cpu", "--set", "model.hidden_dim=32",
        "--set", "model.dim_head=16", "--set", "model.num_heads=4", "--set", "model.lnln.tokens=4",
        "--set", EVAL_GRID_SETTING]


def cli(*args, cwd, **kw):
    return subprocess.Popen([sys.executable, "-m", "search.cli", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, **kw)


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def epochs_logged(run: Path) -> list[dict]:
    path = run / "epochs.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def train_workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train workers of this driver's private cluster (its raylet, and so its workers,
    descend from the driver), never those of another run on the machine (a parallel test's)."""
    found = []
    for p in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_killed_worker_run_resumes_without_duplicate_or_missing_rows(tmp_path):
    run = tmp_path / "run"
    driver = cli("train", *ARGS, "--set", f"output.dir={run}", cwd=tmp_path)
    try:
        wait_for(lambda: any(e["checkpoint"] for e in epochs_logged(run)) or driver.poll() is not None, 240,
                 "the first checkpoint")
        assert driver.poll() is None, driver.communicate()[1][-2000:]
        workers = train_workers(driver.pid)
        assert workers, "Ray Train worker processes must be visible"
        workers[-1].send_signal(signal.SIGKILL)
        _, err = driver.communicate(timeout=240)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0
    assert "--resume" in err and str(run) in err
    # Ray's own lines (its start, token auth) went to the run's log, not between our lines.
    started = "Started a local Ray instance"
    assert started not in err and started in Layout(run).ray_log.read_text()
    done_before = {e["epoch"] for e in epochs_logged(run)}
    assert 0 in done_before and len(done_before) < 3, "killed mid-run"

    resumed = cli("train", "--resume", str(run), cwd=tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    df = ResultsStore(run / "results").read()
    assert len(df) == 3 * 2 * len(EVAL_GRID)
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    log = epochs_logged(run)
    assert {e["epoch"] for e in log} == {0, 1, 2}
    # Resumed epochs never re-ran epoch 0 (it continued from the checkpoint)...
    assert [e["epoch"] for e in log].count(0) == 1
    # ...and evaluated on exactly the same masks as before the kill.
    assert len({(e["mask_fingerprint/valid"], e["mask_fingerprint/test"]) for e in log}) == 1
    # The run's clock went on from the rows stored before the kill: epochs' times keep rising.
    times = df.groupby("epoch").wall_time_s.agg(["min", "max"]).sort_index()
    assert (times["min"].iloc[1:].to_numpy() > times["max"].iloc[:-1].to_numpy()).all(), times

