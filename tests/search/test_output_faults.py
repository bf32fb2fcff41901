"""Faults survived, nothing lost (issue 15): the output directory turning full or read-only
half-way through `msa-search train` and `msa-search tune` ends with ONE clear line naming the
file that could not be written and why, exit 1, no traceback; the rows written before the
fault read back whole, with no partial part file or temporary litter beside them.

Real faults, no mocks: the output directory lives on a small tmpfs mounted for the test. Once
the first epoch's part file has appeared, a thread of this test fills the tmpfs to the last
byte, or lays a read-only bind mount over it (a plain `remount,ro` is refused while a file
there is open for writing, as Ray's log and the SQLite study are during a search). Which
epochs were written "before the fault" is what the results folder holds at that moment.
Needs root (or CAP_SYS_ADMIN) to mount; skipped otherwise.
"""
from __future__ import annotations

import errno
import gc
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
import ray
import torch

from data_pipeline.store import write_store
from data_pipeline.synth import synthesize
from search.layout import Layout
from search.ray_setup import LOCAL_RAY_SYSTEM_CONFIG
from search.results import ResultsStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "lnln_quick.yaml")
TINY = ["train.batch_size=32", "model.hidden_dim=32", "model.dim_head=16", "model.num_heads=4",
        "model.lnln.tokens=4", "train.device=cpu", "train.threads=1", "train.workers=0"]
ROWS_PER_EPOCH = 2 * 16  # valid and test, the default 16-pattern grid
REASONS = {"full": "no space left on device", "read-only": "read-only file system"}
ERROR_LINE = re.compile(r"error: (?P<path>/\S+): cannot write \((?P<reason>[^)]+)\)")


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True)


SIZE_MB = 16


@dataclass
class Tmpfs:
    """A small tmpfs at `root`; `fault()` makes it full or read-only."""

    root: Path
    kind: str
    faulted_with: list[tuple[str, int]] = field(default_factory=list)  # the (trial, epoch)s stored at the fault
    done: threading.Event = field(default_factory=threading.Event)  # the command returned: no fault any more

    def fault(self) -> None:
        assert os.path.ismount(self.root), "never fill the disk beneath"
        if self.kind == "full":
            # One write() of more than the tmpfs holds: the kernel fills it to the last page and
            # returns short, in one system call with the GIL released. (64 KiB writes through a
            # buffered file took up to a second on a busy box, with the CLI's thread holding the
            # GIL in between: the trial failed on the half-filled disk, and its compaction still
            # fitted, before the fault's part files were listed.)
            fd = os.open(self.root / ".filler", os.O_WRONLY | os.O_CREAT)  # outside the run / experiment dir
            try:
                os.write(fd, bytes((SIZE_MB + 1) << 20))
                os.write(fd, b"\0")  # raises: nothing is left
                raise AssertionError(f"{self.root} is not full after writing {SIZE_MB + 1} MiB")
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
            finally:
                os.close(fd)
        else:
            for step in (["mount", "--bind", str(self.root), str(self.root)],
                         ["mount", "-o", "remount,bind,ro", str(self.root)]):
                result = _sh(*step)
                assert result.returncode == 0, result.stderr

    def unmount(self) -> None:
        self.done.set()
        deadline = time.monotonic() + 1
        while os.path.ismount(self.root):  # the read-only bind mount, then the tmpfs
            if _sh("umount", str(self.root)).returncode != 0:
                # Busy: a trial process still exiting, or the search's SQLite connections to
                # optuna.db, kept alive by the error that pytest's log capture holds (Optuna logs
                # the exception object): detach it now, freed when they go.
                gc.collect()
                if time.monotonic() < deadline:
                    time.sleep(0.2)
                    continue
                _sh("umount", "-l", str(self.root))
        assert not os.path.ismount(self.root), f"{self.root} is still mounted"


