"""The math of a DDC step, as small pure functions (no optimizer state, no modules).

See ``docs/ddc.md`` for how they fit together. Shapes are noted per function.
"""

from __future__ import annotations

import math

import torch

from .muon_kernels import adjust_lr, zeropower_via_newtonschulz  # torch's Muon kernels, vendored

__all__ = [
    "adam_update",
    "muon_update",
    "orthogonalize_svd",
    "orthogonalize_newton_schulz",
    "min_norm_log_scales",
    "remove_rotation_component",
    "muon_adjusted_lr",
]


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


def orthogonalize_svd(matrix: torch.Tensor, rtol: float = 1e-6) -> torch.Tensor:
    """Exact orthogonal polar factor ``U Vᵀ`` of ``matrix = U S Vᵀ``, computed in float64.

    Singular values below ``rtol`` times the largest count as zero and are dropped. Their
    singular vectors are round-off noise (a dead ReLU unit gives an exactly zero gradient
    column), and the polar factor's sensitivity to round-off grows like 1/σ_min: with
    the cut-off it is at most ``1/rtol`` (1e-10 relative in float64). Newton–Schulz also
    leaves such directions near zero. With that, the factor is equivariant to orthogonal
    maps on either side to round-off; the tests use it."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = (s > rtol * s.max()).to(u.dtype) if s.numel() else s
    return ((u * keep) @ vh).to(matrix.dtype)


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
        ortho = orthogonalize_svd(matrix)
    else:
        ortho = orthogonalize_newton_schulz(matrix, ns_coefficients, ns_steps, eps)
    adjusted_lr = muon_adjusted_lr(lr, adjust_lr_fn, matrix.shape)
    return ortho.view(grad.shape).to(grad.dtype).mul_(-adjusted_lr)


def min_norm_log_scales(reduced_sq: list[torch.Tensor], axes: list[list[tuple[int, int]]],
                        sizes: list[int], log_scales: list[torch.Tensor], tol: float,
                        max_iter: int) -> tuple[list[torch.Tensor], int]:
    """Kempf–Ness: the log-scales moving a point to the minimum-norm point of its orbit
    under a torus of scale gauges, by exact block-coordinate descent.

    The point is given by one tensor per parameter, ``reduced_sq[p]``: its squared entries
    summed over every axis no gauge scales, leaving one or two gauged axes.
    ``axes[p]`` lists, for those axes in order, ``(gauge, sign)``: the gauge scaling that
    axis and the exponent (+1 or -1). Gauge ``g`` has ``sizes[g]`` coordinates; its
    coordinate ``i`` multiplies the slices ``i`` of its members by ``exp(sign · s_g[i])``.

    The squared norm of the scaled point is convex in ``s`` and separable within one
    gauge, so each gauge has a closed-form update given the others:
    ``s_g += ¼ (log B − log A)``, ``A`` and ``B`` the scaled squared norms of the slices
    that grow (+1) and shrink (−1) with ``s_g``. Sweeps repeat until the largest update is
    below ``tol`` (in log-scale units) or ``max_iter`` sweeps. At the minimum every gauge
    is *balanced*: ``A = B`` coordinate by coordinate (the moment map vanishes).

    Starts from ``log_scales`` (warm start, not modified); returns the new log-scales and
    the number of sweeps taken. Everything is float64.
    """
    s = [x.clone() for x in log_scales]
    members_of: list[list[tuple[int, int]]] = [[] for _ in sizes]  # gauge -> (param, axis position)
    for p, param_axes in enumerate(axes):
        for pos, (gauge, _) in enumerate(param_axes):
            members_of[gauge].append((p, pos))
    tiny = torch.finfo(torch.float64).tiny
    for sweep in range(1, max_iter + 1):
        largest = 0.0
        for g, members in enumerate(members_of):
            grow = torch.zeros(sizes[g], dtype=torch.float64, device=s[g].device)
            shrink = torch.zeros_like(grow)
            for p, pos in members:
                norms = _scaled_slice_norms(reduced_sq[p], axes[p], s, pos)
                if axes[p][pos][1] > 0:
                    grow += norms
                else:
                    shrink += norms
            # A dead unit (all-zero slices on one side) has no finite minimum: leave it.
            delta = 0.25 * (torch.log(shrink + tiny) - torch.log(grow + tiny))
            delta = torch.where((grow > 0) & (shrink > 0), delta, torch.zeros_like(delta))
            s[g] += delta
            largest = max(largest, float(delta.abs().max()) if delta.numel() else 0.0)
        if largest <= tol:
            return s, sweep
    return s, max_iter


def _scaled_slice_norms(reduced_sq: torch.Tensor, param_axes: list[tuple[int, int]],
                        log_scales: list[torch.Tensor], pos: int) -> torch.Tensor:
    """Squared norms of the slices along gauged axis ``pos`` after scaling every axis."""
    factors = [torch.exp(2 * sign * log_scales[gauge]) for gauge, sign in param_axes]
    if len(factors) == 1:
        return factors[0] * reduced_sq
    if pos == 0:
        return factors[0] * (reduced_sq @ factors[1])
    return factors[1] * (reduced_sq.T @ factors[0])


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
    eigvals, eigvecs = torch.linalg.eigh(gram)
    rhs_eig = eigvecs.transpose(1, 2) @ rhs @ eigvecs
    denom = eigvals.unsqueeze(-1) + eigvals.unsqueeze(-2)
    # Directions with λ_i + λ_j ≈ 0 move nothing (the point has no extent there).
    floor = eigvals.abs().amax(dim=-1, keepdim=True).unsqueeze(-1) * 1e-12 + torch.finfo(gram.dtype).tiny
    a_eig = torch.where(denom > floor, rhs_eig / denom.clamp_min(floor), torch.zeros_like(rhs_eig))
    generator = eigvecs @ a_eig @ eigvecs.transpose(1, 2)
    return [d - generator @ x for d, x in zip(deltas, points)]
