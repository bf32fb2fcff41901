"""Shared fixtures: tiny synthetic datasets written to real files in a tmp dir."""
from __future__ import annotations

import sys

import pytest

from data_pipeline.mmsa import write_mmsa
from data_pipeline.store import write_store
from data_pipeline.synth import synthesize


def pytest_configure(config):
    """Before pytest-xdist starts its workers (this runs in the controller, or in the one process
    without xdist): write Ray's token file (~/.ray/auth_token) where it is missing, as the first
    private cluster would (search/ray_setup.py). Otherwise the two workers' first clusters can
    each write a token of their own at once, and one cluster then reads the other's."""
    if hasattr(config, "workerinput"):  # an xdist worker: the controller did it
        _share_the_cores(int(config.workerinput["workercount"]))
        return
    from search.ray_setup import owner_only_token

    owner_only_token()


def _share_the_cores(workers: int) -> None:
    """Each xdist worker's torch ops (and its subprocesses', through OMP_NUM_THREADS) run on its
    share of the cores. torch's default is every core: two workers on 2 cores then ran 2-thread
    ops that each waited at every barrier for a thread the other worker held (measured,
    2026-11-30, 2-vCPU AMD EPYC: tests/search/test_evaluate_and_train.py beside a one-core busy
    loop took 104 s at 2 threads, 79 s at 1). Tests about thread counts set their own."""
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_mosi():
    """Unaligned MOSI shapes (375 audio / 500 video frames), ~45 samples."""
    return synthesize("mosi", seed=7, scale=0.02)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_mosi):
    return write_store(tiny_mosi, tmp_path_factory.mktemp("store") / "mosi")


@pytest.fixture(scope="session")
def tiny_pickle(tmp_path_factory, tiny_mosi):
    return write_mmsa(tiny_mosi, tmp_path_factory.mktemp("pkl") / "unaligned_50.pkl")


@pytest.fixture
def msa_cli(monkeypatch, capsys):
    """`msa-search ARGS` in this process, through the same main() as the installed script:
    returns (exit code, stdout, stderr)."""
    from search import cli

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["msa-search", *args])
        monkeypatch.setenv("COLUMNS", "250")
        for console in (cli.console, cli.err_console):  # a COLUMNS set when they were made fixed their width
            monkeypatch.setattr(console, "_width", 250)  # (pytest-xdist's workers run with COLUMNS=80)
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        captured = capsys.readouterr()
        return exit_info.value.code, captured.out, captured.err

    return run


# The suite's Python process starts Ray, torch thread pools, pyarrow and Optuna. Once (2026-11-28,
# commit 8db5f2e, on a fresh clone) it crashed with a segmentation fault after every test had
# passed and the summary was printed: in the interpreter's own teardown of those libraries'
# threads, not in a test. The exit status is the tests' alone: pytest's is kept, and the
# interpreter's teardown is skipped once pytest has written everything (trylast).
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    session.config._msa_exitstatus = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    import os

    status = getattr(config, "_msa_exitstatus", None)
    if status is not None and os.environ.get("MSA_SEARCH_TEST_CLEAN_EXIT") != "1":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
