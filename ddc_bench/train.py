"""The training loop, readable top to bottom (nanoGPT style): :func:`run`.

``run(cfg)`` trains one (task, optimizer, seed) combination described by a composed config
(see ``configs/config.yaml``) and writes its run folder through :mod:`ddc_bench.results`.
It has four parts, in this order:

1. **Plan** (:func:`ddc_bench.plan.make_plan`): every config value resolved and checked,
   before any data, model or folder exists.
2. **Set-up**: the task, model, optimizer and LR schedule, together the
   :class:`~ddc_bench.state.RunState`; DDC's gauge declarations are verified on the first
   batch. Then the run folder: locked (:class:`~ddc_bench.results.RunLock`), and either
   skipped (already finished with this config), resumed (it holds a checkpoint) or
   started afresh (leftovers of an interrupted run without checkpoint are moved aside).
3. **Steps**: per optimizer step, :func:`train_step`: fetch the next batch, forward and
   backward it in ``hardware.grad_accum`` micro-batches (DDP synchronises gradients on the
   last one), stop as *diverged* on a non-finite loss, clip, step the optimizer and the
   schedule, stop as *diverged* on non-finite parameters. Then :func:`after_step`, the one
   place where logging, evaluation, hooks and checkpointing happen.
4. **Summary** (:class:`ddc_bench.results.Summary`), written last: the run is finished.

SIGTERM and SIGINT (what Slurm and Ctrl-C send) are caught: at the next step boundary the
run writes a checkpoint, prints where and how to resume, and :class:`Preempted` is raised
(the command exits with :data:`EXIT_PREEMPTED`). Only step work counts as training time
(``train_time_s``; evaluation, logging and checkpoints are excluded, CUDA is synchronized
before each clock read); ``step_time_ms`` and ``units_per_s`` are steady-state (each
session's first step, which pays one-time costs such as ``torch.compile``, is left out).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.util
import logging
import math
import os
import random
import re
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from ddc_bench import checkpoint, distributed, provenance, results
from ddc_bench.config import ConfigError
from ddc_bench.loggers import make_logger, require_logger
from ddc_bench.optimizers import DDC_NAMES, build_optimizer
from ddc_bench.plan import (DEFAULT_THREADS, RunPlan, TaskSpec, diff_keys, fingerprint,
                            make_plan, resolve_threads, task_spec)
from ddc_bench.schedule import build_scheduler, lr_factor
from ddc_bench.state import RunState

__all__ = ["run", "Preempted", "AlreadyFinished", "EXIT_PREEMPTED", "StepHook", "DEFAULT_THREADS"]

#: Exit status of a run stopped by SIGTERM/SIGINT after writing its checkpoint
#: (``EX_TEMPFAIL``: "try again later", which is what resuming does).
EXIT_PREEMPTED = 75

#: A hook called at every training-log and evaluation record, on rank 0, as
#: ``hook(state, step, record)`` before the record is written: it may add keys to
#: ``record`` (they go to ``metrics.jsonl``, and from evaluation records into the
#: summary's ``final`` and ``best``, except ``diag/...`` keys). This is where diagnostics plug
#: in (:mod:`ddc_bench.diagnose`, on with ``diagnostics.every``).
StepHook = Callable[["RunState", int, dict[str, Any]], None]

#: Test hook: the run sends itself SIGTERM (a real signal) after this many steps.
SIGNAL_AT_STEP_ENV = "DDC_BENCH_SIGNAL_AT_STEP"


class Preempted(Exception):
    """The run was stopped by a signal after writing a checkpoint (one-line message)."""


class AlreadyFinished(results.RunExistsError):
    """The run folder already holds this run, finished with the same config: nothing to do."""


# --------------------------------------------------------------------------------------
# Small helpers (seeding, batches, memory, clocks, signals)
# --------------------------------------------------------------------------------------

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
                         device: torch.device, autocast: Any = contextlib.nullcontext,
                         no_sync: Callable[[], contextlib.AbstractContextManager] | None = None) -> float:
    """Forward and backward ``batch`` in ``parts`` micro-batches; return the batch's mean loss.

    Each micro-batch's mean loss is weighted by its share of the batch's units (samples or
    tokens), so the accumulated gradient equals the gradient of the full-batch mean loss,
    also when the batch does not split evenly. ``no_sync`` (DDP's ``net.no_sync``) wraps
    every micro-batch but the last, so gradients are all-reduced once per step.
    """
    units = task.batch_units(batch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    micros = split_batch(batch, parts)
    for i, micro in enumerate(micros):
        weight = task.batch_units(micro) / units
        micro = to_device(micro, device)
        skip_sync = no_sync() if no_sync is not None and i < len(micros) - 1 else contextlib.nullcontext()
        with skip_sync:
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


def _build_task(task_cfg: Any, *, num_workers: int) -> Any:
    """``tasks.build_task``, imported on first use (tasks pull in torchvision/datasets)."""
    from tasks import build_task

    return build_task(task_cfg, num_workers=num_workers)


def _task_spec(task_cfg: Any) -> TaskSpec:
    """The plan's view of the task (a seam the tests replace along with ``_build_task``)."""
    return task_spec(task_cfg)


def _hydra_overrides() -> list[str]:
    """The command-line overrides of the current Hydra job (``[]`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _missing_dirs(paths: Sequence[Any]) -> list[Path]:
    """The topmost not-yet-existing folder of each path (what a failed build may leave)."""
    out = []
    for p in paths:
        if not p:
            continue
        path = Path(str(p)).expanduser().absolute()
        top = None
        while not path.exists() and path.parent != path:
            top, path = path, path.parent
        if top is not None:
            out.append(top)
    return out


def _remove_empty_tree(top: Path) -> None:
    """Remove ``top`` if it holds nothing but empty folders (never a file)."""
    if not top.is_dir():
        return
    for folder in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def build_task_cleanly(task_cfg: Any, num_workers: int) -> Any:
    """Build the task; a bad value or an unreachable download becomes one
    :class:`ConfigError` line, and data folders the failed build created empty are removed."""
    data = task_cfg.get("data") or {}
    created = _missing_dirs([data.get("root"), data.get("cache_dir")])
    # huggingface_hub logs every retry of an unreachable Hub; the failure is reported below.
    # (Imported first: their imports set the level themselves.)
    if data.get("source") == "hub":
        for name in ("huggingface_hub", "datasets"):
            if importlib.util.find_spec(name) is not None:
                importlib.import_module(name)
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        return _build_task(task_cfg, num_workers=num_workers)
    except (ValueError, TypeError) as err:  # a bad task config value (e.g. task.size=huge)
        raise ConfigError(f"task={task_cfg.get('name')}: {_first_line(err)}") from None
    except FileNotFoundError:
        raise
    except OSError as err:  # URLError, ConnectionError, ...: no network or no access
        raise ConfigError(
            f"task={task_cfg.get('name')}: could not fetch the data ({_first_line(err)}); "
            f"check the network, or use data that is already on disk") from None
    except BaseException:
        for top in created:
            _remove_empty_tree(top)
        raise
    finally:
        hub_log.setLevel(level)
        for top in created:  # also after the errors converted above
            if top.exists() and not any(p.is_file() for p in top.rglob("*")):
                _remove_empty_tree(top)


class StopSignals:
    """Catches SIGTERM and SIGINT while a run trains: the first one is recorded in
    :attr:`received` (the loop stops at the next step boundary, with a checkpoint); a
    second one stops the process at once (exit status :data:`EXIT_PREEMPTED`). Handlers can
    only be installed in the main thread; elsewhere this does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            print(f"[ddc-bench] second {name}: stopping now, without a checkpoint", file=sys.stderr,
                  flush=True)
            os._exit(EXIT_PREEMPTED)
        self.received = name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------

def run(cfg: DictConfig, overrides: list[str] | None = None,
        hooks: Sequence[StepHook] = ()) -> results.Summary:
    """Train one run described by ``cfg`` and write its folder; return its summary.

    ``cfg`` is a composed, validated config (``ddc_bench.config.validate``). ``overrides``
    are recorded in the summary and name the run's variant folder (default: the current
    Hydra job's overrides). ``hooks``: see :data:`StepHook`. Divergence is not an error:
    the run stops, its summary says ``status: diverged``, and this returns normally so a
    sweep goes on. Raises :class:`AlreadyFinished` when the folder already holds this run
    finished (nothing is touched), :class:`ddc_bench.results.RunExistsError` when it holds
    a finished run of another config, :class:`ddc_bench.results.RunLockedError` when
    another process owns it, and :class:`Preempted` after SIGTERM/SIGINT.
    """
    started_at = dt.datetime.now(dt.timezone.utc)
    wall_start = time.perf_counter()
    overrides = _hydra_overrides() if overrides is None else list(overrides)

    # ---- 1. plan: every config error now, before anything is built ---------------------
    plan = make_plan(cfg, overrides, spec=_task_spec(cfg.task))
    if plan.lr == 0:
        print(f"[ddc-bench] warning: the learning rate is 0 (optimizer.lr={plan.base_lr:g}, "
              f"lr_mult={plan.lr_mult:g}): the parameters will not change", file=sys.stderr)
    if results.is_finished(plan.folder):
        _refuse_finished(plan)  # before the expensive set-up (read-only: every rank may check)
    require_logger(plan.logger_cfg)  # e.g. wandb missing: fail now, not after creating the folder

    distributed.init(plan.world, plan.device, plan.ddp_timeout_s)
    try:
        return _train(plan, hooks, started_at, wall_start)
    finally:
        distributed.shutdown()


def _refuse_finished(plan: RunPlan) -> None:
    """Raise :class:`AlreadyFinished` (same config) or ``RunExistsError`` (another one)."""
    config_file = plan.folder / results.CONFIG_FILE
    try:
        old = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    except Exception:  # noqa: BLE001 - an unreadable config cannot be compared
        old = None
    new = fingerprint(plan)
    if not isinstance(old, dict):
        raise results.RunExistsError(
            f"{plan.folder} already holds a finished run whose {results.CONFIG_FILE} cannot be "
            f"read; choose another results_dir or run_name (finished runs are never overwritten)")
    differ = diff_keys({k: v for k, v in old.items() if k in new}, new)
    if not differ:
        raise AlreadyFinished(f"{plan.folder} already holds this run, finished; skipped "
                              f"(finished runs are never overwritten)")
    raise results.RunExistsError(
        f"{plan.folder} already holds a finished run of another config (differs in "
        f"{', '.join(differ[:5])}); choose another results_dir or run_name (finished runs "
        f"are never overwritten)")


def _train(plan: RunPlan, hooks: Sequence[StepHook], started_at: dt.datetime,
           wall_start: float) -> results.Summary:
    world, device = plan.world, plan.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls: standard for fp32 training
        torch.backends.cudnn.allow_tf32 = True

    def autocast() -> contextlib.AbstractContextManager:  # a fresh context per use
        if plan.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=plan.autocast_dtype)

    # ---- 2. set-up: task, model, optimizer, schedule ----------------------------------
    seed_everything(plan.seed)  # before build_model: the initialisation draws from torch's RNG
    task = build_task_cleanly(plan.cfg.task, plan.num_workers)
    model = task.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    threads = resolve_threads(plan.threads_setting, sum(p.numel() for p in params))
    torch.set_num_threads(threads)  # also restores the default between runs of one sweep
    try:
        optimizer = build_optimizer(model, {"name": plan.optimizer_name, **plan.optimizer_options})
    except (ValueError, TypeError, KeyError) as err:  # a bad option (e.g. optimizer.lr=-1)
        raise ConfigError(f"optimizer={plan.optimizer_name}: {_first_line(err)}") from None
    scheduler = build_scheduler(optimizer, **plan.schedule)
    state = RunState(model, optimizer, scheduler)
    if plan.optimizer_name in DDC_NAMES:
        _verify_gauges(plan, task, model)
    # DDP wraps the module for forward/backward; the optimizer and checkpoints use `model`.
    net: nn.Module = model
    if world.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if plan.compile else net

    # ---- the run folder: lock, then resume or start afresh -------------------------------
    # Rank 0 decides; its decision, or its error, reaches every rank (none waits forever).
    lock: results.RunLock | None = None
    mode: Any = None
    if world.main:
        try:
            lock = results.RunLock(plan.folder).acquire()
            mode = _open_run_folder(plan)
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            mode = err
    mode = distributed.broadcast(world, mode)
    if isinstance(mode, BaseException):
        if lock is not None:
            lock.release()
        raise mode
    logger = None
    summary: results.Summary | None = None
    try:
        metrics_offset = None
        if mode == "resume":
            payload, path = checkpoint.load(plan.folder)
            _check_resumable(plan, payload, path)
            state.restore(payload)
            state.progress.resumed_from.append(state.progress.step)
            metrics_offset = payload["metrics_offset"]
            if world.main:
                print(f"[ddc-bench] resuming {plan.folder} from step {state.progress.step} ({path.name})")
        prov = provenance.collect(device, started_at)
        if world.main:
            print(f"[ddc-bench] {plan.task.name}-{plan.task.size} {plan.optimizer_name} {plan.variant} "
                  f"seed={plan.seed}: {plan.steps} steps on {prov['device']}, threads={threads}"
                  + (f", {world.size} DDP processes" if world.active else "")
                  + f" -> {plan.folder}")
            logger = make_logger(plan.logger_cfg, name=f"{plan.optimizer_name}-{plan.variant}-seed{plan.seed}",
                                 group=f"{plan.task.name}-{plan.task.size}", config=plan.resolved,
                                 run_folder=plan.folder)

        # Wall time over every session of the run (a resumed run adds to its old total).
        wall_base = state.progress.wall_time

        def wall_clock() -> float:
            return wall_base + time.perf_counter() - wall_start

        # Dead-direction diagnostics (diagnostics.every > 0): one more hook, rank 0 only.
        diag_hook = None
        if plan.diagnostics_every and world.main:
            from ddc_bench.diagnose import DiagnosticsHook, probe_batch

            diag_hook = DiagnosticsHook(plan.diagnostics_every,
                                        probe_batch(task, plan.probe_batch, device),
                                        total=plan.steps, start=state.progress.step)
            hooks = [*hooks, diag_hook]

        # ---- 3. steps ---------------------------------------------------------------------
        reset_peak_memory(device)
        with contextlib.ExitStack() as stack:
            metrics = (stack.enter_context(results.MetricsWriter(plan.folder, truncate_to=metrics_offset))
                       if world.main else None)
            stop = stack.enter_context(StopSignals())
            show_bar = plan.progress and world.main and sys.stderr.isatty()
            bar = stack.enter_context(tqdm(total=plan.steps, initial=state.progress.step,
                                           disable=not show_bar, dynamic_ncols=True,
                                           desc=f"{plan.optimizer_name} seed{plan.seed}"))
            _loop(plan, state, task, net, params, autocast, metrics, logger, hooks, stop, bar,
                  wall_clock)

        # ---- 4. summary -----------------------------------------------------------------
        identical = distributed.replicas_identical(world, model)
        if world.main:
            summary = _summary(plan, state, task, prov, threads, identical, wall_clock(),
                               None if diag_hook is None else diag_hook.last)
            results.write_json(plan.folder / results.SUMMARY_FILE, summary)
        distributed.barrier(world)
    finally:
        if logger is not None:
            logger.finish(summary)  # summary is None when the run raised
        if lock is not None:
            lock.release()

    p = state.progress
    if world.main:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in p.last_eval.items()) or "(no evaluation)"
        print(f"[ddc-bench] {p.status} {plan.folder}: steps={p.step}/{plan.steps} "
              f"train_time={p.train_time:.1f}s {shown}")
    return summary  # type: ignore[return-value]  # rank 0's; None on the other ranks


