"""Stopping a stage on request: SIGTERM (what Slurm, Kubernetes and preemptible clouds send before
they kill a job) and Ctrl-C.

A stage that can stop cleanly (training: save a checkpoint at the end of the step, then stop)
says so by running inside `accepting()`; a request then only sets `requested()`, and the stage
has `grace` seconds to stop before it is interrupted outright. A stage that cannot is
interrupted at once, and so is any stage at a second request. Either way the runner marks the
stage `interrupted` and a rerun resumes from what was saved.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_accepting = 0
_requested: str | None = None


def requested() -> str | None:
    """The signal that asked the running stage to stop ("SIGTERM"), or None."""
    return _requested


@contextmanager
def accepting() -> Iterator[None]:
    """The code inside stops cleanly when `requested()` says so: a request waits for it."""
    global _accepting
    _accepting += 1
    try:
        yield
    finally:
        _accepting -= 1


@contextmanager
def handling(grace_s: float) -> Iterator[None]:
    """SIGTERM and SIGINT while a stage runs (the runner installs this around each stage). Off
    the main thread, where Python cannot take signals, it does nothing."""
    global _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame) -> None:
        raise KeyboardInterrupt(f"{_requested}: not stopped within the {grace_s:g} s grace period")

    def on_signal(signum, frame) -> None:
        global _requested
        name = signal.Signals(signum).name
        if _requested is not None or not _accepting:
            raise KeyboardInterrupt(name)
        _requested = name
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(max(1, round(grace_s)))

    _requested = None
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    previous_alarm = signal.getsignal(signal.SIGALRM)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_alarm)
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None
