"""The training loop: one function, :func:`run`, readable top to bottom (nanoGPT style).

``run(cfg)`` trains one (task, optimizer, seed) combination described by a composed config
(see ``configs/config.yaml``) and writes its run folder through :mod:`ddc_bench.results`:
``config.yaml`` first, ``metrics.jsonl`` as it goes, ``summary.json`` last (a run is
finished when its summary exists). It returns the summary.

The loop, per optimizer step:

1. fetch the task's next batch; split it into ``hardware.grad_accum`` micro-batches;
2. forward + backward each micro-batch (under autocast on ``cuda_bf16``), weighting each
   micro-batch loss by its share of the batch so the gradient equals the full-batch one;
3. stop as *diverged* on a non-finite loss, else clip, step the optimizer and the LR
   schedule, and stop as *diverged* if a parameter became non-finite;
4. every ``log_every`` steps a training line, every ``eval_every`` steps (and at the end)
   an evaluation line on the fixed train subset and on held-out data.

Only items 1–3 count as training time (``train_time_s``; evaluation and logging are
excluded, CUDA is synchronized before each clock read). ``step_time_ms`` and
``units_per_s`` in the summary are steady-state: they also leave out the first step, which
pays one-time costs such as ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import random
import re
import resource
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from ddc_bench import provenance, results
from ddc_bench.config import ConfigError
from ddc_bench.loggers import make_logger, require_logger
from ddc_bench.optimizers import build_optimizer
from ddc_bench.schedule import build_scheduler, lr_factor, warmup_steps_for

#: torch's CPU thread count at import (one per core): what ``hardware.threads=0`` means.
DEFAULT_THREADS = torch.get_num_threads()

# --------------------------------------------------------------------------------------
# Small helpers (device, seeding, batches, memory, clocks)
# --------------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"invalid value for 'hardware.device': {name!r} ({err})") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"hardware.device={name} but CUDA is not available here (use hardware=cpu or hardware=auto)"
        )
    return device


def resolve_autocast(name: str | None) -> torch.dtype | None:
    """The autocast dtype of a hardware profile (``None``: full precision)."""
    if name is None:
        return None
    if name == "bfloat16":
        return torch.bfloat16
    # float16 would need loss scaling (GradScaler), which the loop deliberately omits.
    raise ConfigError(f"invalid value for 'hardware.autocast': {name!r} (expected bfloat16 or null)")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_batch(batch: tuple[torch.Tensor, ...], parts: int) -> list[tuple[torch.Tensor, ...]]:
    """Split every tensor of ``batch`` into ``parts`` micro-batches along dim 0."""
    if parts == 1:
        return [batch]
    size = batch[0].shape[0]
    if parts > size:
        raise ConfigError(f"hardware.grad_accum={parts} exceeds the batch size {size}")
    pieces = [torch.tensor_split(t, parts, dim=0) for t in batch]
    return [tuple(p[i] for p in pieces) for i in range(parts)]


def to_device(batch: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Move a batch to ``device`` (asynchronously from pinned memory where possible)."""
    return tuple(t.to(device, non_blocking=True) for t in batch)


