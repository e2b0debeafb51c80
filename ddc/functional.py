"""The math of a DDC step, as small pure functions (no optimizer state, no modules).

See ``docs/ddc.md`` for how they fit together. Shapes are noted per function.
"""

from __future__ import annotations

import math
import torch

from .balancing import canonical_levels, closed_form_step, min_norm_log_scales  # the balancing rule
from .muon_kernels import adjust_lr, zeropower_via_newtonschulz  # torch's Muon kernels, vendored

__all__ = [
    "init_adam_state",
    "init_muon_state",
    "canonical_levels",
    "closed_form_step",
    "pool_blocks",
    "rotation_system",
    "pair_generator",
    "apply_generator",
    "lyapunov_skew",
    "lyapunov_skew_cg",
    "lyapunov_residual",
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


def pool_blocks(blocks: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The rotation-pooled second moment: ``blocks`` (n_blocks, block, rest) averaged over
    each block (the entries one orthogonal map mixes), as VectorAdam pools a vector's
    coordinates, which makes Adam's preconditioner rotation-invariant. ``dim``: the
    dimension that runs within a block, for blocks laid out otherwise (a stack of
    parameters with the rotated axis split in two, :class:`ddc.layout._StackedBlocks`)."""
    return blocks.mean(dim=dim, keepdim=True).expand_as(blocks)


def _to_gauge_blocks(per_block: torch.Tensor, share: torch.Tensor | None, n_blocks: int | None) -> torch.Tensor:
    """``per_block`` (one matrix per member block) summed into the gauge's blocks: block
    ``j`` into ``share[j]`` (a rotation shared by several blocks, grouped-query attention);
    unchanged where ``share`` is None (block ``j`` is the gauge's block ``j``)."""
    if share is None:
        return per_block
    out = per_block.new_zeros((n_blocks,) + per_block.shape[1:])
    return out.index_add_(0, share, per_block)


def _sum_of_products(lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> torch.Tensor:
    """``Σ_m L_m R_mᵀ`` over a list of stacks (n, block, rest_m), accumulated in place."""
    total = torch.bmm(lefts[0], rights[0].transpose(1, 2))
    for left, right in zip(lefts[1:], rights[1:]):
        total.baddbmm_(left, right.transpose(1, 2))
    return total


def rotation_system(deltas: list[torch.Tensor], points: list[torch.Tensor],
                    shares: list[torch.Tensor | None] | None = None, n_blocks: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The so(block) projection's equation per block: ``M = Σ_m X Xᵀ`` and ``C − Cᵀ`` with
    ``C = Σ_m Δ Xᵀ`` (tensors (n_blocks, block, rest_m) per member ``m``).

    ``shares`` (a shared rotation, :class:`ddc.gauges.SharedRotation`): per member, the
    gauge block each of its blocks is rotated by (None: its own index); the gauge has
    ``n_blocks`` blocks, and ``M``, ``C`` sum over every member block that shares one: the
    tangent of the orbit is ``A_{share[j]} X_j``, so the projection's normal equation for
    ``A_g`` gathers all of them."""
    if shares is None or all(s is None for s in shares):
        gram = _sum_of_products(points, points)
        cross = _sum_of_products(deltas, points)
    else:
        gram = sum(_to_gauge_blocks(torch.bmm(x, x.transpose(1, 2)), s, n_blocks) for x, s in zip(points, shares))
        cross = sum(_to_gauge_blocks(torch.bmm(d, x.transpose(1, 2)), s, n_blocks)
                    for d, x, s in zip(deltas, points, shares))
    return gram, cross - cross.transpose(1, 2)


def pair_generator(gram: torch.Tensor, rhs: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The so(2) solution of ``A M + M A = rhs`` (RoPE pairs): so(2) is one-dimensional,
    ``A = a·J``, and ``J M + M J = tr(M)·J`` for symmetric M, so ``A = rhs / tr(M)``; pairs
    with a trace below 1e-12 of the gauge's largest move nothing. The stack holds
    ``groups`` gauges of equal size one after the other (the floor is per gauge, so
    stacking gauges changes nothing)."""
    # Shaped (groups, pairs of a gauge, 1, 1): the floor broadcasts over each gauge's pairs.
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).view(groups, -1, 1, 1)
    floor = trace.abs().amax(dim=1, keepdim=True) * 1e-12 + torch.finfo(gram.dtype).tiny
    pairs = rhs.reshape(groups, -1, 2, 2)
    return torch.where(trace > floor, pairs / trace.clamp_min(floor), 0.0).reshape(rhs.shape)


def apply_generator(deltas: list[torch.Tensor], points: list[torch.Tensor], generator: torch.Tensor,
                    shares: list[torch.Tensor | None] | None = None, in_place: bool = False
                    ) -> list[torch.Tensor]:
    """``Δ − A X`` per member: the deltas without their component along the orbit
    (``shares``: as in :func:`rotation_system`, block ``j`` takes ``A_{share[j]}``).
    ``in_place``: written into ``deltas`` (returned), the same arithmetic."""
    shares = shares or [None] * len(deltas)
    generators = [generator if s is None else generator.index_select(0, s) for s in shares]
    if in_place:
        return [d.baddbmm_(a, x, alpha=-1) for d, x, a in zip(deltas, points, generators)]
    return [torch.baddbmm(d, a, x, alpha=-1) for d, x, a in zip(deltas, points, generators)]


def remove_rotation_component(deltas: list[torch.Tensor], points: list[torch.Tensor], groups: int = 1,
                              shares: list[torch.Tensor | None] | None = None, n_blocks: int | None = None
                              ) -> list[torch.Tensor]:
    """Remove from ``deltas`` their component along the orbit of a block rotation group.

    Each tensor is shaped (n_blocks, block, rest_m): member ``m`` of the gauge, with block
    ``b`` of every member rotated by the same ``R_b``. The orbit's tangent at ``points``
    is ``{(A_b X_{m,b})_m : A_b antisymmetric}``; the orthogonal projection of ``deltas``
    onto it solves, per block, the Lyapunov equation ``A M + M A = C − Cᵀ`` with
    ``M = Σ_m X Xᵀ`` and ``C = Σ_m Δ Xᵀ`` (:func:`rotation_system`): in closed form for
    pairs (:func:`pair_generator`), else in M's eigenbasis (:func:`lyapunov_skew`).
    Rotation-equivariant because every quantity maps by ``R`` under a rotation of the
    inputs. ``groups``: the stacks hold that many gauges of equal size one after the other.
    ``shares`` / ``n_blocks``: a rotation shared by several member blocks (grouped-query
    attention), see :func:`rotation_system`.
    """
    gram, rhs = rotation_system(deltas, points, shares, n_blocks)
    if gram.shape[-1] == 2:
        generator = pair_generator(gram, rhs, groups)
    else:
        generator = lyapunov_skew(gram, rhs)[0]
    return apply_generator(deltas, points, generator, shares)


def lyapunov_skew(gram: torch.Tensor, rhs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The skew ``A`` with ``A M + M A = rhs`` per matrix of the stack ``gram`` (``M``,
    symmetric PSD), solved in M's eigenbasis, and that basis. Pairs of directions with
    ``λ_i + λ_j`` below 1e-12 of the matrix's largest eigenvalue move nothing (the point has
    no extent there); the floor is per matrix, so stacking gauges changes nothing."""
    eigvals, eigvecs = torch.linalg.eigh(gram)
    rhs_eig = torch.bmm(torch.bmm(eigvecs.transpose(1, 2), rhs), eigvecs)  # bmm: matmul's views cost ops
    denom = eigvals.unsqueeze(-1) + eigvals.unsqueeze(-2)
    floor = eigvals.abs().amax(dim=-1, keepdim=True).unsqueeze(-1) * 1e-12 + torch.finfo(gram.dtype).tiny
    a_eig = torch.where(denom > floor, rhs_eig / denom.clamp_min(floor), 0.0)
    return torch.bmm(torch.bmm(eigvecs, a_eig), eigvecs.transpose(1, 2)), eigvecs


def lyapunov_skew_cg(basis: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor, iterations: int
                     ) -> torch.Tensor:
    """:func:`lyapunov_skew` by ``iterations`` conjugate-gradient iterations in the
    eigenbasis ``basis`` of an earlier ``M`` (no host reads: a fixed count).

    Why: a batched ``eigh`` is the costliest op of the step where heads are large (CUDA,
    144 matrices 64×64: 122 ms, against 2 ms for a fused AdamW step of the whole model),
    while ``M`` moves little per step. In ``V = basis`` the operator ``A ↦ M̂A + AM̂``
    (``M̂ = VᵀMV``) is nearly diagonal on skew matrices, with diagonal ``M̂_ii + M̂_jj``; CG
    preconditioned by it converges in a few iterations, each one batched matrix product
    (``AM̂ = -(M̂A)ᵀ`` for skew ``A``). Equivariant for any count: under a rotation ``R`` of
    the gauge the stored basis maps to ``R V`` (up to the signs ``eigh`` picks, which the
    diagonal preconditioner does not see), so every iterate maps by ``R``. How close the
    count gets is certified off the hot path (:func:`lyapunov_residual`). Pairs of
    directions with ``M̂_ii + M̂_jj`` below 1e-12 of the largest are not moved, as
    :func:`lyapunov_skew` floors them."""
    vt = basis.transpose(1, 2)
    m = torch.bmm(torch.bmm(vt, gram), basis)
    m = 0.5 * (m + m.transpose(1, 2))
    r = torch.bmm(torch.bmm(vt, rhs), basis)
    r = 0.5 * (r - r.transpose(1, 2))   # skew to the last bit: CG cannot reduce a symmetric part
    d = m.diagonal(dim1=1, dim2=2)
    pair = d.unsqueeze(-1) + d.unsqueeze(-2)
    floor = d.abs().amax(dim=-1, keepdim=True).unsqueeze(-1) * 1e-12 + torch.finfo(m.dtype).tiny
    inv = torch.where(pair > floor, 1.0 / pair.clamp_min(floor), torch.zeros_like(pair))
    tiny = torch.finfo(m.dtype).tiny

    def apply(a: torch.Tensor) -> torch.Tensor:
        ma = torch.bmm(m, a)
        return ma - ma.transpose(1, 2)

    # The per-matrix scalars keep their (n, 1, 1) shape and x, r are updated in place:
    # each iteration is as few dispatched operators as the arithmetic allows.
    x = r * inv                     # exact if M has not moved since the basis was taken
    # A matrix whose residual fell to round-off of the right-hand side (its preconditioned
    # norm² times eps²) stops moving: more iterations would change x below its round-off
    # and only shrink the recurrence's residual into subnormal numbers, which cost the
    # CPU many times the normal arithmetic (measured: 16 iterations 6.2 ms against 1.2 ms
    # with subnormals flushed, 16 matrices 32×32). An invariant test: still equivariant.
    stop = (r * x).sum((1, 2), keepdim=True) * torch.finfo(m.dtype).eps ** 2
    r = r - apply(x)
    z = r * inv
    p = z
    rz = (r * z).sum((1, 2), keepdim=True)
    for _ in range(iterations):
        q = apply(p)
        curvature = (p * q).sum((1, 2), keepdim=True)
        alpha = torch.where((curvature > 0) & (rz > stop), rz / curvature.clamp_min(tiny), 0.0)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1)
        z = r * inv
        rz_new = (r * z).sum((1, 2), keepdim=True)
        p = torch.addcmul(z, rz_new / torch.where(rz != 0, rz, 1.0), p)
        rz = rz_new
    return torch.bmm(torch.bmm(basis, x), vt)


def lyapunov_residual(gram: torch.Tensor, rhs: torch.Tensor, generator: torch.Tensor) -> torch.Tensor:
    """``max_b ‖A M + M A − rhs‖ / ‖rhs‖`` over the stack (0 where ``rhs`` is 0): how well
    ``generator`` solves the so(d) projection's equation (a certificate, off the hot path)."""
    err = (generator @ gram + gram @ generator - rhs).square().sum((1, 2)).sqrt()
    size = rhs.square().sum((1, 2)).sqrt()
    return torch.where(size > 0, err / size.clamp_min(torch.finfo(size.dtype).tiny), err).amax()
