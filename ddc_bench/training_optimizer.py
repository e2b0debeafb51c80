"""What the training loop needs from an optimizer, besides ``torch.optim.Optimizer``.

:func:`ddc_bench.optimizers.build_optimizer` returns a :class:`TrainingOptimizer` for every
optimizer, so the loop (:mod:`ddc_bench.train`) never names one: an optimizer that clips
in its own frame, checks the model before training, swaps weights for evaluation
(schedule-free), needs second derivatives (Sophia-H, AdaHessian) or a closure, or brings
its own schedule says so here. A plain optimizer is wrapped with the defaults.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TrainingOptimizer:
    """An optimizer and the loop's instructions for it; every field is honoured by
    :func:`ddc_bench.train.run`."""

    optimizer: torch.optim.Optimizer
    #: ``clip_grad_norm(max_norm)`` clips the gradients before each step; ``None``:
    #: ``torch.nn.utils.clip_grad_norm_`` over the model's trainable parameters.
    clip_grad_norm: Callable[[float], torch.Tensor] | None = None
    #: Called once per session, before training, with the model and the first training
    #: batch (on the run's device); raises to refuse the model (e.g. DDC's gauge check).
    startup_check: Callable[[nn.Module, tuple], None] | None = None
    #: Called before training steps resume (after evaluations, and before the first step
    #: of a session) and before mid-run checkpoints: schedule-free's ``optimizer.train()``.
    train_mode: Callable[[], None] | None = None
    #: Called before every evaluation and the final checkpoint save, on every rank:
    #: schedule-free's ``optimizer.eval()`` (mid-run checkpoints are saved in train mode,
    #: so that a resumed run is bitwise the uninterrupted one).
    eval_mode: Callable[[], None] | None = None
    #: ``loss.backward(create_graph=True)``: the optimizer reads second derivatives.
    create_graph: bool = False
    #: ``optimizer.step(closure)`` with a closure that recomputes the loss (and gradients)
    #: on the step's batch and returns it.
    needs_closure: bool = False
    #: False: the loop applies no LR schedule (the optimizer schedules itself).
    external_schedule: bool = True


def forward_context(create_graph: bool) -> contextlib.AbstractContextManager:
    """The context for a forward pass whose backward keeps its graph: with ``create_graph``
    attention runs through the math ``scaled_dot_product_attention`` kernel, which has a
    second derivative (the fused CPU/flash kernels do not, so Sophia-H's Hessian-vector
    products would fail on every transformer task)."""
    if not create_graph:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])
