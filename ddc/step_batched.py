"""The batched DDC step (``DDC(foreach=True)``, the default): the reference step
(:mod:`ddc.step_reference`) on stacked tensors, with the same rules.

Like torch's ``_multi_tensor_adamw`` it takes explicit lists (parameters, gradients, the
base state), numbers and the gauge layout, never the optimizer. The work is batched:

* **Parameters of a kind together.** Canonical coordinates, weight decay, the Adam moments
  and the map back run as ``torch._foreach_*`` ops over all gauged parameters at once;
  the parameters no gauge touches take one foreach AdamW per set of options.
* **One balancing solve for all scale gauges**, on one flat vector of log-scales
  (:class:`ddc.balancing.ScaleSystem`). After the first step it runs on the fixed
  schedule without host reads (:meth:`~ddc.balancing.ScaleSystem.balance`); exactly
  equivariant for any counts, certified off the hot path (:meth:`ddc.DDC.balance_residual`).
  The first step (state init) solves adaptively, as the reference does every step.
* **Head rotations on stacks**: the so(d) projection of all gauges of one block size and
  member shapes (a model's layers) in one call of
  :func:`ddc.functional.remove_rotation_component`'s parts, their members read from one
  stack of the equally shaped parameters (:attr:`ddc.layout.StepLayout.rotation_batch_stacks`;
  per-member views where no stack fits) and the grad² of pooled parameters pooled on one
  stack per group (closed form for RoPE pairs; ``eigh``, or with ``rotation_solve="cg"`` a
  fixed number of CG iterations in an eigenbasis refreshed on a fixed schedule: no host
  reads either way).
* **Kernels**: the tensor work is functions without host reads (:data:`KERNELS`): once the
  frame is initialised the whole step is one of them (``fixed``); with ``compiled`` they
  run through ``torch.compile``. The numbers that change every step reach them as 0-d
  tensors in that mode, so an lr schedule does not recompile them.

A step in which some gauged parameter has no gradient, is not the optimizer's, or sits in
a group at lr 0 is the reference's (:func:`supported`). Agreement with the reference:
``tests/test_ddc_foreach.py`` (float64, every task model, both bases, to 1e-12; Muon's
exact polar factor to 1e-11).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from . import functional as F
from .balancing import ScaleSystem
from .layout import StepLayout
from .step_inputs import BaseState, FrameState, ParamOptions, StepOptions, StepReport

__all__ = ["multi_tensor_step", "multi_tensor_base_step", "supported", "KERNELS"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def supported(grads: Sequence[torch.Tensor | None], options: Sequence[ParamOptions | None]) -> bool:
    """The batched step covers the usual case: every gauged parameter is owned, has a
    gradient and lr > 0 (the reference handles the rest, with the same result)."""
    return all(g is not None and o is not None and o.lr != 0 for g, o in zip(grads, options))


# ------------------------------------------------------------------------------ Adam, batched

class _AdamGroup:
    """A batch of Adam parameters with the same options: the moments, the step counters
    advanced, and the bias corrections (one number when the counters agree, as usual; a
    list otherwise), as Python numbers or, for the compiled step, 0-d tensors."""

    def __init__(self, options: ParamOptions, exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                 steps: list[torch.Tensor], tensors_on: torch.device | None = None) -> None:
        torch._foreach_add_(steps, 1)
        self.exp_avgs, self.exp_avg_sqs = exp_avgs, exp_avg_sqs
        self.beta1, self.beta2 = options.betas
        self.eps = options.eps
        if torch.compiler.is_compiling():
            # Traced by an outer torch.compile: no reads of the counters (torch's AdamW
            # does the same); the bias corrections as tensors, one per parameter.
            counts_t = torch.stack(steps).to(exp_avgs[0].device, torch.float64)
            self.tensor_scalars = True
            self.bc2_sqrt: Any = list(torch.sqrt(1 - self.beta2 ** counts_t).unbind())
            self.step_size: Any = list((-options.lr / (1 - self.beta1 ** counts_t)).unbind())
            return
        # The step counters live on the CPU (as torch's AdamW keeps them without
        # capturable=True): reading them is no device synchronisation (one read for all).
        counts = torch.stack(steps).tolist()
        bc2_sqrt = [math.sqrt(1 - self.beta2 ** c) for c in counts]
        step_size = [-options.lr / (1 - self.beta1 ** c) for c in counts]
        if len(set(counts)) == 1:  # the usual case: one number (a list costs a tensor per entry)
            bc2_sqrt, step_size = bc2_sqrt[:1], step_size[:1]
        # These numbers change every step: the compiled step (``tensors_on`` its device)
        # takes them as 0-d tensors, as Python numbers they would be compiled in as constants.
        self.tensor_scalars = tensors_on is not None
        if self.tensor_scalars:
            values = torch.tensor(bc2_sqrt + step_size, dtype=torch.float64, device=tensors_on).unbind()
            bc2_sqrt, step_size = list(values[:len(bc2_sqrt)]), list(values[len(bc2_sqrt):])
        self.bc2_sqrt = bc2_sqrt[0] if len(bc2_sqrt) == 1 else bc2_sqrt
        self.step_size = step_size[0] if len(step_size) == 1 else step_size

    def pick(self, value: Any, js: list[int]) -> Any:
        return [value[j] for j in js] if isinstance(value, list) else value


def _adam_math(hp: _AdamGroup, grads: list[torch.Tensor], pooled: list[torch.Tensor | None],
               targets: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Adam directions of one prepared batch (no host reads), with the arithmetic of
    :func:`ddc.functional.adam_update`: the moments advanced in place, ``pooled[k]`` (the
    rotation-pooled grad², or None) in place of grad². Where ``targets[k]`` is a tensor the
    direction is added to it in place (one ``addcdiv_``, no update tensor) and ``None`` is
    returned for that item."""
    exp_avgs, exp_avg_sqs = hp.exp_avgs, hp.exp_avg_sqs
    torch._foreach_lerp_(exp_avgs, grads, 1 - hp.beta1)
    torch._foreach_mul_(exp_avg_sqs, hp.beta2)
    plain = [j for j, q in enumerate(pooled) if q is None]
    pooled_js = [j for j, q in enumerate(pooled) if q is not None]
    if plain:
        torch._foreach_addcmul_([exp_avg_sqs[j] for j in plain], [grads[j] for j in plain],
                                [grads[j] for j in plain], value=1 - hp.beta2)
    if pooled_js:
        torch._foreach_add_([exp_avg_sqs[j] for j in pooled_js], [pooled[j] for j in pooled_js],
                            alpha=1 - hp.beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, hp.bc2_sqrt)
    torch._foreach_add_(denom, hp.eps)
    out: list[torch.Tensor | None] = [None] * len(grads)
    into = [j for j, t in enumerate(targets) if t is not None]
    apart = [j for j, t in enumerate(targets) if t is None]
    if into and not hp.tensor_scalars:
        torch._foreach_addcdiv_([targets[j] for j in into], [exp_avgs[j] for j in into],
                                [denom[j] for j in into], hp.pick(hp.step_size, into))
        into = []
    # The rest as update tensors; with tensor step sizes (the compiled step, where addcdiv
    # takes no 0-d tensor) those with a target are added to it, passes the compiler fuses.
    rest = into + apart
    if rest:
        update = torch._foreach_div([exp_avgs[j] for j in rest], [denom[j] for j in rest])
        torch._foreach_mul_(update, hp.pick(hp.step_size, rest))
        for j, u in zip(rest, update):
            if targets[j] is not None:
                targets[j].add_(u)
            else:
                out[j] = u
    return out


