"""What a task is: a model, its data, its loss and its metrics.

Tasks know nothing of optimizers (as in AlgoPerf). The runner (``ddc_bench/train.py``)
talks to a task only through this interface.

Model conventions every task model follows:

* ``model.readout``: the output ``nn.Linear`` (``None`` when the readout is tied to the
  input embedding). The single parameter-grouping rule (``ddc.param_groups``) reads it.
* ``model.gauges()``: the list of exact symmetries of the model's loss, as ``ddc.gauges``
  objects. DDC reads it; ``ddc.verify_gauges`` checks it numerically.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, ...]


def shard(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of ``tensor`` along dim 0 (``torch.tensor_split``)."""
    if world_size == 1:
        return tensor
    return torch.tensor_split(tensor, world_size)[rank]


class Task(ABC):
    """A training problem. Built from a task config by ``tasks.build_task``."""

    #: Registered name (``task=NAME`` on the command line).
    name: str
    #: What ``batch_units`` counts, used for throughput: ``"samples"`` or ``"tokens"``.
    unit_name: str = "samples"

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (initialisation draws from torch's global RNG)."""

    @abstractmethod
    def train_batches(self, seed: int, *, start: int = 0, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """An endless stream of training batches (CPU tensors), shuffled by ``seed``.

        The stream is a pure function of its arguments (it never reads global RNG state),
        which is what exact resume and DDP rely on:

        * ``start``: begin at batch ``start`` (0-based), i.e. yield bitwise the batches a
          fresh stream yields from its ``start``-th on, without loading the skipped ones;
        * ``rank`` / ``world_size``: yield only this rank's share of each global batch,
          chunk ``rank`` of ``world_size`` contiguous chunks (:func:`shard`); the ranks'
          shares are disjoint and together make the global batch.
        """

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss on ``batch`` (differentiable) and extra metrics (e.g. ``{"acc": 0.5}``)."""

    @abstractmethod
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """Metrics over a fixed subset of ``split`` (``"train"`` or ``"val"``).

        Keys are unprefixed (``loss``, ``acc``, ``ppl``); the runner prefixes them with the
        split. The same fixed examples are used at every evaluation, so curves are smooth
        and the validation-train gap compares like with like.
        """

    def batch_units(self, batch: Batch) -> int:
        """How many samples (or tokens) ``batch`` holds, for throughput."""
        return int(batch[0].shape[0])

    def describe(self) -> dict[str, Any]:
        """Small facts about the built task worth recording in the summary (sizes, data)."""
        return {}


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Logits for the loss in at least float32: autocast's bf16/fp16 logits are upcast, while
    float64 stays float64 (gauge verification and the equivariance tests run in float64; a
    float32 cast there would show round-off as a broken symmetry)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
