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

from . import functional as F
from .muon_kernels import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS as MUON_EPS
from .frame import Frame
from .gauges import Gauge
from .layout import StepLayout
from .param_groups import param_groups
from .step import BaseState, FrameState, MuonOptions, ParamOptions, StepOptions, base_step, ddc_step
from .verify import unwrap_model, verify_declarations

BASES = ("adam", "muon")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
DEAD_MODES = ("freeze", "free")
ORTHOGONALIZERS = ("svd", "newton_schulz")
ROTATION_SOLVES = ("eigh", "cg")


def _age_key(basis_key: str) -> str:
    """The state key of a rotation basis's age (steps since its eigh), beside the basis."""
    return basis_key.replace("ddc_rotation_basis", "ddc_rotation_age")


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
            Muon baseline (Muon on hidden matrices, AdamW on the rest). Declared gauges are
            proven on ``example_input`` with ``loss`` when it is given (a false one raises
            ``GaugeDeclarationError``), and said to be unverified otherwise
            (:func:`ddc.verify.verify_declarations`).
        base: ``"adam"`` or ``"muon"``.
        lr, weight_decay: learning rate and decoupled weight decay (for a module, applied
            to parameters with two or more dimensions only).
        betas, eps: Adam's coefficients (the Adam part of either base).
        momentum, nesterov, ns_coefficients, ns_steps, ns_eps, adjust_lr_fn: Muon's
            options, as in ``torch.optim.Muon``.
        orthogonalizer: ``"svd"`` (default): the exact polar factor, computed in float64,
            equivariant under every gauge DDC enforces; ``"newton_schulz"``: torch's
            bfloat16 Newton–Schulz iteration, faster but not exact under the head rotations
            and scalings (measured deviation in README, "DDC"), an explicit option.
        dead_mode: ``"freeze"`` (default): updates never move along gauge orbits, and
            the scale-gauge coordinates stay exactly where they are; ``"free"``: the base
            step's own component along the orbits is kept (still equivariant).
        balance_tol, balance_max_iter: stopping rule of the adaptive balancing solve
            (Newton steps), in log-scale units; ``None`` picks 1e-12 for float64 and 1e-6
            otherwise. If the cap is reached DDC warns once, naming the gauges. The
            reference step (``foreach=False``) balances this way every step; the batched
            step only at the first step (the frame's state init).
        balance_steps, balance_cg_steps: the batched step's fixed balancing schedule after
            the first step. Each solve (two a step) starts with a closed-form step per
            coordinate, which is the solution where no parameter couples two gauges; where
            some do (an MLP's up projection in a unit gauge and a norm gain), it then takes
            ``balance_steps`` rounds of one Newton step (``balance_cg_steps`` CG iterations)
            and one closed-form step. No host reads, and exactly equivariant whatever the
            counts (``docs/ddc.md``, "Fixed schedules"); the counts decide how close the
            frame is to the canonical point, which :meth:`balance_residual` reports.
            Defaults (``None``): in float64, 4 rounds and CG iterations twice the longest
            chain of coupled gauges, at least 8; in float32, 2 rounds and that chain's
            length, at least 4 (2 where no chain is longer than one coupling; measured:
            ``docs/ddc.md``). In dead_mode ``"freeze"`` the
            solve at the start of a step is the closed-form step alone (one round with
            bf16/fp16 gauged parameters): the last step left the frame canonical.
        reference_norm: ρ, the one absolute scale of the canonical frame (see
            ``docs/ddc.md``, "The canonical point"): where one side of a scale gauge
            coordinate is zero (a zero-initialised readout or down projection, a dead unit)
            the non-zero side gets norm ρ; a norm gain's side exceeds its consumers' by ρ²
            in squared norm (``ScaleGauge.level``).
        foreach: ``True`` (default): the batched step (``ddc/step_batched.py``);
            ``False``: the readable reference step (``ddc/step_reference.py``), one
            parameter at a time. Both compute the same step, through one function
            (:func:`ddc.step.ddc_step`) and the same rules.
        compile: with ``foreach``, run the batched step's tensor work through
            ``torch.compile`` (``docs/ddc.md``, "The batched step"): every step after the
            first as one compiled graph, after a one-off compilation (about 45 s for GPT
            ``small`` on a CPU core); the same step to round-off.
        rotation_solve: how the batched step solves the so(d) projection of head
            rotations with blocks wider than 2 (a Lyapunov equation per head):
            ``"eigh"`` (default), a batched eigendecomposition every step, as the
            reference; ``"cg"``: ``rotation_cg_steps`` conjugate-gradient iterations
            preconditioned by the eigenbasis of an earlier step, taken afresh by ``eigh``
            every ``rotation_refresh_every`` steps: a fixed schedule, no host reads, exactly
            equivariant for any counts (the basis moves with the gauge); how close it comes
            to the eigh solve is certified off the hot path (:meth:`rotation_residual`).
            Much faster where the batched ``eigh`` is slow (CUDA, heads wider than 32:
            ``docs/ddc.md``, "The batched step"), but keeps that basis, ``d × d`` per head,
            in the optimizer state (so a resumed run continues identically): more than the
            per-row vectors the default keeps beyond AdamW's state.
        rotation_cg_steps, rotation_refresh_every: that schedule (defaults 16 and 8).
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
        orthogonalizer: str = "svd",
        dead_mode: str = "freeze",
        balance_tol: float | None = None,
        balance_max_iter: int = 50,
        balance_steps: int | None = None,
        balance_cg_steps: int | None = None,
        reference_norm: float = 1.0,
        example_input: Any = None,
        loss: Any = "required",   # no loss assumed: find_gauges names the accepted values
        foreach: bool = True,
        compile: bool = False,
        rotation_solve: str = "eigh",
        rotation_cg_steps: int = 16,
        rotation_refresh_every: int = 8,
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
        if any(n is not None and n < 1 for n in (balance_steps, balance_cg_steps)):
            raise ValueError(f"balance_steps and balance_cg_steps must be at least 1, or None, got "
                             f"{balance_steps} and {balance_cg_steps}")
        if rotation_cg_steps < 0 or rotation_refresh_every < 1:
            raise ValueError(f"rotation_cg_steps must be at least 0 and rotation_refresh_every at least 1, got "
                             f"{rotation_cg_steps} and {rotation_refresh_every}")
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
        self.balance_steps = None if balance_steps is None else int(balance_steps)
        self.balance_cg_steps = None if balance_cg_steps is None else int(balance_cg_steps)
        #: Newton rounds of the solve at the start of a step in dead_mode "freeze" (the batched
        #: step), after its closed-form step: 0, as the last step's re-balancing left the frame
        #: canonical for the parameters as they are (``balance_residual`` certifies it); 1
        #: where a gauged parameter is bf16/fp16, as rounding on the write moves it off the
        #: canonical point (measured: bf16 Muon then differs from the reference by 2.5e-2).
        self.balance_steps_before = 0
        self.reference_norm = reference_norm
        self.foreach = bool(foreach)
        self.compile = bool(compile)
        self.rotation_solve = rotation_solve
        self.rotation_cg_steps = int(rotation_cg_steps)
        self.rotation_refresh_every = int(rotation_refresh_every)
        self._layout: StepLayout | None = None   # the gauges' layout on the parameters' device, built at the first step
        self.gauges = list(gauges or [])
        verify_declarations(model, gauges, example_input, loss)   # a false hand declaration is refused here
        self._frame = Frame(self.gauges)
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
        # rotation_solve="cg" keeps the eigenbasis of the last eigh per rotation gauge (the
        # preconditioner of its CG, ``ddc.functional.lyapunov_skew_cg``) and the steps since
        # (a CPU counter, ``..._age``) in the state of a member the optimizer owns, so a
        # resumed run continues identically.
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

    def _frame_initialised(self) -> bool:
        """Whether every scale gauge's log-scales are in the state (after the first step,
        or loaded from a checkpoint)."""
        return all(key in self.state.get(param, {}) if param is not None else g in self._unanchored
                   for g, (param, key) in enumerate(self._anchors))

    @torch.no_grad()
    def balance_residual(self) -> float:
        """How far the stored scale frame is from the canonical point of the parameters as
        they are now: the largest Jacobi estimate of the balancing's Newton step there, in
        log-scale units (0.0 without scale gauges). A host read, for certifying the batched
        step's fixed balancing schedule off the hot path (tests, monitoring): after a step
        it is what the schedule left, about ``balance_tol`` when it converged."""
        frame = self._frame
        if not frame.scale_gauges:
            return 0.0
        layout = self._layout_on(frame.params[0].device)
        points = self._centred_points()
        log_scales = torch.cat(self._log_scales).to(layout.device)
        return float(layout.scales.residual(*layout.scales.reduce(points), log_scales, self.reference_norm ** 2,
                                            self._zero_level()))

    @torch.no_grad()
    def rotation_residual(self) -> float:
        """How well ``rotation_solve="cg"``'s fixed schedule solves the so(d) projections
        at the parameters as they are now: the largest relative residual of the Lyapunov
        equation (:func:`ddc.functional.lyapunov_residual`) left by ``rotation_cg_steps``
        CG iterations in the stored bases, probed with the current gradients as the step
        (canonical coordinates). 0.0 without stored bases. A host read, off the hot path."""
        frame = self._frame
        bases = self._rotation_bases()
        if not any(b is not None for b in bases):
            return 0.0
        layout = self._layout_on(frame.params[0].device)
        points = self._centred_points()
        log_scales = torch.cat(self._log_scales).to(layout.device) if frame.scale_gauges else None
        factors = layout.scales.factors(log_scales, points[0].dtype, points)[0] if log_scales is not None \
            else [None] * len(points)
        grads = [p.grad.detach().to(points[0].dtype) if p.grad is not None else torch.zeros_like(x)
                 for p, x in zip(frame.params, points)]
        points = [x if f is None else x * f for x, f in zip(points, factors)]
        grads = [g if f is None else g / f for g, f in zip(grads, factors)]
        worst = 0.0
        for r, members in enumerate(layout.rotations):
            if bases[r] is None:   # RoPE pairs (closed form), or no basis yet
                continue
            gram, rhs = F.rotation_system([m.get(grads[m.index]) for m in members],
                                          [m.get(points[m.index]) for m in members],
                                          layout.rotation_shares(r), layout.rotation_blocks(r))
            generator = F.lyapunov_skew_cg(bases[r], gram, rhs, self.rotation_cg_steps)
            worst = max(worst, float(F.lyapunov_residual(gram, rhs, generator)))
        return worst

    def _centred_points(self) -> list[torch.Tensor]:
        """The gauged parameters in the working precision, the readouts centred."""
        points = [p.detach().to(self._work_dtype()) for p in self._frame.params]
        for i in self._frame.centred:
            points[i] = points[i] - points[i].mean(dim=0, keepdim=True)
        return points

    @_log_scales.setter
    def _log_scales(self, values: list[torch.Tensor]) -> None:
        for g, ((param, key), value) in enumerate(zip(self._anchors, values)):
            if param is None:
                self._unanchored[g] = value
            else:
                self.state[param][key] = value

    def _store_log_scales(self, flat: torch.Tensor, sizes: list[int]) -> None:
        """Store the flat frame: copied into the stored vectors once they exist (one
        operator, no fresh tensors each step), else as fresh per-gauge copies (a view would
        keep the whole flat tensor alive in the state)."""
        parts = flat.split(sizes)
        if self._frame_initialised():
            torch._foreach_copy_(self._log_scales, list(parts))
        else:
            self._log_scales = [x.clone() for x in parts]

    def _rotation_bases(self) -> list[torch.Tensor | None]:
        """The stored eigenbasis of each rotation gauge (``rotation_solve="cg"``; None where none)."""
        return [self.state[param].get(key) if param is not None and param in self.state else None
                for param, key in self._rotation_anchors]

    def _rotation_refresh(self) -> bool | torch.Tensor:
        """Whether this step takes fresh bases by ``eigh`` (the fixed schedule: every
        ``rotation_refresh_every`` steps, or where a gauge has none). The ages are CPU
        counters: reading them is no device synchronisation. Traced by ``torch.compile``
        the answer is a 0-d bool tensor (no read; the step branches with ``torch.cond``)."""
        ages = []
        for (param, key), gauge in zip(self._rotation_anchors, self._frame.rotation_gauges):
            if param is None or gauge.block == 2:   # RoPE pairs: closed form, no basis
                continue
            age = self.state[param].get(_age_key(key)) if param in self.state else None
            if key not in self.state.get(param, {}) or age is None:
                return True
            ages.append(age)
        if not ages:
            return False
        if torch.compiler.is_compiling():
            return (torch.stack(ages) >= self.rotation_refresh_every).any()
        return any(int(age) >= self.rotation_refresh_every for age in ages)

    def _store_rotation_bases(self, bases: list[torch.Tensor | None], refreshed: bool | torch.Tensor) -> None:
        for (param, key), basis in zip(self._rotation_anchors, bases):
            if param is None or basis is None:
                continue
            state = self.state[param]
            state[key] = basis
            if _age_key(key) not in state:
                state[_age_key(key)] = torch.tensor(0.0)
            age = state[_age_key(key)]
            if isinstance(refreshed, torch.Tensor):
                age.copy_(torch.where(refreshed, 1.0, age + 1))
            elif refreshed:
                age.fill_(1.0)
            else:
                age += 1

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, except that the log-scales stay float64 (torch would
        cast them to the parameter's dtype) and the rotation bases' ages stay CPU counters,
        so a resumed run continues with identical steps."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        by_id = dict(zip(saved_ids, params))
        kept = {(i, key): value for i, st in state_dict["state"].items() for key, value in st.items()
                if isinstance(key, str) and key.startswith(("ddc_log_scales", "ddc_rotation_"))}
        super().load_state_dict(state_dict)
        for (i, key), value in kept.items():
            if i not in by_id:
                continue
            p = by_id[i]
            if key.startswith("ddc_log_scales"):
                value = value.detach().to(dtype=torch.float64, device=p.device)
            elif key.startswith("ddc_rotation_age"):
                value = value.detach().to(device="cpu")
            else:  # a basis, in its own (working) precision, as saved
                value = value.detach().to(device=p.device)
            self.state[p][key] = value.clone()

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

    def _options(self, group: dict[str, Any], p: torch.Tensor) -> ParamOptions:
        """The numbers of ``p``'s step (its group's, now: a scheduler may have changed them)."""
        muon = None
        if self._uses_muon(group, p):
            muon = MuonOptions(self._muon_momentum(group), group["nesterov"], self.orthogonalizer,
                               tuple(group["ns_coefficients"]), group["ns_steps"], group["ns_eps"],
                               group["adjust_lr_fn"])
        return ParamOptions(group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"], muon)

    def _base_state(self, params: list[torch.Tensor], likes: list[torch.Tensor | None], options: list[Any],
                    dtype: torch.dtype | None = None) -> BaseState:
        """The base state of ``params`` as lists, created (:func:`ddc.functional.init_adam_state`
        / ``init_muon_state``, like ``likes[i]`` in ``dtype``) for each with a ``likes`` entry."""
        state = BaseState([], [], [], [])
        for p, like, o in zip(params, likes, options):
            st = self.state[p] if like is not None else {}
            if like is not None:
                (F.init_muon_state if o.muon is not None else F.init_adam_state)(st, like, dtype)
            state.exp_avgs.append(st.get("exp_avg"))
            state.exp_avg_sqs.append(st.get("exp_avg_sq"))
            state.steps.append(st.get("step"))
            state.momentum_buffers.append(st.get("momentum_buffer"))
        return state

    def _layout_on(self, device: torch.device) -> StepLayout:
        if self._layout is None or self._layout.device != device:
            self._layout = StepLayout(self._frame, device)
        return self._layout

    def _step_options(self) -> StepOptions:
        return StepOptions(work=self._work_dtype(), freeze=self.dead_mode == "freeze",
                           reference_norm=self.reference_norm, zero_level=self._zero_level(),
                           balance_tol=self._balance_tol(), balance_max_iter=self.balance_max_iter,
                           balance_steps=self.balance_steps, balance_cg_steps=self.balance_cg_steps,
                           balance_steps_before=max(self.balance_steps_before, int(any(
                               p.dtype in _LOW_PRECISION for p in self._frame.params))), rotation_solve=self.rotation_solve,
                           rotation_cg_steps=self.rotation_cg_steps, compiled=self.compile)

    # ------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step (``closure`` re-evaluates the loss, as usual)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        frame = self._frame
        gauged_options: list[ParamOptions | None] = [None] * len(frame.params)
        plain: list[torch.Tensor] = []
        plain_options: list[ParamOptions] = []
        for group in self.param_groups:
            # One ParamOptions per group and kind (Adam or Muon) this step: the batched
            # step groups parameters by equal options, and equal objects hash once.
            kinds: dict[bool, ParamOptions] = {}
            for p in group["params"]:
                i = frame.index.get(p)
                if i is None and p.grad is None:
                    continue
                muon = self._uses_muon(group, p)
                if muon not in kinds:
                    kinds[muon] = self._options(group, p)
                if i is not None:
                    gauged_options[i] = kinds[muon]
                else:
                    plain.append(p)
                    plain_options.append(kinds[muon])

        if plain:
            # No gauge acts on these: exactly the base optimizer's step (for bf16/fp16
            # parameters computed, and its state kept, in float32).
            grads = [p.grad.float() if p.grad.dtype in _LOW_PRECISION else p.grad for p in plain]
            state = self._base_state(plain, grads, plain_options)
            base_step(plain, [p.grad for p in plain], plain_options, state, foreach=self.foreach)
        grads = [p.grad if o is not None else None for p, o in zip(frame.params, gauged_options)]
        if any(g is not None for g in grads):
            work = self._work_dtype()
            layout = self._layout_on(frame.params[0].device)
            # (the likes give only shape, device and layout: zeros_like of a parameter under
            # no_grad needs no detach)
            state = self._base_state(frame.params, [p if g is not None else None for p, g in zip(frame.params, grads)],
                                     gauged_options, work)
            rotation = self.rotation_solve == "cg" and self.foreach
            refresh = rotation and self._rotation_refresh()
            log_scales = torch.cat(self._log_scales).to(layout.device) if frame.scale_gauges \
                else torch.zeros(0, dtype=torch.float64, device=layout.device)
            frame_state = FrameState(log_scales, self._frame_initialised(),
                                     self._rotation_bases() if rotation else [None] * len(frame.rotation_gauges),
                                     refresh)
            report = ddc_step(layout, frame.params, grads, gauged_options, state, frame_state,
                              self._step_options(), foreach=self.foreach)
            if frame.scale_gauges:
                self._store_log_scales(report.log_scales, layout.scales.sizes)
            if rotation:
                self._store_rotation_bases(report.rotation_bases, refresh)
            frame.warn_unsettled(report.unsettled, self._balance_tol(), self.balance_max_iter)
            self.last_balance_sweeps = report.sweeps
        return loss

    def _balance_tol(self) -> float:
        if self.balance_tol is not None:
            return self.balance_tol
        return 1e-12 if self._work_dtype() == torch.float64 else 1e-6

    def _work_dtype(self) -> torch.dtype:
        """Precision of the frame, projections and gauged state: float64 if any gauged
        parameter is float64, else float32 (bfloat16 and float16 parameters included)."""
        return torch.float64 if any(p.dtype == torch.float64 for p in self._frame.params) else torch.float32

    def _canonical_grads(self) -> list[torch.Tensor | None]:
        """The gradients of every gauged parameter as the base step sees them (working
        precision, readout gradients centred, divided by the scale frame ``S``, which is
        solved here and stored: the warm start of the coming step)."""
        frame = self._frame
        work = self._work_dtype()
        grads = [p.grad.detach().to(work) if p.grad is not None else None for p in frame.params]
        for i in frame.centred:
            if grads[i] is not None:
                grads[i] = grads[i] - grads[i].mean(dim=0, keepdim=True)
        if not frame.scale_gauges:
            return grads
        layout = self._layout_on(frame.params[0].device)
        system = layout.scales
        r1, xs = system.reduce(self._centred_points())
        warm = torch.cat(self._log_scales).to(layout.device)
        level = self.reference_norm ** 2
        if self.foreach and self._frame_initialised():
            # As the batched step's own solve from the stored frame (the same fixed
            # schedule and start): no host read, and the step's solve then starts where
            # this left it.
            start = system.start(r1, xs, warm, level, self._zero_level())
            s = system.balance(warm, r1, xs, *start, *self._step_options().warm_schedule(system))
        else:
            first = system.first_system(r1, xs, warm, level, self._zero_level())
            s, _, unsettled = system.solve(r1, xs, warm, self._balance_tol(), self.balance_max_iter, first)
            frame.warn_unsettled(unsettled, self._balance_tol(), self.balance_max_iter)
        self._store_log_scales(s, system.sizes)
        factors = system.factors(s, work, [p.detach() for p in frame.params])[0]
        return [g if g is None or f is None else g / f for g, f in zip(grads, factors)]

    def _zero_level(self) -> float:
        # A side of a scale coordinate counts as zero below √eps of the working precision.
        return torch.finfo(self._work_dtype()).eps ** 0.5

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
        total norm (a tensor); where a gradient is not finite, torch's total (``inf`` for an
        infinite gradient, ``nan`` for a nan). ``foreach`` is accepted for torch's signature and ignored.
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
        device = next(iter(grads)).grad.device
        # torch's total of the raw gradients: where it is not finite (an inf or nan
        # gradient), DDC returns it as torch does. The canonical one would read nan for an
        # inf in a centred readout (inf − inf). Finiteness is the same along a gauge orbit.
        raw_total = torch.linalg.vector_norm(torch.stack([
            torch.linalg.vector_norm(g.float() if g.dtype in _LOW_PRECISION else g, norm_type).to(device)
            for g in grads.values()]), norm_type)
        frame = self._frame
        if any(p in grads for p in frame.params):
            canonical = self._canonical_grads()
            for p, g in zip(frame.params, canonical):
                if p in grads and g is not None:
                    grads[p] = g
        norms = [torch.linalg.vector_norm(g.float() if g.dtype in _LOW_PRECISION else g, norm_type).to(device)
                 for g in grads.values()]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        total = torch.where(torch.isfinite(raw_total), total.to(raw_total.dtype), raw_total)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it "
                               f"cannot be clipped; pass error_if_nonfinite=False to clip anyway")
        coefficient = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in grads:
            p.grad.mul_(coefficient.to(p.grad.device, p.grad.dtype))
        return total
