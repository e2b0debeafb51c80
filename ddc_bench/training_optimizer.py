"""What an optimizer builder may return besides a plain ``torch.optim.Optimizer``.

Some library optimizers need the training loop to do something for them: schedule-free
methods switch their parameters between the training and the averaged point, Hessian
methods need ``loss.backward(create_graph=True)``, line-search methods need a closure.
A builder returns a :class:`TrainingOptimizer` describing those needs; the loop handles
each of them in one place. A builder that needs none of them may return the optimizer
itself (equivalent to ``TrainingOptimizer(optimizer)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TrainingOptimizer:
    """An optimizer plus the loop protocols it needs (all fields but ``optimizer`` optional)."""

    optimizer: torch.optim.Optimizer
    #: Clip the gradients to a max norm and return the total norm; None ->
    #: ``torch.nn.utils.clip_grad_norm_`` on the model's parameters.
    clip_grad_norm: Callable[[float], torch.Tensor] | None = None
    #: Called once with the model and the first batch (refuse a model it cannot train).
    startup_check: Callable[[nn.Module, tuple], None] | None = None
    #: Called before training steps resume (schedule-free ``.train()``).
    train_mode: Callable[[], None] | None = None
    #: Called before every evaluation and every checkpoint save (schedule-free ``.eval()``).
    eval_mode: Callable[[], None] | None = None
    #: ``loss.backward(create_graph=True)`` (Sophia-H, AdaHessian: Hessian-vector products).
    create_graph: bool = False
    #: ``optimizer.step(closure)`` with a closure that recomputes the loss.
    needs_closure: bool = False
    #: False: the loop applies no LR schedule (schedule-free recipes).
    external_schedule: bool = True
