"""Checkpoints, exact resume and pre-emption.

* in-process: N steps in one go against N/2 + SIGTERM (a real signal, sent by the run to
  itself from a step hook, ``conftest.sigterm_at``) + resume + N/2, for every
  optimizer on ``gpt_lm`` tiny: identical ``metrics.jsonl`` values (timings aside) and
  bitwise identical parameters and optimizer state; and with AdamW on every task;
* the same through the ``ddc-bench`` command in real subprocesses for adamw, ddc, muon
  (slow), and Ctrl-C (SIGINT) sent from outside at an arbitrary moment;
* every task's data stream restarts exactly at any batch, and DDP shards partition it;
* a missing, truncated or corrupt checkpoint, and one of another config, give one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from cifar_fixture import write_fake_cifar
from conftest import (DDC_BENCH_SCRIPT, PYTHON, REPO_ROOT, base_config, compose, config_names,
                      ddc_bench, sigterm_at)

from ddc_bench import checkpoint, results, train
from ddc_bench.config import validate

#: Values that measure time, not computation: they differ between any two runs.
TIMINGS = ("train_time_s", "units_per_s")
STEPS, STOP_AT = 12, 5
GPT = ["task=gpt_lm", "task.size=tiny", "hardware=cpu", "hardware.threads=1", "progress=false",
       f"steps={STEPS}", "log_every=1", "eval_every=4", "checkpoint_every=0"]


def _values(folder: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in results.read_metrics(folder)]


def _same(a: object, b: object) -> bool:
    """Bitwise equality of optimizer-state values: tensors, numbers, and lists / tuples /
    dicts of them (SOAP and Kron keep lists of preconditioner factors)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _assert_same_state(a: Path, b: Path) -> None:
    """Bitwise equal parameters, buffers and optimizer state in two final checkpoints."""
    pa, _ = checkpoint.load(a)
    pb, _ = checkpoint.load(b)
    assert pa["step"] == pb["step"] == STEPS
    for key in pa["model"]:
        assert torch.equal(pa["model"][key], pb["model"][key]), key
    sa, sb = pa["optimizer"]["state"], pb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key, value in sa[i].items():
            assert _same(value, sb[i][key]), (i, key)
    for key in set(pa["optimizer"]) - {"state", "param_groups"}:  # e.g. DDC's log-scale frame
        va, vb = pa["optimizer"][key], pb["optimizer"][key]
        assert all(torch.equal(x, y) for x, y in zip(va, vb)) if isinstance(va, list) else va == vb


def _run_in_process(overrides: list[str], monkeypatch: pytest.MonkeyPatch, signal_at: int = 0):
    cfg, choices = compose(overrides)
    validate(cfg, choices)
    return train.run(cfg, overrides=overrides, hooks=[sigterm_at(signal_at)] if signal_at else ())


@pytest.mark.parametrize("optimizer", [o for o in config_names("optimizer") if o != "zoo"])  # zoo: a template
def test_sigterm_and_resume_is_bitwise_exact(optimizer, tmp_path, monkeypatch):
    common = [*GPT, f"optimizer={optimizer}"]
    whole = _run_in_process([*common, f"results_dir={tmp_path / 'a'}"], monkeypatch)
    split = [*common, f"results_dir={tmp_path / 'b'}"]
    with pytest.raises(train.Preempted, match=f"stopped by SIGTERM at step {STOP_AT}/{STEPS}"):
        _run_in_process(split, monkeypatch, signal_at=STOP_AT)
    folder_a = results.run_dir(tmp_path / "a", "gpt_lm", "tiny", optimizer, whole["variant"], 0)
    folder_b = results.run_dir(tmp_path / "b", "gpt_lm", "tiny", optimizer, whole["variant"], 0)
    assert not results.is_finished(folder_b)
    assert checkpoint.load(folder_b)[0]["step"] == STOP_AT
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    resumed = _run_in_process(split, monkeypatch)
    assert resumed["resumed_from"] == [STOP_AT] and resumed["steps_done"] == STEPS
    assert _values(folder_a) == _values(folder_b)
    assert whole["final"] == resumed["final"] and whole["best"] == resumed["best"]
    _assert_same_state(folder_a, folder_b)


