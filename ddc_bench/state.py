"""The run state: everything a checkpoint must hold to continue a run bitwise.

:class:`RunState` is the model, the optimizer (DDC's log-scale frame and Muon's split
included: their ``state_dict`` carries them), the LR schedule and the :class:`Progress`
(step, clocks, the open logging window, last and best evaluations, target, resumes).
:meth:`RunState.payload` adds the RNG states of Python, NumPy and torch (CPU and CUDA);
the data stream needs no state of its own, since task streams restart exactly at any
batch (``Task.train_batches(seed, start=step)``).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Progress:
    """The running metrics of a run (plain data, checkpointed)."""

    step: int = 0
    #: ``running``, then ``finished`` or ``diverged``.
    status: str = "running"
    #: Seconds of training so far (evaluation, logging and checkpointing excluded).
    train_time: float = 0.0
    #: Wall-clock seconds of the run's earlier sessions, set when a checkpoint is written.
    wall_time: float = 0.0
    #: Steady-state speed leaves out each session's first step, which pays one-time
    #: costs (lazy kernel set-up, torch.compile, cuDNN autotuning).
    steady_time: float = 0.0
    steady_units: int = 0
    steady_steps: int = 0
    #: The logging window since the last training line.
    window_loss: float = 0.0
    window_n: int = 0
    window_units: int = 0
    window_time: float = 0.0
    last_eval: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    target_step: int | None = None
    target_time: float | None = None
    #: The steps at which this run was resumed from a checkpoint.
    resumed_from: list[int] = field(default_factory=list)

    def reset_window(self) -> None:
        """Start a new logging window."""
        self.window_loss, self.window_n, self.window_units, self.window_time = 0.0, 0, 0, 0.0


def capture_rng() -> dict[str, Any]:
    """The RNG states of Python, NumPy and torch (CPU, and every GPU when present), as
    tensors and plain data (loadable with ``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunState:
    """What training changes: model, optimizer, schedule and progress."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    progress: Progress = field(default_factory=Progress)

    def payload(self) -> dict[str, Any]:
        """The checkpoint content of this state (with the RNG states, taken now)."""
        return {
            "step": self.progress.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": capture_rng(),
            "progress": dataclasses.asdict(self.progress),
        }

    def restore(self, payload: dict[str, Any]) -> None:
        """Load a checkpoint's content into this state (RNG states included)."""
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.progress = Progress(**payload["progress"])
        restore_rng(payload["rng"])
