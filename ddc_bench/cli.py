"""``ddc-bench``: the command line, a Hydra app around :func:`ddc_bench.train.run`.

Examples::

    ddc-bench task=grok_modadd optimizer=muon hardware=cpu task.size=tiny steps=200 seed=1
    ddc-bench --multirun optimizer=adamw,adamp,muon,scale seed=0,1,2 results_dir=results/cmp
    ddc-bench --multirun experiment=quickstart optimizer=adamw,ddc seed=0,1
    ddc-bench --cfg job task=gpt_lm          # print the composed config, run nothing

Errors the user can fix (a wrong type, a finished run in the way, missing data, a missing
package) are printed as one line, without a traceback, and the command exits with status 1
(set ``HYDRA_FULL_ERROR=1`` to get the traceback). Hydra's own errors (an unknown
``task=``/``optimizer=``/``hardware=`` option, an unknown key) are Hydra's messages, which
list the choices. In a local ``--multirun``, a failing or diverging run does not stop the
sweep: every run is attempted and the exit status is 1 if any failed.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ddc_bench.config import CONFIG_DIR, ConfigError, validate
from ddc_bench.loggers import LoggerError
from ddc_bench.results import RunExistsError

#: Errors reported as one line: their messages say what to change.
USER_ERRORS = (ConfigError, RunExistsError, FileNotFoundError, LoggerError, ImportError)


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
    from ddc_bench.train import run  # lazy: keeps `ddc-bench --help` fast

    hydra_cfg = HydraConfig.get()
    try:
        validate(cfg, hydra_cfg.runtime.choices)
        summary = run(cfg, overrides=list(hydra_cfg.overrides.task))
    except USER_ERRORS as err:
        if not _Session.local or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = f"ddc-bench: error: {err}"
        print(message, file=sys.stderr, flush=True)
        _Session.failures.append(message)
        _Session.statuses.append("failed")
        return None
    _Session.statuses.append(summary["status"])
    return summary


# Hydra's decorator; the config path is absolute so the command works from any directory.
_hydra_app = hydra.main(version_base="1.3", config_path=str(CONFIG_DIR),
                        config_name="config")(_task_function)


def main() -> None:
    """Entry point of the ``ddc-bench`` console script."""
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