def _batches(options: Sequence[ParamOptions], index: Sequence[int]) -> list[list[int]]:
    """``index`` split by equal options (Adam's numbers), in first-seen order."""
    by: dict[ParamOptions, list[int]] = {}
    for i in index:
        by.setdefault(options[i], []).append(i)
    return list(by.values())


def _muon_direction(i: int, grad: torch.Tensor, options: ParamOptions, state: BaseState,
                    lr: Any = None) -> torch.Tensor:
    """Muon's direction of parameter ``i``; ``lr`` (default ``options.lr``) a 0-d tensor in
    the compiled step, where a Python number would be compiled in as a constant."""
    muon = options.muon
    lr = options.lr if lr is None else lr
    return F.muon_update(grad, state.momentum_buffers[i], lr, muon.momentum, muon.nesterov,
                         muon.orthogonalizer, muon.ns_coefficients, muon.ns_steps, muon.eps, muon.adjust_lr_fn)


def multi_tensor_base_step(params: list[torch.Tensor], grads: list[torch.Tensor],
                           options: list[ParamOptions], state: BaseState) -> None:
    """The base step of parameters no gauge touches, batched: one foreach AdamW per set of
    options, Muon per matrix (bf16/fp16 computed in float32; lr 0 advances the state only)."""
    grads = [g.float() if g.dtype in _LOW_PRECISION else g for g in grads]
    updates: list[torch.Tensor | None] = [None] * len(params)
    adam = [i for i in range(len(params)) if options[i].muon is None]
    for ks in _batches(options, adam):
        hp = _AdamGroup(options[ks[0]], [state.exp_avgs[k] for k in ks], [state.exp_avg_sqs[k] for k in ks],
                        [state.steps[k] for k in ks])
        for k, d in zip(ks, _adam_math(hp, [grads[k] for k in ks], [None] * len(ks), [None] * len(ks))):
            updates[k] = d
    for i in range(len(params)):
        if options[i].muon is not None:
            updates[i] = _muon_direction(i, grads[i], options[i], state)
    for ks in _batches(options, range(len(params))):
        o = options[ks[0]]
        if o.lr == 0:
            continue
        ps = [params[k] for k in ks]
        torch._foreach_mul_(ps, 1 - o.lr * o.weight_decay)
        torch._foreach_add_(ps, [updates[k].to(params[k].dtype) for k in ks])


