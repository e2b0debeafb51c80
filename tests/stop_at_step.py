"""``python tests/stop_at_step.py STEP ARGS...``: the ``ddc-bench`` command, sending itself a
real SIGTERM at training step STEP (through a step hook, so the step needs a log or
evaluation record: use ``log_every=1``). ``STEP=setup`` sends it while the run folder is
locked, before the first step. For the tests of pre-emption in real processes."""

from __future__ import annotations

import functools
import os
import signal
import sys

from ddc_bench import cli, train


def main() -> None:
    at, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    if at == "setup":
        open_folder = train._open_run_folder

        def open_then_stop(plan):  # the lock is held: a stale one would be left behind
            mode = open_folder(plan)
            os.kill(os.getpid(), signal.SIGTERM)
            return mode

        train._open_run_folder = open_then_stop
    else:
        def stop(state, step, record):
            if step == int(at) and "loss" in record:
                os.kill(os.getpid(), signal.SIGTERM)

        train.run = functools.partial(train.run, hooks=[stop])
    cli.main()


if __name__ == "__main__":
    main()
