"""The reference DDC step: one parameter at a time, readable (``DDC(foreach=False)``).

Each stage calls the rules of :mod:`ddc.functional` and :mod:`ddc.balancing`, as the
batched step (:mod:`ddc.step_batched`) does on stacked tensors; the two compute the same
step (``tests/test_ddc_foreach.py``). It handles every case: gauged parameters without a
gradient, not owned, or at lr 0 stay where they are. The balancing solve is the adaptive
one every step (host reads: this path is for reading and checking, not for speed).
"""

from __future__ import annotations

import torch

from . import functional as F
from .layout import StepLayout
from .step_inputs import BaseState, FrameState, ParamOptions, StepOptions, StepReport

__all__ = ["single_tensor_step", "single_tensor_base_step", "base_update"]


def base_update(i: int, grad: torch.Tensor, options: ParamOptions, state: BaseState,
                grad_sq: torch.Tensor | None = None) -> torch.Tensor:
    """The base optimizer's direction (to add) for parameter ``i`` from ``grad``, its
    state advanced in place: Muon where ``options.muon`` is set, else Adam (with the
    rotation-pooled ``grad_sq`` in place of grad², if given). Weight decay not included."""
    muon = options.muon
    if muon is not None:
        return F.muon_update(grad, state.momentum_buffers[i], options.lr, muon.momentum, muon.nesterov,
                             muon.orthogonalizer, muon.ns_coefficients, muon.ns_steps, muon.eps,
                             muon.adjust_lr_fn)
    state.steps[i] += 1
    beta1, beta2 = options.betas
    return F.adam_update(grad, state.exp_avgs[i], state.exp_avg_sqs[i], int(state.steps[i].item()),
                         options.lr, beta1, beta2, options.eps, grad_sq)


def single_tensor_base_step(params: list[torch.Tensor], grads: list[torch.Tensor],
                            options: list[ParamOptions], state: BaseState) -> None:
    """The base step of parameters no gauge touches, one at a time (bf16/fp16 parameters
    computed, and their state kept, in float32; at lr 0 the state advances, nothing moves)."""
    for i, (p, grad) in enumerate(zip(params, grads)):
        grad = grad.float() if grad.dtype in (torch.bfloat16, torch.float16) else grad
        update = base_update(i, grad, options[i], state)
        if options[i].lr != 0:
            p.mul_(1 - options[i].lr * options[i].weight_decay)
            p.add_(update.to(p.dtype))


def single_tensor_step(layout: StepLayout, params: list[torch.Tensor], grads: list[torch.Tensor | None],
                       options: list[ParamOptions | None], state: BaseState, frame: FrameState,
                       opts: StepOptions) -> StepReport:
    """One DDC step on the gauged parameters ``params`` (the layout's order). ``grads[i]``
    None or ``options[i]`` None (not the optimizer's): parameter ``i`` stays fixed."""
    n = len(params)
    work, scales_system = opts.work, layout.scales
    level = opts.reference_norm ** 2

    # 1. Canonical frame: readouts centred, then scaled to the canonical point.
    points = [p.detach().to(work, copy=True) for p in params]
    grads = [g.detach().to(work) if g is not None else None for g in grads]
    means: dict[int, torch.Tensor] = {}
    for i in layout.centred:
        means[i] = points[i].mean(dim=0, keepdim=True)
        points[i] -= means[i]
        if grads[i] is not None:
            grads[i] = grads[i] - grads[i].mean(dim=0, keepdim=True)
    log_scales, sweeps_before, unsettled = frame.log_scales, 0, []
    if scales_system.n:
        r1, xs = scales_system.reduce(points)
        start = scales_system.first_system(r1, xs, log_scales, level, opts.zero_level)
        log_scales, sweeps_before, unsettled = scales_system.solve(r1, xs, log_scales, opts.balance_tol,
                                                                   opts.balance_max_iter, start)
    scales = scales_system.factors(log_scales, work, points)[0]
    for i, s in enumerate(scales):
        if s is not None:
            points[i] = points[i] * s
            if grads[i] is not None:
                grads[i] = grads[i] / s

    # Parameters that move: owned, with a gradient, in a group with lr > 0. The others stay
    # exactly where they are, as with torch's optimizers (frozen or grad-None parameters
    # also keep their state; lr-0 groups advance it, as AdamW does).
    stepped = [options[i] is not None and grads[i] is not None for i in range(n)]
    moving = [stepped[i] and options[i].lr != 0 for i in range(n)]
    report = StepReport(log_scales, list(frame.rotation_bases), (sweeps_before, 0), unsettled)
    if not any(stepped):
        return report

    # 2-3. Weight decay and the base step, in canonical coordinates.
    deltas = []
    for i in range(n):
        if not stepped[i]:
            deltas.append(torch.zeros_like(points[i]))
            continue
        points[i].mul_(1 - options[i].lr * options[i].weight_decay)
        pooled = None
        if i in layout.pool_members and options[i].muon is None:
            pooled = grads[i] * grads[i]
            for blocks in layout.pool_members[i]:
                pooled = blocks.set(pooled, F.pool_blocks(blocks.get(pooled)))
        delta = base_update(i, grads[i], options[i], state, pooled)
        deltas.append(delta if moving[i] else torch.zeros_like(delta))

    # 4. Dead directions: no translation, no rotation, no rescaling.
    if opts.freeze:
        for i in layout.centred:
            deltas[i] = deltas[i] - deltas[i].mean(dim=0, keepdim=True)
        for r, members in enumerate(layout.rotations):
            projected = F.remove_rotation_component([m.get(deltas[m.index]) for m in members],
                                                    [m.get(points[m.index]) for m in members],
                                                    shares=layout.rotation_shares(r),
                                                    n_blocks=layout.rotation_blocks(r))
            for m, d in zip(members, projected):
                deltas[m.index] = m.set(deltas[m.index], d)
    new_points = [x + d for x, d in zip(points, deltas)]
    # Re-balancing rescales every member of a gauge; with a member that must stay fixed
    # (frozen, no gradient, lr 0) the step skips it: still equivariant, not drift-free.
    sweeps_after = 0
    if opts.freeze and scales_system.n and all(moving[i] for i in scales_system.factor_axes):
        r1, xs = scales_system.reduce(new_points)
        start = scales_system.first_system(r1, xs, None, level, opts.zero_level)
        back, sweeps_after, more = scales_system.solve(r1, xs, None, opts.balance_tol, opts.balance_max_iter, start)
        report.unsettled = sorted(set(unsettled) | set(more))
        for i, s in enumerate(scales_system.factors(back, work, new_points)[0]):
            if s is not None:
                new_points[i] = new_points[i] * s

    # 5. Back to the model's coordinates (only the parameters that move are written).
    for i, p in enumerate(params):
        if not moving[i]:
            continue
        x = new_points[i] if scales[i] is None else new_points[i] / scales[i]
        if i in means:
            x = x + means[i]
        p.copy_(x)
    report.sweeps = (sweeps_before, sweeps_after)
    return report
