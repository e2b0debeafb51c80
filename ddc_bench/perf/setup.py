"""What ``ddc-bench-perf`` measures on: task configs (composed from ``configs/``), tasks,
models and optimizers, one :class:`Setup` per optimizer, and the runner's plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ddc.param_groups import param_groups
from ddc_bench.config import CONFIG_DIR, load_group_defaults, validate
from ddc_bench.optimizers import build_optimizer
from ddc_bench.training_optimizer import TrainingOptimizer
from ddc_bench.plan import task_config as plan_task_config
from ddc_bench.train import to_device

#: Task models ``--tasks all`` stands for.
TASK_NAMES = ("gpt_lm", "vit_cifar", "resnet_cifar", "grok_modadd")

#: The reference AdamW row per device type.
REFERENCE = {"cpu": "adamw_foreach", "cuda": "adamw_fused"}

#: torch's AdamW (foreach) with its step run through ``torch.compile`` (as torch's
#: tutorial "Compiling the optimizer" does): the fair companion of the ``*_compiled`` rows.
ADAMW_COMPILED = "adamw_compiled"

#: DDC's readable reference step (``foreach=False``) under its own row name, to time it
#: side by side with the default batched step: name -> (registry name, extra options).
#: ``ddc_compiled`` / ``ddc_muon_compiled``: the batched step with ``compile=True`` (the
#: compilation happens in the warm-up steps). ``ddc_cg`` / ``ddc_muon_cg``: the head
#: rotations' so(d) projections by CG (``rotation_solve="cg"``) instead of ``eigh``.
VARIANTS = {"ddc_ref": ("ddc", {"foreach": False}), "ddc_muon_ref": ("ddc_muon", {"foreach": False}),
            "ddc_compiled": ("ddc", {"compile": True}), "ddc_muon_compiled": ("ddc_muon", {"compile": True}),
            "ddc_cg": ("ddc", {"rotation_solve": "cg"}), "ddc_muon_cg": ("ddc_muon", {"rotation_solve": "cg"}),
            # DDC-Muon with Muon's own bfloat16 Newton-Schulz (configs/optimizer/ddc_muon_ns.yaml):
            # the like-for-like row against Muon (ddc_muon's default is the exact svd)
            "ddc_muon_ns": ("ddc_muon", {"orthogonalizer": "newton_schulz"})}

#: Which optimizer a DDC variant is compared with (``None``: the reference row).
BASE_OF = {"ddc": None, "ddc_muon": "muon", "ddc_ref": None, "ddc_muon_ref": "muon",
           "ddc_compiled": ADAMW_COMPILED, "ddc_muon_compiled": "muon", "ddc_cg": None, "ddc_muon_cg": "muon",
           "ddc_muon_ns": "muon"}

#: Distinct batches cycled through while timing (enough to vary the data, few enough to
#: keep large-batch tasks in memory).
BATCH_CYCLE = 8


class PerfError(Exception):
    """Bad input; the message is one line saying what is wrong and what is accepted."""


def task_config(name: str, size: str, data_root: str | None = None,
                model: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``task`` config of ``configs/task/<name>.yaml`` at ``size`` (``model`` overrides
    fields of ``task.model``; ``data_root`` sets ``task.data.root`` for CIFAR tasks)."""
    cfg = load_group_defaults("task", name)
    cfg["size"] = size
    if model:
        cfg["model"] = {**cfg.get("model", {}), **model}
    if data_root is not None and "root" in cfg.get("data", {}):
        cfg["data"]["root"] = data_root
    return plan_task_config(cfg)  # the target of this size, as a run would have it

def build_task_or_fail(cfg: dict[str, Any]) -> Any:
    """``tasks.build_task(cfg)``; a bad value or missing data becomes a :class:`PerfError`."""
    from tasks import build_task  # lazy: tasks import torchvision/datasets

    try:
        return build_task(cfg)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise PerfError(f"task {cfg.get('name')}: {err}") from err

def build_named(name: str, model: nn.Module) -> TrainingOptimizer:
    """A harness optimizer by registry name (options from ``configs/optimizer/<name>.yaml``),
    or a reference AdamW (``adamw_foreach``/``adamw_fused``, ``adamw.yaml``'s options;
    ``adamw_compiled``: the foreach one with ``torch.compile``d steps)."""
    if name in (*REFERENCE.values(), ADAMW_COMPILED):
        options = load_group_defaults("optimizer", "adamw")
        optimizer = torch.optim.AdamW(
            param_groups(model, float(options["weight_decay"])), lr=float(options["lr"]),
            betas=tuple(options["betas"]), eps=float(options["eps"]),
            weight_decay=float(options["weight_decay"]),
            foreach=name != "adamw_fused", fused=True if name == "adamw_fused" else None)
        if name == ADAMW_COMPILED:
            optimizer.step = torch.compile(optimizer.step)  # type: ignore[method-assign]
        return TrainingOptimizer(optimizer)
    if name in VARIANTS:
        base, extra = VARIANTS[name]
        return build_optimizer(model, {**load_group_defaults("optimizer", base), **extra})
    return build_optimizer(model, load_group_defaults("optimizer", name))

def build_named_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of :func:`build_named` alone."""
    return build_named(name, model).optimizer


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state_dict()`` (nested containers included)."""

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(optimizer.state_dict())

@dataclass
class Setup:
    """One optimizer training its own copy of a task model, and what was measured on it."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    #: ``loss.backward(create_graph=True)``: the optimizer reads second derivatives (Sophia-H).
    create_graph: bool = False
    step_s: list[float] = field(default_factory=list)
    train_step_s: list[float] = field(default_factory=list)

def make_setup(task: Any, name: str, device: torch.device) -> Setup:
    """A fresh model (seed 0, so every optimizer starts from the same weights) and ``name``."""
    torch.manual_seed(0)
    model = task.build_model().to(device)
    model.train()
    training = build_named(name, model)
    return Setup(name, model, training.optimizer, create_graph=training.create_graph)

def take_batches(task: Any, device: torch.device, count: int = BATCH_CYCLE) -> list[tuple[torch.Tensor, ...]]:
    """The first ``count`` training batches of ``task`` (seed 0), on ``device``."""
    stream = task.train_batches(0)
    return [to_device(next(stream), device) for _ in range(count)]

def runner_plan(task_cfg: dict[str, Any], name: str, device: torch.device, threads: int,
                results_dir: str) -> Any:
    """The runner's :class:`ddc_bench.plan.RunPlan` for ``name`` on ``task_cfg``, composed
    and validated as ``ddc-bench`` does it (``grad_clip`` off: clipping is part of a training
    recipe, not of the harness)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from ddc_bench.plan import make_plan

    overrides = [f"task={task_cfg['name']}", f"task.size={task_cfg['size']}", f"optimizer={name}",
                 f"hardware={device.type}", f"hardware.threads={threads}", "grad_clip=0",
                 "progress=false", f"results_dir={results_dir}"]
    if "root" in task_cfg.get("data", {}):
        overrides.append(f"task.data.root={task_cfg['data']['root']}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    with open_dict(cfg):
        del cfg["hydra"]  # what a Hydra job's task function receives has no hydra node
    validate(cfg, choices)
    return make_plan(cfg, overrides)
