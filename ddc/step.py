"""The DDC step as one function on explicit inputs, in the style of
``torch.optim.adamw.adamw``: :func:`ddc_step` picks the readable reference
(:func:`ddc.step_reference.single_tensor_step`, ``foreach=False``) or the batched step
(:func:`ddc.step_batched.multi_tensor_step`), which share every rule
(:mod:`ddc.functional`, :mod:`ddc.balancing`); :func:`base_step` is the same for the
parameters no gauge touches. :class:`ddc.DDC` prepares the inputs (state created lazily)
and stores what comes back.
"""

from __future__ import annotations

import torch

from .layout import StepLayout
from .step_batched import multi_tensor_base_step, multi_tensor_step, supported
from .step_inputs import BaseState, FrameState, MuonOptions, ParamOptions, StepOptions, StepReport
from .step_reference import single_tensor_base_step, single_tensor_step

__all__ = ["ddc_step", "base_step", "StepLayout", "BaseState", "FrameState", "MuonOptions", "ParamOptions",
           "StepOptions", "StepReport"]


def ddc_step(layout: StepLayout, params: list[torch.Tensor], grads: list[torch.Tensor | None],
             options: list[ParamOptions | None], state: BaseState, frame: FrameState, opts: StepOptions,
             *, foreach: bool = True) -> StepReport:
    """One DDC step on the gauged parameters ``params`` (in ``layout``'s order), in place.

    ``grads[i]``: the gradient (None: the parameter stays fixed); ``options[i]``: its
    numbers (None: not the optimizer's, stays fixed); ``state``: the base optimizer's
    state per parameter, created for every parameter with a gradient; ``frame``: the scale
    frame and rotation bases. ``foreach``: the batched step where it covers the case
    (every parameter owned, with a gradient, at lr > 0), else the reference. Returns the
    frame to keep and what the solves did."""
    if foreach and supported(grads, options):
        return multi_tensor_step(layout, params, grads, options, state, frame, opts)
    return single_tensor_step(layout, params, grads, options, state, frame, opts)


def base_step(params: list[torch.Tensor], grads: list[torch.Tensor], options: list[ParamOptions],
              state: BaseState, *, foreach: bool = True) -> None:
    """The base optimizer's step (AdamW or Muon, weight decay decoupled) for parameters no
    gauge touches, in place; ``foreach`` batches it."""
    if any(g.is_sparse for g in grads):
        raise RuntimeError("DDC does not support sparse gradients")
    (multi_tensor_base_step if foreach else single_tensor_base_step)(params, grads, options, state)
