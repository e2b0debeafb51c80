"""Peak memory of an optimizer's training steps: CUDA's allocator peak, or on the CPU the
resident-set high-water mark of a fresh Python process per optimizer (see the package
docstring)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from typing import Any

import torch

from ddc_bench.memory import peak_memory_mb, reset_peak_memory
from ddc_bench.perf.setup import build_task_or_fail, make_setup, take_batches
from ddc_bench.perf.steps import train_step

#: Training steps over which peak memory is taken (state is created on the first).
MEMORY_STEPS = 3


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
    code = ("import json, sys; from ddc_bench.perf import memory; "
            "print(json.dumps(memory.peak_memory_child(json.loads(sys.argv[1]))))")
    request = json.dumps({"task": task_cfg, "optimizer": name, "threads": threads})
    done = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"[ddc-bench-perf] peak memory of {name}: the measuring process failed ({last})",
              file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])

def peak_memory_child(request: dict[str, Any]) -> float:
    """The body of :func:`peak_memory_fresh`'s process."""
    torch.set_num_threads(request["threads"] or torch.get_num_threads())
    device = torch.device("cpu")
    task = build_task_or_fail(request["task"])
    batches = take_batches(task, device, MEMORY_STEPS)
    return peak_memory(task, request["optimizer"], batches, device)
