"""Ctrl-C on a distributed run (its own module: the suite's workers then run it beside the
killed-worker test, not after it)."""
from __future__ import annotations

import signal

import pytest
from test_distributed_resume import ARGS, cli, epochs_logged, wait_for

pytestmark = pytest.mark.integration


def test_ctrl_c_on_a_distributed_run_names_its_resume(tmp_path):
    """Ray Train takes the driver's Ctrl-C and aborts the run; the driver then ended with a
    silent exit 1. It ends with 130 and the line that continues the run."""
    run = tmp_path / "run"
    # Ctrl-C at its default: a suite started in the background may have it ignored
    driver = cli("train", *ARGS, "--set", "train.workers=1", "--set", f"output.dir={run}", cwd=tmp_path,
                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: any(e["checkpoint"] for e in epochs_logged(run)) or driver.poll() is not None, 240,
                 "the first checkpoint")
        assert driver.poll() is None, driver.communicate()[1][-2000:]
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-3000:]
    assert f"interrupted: go on from {run}'s last checkpoint with: msa-search train --resume {run}" in err, err[-3000:]
