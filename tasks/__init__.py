"""The benchmark's tasks and their registry.

``build_task(cfg.task)`` turns the ``task`` node of the Hydra config into a
:class:`tasks.base.Task`. Each task's config lives in ``configs/task/NAME.yaml``; fields a
size preset supplies are ``null`` there and filled by the builder (see
:mod:`tasks.config`). Task modules are imported lazily, so listing or building one task
never imports the others' dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from tasks.base import Task
from tasks.config import SIZES, to_plain

__all__ = ["TASKS", "SIZES", "Task", "build_task"]

Builder = Callable[..., Task]


def _lazy(module: str) -> Builder:
    """A builder that imports ``tasks.<module>`` on first call and calls its ``build``."""

    def build(cfg: Mapping[str, Any], *, num_workers: int = 0) -> Task:
        return importlib.import_module(f"tasks.{module}").build(cfg, num_workers=num_workers)

    build.__name__ = f"build_{module}"
    build.__doc__ = f"Build the ``{module}`` task (see ``tasks/{module}.py``)."
    return build


#: Task name → builder ``(task_cfg: dict, *, num_workers: int) -> Task``.
TASKS: dict[str, Builder] = {
    "gpt_lm": _lazy("gpt_lm"),
    "vit_cifar": _lazy("vit_cifar"),
    "resnet_cifar": _lazy("resnet_cifar"),
    "grok_modadd": _lazy("grok_modadd"),
}


def build_task(task_cfg: Any, *, num_workers: int = 0) -> Task:
    """Build the task described by ``task_cfg`` (an OmegaConf ``DictConfig`` or a dict).

    ``task_cfg["name"]`` picks the task; ``num_workers`` is the number of DataLoader
    workers for tasks that use one (CIFAR). Raises ``ValueError`` for an unknown task name,
    size or config field, and ``FileNotFoundError`` when a dataset is missing and may not
    be downloaded.
    """
    cfg = to_plain(task_cfg)
    if not isinstance(cfg, Mapping):
        raise ValueError(f"task config must be a mapping, got {type(cfg).__name__}")
    name = cfg.get("name")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name](cfg, num_workers=num_workers)
