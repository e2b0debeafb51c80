"""``ddc-bench-perf``: what each optimizer costs, per task model, measured on this machine.

    ddc-bench-perf                                   # gpt_lm small on the CPU, 1 thread
    ddc-bench-perf --tasks gpt_lm,grok_modadd --size tiny --steps 20 --out /tmp/perf
    ddc-bench-perf --device cuda --size paper --threads 0
    ddc-bench-perf --profile ddc                     # also torch.profiler's table of DDC's step

For each task model (built from its size preset through ``tasks.build_task``) and each
optimizer (``--optimizers``, any name of ``ddc_bench.optimizers.registry()``), plus the
reference: torch's AdamW with ``foreach=True`` on the CPU (row ``adamw_foreach``) or
``fused=True`` on CUDA (row ``adamw_fused``), with ``configs/optimizer/adamw.yaml``'s
hyperparameters:

* **step ms**: ``optimizer.step()``, median over ``--steps`` steps after ``--warmup``
  steps. Every optimizer has its own copy of the model (same initialisation) and all of
  them train side by side, round-robin (the order rotates each round), so machine noise
  hits all alike. CUDA is synchronised before each clock read.
* **train step ms**: ``zero_grad`` + forward + backward + step, median over the same steps.
* **state bytes**: every tensor in ``optimizer.state_dict()`` (``optimizer.state``, plus
  extra state such as DDC's per-gauge log-scales).
* **peak MiB**: the peak memory while a fresh model and optimizer run 3 training steps;
  one optimizer at a time, before the timing. CUDA: ``torch.cuda.max_memory_allocated``
  (tensor memory: model, gradients, activations, state, temporaries, the cached batches).
  CPU: there is no tensor-level counter, so it is the peak resident set (``VmHWM``) of a
  fresh Python process per optimizer that builds the task, the model and the optimizer and
  runs the steps (a process that already freed memory would reuse it and hide the growth).
  That includes Python, torch and the task's data, the same for every optimizer: read the
  difference to the reference (**peak Δ MiB**), not the absolute value.

Ratios are to the reference row; ``vs base`` compares a DDC variant with its base
(``ddc`` with the reference AdamW, ``ddc_muon`` with ``muon``).

**Scaling** (``--scale``): ``optimizer.step()`` time of the reference AdamW and DDC over
model sizes of ``--scale-task`` (default GPT tiny, small, and small with the width doubled:
about 4x the parameters). Here the gradients of one real batch are computed once per model
and the steps are timed on them (the step's cost does not depend on the gradient values),
so large models stay cheap to measure.

**Harness overhead** (``--overhead-steps``): the runner's training step against a bare
loop of the same model, optimizer (with the options the runner resolves) and batches. The
runner's step is what its ``step_time_ms`` times: the next batch,
:func:`ddc_bench.train.train_step` (forward, backward, step, schedule, zero_grad, loss read
back) and the finiteness check of the parameters, with the plan ``ddc-bench`` composes for
the task and optimizer (``grad_clip`` off: clipping is part of a training recipe). The
bare loop: next batch, zero_grad, forward, backward, step. Two model copies are stepped
alternately (the order swaps every step), ``--warmup`` + ``--overhead-steps`` steps each,
and the medians are compared.

Outputs (``--out``, default a new folder ``results/perf/<device>-<size>-<UTC time>``): ``report.md`` (all tables and how they were
measured), ``steps.csv``, ``steps.png``, ``scaling.csv``, ``scaling.png``, ``overhead.csv``
and, with ``--profile``, ``profile-<name>.txt``. Existing files are never overwritten:
the command stops with one line instead. Every number is measured now; nothing is
hard-coded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ddc.param_groups import param_groups
from ddc_bench import provenance, results
from ddc_bench.config import CONFIG_DIR, ConfigError, load_group_defaults, validate
from ddc_bench.optimizers import build_optimizer, registry
from ddc_bench.memory import peak_memory_mb, reset_peak_memory
from ddc_bench.train import sync, to_device

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
            "ddc_cg": ("ddc", {"rotation_solve": "cg"}), "ddc_muon_cg": ("ddc_muon", {"rotation_solve": "cg"})}
#: Which optimizer a DDC variant is compared with (``None``: the reference row).
BASE_OF = {"ddc": None, "ddc_muon": "muon", "ddc_ref": None, "ddc_muon_ref": "muon",
           "ddc_compiled": ADAMW_COMPILED, "ddc_muon_compiled": "muon", "ddc_cg": None, "ddc_muon_cg": "muon"}
#: Distinct batches cycled through while timing (enough to vary the data, few enough to
#: keep large-batch tasks in memory).
BATCH_CYCLE = 8
#: Training steps over which peak memory is taken (state is created on the first).
MEMORY_STEPS = 3
OVERHEAD_METHOD = ("ddc_bench.train.train_step + params_finite + next batch (the runner's timed "
                   "region) vs a bare loop, interleaved step by step, medians")
OUTPUT_FILES = ("report.md", "steps.csv", "steps.png", "scaling.csv", "scaling.png", "overhead.csv")


class PerfError(Exception):
    """Bad input; the message is one line saying what is wrong and what is accepted."""


# --------------------------------------------------------------------------------------
# Building tasks, models and optimizers
# --------------------------------------------------------------------------------------

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
    return cfg


def build_task_or_fail(cfg: dict[str, Any]) -> Any:
    """``tasks.build_task(cfg)``; a bad value or missing data becomes a :class:`PerfError`."""
    from tasks import build_task  # lazy: tasks import torchvision/datasets

    try:
        return build_task(cfg)
    except (ValueError, TypeError, FileNotFoundError) as err:
        raise PerfError(f"task {cfg.get('name')}: {err}") from err


def build_named_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
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
        return optimizer
    if name in VARIANTS:
        base, extra = VARIANTS[name]
        return build_optimizer(model, {**load_group_defaults("optimizer", base), **extra}).optimizer
    return build_optimizer(model, load_group_defaults("optimizer", name)).optimizer


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
    step_s: list[float] = field(default_factory=list)
    train_step_s: list[float] = field(default_factory=list)


def make_setup(task: Any, name: str, device: torch.device) -> Setup:
    """A fresh model (seed 0, so every optimizer starts from the same weights) and ``name``."""
    torch.manual_seed(0)
    model = task.build_model().to(device)
    model.train()
    return Setup(name, model, build_named_optimizer(name, model))


def take_batches(task: Any, device: torch.device, count: int = BATCH_CYCLE) -> list[tuple[torch.Tensor, ...]]:
    """The first ``count`` training batches of ``task`` (seed 0), on ``device``."""
    stream = task.train_batches(0)
    return [to_device(next(stream), device) for _ in range(count)]


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------

def train_step(task: Any, setup: Setup, batch: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """zero_grad, forward, backward, step; records the step and the whole step's times."""
    sync(device)
    t0 = time.perf_counter()
    setup.optimizer.zero_grad(set_to_none=True)
    loss, _ = task.loss(setup.model, batch)
    loss.backward()
    sync(device)
    t1 = time.perf_counter()
    setup.optimizer.step()
    sync(device)
    t2 = time.perf_counter()
    setup.step_s.append(t2 - t1)
    setup.train_step_s.append(t2 - t0)


