"""The run plan: every decision about a run, resolved and checked before anything is built.

:func:`make_plan` turns a composed, validated config into a frozen :class:`RunPlan`:
device and precision, threads, the task's resolved size/steps/batch/target (read from the
task module's presets, no data loaded), the optimizer options with the effective learning
rate, the schedule, the run folder and its name, resume and checkpoint policy, the DDP
world. Every config error (including a target metric the task does not report, a
``run_name`` that leaves ``results_dir``, an unwritable ``results_dir``) is raised here as
one line, before any data, model or folder exists.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddc_bench import results
from ddc_bench.config import ConfigError
from ddc_bench.distributed import World, world_from_env

#: torch's CPU thread count at import (one per core): what ``hardware.threads=0`` means.
DEFAULT_THREADS = torch.get_num_threads()

#: ``hardware.threads=null`` (auto) uses one thread for models below this many parameters.
#: Measured on a shared 2-core machine: the tiny presets ran 3.6x to 17x slower with
#: torch's default (2 threads) than with 1, and gpt_lm small (0.86M parameters) 5x to 8x
#: slower (30 steps: 82.8 s of training with 2 threads, 10.1 s and 14.9 s with 1).
AUTO_ONE_THREAD_BELOW = 2_000_000

#: Overridden keys that never name the ``<variant>`` folder: they form the rest of the
#: path (task, size, optimizer, seed, results_dir, run_name), were already in it
#: (``optimizer.lr`` is the ``lr<lr>`` part), or change how a run executes and is
#: recorded, not what it computes (hardware, logger, progress, resume, checkpoints,
#: diagnostics).
PATH_KEYS = ("task", "task.size", "task.name", "optimizer", "optimizer.name", "optimizer.lr",
             "seed", "results_dir", "run_name", "progress", "resume", "checkpoint_every",
             "experiment", "scale", "sweep")
PATH_PREFIXES = ("hardware", "logger", "hydra", "diagnostics")


@dataclass(frozen=True)
class TaskSpec:
    """What the plan needs to know about a task without building it."""

    name: str
    size: str
    steps: int
    batch_size: int
    target: dict[str, Any] | None
    #: The metric names the task's ``evaluate`` returns (``loss``, ``acc``, ``ppl``).
    metrics: tuple[str, ...]


def task_config(task_cfg: Any) -> dict[str, Any]:
    """The task config as plain data, its target chosen for the run's size.

    A task YAML states calibrated targets per size (``task.target.by_size``: size →
    value, each with its source); ``task.target.value``, when set, wins. What comes back
    has a plain ``target`` (``metric``, ``value``, ``mode``), as ``tasks`` expects: this is
    what runs build their task from and what ``config.yaml`` records."""
    from tasks.config import to_plain

    cfg = to_plain(task_cfg)
    target = cfg.get("target") if isinstance(cfg, dict) else None
    if isinstance(target, Mapping) and "by_size" in target:
        target = dict(target)
        by_size = target.pop("by_size") or {}
        if target.get("value") is None and isinstance(by_size, Mapping):
            target["value"] = by_size.get(cfg.get("size") or "tiny")
        cfg["target"] = target
    return cfg


def task_spec(task_cfg: Any) -> TaskSpec:
    """Resolve a task config through its module's ``DEFAULTS``/``PRESETS``/``METRICS``
    (the convention of ``tasks/config.py``) without loading any data."""
    from tasks import TASKS
    from tasks.config import resolve_config

    cfg = task_config(task_cfg)
    name = cfg.get("name")
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    module = importlib.import_module(f"tasks.{name}")
    try:
        resolved = resolve_config(cfg, task=name, defaults=module.DEFAULTS, presets=module.PRESETS)
    except ValueError as err:
        raise ConfigError(f"task={name}: {err}") from None
    _check_model(resolved.get("model") or {})
    return TaskSpec(name=name, size=resolved["size"], steps=resolved["steps"],
                    batch_size=resolved["batch_size"], target=resolved["target"],
                    metrics=tuple(module.METRICS))


def _check_model(model: Mapping[str, Any]) -> None:
    """What a model builder would refuse with a traceback: attention heads that do not
    divide the width, a dropout probability outside [0, 1)."""
    width, heads = model.get("width"), model.get("heads")
    if isinstance(width, int) and isinstance(heads, int) and heads > 0 and width % heads:
        raise ConfigError(f"invalid value for 'task.model.heads': {heads} (expected a divisor "
                          f"of task.model.width={width})")
    for key, value in model.items():
        if "dropout" in key and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and not 0 <= value < 1:
            raise ConfigError(f"invalid value for 'task.model.{key}': {value} (expected a "
                              f"probability in [0, 1))")


@dataclass(frozen=True)
class RunPlan:
    """A run, fully resolved (see the module docstring). Made once by :func:`make_plan`."""

    cfg: DictConfig
    #: The resolved config as plain data (written to ``config.yaml``).
    resolved: dict[str, Any]
    overrides: list[str]
    task: TaskSpec
    seed: int
    steps: int
    eval_every: int
    log_every: int
    #: Steps between checkpoints (``checkpoint_every``, else ``eval_every``); 0: only on a
    #: signal and at the end.
    checkpoint_every: int
    #: The evaluation-record key of the task's target (``val_acc``), ``None``: no target.
    target_key: str | None
    optimizer_name: str
    #: Options for the optimizer builder, ``lr`` already the effective one.
    optimizer_options: dict[str, Any]
    base_lr: float
    lr_mult: float
    lr: float
    weight_decay: float | None
    grad_clip: float | None
    #: Keyword arguments of :func:`ddc_bench.schedule.build_scheduler` / ``lr_factor``.
    schedule: dict[str, Any]
    variant: str
    variant_keys: dict[str, Any]
    folder: Path
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    #: ``hardware.threads``: ``None`` = auto (:func:`resolve_threads`), 0 = torch's default.
    threads_setting: int | None
    num_workers: int
    grad_accum: int
    #: ``"auto"``, ``True`` or ``False`` (see ``configs/config.yaml``).
    resume: bool | str
    logger_cfg: dict[str, Any]
    progress: bool
    world: World = field(default_factory=World)
    ddp_timeout_s: float = 600.0
    #: ``diagnostics.every``: steps between dead-direction readings; 0 = off.
    diagnostics_every: int = 0
    #: ``diagnostics.probe_batch``: samples in the fixed probe batch.
    probe_batch: int = 2

    @property
    def batch_share(self) -> int:
        """Samples of each global batch this process trains on."""
        return self.task.batch_size // self.world.size


def resolve_threads(setting: int | None, n_params: int) -> int:
    """torch CPU threads for a run: the setting, torch's default for 0, and for ``None``
    one thread below :data:`AUTO_ONE_THREAD_BELOW` parameters, else torch's default."""
    if setting is None:
        return 1 if n_params < AUTO_ONE_THREAD_BELOW else DEFAULT_THREADS
    return int(setting) or DEFAULT_THREADS


