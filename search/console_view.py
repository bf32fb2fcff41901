"""The console view of `msa-search tune`: one live summary instead of Ray's trial tables.

What a user watching a search needs at a glance: trials by state, each running trial's epoch
and objective, the best so far with its weakest pattern, the time spent and an estimate of
the time left. `SearchProgress` keeps that state and renders it (pure, tested without Ray);
`ConsoleView` is the Tune callback that feeds it from the driver and shows it:
- on a terminal, a rich `Live` panel redrawn in place;
- elsewhere (a pipe, `ray job submit` logs, CI), one plain line per event, so logs stay readable.

Ray pickles its callbacks into the experiment state and `Tuner.restore` brings back the
pickled ones, so the display (a terminal, a stream) cannot live in the callback: the driver
lends it for the length of `fit()` with `showing(...)`.
"""
from __future__ import annotations

import contextlib
import copy
import math
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Iterator

from ray import tune
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .callbacks import failure_reason
from .config import ExperimentConfig
from .consoles import make_console
from .interrupt import interrupted, record_before_tune
from .objective import OBJECTIVE, is_better
from .results import epoch_label, reported_results

REDRAW_S = 0.5  # the terminal panel's refresh; Tune steps far more often


@dataclass
class TrialLine:
    status: str = "pending"  # pending, running, paused, completed, stopped early, interrupted, errored
    epoch: int = -1  # the last reported epoch (0-based)
    objective: float = math.nan
    reason: str = ""  # why it errored


@dataclass
class Best:
    trial_id: str
    epoch: int
    objective: float
    weakest: str  # the searched pattern with the lowest valid f1_non0
    weakest_f1: float


