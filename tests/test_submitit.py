"""``sweep=submitit_local``: a real multirun through submitit's local executor (each run a
separate process with submitit's job files and logs, as on Slurm but without the
scheduler), including a job that fails, whose traceback the sweep's output leads to."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import ddc_bench

from ddc_bench import results

import hydra_plugins.hydra_submitit_launcher  # noqa: F401  (the `cluster` extra, which `make test` installs)


@pytest.mark.slow
def test_submitit_local_multirun_with_a_failing_job(tmp_path):
    proc = ddc_bench("--multirun", "sweep=submitit_local", "task=grok_modadd", "task.size=tiny",
                     "hardware=cpu", "progress=false", "steps=2", "task.data.op=add,pow",
                     "results_dir=res", cwd=tmp_path, timeout=600)
    assert proc.returncode == 1
    assert "Submitit 'local' sweep output dir" in proc.stdout + proc.stderr
    # The good job trained, in its own process, into the shared results folder.
    (run,) = results.iter_finished_runs(tmp_path / "res")
    summary = json.loads((run / results.SUMMARY_FILE).read_text())
    assert summary["status"] == "finished" and summary["variant_keys"]["task.data.op"] == "add"
    # The failed job: the sweep's last line names the error and the job's log ...
    last = proc.stderr.strip().splitlines()[-1]
    assert "task.data.op must be one of" in last and "traceback in the job's log" in last
    log = Path(re.search(r"traceback in the job's log: (\S+?)\)$", last).group(1))
    # ... which holds the traceback.
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "task.data.op must be one of" in text
    assert log.is_relative_to(tmp_path / "res" / ".hydra" / "multirun")