# ------------------------------------------------------------------------------ the kernels

class _Spec(NamedTuple):
    """The numbers of one step, prepared on the host: per parameter the weight-decay factor
    (and whether it is 1), the Adam batches and the Muon parameters."""

    decay: list[Any]
    no_decay: list[bool]
    adam: list[tuple[list[int], _AdamGroup]]
    muon: list[int]
    muon_lr: list[Any]  # per entry of ``muon``: its lr (0-d tensors when compiled)


def _spec(options: list[ParamOptions], state: BaseState, compiled: bool, device: torch.device) -> _Spec:
    # The numbers that change from step to step (the schedule's lr) reach the compiled
    # step as 0-d tensors: as Python numbers they would be compiled in as constants.
    decay = [1 - o.lr * o.weight_decay for o in options]
    no_decay = [d == 1.0 for d in decay]
    decay_values: list[Any] = list(torch.tensor(decay, dtype=torch.float64, device=device).unbind()) \
        if compiled else decay
    adam = [i for i, o in enumerate(options) if o.muon is None]
    groups = [(ks, _AdamGroup(options[ks[0]], [state.exp_avgs[i] for i in ks], [state.exp_avg_sqs[i] for i in ks],
                              [state.steps[i] for i in ks], device if compiled else None))
              for ks in _batches(options, adam)]
    muon = [i for i, o in enumerate(options) if o.muon is not None]
    muon_lr: list[Any] = [options[i].lr for i in muon]
    if compiled and muon:
        muon_lr = list(torch.tensor(muon_lr, dtype=torch.float64, device=device).unbind())
    return _Spec(decay_values, no_decay, groups, muon, muon_lr)


