"""Write-then-rename helpers: a failed write never leaves a partial file or dataset behind,
and an existing output is never overwritten unless asked (and then replaced only once the
new one is complete)."""
from __future__ import annotations

import errno
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


class OutputWriteError(MsaSearchError):
    """An output that could be written when the command started cannot be any more (the disk
    filled up, the file system turned read-only, ...): names the file and why."""


# What a user can act on, by errno; strerror's own words for anything else.
_WRITE_FAULTS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                 errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                 errno.EPERM: "operation not permitted", errno.EIO: "input/output error"}


def write_fault(exc: OSError) -> str:
    """Why an OSError from a write happened, in a few words (pyarrow's and torch's OSErrors
    carry the errno too, with longer messages)."""
    if exc.errno in _WRITE_FAULTS:
        return _WRITE_FAULTS[exc.errno]
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


def location_fault(path: Path) -> str | None:
    """Why nothing can be written at `path` (a file or a directory, existing or not) now: its
    file system is read-only or has no space left; None when neither is (or it cannot tell)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        stat = os.statvfs(probe)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return _WRITE_FAULTS[errno.EROFS]
    free = stat.f_bfree if os.geteuid() == 0 else stat.f_bavail  # root may use the reserved blocks
    if free == 0:
        return _WRITE_FAULTS[errno.ENOSPC]
    return None


@contextmanager
def writing(path: Path | str, kept: str = ""):
    """Turn an OSError of the block (which writes `path`) into one OutputWriteError naming
    `path` and why; `kept` says what earlier output is still intact."""
    try:
        yield
    except OSError as exc:
        raise OutputWriteError(f"{path}: cannot write ({write_fault(exc)})" + (f"; {kept}" if kept else "")) from exc


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


def refuse_existing(path: Path, force: bool, file: bool = False) -> None:
    """Fail early (the CLI, before any long work) when `path` exists and replacing it was not
    asked for, or when it cannot be made. `file`: the output is a file, so an existing
    directory there is refused even with `force` (it would not be replaced)."""
    if file:
        _refuse_directory(path)
    _refuse_if_exists(path, force)
    reason = unwritable(path)
    if reason:
        raise OutputNotWritableError(f"{path}: expected an output in a writable directory, found {reason}")


def _refuse_if_exists(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: already exists; choose another output or pass --force to replace it")


def _refuse_directory(path: Path) -> None:
    if Path(path).is_dir():
        raise OutputNotWritableError(f"{path}: a directory, and this output is a file; name a file (in that "
                                     "directory or elsewhere)")


@contextmanager
def atomic_file(path: Path, force: bool = False):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.
    Its own failures (making the temporary file, the rename) name `path`, not the temporary."""
    path = Path(path)
    _refuse_directory(path)
    _refuse_if_exists(path, force)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with writing(path):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
            os.replace(tmp, path)
    finally:
        _discard(tmp)


def _discard(tmp: Path) -> None:
    """Remove a temporary output; on a file system turned read-only half-way it stays (a
    hidden name no reader lists) rather than hide the error that stopped the write."""
    try:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


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
        _discard(tmp)
