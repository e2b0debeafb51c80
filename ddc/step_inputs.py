"""The explicit inputs of a DDC step (``ddc.step.ddc_step``): plain values, no optimizer.

Like ``torch.optim.adamw``'s functional form, the steps take lists of tensors (parameters,
gradients, the base optimizer's state) and numbers; what DDC adds is the gauge layout
(:class:`ddc.layout.StepLayout`) and the frame's state (:class:`FrameState`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["MuonOptions", "ParamOptions", "BaseState", "FrameState", "StepOptions", "StepReport"]


@dataclass(frozen=True)
class MuonOptions:
    """Muon's options for one parameter (as ``torch.optim.Muon`` takes them)."""

    momentum: float
    nesterov: bool
    orthogonalizer: str           # "svd" (exact) or "newton_schulz"
    ns_coefficients: tuple[float, float, float]
    ns_steps: int
    eps: float
    adjust_lr_fn: str | None


@dataclass(frozen=True)
class ParamOptions:
    """One parameter's numbers (its param group's): the Adam step unless ``muon`` is given."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    muon: MuonOptions | None = None


@dataclass
class BaseState:
    """The base optimizer's state, one entry per parameter (None where it does not apply):
    Adam's moments and CPU step counters, Muon's momentum buffers. Created before the step
    by :func:`ddc.functional.init_adam_state` / :func:`ddc.functional.init_muon_state`;
    the step advances them in place."""

    exp_avgs: list[torch.Tensor | None]
    exp_avg_sqs: list[torch.Tensor | None]
    steps: list[torch.Tensor | None]
    momentum_buffers: list[torch.Tensor | None]


@dataclass
class FrameState:
    """The gauges' state: the scale frame (flat float64 log-scales, ``initialised`` once a
    solve set it) and, for ``rotation_solve="cg"``, one eigenbasis per rotation gauge (None
    where there is none) and whether this step takes fresh ones (``refresh``)."""

    log_scales: torch.Tensor
    initialised: bool
    rotation_bases: list[torch.Tensor | None] = field(default_factory=list)
    refresh: bool = False


@dataclass(frozen=True)
class StepOptions:
    """How the step runs (the optimizer's settings, resolved to numbers)."""

    work: torch.dtype             # precision of the frame, projections and gauged state
    freeze: bool                  # dead_mode "freeze"
    reference_norm: float
    zero_level: float
    balance_tol: float
    balance_max_iter: int
    balance_steps: int | None = None      # the fixed schedule's counts (None: the defaults)
    balance_cg_steps: int | None = None
    balance_steps_before: int = 0          # Newton rounds at the start of a step in "freeze"
    rotation_solve: str = "eigh"           # or "cg"
    rotation_cg_steps: int = 16
    compiled: bool = False

    def warm_schedule(self, scales: Any) -> tuple[int, int]:
        """The fixed schedule's (rounds, CG iterations) for a balancing solve from the
        stored frame (``scales``: the layout's :class:`ddc.balancing.ScaleSystem`): with
        dead_mode "freeze" the last step left that frame canonical, so
        ``balance_steps_before`` rounds (0: the closed-form step alone) keep it there;
        "free" takes the full schedule."""
        rounds, cg_steps = scales.schedule(self.work, self.balance_steps, self.balance_cg_steps)
        return (self.balance_steps_before if self.freeze else rounds), cg_steps


@dataclass
class StepReport:
    """What a step hands back: the frame it used (the warm start of the next step), the
    rotation bases (new ones where refreshed), the balancing rounds taken before and after,
    and the scale gauges whose adaptive solve stopped unsettled (to warn about)."""

    log_scales: torch.Tensor
    rotation_bases: list[torch.Tensor | None]
    sweeps: tuple[int, int] = (0, 0)
    unsettled: list[int] = field(default_factory=list)
