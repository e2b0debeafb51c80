"""The measurements of ``ddc-bench-perf``: per-optimizer step rows (time, state, peak
memory, dispatched operators and synchronisations), scaling over model sizes, the
harness's overhead over a bare loop, and torch.profiler's table of one step."""

from __future__ import annotations

import contextlib
import gc
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch

from ddc_bench.optimizers import build_optimizer
from ddc_bench.perf.memory import peak_memory, peak_memory_fresh
from ddc_bench.perf.ops import count_step
from ddc_bench.perf.setup import (BASE_OF, REFERENCE, Setup, build_task_or_fail, make_setup,
                                  runner_plan, state_bytes, take_batches, task_config)
from ddc_bench.perf.steps import optimizer_step, round_robin, train_step
from ddc_bench.train import sync, to_device
from ddc_bench.training_optimizer import forward_context

OVERHEAD_METHOD = ("ddc_bench.train.train_step + params_finite + next batch (the runner's timed "
                   "region) vs a bare loop, interleaved step by step, medians")
#: Optimizer steps whose dispatched operators are counted (per-step means: some
#: optimizers do extra work every few steps, e.g. DDC's balance checks).
COUNT_STEPS = 4


def count_steps(setup: Setup) -> dict[str, float]:
    """Dispatched aten operators, scalar reads and host-device synchronisations per
    ``optimizer.step()`` (means over :data:`COUNT_STEPS` steps on the gradients in place;
    :mod:`ddc_bench.perf.ops`)."""
    totals = {"step_ops": 0, "step_scalar_reads": 0, "step_syncs": 0}
    for _ in range(COUNT_STEPS):
        counter = count_step(setup.optimizer.step)
        totals["step_ops"] += counter.total
        totals["step_scalar_reads"] += counter.scalar_reads
        totals["step_syncs"] += counter.syncs
    return {k: v / COUNT_STEPS for k, v in totals.items()}


def measure_task(task: Any, task_cfg: dict[str, Any], names: Sequence[str], device: torch.device,
                 steps: int, warmup: int) -> list[dict[str, Any]]:
    """One row per optimizer of ``names`` on ``task`` built from ``task_cfg`` (see the
    module docstring)."""
    batches = take_batches(task, device)
    if device.type == "cuda":
        peaks = {name: peak_memory(task, name, batches, device) for name in names}
    else:
        peaks = {name: peak_memory_fresh(task_cfg, name, torch.get_num_threads()) for name in names}
    setups = [make_setup(task, name, device) for name in names]
    round_robin(setups, steps, warmup,
                lambda s, r: train_step(task, s, batches[r % len(batches)], device))
    counts = {s.name: count_steps(s) for s in setups}  # after the timing: counting slows steps
    rows = []
    for s in setups:
        q = statistics.quantiles(s.step_s, n=4) if len(s.step_s) > 1 else [s.step_s[0]] * 3
        sweeps = getattr(s.optimizer, "last_balance_sweeps", None)
        rows.append({
            "task": task.name, "size": task.size, "device": str(device),
            "threads": torch.get_num_threads(), "optimizer": s.name,
            "params": sum(p.numel() for p in s.model.parameters()),
            "param_tensors": sum(1 for _ in s.model.parameters()),
            "step_ms": 1e3 * statistics.median(s.step_s),
            "step_ms_iqr": 1e3 * (q[2] - q[0]),
            "train_step_ms": 1e3 * statistics.median(s.train_step_s),
            "state_bytes": state_bytes(s.optimizer),
            "peak_mib": peaks[s.name],
            "balance_sweeps": None if sweeps is None else "/".join(map(str, sweeps)),
            **counts[s.name],
        })
    add_ratios(rows, REFERENCE[device.type])
    return rows


def add_ratios(rows: list[dict[str, Any]], reference: str) -> None:
    """Ratios to the reference row (per task) and of each DDC variant to its base."""
    by_name = {(r["task"], r["optimizer"]): r for r in rows}
    for r in rows:
        ref = by_name.get((r["task"], reference))
        for key in ("step_ms", "train_step_ms", "state_bytes"):
            r[f"{key}_vs_ref"] = r[key] / ref[key] if ref and ref[key] else None
        both = ref is not None and None not in (r["peak_mib"], ref["peak_mib"])
        r["peak_mib_vs_ref"] = r["peak_mib"] - ref["peak_mib"] if both else None
        base = None
        if r["optimizer"] in BASE_OF:
            base = by_name.get((r["task"], BASE_OF[r["optimizer"]] or reference)) \
                or by_name.get((r["task"], reference))  # a base not measured: the reference
        r["step_vs_base"] = r["step_ms"] / base["step_ms"] if base else None
        r["base"] = base["optimizer"] if base else None


