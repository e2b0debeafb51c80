"""The math of a DDC step, as small pure functions (no optimizer state, no modules).

See ``docs/ddc.md`` for how they fit together. Shapes are noted per function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .muon_kernels import adjust_lr, zeropower_via_newtonschulz  # torch's Muon kernels, vendored

__all__ = [
    "init_adam_state",
    "init_muon_state",
    "canonical_levels",
    "closed_form_step",
    "lyapunov_skew",
    "adam_update",
    "muon_update",
    "orthogonalize_svd",
    "orthogonalize_newton_schulz",
    "min_norm_log_scales",
    "remove_rotation_component",
    "muon_adjusted_lr",
]


# ------------------------------------------------------------------------------- state init

def init_adam_state(state: dict, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Adam's state for a parameter whose canonical gradient is ``like`` (in ``dtype`` if
    given), created once: a CPU step counter (as torch's AdamW keeps it) and the two moments."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)


def init_muon_state(state: dict, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Muon's state (the momentum buffer), created once, like ``like`` (in ``dtype`` if given)."""
    if "momentum_buffer" not in state:
        state["momentum_buffer"] = torch.zeros_like(like, dtype=dtype, memory_format=torch.preserve_format)


# ------------------------------------------------------------------------ the canonical point

def canonical_levels(grow0: torch.Tensor, shrink0: torch.Tensor, live: torch.Tensor, level: float,
                     zero_level: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The canonical-point rule (:func:`min_norm_log_scales`): per scale coordinate its
    level ``κ`` and whether it is active, from its grow and shrink sides ``A``, ``B`` at any
    log-scales (what is read is invariant under the coordinate's own scaling). ``live``:
    ``κ`` where both sides are non-zero (the gauge's level times ``ρ²``); where one side is
    zero (``√(AB) ≤ zero_level·ρ²``) ``κ = ±ρ²`` puts the other at squared norm ``ρ²``;
    coordinates with both sides exactly zero are inactive. ``level`` is ``ρ²``."""
    degenerate = (grow0 * shrink0).sqrt() <= zero_level * level
    kappa = torch.where(degenerate, torch.where(grow0 >= shrink0, level, -level), live)
    active = (grow0 > 0) | (shrink0 > 0)
    return kappa, active


def closed_form_step(grow: torch.Tensor, shrink: torch.Tensor, kappa: torch.Tensor, active: torch.Tensor
                     ) -> torch.Tensor:
    """The change of each log-scale that solves its own canonical-point equation
    ``A·e^{2δ} − B·e^{−2δ} = κ`` exactly, the other coordinates held (``A``, ``B``: the
    grow and shrink sides now). With ``x = e^{2δ}``: ``A x² − κ x − B = 0``, whose positive
    root is taken in the form that does not cancel (``κ ≥ 0``: ``(κ + √(κ² + 4AB)) / 2A``;
    else ``2B / (√(κ² + 4AB) − κ)``), which also covers a zero side (κ then puts the other
    at ``|κ|``). Inactive coordinates (both sides zero) do not move. Where no parameter
    couples two gauges this is the canonical point in one evaluation; it is a function of
    invariants at an equivariant start, so equivariant."""
    tiny = torch.finfo(grow.dtype).tiny
    disc = torch.sqrt(kappa * kappa + 4 * grow * shrink)
    x = torch.where(kappa >= 0, (kappa + disc) / (2 * grow).clamp_min(tiny), 2 * shrink / (disc - kappa).clamp_min(tiny))
    return torch.where(active, 0.5 * torch.log(x.clamp_min(tiny)), 0.0)


def adam_update(grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
                lr: float, beta1: float, beta2: float, eps: float,
                grad_sq: torch.Tensor | None = None) -> torch.Tensor:
    """One Adam direction, updating the moments in place; returns the step to *add*.

    The arithmetic follows ``torch.optim.AdamW`` (single-tensor path) operation by
    operation, so with no gauges DDC reproduces it to round-off. ``grad_sq`` replaces
    ``grad * grad`` in the second moment: DDC passes the square pooled over each rotation
    orbit, which makes the preconditioner rotation-invariant (as VectorAdam does).
    """
    exp_avg.lerp_(grad, 1 - beta1)
    if grad_sq is None:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    else:
        exp_avg_sq.mul_(beta2).add_(grad_sq, alpha=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1 - beta2 ** step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    return exp_avg.div(denom).mul_(-lr / bias_correction1)


def orthogonalize_svd(matrix: torch.Tensor, rtol: float = 1e-6, atol: float = 0.0) -> torch.Tensor:
    """Exact orthogonal polar factor ``U Vᵀ`` of ``matrix = U S Vᵀ``, computed in float64.

    Singular values below ``rtol`` times the largest, or below ``atol``, count as zero and
    are dropped. Their singular vectors are round-off noise (a dead ReLU unit gives an
    exactly zero gradient column; upstream of a zero-initialised readout every gradient is
    round-off), and the polar factor's sensitivity to round-off grows like 1/σ_min: with
    the cut-off it is at most ``1/rtol`` (1e-10 relative in float64). Newton–Schulz also
    leaves such directions near zero (its input is divided by ``‖X‖ + eps``, so a matrix
    far below ``eps`` stays far below one); DDC passes Muon's ``eps`` as ``atol``. With that,
    the factor is equivariant to orthogonal maps on either side to round-off; the tests
    use it."""
    x = matrix.double()
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    if s.numel():
        keep = ((s > rtol * s.max()) & (s > atol)).to(u.dtype)
    else:
        keep = s
    ortho = (u * keep) @ vh
    # An exactly zero row or column (a dead unit's gradient) has an exactly zero polar
    # factor row / column; the SVD leaves round-off there, which would revive the unit
    # through ReLU's kink at a sign nobody chose. (Newton–Schulz keeps them exactly zero.)
    ortho = ortho * (x != 0).any(dim=1, keepdim=True) * (x != 0).any(dim=0, keepdim=True)
    return ortho.to(matrix.dtype)


def orthogonalize_newton_schulz(matrix: torch.Tensor, ns_coefficients: tuple[float, float, float],
                                ns_steps: int, eps: float) -> torch.Tensor:
    """torch.optim.Muon's quintic Newton–Schulz iteration (bfloat16), unchanged."""
    return zeropower_via_newtonschulz(matrix, ns_coefficients, ns_steps, eps)


def muon_adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's learning-rate adjustment for a matrix of ``shape`` (2-D view)."""
    return adjust_lr(lr, adjust_lr_fn, shape)


def muon_update(grad: torch.Tensor, momentum_buffer: torch.Tensor, lr: float, momentum: float,
                nesterov: bool, orthogonalizer: str, ns_coefficients: tuple[float, float, float],
                ns_steps: int, eps: float, adjust_lr_fn: str | None) -> torch.Tensor:
    """One Muon direction (torch.optim.Muon's arithmetic), updating the momentum in place;
    returns the step to *add*. Tensors of more than two dimensions (conv filters) are
    orthogonalised as ``(out, in·k·k)`` matrices."""
    momentum_buffer.lerp_(grad, 1 - momentum)
    update = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    matrix = update.reshape(update.shape[0], -1)
    if orthogonalizer == "svd":
        ortho = orthogonalize_svd(matrix, atol=eps)
    else:
        ortho = orthogonalize_newton_schulz(matrix, ns_coefficients, ns_steps, eps)
    adjusted_lr = muon_adjusted_lr(lr, adjust_lr_fn, matrix.shape)
    return ortho.view(grad.shape).to(grad.dtype).mul_(-adjusted_lr)


def min_norm_log_scales(reduced_sq: list[torch.Tensor], axes: list[list[tuple[int, int]]],
                        sizes: list[int], log_scales: list[torch.Tensor], tol: float,
                        max_iter: int, reference_norm: float = 1.0,
                        zero_level: float = 0.0,
                        levels: list[float] | None = None) -> tuple[list[torch.Tensor], int, list[int]]:
    """Kempf–Ness: the log-scales moving a point to the canonical point of its orbit under
    a torus of scale gauges, by a damped Newton method.

    The point is given by one tensor per parameter, ``reduced_sq[p]``: its squared entries
    summed over every axis no gauge scales, leaving one or two gauged axes.
    ``axes[p]`` lists, for those axes in order, ``(gauge, sign)``: the gauge scaling that
    axis and the exponent (+1 or -1). Gauge ``g`` has ``sizes[g]`` coordinates; its
    coordinate ``i`` multiplies the slices ``i`` of its members by ``exp(sign · s_g[i])``.

    Canonical point (see ``docs/ddc.md``, "The canonical point"): the minimiser of the
    convex function ``F(s) = ‖S(s)·θ‖² − 2 Σ_i κ_i s_i``; at it ``A_i − B_i = κ_i`` (A, B the
    scaled squared norms of the growing (+1) and shrinking (−1) slices of coordinate i; a
    moment-map level set). With ``ρ = reference_norm``:

    * both sides non-zero: ``κ_i = levels[g] · ρ²`` (``levels`` default 0: *balanced*,
      ``A_i = B_i``, the minimum-norm point; a norm gain uses 1: the gain keeps its natural
      scale while its consumers' columns are small, and the rule is continuous as they
      go to zero);
    * one side zero (no minimum-norm point: the norm decreases forever along the orbit):
      ``κ_i = ±ρ²``, which puts the non-zero side at squared norm ``ρ²``. Which side is zero
      is gauge-invariant, so the rule is. "Zero" means ``√(A_i B_i)`` (invariant under the
      coordinate's own scaling) at most ``zero_level · ρ²``: a readout centred after a
      logit shift is zero only up to round-off;
    * both sides exactly zero: nothing to scale; the coordinate keeps its value.

    Newton: gradient ``∂F/∂s_i = 2(A_i − B_i − κ_i)``, Hessian applied matrix-free (diagonal
    ``4(A_i + B_i)`` plus the couplings through parameters scaled along two axes), each
    Newton system solved by Jacobi-preconditioned conjugate gradients, then a backtracking
    line search on ``F``. Stops when the largest Newton step is below ``tol`` (log-scale
    units) or after ``max_iter`` Newton steps. Deep chains of overlapping gauges, which make
    coordinate-wise balancing crawl (hundreds of sweeps), take a handful of Newton steps.

    Starts from ``log_scales`` (warm start, not modified); returns the new log-scales, the
    number of Newton steps taken and the gauges still moving by more than ``tol`` when
    ``max_iter`` ran out (empty when the solve converged). Everything is float64.
    """
    s = [x.clone() for x in log_scales]
    if not sizes:
        return s, 0, []
    level = reference_norm ** 2
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)

    def scaled(state: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for x, param_axes in zip(reduced_sq, axes):
            factors = [torch.exp(2 * sign * state[g]) for g, sign in param_axes]
            out.append(factors[0] * x if len(factors) == 1 else factors[0][:, None] * x * factors[1][None, :])
        return out

    def sides(xs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        grow = torch.zeros(offsets[-1], dtype=torch.float64, device=s[0].device)
        shrink = torch.zeros_like(grow)
        for x, param_axes in zip(xs, axes):
            for pos, (g, sign) in enumerate(param_axes):
                norms = x if x.ndim == 1 else x.sum(dim=1 - pos)
                (grow if sign > 0 else shrink)[offsets[g]:offsets[g + 1]] += norms
        return grow, shrink

    # Which coordinates are degenerate does not depend on s (scaling never makes zero non-zero).
    grow0, shrink0 = sides(reduced_sq)
    if levels is None:
        live = torch.zeros_like(grow0)
    else:
        live = torch.cat([torch.full((n,), float(lv) * level, dtype=torch.float64, device=grow0.device)
                          for n, lv in zip(sizes, levels)])
    kappa, active = canonical_levels(grow0, shrink0, live, level, zero_level)

    def flat(state: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(state)

    def split(vector: torch.Tensor) -> list[torch.Tensor]:
        return [vector[offsets[g]:offsets[g + 1]] for g in range(len(sizes))]

    def objective(state: list[torch.Tensor]) -> float:
        return float(sum(x.sum() for x in scaled(state)) - 2 * (kappa * flat(state)).sum())

    def hessian_vector(xs: list[torch.Tensor], diag: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = diag * v
        parts = split(v)
        for x, param_axes in zip(xs, axes):
            if len(param_axes) == 2:
                (g, a), (h, b) = param_axes
                out[offsets[g]:offsets[g + 1]] += 4 * a * b * (x @ parts[h])
                out[offsets[h]:offsets[h + 1]] += 4 * a * b * (x.T @ parts[g])
        return out

    for newton in range(1, max_iter + 1):
        xs = scaled(s)
        grow, shrink = sides(xs)
        grad = torch.where(active, 2 * (grow - shrink - kappa), torch.zeros_like(grow))
        diag = 4 * (grow + shrink)
        precond = torch.where(active, 1 / diag.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(diag))
        step = _conjugate_gradient(lambda v: hessian_vector(xs, diag, v), -grad, precond,
                                   max_iter=max(50, 4 * len(sizes)), atol=1e-3 * tol)
        largest = float(step.abs().max())
        if largest <= tol:
            return s, newton, []
        # Backtracking line search: the exponentials make full Newton steps from far away
        # overshoot. Small steps are taken whole: there the decrease of F is below its
        # round-off, so comparing values of F would only stall the solve.
        t = 1.0
        if largest > 0.1:
            f0, slope = objective(s), float(grad @ step)
            while objective([a + t * b for a, b in zip(s, split(step))]) > f0 + 1e-4 * t * slope and t > 1e-6:
                t *= 0.5
        s = [a + t * b for a, b in zip(s, split(step))]
    return s, max_iter, [g for g, part in enumerate(split(step)) if part.numel() and float(part.abs().max()) * t > tol]


def _conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
                        precond: torch.Tensor, max_iter: int, atol: float, rtol: float = 1e-14) -> torch.Tensor:
    """Preconditioned conjugate gradients for ``apply(x) = rhs`` (symmetric positive
    semi-definite; coordinates where ``precond`` is zero stay zero). Stops when the
    residual is below ``rtol`` of the right-hand side, or when the preconditioned residual
    (the Jacobi estimate of the remaining correction) is below ``atol``: a warm-started
    solve already at its tolerance costs one product."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precond * r
    p = z.clone()
    rz = float(r @ z)
    stop = rtol * float(rhs.abs().max())
    for _ in range(max_iter):
        if float(r.abs().max()) <= stop or float(z.abs().max()) <= atol:
            break
        ap = apply(p)
        curvature = float(p @ ap)
        if curvature <= 0:
            break
        alpha = rz / curvature
        x += alpha * p
        r -= alpha * ap
        z = precond * r
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def remove_rotation_component(deltas: list[torch.Tensor], points: list[torch.Tensor]) -> list[torch.Tensor]:
    """Remove from ``deltas`` their component along the orbit of a block rotation group.

    Each tensor is shaped (n_blocks, block, rest_m): member ``m`` of the gauge, with block
    ``b`` of every member rotated by the same ``R_b``. The orbit's tangent at ``points``
    is ``{(A_b X_{m,b})_m : A_b antisymmetric}``; the orthogonal projection of ``deltas``
    onto it solves, per block, the Lyapunov equation ``A M + M A = C − Cᵀ`` with
    ``M = Σ_m X Xᵀ`` and ``C = Σ_m Δ Xᵀ``. Solved in M's eigenbasis; rotation-equivariant
    because every quantity maps by ``R`` under a rotation of the inputs.
    """
    gram = sum(x @ x.transpose(1, 2) for x in points)
    cross = sum(d @ x.transpose(1, 2) for d, x in zip(deltas, points))
    rhs = cross - cross.transpose(1, 2)
    if gram.shape[-1] == 2:
        # so(2) is one-dimensional: A = a·J, and J M + M J = tr(M)·J for symmetric M.
        trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True).unsqueeze(-1)
        floor = trace.abs().amax() * 1e-12 + torch.finfo(gram.dtype).tiny
        generator = torch.where(trace > floor, rhs / trace.clamp_min(floor), torch.zeros_like(rhs))
        return [d - generator @ x for d, x in zip(deltas, points)]
    generator = lyapunov_skew(gram, rhs)[0]
    return [d - generator @ x for d, x in zip(deltas, points)]


def lyapunov_skew(gram: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The skew ``A`` with ``A M + M A = rhs`` per matrix of the stack ``gram`` (``M``,
    symmetric PSD), solved in M's eigenbasis, and that basis. Pairs of directions with
    ``λ_i + λ_j`` below 1e-12 of the matrix's largest eigenvalue move nothing (the point has
    no extent there); the floor is per matrix, so stacking gauges changes nothing."""
    eigvals, eigvecs = torch.linalg.eigh(gram)
    rhs_eig = eigvecs.transpose(1, 2) @ rhs @ eigvecs
    denom = eigvals.unsqueeze(-1) + eigvals.unsqueeze(-2)
    floor = eigvals.abs().amax(dim=-1, keepdim=True).unsqueeze(-1) * 1e-12 + torch.finfo(gram.dtype).tiny
    a_eig = torch.where(denom > floor, rhs_eig / denom.clamp_min(floor), torch.zeros_like(rhs_eig))
    return eigvecs @ a_eig @ eigvecs.transpose(1, 2), eigvecs