@pytest.mark.parametrize("task_name", config_names("task"))
def test_sigterm_and_resume_is_bitwise_exact_on_every_task(task_name, tmp_path, monkeypatch,
                                                           cifar_root):
    """The same check with AdamW on each task (BatchNorm buffers, CIFAR augmentation and
    epoch boundaries included: 40 fake images are 2 batches an epoch)."""
    common = [f"task={task_name}", "task.size=tiny", "hardware=cpu", "hardware.threads=1",
              "progress=false", f"steps={STEPS}", "log_every=1", "eval_every=4",
              "checkpoint_every=0", "optimizer=adamw"]
    if task_name in ("vit_cifar", "resnet_cifar"):
        common.append(f"task.data.root={cifar_root}")
    whole = _run_in_process([*common, f"results_dir={tmp_path / 'a'}"], monkeypatch)
    split = [*common, f"results_dir={tmp_path / 'b'}"]
    with pytest.raises(train.Preempted):
        _run_in_process(split, monkeypatch, signal_at=STOP_AT)
    resumed = _run_in_process(split, monkeypatch)
    assert resumed["resumed_from"] == [STOP_AT]
    folders = [results.run_dir(tmp_path / x, task_name, "tiny", "adamw", whole["variant"], 0)
               for x in ("a", "b")]
    assert _values(folders[0]) == _values(folders[1])
    _assert_same_state(*folders)