def _prepare(layout: StepLayout, params: list[torch.Tensor], grads: list[torch.Tensor], work: torch.dtype,
             warm: torch.Tensor, level: float, zero_level: float, adaptive: bool = False
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], Any, Any]:
    """Step 1's start: the points and gradients in the working precision, the readouts
    centred (``means``: the vocabulary means taken out, None elsewhere), and the squared
    norms the balancing solve reads (:meth:`ScaleSystem.reduce`) with the solve's start at
    the stored frame ``warm`` (the fixed schedule's, :meth:`ScaleSystem.start`, or with
    ``adaptive`` the adaptive solve's, :meth:`ScaleSystem.first_system`); both None without
    scale gauges. Fresh tensors throughout except where ``.to`` keeps a tensor (never written)."""
    points = [p.to(work) for p in params]
    grads = [g.to(work) for g in grads]
    means: list[torch.Tensor | None] = [None] * len(points)
    for i in layout.centred:
        means[i] = points[i].mean(dim=0, keepdim=True)
        points[i] = points[i] - means[i]
        grads[i] = grads[i] - grads[i].mean(dim=0, keepdim=True)
    if not layout.scales.n:
        return points, grads, means, None, None
    reduced = layout.scales.reduce(points)
    start = layout.scales.first_system if adaptive else layout.scales.start
    return points, grads, means, reduced, start(*reduced, warm, level, zero_level)