def accumulate_gradients(task: Any, net: nn.Module, batch: tuple[torch.Tensor, ...], parts: int,
                         device: torch.device,
                         autocast: Any = contextlib.nullcontext) -> float:
    """Forward and backward ``batch`` in ``parts`` micro-batches; return the batch's mean loss.

    Each micro-batch's mean loss is weighted by its share of the batch's units (samples or
    tokens), so the accumulated gradient equals the gradient of the full-batch mean loss,
    also when the batch does not split evenly.
    """
    units = task.batch_units(batch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for micro in split_batch(batch, parts):
        weight = task.batch_units(micro) / units
        micro = to_device(micro, device)
        with autocast():
            loss, _ = task.loss(net, micro)
        (loss * weight).backward()
        loss_sum += loss.detach().double() * weight
    return loss_sum.item()  # one device sync per step; also feeds the divergence check


def params_finite(params: list[nn.Parameter]) -> bool:
    """Whether every parameter is free of NaN and inf (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory measurement for this run.

    On CPU the peak resident set size is per process; Linux lets us reset it
    (``/proc/self/clear_refs``), which matters when ``--multirun`` runs several runs in one
    process. Elsewhere the process-lifetime peak from ``resource`` is reported.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of the run in MiB: CUDA ``max_memory_allocated``, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else


def _better(metric: str, new: float, old: float) -> bool:
    return new > old if results.higher_is_better(metric) else new < old


def _target_metric(target: Mapping[str, Any], record: Mapping[str, Any]) -> str | None:
    """The evaluation-record key a task target refers to (``val_acc`` or ``acc`` → ``val_acc``)."""
    for key in (target["metric"], f"val_{target['metric']}"):
        if key in record:
            return key
    return None


def _build_task(task_cfg: Any, *, num_workers: int) -> Any:
    """``tasks.build_task``, imported on first use (tasks pull in torchvision/datasets)."""
    from tasks import build_task

    return build_task(task_cfg, num_workers=num_workers)


def _hydra_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job (``[]`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one run described by ``cfg`` and write its folder; return its summary.

    ``cfg`` is a composed, validated config (``ddc_bench.config.validate``). ``overrides``
    are recorded in the summary (default: the current Hydra job's overrides). Divergence
    is not an error: the run stops, its summary says ``status: diverged``, and this returns
    normally so a sweep goes on. Raises :class:`ddc_bench.results.RunExistsError` when the
    run folder already holds a finished run (nothing is touched then).
    """
    started_at = dt.datetime.now(dt.timezone.utc)
    wall_start = time.perf_counter()
    overrides = _hydra_overrides() if overrides is None else list(overrides)

    # ---- hardware -------------------------------------------------------------------
    hw = cfg.hardware
    device = resolve_device(hw.device)
    autocast_dtype = resolve_autocast(hw.autocast)
    for key, low in (("grad_accum", 1), ("threads", 0), ("num_workers", 0)):
        if hw[key] < low:
            raise ConfigError(f"invalid value for 'hardware.{key}': {hw[key]} (expected an int >= {low})")
    grad_accum = int(hw.grad_accum)
    # 0 restores torch's default, which matters when a sweep runs several runs in one process.
    torch.set_num_threads(int(hw.threads) or DEFAULT_THREADS)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: standard for fp32 training
        torch.backends.cudnn.allow_tf32 = True

    def autocast() -> contextlib.AbstractContextManager:  # a fresh context per use
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=autocast_dtype)

    # ---- task, model, optimizer, schedule ---------------------------------------------
    opt_cfg: dict[str, Any] = OmegaConf.to_container(cfg.optimizer, resolve=True)  # type: ignore[assignment]
    opt_name, lr, weight_decay = opt_cfg["name"], float(opt_cfg["lr"]), opt_cfg.get("weight_decay")
    variant = cfg.run_name or results.default_variant(lr)
    if cfg.task.get("size") is not None:
        # Refuse a finished run before the expensive setup (data loading); this raises
        # RunExistsError for a finished run and does nothing otherwise.
        folder = results.run_dir(cfg.results_dir, cfg.task.name, cfg.task.size, opt_name,
                                 variant, cfg.seed)
        if results.is_finished(folder):
            results.prepare_run_dir(folder)
    require_logger(cfg.logger)  # e.g. wandb missing: fail now, not after creating the folder

    seed_everything(cfg.seed)  # before build_model: the initialisation draws from torch's RNG
    try:
        task = _build_task(cfg.task, num_workers=int(hw.num_workers))
    except (ValueError, TypeError) as err:  # a bad task config value (e.g. task.size=huge)
        raise ConfigError(f"task={cfg.task.get('name')}: {err}") from err
    task_size = str(getattr(task, "size", None) or cfg.task.get("size"))
    steps = int(cfg.steps or task.steps)
    eval_every = int(cfg.eval_every or max(1, steps // 10))
    log_every = int(cfg.log_every)

    model = task.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        optimizer = build_optimizer(model, opt_cfg)  # from the plain model, before compiling
    except (ValueError, TypeError, KeyError) as err:  # a bad option (e.g. optimizer.lr=-1)
        raise ConfigError(f"optimizer={opt_name}: {err}") from err
    sched = cfg.schedule
    warmup = warmup_steps_for(steps, sched.warmup_fraction, sched.warmup_steps)
    schedule_args = dict(total_steps=steps, warmup_steps=warmup, kind=sched.kind,
                         min_lr_ratio=sched.min_lr_ratio)
    scheduler = build_scheduler(optimizer, **schedule_args)
    # The compiled module shares parameters with `model`; the optimizer keeps the plain one.
    net = torch.compile(model) if hw.compile else model

    # ---- run folder -------------------------------------------------------------------
    folder = results.run_dir(cfg.results_dir, task.name, task_size, opt_name, variant, cfg.seed)
    moved = results.prepare_run_dir(folder)  # raises RunExistsError for a finished run
    if moved is not None:
        print(f"[ddc-bench] moved the interrupted run found at {folder} to {moved}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    results.atomic_write_text(folder / results.CONFIG_FILE, OmegaConf.to_yaml(resolved))
    prov = provenance.collect(device, started_at)
    print(f"[ddc-bench] {task.name}-{task_size} {opt_name} {variant} seed={cfg.seed}: "
          f"{steps} steps on {prov['device']} -> {folder}")

    # ---- state of the run -------------------------------------------------------------
    steps_done = 0
    status = "finished"
    train_time = 0.0                          # seconds of training, evaluation excluded
    # Steady-state speed leaves out step 1, which pays one-time costs (lazy kernel setup,
    # torch.compile, cuDNN autotuning); train_time_s includes it (time-to-target is honest).
    steady = {"time": 0.0, "units": 0, "steps": 0}
    window = {"loss": 0.0, "n": 0, "units": 0, "time": 0.0}   # since the last training line
    last_eval: dict[str, float] = {}
    best: dict[str, float] = {}
    target = task.target
    target_hit: dict[str, Any] = {"step": None, "time_s": None}

    def evaluate() -> dict[str, float]:
        """Metrics on the fixed train subset and on held-out data, prefixed by split."""
        model.eval()
        with torch.no_grad(), autocast():
            train_m = task.evaluate(net, "train", device)
            val_m = task.evaluate(net, "val", device)
        model.train()
        record = {f"train_eval_{k}": float(v) for k, v in train_m.items()}
        record.update({f"val_{k}": float(v) for k, v in val_m.items()})
        if "loss" in train_m and "loss" in val_m:
            record["gap_loss"] = float(val_m["loss"]) - float(train_m["loss"])
        return record

    reset_peak_memory(device)
    batches: Iterator[tuple[torch.Tensor, ...]] = iter(task.train_batches(cfg.seed))
    logger = make_logger(cfg.logger, name=f"{opt_name}-{variant}-seed{cfg.seed}",
                         group=f"{task.name}-{task_size}", config=resolved, run_folder=folder)
    show_bar = bool(cfg.progress) and sys.stderr.isatty()
    summary: dict[str, Any] | None = None
    try:
        with results.MetricsWriter(folder) as metrics, \
                tqdm(total=steps, disable=not show_bar, dynamic_ncols=True,
                     desc=f"{opt_name} seed{cfg.seed}") as bar:

            def emit(record: dict[str, Any]) -> None:
                metrics.write(record)
                logger.log(record)

            model.train()
            for step in range(steps):
                # -- one optimizer step (timed) -------------------------------------------
                sync(device)
                t0 = time.perf_counter()
                batch = next(batches)
                units = task.batch_units(batch)
                loss_value = accumulate_gradients(task, net, batch, grad_accum, device, autocast)
                if not math.isfinite(loss_value):
                    status = "diverged"
                    bar.write(f"[ddc-bench] diverged: loss {loss_value} at step {step + 1}; stopping")
                    break
                if cfg.grad_clip:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps_done = step + 1
                if not params_finite(params):
                    status = "diverged"
                    bar.write(f"[ddc-bench] diverged: non-finite parameters after step {steps_done}; "
                              "stopping")
                    break
                sync(device)
                elapsed = time.perf_counter() - t0
                train_time += elapsed
                if steps_done > 1:
                    steady["time"] += elapsed
                    steady["units"] += units
                    steady["steps"] += 1
                window["loss"] += loss_value
                window["n"] += 1
                window["units"] += units
                window["time"] += elapsed
                bar.update(1)

                # -- logging and evaluation (not timed) -----------------------------------
                lr_now = lr * lr_factor(step, **schedule_args)  # the lr this step used
                if steps_done % log_every == 0 or steps_done == steps:
                    emit({"step": steps_done, "train_time_s": train_time, "lr": lr_now,
                          "loss": window["loss"] / window["n"],
                          "units_per_s": window["units"] / max(window["time"], 1e-12)})
                    bar.set_postfix(loss=f"{window['loss'] / window['n']:.4g}")
                    window = {"loss": 0.0, "n": 0, "units": 0, "time": 0.0}
                if steps_done % eval_every == 0 or steps_done == steps:
                    last_eval = evaluate()
                    emit({"step": steps_done, "train_time_s": train_time, "lr": lr_now,
                          **last_eval})
                    for key, value in last_eval.items():
                        if key == "gap_loss":  # a difference, not a score: no "best"
                            continue
                        if math.isfinite(value) and (key not in best or _better(key, value, best[key])):
                            best[key] = value
                    if target is not None and target_hit["step"] is None:
                        key = _target_metric(target, last_eval)
                        if key is None:  # a typo must not read as "never reached"
                            raise ConfigError(
                                f"task.target.metric={target['metric']!r} is not an evaluation "
                                f"metric of task {task.name} (have: {', '.join(last_eval)})")
                        value = last_eval[key]
                        reached = value >= target["value"] if target["mode"] == "max" else value <= target["value"]
                        if reached:
                            target_hit = {"step": steps_done, "time_s": train_time}

        # ---- summary ----------------------------------------------------------------------
        summary = {
            "task": task.name,
            "task_size": task_size,
            "optimizer": opt_name,
            "lr": lr,
            "weight_decay": weight_decay,
            "seed": int(cfg.seed),
            "variant": variant,
            "steps": steps,
            "steps_done": steps_done,
            "status": status,
            "diverged": status == "diverged",
            "final": last_eval,
            "best": best,
            "target": None if target is None else {
                "metric": target["metric"], "value": target["value"], **target_hit},
            "wall_time_s": time.perf_counter() - wall_start,
            "train_time_s": train_time,
            "step_time_ms": 1000 * steady["time"] / steady["steps"] if steady["steps"] else None,
            "units_per_s": steady["units"] / steady["time"] if steady["time"] > 0 else None,
            "unit": task.unit_name,
            "peak_memory_mb": peak_memory_mb(device),
            "overrides": overrides,
            "provenance": prov,
            "task_info": task.describe(),
            "hardware": {"device": str(device), "autocast": hw.autocast,
                         "compile": bool(hw.compile), "grad_accum": grad_accum,
                         "threads": torch.get_num_threads()},
        }
        results.write_json(folder / results.SUMMARY_FILE, summary)
    finally:
        logger.finish(summary)  # summary is None when the run raised

    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in last_eval.items()) or "(no evaluation)"
    print(f"[ddc-bench] {status} {folder}: steps={steps_done}/{steps} "
          f"train_time={train_time:.1f}s {shown}")
    return summary