def measure_scaling(task_name: str, entries: Sequence[tuple[str, str, dict[str, Any]]],
                    names: Sequence[str], device: torch.device, steps: int, warmup: int,
                    data_root: str | None) -> list[dict[str, Any]]:
    """Step time of ``names`` on each model size of ``entries`` ((label, size, model
    overrides)); gradients of one real batch, computed once per model."""
    rows = []
    for label, size, overrides in entries:
        task = build_task_or_fail(task_config(task_name, size, data_root, overrides))
        batch = take_batches(task, device, 1)[0]
        setups = [make_setup(task, name, device) for name in names]
        for s in setups:
            with forward_context(s.create_graph):
                loss, _ = task.loss(s.model, batch)
            loss.backward(create_graph=s.create_graph)
        round_robin(setups, steps, warmup, lambda s, r: optimizer_step(s, device))
        for s in setups:
            rows.append({"task": task_name, "model": label,
                         "params": sum(p.numel() for p in s.model.parameters()),
                         "optimizer": s.name, "step_ms": 1e3 * statistics.median(s.step_s),
                         "state_bytes": state_bytes(s.optimizer)})
        del setups
        gc.collect()
    return rows


def measure_overhead(task: Any, task_cfg: dict[str, Any], names: Sequence[str],
                     device: torch.device, steps: int, warmup: int, threads: int) -> list[dict[str, Any]]:
    """The runner's timed training step against a bare loop, per optimizer (see the module
    docstring): two copies of the model, stepped alternately, medians compared."""
    from ddc_bench.schedule import build_scheduler
    from ddc_bench.state import RunState
    from ddc_bench.train import params_finite
    from ddc_bench.train import train_step as runner_step

    rows = []
    for name in names:
        with tempfile.TemporaryDirectory(prefix="ddc-bench-perf-") as tmp:
            plan = runner_plan(task_cfg, name, device, threads, tmp)
        options = {"name": plan.optimizer_name, **plan.optimizer_options}
        autocast = (contextlib.nullcontext if plan.autocast_dtype is None else
                    lambda: torch.autocast(device_type=device.type, dtype=plan.autocast_dtype))
        torch.manual_seed(0)
        bare_model = task.build_model().to(device).train()
        bare_opt = build_optimizer(bare_model, options).optimizer
        torch.manual_seed(0)
        model = task.build_model().to(device).train()
        training = build_optimizer(model, options)
        state = RunState(model, training.optimizer,
                         build_scheduler(training.optimizer, **plan.schedule))
        params = [p for p in model.parameters() if p.requires_grad]
        bare_batches, batches = task.train_batches(0), task.train_batches(0)

        def bare() -> None:
            batch = to_device(next(bare_batches), device)
            bare_opt.zero_grad(set_to_none=True)
            loss, _ = task.loss(bare_model, batch)
            loss.backward()
            bare_opt.step()

        def harness() -> None:  # the runner's timed region (ddc_bench.train.train_loop)
            batch = next(batches)
            runner_step(plan, state, training, task, model, params, batch, autocast)
            params_finite(params)

        times: dict[str, list[float]] = {"bare": [], "harness": []}
        order = [("bare", bare), ("harness", harness)]
        for r in range(warmup + steps):
            for k in range(2):
                label, step = order[(r + k) % 2]
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                times[label].append(time.perf_counter() - t0)
        b = 1e3 * statistics.median(times["bare"][warmup:])
        h = 1e3 * statistics.median(times["harness"][warmup:])
        rows.append({"task": task.name, "size": task.size, "optimizer": name, "steps": steps,
                     "bare_ms": b, "harness_ms": h, "overhead": h / b - 1, "method": OVERHEAD_METHOD})
    return rows


def profile_step(task: Any, name: str, device: torch.device, steps: int = 10, top: int = 15) -> str:
    """torch.profiler's table (top ``top`` ops by self CPU time) of ``steps`` steps of ``name``
    on the gradients of one batch, after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    setup = make_setup(task, name, device)
    with forward_context(setup.create_graph):
        loss, _ = task.loss(setup.model, take_batches(task, device, 1)[0])
    loss.backward(create_graph=setup.create_graph)
    for _ in range(2):
        setup.optimizer.step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            setup.optimizer.step()
        sync(device)
    averages = prof.key_averages()
    table = averages.table(sort_by="self_cpu_time_total", row_limit=top)
    if device.type == "cuda":  # where the device's time goes, too
        table += "\n" + averages.table(sort_by="self_cuda_time_total", row_limit=top)
    return f"torch.profiler: {steps} x {name}.step() on {task.name}-{task.size}, {device}\n{table}"
