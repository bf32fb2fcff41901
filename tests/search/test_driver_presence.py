"""`status` tells trials that run from trials a stopped driver left RUNNING in the study."""
from __future__ import annotations

import json
import subprocess
import sys

from search.driver_presence import driver_marked, driver_state
from search.layout import Layout


def test_a_driver_is_running_while_its_mark_is_up_and_stopped_after(tmp_path):
    layout = Layout(tmp_path)
    assert driver_state(layout) == "stopped"
    with driver_marked(layout):
        assert driver_state(layout) == "running"
    assert driver_state(layout) == "stopped" and not layout.driver.exists()


def test_a_killed_drivers_mark_reads_stopped_and_another_hosts_unknown(tmp_path):
    layout = Layout(tmp_path)
    # A driver killed outright leaves its mark: its process is gone.
    code = ("import os, pathlib, signal, sys; from search.driver_presence import driver_marked; "
            "from search.layout import Layout; "
            "m = driver_marked(Layout(pathlib.Path(sys.argv[1]))); m.__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    assert layout.driver.is_file() and driver_state(layout) == "stopped"
    # A live process whose start time differs (a reused pid) is not the driver either.
    mark = json.loads(layout.driver.read_text())
    layout.driver.write_text(json.dumps({**mark, "pid": 1}))
    assert driver_state(layout) == "stopped"
    layout.driver.write_text(json.dumps({**mark, "host": "another-host"}))
    assert driver_state(layout) == "unknown"
