"""bench/gpu_check.sh's dry run on the CPU (`--cpu`): every section of the GPU check runs at tiny
sizes through the same code, so its plumbing is tested before it meets a GPU."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "data", "inprocess", "cpu_match", "trials", "deepspeed")
NUMERIC = [f"{m}_{p}_{k}" for m in ("lnln", "hrlf") for p in ("fp32", "bf16")
           for k in ("train_samples_per_s", "loss")] + [
    "lnln_ds_bf16_train_samples_per_s", "lnln_ds_bf16_loss", "lnln_fp32_eval_epoch_s",
    "trials_per_hour_1", "trials_per_hour_2", "speedup_2_vs_1", "trials_1_train_s_mean", "trials_2_wall_s",
    "cpu_match_max_rel_diff", "cpu_match_tolerance", "total_s"]


def test_gpu_check_dry_run_on_cpu_runs_every_section_and_writes_figures_and_log(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), str(out), "--cpu"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    log = (out / "log.txt").read_text()
    assert "bench/gpu_check.py exited with 0" in log and "torch " in log and "deepspeed 0.19.8" in log
    lines = (out / "figures.txt").read_text().splitlines()
    figures = dict(line.split("=", 1) for line in lines)
    assert len(figures) == len(lines)  # one line per figure
    assert [k for k, v in figures.items() if k.endswith("_ok") and v != "1"] == []
    assert all(figures[f"section_{name}_ok"] == "1" for name in SECTIONS)
    for name in NUMERIC:
        assert math.isfinite(float(figures[name])), name
    assert figures["device"] == "cpu" and figures["mode"] == "cpu"
    assert figures["cpu_match_ok"] == "1" and float(figures["cpu_match_max_rel_diff"]) == 0.0  # CPU against CPU
    # bf16 is autocast (fp32 weights) in-process and in DeepSpeed's engine; fp32 is not.
    assert figures["lnln_bf16_autocast_bf16"] == figures["lnln_ds_bf16_autocast_bf16"] == "1"
    assert figures["lnln_fp32_autocast_bf16"] == "0"
    assert all(figures[k] == "1" for k in figures if k.endswith("_loss_finite"))
    assert figures["lnln_fp32_host_syncs_per_step"] == figures["lnln_fp32_peak_gpu_mb"] == "na"
    assert figures["lnln_ds_fp16"] == "skipped_cpu"