def _open_run_folder(plan: RunPlan) -> str:
    """Rank 0, holding the lock: ``"resume"`` when the folder holds a checkpoint (and
    ``resume`` is not false), else ``"fresh"`` after preparing an empty folder (moving an
    interrupted run aside). Raises for a finished run or when ``resume=true`` finds no
    checkpoint."""
    folder = plan.folder
    if results.is_finished(folder):  # finished while we were setting up
        _refuse_finished(plan)
    if folder.is_dir():
        checkpoint.remove_partial(folder)
    if plan.resume is not False and results.has_checkpoint(folder):
        return "resume"
    if plan.resume is True:
        raise checkpoint.CheckpointError(
            f"resume=true but {folder} holds no checkpoint to resume from; drop resume=true "
            f"to start the run")
    moved = results.prepare_run_dir(folder)
    if moved is not None:
        print(f"[ddc-bench] moved the interrupted run found at {folder} to {moved}")
    results.atomic_write_text(folder / results.CONFIG_FILE, OmegaConf.to_yaml(plan.resolved))
    return "fresh"


def _check_resumable(plan: RunPlan, payload: dict[str, Any], path: Path) -> None:
    """A checkpoint must belong to this config: resuming another would mix two runs."""
    differ = diff_keys(payload["fingerprint"], fingerprint(plan))
    if differ:
        raise checkpoint.CheckpointError(
            f"checkpoint {path} was written by a different config (differs in "
            f"{', '.join(differ[:5])}); run with the original values, or resume=false to "
            f"start afresh (the old folder is moved aside)")


