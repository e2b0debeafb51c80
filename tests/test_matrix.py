"""Every task × optimizer: the config composes and validates, and a 3-step CPU run works.

The names are read from ``configs/task/`` and ``configs/optimizer/``, so a new task or
optimizer (``ddc``, ``ddc_muon``) is covered as soon as its YAML exists. CIFAR tasks (any
task whose YAML has ``data.root``) train on the fake CIFAR of ``tests/cifar_fixture.py``.
Runs are in-process (compose + validate + ``train.run``), as the command does them; the
command itself is exercised by ``test_cli.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from cifar_fixture import write_fake_cifar
from conftest import compose, config_names

from ddc_bench import results, train
from ddc_bench.config import CONFIG_DIR, load_group_defaults, validate

TASKS = config_names("task")
# zoo.yaml is a template (optimizer=zoo optimizer.name=NAME; tests/test_zoo.py runs it named).
OPTIMIZERS = [o for o in config_names("optimizer") if o != "zoo"]
HARDWARE = config_names("hardware")


def _uses_cifar(task: str) -> bool:
    return "root" in (load_group_defaults("task", task).get("data") or {})


@pytest.fixture(scope="session")
def fake_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fake CIFAR-10 and CIFAR-100 in one root (tiny: fast to write and to train on)."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=80, n_test=40)
    write_fake_cifar(root, "cifar100", n_train=80, n_test=40)
    return root


def _task_overrides(task: str, cifar_root: Path | None = None) -> list[str]:
    overrides = [f"task={task}", "task.size=tiny"]
    if cifar_root is not None and _uses_cifar(task):
        overrides.append(f"task.data.root={cifar_root}")
    return overrides


def test_names_are_discovered():
    assert {"gpt_lm", "vit_cifar", "resnet_cifar", "grok_modadd"} <= set(TASKS)
    assert {"adamw", "adamp", "muon", "scale"} <= set(OPTIMIZERS)
    assert {"auto", "cpu", "cuda", "cuda_bf16"} <= set(HARDWARE)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_config_composes_and_validates(task, optimizer):
    cfg, choices = compose([*_task_overrides(task), f"optimizer={optimizer}"])
    validate(cfg, choices)
    # Each option's `name` field is its file name: the registries and the folders agree.
    assert (cfg.task.name, cfg.optimizer.name) == (task, optimizer)
    assert (choices["task"], choices["optimizer"]) == (task, optimizer)


@pytest.mark.parametrize("hardware", HARDWARE)
def test_hardware_profiles_compose(hardware):
    cfg, choices = compose([f"hardware={hardware}"])
    validate(cfg, choices)
    expected = {"device", "autocast", "compile", "threads", "num_workers", "grad_accum"}
    if hardware == "ddp":  # the DDP profile adds its switch and the collective timeout
        expected |= {"ddp", "timeout_s"}
    assert set(cfg.hardware) == expected


@pytest.mark.parametrize("experiment", config_names("experiment"))
def test_experiments_compose(experiment):
    cfg, choices = compose([f"experiment={experiment}"])
    validate(cfg, choices)


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_few_steps_on_cpu(task, optimizer, tmp_path, fake_cifar):
    overrides = [*_task_overrides(task, fake_cifar), f"optimizer={optimizer}", "hardware=cpu",
                 "steps=3", "eval_every=3", "log_every=1", f"results_dir={tmp_path}",
                 "progress=false"]
    cfg, choices = compose(overrides)
    validate(cfg, choices)
    summary = train.run(cfg, overrides=overrides)

    assert summary["status"] == "finished", summary
    assert summary["steps_done"] == 3
    assert summary["final"] and all(math.isfinite(v) for v in summary["final"].values())
    assert summary["final"]["val_loss"] > 0
    folder = results.run_dir(tmp_path, task, "tiny", optimizer, summary["variant"], 0)
    assert results.is_finished(folder)
    lines = results.read_metrics(folder)
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in lines if "val_loss" in r] == [3]


def test_config_dir_is_the_repositorys():
    assert (CONFIG_DIR / "config.yaml").is_file()
    assert CONFIG_DIR.parent.joinpath("ddc_bench", "cli.py").is_file()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("optimizer", ["ddc", "ddc_muon"])
def test_ddc_trains_every_task_for_twenty_steps(task, optimizer, tmp_path, fake_cifar):
    """DDC on each task model's full gauge set: 20 steps finish and the training loss falls
    (CIFAR tasks on the fake dataset, pointed to explicitly)."""
    overrides = [*_task_overrides(task, fake_cifar), f"optimizer={optimizer}", "hardware=cpu",
                 "steps=20", "eval_every=20", "log_every=1", f"results_dir={tmp_path}",
                 "progress=false"]
    cfg, choices = compose(overrides)
    validate(cfg, choices)
    summary = train.run(cfg, overrides=overrides)

    assert summary["status"] == "finished" and summary["steps_done"] == 20
    folder = results.run_dir(tmp_path, task, "tiny", optimizer, summary["variant"], 0)
    losses = [r["loss"] for r in results.read_metrics(folder) if "loss" in r]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) < sum(losses[:5]), losses