def resolve_device(name: str, world: World) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error. Under
    DDP on CUDA, each rank uses GPU ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"invalid value for 'hardware.device': {name!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.device={name} but CUDA is not available here (use hardware=cpu or hardware=auto)"
        )
    if device.type == "cuda" and world.active:
        device = torch.device("cuda", world.local_rank)
    return device


def resolve_autocast(name: str | None) -> torch.dtype | None:
    """The autocast dtype of a hardware profile (``None``: full precision)."""
    if name is None:
        return None
    if name == "bfloat16":
        return torch.bfloat16
    # float16 would need loss scaling (GradScaler), which the loop deliberately omits.
    raise ConfigError(f"invalid value for 'hardware.autocast': {name!r} (expected bfloat16 or null)")


def _override_key(override: str) -> str | None:
    """The config key of a command-line override (``+a.b=1`` → ``a.b``; ``~a`` → None)."""
    if "=" not in override or override.startswith("~"):
        return None
    key = override.split("=", 1)[0].lstrip("+")
    return key.split("@", 1)[0] or None


def variant_keys(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """The overridden or swept keys that name the ``<variant>`` folder, with their
    resolved values (see :data:`PATH_KEYS`)."""
    found: dict[str, Any] = {}
    for override in overrides:
        key = _override_key(override)
        if key is None or key in PATH_KEYS or key.split(".", 1)[0] in PATH_PREFIXES:
            continue
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True)
        found[key] = value
    return found


def _target_key(target: Mapping[str, Any] | None, spec: TaskSpec) -> str | None:
    """The evaluation-record key a task target refers to (``val_acc`` or ``acc`` → ``val_acc``)."""
    if target is None:
        return None
    keys = [f"{split}_{m}" for split in ("val", "train_eval") for m in spec.metrics]
    keys.append("gap_loss")
    for key in (target["metric"], f"val_{target['metric']}"):
        if key in keys:
            return key
    raise ConfigError(f"task.target.metric={target['metric']!r} is not an evaluation metric of "
                      f"task {spec.name} (have: {', '.join(keys)})")


