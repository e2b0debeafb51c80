"""SIGTERM and SIGINT (what Slurm and Ctrl-C send): stop at a step boundary, with a checkpoint.

While a run trains, :class:`StopSignals` records the first signal; the training loop
checks it at every step boundary, writes a checkpoint, and raises :class:`Preempted`,
which the command turns into one line and exit status :data:`EXIT_PREEMPTED`. Outside the
training steps (start-up, set-up, the summary) there is nothing new to save:
:func:`stop_outside_steps` makes SIGTERM end the command at once with the same line and
status, letting ``finally`` blocks release the run folder's lock on the way out.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, NoReturn

#: Exit status of a run stopped by SIGTERM/SIGINT (``EX_TEMPFAIL``: "try again later",
#: which is what resuming does).
EXIT_PREEMPTED = 75


class Preempted(Exception):
    """The run was stopped by a signal after writing a checkpoint (one-line message)."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _exit_outside_steps(signum: int, frame: Any) -> NoReturn:
    name = signal.Signals(signum).name
    print(f"[ddc-bench] stopped by {name} outside the training steps (nothing new to save); "
          f"run the same command again to resume or start", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_PREEMPTED)  # unwinds: locks are released by their finally blocks


def stop_outside_steps() -> None:
    """Make SIGTERM end this process with one line and :data:`EXIT_PREEMPTED` (instead of
    the default: killed silently with status 143). :class:`StopSignals` takes over while a
    run trains. SIGINT stays Python's ``KeyboardInterrupt``, which the command reports."""
    if _in_main_thread():
        signal.signal(signal.SIGTERM, _exit_outside_steps)


class StopSignals:
    """Catches SIGTERM and SIGINT while a run trains: the first one is recorded in
    :attr:`received` (the loop stops at the next step boundary, with a checkpoint); a
    second one stops the process at once (exit status :data:`EXIT_PREEMPTED`). Handlers can
    only be installed in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"[ddc-bench] second {name}: stopping now, without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_PREEMPTED)
        self.received = name

    def __enter__(self) -> "StopSignals":
        if _in_main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
