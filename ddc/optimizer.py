"""DDC: Dead-Direction Conditioners, a gauge-equivariant lift of Adam and Muon.

One step, for the parameters that some gauge acts on (the rest take the plain base step):

1. **Canonical frame.** Centre the readout along the vocabulary axis (translation
   gauge), then rescale every scale gauge to the canonical point of its orbit
   (Kempf–Ness with a level per gauge, and a rule for orbits without a minimum-norm
   point; :func:`ddc.functional.min_norm_log_scales`). The canonical point
   ``θ* = S·centre(θ)`` and gradient ``g* = g / S`` are the same for ``θ`` and for any
   ``g·θ`` on its orbit (rotations aside, which they follow covariantly).
2. **Decoupled weight decay** on ``θ*`` (it commutes with every gauge; on the readout it
   decays only the centred part).
3. **Base step** on ``g*`` with state kept in canonical coordinates: Adam (second
   moment pooled over each rotation orbit) or Muon (momentum, orthogonalisation).
4. **Dead directions** (``dead_mode="freeze"``): remove the step's vocabulary mean and
   its component along every head-rotation orbit, then move the new canonical point back
   to the canonical point of its scale orbit. The scale frame ``S`` is therefore
   unchanged by the step: the gauge coordinates do not drift at all.
5. **Map back**: ``θ_new = θ*_new / S`` (plus the readout's vocabulary mean).

Every input of the state is invariant (or rotates with the gauge), so starting from
``g·θ`` yields exactly ``g·`` (the trajectory from ``θ``). ``docs/ddc.md`` has the details.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import warnings

import torch
from torch import nn
from torch.optim import Optimizer

from . import fast
from . import functional as F
from .muon_kernels import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS as MUON_EPS
from .gauges import Gauge, LogitShift, RotationGauge, RotationMember, ScaleGauge, from_blocks, to_blocks
from .param_groups import param_groups
from .verify import check_declarations, unwrap_model

BASES = ("adam", "muon")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
DEAD_MODES = ("freeze", "free")
ORTHOGONALIZERS = ("newton_schulz", "svd")
ROTATION_SOLVES = ("eigh", "cg")


class _Frame:
    """Which gauges act on which parameter axes: built once from the declarations."""

    def __init__(self, gauges: list[Gauge]) -> None:
        self.params: list[nn.Parameter] = []           # every gauged parameter, fixed order
        self.index: dict[nn.Parameter, int] = {}
        self.scale_gauges = [g for g in gauges if isinstance(g, ScaleGauge)]
        self.rotation_gauges = [g for g in gauges if isinstance(g, RotationGauge)]
        self.centred: set[int] = set()                 # parameter indices centred on axis 0
        self.scale_axes: dict[int, list[tuple[int, int, int]]] = {}   # p -> [(axis, gauge, sign)]
        self.rotation_of: dict[int, list[RotationMember]] = {}   # disjoint slices of one axis
        self.warned_cap = False                        # the balancing cap warning is given once

        for gauge in gauges:
            if not isinstance(gauge, (ScaleGauge, RotationGauge, LogitShift)):
                raise TypeError(f"unsupported gauge type {type(gauge).__name__}")
            for p in gauge.parameters():
                self._add(p)
        for gauge in gauges:
            if isinstance(gauge, LogitShift):
                self.centred.update(self.index[p] for p in gauge.parameters())
        for g, gauge in enumerate(self.scale_gauges):
            for m in gauge.members:
                axes = self.scale_axes.setdefault(self.index[m.param], [])
                if any(axis == m.axis for axis, _, _ in axes):
                    raise ValueError(
                        f"{gauge!r} scales axis {m.axis} of a {tuple(m.param.shape)} parameter "
                        f"that another scale gauge already scales; overlapping scale gauges must "
                        f"act on different axes"
                    )
                axes.append((m.axis, g, m.sign))
                axes.sort()
                if len(axes) > 2:
                    raise ValueError(f"a parameter of shape {tuple(m.param.shape)} is scaled along "
                                     f"more than two axes; at most two are supported")
        for gauge in self.rotation_gauges:
            for m in gauge.members:
                i = self.index[m.param]
                for other in self.rotation_of.get(i, []):
                    overlap = bool(set(other.perm.tolist()) & set(m.perm.tolist()))
                    if other.axis != m.axis or overlap:
                        raise ValueError(f"a {tuple(m.param.shape)} parameter is in two rotation gauges "
                                         f"that overlap (they may only rotate disjoint slices of one axis)")
                if any(axis == m.axis for axis, _, _ in self.scale_axes.get(i, [])):
                    raise ValueError(f"{gauge!r} rotates an axis that a scale gauge scales")
                self.rotation_of.setdefault(i, []).append(m)
        for i in self.centred:
            if any(axis == 0 for axis, _, _ in self.scale_axes.get(i, [])) or i in self.rotation_of:
                raise ValueError("LogitShift's vocabulary axis may not be scaled or rotated by another gauge")

    def _add(self, p: nn.Parameter) -> None:
        if p not in self.index:
            self.index[p] = len(self.params)
            self.params.append(p)

    def scale_tensor(self, i: int, log_scales: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor | None:
        """The factor ``S`` of parameter ``i`` (broadcastable to it), or ``None`` if unscaled."""
        factor = None
        for axis, g, sign in self.scale_axes.get(i, []):
            shape = [1] * like.ndim
            shape[axis] = -1
            f = torch.exp(sign * log_scales[g]).to(like).reshape(shape)
            factor = f if factor is None else factor * f
        return factor

    def solve_scales(self, points: list[torch.Tensor], warm: list[torch.Tensor], tol: float,
                     max_iter: int, reference_norm: float = 1.0,
                     zero_level: float = 0.0) -> tuple[list[torch.Tensor], int]:
        """Log-scales moving ``points`` (one per gauged parameter) to their canonical point
        (:func:`ddc.functional.min_norm_log_scales`). Warns once per gauge set when the
        solve stops at ``max_iter`` without reaching ``tol``."""
        order = sorted(self.scale_axes)
        reduced, axes = [], []
        for i in order:
            x = points[i].double().square()
            gauged = [axis for axis, _, _ in self.scale_axes[i]]
            other = [d for d in range(x.ndim) if d not in gauged]
            reduced.append(x.sum(other) if other else x)
            axes.append([(g, sign) for _, g, sign in self.scale_axes[i]])
        sizes = [g.size for g in self.scale_gauges]
        levels = [g.level for g in self.scale_gauges]
        scales, steps, unsettled = F.min_norm_log_scales(reduced, axes, sizes, warm, tol, max_iter,
                                                         reference_norm, zero_level, levels)
        self.warn_unsettled(unsettled, tol, max_iter)
        return scales, steps

    def warn_unsettled(self, unsettled: list[int], tol: float, max_iter: int) -> None:
        """Warn once per gauge set, naming the scale gauges (indices ``unsettled``) whose
        balancing stopped at ``max_iter`` before reaching ``tol``."""
        if not unsettled or self.warned_cap:
            return
        self.warned_cap = True
        named = ", ".join(repr(self.scale_gauges[g]) for g in unsettled[:4])
        more = f" and {len(unsettled) - 4} more" if len(unsettled) > 4 else ""
        warnings.warn(f"DDC: balancing stopped at balance_max_iter={max_iter} Newton steps before "
                      f"reaching balance_tol={tol:g} for {named}{more}; equivariance then holds only "
                      f"to that residual. Raise balance_max_iter (warned once).", RuntimeWarning,
                      stacklevel=4)


def _pool_over_blocks(x: torch.Tensor, member: RotationMember) -> torch.Tensor:
    """Average ``x`` over each rotation block (the entries one orthogonal map mixes)."""
    blocks = to_blocks(x, member)
    return from_blocks(blocks.mean(dim=1, keepdim=True).expand_as(blocks), member, into=x)


class DDC(Optimizer):
    """Dead-Direction Conditioner: Adam or Muon made equivariant to a model's gauges.

    Args:
        params: an ``nn.Module`` whose ``gauges()`` method returns its gauges (its
            parameters are grouped by :func:`ddc.param_groups`), or an iterable of
            parameters / param groups as for any ``torch.optim`` optimizer, with
            ``gauges`` given explicitly. Groups may carry a ``role`` key (see
            ``ddc.param_groups``); with ``base="muon"`` role ``matrix`` (or, without a
            role, any parameter with two or more dimensions) takes the Muon step and the
            rest the Adam step. A module is grouped as the Muon baseline groups it
            (``param_groups(..., muon=True)``: its input layer takes the Adam step).
        gauges: the gauge declarations (default: ``params.gauges()`` for a module, none
            otherwise), or ``"auto"``: found by :func:`ddc.find_gauges` on the module
            ``params`` run on ``example_input`` (``loss``: required, no default:
            "cross_entropy", None or a callable, as for ``find_gauges``). With no gauges DDC-Adam is AdamW and DDC-Muon is the harness's
            Muon baseline (Muon on hidden matrices, AdamW on the rest).
        base: ``"adam"`` or ``"muon"``.
        lr, weight_decay: learning rate and decoupled weight decay (for a module, applied
            to parameters with two or more dimensions only).
        betas, eps: Adam's coefficients (the Adam part of either base).
        momentum, nesterov, ns_coefficients, ns_steps, ns_eps, adjust_lr_fn: Muon's
            options, as in ``torch.optim.Muon``.
        orthogonalizer: ``"newton_schulz"`` (torch's bfloat16 iteration, fast) or
            ``"svd"`` (exact polar factor in float64, for tests and analysis).
        dead_mode: ``"freeze"`` (default): updates never move along gauge orbits, and
            the scale-gauge coordinates stay exactly where they are; ``"free"``: the base
            step's own component along the orbits is kept (still equivariant).
        balance_tol, balance_max_iter: stopping rule of the balancing solve (Newton steps),
            in log-scale units; ``None`` picks 1e-12 for float64 and 1e-6 otherwise. If
            the cap is reached DDC warns once, naming the gauges.
        reference_norm: ρ, the one absolute scale of the canonical frame (see
            ``docs/ddc.md``, "The canonical point"): where one side of a scale gauge
            coordinate is zero (a zero-initialised readout or down projection, a dead unit)
            the non-zero side gets norm ρ; a norm gain's side exceeds its consumers' by ρ²
            in squared norm (``ScaleGauge.level``).
        foreach: ``True`` (default): the batched step (``ddc/fast.py``); ``False``: the
            readable reference step, one parameter at a time. Both compute the same step.
        compile: with ``foreach``, run the batched step's tensor work through
            ``torch.compile`` (``docs/ddc.md``, "The batched step"): faster steps after a
            one-off compilation at the first step (tens of seconds on a CPU); the same
            step to round-off.
        rotation_solve: how the batched step solves the so(d) projection of head
            rotations with blocks wider than 2 (a Lyapunov equation per head):
            ``"eigh"`` (default), a batched eigendecomposition every step, as the
            reference; ``"cg"``: conjugate gradients preconditioned by the eigenbasis of
            an earlier step (``eigh`` again only when they do not converge in a few
            iterations). The same step to round-off; ``"cg"`` is much faster where the
            batched ``eigh`` is slow (CUDA, heads wider than 32: ``docs/ddc.md``, "The
            batched step"), but keeps that basis, ``d × d`` per head, in the optimizer
            state (so a resumed run continues identically): more than the per-row
            vectors the default keeps beyond AdamW's state.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        gauges: list[Gauge] | str | None = None,
        *,
        base: str = "adam",
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (DEFAULT_A, DEFAULT_B, DEFAULT_C),
        ns_steps: int = DEFAULT_NS_STEPS,
        ns_eps: float = MUON_EPS,
        adjust_lr_fn: str | None = "match_rms_adamw",
        orthogonalizer: str = "newton_schulz",
        dead_mode: str = "freeze",
        balance_tol: float | None = None,
        balance_max_iter: int = 50,
        reference_norm: float = 1.0,
        example_input: Any = None,
        loss: Any = "required",   # no loss assumed: find_gauges names the accepted values
        foreach: bool = True,
        compile: bool = False,
        rotation_solve: str = "eigh",
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {base!r}")
        if dead_mode not in DEAD_MODES:
            raise ValueError(f"dead_mode must be one of {DEAD_MODES}, got {dead_mode!r}")
        if rotation_solve not in ROTATION_SOLVES:
            raise ValueError(f"rotation_solve must be one of {ROTATION_SOLVES}, got {rotation_solve!r}")
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ValueError(f"orthogonalizer must be one of {ORTHOGONALIZERS}, got {orthogonalizer!r}")
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps: {eps}")
        betas = tuple(betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if balance_max_iter < 1:
            raise ValueError(f"balance_max_iter must be at least 1, got {balance_max_iter}")
        if not reference_norm > 0.0:
            raise ValueError(f"reference_norm must be positive, got {reference_norm}")

        model = None
        if isinstance(gauges, str):
            if gauges != "auto" or not isinstance(params, nn.Module) or example_input is None:
                raise ValueError(f"gauges must be a list of gauges, None, or 'auto' with a model and an "
                                 f"example_input (got gauges={gauges!r}, example_input "
                                 f"{'missing' if example_input is None else 'given'})")
            from .find import find_gauges
            gauges = find_gauges(params, example_input, loss=loss)
        if isinstance(params, nn.Module):
            model = unwrap_model(params)
            params = param_groups(model, weight_decay, muon=base == "muon")
            if gauges is None:
                gauges = model.gauges() if hasattr(model, "gauges") else []
        defaults = dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, momentum=momentum,
                        nesterov=nesterov, ns_coefficients=tuple(ns_coefficients), ns_steps=ns_steps,
                        ns_eps=ns_eps, adjust_lr_fn=adjust_lr_fn)
        super().__init__(params, defaults)
        for group in self.param_groups:  # reference for schedulers that cycle beta1 (see _muon_momentum)
            group.setdefault("ddc_beta1_ref", group["betas"][0])
        self.base = base
        self.dead_mode = dead_mode
        self.orthogonalizer = orthogonalizer
        self.balance_tol = balance_tol
        self.balance_max_iter = balance_max_iter
        self.reference_norm = reference_norm
        self.foreach = bool(foreach)
        self.compile = bool(compile)
        self.rotation_solve = rotation_solve
        self._fast_plan: fast.FastPlan | None = None   # built at the first fast step
        self.gauges = list(gauges or [])
        if model is not None:
            check_declarations(model, self.gauges)
        self._frame = _Frame(self.gauges)
        owned = {p for group in self.param_groups for p in group["params"]}
        names = {p: n for n, p in model.named_parameters()} if model is not None else {}
        missing = [p for p in self._frame.params if p not in owned and p.requires_grad]
        if missing:
            name = names.get(missing[0], f"of shape {tuple(missing[0].shape)}")
            raise ValueError(f"gauge parameter {name} is trainable but not among the optimizer's parameters; "
                             f"give DDC every trainable parameter its gauges act on (frozen ones, "
                             f"requires_grad=False, may be left out: they stay fixed)")
        if not self.gauges:
            warnings.warn("DDC has no gauges (none declared, or the model has no gauges() method), so it "
                          "is exactly its base optimizer; declare them, or pass gauges='auto' with an "
                          "example_input", UserWarning, stacklevel=2)
        # Each scale gauge's log-scales live in the per-parameter state of one of its members
        # (one the optimizer owns), so every checkpointing path that saves per-parameter state
        # (state_dict, torch.distributed.checkpoint) saves them too. A gauge whose members
        # are all frozen keeps them here (they only warm-start its solve).
        self._anchors: list[tuple[torch.Tensor | None, str]] = []
        for gauge in self._frame.scale_gauges:
            anchor = next((m for m in gauge.members if m.param in owned), None)
            self._anchors.append((anchor.param, f"ddc_log_scales_axis{anchor.axis}") if anchor else (None, ""))
        self._unanchored: dict[int, torch.Tensor] = {}
        # The batched step's so(d) projections keep the eigenbasis of their last eigh per
        # rotation gauge (the preconditioner of their CG, ``ddc.fast._lyapunov``) in the
        # state of a member the optimizer owns, so a resumed run continues identically.
        self._rotation_anchors: list[tuple[torch.Tensor | None, str]] = []
        for r, gauge in enumerate(self._frame.rotation_gauges):
            anchor = next((m for m in gauge.members if m.param in owned), None)
            self._rotation_anchors.append((anchor.param, f"ddc_rotation_basis{r}") if anchor else (None, ""))
        #: Newton steps the last balancing solves took (start of step, after the step); for diagnostics.
        self.last_balance_sweeps: tuple[int, int] = (0, 0)

    # ----------------------------------------------------------------------------- state

    @property
    def _log_scales(self) -> list[torch.Tensor]:
        """The current scale frame: one float64 vector per scale gauge (zeros before the first step)."""
        out = []
        for g, ((param, key), gauge) in enumerate(zip(self._anchors, self._frame.scale_gauges)):
            value = self.state[param].get(key) if param is not None and param in self.state else self._unanchored.get(g)
            if value is None:
                value = torch.zeros(gauge.size, dtype=torch.float64, device=gauge.members[0].param.device)
            out.append(value)
        return out

    @_log_scales.setter
    def _log_scales(self, values: list[torch.Tensor]) -> None:
        for g, ((param, key), value) in enumerate(zip(self._anchors, values)):
            if param is None:
                self._unanchored[g] = value
            else:
                self.state[param][key] = value

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, except that the log-scales stay float64 (torch would
        cast them to the parameter's dtype), so a resumed run continues with identical steps."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params))
        scales = {(i, key): value for i, st in state_dict["state"].items() for key, value in st.items()
                  if isinstance(key, str) and key.startswith("ddc_log_scales")}
        bases = {(i, key): value for i, st in state_dict["state"].items() for key, value in st.items()
                 if isinstance(key, str) and key.startswith("ddc_rotation_basis")}
        super().load_state_dict(state_dict)
        for (i, key), value in scales.items():
            if i in by_id:
                p = by_id[i]
                self.state[p][key] = value.detach().to(dtype=torch.float64, device=p.device).clone()
        for (i, key), value in bases.items():  # in their own (working) precision, as saved
            if i in by_id:
                self.state[by_id[i]][key] = value.detach().to(device=by_id[i].device).clone()
        if self._fast_plan is not None:
            self._fast_plan.rotation_basis.clear()

    def _muon_momentum(self, group: dict[str, Any]) -> float:
        """Muon's momentum for ``group``. Schedulers that cycle momentum (OneCycleLR,
        CyclicLR) write ``betas[0]`` of an optimizer that has ``betas``; Muon's momentum then
        follows in proportion of ``1 − momentum``: ``1 − m = (1 − m₀)(1 − β₁)/(1 − β₁,₀)``,
        with ``β₁,₀`` the value at construction (so without such a scheduler, ``m = m₀``)."""
        beta1, ref = group["betas"][0], group.setdefault("ddc_beta1_ref", group["betas"][0])
        if beta1 == ref:
            return group["momentum"]
        return 1 - (1 - group["momentum"]) * (1 - beta1) / (1 - ref)

    def _uses_muon(self, group: dict[str, Any], p: torch.Tensor) -> bool:
        if self.base != "muon":
            return False
        role = group.get("role")
        return role == "matrix" if role is not None else p.ndim >= 2

    def _base_update(self, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor,
                     grad_sq: torch.Tensor | None = None) -> torch.Tensor:
        """The base optimizer's step for ``p`` from ``grad`` (canonical coordinates), with
        state created lazily and advanced in place. Weight decay is not included."""
        state = self.state[p]
        if self._uses_muon(group, p):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            return F.muon_update(grad, state["momentum_buffer"], group["lr"], self._muon_momentum(group),
                                 group["nesterov"], self.orthogonalizer, group["ns_coefficients"],
                                 group["ns_steps"], group["ns_eps"], group["adjust_lr_fn"])
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        return F.adam_update(grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()),
                             group["lr"], beta1, beta2, group["eps"], grad_sq)

    # ------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (``closure`` re-evaluates the loss, as usual)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        frame = self._frame
        group_of: dict[int, dict[str, Any]] = {}
        plain: list[tuple[torch.Tensor, dict[str, Any]]] = []
        for group in self.param_groups:
            for p in group["params"]:
                i = frame.index.get(p)
                if i is not None:
                    group_of[i] = group
                    continue
                if p.grad is None:
                    continue
                if self.foreach:
                    plain.append((p, group))
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DDC does not support sparse gradients")
                # No gauge acts on p: exactly the base optimizer's step (for bf16/fp16
                # parameters computed, and its state kept, in float32; at lr 0 the state
                # advances and nothing moves).
                grad = p.grad.float() if p.grad.dtype in _LOW_PRECISION else p.grad
                update = self._base_update(p, group, grad)
                if group["lr"] != 0:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    p.add_(update.to(p.dtype))

        if plain:
            fast.plain_step(self, plain)
        if any(p.grad is not None for i, p in enumerate(frame.params) if i in group_of):
            if self.foreach and fast.fast_supported(self, group_of):
                fast.gauged_step(self, group_of)
            else:
                self._gauged_step(group_of)
        return loss

    def _balance_tol(self) -> float:
        if self.balance_tol is not None:
            return self.balance_tol
        return 1e-12 if self._work_dtype() == torch.float64 else 1e-6

    def _work_dtype(self) -> torch.dtype:
        """Precision of the frame, projections and gauged state: float64 if any gauged
        parameter is float64, else float32 (bfloat16 and float16 parameters included)."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self._frame.params) else torch.float32

    def _to_canonical(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None], dict[int, torch.Tensor],
                                     list[torch.Tensor | None], int]:
        """Step 1: the canonical points and gradients of every gauged parameter (in the
        working precision), the readout means taken out, the scale factors ``S`` and the
        number of Newton steps the balancing took. Updates the stored frame (warm start)."""
        frame = self._frame
        work = self._work_dtype()
        points = [p.detach().to(work, copy=True) for p in frame.params]
        grads = [p.grad.detach().to(work) if p.grad is not None else None for p in frame.params]
        means: dict[int, torch.Tensor] = {}
        for i in frame.centred:
            means[i] = points[i].mean(dim=0, keepdim=True)
            points[i] -= means[i]
            if grads[i] is not None:
                grads[i] = grads[i] - grads[i].mean(dim=0, keepdim=True)
        sweeps = 0
        if frame.scale_gauges:
            self._log_scales, sweeps = frame.solve_scales(points, self._log_scales, self._balance_tol(),
                                                          self.balance_max_iter, self.reference_norm,
                                                          self._zero_level())
        scales = [frame.scale_tensor(i, self._log_scales, points[i]) for i in range(len(frame.params))]
        for i, s in enumerate(scales):
            if s is not None:
                points[i] = points[i] * s
                if grads[i] is not None:
                    grads[i] = grads[i] / s
        return points, grads, means, scales, sweeps

    def _zero_level(self) -> float:
        # A side of a scale coordinate counts as zero below √eps of the working precision.
        return torch.finfo(self._work_dtype()).eps ** 0.5

    def _gauged_step(self, group_of: dict[int, dict[str, Any]]) -> None:
        frame = self._frame
        params = frame.params
        freeze = self.dead_mode == "freeze"
        points, grads, means, scales, sweeps_before = self._to_canonical()

        # Parameters that move: owned by the optimizer, with a gradient, in a group with lr > 0.
        # The others stay exactly where they are, as with torch's optimizers (frozen or
        # grad-None parameters also keep their state; lr-0 groups advance it, as AdamW does).
        stepped = [i in group_of and grads[i] is not None for i in range(len(params))]
        moving = [stepped[i] and group_of[i]["lr"] != 0 for i in range(len(params))]
        if not any(stepped):
            return

        # 2-3. Weight decay and the base step, in canonical coordinates.
        deltas = []
        for i, p in enumerate(params):
            if not stepped[i]:
                deltas.append(torch.zeros_like(points[i]))
                continue
            group = group_of[i]
            points[i].mul_(1 - group["lr"] * group["weight_decay"])
            pooled = None
            if i in frame.rotation_of and not self._uses_muon(group, p):
                pooled = grads[i] * grads[i]
                for member in frame.rotation_of[i]:
                    pooled = _pool_over_blocks(pooled, member)
            delta = self._base_update(p, group, grads[i], pooled)
            deltas.append(delta if moving[i] else torch.zeros_like(delta))

        # 4. Dead directions: no translation, no rotation, no rescaling.
        if freeze:
            for i in frame.centred:
                deltas[i] = deltas[i] - deltas[i].mean(dim=0, keepdim=True)
            for gauge in frame.rotation_gauges:
                idx = [frame.index[m.param] for m in gauge.members]
                projected = F.remove_rotation_component(
                    [to_blocks(deltas[i], m) for i, m in zip(idx, gauge.members)],
                    [to_blocks(points[i], m) for i, m in zip(idx, gauge.members)],
                )
                for i, m, d in zip(idx, gauge.members, projected):
                    deltas[i] = from_blocks(d, m, into=deltas[i])
        new_points = [x + d for x, d in zip(points, deltas)]
        sweeps_after = 0
        # Re-balancing rescales every member of a gauge; with a member that must stay fixed
        # (frozen, no gradient, lr 0) the step skips it: still equivariant, not drift-free.
        scaled_all_moving = all(moving[i] for i in frame.scale_axes)
        if freeze and frame.scale_gauges and scaled_all_moving:
            zeros = [torch.zeros_like(s) for s in self._log_scales]
            back, sweeps_after = frame.solve_scales(new_points, zeros, self._balance_tol(), self.balance_max_iter,
                                                    self.reference_norm, self._zero_level())
            for i in range(len(params)):
                s = frame.scale_tensor(i, back, new_points[i])
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
        self.last_balance_sweeps = (sweeps_before, sweeps_after)

    # -------------------------------------------------------------------------- clipping

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        foreach: bool | None = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters, with the norm
        measured in the canonical frame, so it is the same at every point of a gauge orbit.

        Gauged gradients are measured as DDC's base step sees them (readout gradient
        centred, divided by the scale frame ``S``; rotations do not change norms); other
        gradients as they are. Every gradient is then multiplied by
        ``min(1, max_norm / (total + 1e-6))``, exactly as torch does; multiplying the raw
        gradient by a number multiplies the canonical one by the same number. Returns the
        total norm (a tensor). ``foreach`` is accepted for torch's signature and ignored.
        Call it after ``backward()`` and before ``step()`` (it also warm-starts the frame
        solve of the coming step).
        """
        del foreach
        max_norm, norm_type = float(max_norm), float(norm_type)
        grads: dict[torch.Tensor, torch.Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[p] = p.grad.detach()
        if not grads:
            return torch.tensor(0.0)
        frame = self._frame
        if any(p in grads for p in frame.params):
            canonical = self._to_canonical()[1]
            for p, g in zip(frame.params, canonical):
                if p in grads and g is not None:
                    grads[p] = g
        device = next(iter(grads)).grad.device
        norms = [torch.linalg.vector_norm(g.float() if g.dtype in _LOW_PRECISION else g, norm_type).to(device)
                 for g in grads.values()]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it "
                               f"cannot be clipped; pass error_if_nonfinite=False to clip anyway")
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in grads:
            p.grad.mul_(coefficient.to(p.grad.device, p.grad.dtype))
        return total