def make_plan(cfg: DictConfig, overrides: list[str], spec: TaskSpec | None = None) -> RunPlan:
    """Resolve and check ``cfg`` (composed and validated by :func:`ddc_bench.config.validate`).

    ``spec`` defaults to :func:`task_spec` of ``cfg.task``. Raises :class:`ConfigError`
    or :class:`ddc_bench.results.ResultsDirError` with a one-line message.
    """
    hw = cfg.hardware
    world = world_from_env(bool(hw.get("ddp", False)))
    device = resolve_device(hw.device, world)
    autocast_dtype = resolve_autocast(hw.autocast)
    for key, low in (("grad_accum", 1), ("num_workers", 0)):
        if hw[key] < low:
            raise ConfigError(f"invalid value for 'hardware.{key}': {hw[key]} (expected an int >= {low})")
    threads = hw.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 0):
        raise ConfigError(f"invalid value for 'hardware.threads': {threads!r} "
                          f"(expected an int >= 0, or null for auto)")
    spec = spec or task_spec(cfg.task)

    opt: dict[str, Any] = OmegaConf.to_container(cfg.optimizer, resolve=True)  # type: ignore[assignment]
    name = opt.pop("name")
    from ddc_bench.optimizers import registry

    known = registry()
    if name not in known:
        from baselines.zoo import unknown_name_message  # the closest names, not all of them
        raise ConfigError(unknown_name_message(name))
    base_lr, lr_mult = float(opt["lr"]), float(cfg.lr_mult)
    lr = base_lr * lr_mult
    opt["lr"] = lr

    steps = int(cfg.steps or spec.steps)
    sched = cfg.schedule
    from ddc_bench.schedule import warmup_steps_for

    warmup = warmup_steps_for(steps, sched.warmup_fraction, sched.warmup_steps)
    schedule = dict(total_steps=steps, warmup_steps=warmup, kind=sched.kind,
                    min_lr_ratio=sched.min_lr_ratio)

    grad_accum = int(hw.grad_accum)
    if spec.batch_size % world.size:
        raise ConfigError(f"task.batch_size={spec.batch_size} does not split evenly over "
                          f"{world.size} DDP processes (choose a multiple of {world.size})")
    if grad_accum > spec.batch_size // world.size:
        raise ConfigError(f"hardware.grad_accum={grad_accum} exceeds the batch size "
                          f"{spec.batch_size // world.size}")

    eval_every = int(cfg.eval_every or max(1, steps // 10))
    keys = variant_keys(cfg, overrides)
    variant = str(cfg.run_name) if cfg.run_name else results.variant_name(base_lr, keys)
    results.check_results_dir(cfg.results_dir)
    folder = results.run_dir(cfg.results_dir, spec.name, spec.size, name, variant, int(cfg.seed))

    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    resolved["task"] = task_config(cfg.task)  # the target of the run's size, as trained
    diag = resolved.get("diagnostics") or {}
    return RunPlan(
        cfg=cfg, resolved=resolved, overrides=list(overrides), task=spec, seed=int(cfg.seed),
        steps=steps, eval_every=eval_every, log_every=int(cfg.log_every),
        checkpoint_every=eval_every if cfg.checkpoint_every is None else int(cfg.checkpoint_every),
        target_key=_target_key(spec.target, spec), optimizer_name=name, optimizer_options=opt,
        base_lr=base_lr, lr_mult=lr_mult, lr=lr, weight_decay=opt.get("weight_decay"),
        grad_clip=float(cfg.grad_clip) if cfg.grad_clip else None, schedule=schedule,
        variant=variant, variant_keys=keys, folder=folder, device=device,
        autocast_dtype=autocast_dtype, compile=bool(hw.compile), threads_setting=threads,
        num_workers=int(hw.num_workers), grad_accum=grad_accum, resume=cfg.resume,
        logger_cfg=OmegaConf.to_container(cfg.logger, resolve=True),  # type: ignore[arg-type]
        progress=bool(cfg.progress), world=world,
        ddp_timeout_s=float(hw.get("timeout_s", 600) or 600),
        diagnostics_every=int(diag.get("every", 0)), probe_batch=int(diag.get("probe_batch", 2)),
    )


def fingerprint(plan: RunPlan) -> dict[str, Any]:
    """The part of the config that decides what a run computes: a resumed or skipped run
    must match it. Leaves out how the run executes or is recorded (hardware, logger,
    progress, resume, checkpoint_every, results_dir, run_name, diagnostics: readings only
    observe, on a forked RNG, so runs with and without them train identically)."""
    ignore = {"hardware", "logger", "progress", "resume", "checkpoint_every", "results_dir",
              "run_name", "diagnostics"}
    return {k: v for k, v in plan.resolved.items() if k not in ignore}


def diff_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += diff_keys(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, float) and isinstance(b, float)
                             and math.isnan(a) and math.isnan(b)):
            out.append(f"{prefix}{key}")
    return out
