"""Shared fixtures of the harness tests: a tiny fake task, config helpers, CLI runner.

The fake task lets the training-loop tests run in milliseconds and independently of the
real tasks; the real tasks are exercised by ``test_matrix.py`` and the CLI tests.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from cifar_fixture import write_fake_cifar
from ddc_bench.config import CONFIG_DIR

REPO_ROOT = CONFIG_DIR.parent
PYTHON = sys.executable
#: The installed console script next to this interpreter (``pip install -e .`` makes it).
DDC_BENCH_SCRIPT = Path(sys.executable).parent / "ddc-bench"


def config_names(group: str, variants: bool = False) -> list[str]:
    """The options of a config group, read from ``configs/<group>/`` (new ones included).
    A *variant* (a file whose ``defaults`` list extends a sibling, e.g. ddc_muon_ns.yaml)
    runs under its parent's name and is left out unless ``variants``: the matrix and
    resume tests run its parent, and tests/test_recipes.py checks what it changes."""
    import yaml

    names = []
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults") or []
        if variants or not any(isinstance(d, str) and d != "_self_" for d in defaults):
            names.append(path.stem)
    return names


# --------------------------------------------------------------------------------------
# A fake task: 4-class classification of 8-d Gaussian blobs with a 2-layer MLP
# --------------------------------------------------------------------------------------

class FakeModel(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, classes: int = 4) -> None:
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.readout = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.relu(self.hidden(x)))

    def gauges(self) -> list:
        return []


class FakeTask:
    """Implements the ``tasks.base.Task`` interface (duck-typed) on synthetic data."""

    name = "fake"
    unit_name = "samples"

    def __init__(self, size: str = "tiny", batch_size: int = 16, steps: int = 20,
                 dtype: torch.dtype = torch.float32, target: dict | None = None) -> None:
        self.size = size
        self.batch_size = batch_size
        self.steps = steps
        self.dtype = dtype
        self.target = target
        g = torch.Generator().manual_seed(1234)
        centers = torch.randn(4, 8, generator=g) * 3
        labels = torch.randint(0, 4, (512,), generator=g)
        inputs = centers[labels] + torch.randn(512, 8, generator=g)
        self.train_x, self.train_y = inputs[:384].to(dtype), labels[:384]
        self.val_x, self.val_y = inputs[384:].to(dtype), labels[384:]

    def build_model(self) -> nn.Module:
        return FakeModel().to(self.dtype)

    def train_batches(self, seed: int, *, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(seed)
        step = 0
        while True:
            idx = torch.randint(0, len(self.train_x), (self.batch_size,), generator=g)
            if step >= start:
                idx = torch.tensor_split(idx, world_size)[rank]
                yield self.train_x[idx], self.train_y[idx]
            step += 1

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict]:
        x, y = batch
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), {
            "acc": (logits.argmax(-1) == y).float().mean().item()}

    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        x, y = (self.train_x[:128], self.train_y[:128]) if split == "train" else (self.val_x, self.val_y)
        with torch.no_grad():
            logits = model(x.to(device))
        y = y.to(device)
        return {"loss": nn.functional.cross_entropy(logits, y).item(),
                "acc": (logits.argmax(-1) == y).float().mean().item()}

    def batch_units(self, batch: tuple[torch.Tensor, ...]) -> int:
        return int(batch[0].shape[0])

    def describe(self) -> dict[str, Any]:
        return {"train_examples": len(self.train_x)}


def fake_spec(task: FakeTask) -> Any:
    """The run plan's view of ``task`` (read when the plan is made, so tests may change
    ``task.target`` or ``task.steps`` after the fixture ran)."""
    from ddc_bench.plan import TaskSpec

    return TaskSpec(name=task.name, size=task.size, steps=task.steps, batch_size=task.batch_size,
                    target=task.target, metrics=("loss", "acc"))


def use_fake_task(monkeypatch: pytest.MonkeyPatch, task: FakeTask) -> FakeTask:
    """Make ``ddc_bench.train`` plan and build ``task`` for every run."""
    monkeypatch.setattr("ddc_bench.train._build_task", lambda cfg, num_workers=0: task)
    monkeypatch.setattr("ddc_bench.train._task_spec", lambda cfg: fake_spec(task))
    return task


@pytest.fixture
def fake_task(monkeypatch: pytest.MonkeyPatch):
    """Make ``ddc_bench.train`` build :class:`FakeTask` (returned, to adjust) for every run."""
    return use_fake_task(monkeypatch, FakeTask())


def sigterm_at(step: int) -> Any:
    """A step hook (``ddc_bench.train.StepHook``) sending this process a real SIGTERM at
    training step ``step``, once (the step needs a training-log or evaluation record)."""
    sent: list[int] = []

    def hook(state: Any, at: int, record: dict[str, Any]) -> None:
        if at == step and not sent:
            sent.append(at)
            os.kill(os.getpid(), signal.SIGTERM)

    return hook


def base_config(tmp_path: Path, **top: Any) -> DictConfig:
    """A composed-like config for the fake task: top level from configs/config.yaml,
    optimizer adamw, hardware cpu, logger none, without going through Hydra."""
    root = OmegaConf.load(CONFIG_DIR / "config.yaml")
    for key in ("defaults", "hydra"):
        root.pop(key)
    cfg = OmegaConf.merge(root, {
        "task": {"name": "fake", "size": "tiny"},
        "optimizer": OmegaConf.load(CONFIG_DIR / "optimizer" / "adamw.yaml"),
        "hardware": OmegaConf.load(CONFIG_DIR / "hardware" / "cpu.yaml"),
        "logger": OmegaConf.load(CONFIG_DIR / "logger" / "none.yaml"),
        "results_dir": str(tmp_path / "results"),
        "progress": False,
    })
    for key, value in top.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


# --------------------------------------------------------------------------------------
# Hydra compose and the real command
# --------------------------------------------------------------------------------------

def compose(overrides: list[str]) -> tuple[DictConfig, dict[str, Any]]:
    """Compose ``configs/config.yaml`` with ``overrides`` as ``ddc-bench`` would.

    Returns the job config (no ``hydra`` node) and the group choices.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]  # as in a job: the task function never sees the hydra node
    return cfg, choices


