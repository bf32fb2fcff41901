"""Write-then-rename helpers: a failed write never leaves a partial file or dataset behind,
and an existing output is never overwritten unless asked (and then replaced only once the
new one is complete)."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import MsaSearchError


class OutputExistsError(MsaSearchError):
    pass


class OutputNotWritableError(MsaSearchError):
    pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def unwritable(path: Path, inside: bool = False) -> str | None:
    """Why `path` cannot be made, or None: the nearest existing folder on its way must be a
    writable directory. `inside`: `path` is a directory written into (a run); otherwise an
    output made beside itself and renamed into place (atomic_file, atomic_dir)."""
    probe = Path(path).absolute()
    probe = probe if inside else probe.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):  # also false on a read-only file system
        return f"{probe} is not writable"
    return None


def refuse_existing(path: Path, force: bool) -> None:
    """Fail early (the CLI, before any long work) when `path` exists and replacing it was not
    asked for, or when it cannot be made."""
    _refuse_if_exists(path, force)
    reason = unwritable(path)
    if reason:
        raise OutputNotWritableError(f"{path}: expected an output in a writable directory, found {reason}")


def _refuse_if_exists(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; choose another output or pass --force to replace it")


@contextmanager
def atomic_file(path: Path, force: bool = False):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    _refuse_if_exists(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path, force: bool = False):
    """Yield a temporary directory beside `path`; it becomes `path` only if the block succeeds."""
    path = Path(path)
    _refuse_if_exists(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700
        if path.exists():
            # Swap in two renames so the old output survives until the new one is in place.
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
