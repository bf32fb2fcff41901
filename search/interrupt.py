"""Ctrl-C during a search. Ray Tune takes the first SIGINT itself: it stops the trials, saves its
state and returns from `Tuner.fit` as if the search were done, its trials ended like any other.
So the caller has to be told: a handler chained before Tune's records the interrupt, and the
view and the command line then say "interrupted" and how to go on, not "search ended"."""
from __future__ import annotations

import signal
import threading

_interrupted = threading.Event()
# Tune stops a run on these (ray/tune/tune.py: _setup_signal_catching).
SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGUSR1", None)) if s is not None)


def reset() -> None:
    """A new search in this process starts uninterrupted."""
    _interrupted.clear()


def interrupted() -> bool:
    return _interrupted.is_set()


def record_before_tune() -> None:
    """Chain a recorder before the handlers Tune installed for its run. Called inside
    `Tuner.fit` (a callback's setup runs there, in the driver's main thread, after Tune put in
    its handlers). Tune's handler puts back the one from before the search, so a second Ctrl-C
    still stops the driver at once."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; Tune then sets none either
    for sig in SIGNALS:
        tune_handler = signal.getsignal(sig)
        if not callable(tune_handler) or getattr(tune_handler, "records_interrupt", False):
            continue

        def record(signum, frame, tune_handler=tune_handler):
            _interrupted.set()
            tune_handler(signum, frame)

        record.records_interrupt = True
        signal.signal(sig, record)
