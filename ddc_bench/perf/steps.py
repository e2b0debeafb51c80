"""Timed steps: a training step or an optimizer step of one :class:`~ddc_bench.perf.setup.Setup`,
and the round-robin that interleaves every optimizer so machine noise hits all alike."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ddc_bench.perf.setup import Setup
from ddc_bench.train import sync
from ddc_bench.training_optimizer import forward_context


def train_step(task: Any, setup: Setup, batch: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """zero_grad, forward, backward, step; records the step and the whole step's times."""
    sync(device)
    t0 = time.perf_counter()
    setup.optimizer.zero_grad(set_to_none=True)
    with forward_context(setup.create_graph):
        loss, _ = task.loss(setup.model, batch)
    loss.backward(create_graph=setup.create_graph)
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