def ddc_bench(*args: str, cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the ``ddc-bench`` console script in ``cwd`` (``python -m ddc_bench.cli`` when the
    script is not installed)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    command = ([str(DDC_BENCH_SCRIPT)] if DDC_BENCH_SCRIPT.exists()
               else [PYTHON, "-m", "ddc_bench.cli"])
    # No terminal on stdin, as under a scheduler: nothing may wait for an answer.
    return subprocess.run([*command, *args], cwd=cwd, env=full_env, capture_output=True,
                          stdin=subprocess.DEVNULL, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small fake CIFAR-10 (40 train, 20 test images) for building the CIFAR task models;
    test modules that need other contents define their own ``cifar_root``."""
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=40, n_test=20)
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


#: ``sitecustomize.py`` for a child process without network: every connection attempt and
#: name lookup fails as on a machine without network (what the download tests expect).
_NO_NETWORK_SITE = """
import errno, socket

def _unreachable(*args, **kwargs):
    raise OSError(errno.ENETUNREACH, "Network is unreachable (blocked by the test)")

def _no_lookup(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (blocked by the test)")

socket.socket.connect = _unreachable
socket.socket.connect_ex = _unreachable
socket.create_connection = _unreachable
socket.getaddrinfo = _no_lookup
"""


@pytest.fixture
def offline_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a ``ddc-bench`` subprocess whose sockets are blocked (a
    ``sitecustomize`` first on ``PYTHONPATH``), so a download test fails as it would
    offline also on a connected machine."""
    site = tmp_path_factory.mktemp("no_network_site")
    (site / "sitecustomize.py").write_text(_NO_NETWORK_SITE)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "0"}


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb in offline mode writing under ``tmp_path/wandb_dir`` (the wandb extra, which
    ``make test`` installs)."""
    import wandb  # noqa: F401 - fail, not skip, when the extra is missing
    folder = tmp_path / "wandb_dir"
    folder.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return folder
