"""Size presets, config merging and small helpers shared by every task.

A task config (``configs/task/NAME.yaml``) leaves every field that a size preset supplies
as ``null``. :func:`resolve_config` builds the effective config in three layers:

1. the task's size-independent defaults (every accepted key, so typos are caught),
2. the preset of ``cfg["size"]`` (``tiny`` | ``small`` | ``paper``),
3. every non-null field of ``cfg`` (so ``task.size=tiny task.model.depth=3`` works).

``target`` is the exception: it is not a preset field, the config's value is taken as
written (``value: null`` means "no target"), see :func:`resolve_target`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

SIZES = ("tiny", "small", "paper")
TOP_LEVEL_KEYS = ("name", "size", "batch_size", "steps", "model", "data", "target")
TARGET_MODES = ("min", "max")


def to_plain(cfg: Any) -> Any:
    """An OmegaConf node (or anything else) as plain Python containers, resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return copy.deepcopy(cfg)
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return copy.deepcopy(cfg)


def _overlay(base: dict[str, Any], override: Mapping[str, Any], where: str) -> None:
    """Copy the non-null values of ``override`` into ``base`` (recursing into dicts).

    Keys absent from ``base`` are rejected: ``base`` holds every accepted key, so an
    unknown key is a typo that would otherwise be silently ignored.
    """
    for key, value in override.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise ValueError(
                f"unknown config field {path!r}; accepted fields here: {sorted(base)}"
            )
        if value is None:
            continue
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ValueError(f"config field {path!r} must be a mapping, got {value!r}")
            _overlay(base[key], value, path)
        else:
            base[key] = _typed_like(base[key], value, path)


def _typed_like(reference: Any, value: Any, path: str) -> Any:
    """``value`` checked against the type of the default/preset ``reference`` (anything
    goes when the reference is null); an int given for a float field becomes a float."""
    if reference is None:
        return copy.deepcopy(value)
    if isinstance(reference, bool):
        ok = isinstance(value, bool)
    elif isinstance(reference, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(reference, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(reference, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    else:
        ok = isinstance(value, type(reference))
    if not ok:
        raise ValueError(
            f"config field {path!r} must be of type {type(reference).__name__} "
            f"(like {reference!r}), got {value!r}"
        )
    return copy.deepcopy(value)


def resolve_config(cfg: Mapping[str, Any] | Any, *, task: str, defaults: dict[str, Any],
                   presets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The effective config of ``task``: defaults, then the size preset, then ``cfg``.

    ``defaults`` must hold every accepted key of ``model`` and ``data`` (with ``None`` for
    preset-supplied ones); ``presets`` maps each size to the fields it supplies.
    Raises ``ValueError`` for an unknown size or an unknown field.
    """
    cfg = to_plain(cfg) or {}
    if not isinstance(cfg, Mapping):
        raise ValueError(f"task config must be a mapping, got {type(cfg).__name__}")
    size = cfg.get("size") or "tiny"
    if size not in presets:
        raise ValueError(f"unknown size {size!r} for task {task!r}; accepted sizes: {list(presets)}")
    unknown = sorted(set(cfg) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(
            f"unknown task config field(s) {unknown} for task {task!r}; "
            f"accepted: {list(TOP_LEVEL_KEYS)}"
        )
    merged = copy.deepcopy(defaults)
    merged.setdefault("batch_size", None)
    merged.setdefault("steps", None)
    _overlay(merged, presets[size], f"PRESETS[{size!r}]")
    body = {k: v for k, v in cfg.items() if k not in ("name", "size", "target")}
    _overlay(merged, body, "task")
    merged["name"] = task
    merged["size"] = size
    merged["target"] = resolve_target(cfg.get("target", _MISSING), defaults.get("target"))
    for key in ("batch_size", "steps"):
        value = merged[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"task.{key} must be a positive integer, got {value!r}")
    return merged


_MISSING = object()


def resolve_target(target: Any, default: dict[str, Any] | None) -> dict[str, Any] | None:
    """The time/steps-to-target goal: ``{"metric", "value", "mode"}`` or ``None``.

    A config without a ``target`` key gets the task's default; a ``target`` whose
    ``value`` is null (or a null ``target``) means "no target". Missing ``metric`` /
    ``mode`` entries are taken from the default.
    """
    if target is _MISSING:
        target = default
    if target is None:
        return None
    target = dict(target)
    unknown = sorted(set(target) - {"metric", "value", "mode"})
    if unknown:
        raise ValueError(f"unknown task.target field(s) {unknown}; accepted: metric, value, mode")
    if target.get("value") is None:
        return None
    merged = {**(default or {}), **{k: v for k, v in target.items() if v is not None}}
    if not merged.get("metric"):
        raise ValueError("task.target.metric is required when task.target.value is set")
    if merged.get("mode") not in TARGET_MODES:
        raise ValueError(f"task.target.mode must be one of {TARGET_MODES}, got {merged.get('mode')!r}")
    return {"metric": str(merged["metric"]), "value": float(merged["value"]), "mode": merged["mode"]}


def choice(value: Any, accepted: tuple[str, ...], field: str) -> str:
    """``value`` if it is one of ``accepted``, else a ``ValueError`` naming the field."""
    if value not in accepted:
        raise ValueError(f"task.{field} must be one of {list(accepted)}, got {value!r}")
    return value


def count_params(model: nn.Module) -> int:
    """Number of distinct trainable parameters (a tied weight counts once)."""
    unique = {id(p): p for p in model.parameters() if p.requires_grad}
    return sum(p.numel() for p in unique.values())


def meta_param_count(build_model: Callable[[], nn.Module]) -> int:
    """Parameter count of ``build_model()``, built on the meta device (no memory, no
    compute) with the RNG state restored, so describing a task never perturbs a run."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return count_params(build_model())