def _canonical(layout: StepLayout, spec: _Spec, points: list[torch.Tensor], grads: list[torch.Tensor],
               log_scales: torch.Tensor, work: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The canonical point ``θ* = S·θ`` with the weight decay folded into the same multiply,
    and the canonical gradient ``g* = g/S`` (fresh tensors)."""
    n = len(points)
    points, grads = list(points), list(grads)
    scaled: list[int] = []
    if layout.scales.n:
        up, up_decayed = layout.scales.factors(log_scales, work, points, times=spec.decay, ones=spec.no_decay)
        scaled = [i for i in range(n) if up[i] is not None]
        new_points = torch._foreach_mul([points[i] for i in scaled], [up_decayed[i] for i in scaled])
        new_grads = torch._foreach_div([grads[i] for i in scaled], [up[i] for i in scaled])  # as the reference
        for k, i in enumerate(scaled):
            points[i], grads[i] = new_points[k], new_grads[k]
    for i in set(range(n)) - set(scaled):  # unscaled: a decayed copy (the centred ones are copies already)
        points[i] = points[i] * spec.decay[i]
    return points, grads


def _pooled_square(layout: StepLayout, index: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """grad² pooled over the rotation blocks, per parameter of ``index`` (None for one
    without rotation members). The parameters of one pooling group
    (:attr:`StepLayout.pool_stacks`) are squared and pooled on one stack."""
    position = {i: k for k, i in enumerate(index)}
    out: list[torch.Tensor | None] = [None] * len(index)
    for group, stacks in layout.pool_stacks:
        mine = [i for i in group if i in position]
        if not mine:
            continue
        if stacks is None:  # members without a stackable slice: through their own views
            for i in mine:
                sq = grads[i] * grads[i]
                for blocks in layout.pool_members[i]:
                    sq = blocks.set(sq, F.pool_blocks(blocks.get(sq)))
                out[position[i]] = sq
            continue
        sq = torch.stack([grads[i] for i in mine])
        sq.mul_(sq)
        for blocks in stacks:
            view = blocks.pool_view(sq)
            view.copy_(F.pool_blocks(view, blocks.block_dim))
        for i, q in zip(mine, sq.unbind()):
            out[position[i]] = q
    return out


def _base_directions(layout: StepLayout, spec: _Spec, options: list[ParamOptions], state: BaseState,
                     points: list[torch.Tensor], grads: list[torch.Tensor], freeze: bool
                     ) -> list[torch.Tensor | None]:
    """Step 3, the base step in canonical coordinates: per parameter its direction, or None
    where it was added to its canonical point in place already (an Adam step nothing
    projects afterwards: no rotation, no centring, or dead_mode "free")."""
    deltas: list[torch.Tensor | None] = [None] * len(points)
    for i, lr in zip(spec.muon, spec.muon_lr):
        deltas[i] = _muon_direction(i, grads[i], options[i], state, lr)
    for index, hp in spec.adam:
        pooled = _pooled_square(layout, index, grads)
        direct = [None if freeze and (i in layout.pool_members or i in layout.centred) else points[i] for i in index]
        for i, d in zip(index, _adam_math(hp, [grads[i] for i in index], pooled, direct)):
            deltas[i] = d
    return deltas


def _remove_dead(layout: StepLayout, points: list[torch.Tensor], deltas: list[torch.Tensor | None],
                 bases: list[torch.Tensor | None], refresh: bool | torch.Tensor, rotation_solve: str,
                 cg_steps: int) -> list[torch.Tensor | None]:
    """Step 4, in place on ``deltas``: the vocabulary mean and the component along every
    head-rotation orbit removed. Gauges of one block size whose members have the same
    shapes are stacked into one call of the rules (:func:`ddc.functional.rotation_system`,
    then the generator, then :func:`ddc.functional.apply_generator`); where the layout
    found the batch's members on stacks of equally shaped parameters
    (:attr:`StepLayout.rotation_batch_stacks`) their blocks are reshapes of one stack per
    parameter set and go back with one copy per member position, else through per-member
    views. Returns the rotation
    bases (``rotation_solve="cg"``: fresh ones from ``eigh`` where ``refresh`` or none is
    stored, else the stored ones, used for ``cg_steps`` CG iterations; ``refresh`` a 0-d
    bool tensor when traced by ``torch.compile``: then both run under ``torch.cond``)."""
    for i in layout.centred:
        deltas[i].sub_(deltas[i].mean(dim=0, keepdim=True))
    bases = list(bases)
    # Traced by torch.compile, the members go through their views: inductor (torch 2.14,
    # CPU) computed wrong steps from the stacked path (GPT tiny, float64, Adam: 1e-3 after 4
    # steps against 1e-15 through views; which lowering was not found), while the traced
    # graph run eagerly (aot_eager) equals the eager step.
    batch_stacks = [None] * len(layout.rotation_batches) if torch.compiler.is_compiling() \
        else layout.rotation_batch_stacks
    for (block, batch), shares, stacks in zip(layout.rotation_batches, layout.rotation_batch_shares, batch_stacks):
        # one stacked solve per batch of gauges with equal block shapes (layout.rotation_batches)
        members = [layout.rotations[r] for r in batch]
        if stacks is None:
            xs = [torch.cat([m[k].get(points[m[k].index]) for m in members]) for k in range(len(members[0]))]
            ds = [torch.cat([m[k].get(deltas[m[k].index]) for m in members]) for k in range(len(members[0]))]
        else:  # the members' parameters stacked, the blocks one reshape of a stack
            params_of, positions = stacks
            x_stacks = [torch.stack([points[i] for i in index]) for index in params_of]
            d_stacks = [torch.stack([deltas[i] for i in index]) for index in params_of]
            xs = [blocks.get(x_stacks[k]) for k, blocks in positions]
            ds = [blocks.get(d_stacks[k]) for k, blocks in positions]
        gram, rhs = F.rotation_system(ds, xs, shares, sum(layout.rotation_blocks(r) for r in batch))
        stored = rotation_solve == "cg" and all(bases[r] is not None for r in batch)
        if block == 2:
            generator = F.pair_generator(gram, rhs, groups=len(batch))
        elif stored and isinstance(refresh, torch.Tensor):
            # Traced by torch.compile: the schedule's flag is a tensor, both branches in the graph.
            generator, basis = torch.cond(refresh, _eigh_branch, functools.partial(_cg_branch, cg_steps),
                                          (gram, rhs, torch.cat([bases[r] for r in batch])))
            _split_bases(layout, batch, basis, bases)
        elif stored and not refresh:
            generator = F.lyapunov_skew_cg(torch.cat([bases[r] for r in batch]), gram, rhs, cg_steps)
        elif rotation_solve == "cg":
            generator, basis = _eigh_branch(gram, rhs)
            _split_bases(layout, batch, basis, bases)
        else:  # no basis kept: not made row-major either
            generator = F.lyapunov_skew(gram, rhs)[0]
        projected = F.apply_generator(ds, xs, generator, shares, in_place=True)  # ds are copies or stack views
        if stacks is None:
            starts = [0] * len(members[0])
            for m in members:
                for k, blocks in enumerate(m):
                    size = blocks.n_blocks
                    deltas[blocks.index] = blocks.set(deltas[blocks.index], projected[k][starts[k]:starts[k] + size])
                    starts[k] += size
            continue
        for (k, blocks), values in zip(positions, projected):
            if not blocks.view:  # a view's projection is in its stack already
                blocks.set(d_stacks[k], values)
        for index, stacked in zip(params_of, d_stacks):
            for i, d in zip(index, stacked.unbind()):
                deltas[i] = d
    return bases



def _eigh_branch(gram: torch.Tensor, rhs: torch.Tensor, basis: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The so(d) generator by ``eigh`` and its eigenbasis (row-major, as a basis loaded
    from a checkpoint is: the CG's products would otherwise round differently in the run
    and after a resume)."""
    generator, eigvecs = F.lyapunov_skew(gram, rhs)
    return generator, eigvecs.contiguous()


def _cg_branch(cg_steps: int, gram: torch.Tensor, rhs: torch.Tensor, basis: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The so(d) generator by ``cg_steps`` CG iterations in ``basis`` (kept)."""
    return F.lyapunov_skew_cg(basis, gram, rhs, cg_steps), basis.clone()


def _split_bases(layout: StepLayout, batch: list[int], basis: torch.Tensor, bases: list[torch.Tensor | None]
                 ) -> None:
    """Each gauge's slice of the stacked ``basis`` into ``bases`` (own copies: a saved view
    would save the whole stacked tensor)."""
    for r, part in zip(batch, basis.split([layout.rotation_blocks(r) for r in batch])):
        bases[r] = part.clone()


def _middle(layout: StepLayout, spec: _Spec, options: list[ParamOptions], state: BaseState,
            points: list[torch.Tensor], grads: list[torch.Tensor], log_scales: torch.Tensor, work: torch.dtype,
            freeze: bool, bases: list[torch.Tensor | None], refresh: bool | torch.Tensor, rotation_solve: str,
            cg_steps: int
            ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """Steps 1 to 4 after the frame is known (one kernel): the canonical point and gradient
    (:func:`_canonical`), the base step (:func:`_base_directions`), its dead components
    removed (``freeze``: :func:`_remove_dead`); returns the new canonical points (fresh
    tensors) and the rotation bases."""
    points, grads = _canonical(layout, spec, points, grads, log_scales, work)
    deltas = _base_directions(layout, spec, options, state, points, grads, freeze)
    if freeze:
        bases = _remove_dead(layout, points, deltas, bases, refresh, rotation_solve, cg_steps)
    moved = [i for i, d in enumerate(deltas) if d is not None]
    if moved:
        torch._foreach_add_([points[i] for i in moved], [deltas[i] for i in moved])
    return points, bases


def _rebalance_start(layout: StepLayout, points: list[torch.Tensor], level: float, zero_level: float
                     ) -> tuple[tuple[torch.Tensor, list[torch.Tensor]], Any]:
    """The re-balancing's input (one kernel): the new points' squared norms and the solve's
    start from 0 there."""
    reduced = layout.scales.reduce(points)
    return reduced, layout.scales.start(*reduced, None, level, zero_level)


def _write_back(layout: StepLayout, params: list[torch.Tensor], points: list[torch.Tensor],
                means: list[torch.Tensor | None], log_scales: torch.Tensor | None, work: torch.dtype) -> None:
    """Step 5: ``θ_new = θ*_new · exp(log_scales)`` (the new frame over the old: ``S_back/S``)
    plus the readout means, written into the parameters."""
    factor = layout.scales.factors(log_scales, work, points)[0] if log_scales is not None else [None] * len(params)
    for i, target in enumerate(params):
        mean = means[i]
        if factor[i] is None and mean is None:
            target.copy_(points[i])
        elif mean is not None or target.dtype != work:
            x = points[i] if factor[i] is None else points[i].mul_(factor[i])
            target.copy_(x.add_(mean) if mean is not None else x)
        else:
            torch.mul(points[i], factor[i], out=target)


def _balance(layout: StepLayout, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor,
             active: torch.Tensor, system: dict[str, Any], newton_steps: int, cg_steps: int) -> torch.Tensor:
    """:meth:`ScaleSystem.balance` of the layout's scale gauges (one kernel)."""
    return ScaleSystem.balance(layout.scales, s, r1, xs, kappa, active, system, newton_steps, cg_steps)


def _after_frame(layout: StepLayout, spec: _Spec, options: list[ParamOptions], state: BaseState,
                 params: list[torch.Tensor], points: list[torch.Tensor], grads: list[torch.Tensor],
                 means: list[torch.Tensor | None], log_scales: torch.Tensor, bases: list[torch.Tensor | None],
                 refresh: bool | torch.Tensor, opts: StepOptions) -> list[torch.Tensor | None]:
    """Steps 2 to 5 once the frame ``log_scales`` is known (one kernel, no host read): weight
    decay, the base step and its dead directions removed (:func:`_middle`), the re-balancing
    of the new canonical point (dead_mode "freeze": the solve from 0 on it, which is
    invariant, on the full fixed schedule), and the write-back ``θ_new = θ*_new · S_back / S``
    (+ the readout means). Returns the rotation bases."""
    work, system = opts.work, layout.scales
    level = opts.reference_norm ** 2
    points, bases = _middle(layout, spec, options, state, points, grads, log_scales, work, opts.freeze, bases,
                            refresh, opts.rotation_solve, opts.rotation_cg_steps)
    back = -log_scales
    if opts.freeze and system.n:
        reduced, (kappa, active, start) = _rebalance_start(layout, points, level, opts.zero_level)
        schedule = system.schedule(work, opts.balance_steps, opts.balance_cg_steps)
        back = _balance(layout, torch.zeros_like(log_scales), *reduced, kappa, active, start, *schedule) - log_scales
    _write_back(layout, params, points, means, back if system.n else None, work)
    return bases


def _fixed_step(layout: StepLayout, spec: _Spec, options: list[ParamOptions], state: BaseState,
                params: list[torch.Tensor], grads: list[torch.Tensor], log_scales: torch.Tensor,
                bases: list[torch.Tensor | None], refresh: bool | torch.Tensor, opts: StepOptions
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """The whole step once the frame is initialised (one kernel, no host read):
    :func:`_prepare`, the solve from the stored frame ``log_scales`` on the warm schedule,
    then :func:`_after_frame`. Returns the frame used and the rotation bases.

    The stored frame moves equivariantly with the trajectory, so a fixed number of Newton
    steps from it keeps the step exact without a host read. With dead_mode "freeze" the
    last step left that frame canonical for the parameters as they are now (to its
    re-balancing's residual), so the closed-form step alone (``balance_steps_before`` = 0
    Newton rounds) keeps it there: measured on GPT small, 777 of the step's 1293 operators
    were the balancing, a third of them this solve's Newton round; "free" moves the frame
    every step and takes the full schedule."""
    system = layout.scales
    points, grads, means, reduced, first = _prepare(layout, params, grads, opts.work, log_scales,
                                                    opts.reference_norm ** 2, opts.zero_level)
    if system.n:
        kappa, active, start = first
        log_scales = _balance(layout, log_scales, *reduced, kappa, active, start, *opts.warm_schedule(system))
    bases = _after_frame(layout, spec, options, state, params, points, grads, means, log_scales, bases, refresh, opts)
    return log_scales, bases


class Kernels(NamedTuple):
    """The batched step's tensor work, in functions without host reads (each takes the
    layout first): ``fixed``, the whole step once the frame is initialised; ``prepare`` and
    ``after_frame``, its two halves, for the first step (state init), whose adaptive frame
    solve reads the host between them."""

    fixed: Callable[..., Any]
    prepare: Callable[..., Any]
    after_frame: Callable[..., Any]


#: The kernels, eager.
KERNELS = Kernels(_fixed_step, _prepare, _after_frame)


@functools.cache
def compiled_kernels() -> Kernels:
    """:data:`KERNELS` through ``torch.compile`` (``DDC(compile=True)``): the same code, so
    the same step to round-off (the compiler may fuse and reorder arithmetic). The steady
    state runs ``fixed``, the whole step as one graph; the halves compile only if a frame
    is (re)initialised."""
    return Kernels(*(torch.compile(fn) for fn in KERNELS))


# ------------------------------------------------------------------------------ the step

def multi_tensor_step(layout: StepLayout, params: list[torch.Tensor], grads: list[torch.Tensor],
                      options: list[ParamOptions], state: BaseState, frame: FrameState, opts: StepOptions
                      ) -> StepReport:
    """One DDC step on every gauged parameter (see :func:`ddc.step_reference.single_tensor_step`,
    the reference, for the meaning of each stage), batched. Every parameter must have a
    gradient and lr > 0 (:func:`supported`). The host reads nothing once the frame is
    initialised (the first step solves it adaptively)."""
    kernels = compiled_kernels() if opts.compiled else KERNELS
    if torch.is_grad_enabled():  # (DDC.step runs under no_grad: no detach needed there)
        params = [p.detach() for p in params]
        grads = [g.detach() for g in grads]
    work, freeze, system = opts.work, opts.freeze, layout.scales
    device = params[0].device
    level = opts.reference_norm ** 2
    spec = _spec(options, state, opts.compiled, device)

    schedule = system.schedule(work, opts.balance_steps, opts.balance_cg_steps)
    if frame.initialised or not system.n:
        log_scales, bases = kernels.fixed(layout, spec, options, state, params, grads, frame.log_scales,
                                          frame.rotation_bases, frame.refresh, opts)
        sweeps = (opts.warm_schedule(system)[0], schedule[0] if freeze else 0) if system.n else (0, 0)
        return StepReport(log_scales, bases, sweeps, [])

    # State init (the first step, or the first after the frame was reset): the frame of
    # the starting point by the adaptive solve (host reads), once; 0 is no equivariant
    # start. Then the rest of the step as ``fixed`` takes it.
    points, grads, means, reduced, first = kernels.prepare(layout, params, grads, work, frame.log_scales, level,
                                                           opts.zero_level, True)
    log_scales, sweeps_before, unsettled = system.solve(*reduced, frame.log_scales, opts.balance_tol,
                                                        opts.balance_max_iter, first)
    bases = kernels.after_frame(layout, spec, options, state, params, points, grads, means, log_scales,
                                frame.rotation_bases, frame.refresh, opts)
    sweeps_after = schedule[0] if freeze else 0
    return StepReport(log_scales, bases, (sweeps_before, sweeps_after), unsettled)
