"""Stopping on a signal (preemption).

SIGTERM (a scheduler's preemption or time limit, `kill`), and under SLURM with auto-requeue its requeue signal
(SIGUSR1 by default, `sbatch --signal=USR1@90`), ask the run to stop at the next RL step boundary: the RL step in
progress (and its validation, when due) finishes, last.ckpt is written for it, and the process exits with status
128 + the signal number after printing how to continue (simko.checkpointing.GracefulStop, simko.train). A second
such signal ends the process at once (the default action), as SIGKILL would.

Lightning's own SIGTERM handling is not used: it raises at the end of a training batch and also inside a
validation, which it then abandons half-way (so that step's val metrics would be missing from a resumed run), and
its SLURM handler saves a checkpoint inside the signal handler, mid-step. Lightning installs its handlers when a
fit or validate starts; GracefulStop puts this one back as soon as the loop starts.

This module holds the process's stop state; :mod:`simko.train` installs the handler (``stopping_on_signals``) and
:class:`simko.checkpointing.GracefulStop` reads it at each RL step boundary.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

_STOP: dict[str, Any] = {"signal": None, "signals": (), "previous": {}}


def stop_signal() -> int | None:
    """The stop signal this process received (None: none)."""
    return _STOP["signal"]


def _on_stop_signal(signum: int, frame: Any) -> None:
    if _STOP["signal"] is not None:  # the second one: stop now
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _STOP["signal"] = signum
    message = (
        f"simko: received {signal.Signals(signum).name}: stopping after the RL step in progress, once its checkpoint "
        "is written (the same signal again stops at once)\n"
    )
    os.write(2, message.encode())  # not print(): a handler may run while the main thread writes to sys.stderr


@contextmanager
def stopping_on_signals(signals: Iterable[int]) -> Iterator[None]:
    """While inside: ``signals`` request a stop at the next RL step boundary instead of ending the process."""
    signals = tuple(signals) if threading.current_thread() is threading.main_thread() else ()  # else: can't
    _STOP.update(signal=None, signals=signals, previous={s: signal.getsignal(s) for s in signals})
    for signum in signals:
        signal.signal(signum, _on_stop_signal)
    try:
        yield
    finally:
        for signum, handler in _STOP["previous"].items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _STOP.update(signals=(), previous={})


def reclaim_stop_signals() -> None:
    """Put the stop handler back where something else (Lightning, at the start of fit/validate) replaced it."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in _STOP["signals"]:
        if signal.getsignal(signum) is not _on_stop_signal:
            signal.signal(signum, _on_stop_signal)
