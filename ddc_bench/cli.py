"""``ddc-bench``: the command line, a Hydra app around :func:`ddc_bench.train.run`.

Examples::

    ddc-bench task=grok_modadd optimizer=muon hardware=cpu task.size=tiny steps=200 seed=1
    ddc-bench --multirun optimizer=adamw,adamp,muon,scale seed=0,1,2 results_dir=results/cmp
    ddc-bench --multirun experiment=quickstart optimizer=adamw,ddc seed=0,1
    ddc-bench --cfg job task=gpt_lm          # print the composed config, run nothing

Errors the user can fix (a wrong type, a finished run of another config in the way, a
run folder in use, missing data, a missing package) are printed as one line, without a
traceback, and the command exits with status 1 (set ``HYDRA_FULL_ERROR=1`` to get the
traceback). Hydra's own errors (an unknown ``task=``/``optimizer=``/``hardware=`` option,
an unknown key) are Hydra's messages, which list the choices.

A run whose folder already holds it, finished with the same config, is skipped with one
line; an interrupted run with a checkpoint is resumed (``resume=auto``). So launching a
sweep again finishes what is missing and exits 0 when every run is then finished. In a
local ``--multirun``, a failing or diverging run does not stop the sweep: every run is
attempted and the exit status is 1 if any failed. SIGTERM or SIGINT stops the command
after a checkpoint, with exit status 75 (:data:`ddc_bench.train.EXIT_PREEMPTED`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import traceback
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddc_bench.checkpoint import CheckpointError
from ddc_bench.config import CONFIG_DIR, ConfigError, validate
from ddc_bench.distributed import DistributedError
from ddc_bench.loggers import LoggerError
from ddc_bench.results import (MetricsFileError, ResultsDirError, RunExistsError, RunLockedError,
                               check_results_dir)
from ddc_bench.signals import stop_outside_steps

#: Errors reported as one line: their messages say what to change.
USER_ERRORS = (ConfigError, RunExistsError, RunLockedError, ResultsDirError, CheckpointError,
               MetricsFileError, DistributedError, FileNotFoundError, LoggerError, ImportError)
#: The sweep configs that need hydra-submitit-launcher (the ``cluster`` extra).
SUBMITIT_SWEEPS = ("slurm", "submitit_local")


class _Session:
    """What the ``ddc-bench`` process saw across its runs (one, or several with --multirun).

    ``local`` is set by :func:`main`; it stays False in a process that only runs the task
    function (a cluster job started by a launcher plugin), where errors must propagate so
    the launcher marks the job failed.
    """

    local = False
    failures: list[str] = []
    statuses: list[str] = []


def _task_function(cfg: DictConfig) -> dict[str, Any] | None:
    """Validate the composed config, then train one run (one Hydra job)."""
    from ddc_bench.train import EXIT_PREEMPTED, AlreadyFinished, Preempted, run  # lazy: fast --help

    hydra_cfg = HydraConfig.get()
    try:
        validate(cfg, hydra_cfg.runtime.choices)
        summary = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except AlreadyFinished as done:  # nothing to do: not a failure
        print(f"[ddc-bench] {done}", flush=True)
        _Session.statuses.append("skipped")
        return None
    except Preempted as stopped:
        print(f"[ddc-bench] {stopped}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)  # also ends a local sweep: the signal was meant for it all
    except KeyboardInterrupt:  # Ctrl-C outside the steps (set-up): no training to save
        print("[ddc-bench] interrupted outside the training steps (nothing new to save)",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except USER_ERRORS as err:
        if not _Session.local or os.environ.get("HYDRA_FULL_ERROR") == "1":
            _raise_job_failure(err)
        message = f"ddc-bench: error: {err}"
        print(message, file=sys.stderr, flush=True)
        _Session.failures.append(message)
        _Session.statuses.append("failed")
        return None
    except Exception as err:  # a bug: the traceback is the useful report
        _raise_job_failure(err)
    # Under DDP only rank 0 has the summary; the other ranks trained the same run.
    _Session.statuses.append(summary["status"] if summary is not None else "finished")
    return summary


class JobFailed(RuntimeError):
    """A run launched as a separate job (cluster launchers) failed; the message names the
    job's log, which holds the traceback."""


def _raise_job_failure(err: BaseException) -> None:
    """Re-raise ``err``; in a submitit job, first print its traceback to the job's log and
    raise :class:`JobFailed` naming that log, so the sweep's output leads to it."""
    if _Session.local:
        raise err
    traceback.print_exc()  # into the job's stderr log
    try:
        import submitit

        log = submitit.JobEnvironment().paths.stderr
    except Exception:  # noqa: BLE001 - not a submitit job (another launcher plugin)
        raise err from None
    raise JobFailed(f"{type(err).__name__}: {err} (traceback in the job's log: {log})") from err


# Hydra's decorator; the config path is absolute so the command works from any directory.
_hydra_app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR),
                        config_name="config")(_task_function)


def _argument_error(argv: list[str]) -> str | None:
    """One-line errors for command lines Hydra would answer with a traceback."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    if multirun and any(a in ("-c", "--cfg") or a.startswith("--cfg=") for a in argv):
        return ("--cfg prints the config of one run and cannot be combined with --multirun; "
                "drop --multirun and give one value per key")
    # Hydra makes its folder under results_dir before any run starts: check it first.
    for arg in argv:
        if arg.startswith("results_dir="):
            for value in arg.split("=", 1)[1].split(","):
                try:
                    check_results_dir(value)
                except ResultsDirError as err:
                    return str(err)
    sweeps = [a.split("=", 1)[1] for a in argv if a.startswith("sweep=")]
    for sweep in sweeps:
        if sweep not in SUBMITIT_SWEEPS:
            continue
        if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None:
            return (f"sweep={sweep} needs hydra-submitit-launcher: "
                    f"pip install 'ddc-bench[cluster]'")
        if not multirun:
            return f"sweep={sweep} launches a --multirun: add --multirun"
        if sweep == "slurm" and shutil.which("sbatch") is None:
            return ("sweep=slurm needs Slurm, but there is no sbatch command here; run on a "
                    "Slurm login node, or try the sweep locally with sweep=submitit_local")
    return None


def main() -> None:
    """Entry point of the ``ddc-bench`` console script."""
    stop_outside_steps()  # SIGTERM before or between training steps: one line, exit 75
    problem = _argument_error(sys.argv[1:])
    if problem is not None:
        print(f"ddc-bench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    _Session.local = True
    _Session.failures.clear()
    _Session.statuses.clear()
    _hydra_app()
    if len(_Session.statuses) > 1:  # a --multirun: one line over all its runs
        counts = {s: _Session.statuses.count(s) for s in dict.fromkeys(_Session.statuses)}
        print("[ddc-bench] sweep done: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if _Session.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
