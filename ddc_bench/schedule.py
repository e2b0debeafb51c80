"""The learning-rate schedule: a pure function of the step.

:func:`lr_factor` returns the multiplier of the peak learning rate for optimizer step
``step`` (0-based: the factor used by the first ``optimizer.step()`` is ``lr_factor(0)``).
:func:`build_scheduler` wraps it in ``torch.optim.lr_scheduler.LambdaLR`` so every param
group of every optimizer (baselines and DDC alike, whatever their group-specific learning
rates) is scaled by the same factor.

Shape: linear warmup from ``1/warmup_steps`` to 1 over the first ``warmup_steps`` steps,
then a decay to the floor ``min_lr_ratio`` at ``total_steps``::

    cosine    min + (1 - min) * (1 + cos(pi * t)) / 2
    linear    min + (1 - min) * (1 - t)
    constant  1

with ``t = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to ``[0, 1]``.
"""

from __future__ import annotations

import math

import torch

KINDS = ("cosine", "linear", "constant")


def warmup_steps_for(total_steps: int, warmup_fraction: float, warmup_steps: int | None) -> int:
    """The warmup length: ``warmup_steps`` when given, else ``round(fraction * total)``."""
    if warmup_steps is not None:
        return int(warmup_steps)
    return int(round(warmup_fraction * total_steps))


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, kind: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate at (0-based) optimizer step ``step``.

    The warmup starts at ``1/warmup_steps`` rather than 0 so the first step already moves
    the weights; the decay ends exactly at ``min_lr_ratio`` at ``step == total_steps`` and
    stays there (steps past the budget never go below the floor).
    """
    if kind not in KINDS:
        raise ValueError(f"schedule.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    if kind == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * t))
    else:  # linear
        shape = 1.0 - t
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int,
                    kind: str, min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every param group of ``optimizer``.

    Call ``scheduler.step()`` once after each ``optimizer.step()``.
    """
    lr_factor(0, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind,
              min_lr_ratio=min_lr_ratio)  # validate the arguments now, not at the first step

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, kind=kind,
                         min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
