"""Peak memory of a run: CUDA's allocator statistics, or the process's resident set.

On CPU the peak resident set size is per process; Linux lets us reset it
(``/proc/self/clear_refs``) and read it (``VmHWM`` in ``/proc/self/status``), which
matters when ``--multirun`` runs several runs in one process. Elsewhere the
process-lifetime peak from ``resource`` is reported.
"""

from __future__ import annotations

import contextlib
import re
import resource
import sys
from pathlib import Path

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory measurement (per process on CPU, where Linux allows it)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since :func:`reset_peak_memory` in MiB: CUDA ``max_memory_allocated``,
    else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError):
        match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        if match:
            return int(match.group(1)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB else
