"""The training loop, readable top to bottom (nanoGPT style): :func:`run`.

``run(cfg)`` trains one (task, optimizer, seed) combination described by a composed config
(see ``configs/config.yaml``) and writes its run folder through :mod:`ddc_bench.results`.
It has four parts, in this order:

1. **Plan** (:func:`ddc_bench.plan.make_plan`): every config value resolved and checked,
   before any data, model or folder exists.
2. **Set-up**: the task, model, optimizer (a
   :class:`~ddc_bench.training_optimizer.TrainingOptimizer`: the optimizer plus what the
   loop must do for it) and LR schedule, together the :class:`~ddc_bench.state.RunState`;
   the optimizer's start-up check runs on the first batch. Then the run folder: locked
   (:class:`~ddc_bench.results.RunLock`), and either skipped (already finished with this
   config), resumed (it holds a checkpoint) or started afresh (leftovers of an interrupted
   run without checkpoint are moved aside).
3. **Steps** (:func:`train_loop`): per optimizer step, :func:`train_step`: fetch the next
   batch, forward and backward it in ``hardware.grad_accum`` micro-batches (DDP
   synchronises gradients on the last one), stop as *diverged* on a non-finite loss, clip,
   step the optimizer and the schedule, stop as *diverged* on non-finite parameters. Then
   :func:`after_step`, rank 0's logging, evaluation and hooks, and the checkpoint.
4. **Summary** (:class:`ddc_bench.results.Summary`), written last: the run is finished.

The loop names no optimizer: everything optimizer-specific comes from the
``TrainingOptimizer`` fields. SIGTERM and SIGINT are caught (:mod:`ddc_bench.signals`): at
the next step boundary the run writes a checkpoint and :class:`Preempted` is raised. Only
step work counts as training time (``train_time_s``; evaluation, logging and checkpoints
are excluded, CUDA is synchronized before each clock read); ``step_time_ms`` and
``units_per_s`` are steady-state (each session's first step, which pays one-time costs
such as ``torch.compile``, is left out).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import random
import sys
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
from ddc_bench.memory import peak_memory_mb, reset_peak_memory
from ddc_bench.optimizers import build_optimizer
from ddc_bench.plan import (DEFAULT_THREADS, RunPlan, TaskSpec, diff_keys, fingerprint,
                            make_plan, resolve_threads, task_spec)
from ddc_bench.schedule import build_scheduler, lr_factor
from ddc_bench.signals import EXIT_PREEMPTED, Preempted, StopSignals
from ddc_bench.state import RunState
from ddc_bench.task_setup import build_task_cleanly, first_line
from ddc_bench.training_optimizer import TrainingOptimizer, forward_context

__all__ = ["run", "Preempted", "AlreadyFinished", "EXIT_PREEMPTED", "StepHook", "DEFAULT_THREADS"]

#: A hook called at every training-log and evaluation record, on rank 0, as
#: ``hook(state, step, record)`` before the record is written: it may add keys to
#: ``record`` (they go to ``metrics.jsonl``, and from evaluation records into the
#: summary's ``final`` and ``best``, except ``diag/...`` keys). This is where diagnostics plug
#: in (:mod:`ddc_bench.diagnose`, on with ``diagnostics.every``).
StepHook = Callable[["RunState", int, dict[str, Any]], None]


class AlreadyFinished(results.RunExistsError):
    """The run folder already holds this run, finished with the same config: nothing to do."""


# --------------------------------------------------------------------------------------
# Small helpers (seeding, batches, clocks)
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
                         no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
                         create_graph: bool = False) -> float:
    """Forward and backward ``batch`` in ``parts`` micro-batches; return the batch's mean loss.

    Each micro-batch's mean loss is weighted by its share of the batch's units (samples or
    tokens), so the accumulated gradient equals the gradient of the full-batch mean loss,
    also when the batch does not split evenly. ``no_sync`` (DDP's ``net.no_sync``) wraps
    every micro-batch but the last, so gradients are all-reduced once per step.
    ``create_graph`` keeps the backward graph (optimizers that read second derivatives).
    """
    units = task.batch_units(batch)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    micros = split_batch(batch, parts)
    for i, micro in enumerate(micros):
        weight = task.batch_units(micro) / units
        micro = to_device(micro, device)
        skip_sync = no_sync() if no_sync is not None and i < len(micros) - 1 else contextlib.nullcontext()
        with skip_sync:
            with autocast(), forward_context(create_graph):
                loss, _ = task.loss(net, micro)
            (loss * weight).backward(create_graph=create_graph)
        loss_sum += loss.detach().double() * weight
    return loss_sum.item()  # one device sync per step; also feeds the divergence check


def params_finite(params: list[nn.Parameter]) -> bool:
    """Whether every parameter is free of NaN and inf (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    task = build_task_cleanly(plan.resolved["task"], plan.num_workers, build=_build_task)
    model = task.build_model().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    threads = resolve_threads(plan.threads_setting, sum(p.numel() for p in params))
    torch.set_num_threads(threads)  # also restores the default between runs of one sweep
    try:
        training = build_optimizer(model, {"name": plan.optimizer_name, **plan.optimizer_options},
                                   loss_fn=lambda m, b: task.loss(m, b)[0])
    except (ValueError, TypeError, KeyError) as err:  # a bad option (e.g. optimizer.lr=-1)
        raise ConfigError(f"optimizer={plan.optimizer_name}: {first_line(err)}") from None
    # An optimizer that schedules itself gets a constant schedule that is never stepped (the
    # checkpoint format stays one).
    schedule = plan.schedule if training.external_schedule else {
        **plan.schedule, "warmup_steps": 0, "kind": "constant"}
    state = RunState(model, training.optimizer, build_scheduler(training.optimizer, **schedule))
    if training.startup_check is not None:
        _startup_check(plan, task, model, training.startup_check)
    # DDP wraps the module for forward/backward; the optimizer and checkpoints use `model`.
    net: nn.Module = model
    if world.active:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if plan.compile else net

    # ---- the run folder: lock, then resume or start afresh -------------------------------
    logger = None
    summary: results.Summary | None = None
    with _locked_run_folder(plan) as mode:
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

            # ---- 3. steps -----------------------------------------------------------------
            reset_peak_memory(device)
            with contextlib.ExitStack() as stack:
                metrics = (stack.enter_context(results.MetricsWriter(plan.folder, truncate_to=metrics_offset))
                           if world.main else None)
                stop = stack.enter_context(StopSignals())
                show_bar = plan.progress and world.main and sys.stderr.isatty()
                bar = stack.enter_context(tqdm(total=plan.steps, initial=state.progress.step,
                                               disable=not show_bar, dynamic_ncols=True,
                                               desc=f"{plan.optimizer_name} seed{plan.seed}"))
                train_loop(plan, state, training, task, net, params, autocast, metrics, logger,
                           hooks, stop, bar, wall_clock)

            # ---- 4. summary ---------------------------------------------------------------
            identical = distributed.replicas_identical(world, model)
            if world.main:
                summary = _summary(plan, state, task, prov, threads, identical, wall_clock(),
                                   None if diag_hook is None else diag_hook.last)
                results.write_json(plan.folder / results.SUMMARY_FILE, summary)
            distributed.barrier(world)
        finally:
            if logger is not None:
                logger.finish(summary)  # summary is None when the run raised

    p = state.progress
    if world.main:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in p.last_eval.items()) or "(no evaluation)"
        print(f"[ddc-bench] {p.status} {plan.folder}: steps={p.step}/{plan.steps} "
              f"train_time={p.train_time:.1f}s {shown}")
    return summary  # type: ignore[return-value]  # rank 0's; None on the other ranks


def _startup_check(plan: RunPlan, task: Any, model: nn.Module,
                   check: Callable[[nn.Module, tuple], None]) -> None:
    """The optimizer's start-up check on the first training batch (a separate stream: the
    run's RNG is left untouched); its refusal becomes one line naming the optimizer."""
    with torch.random.fork_rng(devices=[plan.device] if plan.device.type == "cuda" else []):
        batch = next(iter(task.train_batches(plan.seed, rank=plan.world.rank,
                                             world_size=plan.world.size)))
        try:
            check(model, to_device(batch, plan.device))
        except ConfigError as err:
            raise ConfigError(f"optimizer={plan.optimizer_name}, task={plan.task.name}: "
                              f"{first_line(err)}") from None


@contextlib.contextmanager
def _locked_run_folder(plan: RunPlan) -> Iterator[str]:
    """Rank 0 locks the run folder and opens it (:func:`_open_run_folder`); its decision,
    ``"resume"`` or ``"fresh"``, or its error, reaches every rank (none waits forever).
    The lock is released however the block ends (a signal during set-up included)."""
    lock: results.RunLock | None = None
    try:
        mode: Any = None
        if plan.world.main:
            try:
                lock = results.RunLock(plan.folder).acquire()
                mode = _open_run_folder(plan)
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                mode = err
        mode = distributed.broadcast(plan.world, mode)
        if isinstance(mode, BaseException):
            raise mode
        yield mode
    finally:
        if lock is not None:
            lock.release()


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


def train_step(plan: RunPlan, state: RunState, training: TrainingOptimizer, task: Any,
               net: nn.Module, params: list[nn.Parameter], batch: tuple[torch.Tensor, ...],
               autocast: Any) -> float:
    """One optimizer step on ``batch``; returns the batch's mean loss (averaged over ranks).

    Returns a non-finite loss without stepping when the loss is NaN/inf; the caller also
    checks the parameters afterwards. With ``training.needs_closure`` the optimizer gets a
    closure that zeroes the gradients and recomputes loss and gradients on the same batch.
    """
    no_sync = getattr(net, "no_sync", None) if plan.world.active else None

    def forward_backward() -> float:
        return accumulate_gradients(task, net, batch, plan.grad_accum, plan.device, autocast,
                                    no_sync=no_sync, create_graph=training.create_graph)

    loss_value = distributed.mean(plan.world, forward_backward(), plan.device)
    if not math.isfinite(loss_value):
        return loss_value
    if plan.grad_clip:
        if training.clip_grad_norm is not None:
            training.clip_grad_norm(plan.grad_clip)
        else:
            nn.utils.clip_grad_norm_(params, plan.grad_clip)
    optimizer = state.optimizer
    if training.needs_closure:
        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            with torch.enable_grad():
                return torch.tensor(forward_backward())

        optimizer.step(closure)
    else:
        optimizer.step()
    if training.external_schedule:  # else the optimizer's own lr stays as it set it
        state.scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value


def train_loop(plan: RunPlan, state: RunState, training: TrainingOptimizer, task: Any,
               net: nn.Module, params: list[nn.Parameter], autocast: Any,
               metrics: results.MetricsWriter | None, logger: Any, hooks: Sequence[StepHook],
               stop: StopSignals, bar: Any, wall_clock: Callable[[], float]) -> None:
    """Steps from ``state.progress.step`` to ``plan.steps`` (or divergence, or a signal)."""
    world, device, p = plan.world, plan.device, state.progress
    batches: Iterator[tuple[torch.Tensor, ...]] = iter(task.train_batches(
        plan.seed, start=p.step, rank=world.rank, world_size=world.size))
    # The optimizer's train/eval modes (schedule-free), on every rank (the replicas must stay
    # identical): eval before every evaluation and the final checkpoint (the weights the
    # results were measured with); train before steps and mid-run checkpoints, so a resumed
    # run continues from the very tensors it stopped at (a train->eval->train round trip is
    # not bitwise the identity, and only the interrupted run would make an extra one).
    mode = ""

    def set_mode(wanted: str) -> None:
        nonlocal mode
        switch = training.train_mode if wanted == "train" else training.eval_mode
        if mode != wanted and switch is not None:
            switch()
        mode = wanted

    def emit(record: dict[str, Any]) -> None:
        for hook in hooks:
            hook(state, p.step, record)
        metrics.write(record)
        logger.log(record)

    def save(final: bool = False) -> Path | None:
        set_mode("eval" if final else "train")
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
        set_mode("train")
        # -- one optimizer step (timed) -------------------------------------------------
        sync(device)
        t0 = time.perf_counter()
        batch = next(batches)
        units = task.batch_units(batch) * world.size
        try:
            loss_value = train_step(plan, state, training, task, net, params, batch, autocast)
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
        if p.step % plan.eval_every == 0 or p.step == plan.steps:
            set_mode("eval")
        if world.main:
            after_step(plan, state, task, net, autocast, emit, bar, training.external_schedule)
        if plan.checkpoint_every and p.step % plan.checkpoint_every == 0 and p.step < plan.steps:
            save()
    if p.status == "running":
        p.status = "finished"
        save(final=True)  # the final state: the finished run's weights stay with its results


def after_step(plan: RunPlan, state: RunState, task: Any, net: nn.Module, autocast: Any,
               emit: Callable[[dict[str, Any]], None], bar: Any, scheduled: bool = True) -> None:
    """Rank 0's work after a step: the training line every ``log_every`` steps and the
    evaluation every ``eval_every`` steps (and both at the last step), each passed through
    the hooks and written; best metrics and the target are updated from evaluations.
    ``scheduled``: whether the loop's LR schedule applies (else the peak LR is logged)."""
    p = state.progress
    step = p.step
    lr_now = plan.lr * (lr_factor(step - 1, **plan.schedule) if scheduled else 1.0)  # this step's
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
                    and (key not in p.best or results.better(key, value, p.best[key])):
                p.best[key] = value
        target = plan.task.target
        if target is not None and p.target_step is None and plan.target_key in p.last_eval:
            if results.target_reached(p.last_eval[plan.target_key], target["value"], target["mode"]):
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
            metric=target["metric"], value=target["value"], mode=target["mode"],
            step=p.target_step, time_s=p.target_time),
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
