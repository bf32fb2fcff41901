"""Whether a search's driver runs, so that `status` can tell a running trial from one that a
stopped driver left RUNNING in the study.

Optuna keeps a trial RUNNING until its driver says how it ended: after Ctrl-C, a killed driver or
a lost head node, the study shows trials running that nothing runs (`tune --resume` takes them
over). So while `msa-search tune` runs, its driver keeps EXP/.driver (host, pid and the
process's start time, which a reused pid does not share) and removes it when it returns.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Iterator, Literal

import psutil

from data_pipeline.atomic import atomic_file, writing

from .layout import Layout

DriverState = Literal["running", "stopped", "unknown"]


@contextlib.contextmanager
def driver_marked(layout: Layout) -> Iterator[None]:
    """Mark the experiment as driven by this process for the duration of the block."""
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}
    with writing(layout.driver), atomic_file(layout.driver, force=True) as tmp:
        tmp.write_text(json.dumps(me) + "\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # a full or read-only disk: status then asks the pid
            layout.driver.unlink()


def driver_state(layout: Layout) -> DriverState:
    """running: its driver runs on this host; stopped: none runs (no mark, or its process is
    gone); unknown: the driver runs or ran on another host, which this one cannot ask."""
    try:
        mark = json.loads(layout.driver.read_text())
    except FileNotFoundError:
        return "stopped"
    except (OSError, ValueError):
        return "unknown"
    if mark.get("host") != socket.gethostname():
        return "unknown"
    try:
        alive = psutil.Process(int(mark["pid"])).create_time() == mark.get("started")
    except (psutil.Error, KeyError, TypeError, ValueError):
        alive = False
    return "running" if alive else "stopped"