def _verify_gauges(plan: RunPlan, task: Any, model: nn.Module) -> None:
    """DDC relies on the model's declared gauges being exact symmetries: check them on the
    first training batch (a separate stream; the run's RNG is left untouched)."""
    from ddc import verify_gauges
    from ddc.verify import GaugeDeclarationError

    with torch.random.fork_rng(devices=[plan.device] if plan.device.type == "cuda" else []):
        batch = next(iter(task.train_batches(plan.seed, rank=plan.world.rank,
                                             world_size=plan.world.size)))
        try:
            verify_gauges(model, lambda m, b: task.loss(m, b)[0], to_device(batch, plan.device))
        except GaugeDeclarationError as err:
            raise ConfigError(f"optimizer={plan.optimizer_name}: the model of task {plan.task.name} "
                              f"declares a gauge that is not an exact symmetry: {_first_line(err)}") from None


def train_step(plan: RunPlan, state: RunState, task: Any, net: nn.Module,
               params: list[nn.Parameter], batch: tuple[torch.Tensor, ...], autocast: Any) -> float:
    """One optimizer step on ``batch``; returns the batch's mean loss (averaged over ranks).

    Returns a non-finite loss without stepping when the loss is NaN/inf; the caller also
    checks the parameters afterwards.
    """
    no_sync = getattr(net, "no_sync", None) if plan.world.active else None
    loss_value = accumulate_gradients(task, net, batch, plan.grad_accum, plan.device, autocast,
                                      no_sync=no_sync)
    loss_value = distributed.mean(plan.world, loss_value, plan.device)
    if not math.isfinite(loss_value):
        return loss_value
    if plan.grad_clip:
        clip = getattr(state.optimizer, "clip_grad_norm_", None)
        if callable(clip):  # an optimizer that clips in its own frame (DDC)
            clip(plan.grad_clip)
        else:
            nn.utils.clip_grad_norm_(params, plan.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return loss_value


def _loop(plan: RunPlan, state: RunState, task: Any, net: nn.Module, params: list[nn.Parameter],
          autocast: Any, metrics: results.MetricsWriter | None, logger: Any,
          hooks: Sequence[StepHook], stop: StopSignals, bar: Any,
          wall_clock: Callable[[], float]) -> None:
    """Steps from ``state.progress.step`` to ``plan.steps`` (or divergence, or a signal)."""
    world, device, p = plan.world, plan.device, state.progress
    batches: Iterator[tuple[torch.Tensor, ...]] = iter(task.train_batches(
        plan.seed, start=p.step, rank=world.rank, world_size=world.size))
    signal_at = int(os.environ.get(SIGNAL_AT_STEP_ENV, "0") or 0)

    def emit(record: dict[str, Any]) -> None:
        for hook in hooks:
            hook(state, p.step, record)
        metrics.write(record)
        logger.log(record)

    def save() -> Path | None:
        if not world.main:
            return None
        p.wall_time = wall_clock()
        return checkpoint.save(plan.folder, {**state.payload(), "fingerprint": fingerprint(plan),
                                             "metrics_offset": metrics.offset()})

    net.train()
    session_steps = 0
    while p.step < plan.steps:
        if distributed.any_rank(world, stop.received is not None, device):
            path = save()
            distributed.barrier(world)
            signame = stop.received or "a signal on another rank"
            raise Preempted(
                f"stopped by {signame} at step {p.step}/{plan.steps}; checkpoint "
                f"{path or plan.folder}; run the same command again to resume (resume=auto)")
        # -- one optimizer step (timed) -------------------------------------------------
        sync(device)
        t0 = time.perf_counter()
        batch = next(batches)
        units = task.batch_units(batch) * world.size
        try:
            loss_value = train_step(plan, state, task, net, params, batch, autocast)
        except RuntimeError as err:  # DDP's gradient all-reduce failing: a rank is gone
            if world.active and distributed.is_communication_error(err):
                raise distributed.lost_contact(world, err) from None
            raise
        if not math.isfinite(loss_value):
            p.status = "diverged"
            bar.write(f"[ddc-bench] diverged: loss {loss_value} at step {p.step + 1}; stopping")
            break
        p.step += 1
        if not params_finite(params):
            p.status = "diverged"
            bar.write(f"[ddc-bench] diverged: non-finite parameters after step {p.step}; stopping")
            break
        sync(device)
        elapsed = time.perf_counter() - t0
        p.train_time += elapsed
        session_steps += 1
        if session_steps > 1:
            p.steady_time += elapsed
            p.steady_units += units
            p.steady_steps += 1
        p.window_loss += loss_value
        p.window_n += 1
        p.window_units += units
        p.window_time += elapsed
        bar.update(1)
        # -- everything else (not timed) ------------------------------------------------
        if world.main:
            after_step(plan, state, task, net, autocast, emit, bar)
        if plan.checkpoint_every and p.step % plan.checkpoint_every == 0 and p.step < plan.steps:
            save()
        if signal_at and p.step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
    if p.status == "running":
        p.status = "finished"
        save()  # the final state: the finished run's weights stay with its results


def after_step(plan: RunPlan, state: RunState, task: Any, net: nn.Module, autocast: Any,
               emit: Callable[[dict[str, Any]], None], bar: Any) -> None:
    """Rank 0's work after a step: the training line every ``log_every`` steps and the
    evaluation every ``eval_every`` steps (and both at the last step), each passed through
    the hooks and written; best metrics and the target are updated from evaluations."""
    p = state.progress
    step = p.step
    lr_now = plan.lr * lr_factor(step - 1, **plan.schedule)  # the lr this step used
    if step % plan.log_every == 0 or step == plan.steps:
        emit({"step": step, "train_time_s": p.train_time, "lr": lr_now,
              "loss": p.window_loss / p.window_n,
              "units_per_s": p.window_units / max(p.window_time, 1e-12)})
        bar.set_postfix(loss=f"{p.window_loss / p.window_n:.4g}")
        p.reset_window()
    if step % plan.eval_every == 0 or step == plan.steps:
        record = {"step": step, "train_time_s": p.train_time, "lr": lr_now,
                  **evaluate(task, state.model, plan.device, autocast)}
        emit(record)
        # Diagnostics readings (diag/...) are logged, but are not scores: no final/best.
        p.last_eval = {k: v for k, v in record.items()
                       if k not in ("step", "train_time_s", "lr") and not k.startswith("diag/")}
        for key, value in p.last_eval.items():
            if key == "gap_loss":  # a difference, not a score: no "best"
                continue
            if isinstance(value, (int, float)) and math.isfinite(value) \
                    and (key not in p.best or _better(key, value, p.best[key])):
                p.best[key] = value
        target = plan.task.target
        if target is not None and p.target_step is None and plan.target_key in p.last_eval:
            value = p.last_eval[plan.target_key]
            reached = value >= target["value"] if target["mode"] == "max" else value <= target["value"]
            if reached:
                p.target_step, p.target_time = step, p.train_time


def evaluate(task: Any, model: nn.Module, device: torch.device, autocast: Any) -> dict[str, float]:
    """Metrics on the fixed train subset and on held-out data, prefixed by split (the plain
    module: under DDP only rank 0 evaluates, outside any collective)."""
    model.eval()
    with torch.no_grad(), autocast():
        train_m = task.evaluate(model, "train", device)
        val_m = task.evaluate(model, "val", device)
    model.train()
    record = {f"train_eval_{k}": float(v) for k, v in train_m.items()}
    record.update({f"val_{k}": float(v) for k, v in val_m.items()})
    if "loss" in train_m and "loss" in val_m:
        record["gap_loss"] = float(val_m["loss"]) - float(train_m["loss"])
    return record


def _summary(plan: RunPlan, state: RunState, task: Any, prov: dict[str, Any], threads: int,
             identical: bool | None, wall_time: float,
             diagnostics: dict[str, float] | None = None) -> results.Summary:
    p, target = state.progress, plan.task.target
    return results.Summary(
        task=plan.task.name, task_size=plan.task.size, optimizer=plan.optimizer_name,
        lr=plan.lr, base_lr=plan.base_lr, lr_mult=plan.lr_mult, weight_decay=plan.weight_decay,
        seed=plan.seed, variant=plan.variant, variant_keys=plan.variant_keys, steps=plan.steps,
        steps_done=p.step, status=p.status, diverged=p.status == "diverged",
        final=p.last_eval, best=p.best,
        target=None if target is None else results.Target(
            metric=target["metric"], value=target["value"], step=p.target_step,
            time_s=p.target_time),
        wall_time_s=wall_time, train_time_s=p.train_time,
        step_time_ms=1000 * p.steady_time / p.steady_steps if p.steady_steps else None,
        units_per_s=p.steady_units / p.steady_time if p.steady_time > 0 else None,
        unit=task.unit_name, peak_memory_mb=peak_memory_mb(plan.device),
        overrides=plan.overrides, resumed_from=p.resumed_from, diagnostics=diagnostics,
        provenance=prov,  # type: ignore[typeddict-item]
        task_info=task.describe(),
        hardware=results.Hardware(
            device=str(plan.device), autocast=plan.cfg.hardware.autocast,
            compile=plan.compile, grad_accum=plan.grad_accum, threads=threads,
            world_size=plan.world.size, replicas_identical=identical),
    )