# --------------------------------------------------------------------------------------
# Through the command, in real processes
# --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "ddc", "muon"])
def test_command_sigterm_exit_and_resume_is_bitwise_exact(optimizer, tmp_path):
    args = [*GPT, f"optimizer={optimizer}"]
    whole = ddc_bench(*args, "results_dir=a", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    stopped = _stop_at_step(str(STOP_AT), [*args, "results_dir=b"], tmp_path)
    assert stopped.returncode == train.EXIT_PREEMPTED, stopped.stderr
    assert "Traceback" not in stopped.stderr
    line = [ln for ln in stopped.stderr.splitlines() if ln.strip()]
    assert len(line) == 1 and "stopped by SIGTERM at step 5/12" in line[0]
    assert "run the same command again to resume" in line[0]
    resumed = ddc_bench(*args, "results_dir=b", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    variant = json.loads(next((tmp_path / "a").rglob("summary.json")).read_text())["variant"]
    folder_a = results.run_dir(tmp_path / "a", "gpt_lm", "tiny", optimizer, variant, 0)
    folder_b = results.run_dir(tmp_path / "b", "gpt_lm", "tiny", optimizer, variant, 0)
    assert _values(folder_a) == _values(folder_b)
    _assert_same_state(folder_a, folder_b)


def _stop_at_step(at: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The command sending itself SIGTERM at step ``at`` (or ``"setup"``): tests/stop_at_step.py."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    script = REPO_ROOT / "tests" / "stop_at_step.py"
    return subprocess.run([PYTHON, str(script), at, *args], cwd=cwd, env=env, capture_output=True,
                          stdin=subprocess.DEVNULL, text=True, timeout=300)


def test_sigterm_during_set_up_is_one_line_exit_75_and_no_lock_left(tmp_path):
    """SIGTERM while the run folder is locked, before the first step: no traceback, exit 75,
    the lock released."""
    args = ["task=grok_modadd", "task.size=tiny", "hardware=cpu", "progress=false", "steps=3",
            "results_dir=res"]
    stopped = _stop_at_step("setup", args, tmp_path)
    assert stopped.returncode == train.EXIT_PREEMPTED, stopped.stderr
    lines = [ln for ln in stopped.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "stopped by SIGTERM outside the training steps" in lines[0]
    (folder,) = [p.parent for p in (tmp_path / "res").rglob(results.CONFIG_FILE)]
    assert not results.lock_path(folder).exists()
    again = ddc_bench(*args, cwd=tmp_path)  # nothing stale in the way
    assert again.returncode == 0, again.stderr


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    command = [str(DDC_BENCH_SCRIPT)] if DDC_BENCH_SCRIPT.exists() else [PYTHON, "-m", "ddc_bench.cli"]
    return subprocess.Popen([*command, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_checkpoints_and_a_second_process_is_locked_out(tmp_path):
    """A long run is interrupted from outside (SIGINT, at whatever step it reached); while
    it runs, a second process aimed at the same folder stops with one line."""
    args = ["task=grok_modadd", "task.size=tiny", "hardware=cpu", "progress=false",
            "steps=1000000", "log_every=1", "eval_every=1000", "results_dir=res"]
    first = _start(args, tmp_path)
    folder = results.run_dir(tmp_path / "res", "grok_modadd", "tiny", "adamw",
                             "lr0.001,eval_every=1000,log_every=1,steps=1000000", 0)
    _wait_for(folder / results.METRICS_FILE, first)
    second = ddc_bench(*args, cwd=tmp_path)
    assert second.returncode == 1
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(Path("res") / folder.relative_to(tmp_path / "res")) in lines[0]
    assert "is in use by another run (pid" in lines[0]
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == train.EXIT_PREEMPTED, err
    assert "Traceback" not in err and "stopped by SIGINT at step" in err
    payload, _ = checkpoint.load(folder)
    assert payload["step"] >= 1
    assert not results.lock_path(folder).exists()  # released on the way out


# --------------------------------------------------------------------------------------
# Data streams
# --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=40, n_test=20)  # 2 batches of 16 an epoch
    return root


@pytest.mark.parametrize("task_name", config_names("task"))
@pytest.mark.parametrize("num_workers", [0, 1])
def test_every_task_stream_restarts_exactly_and_shards_partition_it(task_name, num_workers,
                                                                     cifar_root):
    from tasks import build_task

    cfg = {"name": task_name, "size": "tiny"}
    if task_name in ("vit_cifar", "resnet_cifar"):
        cfg["data"] = {"root": str(cifar_root)}
    elif num_workers:
        pytest.skip("only the CIFAR tasks use DataLoader workers")
    if task_name == "grok_modadd":
        cfg["batch_size"] = 8  # below the training set: a real shuffled stream, not full batch
    task = build_task(cfg, num_workers=num_workers)
    n = 7  # crosses CIFAR's and grok's epoch boundaries
    fresh = iter(task.train_batches(5))
    reference = [next(fresh) for _ in range(n)]
    for start in (1, 3, n - 1):
        torch.manual_seed(123)  # the global RNG must not matter
        resumed = iter(task.train_batches(5, start=start))
        for k in range(start, n):
            batch = next(resumed)
            assert all(torch.equal(a, b) for a, b in zip(batch, reference[k])), (start, k)
    shards = [iter(task.train_batches(5, start=2, rank=r, world_size=2)) for r in range(2)]
    for k in range(2, n):
        parts = [next(s) for s in shards]
        for i, whole in enumerate(reference[k]):
            assert torch.equal(torch.cat([p[i] for p in parts]), whole)


# --------------------------------------------------------------------------------------
# Checkpoint faults: one line, never a silent mix
# --------------------------------------------------------------------------------------

def _interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, at_step: int = 3,
                 checkpoint_every: int = 0) -> tuple:
    """A 6-step fake run stopped by a real SIGTERM after ``at_step`` steps: (cfg, folder)."""
    cfg = base_config(tmp_path, steps=6, checkpoint_every=checkpoint_every, log_every=1)
    with pytest.raises(train.Preempted):
        train.run(cfg, overrides=[], hooks=[sigterm_at(at_step)])
    folder = results.run_dir(cfg.results_dir, "fake", "tiny", "adamw", "lr0.001", 0)
    return cfg, folder


def test_checkpoints_are_atomic_and_two_are_kept(tmp_path, fake_task):
    cfg = base_config(tmp_path, steps=6, checkpoint_every=2)
    train.run(cfg, overrides=[])
    folder = results.run_dir(cfg.results_dir, "fake", "tiny", "adamw", "lr0.001", 0)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["checkpoint.prev.pt", "checkpoint.pt", "config.yaml", "metrics.jsonl",
                     "summary.json"]
    assert checkpoint.load(folder)[0]["step"] == 6
    assert torch.load(folder / results.PREV_CHECKPOINT_FILE, weights_only=True)["step"] == 4


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_checkpoint_is_one_line_and_resume_false_starts_afresh(
        damage, tmp_path, fake_task, monkeypatch):
    cfg, folder = _interrupted(tmp_path, monkeypatch)
    path = folder / results.CHECKPOINT_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint" * 64)
    metrics_before = (folder / results.METRICS_FILE).read_bytes()
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.run(cfg, overrides=[])
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "resume=false" in message
    assert (folder / results.METRICS_FILE).read_bytes() == metrics_before  # untouched
    cfg.resume = False
    summary = train.run(cfg, overrides=[])
    assert summary["status"] == "finished" and summary["resumed_from"] == []
    aside = folder.with_name("seed0.interrupted-1")
    assert (aside / results.METRICS_FILE).read_bytes() == metrics_before  # kept, moved aside


def test_missing_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, fake_task, monkeypatch):
    """A crash between save's two renames leaves only checkpoint.prev.pt: resume from it."""
    cfg, folder = _interrupted(tmp_path, monkeypatch, at_step=5, checkpoint_every=2)
    (folder / results.CHECKPOINT_FILE).unlink()  # latest (step 5) gone; prev is step 4
    summary = train.run(cfg, overrides=[])
    assert summary["resumed_from"] == [4] and summary["steps_done"] == 6
    steps = [r["step"] for r in results.read_metrics(folder) if "loss" in r]
    assert steps == sorted(set(steps))  # lines after step 4 were cut, then written once


def test_resume_true_without_checkpoint_and_another_config_are_refused(tmp_path, fake_task,
                                                                       monkeypatch):
    cfg = base_config(tmp_path, steps=6, resume=True)
    with pytest.raises(checkpoint.CheckpointError, match="resume=true but .* holds no checkpoint"):
        train.run(cfg, overrides=[])
    cfg, folder = _interrupted(tmp_path / "x", monkeypatch)
    cfg.grad_clip = 0.5  # same folder, different computation
    with pytest.raises(checkpoint.CheckpointError, match=r"different config \(differs in grad_clip\)"):
        train.run(cfg, overrides=[])


def test_a_resumed_run_logs_to_the_same_wandb_run(tmp_path, fake_task, wandb_offline, monkeypatch):
    cfg = base_config(tmp_path, steps=6, checkpoint_every=0)
    cfg.logger = {"name": "wandb", "project": "ddc-bench-test", "entity": None, "group": None,
                  "tags": [], "mode": None}
    with pytest.raises(train.Preempted):
        train.run(cfg, overrides=[], hooks=[sigterm_at(3)])
    folder = results.run_dir(cfg.results_dir, "fake", "tiny", "adamw", "lr0.001", 0)
    run_id = (folder / results.WANDB_ID_FILE).read_text().strip()
    assert run_id
    train.run(cfg, overrides=[])
    sessions = sorted((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    # wandb names offline sessions offline-run-<time>-<id>[-<n>]: both carry the same id.
    assert len(sessions) == 2 and all(f"-{run_id}" in s.name for s in sessions)


class _FullDisk:
    """A file on a full disk: every write fails with ENOSPC."""

    def __init__(self, file) -> None:
        self._file = file

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._file, name)


def test_disk_full_during_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, fake_task,
                                                                        monkeypatch):
    cfg = base_config(tmp_path, steps=6, checkpoint_every=2)
    real_writer, checkpoints = results.atomic_writer, []

    @contextlib.contextmanager
    def second_checkpoint_fills_the_disk(path):
        with real_writer(path) as f:
            if Path(path).name.startswith(".checkpoint"):
                checkpoints.append(path)
            yield _FullDisk(f) if len(checkpoints) == 2 else f

    monkeypatch.setattr(results, "atomic_writer", second_checkpoint_fills_the_disk)
    with pytest.raises(checkpoint.CheckpointError) as err:
        train.run(cfg, overrides=[])
    message = str(err.value)
    assert "\n" not in message and message.startswith("no space left on the device of")
    assert "checkpoint at step 4 was not written" in message
    assert "run the same command again to resume" in message
    folder = results.run_dir(cfg.results_dir, "fake", "tiny", "adamw", "lr0.001", 0)
    assert checkpoint.load(folder)[0]["step"] == 2  # the last complete one, kept
    assert not list(folder.glob(".*.tmp"))  # no half-written file left
    monkeypatch.setattr(results, "atomic_writer", real_writer)
    summary = train.run(cfg, overrides=[])
    assert summary["resumed_from"] == [2] and summary["status"] == "finished"


def test_metrics_shorter_than_the_checkpoint_records_is_one_line(tmp_path, fake_task, monkeypatch):
    cfg, folder = _interrupted(tmp_path, monkeypatch)
    metrics = folder / results.METRICS_FILE
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-2]))  # lines lost after the checkpoint was written
    with pytest.raises(results.MetricsFileError) as err:
        train.run(cfg, overrides=[])
    message = str(err.value)
    assert "\n" not in message and str(metrics) in message and "resume=false" in message
    assert not results.lock_path(folder).exists()


@pytest.mark.slow
def test_metrics_shorter_than_the_checkpoint_records_is_one_line_through_the_command(tmp_path):
    args = ["task=grok_modadd", "task.size=tiny", "hardware=cpu", "progress=false", "steps=6",
            "log_every=1", "results_dir=res"]
    stopped = _stop_at_step("3", args, tmp_path)
    assert stopped.returncode == train.EXIT_PREEMPTED, stopped.stderr
    (metrics,) = (tmp_path / "res").rglob(results.METRICS_FILE)
    metrics.write_text("")
    resumed = ddc_bench(*args, cwd=tmp_path)
    assert resumed.returncode == 1
    lines = [ln for ln in resumed.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ddc-bench: error: ") and "is shorter" in lines[0]
