"""Bad input, tried as a new user would: one line naming what is wrong, exit status != 0,
no traceback, and nothing left behind. Each case is a real ``ddc-bench`` process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import ddc_bench

TINY = ["task=grok_modadd", "task.size=tiny", "hardware=cpu", "progress=false", "steps=2"]


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def _fails_with_one_line(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                         code: int | None = None) -> str:
    proc = ddc_bench(*args, cwd=tmp_path, env=env)
    assert proc.returncode != 0 and (code is None or proc.returncode == code), proc.stdout
    line = _one_line(proc.stderr)
    assert line.startswith("ddc-bench: error: "), line
    return line


CASES = {
    "negative seed": (["seed=-1"], "invalid value for 'seed': -1 (expected an int in [0, 4294967295])"),
    "seed above 2**32-1": (["seed=4294967296"], "'seed': 4294967296"),
    "no blocks": (["task.model.depth=0"], "invalid value for 'task.model.depth': 0 (expected a positive int)"),
    "no width": (["task.model.width=-4"], "'task.model.width': -4 (expected a positive int)"),
    "zero lr_mult": (["lr_mult=0"], "invalid value for 'lr_mult': 0 (expected a positive number)"),
    "text lr_mult": (["lr_mult=abc"], "invalid value for 'lr_mult': 'abc' (expected float)"),
    "run_name leaves results_dir": (["run_name=../../x"], "invalid run_name '../../x'"),
    "unwritable results_dir": (["results_dir=/proc/ddc-bench-results"], "is not writable"),
    "heads not dividing the width": (["task.model.heads=3", "task.model.width=32"],
                                     "invalid value for 'task.model.heads': 3 (expected a divisor "
                                     "of task.model.width=32)"),
    "dropout above 1": (["task.model.dropout=1.5"],
                        "invalid value for 'task.model.dropout': 1.5 (expected a probability in [0, 1))"),
    "grad_clip nan": (["grad_clip=nan"], "invalid value for 'grad_clip': nan"),
    "eps zero": (["optimizer.eps=0"], "invalid value for 'optimizer.eps': 0"),
    "run_name too long": ([f"run_name={'a' * 300}"], "is 300 bytes; folder names may have at most 255"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_bad_value_is_one_line(case, tmp_path):
    args, message = CASES[case]
    line = _fails_with_one_line(tmp_path, *TINY, "results_dir=res", *args)
    assert message in line
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").rglob("seed*"))


@pytest.mark.slow
def test_results_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("mine")
    line = _fails_with_one_line(tmp_path, *TINY, "results_dir=taken")
    assert "results_dir=taken is a file" in line
    assert (tmp_path / "taken").read_text() == "mine"


@pytest.mark.slow
def test_bad_value_in_a_multirun_is_one_line_per_run_and_the_sweep_goes_on(tmp_path):
    proc = ddc_bench("--multirun", *TINY, "task.model.heads=2,3", "task.model.width=32",
                     "results_dir=res", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = _one_line(proc.stderr)
    assert "invalid value for 'task.model.heads': 3" in line
    assert "sweep done: 1 finished, 1 failed" in proc.stdout


@pytest.mark.slow
def test_local_text_source_given_a_binary_file_is_one_line(tmp_path):
    (tmp_path / "weights.bin").write_bytes(bytes(range(256)) * 64)
    line = _fails_with_one_line(tmp_path, "task=gpt_lm", "task.size=tiny", "hardware=cpu",
                                "task.data.source=local", "task.data.files=[weights.bin]",
                                f"task.data.cache_dir={tmp_path / 'cache'}", "results_dir=res")
    assert "weights.bin is not UTF-8 text" in line and "UTF-8 text files" in line


@pytest.mark.slow
def test_download_without_network_is_one_line_and_leaves_no_folder(tmp_path, offline_env):
    line = _fails_with_one_line(tmp_path, "task=vit_cifar", "task.size=tiny", "hardware=cpu",
                                "task.data.download=true", "task.data.root=data/cifar",
                                "results_dir=res", env=offline_env)
    assert "could not fetch the data" in line
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_hub_without_network_is_one_line(tmp_path, offline_env):
    line = _fails_with_one_line(tmp_path, "task=gpt_lm", "task.size=tiny", "hardware=cpu",
                                "task.data.source=hub", "task.data.name=roneneldan/TinyStories",
                                f"task.data.cache_dir={tmp_path / 'hf'}", "results_dir=res",
                                env={**offline_env, "HF_HOME": str(tmp_path / "hf_home")})
    assert "task=gpt_lm" in line
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_wandb_online_without_credentials_and_terminal_fails_fast(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_MODE="online")
    proc = ddc_bench(*TINY, "logger=wandb", "results_dir=res", cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 1
    assert "no W&B credentials" in _one_line(proc.stderr)
    assert not any((tmp_path / "res").rglob("seed*"))  # failed before any run folder


@pytest.mark.slow
def test_multirun_with_cfg_is_one_line(tmp_path):
    line = _fails_with_one_line(tmp_path, "--multirun", "--cfg", "job", "seed=0,1", code=2)
    assert "--cfg" in line and "--multirun" in line


@pytest.mark.slow
def test_slurm_sweep_without_slurm_is_one_line(tmp_path):
    if os.environ.get("PATH") and any((Path(p) / "sbatch").exists()
                                      for p in os.environ["PATH"].split(os.pathsep)):
        pytest.skip("Slurm is installed here")
    line = _fails_with_one_line(tmp_path, "--multirun", "sweep=slurm", *TINY, "seed=0,1", code=2)
    assert "sweep=slurm needs Slurm" in line and "sweep=submitit_local" in line


@pytest.mark.slow
def test_zero_learning_rate_warns_and_trains(tmp_path):
    proc = ddc_bench(*TINY, "optimizer.lr=0", "results_dir=res", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the learning rate is 0" in _one_line(proc.stderr)
