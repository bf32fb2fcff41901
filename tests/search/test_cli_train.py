"""`msa-search train` in-process, as a user runs it."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from search.results import ResultsStore
from small_grid import EVAL_GRID, EVAL_GRID_SETTING

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--set", "data.scale=0.1", "--set", "train.epochs=2", "--set", "model.hidden_dim=32",
         "--set", "model.dim_head=16", "--set", "model.num_heads=4", "--set", "model.lnln.tokens=4",
         "--set", "train.workers=0", "--set", EVAL_GRID_SETTING]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_train_writes_config_results_and_checkpoint(tmp_path):
    config = ROOT / "configs" / "lnln_quick.yaml"
    r = cli("train", "--config", str(config), *SMALL, "--set", "output.dir=run1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run1"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["model"]["hidden_dim"] == 32
    df = ResultsStore(run / "results").read()
    assert len(df) == 2 * 2 * len(EVAL_GRID)
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert set(df.split) == {"valid", "test"} and df.f1_non0.notna().all()
    assert (run / "checkpoints" / "last.pt").is_file()
    assert "robust_f1" in r.stdout

    again = cli("train", "--config", str(config), *SMALL, "--set", "output.dir=run1", cwd=tmp_path)
    assert again.returncode == 1 and "not empty" in again.stderr
    assert len(ResultsStore(run / "results").read()) == 2 * 2 * len(EVAL_GRID), "an existing run is never touched"


def test_an_interrupted_run_resumes_to_the_run_that_never_stopped(tmp_path):
    """Ctrl-C after the first epoch: exit 130 and a line saying how to go on; `train --resume`
    then trains the rest, ending with the very numbers of the same run left alone (dropout on:
    its generators too)."""
    args = ["train", "--config", str(ROOT / "configs" / "lnln_quick.yaml"), *SMALL, "--set", "model.dropout=0.1"]
    whole = cli(*args, "--set", "output.dir=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "search.cli", *args, "--set", f"output.dir={cut}"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            # Ctrl-C at its default: a suite started in the background may have it ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    said = []
    for line in proc.stderr:
        said.append(line)
        if line.startswith("epoch 0 (1/2)"):  # printed after its checkpoint was written
            proc.send_signal(signal.SIGINT)
            break
    said += proc.stderr.readlines()
    assert proc.wait(timeout=120) == 130, "".join(said)
    assert f"interrupted: go on from {cut}'s last checkpoint with: msa-search train --resume {cut}" in "".join(said)

    resumed = cli("train", "--resume", str(cut), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {cut} at epoch 1 (2/2)" in resumed.stderr and "epoch 0 (1/2)" not in resumed.stderr
    key = ["epoch", "split", "pattern"]
    a, b = (ResultsStore(tmp_path / run / "results").read(hparams=False).sort_values(key).reset_index(drop=True)
            for run in ("whole", "cut"))
    metrics = [c for c in a.columns if c not in ("experiment", "trial_id", "wall_time_s")]
    assert len(a) == 2 * 2 * len(EVAL_GRID) and a[metrics].equals(b[metrics])
    # The resumed epoch's clock goes on from the first's: the run's time never runs backwards.
    first, second = (b.wall_time_s[b.epoch == e] for e in (0, 1))
    assert second.min() > first.max(), (first.max(), second.min())
    again = cli("train", "--resume", str(cut), cwd=tmp_path)
    assert again.returncode == 0 and "ran all its 2 epochs already" in again.stderr


def test_train_config_errors_are_one_line(tmp_path):
    r = cli("train", "--config", str(ROOT / "configs" / "lnln_quick.yaml"), "--set", "train.engin=ddp", cwd=tmp_path)
    assert r.returncode == 2 and "'train.engin'" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", "--config", str(ROOT / "configs" / "lnln_quick.yaml"), "--set", "model.loss_weights.kd=1",
            "--set", "output.dir=x", cwd=tmp_path)
    assert r.returncode == 2 and "'model.loss_weights.kd': not a loss term" in r.stderr
    assert not (tmp_path / "x").exists(), "nothing written for an invalid config"