def optimizer_step(setup: Setup, device: torch.device) -> None:
    """One ``optimizer.step()`` on the gradients already in place; records its time."""
    sync(device)
    t0 = time.perf_counter()
    setup.optimizer.step()
    sync(device)
    setup.step_s.append(time.perf_counter() - t0)


def round_robin(setups: Sequence[Setup], rounds: int, warmup: int,
                one_step: Callable[[Setup, int], None]) -> None:
    """``warmup + rounds`` rounds of ``one_step`` on every setup, the order rotating by one
    each round; the warm-up measurements are then dropped."""
    n = len(setups)
    for r in range(warmup + rounds):
        for k in range(n):
            one_step(setups[(r + k) % n], r)
    for s in setups:
        del s.step_s[:warmup]
        del s.train_step_s[:warmup]


def peak_memory(task: Any, name: str, batches: list[tuple[torch.Tensor, ...]],
                device: torch.device) -> float:
    """Peak MiB while :data:`MEMORY_STEPS` training steps of a fresh model and ``name`` run
    (see the module docstring). On the CPU it is the process's resident-set high-water mark,
    so call it in a fresh process (:func:`peak_memory_fresh`)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)
    setup = make_setup(task, name, device)
    for i in range(MEMORY_STEPS):
        train_step(task, setup, batches[i % len(batches)], device)
    peak = peak_memory_mb(device)
    del setup
    gc.collect()
    return peak


def peak_memory_fresh(task_cfg: dict[str, Any], name: str, threads: int) -> float | None:
    """:func:`peak_memory` on the CPU, in a new Python process (``None`` if it fails)."""
    code = ("import json, sys; from ddc_bench import perf; "
            "print(json.dumps(perf._peak_memory_child(json.loads(sys.argv[1]))))")
    request = json.dumps({"task": task_cfg, "optimizer": name, "threads": threads})
    done = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[ddc-bench-perf] peak memory of {name}: the measuring process failed ({last})",
              file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _peak_memory_child(request: dict[str, Any]) -> float:
    """The body of :func:`peak_memory_fresh`'s process."""
    torch.set_num_threads(request["threads"] or torch.get_num_threads())
    device = torch.device("cpu")
    task = build_task_or_fail(request["task"])
    batches = take_batches(task, device, MEMORY_STEPS)
    return peak_memory(task, request["optimizer"], batches, device)


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
    rows = []
    for s in setups:
        q = statistics.quantiles(s.step_s, n=4) if len(s.step_s) > 1 else [s.step_s[0]] * 3
        sweeps = getattr(s.optimizer, "last_balance_sweeps", None)
        rows.append({
            "task": task.name, "size": task.size, "device": str(device),
            "threads": torch.get_num_threads(), "optimizer": s.name,
            "params": sum(p.numel() for p in s.model.parameters()),
            "step_ms": 1e3 * statistics.median(s.step_s),
            "step_ms_iqr": 1e3 * (q[2] - q[0]),
            "train_step_ms": 1e3 * statistics.median(s.train_step_s),
            "state_bytes": state_bytes(s.optimizer),
            "peak_mib": peaks[s.name],
            "balance_sweeps": None if sweeps is None else "/".join(map(str, sweeps)),
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
            loss, _ = task.loss(s.model, batch)
            loss.backward()
        round_robin(setups, steps, warmup, lambda s, r: optimizer_step(s, device))
        for s in setups:
            rows.append({"task": task_name, "model": label,
                         "params": sum(p.numel() for p in s.model.parameters()),
                         "optimizer": s.name, "step_ms": 1e3 * statistics.median(s.step_s),
                         "state_bytes": state_bytes(s.optimizer)})
        del setups
        gc.collect()
    return rows


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
    loss, _ = task.loss(setup.model, take_batches(task, device, 1)[0])
    loss.backward()
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


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------

def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None or value != value else format(value, spec) + suffix


def steps_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The printed/markdown form of the per-optimizer rows."""
    return pd.DataFrame([{
        "task": f"{r['task']}-{r['size']}", "optimizer": r["optimizer"], "params": f"{r['params']:,}",
        "step ms": _fmt(r["step_ms"], ".3f"), "± IQR": _fmt(r["step_ms_iqr"], ".3f"),
        "step vs ref": _fmt(r["step_ms_vs_ref"], ".2f", "x"),
        "vs base": ("" if r["base"] is None else f"{r['step_vs_base']:.2f}x ({r['base']})"),
        "train step ms": _fmt(r["train_step_ms"], ".1f"),
        "train vs ref": _fmt(r["train_step_ms_vs_ref"], ".3f", "x"),
        "state MiB": _fmt(r["state_bytes"] / 2**20, ".3f"),
        "state vs ref": _fmt(r["state_bytes_vs_ref"], ".4f", "x"),
        "peak MiB": _fmt(r["peak_mib"], ".1f"),
        "peak Δ MiB": _fmt(r["peak_mib_vs_ref"], "+.1f"),
        "sweeps": r["balance_sweeps"] or "",
    } for r in rows])


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def steps_chart(rows: list[dict[str, Any]], reference: str, title: str) -> bytes:
    """Bar chart: step, train-step and state ratios to the reference, per task and optimizer."""
    frame = pd.DataFrame(rows)
    tasks = list(dict.fromkeys(frame["task"]))
    metrics = [("step_ms_vs_ref", "optimizer step"), ("train_step_ms_vs_ref", "training step"),
               ("state_bytes_vs_ref", "state bytes")]
    fig = _new_figure(4.2 * len(metrics), 1.0 + 0.45 * len(frame))
    for i, (key, label) in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        labels = [f"{r['task']}: {r['optimizer']}" for _, r in frame.iterrows()]
        values = [float(v) if v is not None else 0.0 for v in frame[key]]
        colours = [f"C{tasks.index(t)}" for t in frame["task"]]
        ax.barh(range(len(values)), values, color=colours)
        ax.axvline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels(labels if i == 0 else [""] * len(values), fontsize=8)
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
        ax.set_xlabel(f"{label} / {reference}")
        ax.set_xlim(0, max(values + [1.0]) * 1.25)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def scaling_chart(rows: list[dict[str, Any]], title: str) -> bytes:
    """Step time against parameter count (log-log), one line per optimizer."""
    frame = pd.DataFrame(rows)
    fig = _new_figure(5.5, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for name, part in frame.groupby("optimizer", sort=False):
        part = part.sort_values("params")
        ax.plot(part["params"], part["step_ms"], marker="o", label=name)
        for _, r in part.iterrows():
            ax.annotate(r["model"], (r["params"], r["step_ms"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -8))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("optimizer.step() ms (median)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _png(fig)


def parse_scale(spec: str, default_size: str) -> list[tuple[str, str, dict[str, Any]]]:
    """``tiny,small,small:width=256`` → [(label, size, task.model overrides), ...]."""
    from tasks import SIZES

    entries = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        size, *pairs = item.split(":")
        size = size or default_size
        if size not in SIZES:
            raise PerfError(f"--scale entry {item!r}: unknown size {size!r}; accepted: {', '.join(SIZES)}")
        overrides: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise PerfError(f"--scale entry {item!r}: expected SIZE[:KEY=VALUE...], e.g. small:width=256")
            overrides[key] = int(value) if value.lstrip("-").isdigit() else value
        entries.append((item, size, overrides))
    if not entries:
        raise PerfError("--scale is empty; give sizes like tiny,small,small:width=256")
    return entries


def _parse_names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise PerfError(f"unknown {what} {', '.join(unknown) or '(none given)'}; accepted: {', '.join(known)}")
    return list(dict.fromkeys(names))


def _load_average() -> str:
    """The 1-minute load average and the CPU count, e.g. ``3.9 on 2 CPUs`` (n/a off Unix)."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except (AttributeError, OSError):
        return "n/a"


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False)


# --------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The ``ddc-bench-perf`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ddc-bench-perf", description="Optimizer step time, state memory, peak memory and "
        "training-step time per task model, with ratios to torch's AdamW; plus scaling and harness overhead.")
    parser.add_argument("--tasks", default="gpt_lm", help=f"comma list of {', '.join(TASK_NAMES)}, or all")
    parser.add_argument("--size", default="small", choices=("tiny", "small", "paper"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--optimizers", default="adamw,ddc,muon,ddc_muon",
                        help="comma list of harness optimizers (the reference AdamW row is always added); "
                        "ddc_ref / ddc_muon_ref: DDC's reference step (foreach=False)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per optimizer (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--data-root", default=None, help="CIFAR folder for the CIFAR tasks (default: their config's)")
    parser.add_argument("--scale", default="tiny,small,small:width=256",
                        help="model sizes for the scaling run: SIZE[:KEY=VALUE...] with task.model overrides")
    parser.add_argument("--scale-task", default="gpt_lm", choices=TASK_NAMES)
    parser.add_argument("--no-scaling", action="store_true", help="skip the scaling run")
    parser.add_argument("--overhead-steps", type=int, default=30,
                        help="timed steps of the harness and of the bare loop (0: skip the overhead measurement)")
    parser.add_argument("--overhead-optimizers", default="adamw,ddc")
    parser.add_argument("--profile", default=None, metavar="OPTIMIZER",
                        help="also write torch.profiler's table of this optimizer's step (first task)")
    parser.add_argument("--out", default=None, help="output folder (default: results/perf/<device>-<size>-<UTC time>; "
                        "existing files are never overwritten)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Raise :class:`PerfError` for a value argparse cannot check."""
    for key, low in (("steps", 1), ("warmup", 0), ("threads", 0), ("overhead_steps", 0)):
        if getattr(args, key) < low:
            raise PerfError(f"--{key.replace('_', '-')} must be an integer >= {low}, got {getattr(args, key)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PerfError("--device cuda but CUDA is not available here; use --device cpu")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``ddc-bench-perf`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        run_perf(args, command=" ".join(["ddc-bench-perf", *argv]))
    except (PerfError, ConfigError, results.RunExistsError) as err:
        print(f"ddc-bench-perf: error: {err}", file=sys.stderr)
        sys.exit(2)


def run_perf(args: argparse.Namespace, command: str = "ddc-bench-perf") -> dict[str, list[dict[str, Any]]]:
    """Measure everything ``args`` asks for, print the tables, write the files; return the rows.

    ``command`` is the command line recorded in ``report.md``."""
    check_args(args)
    known = sorted(registry()) + list(VARIANTS) + [ADAMW_COMPILED]
    tasks = list(TASK_NAMES) if args.tasks == "all" else _parse_names(args.tasks, TASK_NAMES, "task(s)")
    names = _parse_names(args.optimizers, known, "optimizer(s)")
    overhead_names = _parse_names(args.overhead_optimizers, sorted(registry()), "overhead optimizer(s)") \
        if args.overhead_steps else []
    scale = parse_scale(args.scale, args.size) if not args.no_scaling else []
    if args.profile is not None:
        _parse_names(args.profile, known + list(REFERENCE.values()), "--profile optimizer")
    started = dt.datetime.now(dt.timezone.utc)
    out = Path(args.out or f"results/perf/{args.device}-{args.size}-{started:%Y%m%d-%H%M%S}")
    existing = [str(out / f) for f in OUTPUT_FILES if (out / f).exists()]
    if existing:
        raise PerfError(f"{existing[0]} already exists (a previous run's results are never "
                        "overwritten); move it away or pass another --out")
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    threads = torch.get_num_threads()
    reference = REFERENCE[device.type]
    prov = provenance.collect(device, started)
    all_names = [reference] + [n for n in names if n != reference]
    header = (f"device: {prov['device']}; torch {torch.__version__}; threads {threads}; "
              f"git {str(prov['git_commit'])[:10]}{' (dirty)' if prov['git_dirty'] else ''}; {started:%Y-%m-%d %H:%M} UTC"
              f"; load average at start {_load_average()}")
    print(f"[ddc-bench-perf] {header}")

    step_rows: list[dict[str, Any]] = []
    overhead_rows: list[dict[str, Any]] = []
    profile_text = None
    for i, name in enumerate(tasks):
        cfg = task_config(name, args.size, args.data_root)
        task = build_task_or_fail(cfg)
        print(f"[ddc-bench-perf] {name}-{args.size}: {len(all_names)} optimizers x "
              f"{args.warmup}+{args.steps} steps, round-robin", flush=True)
        rows = measure_task(task, cfg, all_names, device, args.steps, args.warmup)
        step_rows += rows
        print(_markdown(steps_table(rows)), flush=True)
        if i == 0 and overhead_names:
            print(f"[ddc-bench-perf] harness overhead on {name}-{args.size}: {args.warmup}+"
                  f"{args.overhead_steps} steps, runner and bare loop interleaved", flush=True)
            overhead_rows = measure_overhead(task, cfg, overhead_names, device, args.overhead_steps,
                                             args.warmup, args.threads)
        if i == 0 and args.profile:
            profile_text = profile_step(task, args.profile, device)
            print(profile_text, flush=True)
        del task
        gc.collect()

    scale_rows: list[dict[str, Any]] = []
    if scale:
        print(f"[ddc-bench-perf] scaling on {args.scale_task}: {', '.join(e[0] for e in scale)}", flush=True)
        scale_rows = measure_scaling(args.scale_task, scale, [reference, "ddc"], device, args.steps,
                                     args.warmup, args.data_root)

    # ---- report ---------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Optimizer cost: `ddc-bench-perf`\n", f"{header}  ", f"command: `{command}`\n",
          f"Reference row: `{reference}` (torch.optim.AdamW, "
          f"{'foreach=True' if device.type == 'cpu' else 'fused=True'}, adamw.yaml's hyperparameters). "
          f"Size `{args.size}`, {args.warmup} warm-up + {args.steps} timed steps per optimizer, "
          "round-robin. How each column is measured: `ddc_bench/perf.py`'s docstring.\n",
          "## Step time, state and memory\n", _markdown(steps_table(step_rows)), ""]
    results.atomic_write_text(out / "steps.csv", pd.DataFrame(step_rows).to_csv(index=False))
    results.atomic_write_bytes(out / "steps.png", steps_chart(
        step_rows, reference, f"ratios to {reference}; size {args.size}, {prov['device']}"))
    md.append("![ratios](steps.png)\n")
    if overhead_rows:
        frame = pd.DataFrame([{"task": f"{r['task']}-{r['size']}", "optimizer": r["optimizer"],
                               "steps": r["steps"], "bare loop ms": f"{r['bare_ms']:.2f}",
                               "harness ms": f"{r['harness_ms']:.2f}",
                               "overhead": f"{100 * r['overhead']:+.1f}%"} for r in overhead_rows])
        results.atomic_write_text(out / "overhead.csv", pd.DataFrame(overhead_rows).to_csv(index=False))
        md += ["## Harness overhead\n", f"Method: {overhead_rows[0]['method']}; grad_clip off.\n",
               _markdown(frame), ""]
        print(_markdown(frame))
    if scale_rows:
        frame = pd.DataFrame(scale_rows)
        ref_ms = {(r["model"]): r["step_ms"] for r in scale_rows if r["optimizer"] == reference}
        shown = pd.DataFrame([{"model": f"{r['task']} {r['model']}", "params": f"{r['params']:,}",
                               "optimizer": r["optimizer"], "step ms": f"{r['step_ms']:.3f}",
                               "vs ref": f"{r['step_ms'] / ref_ms[r['model']]:.2f}x",
                               "state MiB": f"{r['state_bytes'] / 2**20:.3f}"} for r in scale_rows])
        results.atomic_write_text(out / "scaling.csv", frame.to_csv(index=False))
        results.atomic_write_bytes(out / "scaling.png", scaling_chart(
            scale_rows, f"{args.scale_task}: optimizer.step() vs size; {prov['device']}"))
        md += ["## Scaling\n", "optimizer.step() on the gradients of one batch (median).\n",
               _markdown(shown), "", "![scaling](scaling.png)\n"]
        print(_markdown(shown))
    if profile_text is not None:
        path = out / f"profile-{args.profile}.txt"
        if path.exists():
            raise PerfError(f"{path} already exists; move it away or pass another --out")
        results.atomic_write_text(path, profile_text + "\n")
        md += [f"## Profile of `{args.profile}`\n", "```", profile_text, "```", ""]
    # Other processes slow every optimizer alike (the rounds interleave them), but they widen
    # the spread; the load average says how busy the machine was.
    md.insert(2, f"load average at the end {_load_average()}  ")
    results.atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    print(f"[ddc-bench-perf] wrote {out}/report.md, steps.csv, steps.png"
          + (", overhead.csv" if overhead_rows else "") + (", scaling.csv, scaling.png" if scale_rows else ""))
    return {"steps": step_rows, "overhead": overhead_rows, "scaling": scale_rows}


if __name__ == "__main__":
    main()
