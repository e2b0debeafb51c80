"""Dead-direction diagnostics during training: the runner's hook around ``ddc.diagnostics``.

With ``diagnostics.every=N`` (``configs/config.yaml``; 0, the default, is off), the runner
adds a :class:`DiagnosticsHook` to its hooks (:data:`ddc_bench.train.StepHook`). At the first
training-log record at or after each multiple of N steps, and at the last step, the hook
calls :func:`ddc.diagnostics.diagnostics` on the plain (unwrapped) model and a fixed probe
batch, and adds the readings (``diag/...`` keys, see ``docs/diagnostics.md``) to that
record of ``metrics.jsonl``. The last readings, with their step, go to ``summary.json``'s
``diagnostics`` field.

The probe batch is the first ``diagnostics.probe_batch`` samples of the task's training
stream drawn with :data:`PROBE_SEED`, the same for every optimizer and seed of a task, so
readings compare across runs. A task with a ``validation_batch(device)`` method (the image
tasks: their fixed evaluation subset of the validation split) also gives the held-out
batch of the ablation readings. The hook keeps a :class:`ddc.diagnostics.TrajectoryRates`
fed at every reading, so the dead-direction cells are read along the run's own trajectory
(the readings of this session: a resumed run starts a new trajectory). Readings run on a forked RNG and never touch the weights or
their gradients, so a run trains identically with diagnostics on or off (which is why they
are not part of the run's fingerprint).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ddc_bench.state import RunState

#: Seed of the training stream the probe batch is drawn from (not a run's seed: the probe is
#: shared by every run of a task).
PROBE_SEED = 10_000

#: Prefix of the diagnostics keys in ``metrics.jsonl`` records.
PREFIX = "diag/"


class Probe(NamedTuple):
    """The fixed probe ``(inputs, targets)`` and, where the task has one, the held-out
    ``(inputs, targets)`` of the ablation readings."""

    inputs: torch.Tensor
    targets: torch.Tensor
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None


def probe_batch(task: Any, samples: int, device: torch.device) -> Probe:
    """The fixed :class:`Probe`: the first ``samples`` samples of the task's training stream
    with seed :data:`PROBE_SEED` (fewer if a batch holds fewer), and the task's
    ``validation_batch(device)`` when it has that method."""
    batch = next(iter(task.train_batches(PROBE_SEED)))
    held_out = task.validation_batch(device) if callable(getattr(task, "validation_batch", None)) else None
    return Probe(batch[0][:samples].to(device), batch[1][:samples].to(device), held_out)


class DiagnosticsHook:
    """A :data:`~ddc_bench.train.StepHook` that logs ``ddc.diagnostics`` every ``every`` steps.

    ``start``: the step the session starts at (a resumed run does not repeat the reading of
    the interval it resumed in); ``total``: the run's last step (always read). ``last``
    holds the latest readings with their ``step`` (``None`` before the first).
    """

    def __init__(self, every: int, probe: Probe | tuple[torch.Tensor, torch.Tensor], total: int,
                 start: int = 0) -> None:
        from ddc.diagnostics import TrajectoryRates

        if every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every}")
        self.every, self.probe, self.total = every, Probe(*probe), total
        self.trajectory = TrajectoryRates()
        self._previous = start
        self.last: dict[str, float] | None = None

    def __call__(self, state: RunState, step: int, record: dict[str, Any]) -> None:
        from ddc.diagnostics import diagnostics

        # Records come in step order; a step can have two (training line, evaluation):
        # read once, on the first, so the readings never enter the evaluation's best/final.
        due = step > self._previous and (step // self.every > self._previous // self.every
                                         or step == self.total)
        if not due:
            return
        self._previous = step
        devices = [self.probe[0].device] if self.probe[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            readings = diagnostics(state.model, self.probe[:2], step=step,
                                   trajectory=self.trajectory, held_out=self.probe.held_out,
                                   prefix=PREFIX)
        record.update(readings)
        self.last = {"step": float(step), **readings}