def _mount_tmpfs(root: Path) -> None:
    """Mount a tmpfs at `root`, or skip the test where this user may not."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: a tmpfs to fill or make read-only cannot be mounted")
    mounted = _sh("mount", "-t", "tmpfs", "-o", f"size={SIZE_MB}m", "tmpfs", str(root))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill or make read-only (needs root or CAP_SYS_ADMIN): "
                    f"{(mounted.stderr.strip().splitlines() or ['mount failed'])[0]}")


@pytest.fixture(scope="module")
def mounting_allowed(tmp_path_factory) -> None:
    """Skip before starting Ray where no tmpfs can be mounted."""
    probe = tmp_path_factory.mktemp("probe")
    _mount_tmpfs(probe)
    Tmpfs(probe, "full").unmount()


@pytest.fixture
def disk(request, tmp_path, mounting_allowed):
    """A 16 MiB tmpfs that the test makes `request.param` ("full" or "read-only") half-way."""
    root = tmp_path / "disk"
    root.mkdir()
    _mount_tmpfs(root)
    fs = Tmpfs(root, request.param)
    try:
        yield fs
    finally:
        fs.unmount()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The dataset, outside the tmpfs: the run only writes its own outputs there."""
    return write_store(synthesize("mosi-aligned", seed=0, scale=0.03), tmp_path_factory.mktemp("data") / "store")


def epochs_of(df) -> list[tuple[str, int]]:
    """The (trial, epoch)s of results rows: compared by rows, not file names, since a trial
    that ends compacts its parts into one file."""
    return sorted({(str(trial), int(epoch)) for trial, epoch in zip(df.trial_id, df.epoch)})


def stored_epochs(results: Path) -> list[tuple[str, int]]:
    """The (trial, epoch)s whose rows `results` holds, in parts or in a trial's compacted file."""
    return epochs_of(ResultsStore(results).read(hparams=False))


def fault_after_first_part(disk: Tmpfs, results: Path) -> threading.Thread:
    """A thread that waits for the first part file, then makes `disk` full or read-only (none
    when the command ends first)."""
    def watch():
        while not disk.done.is_set() and not list(results.glob("part-*.parquet")):
            time.sleep(0.02)
        if not disk.done.is_set():
            disk.fault()
            disk.faulted_with.extend(stored_epochs(results))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def run_cli(msa_cli, disk: Tmpfs, results: Path, *args: str):
    """`msa-search ARGS` in this process, its output dir faulted after the first part file."""
    watcher = fault_after_first_part(disk, results)
    try:
        return msa_cli(*args)
    finally:
        disk.done.set()
        watcher.join(timeout=30)


