"""Ray's and Optuna's own output during a search: to a log file, so the console view is readable.

Ray Tune prints its trial tables with `print()` and logs through the `ray` logger (warnings
such as experiment-snapshot advice repeat every few seconds); Optuna logs study events
through the `optuna` logger. While the console view (search/console_view.py) runs, all of it
goes to EXP/logs/ray.log instead, and the view shows how many warnings and errors it holds.
`--verbose` keeps Ray's own output on the console as before (the file still gets the logs).
"""
from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator


def _library_loggers() -> list[logging.Logger]:
    """Ray's and Optuna's top loggers (named after their packages): both stop propagation at
    themselves, with a stderr handler each."""
    import optuna
    import ray

    optuna.logging.get_logger("optuna")  # Optuna adds its stderr handler on first use: now, so it is swapped too
    return [logging.getLogger(ray.__name__), logging.getLogger(optuna.__name__)]


class _Count(logging.Handler):
    """Counts warnings and errors by level name (read by the console view)."""

    def __init__(self, counts: Counter):
        super().__init__(level=logging.WARNING)
        self.counts = counts

    def emit(self, record: logging.LogRecord) -> None:
        self.counts[record.levelname.lower()] += 1


@contextlib.contextmanager
def ray_output_to(log_path: Path, *, verbose: bool = False) -> Iterator[Counter]:
    """Send Ray's and Optuna's logs (and, unless `verbose`, Ray's printed tables) to `log_path`
    for the duration of the block; yields the live count of warnings and errors by level."""
    loggers = _library_loggers()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    fh = _LogFile(open(log_path, "a", buffering=1, encoding="utf-8"))
    to_file = logging.StreamHandler(fh)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = {logger: list(logger.handlers) for logger in loggers}
    for logger, handlers in saved.items():
        kept = handlers if verbose else [h for h in handlers if not _to_console(h)]
        logger.handlers = [*kept, to_file, _Count(counts)]
    try:
        with contextlib.redirect_stdout(sys.stdout if verbose else fh):
            yield counts
    finally:
        for logger, handlers in saved.items():
            logger.handlers = handlers
        fh.close()


class _LogFile(io.TextIOBase):
    """The log file, written on a best-effort basis: when the disk fills up or turns read-only
    half-way, Ray's tables and messages are dropped instead of failing the search from inside
    Ray (an OSError without a path, or logging's traceback per record on the console). The
    search's own writes (results, checkpoints, study) fail with one line naming their file."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError):
            self.fh.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: closed
            self.fh.flush()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        super().close()


def _to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (
        sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