@dataclass
class SearchProgress:
    """Everything the view shows, updated from Tune's events."""

    experiment: str
    objective: str  # search.objective, reported under OBJECTIVE
    mode: str  # max or min
    epochs: int  # train.epochs: a trial's full length
    num_samples: int
    time_budget_s: float | None
    objective_patterns: list[str]
    started: float = field(default_factory=time.time)
    trials: dict[str, TrialLine] = field(default_factory=dict)
    best: Best | None = None
    prior_s: float = 0.0  # time spent before a resume (set when Ray snapshots the experiment)
    ray_warnings: int = 0  # Ray's warnings and errors, sent to the log file (search/ray_output.py)
    log_path: str = ""
    added: bool = False  # trials added to a search (search/rounds.py): counts and best are theirs
    over: bool = False  # Tune returned, not interrupted: no time left, whatever trials a budget left unrun

    @classmethod
    def of(cls, experiment: str, cfg: ExperimentConfig) -> "SearchProgress":
        return cls(experiment, cfg.search.objective, cfg.search.mode, cfg.train.epochs, cfg.search.num_samples,
                   cfg.search.time_budget_s, list(cfg.search.objective_patterns or ()))

    # --- events ---
    def started_trial(self, trial_id: str) -> None:
        self.trials.setdefault(trial_id, TrialLine()).status = "running"

    def reported(self, trial_id: str, result: dict) -> bool:
        """Record one reported epoch; True when it is the best so far."""
        line = self.trials.setdefault(trial_id, TrialLine())
        line.status, line.epoch = "running", int(result["epoch"])
        line.objective = float(result.get(OBJECTIVE, math.nan))
        if not math.isfinite(line.objective) or (self.best and not is_better(line.objective, self.best.objective,
                                                                             self.mode)):
            return False
        valid = reported_results(result).get("valid", {})
        f1 = {p: m["f1_non0"] for p, m in valid.items() if p in self.objective_patterns and "f1_non0" in m}
        weakest = min(f1, key=f1.get) if f1 else ""
        self.best = Best(trial_id, line.epoch, line.objective, weakest, f1.get(weakest, math.nan))
        return True

    def ended(self, trial_id: str, *, error: str | None = None, last_epoch: int = -1) -> TrialLine:
        """`last_epoch`: the last epoch Tune holds for the trial, which this view may not have seen:
        a trial restored after a crash, whose last checkpoint was its last epoch, ends without
        reporting again."""
        line = self.trials.setdefault(trial_id, TrialLine())
        line.epoch = max(line.epoch, last_epoch)
        if error is not None:
            line.status, line.reason = "errored", error
        else:
            line.status = "completed" if line.epoch + 1 >= self.epochs else "stopped early"
        return line

    def interrupt(self) -> None:
        """Ctrl-C: the trials not ended yet are cut off, not ended (Tune reports them terminated)."""
        for line in self.trials.values():
            if line.status in ("pending", "running", "paused"):
                line.status = "interrupted"

    def sync_states(self, trials) -> None:
        """States from Tune's own list: pending and paused (no event announces them), and
        trials that a resumed search restores as ended without an event."""
        for t in trials:
            status = str(t.status).lower()
            line = self.trials.setdefault(t.trial_id, TrialLine())
            if line.status not in ("pending", "running", "paused"):
                continue  # ended here already
            if status in ("pending", "paused"):
                line.status = status
            elif status == "terminated":
                self.ended(t.trial_id, last_epoch=_last_epoch(t))
            elif status == "error":
                self.ended(t.trial_id, error=line.reason or "see the log")

    # --- derived ---
    def by_state(self) -> Counter:
        return Counter(line.status for line in self.trials.values())

    def elapsed_s(self, now: float | None = None) -> float:
        return (now or time.time()) - self.started

    def time_left_s(self, now: float | None = None) -> float | None:
        """At most this long, at the pace so far: epochs left of the trials not ended plus the
        trials not yet started, at the finished epochs' rate, capped by the time budget. An
        upper bound: the scheduler may stop trials early."""
        if self.over:
            return 0.0
        elapsed = self.elapsed_s(now)
        done = sum(line.epoch + 1 for line in self.trials.values())
        open_lines = [t for t in self.trials.values() if t.status in ("pending", "running", "paused")]
        left = (sum(self.epochs - (t.epoch + 1) for t in open_lines)
                + max(0, self.num_samples - len(self.trials)) * self.epochs)
        estimate = left * elapsed / done if done else None
        if self.time_budget_s is not None:
            budget_left = max(0.0, self.time_budget_s - elapsed)
            return budget_left if estimate is None else min(estimate, budget_left)
        return estimate

    # --- rendering ---
    def summary(self, now: float | None = None) -> str:
        states = self.by_state()
        counts = ", ".join(f"{n} {s}" for s in ("running", "pending", "paused", "completed", "stopped early",
                                                 "interrupted", "errored") if (n := states.get(s)))
        left = None if states.get("interrupted") else self.time_left_s(now)  # no pace to go on at
        timing = f"{_duration(self.elapsed_s(now))} elapsed" + (f", up to {_duration(left)} left"
                                                                 if left is not None else "")
        added = "added " if self.added else ""
        return f"{added}trials {len(self.trials)}/{self.num_samples}: {counts or 'none yet'} | {timing}"

    def best_line(self) -> str:
        best = "best of the added trials" if self.added else "best"
        if self.best is None:
            return f"{best} {self.objective}: none yet"
        b = self.best
        weakest = f", weakest pattern {b.weakest} f1_non0 {b.weakest_f1:.4f}" if b.weakest else ""
        return f"{best} {self.objective} {b.objective:.4f} (trial {b.trial_id} epoch {b.epoch}{weakest})"

    def event_line(self, trial_id: str, what: str) -> str:
        return f"trial {trial_id} {what} | {self.best_line()} | {self.summary()}"

    def panel(self, now: float | None = None) -> Group:
        """The terminal view: a header, the best so far, and one row per running trial."""
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("trial", "status", "epochs", self.objective):  # epochs done / train.epochs
            table.add_column(column, justify="left" if column in ("trial", "status") else "right")
        shown = [(k, t) for k, t in self.trials.items() if t.status in ("running", "paused")]
        for trial_id, t in shown:
            table.add_row(trial_id, t.status, f"{t.epoch + 1}/{self.epochs}" if t.epoch >= 0 else "-",
                          f"{t.objective:.4f}" if math.isfinite(t.objective) else "-")
        parts = [Text(f"msa-search tune {self.experiment}", style="bold"), Text(self.summary(now)),
                 Text(self.best_line())]
        if shown:
            parts.append(table)
        errored = [(k, t) for k, t in self.trials.items() if t.status == "errored"]
        parts += [Text(f"trial {k} errored: {t.reason or 'see the log'}", style="red") for k, t in errored[-3:]]
        if self.ray_warnings:
            parts.append(Text(f"Ray: {self.ray_warnings} warnings/errors in {self.log_path}", style="dim"))
        return Group(*parts)


def restart_note(trial, trials) -> str:
    """What a trial that had reported starts again from: another trial's checkpoint (PBT's exploit,
    which also gave it that trial's values, mutated) or its own (a retry after a failure, or a
    resumed search)."""
    checkpoint = str(getattr(getattr(trial, "checkpoint", None), "path", "") or "")
    source = next((t.trial_id for t in trials if t is not trial and getattr(t, "path", None)
                   and checkpoint.startswith(str(t.path).rstrip("/") + "/")), None)
    if source is not None:
        return f"restarted from trial {source}'s weights with its values mutated (PBT)"
    return "restarted from its last checkpoint" if checkpoint else "restarted"


def _last_epoch(trial) -> int:
    return int((getattr(trial, "last_result", None) or {}).get("epoch", -1))


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Display:
    """Where the view goes for one `fit()`: a live panel on a terminal, plain lines elsewhere."""

    def __init__(self, stream: IO[str]):
        self.console = make_console(file=stream, highlight=False)
        self.live: Live | None = None
        self._lock = threading.Lock()

    @property
    def interactive(self) -> bool:
        return self.console.is_terminal

    def start(self) -> None:
        if self.interactive and self.live is None:
            # Ray's prints are redirected by search/ray_output.py, not by rich.
            self.live = Live(console=self.console, auto_refresh=False, redirect_stdout=False,
                             redirect_stderr=False, transient=False)
            self.live.start()

    def show(self, progress: SearchProgress) -> None:
        if self.live is not None:
            with self._lock:
                self.live.update(progress.panel(), refresh=True)

    def line(self, text: str, style: str | None = None) -> None:
        """An event line: above the panel on a terminal, plain elsewhere."""
        with self._lock:
            self.console.print(text, style=style, soft_wrap=True)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


