"""The benchmark's task models as DDC test subjects: one list of model variants and one way
to build them at tiny size (float64 for the exactness tests), shared by the DDC contract,
fast-path, parameter-role and find_gauges tests."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ddc_bench.plan import task_config
from tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"

#: Model variants covering every gauge kind: name -> (task, task-config overrides).
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt-swiglu-rope-layernorm": ("gpt_lm", {}),
    "gpt-relu-norope-rmsnorm": ("gpt_lm", {"model": {"mlp": "relu", "norm": "rmsnorm", "rope": False}}),
    "gpt-gelu-bias": ("gpt_lm", {"model": {"mlp": "gelu", "bias": True}}),
    "gpt-tied": ("gpt_lm", {"model": {"tied": True}}),
    "vit": ("vit_cifar", {}),
    "vit-swiglu-rmsnorm": ("vit_cifar", {"model": {"mlp": "swiglu", "norm": "rmsnorm"}}),
    "resnet": ("resnet_cifar", {}),
    "grok": ("grok_modadd", {}),
}


def build_case(case: str, cifar_root: Path) -> tuple[Any, nn.Module]:
    """The tiny task of ``case`` (CIFAR tasks read ``cifar_root``) and its model, built
    from seed 0."""
    name, overrides = CASES[case]
    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), {"size": "tiny"}, overrides)
    if "root" in cfg.get("data", {}):
        cfg.data.root = str(cifar_root)
    task = build_task(task_config(cfg))  # the YAML's target.by_size, resolved as a run does
    torch.manual_seed(0)
    return task, task.build_model()


def float64_case(case: str, cifar_root: Path, steps: int) -> tuple[nn.Module, list[tuple]]:
    """The model of ``case`` in float64 and its first ``steps`` training batches (floating
    tensors in float64)."""
    task, model = build_case(case, cifar_root)
    batches = [tuple(t.double() if t.is_floating_point() else t for t in b)
               for b in itertools.islice(task.train_batches(0), steps)]
    return model.double(), batches