def check_one_line_naming(err: str, code, disk: Tmpfs, out_dir: Path) -> Path:
    """Exit 1, no traceback, and a last line naming a file of `out_dir` and the fault; returns it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    match = ERROR_LINE.match(lines[-1])
    assert match, lines[-1]
    assert match["reason"] == REASONS[disk.kind], lines[-1]
    path = Path(match["path"])
    assert path.is_relative_to(out_dir), lines[-1]
    return path


def litter(folder: Path, kind: str) -> list[str]:
    """What a failed write left in `folder` besides whole outputs: nothing on a full disk; on one
    turned read-only while a temporary was open, that temporary (it cannot be removed there),
    under a hidden name no reader lists."""
    left = sorted(name for name in os.listdir(folder) if name.startswith("."))
    if kind == "full":
        assert left == [], f"temporary files left in {folder}: {left}"
    assert all(re.fullmatch(r"\.[^/]+\.[A-Za-z0-9_]+\.tmp", name) for name in left), left
    return left


def check_rows_intact(disk: Tmpfs, results: Path, epochs: int) -> None:
    """Exactly the epochs stored at the fault, each whole; no partial file beside them."""
    assert disk.faulted_with, "the fault came before any part was written"
    litter(results, disk.kind)
    files = [name for name in os.listdir(results) if not name.startswith(".")]
    assert all(re.fullmatch(r"(part-.+-epoch\d{5}|trial-.+)\.parquet", name) for name in files), files
    df = ResultsStore(results).read()  # every file whole: a partial one would not read
    assert epochs_of(df) == disk.faulted_with, "an epoch stored after the fault, or one lost"
    per_epoch = df.groupby(["trial_id", "epoch"]).size()
    assert (per_epoch == ROWS_PER_EPOCH).all() and len(per_epoch) == len(disk.faulted_with), per_epoch
    assert not df.duplicated(["trial_id", "epoch", "split", "pattern"]).any()
    assert df.f1_non0.notna().all()
    for trial, group in df.groupby("trial_id"):
        finished = sorted(group.epoch.unique())
        assert finished == list(range(len(finished))), (trial, finished)  # no gap: epochs 0..k-1
    assert df.epoch.max() < epochs - 1, "the run went on to its last epoch after the fault"


EPOCHS = 8


# Full: checkpoints only after the last epoch, so the next write after the fault is epoch 1's
# part file. Read-only: a checkpoint every epoch, so the fault lands about when epoch 0's is
# written, before, during or after it (then epoch 1's part is the one refused).
@pytest.mark.parametrize("disk, checkpoint_every", [("full", EPOCHS), ("read-only", 1)], indirect=["disk"])
def test_train_on_a_disk_gone_full_or_read_only_stops_with_one_line_and_keeps_its_rows(
        disk, checkpoint_every, store, msa_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = disk.root / "run"
    overrides = [*TINY, f"data.path={store}", f"train.epochs={EPOCHS}", f"train.checkpoint_every={checkpoint_every}",
                 f"output.dir={run}"]
    code, out, err = run_cli(msa_cli, disk, run / "results", "train", "--config", CONFIG,
                             *(a for o in overrides for a in ("--set", o)))
    named = check_one_line_naming(err, code, disk, run)
    check_rows_intact(disk, run / "results", EPOCHS)
    next_part = run / "results" / f"part-run-epoch{len(disk.faulted_with):05d}.parquet"
    refused = {next_part} if checkpoint_every == EPOCHS else {next_part, run / "checkpoints" / "last.pt"}
    assert named in refused, err.splitlines()[-1]
    if named == next_part:
        assert "the rows written before stay readable in" in err.splitlines()[-1]
    # The checkpoint is the last whole one or absent, never a partial file.
    left = litter(run / "checkpoints", disk.kind)
    assert set(os.listdir(run / "checkpoints")) - set(left) <= {"last.pt"}
    if (run / "checkpoints" / "last.pt").exists():
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=False)["epoch"] >= 1


@pytest.fixture
def optuna_console_handler_off():
    """Optuna's console handler writes to the stderr of the test that first used Optuna: pytest's
    capture of that test, closed since, so every record would print a logging traceback here."""
    optuna.logging.disable_default_handler()
    yield
    optuna.logging.enable_default_handler()


@pytest.fixture(scope="module")
def local_ray(mounting_allowed):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=LOCAL_RAY_SYSTEM_CONFIG)
    yield
    ray.shutdown()


# Full, a checkpoint every epoch: the trial's next checkpoint cannot be saved (Ray writes it from
# the trial's process into EXP/ray/tune/<trial>/): the trial fails, and the search stops rather
# than start trials that would fail alike. Read-only, no checkpoint before the last epoch: the
# driver's next write is Optuna's (the trial's intermediate value into optuna.db), before ours.
@pytest.mark.integration
@pytest.mark.parametrize("disk, checkpoint_every, refused",
                         [("full", 1, "ray/tune"), ("read-only", EPOCHS, "optuna.db")], indirect=["disk"])
def test_tune_on_a_disk_gone_full_or_read_only_stops_the_search_with_one_line_and_keeps_its_rows(
        disk, checkpoint_every, refused, store, local_ray, optuna_console_handler_off, msa_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = disk.root / "exp"
    overrides = [*TINY, f"data.path={store}", f"train.epochs={EPOCHS}", f"train.checkpoint_every={checkpoint_every}",
                 "search.num_samples=2", "search.max_concurrent=1", "search.scheduler=none", f"output.dir={exp}"]
    started = time.monotonic()
    code, out, err = run_cli(msa_cli, disk, exp / "results", "tune", "--config", CONFIG,
                             *(a for o in overrides for a in ("--set", o)))
    named = check_one_line_naming(err, code, disk, exp)
    assert named == exp / refused or named.parent == exp / refused, err.splitlines()[-1]
    assert f"the rows written before stay readable in {exp / 'results'}" in err.splitlines()[-1]
    check_rows_intact(disk, exp / "results", EPOCHS)
    df = ResultsStore(exp / "results").read()
    assert df.trial_id.nunique() == 1, "a second trial ran although its results could not be stored"
    assert not list(Layout(exp).trial_params_dir.glob(".*")), "temporary litter beside the trial parameters"
    assert time.monotonic() - started < 120, "the driver did not stop soon after the fault"