_DISPLAY: Display | None = None  # lent by `showing()` for the length of `fit()`
_COUNTER: Counter | None = None  # Ray's warnings by level, from search/ray_output.py


@contextlib.contextmanager
def showing(stream: IO[str] | None = None, warnings: Counter | None = None) -> Iterator[Display]:
    """Lend a display (stderr by default) to every ConsoleView for the duration of the block."""
    global _DISPLAY, _COUNTER
    display = Display(stream or sys.stderr)
    _DISPLAY, _COUNTER = display, warnings
    try:
        yield display
    finally:
        display.stop()
        _DISPLAY = _COUNTER = None


class ConsoleView(tune.Callback):
    """Feeds `SearchProgress` from Tune's events in the driver and shows it on the lent display."""

    def __init__(self, experiment: str, cfg: ExperimentConfig, log_path: str = "", added: bool = False):
        self.progress = SearchProgress.of(experiment, cfg)
        self.progress.log_path, self.progress.added = log_path, added
        self._drawn = 0.0

    # Tune saves a callback's get_state() with each experiment snapshot and hands it back to
    # set_state() on `--resume` (before setup): the trials, the best so far and the time spent
    # travel with it, so a resumed search's view goes on from them (its elapsed time and
    # estimate count only time spent searching). Pickling alone is not enough: Ray pickles the
    # callbacks once, with the Tuner, before any trial has run.
    def get_state(self) -> dict:
        self.progress.prior_s = self.progress.elapsed_s()
        return {"progress": copy.deepcopy(self.progress)}

    def set_state(self, state: dict) -> None:
        self.progress = state["progress"]

    def __getstate__(self) -> dict:
        self.progress.prior_s = self.progress.elapsed_s()
        return {"progress": self.progress, "_drawn": 0.0}

    def setup(self, **info) -> None:
        self.progress.started = time.time() - self.progress.prior_s
        self.progress.over = False
        record_before_tune()  # every search has this view: it is where Ctrl-C gets noticed
        if _DISPLAY is not None:
            _DISPLAY.start()
            self._draw(force=True)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        before = self.progress.trials.get(trial.trial_id)
        self.progress.started_trial(trial.trial_id)
        self._event(trial.trial_id, "started" if before is None or before.epoch < 0 else restart_note(trial, trials))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "epoch" not in result:
            return
        best = self.progress.reported(trial.trial_id, result)
        objective = self.progress.trials[trial.trial_id].objective
        self._event(trial.trial_id, f"{epoch_label(int(result['epoch']), self.progress.epochs)} "
                                    f"{self.progress.objective} {objective:.4f}" + (" (new best)" if best else ""))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        line = self.progress.ended(trial.trial_id, last_epoch=_last_epoch(trial))
        done = line.epoch + 1
        self._event(trial.trial_id, line.status + (f" after {done} epoch{'s' if done > 1 else ''}" if done else ""))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.progress.ended(trial.trial_id, error=failure_reason(trial))
        self._event(trial.trial_id, f"errored: {self.progress.trials[trial.trial_id].reason or 'see the log'}",
                    style="red")

    def on_step_end(self, iteration, trials, **info) -> None:
        self.progress.sync_states(trials)
        self._draw()

    def on_experiment_end(self, trials, **info) -> None:
        if interrupted():
            self.progress.interrupt()
        else:
            self.progress.over = True
        self.progress.sync_states(trials)
        self._draw(force=True)
        if _DISPLAY is not None and not _DISPLAY.interactive:
            ended = "search interrupted" if interrupted() else "search ended"
            _DISPLAY.line(f"{ended} | {self.progress.best_line()} | {self.progress.summary()}")

    def _event(self, trial_id: str, what: str, style: str | None = None) -> None:
        if _DISPLAY is None:
            return
        if _DISPLAY.interactive:
            # The panel holds the state; lines above it keep the story (starts, ends, errors).
            if not what.startswith("epoch"):
                _DISPLAY.line(f"trial {trial_id} {what}", style=style)
            self._draw(force=True)
        else:
            _DISPLAY.line(self.progress.event_line(trial_id, what))

    def _draw(self, force: bool = False) -> None:
        if _DISPLAY is None or not _DISPLAY.interactive:
            return
        now = time.time()
        if force or now - self._drawn >= REDRAW_S:
            if _COUNTER is not None:
                self.progress.ray_warnings = sum(_COUNTER.values())
            _DISPLAY.show(self.progress)
            self._drawn = now
