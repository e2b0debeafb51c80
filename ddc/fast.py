"""The batched DDC step (``DDC(foreach=True)``, the default).

It computes the same step as the readable reference path (``DDC(foreach=False)``,
``DDC._gauged_step``), with the work batched:

* **Parameters of a kind together.** Canonical coordinates, weight decay, the Adam moments
  and the map back run as ``torch._foreach_*`` ops over all gauged parameters at once;
  the parameters no gauge touches take one foreach AdamW per param group.
* **One balancing solve for all scale gauges**, on one flat vector of log-scales: the
  squared norms of the gauged slices are gathered once (``index_add_``), the parameters
  scaled along two axes (an MLP's up projection: rows in its unit gauge, columns in the
  norm gain before it) are stacked per shape and their scaled matrices used only through
  batched matrix-vector products. After the first step it runs on a fixed schedule
  without host reads (:meth:`FastPlan._balance`): a closed-form step per coordinate
  (:func:`ddc.functional.closed_form_step`, the solution where no parameter couples two
  gauges), then, where some do, rounds of a Newton step by a fixed number of CG
  iterations and a closed-form step. Exactly equivariant for any counts (it starts from
  the stored frame, or from 0 on an invariant point); its convergence is certified off
  the hot path (:meth:`ddc.DDC.balance_residual`, ``tests/test_ddc_host_reads.py``). The
  first step (state init) solves adaptively (:meth:`FastPlan.solve`, damped Newton with
  inexact CG, host reads), as the reference does every step.
* **Head rotations in place, through views.** A rotation member whose blocks are a
  contiguous slice of its axis (every member except RoPE's ``half`` layout) is viewed as
  ``(n_blocks, block, rest)`` without copying; the so(d) projection of all gauges with the
  same block size is one batched ``eigh`` (or the closed form for RoPE pairs), or with
  ``DDC(rotation_solve="cg")`` a few CG iterations in an earlier step's eigenbasis
  (:func:`_lyapunov`).
* **No full-size copies where an in-place update is exact**: the canonical point is built
  once (``θ·S·(1 − ηλ)``), stepped (Adam's step added with ``addcdiv_`` where nothing
  projects it) and rebalanced in place, and written back with one multiply by
  ``S_back / S``.

* **Kernels.** The tensor work is a few functions without host reads
  (:meth:`FastPlan.kernel`); with ``DDC(compile=True)`` they run through ``torch.compile``,
  which fuses the elementwise passes. The numbers that change every step reach them as
  0-d tensors in that mode, so an lr schedule does not recompile them.

A step in which some gauged parameter has no gradient, is not the optimizer's, or sits in
a group at lr 0 runs the reference path instead (:func:`fast_supported`).

The fast path agrees with the reference to round-off (``tests/test_ddc_foreach.py``:
float64, every task model, both bases: Adam to 1e-12; Muon's exact polar factor amplifies
last-bit differences, bound 1e-11, measured below 1e-12 at lr 1e-3). It does not replicate
the reference's iteration path of the balancing solve, only its answer (the unique
canonical point, to ``balance_tol``). ``docs/ddc.md`` ("The batched step") has the
measured cost.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import functional as F
from .gauges import RotationMember, from_blocks, to_blocks

if TYPE_CHECKING:  # pragma: no cover
    from .optimizer import DDC

#: Conjugate-gradient iterations between two reads of the residual by the host. Measured
#: on GPT small (30 training steps): 5.1 iterations a step when checking after every one,
#: 6.2 every 2, 8.0 every 4 (each Newton step needs about 2.5).
CG_CHECK_EVERY = 2
#: Largest Newton step (log-scale units, per coordinate) of the fixed-schedule balancing
#: (:meth:`FastPlan._balance`): a factor e^0.5 at most, a trust region that keeps a full
#: Newton step from overshooting far from the solution (which the adaptive solve's line
#: search does on the host). Clipping an invariant step is invariant: equivariance stays.
MAX_NEWTON_STEP = 0.5
#: Kernels that run eagerly even with ``DDC(compile=True)`` (see :meth:`FastPlan.kernel`).
_EAGER_KERNELS = ("cg_block",)
_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: The so(d) projection's CG (:func:`_lyapunov_cg`): iterations at most before it falls
#: back to ``eigh``, iterations between two reads of its residual by the host, and its
#: stopping residual (relative, in units of the working precision's eps): 8, about the
#: residual of the eigh solve itself (measured, float32 and float64, 16-64 wide: median
#: 8-10 eps), so both are exact to the same round-off.
ROTATION_MAX_ITER = 16
ROTATION_CHECK_EVERY = 2
ROTATION_TOL_EPS = 8
#: A solve that needed more iterations than this drops its basis: the next step takes a
#: fresh one by ``eigh``. The basis drifts as the weights move (GPT small, float32, lr 1e-3,
#: never refreshed: 6 iterations one step after the eigh, 16 after 30 steps, 18-22 from
#: step 90 to 200). Refreshing only when CG fails (32 iterations) measured slower on GPT
#: paper on an H200 (41.7 against 34.5 ms a step: more iterations, each with host reads,
#: and the eigh still needed).
ROTATION_REFRESH_AFTER = 8


def _contiguous_slice(member: RotationMember) -> int | None:
    """Start of ``member``'s entries if they are a contiguous slice of its axis, else None."""
    perm = member.perm
    n = perm.numel()
    start = int(perm[0]) if n else 0
    if n == 0 or not torch.equal(perm, torch.arange(start, start + n, dtype=perm.dtype)):
        return None
    return start


def block_view(tensor: torch.Tensor, member: RotationMember, start: int | None = None) -> torch.Tensor | None:
    """``tensor`` (shaped like ``member.param``) as an ``(n_blocks, block, rest)`` *view*
    (writing into it writes ``tensor``), or ``None`` when the member's entries are not a
    contiguous slice of its axis (RoPE's ``half`` layout) or no view exists. ``start``:
    the slice's start if already known."""
    if start is None:
        start = _contiguous_slice(member)
        if start is None:
            return None
    n = member.perm.numel()
    try:  # view() (unlike reshape) never copies: it raises where no view exists
        if member.axis == 0:
            return tensor.narrow(0, start, n).view(n // member.block, member.block, -1)
        moved = tensor.movedim(member.axis, 0).narrow(0, start, n)
        return moved.unflatten(0, (n // member.block, member.block)).view(n // member.block, member.block, -1)
    except RuntimeError:
        return None


class _Blocks:
    """Block views of one rotation member, with a copy-based fallback."""

    def __init__(self, member: RotationMember, index: int) -> None:
        self.member = member
        self.index = index
        self.start = _contiguous_slice(member)
        self.viewable = self.start is not None and block_view(member.param.detach(), member, self.start) is not None

    def get(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.viewable:
            view = block_view(tensor, self.member, self.start)
            if view is not None:
                return view
        return to_blocks(tensor, self.member)

    def set(self, tensor: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Write ``blocks`` into ``tensor``'s member entries; returns the tensor to keep."""
        if self.viewable:
            view = block_view(tensor, self.member, self.start)
            if view is not None:
                view.copy_(blocks)
                return tensor
        return from_blocks(blocks, self.member, into=tensor)


def _diameter(edges: dict[int, set[int]]) -> int:
    """The longest shortest path (in edges) between two nodes of an undirected graph."""
    longest = 0
    for start in edges:
        seen, frontier, depth = {start}, [start], 0
        while frontier:
            frontier = [n for f in frontier for n in edges[f] if n not in seen]
            seen.update(frontier)
            depth += bool(frontier)
        longest = max(longest, depth)
    return longest


def _matvec(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``x @ v`` for stacks ``x`` (L, n, m) and ``v`` (L, m), as the row-vector product
    ``vᵀ xᵀ`` (on the CPU several times faster than ``bmm`` with a column vector)."""
    return torch.bmm(v.unsqueeze(1), x.transpose(1, 2)).squeeze(1)


class FastPlan:
    """Index tensors and groupings of one DDC instance's gauges, built once per device."""

    def __init__(self, opt: DDC, device: torch.device) -> None:
        frame = opt._frame
        self.device = device
        self.n_params = len(frame.params)
        sizes = [g.size for g in frame.scale_gauges]
        self.sizes = sizes
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.n = self.offsets[-1]
        levels = torch.cat([torch.full((n,), float(g.level), dtype=torch.float64)
                            for n, g in zip(sizes, frame.scale_gauges)]) if sizes else torch.zeros(0, dtype=torch.float64)
        self.levels = levels.to(device)
        self.gauge_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)) \
            if sizes else torch.zeros(0, dtype=torch.long)

        # Parameters scaled along one axis: their squared norms summed over the other axes
        # land in one flat vector (term t -> coordinate coord1[t], growing or shrinking side).
        self.scaled = sorted(frame.scale_axes)
        self.one: list[tuple[int, int, list[int]]] = []    # (param, axis, other dims)
        self.two: dict[tuple[int, int], list[int]] = {}    # (n_a, n_b) -> params
        coord1, sign1 = [], []
        for i in self.scaled:
            axes = frame.scale_axes[i]
            p = frame.params[i]
            if len(axes) == 1:
                axis, g, sign = axes[0]
                self.one.append((i, axis, [d for d in range(p.ndim) if d != axis]))
                coord1.append(torch.arange(self.offsets[g], self.offsets[g + 1]))
                sign1.append(torch.full((sizes[g],), float(sign), dtype=torch.float64))
            else:
                (a, _, _), (b, _, _) = axes
                self.two.setdefault((p.shape[a], p.shape[b]), []).append(i)
        self.coord1 = torch.cat(coord1).to(device) if coord1 else torch.zeros(0, dtype=torch.long, device=device)
        self.sign1 = torch.cat(sign1).to(device) if sign1 else torch.zeros(0, dtype=torch.float64, device=device)
        self.side1 = self.coord1 + self.n * (self.sign1 < 0).long()
        # Parameters scaled along two axes, stacked per shape.
        self.stacks = []
        for (na, nb), members in self.two.items():
            ca, cb, sa, sb, other = [], [], [], [], []
            for i in members:
                (a, ga, sga), (b, gb, sgb) = frame.scale_axes[i]
                ca.append(torch.arange(self.offsets[ga], self.offsets[ga + 1]))
                cb.append(torch.arange(self.offsets[gb], self.offsets[gb + 1]))
                sa.append(float(sga))
                sb.append(float(sgb))
                other.append([d for d in range(frame.params[i].ndim) if d not in (a, b)])
            ca_t, cb_t = torch.stack(ca).to(device), torch.stack(cb).to(device)
            sa_t = torch.tensor(sa, dtype=torch.float64, device=device)[:, None]
            sb_t = torch.tensor(sb, dtype=torch.float64, device=device)[:, None]
            self.stacks.append({
                "params": members, "other": other, "ca": ca_t, "cb": cb_t, "sa": sa_t, "sb": sb_t,
                "side_a": (ca_t + self.n * (sa_t < 0).long()).reshape(-1),
                "side_b": (cb_t + self.n * (sb_t < 0).long()).reshape(-1),
                "coupling": 4 * sa_t * sb_t,   # (L, 1): sign of the off-diagonal Hessian block
                "flat_a": ca_t.reshape(-1), "flat_b": cb_t.reshape(-1), "shape": (na, nb),
            })
        # The fixed schedule's CG iterations (DDC(balance_cg_steps=None)): CG reaches a
        # coordinate only after as many products as gauges lie between it and the residual,
        # so twice the longest shortest path of the gauges' coupling graph (edges: parameters
        # scaled along two axes), at least 8. Measured (float64, ReLU chain of depth 24,
        # diameter 23): 16 iterations leave 1e-8 to 3e-7 in the frame, 32 leave round-off.
        edges: dict[int, set[int]] = {}
        for i in self.scaled:
            axes = frame.scale_axes[i]
            if len(axes) == 2:
                (_, ga, _), (_, gb, _) = axes
                edges.setdefault(ga, set()).add(gb)
                edges.setdefault(gb, set()).add(ga)
        diameter = _diameter(edges)
        self.cg_steps = {torch.float64: max(8, 2 * diameter)}
        # float32 (and bf16/fp16 parameters, balanced in float32) needs the frame to about
        # 1e-6 only: measured on GPT small (float32, lr 1e-3), 2 rounds of 4 CG iterations
        # leave the round-off floor (1.2e-7), as 4 rounds of 8 do.
        self.cg_steps_low = max(4, diameter)
        # Per-parameter scale factors: (axis, gauge, sign) per scaled axis.
        self.factor_axes = {i: frame.scale_axes[i] for i in self.scaled}

        # Rotation gauges: members as block views, grouped by block size.
        self.rotations: list[list[_Blocks]] = []
        for gauge in frame.rotation_gauges:
            self.rotations.append([_Blocks(m, frame.index[m.param]) for m in gauge.members])
        self.rotation_by_block: dict[int, list[int]] = {}
        for r, gauge in enumerate(frame.rotation_gauges):
            self.rotation_by_block.setdefault(gauge.block, []).append(r)
        self.pool_members = {i: [_Blocks(m, i) for m in members] for i, members in frame.rotation_of.items()}
        self.centred = sorted(frame.centred)
        #: The so(d) projections' basis per block size: the eigenvectors of the last
        #: ``eigh`` (:func:`_lyapunov`), and how each solve went (a diagnostic).
        self.rotation_basis: dict[int, torch.Tensor] = {}
        self.rotation_solves = {"eigh": 0, "cg": 0, "cg_iterations": 0}
        #: Conjugate-gradient iterations run so far (a diagnostic).
        self.cg_iterations = 0
        #: ``DDC(compile=True)``: the kernels are ``torch.compile``d (at their first call).
        self.compiled = bool(opt.compile)
        self._kernels: dict[str, Any] = {}

    def kernel(self, name: str) -> Any:
        """The step's kernel ``name``: a piece of tensor work with no host read (the
        step's functions :func:`_prepare`, :func:`_middle`, :func:`_write_back` bound to
        this plan, and the solve's :meth:`_evaluate`, :meth:`_objective`,
        :meth:`_cg_block`), compiled with
        ``torch.compile`` when the optimizer was built with ``compile=True``. The
        uncompiled and compiled kernels are the same code, so both paths compute the same
        step (to round-off: the compiler may fuse and reorder arithmetic)."""
        fn = self._kernels.get(name)
        if fn is None:
            step_fn = {"prepare": _prepare, "middle": _middle, "finish": _finish, "write_back": _write_back}.get(name)
            if step_fn is None:
                fn = getattr(self, "_" + name)
                # The CG block stays eager: compiled (torch 2.14, CPU) it ran 2.4x slower
                # (2.56 ms vs 1.05 ms per block on GPT small).
                fn = torch.compile(fn) if self.compiled and name not in _EAGER_KERNELS else fn
            else:  # compiled as itself (one code object per kernel), the plan its first argument
                fn = functools.partial(torch.compile(step_fn) if self.compiled else step_fn, self)
            self._kernels[name] = fn
        return fn

    # ---------------------------------------------------------------------- scale factors

    def factors(self, log_scales: torch.Tensor, dtype: torch.dtype, like: Sequence[torch.Tensor],
                times: Sequence[float | torch.Tensor] | None = None, ones: Sequence[bool] | None = None
                ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """The scale factor ``S`` of every parameter for the flat float64 ``log_scales``,
        broadcastable to it (``None`` for unscaled parameters), and the same times
        ``times[i]`` (weight decay folded into one multiply; ``S`` again if ``times`` is
        None)."""
        pos = torch.exp(log_scales).to(dtype)
        neg = torch.exp(-log_scales).to(dtype)
        out: list[torch.Tensor | None] = [None] * self.n_params
        out_times: list[torch.Tensor | None] = [None] * self.n_params
        for i, axes in self.factor_axes.items():
            ndim = like[i].ndim
            pieces = []
            for axis, g, s in axes:
                shape = [1] * ndim
                shape[axis] = -1
                pieces.append((pos if s > 0 else neg)[self.offsets[g]:self.offsets[g + 1]].view(shape))
            out[i] = pieces[0] if len(pieces) == 1 else pieces[0] * pieces[1]
            if times is None or (ones[i] if ones is not None else times[i] == 1.0):
                out_times[i] = out[i]
            else:  # scale the smaller piece, then (for two axes) the same outer product
                first = pieces[0] * times[i]
                out_times[i] = first if len(pieces) == 1 else first * pieces[1]
        return out, out_times

    # ------------------------------------------------------------------------- balancing

    def reduce(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The squared entries of the scaled parameters, summed over their unscaled axes
        (float64): one flat vector for the one-axis terms, one stack per two-axis shape
        (written straight into a float64 buffer)."""
        ones = [points[i] for i, _, _ in self.one]
        squares = torch._foreach_mul(ones, ones)
        flat = [sq.sum(other) if other else sq for sq, (_, _, other) in zip(squares, self.one)]
        r1 = torch.cat(flat).double() if flat else torch.zeros(0, dtype=torch.float64, device=self.device)
        stacks = []
        for st in self.stacks:
            first = points[st["params"][0]]
            buf = torch.empty((len(st["params"]), *st["shape"]), dtype=torch.float64, device=first.device)
            for k, (i, o) in enumerate(zip(st["params"], st["other"])):
                if o:
                    buf[k].copy_((points[i] * points[i]).sum(o))
                else:
                    torch.mul(points[i], points[i], out=buf[k])
            stacks.append(buf)
        return r1, stacks

    def _sides(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor]
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Grow and shrink sums (flat, 2N) at log-scales ``s``, each stack's scalings
        ``(X, e_a, e_b)`` (the scaled matrix is ``e_a X e_b``, never formed: every use is a
        matrix-vector product) and the total squared norm."""
        sides = torch.zeros(2 * self.n, dtype=torch.float64, device=self.device)
        scaled1 = torch.exp(2 * self.sign1 * s[self.coord1]) * r1
        sides.index_add_(0, self.side1, scaled1)
        total = scaled1.sum()
        scaled = []
        for st, x in zip(self.stacks, xs):
            ea = torch.exp(2 * st["sa"] * s[st["ca"]])
            eb = torch.exp(2 * st["sb"] * s[st["cb"]])
            rows = ea * _matvec(x, eb)
            cols = eb * torch.bmm(ea.unsqueeze(1), x).squeeze(1)
            sides.index_add_(0, st["side_a"], rows.reshape(-1))
            sides.index_add_(0, st["side_b"], cols.reshape(-1))
            total = total + rows.sum()
            scaled.append((x, ea, eb))
        return sides, scaled, total

    def _hessian(self, diag: torch.Tensor, scaled: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                 v: torch.Tensor) -> torch.Tensor:
        out = diag * v
        for st, (x, ea, eb) in zip(self.stacks, scaled):
            to_a = ea * _matvec(x, eb * v[st["cb"]])
            to_b = eb * torch.bmm((ea * v[st["ca"]]).unsqueeze(1), x).squeeze(1)
            out.index_add_(0, st["flat_a"], (st["coupling"] * to_a).reshape(-1))
            out.index_add_(0, st["flat_b"], (st["coupling"] * to_b).reshape(-1))
        return out

    def _levels(self, r1: torch.Tensor, xs: list[torch.Tensor], level: float, zero_level: float
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, list[Any], torch.Tensor]]:
        """κ and the active coordinates (the canonical-point rule, read at log-scales 0),
        and the sides at 0 (the first Newton evaluation of a solve from zero)."""
        at_zero = self._sides(torch.zeros(self.n, dtype=torch.float64, device=self.device), r1, xs)
        grow0, shrink0 = at_zero[0][:self.n], at_zero[0][self.n:]
        kappa, active = F.canonical_levels(grow0, shrink0, self.levels * level, level, zero_level)
        return kappa, active, at_zero

    def _system(self, s: torch.Tensor, kappa: torch.Tensor, active: torch.Tensor,
                sides: tuple[torch.Tensor, list[Any], torch.Tensor]) -> dict[str, Any]:
        """The Newton system at ``s`` from its sides: gradient, Hessian diagonal, Jacobi
        preconditioner and step, the objective, and ``checks`` = (max |Jacobi step|,
        max |gradient|), the two numbers the host reads."""
        grow, shrink = sides[0][:self.n], sides[0][self.n:]
        grad = torch.where(active, 2 * (grow - shrink - kappa), 0.0)
        diag = 4 * (grow + shrink)
        precond = torch.where(active, 1 / diag.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        z = precond * -grad
        return {"grad": grad, "diag": diag, "scaled": sides[1], "precond": precond, "z": z,
                "grow": grow, "shrink": shrink,
                "objective": sides[2] - 2 * (kappa * s).sum(),
                "checks": torch.stack([z.abs().max(), grad.abs().max()])}

    def _evaluate(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor,
                  active: torch.Tensor) -> dict[str, Any]:
        """:meth:`_system` at ``s`` (one kernel of the compiled step)."""
        return self._system(s, kappa, active, self._sides(s, r1, xs))

    def _evaluate_zero(self, r1: torch.Tensor, xs: list[torch.Tensor], level: float, zero_level: float
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """κ, the active coordinates and the Newton system at log-scales 0."""
        kappa, active, at_zero = self._levels(r1, xs, level, zero_level)
        s = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        return kappa, active, self._system(s, kappa, active, at_zero)

    def _evaluate_warm(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], level: float,
                       zero_level: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """κ, the active coordinates and the Newton system at the warm start ``s``."""
        kappa, active, _ = self._levels(r1, xs, level, zero_level)
        return kappa, active, self._evaluate(s, r1, xs, kappa, active)

    def _objective(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor
                   ) -> torch.Tensor:
        """``F(s) = ‖S(s)·θ‖² − 2 κ·s`` (the line search's function; one kernel)."""
        return self._sides(s, r1, xs)[2] - 2 * (kappa * s).sum()

    def first_system(self, r1: torch.Tensor, xs: list[torch.Tensor], warm: torch.Tensor | None, level: float,
                     zero_level: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The start of :meth:`solve` (κ, the active coordinates, the Newton system at the
        warm start, or at 0 for ``warm=None``): the step's kernels that compute the squared
        norms run it too, which saves the solve a kernel call."""
        if warm is None:
            return self._evaluate_zero(r1, xs, level, zero_level)
        return self._evaluate_warm(warm, r1, xs, level, zero_level)

    def solve(self, r1: torch.Tensor, xs: list[torch.Tensor], warm: torch.Tensor | None, tol: float,
              max_iter: int, first: tuple[torch.Tensor, torch.Tensor, dict[str, Any]]
              ) -> tuple[torch.Tensor, int, list[int]]:
        """:func:`ddc.functional.min_norm_log_scales` on the flat layout: the same
        canonical point (same κ, degenerate and inactive coordinates), by damped Newton
        with inexact conjugate gradients. Returns the log-scales, the Newton steps taken
        and the gauges still moving by more than ``tol`` when ``max_iter`` ran out.
        ``warm=None`` starts from zero (the balancing after the step). ``first``: the
        solve's start, :meth:`first_system` at ``warm``, computed by the kernel that
        produced ``r1`` and ``xs``.

        Stopping: when the Jacobi estimate of the Newton step is below ``tol/2``, or after
        a full Newton step of size δ solved to ``atol`` with ``2δ² + atol ≤ tol/2``, since
        Newton's error after a full step is about δ² (measured on GPT small: the step
        after such a step is below 1e-10 for tol 1e-6), so one more evaluation would only
        confirm it. The host reads two numbers per Newton step and the CG residuals every
        :data:`CG_CHECK_EVERY` iterations; everything between runs in kernels
        (:meth:`kernel`)."""
        s = torch.zeros(self.n, dtype=torch.float64, device=self.device) if warm is None else warm.clone()
        if self.n == 0:
            return s, 0, []
        kappa, active, system = first
        step, t = torch.zeros_like(s), 1.0
        for newton in range(1, max_iter + 1):
            if system is None:
                system = self.kernel("evaluate")(s, r1, xs, kappa, active)
            estimate, rmax = system["checks"].tolist()
            step, largest, atol = self._cg(system, estimate, rmax, tol)
            if estimate <= 0.5 * tol:
                # The Jacobi estimate of the Newton step is below tol/2 (the step itself is
                # within about twice its Jacobi estimate): the point is canonical to tol, as
                # when the reference stops; the Jacobi step is still taken.
                return s + step, newton, []
            t = 1.0
            if largest > 0.1:  # damped, as the reference: far from the solution only
                f0 = float(system["objective"])
                slope = float(system["grad"] @ step)
                objective = self.kernel("objective")
                while t > 1e-6:
                    if float(objective(s + t * step, r1, xs, kappa)) <= f0 + 1e-4 * t * slope:
                        break
                    t *= 0.5
            s = s + t * step
            system = None
            if largest * t <= tol or (t == 1.0 and 2 * largest * largest + atol <= 0.5 * tol):
                return s, newton, []
        moving = (step.abs() * t > tol).cpu()
        unsettled = sorted(set(self.gauge_of[moving].tolist()))
        return s, max_iter, unsettled

    def _cg(self, system: dict[str, Any], estimate: float, rmax: float, tol: float
            ) -> tuple[torch.Tensor, float, float]:
        """Preconditioned CG for ``H x = -grad``; returns ``x``, ``max|x|`` and the
        tolerance used. Tolerance: the Newton step δ is solved to
        ``max(1e-2·tol, min(δ², δ/10))`` (δ by its Jacobi estimate ``max|D⁻¹ grad|``)."""
        z = system["z"]
        if estimate <= 0.5 * tol or not self.stacks:
            # Converged, or a diagonal Hessian (no two-axis parameter): the Jacobi step is
            # the Newton step.
            return z, estimate, 0.0
        atol = max(1e-2 * tol, min(estimate * estimate, 0.1 * estimate))
        stop = 1e-14 * rmax
        r = -system["grad"]
        state = (torch.zeros_like(r), r, z.clone(), r @ z)
        block = self.kernel("cg_block")
        blocks = -(-max(50, 4 * len(self.sizes)) // CG_CHECK_EVERY)
        for b in range(1, blocks + 1):
            state, checks = block(system["diag"], system["scaled"], system["precond"], state)
            zmax, rm, curv = checks.tolist()
            if zmax <= atol or rm <= stop or curv <= 0:
                break
        self.cg_iterations += b * CG_CHECK_EVERY
        x = state[0]
        return x, float(x.abs().max()), atol

    def _cg_block(self, diag: torch.Tensor, scaled: list[Any], precond: torch.Tensor,
                  state: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """:data:`CG_CHECK_EVERY` conjugate-gradient iterations from ``state`` = (x, r, p,
        rᵀz), without host reads (one kernel); returns the new state and (max |z|, max |r|,
        the last curvature pᵀHp) for the host's stopping test."""
        x, r, p, rz = state
        tiny = torch.finfo(torch.float64).tiny
        for _ in range(CG_CHECK_EVERY):
            ap = self._hessian(diag, scaled, p)
            curvature = p @ ap
            alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), 0.0)
            x = x + alpha * p
            r = r - alpha * ap
            z = precond * r
            rz_new = r @ z
            p = z + (rz_new / torch.where(rz != 0, rz, 1.0)) * p
            rz = rz_new
        return (x, r, p, rz), torch.stack([z.abs().max(), r.abs().max(), curvature])


    def _balance(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor,
                 active: torch.Tensor, system: dict[str, Any], newton_steps: int, cg_steps: int) -> torch.Tensor:
        """The balancing solve on a fixed schedule, without host reads (one kernel): from
        ``s`` (``system``: the Newton system there), every coordinate jumps to the exact
        solution of its own equation with the others held (:func:`ddc.functional.closed_form_step`): the
        solution itself where no parameter couples two gauges. Where some do, then
        ``newton_steps`` rounds of a Newton step (solved by ``cg_steps`` Jacobi-preconditioned
        CG iterations, clipped to :data:`MAX_NEWTON_STEP` per coordinate) and a closed-form
        step.

        Exact equivariance does not need convergence (``docs/ddc.md``, "Fixed schedules"):
        every iteration maps a start that transforms with the gauge (the stored frame, or 0
        for a point that is already canonical and so invariant) equivariantly. How close
        the result is to the canonical point is certified off the hot path
        (:meth:`ddc.DDC.balance_residual`, the tests)."""
        s = s + F.closed_form_step(system["grow"], system["shrink"], kappa, active)
        if not self.stacks:
            return s  # no coupling: the closed form is the solution
        for _ in range(newton_steps):
            # A Newton step for the coupling, then the closed form again for what it left
            # of the large per-coordinate moves (a unit whose zero side came alive moves
            # by log-scales of several units in one step). Measured (float64, zero-initialised
            # attention output and MLP down projections, lr 1e-2): the frame's residual after
            # 3 / 4 / 5 such rounds 1.5e-7 / 4e-15 / 3e-16, against 6e-4 / 3e-7 / 9e-14
            # with Newton steps alone.
            system = self._evaluate(s, r1, xs, kappa, active)
            s = s + self._cg_fixed(system, cg_steps).clamp(-MAX_NEWTON_STEP, MAX_NEWTON_STEP)
            system = self._evaluate(s, r1, xs, kappa, active)
            s = s + F.closed_form_step(system["grow"], system["shrink"], kappa, active)
        return s

    def _cg_fixed(self, system: dict[str, Any], cg_steps: int) -> torch.Tensor:
        """``cg_steps`` iterations of :meth:`_cg_block`'s CG for ``H x = -grad`` from 0."""
        r = -system["grad"]
        z = system["z"]
        state = (torch.zeros_like(r), r, z.clone(), r @ z)
        tiny = torch.finfo(torch.float64).tiny
        x, r, p, rz = state
        for _ in range(cg_steps):
            ap = self._hessian(system["diag"], system["scaled"], p)
            curvature = p @ ap
            alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), 0.0)
            x = x + alpha * p
            r = r - alpha * ap
            z = system["precond"] * r
            rz_new = r @ z
            p = z + (rz_new / torch.where(rz != 0, rz, 1.0)) * p
            rz = rz_new
        return x

    def residual(self, r1: torch.Tensor, xs: list[torch.Tensor], s: torch.Tensor, level: float,
                 zero_level: float) -> torch.Tensor:
        """How far ``s`` is from the canonical point: the largest Jacobi estimate of the Newton
        step there (log-scale units; a 0-d tensor)."""
        kappa, active, system = self._evaluate_warm(s, r1, xs, level, zero_level)
        return system["z"].abs().max() if system["z"].numel() else torch.zeros((), dtype=torch.float64)


# ------------------------------------------------------------------------------ the step

class _AdamGroup:
    """One param group's share of a batched Adam step, prepared on the host: the moments
    (created lazily), the step counters advanced, and the bias corrections (one number when
    the counters agree, as usual; a list otherwise), as Python numbers or, for the compiled
    step, 0-d tensors."""

    def __init__(self, opt: DDC, group: dict[str, Any], items: list[tuple[torch.Tensor, torch.Tensor]],
                 dtype: torch.dtype | None = None, tensors_on: torch.device | None = None) -> None:
        states = []
        for p, grad in items:  # the moments are created like grad, in ``dtype`` if given
            state = opt.state[p]
            F.init_adam_state(state, grad, dtype)
            states.append(state)
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1)
        self.exp_avgs = [st["exp_avg"] for st in states]
        self.exp_avg_sqs = [st["exp_avg_sq"] for st in states]
        self.beta1, self.beta2 = group["betas"]
        self.eps = group["eps"]
        if torch.compiler.is_compiling():
            # Traced by an outer torch.compile: no reads of the counters (torch's AdamW
            # does the same); the bias corrections as tensors, one per parameter.
            counts_t = torch.stack(steps).to(self.exp_avgs[0].device, torch.float64)
            self.tensor_scalars = True
            self.bc2_sqrt = list(torch.sqrt(1 - self.beta2 ** counts_t).unbind())
            self.step_size = list((-group["lr"] / (1 - self.beta1 ** counts_t)).unbind())
            return
        # The step counters live on the CPU (as torch's AdamW keeps them without
        # capturable=True): reading them is no device synchronisation.
        counts = [float(s) for s in steps]
        bc2_sqrt = [math.sqrt(1 - self.beta2 ** c) for c in counts]
        step_size = [-group["lr"] / (1 - self.beta1 ** c) for c in counts]
        if len(set(counts)) == 1:  # the usual case: one number (a list costs a tensor per entry)
            bc2_sqrt, step_size = bc2_sqrt[:1], step_size[:1]
        # These numbers change every step: the compiled step (``tensors_on`` its device)
        # takes them as 0-d tensors, as Python numbers they would be compiled in as constants.
        self.tensor_scalars = tensors_on is not None
        if self.tensor_scalars:
            values = torch.tensor(bc2_sqrt + step_size, dtype=torch.float64, device=tensors_on).unbind()
            bc2_sqrt, step_size = list(values[:len(bc2_sqrt)]), list(values[len(bc2_sqrt):])
        self.bc2_sqrt: Any = bc2_sqrt[0] if len(bc2_sqrt) == 1 else bc2_sqrt
        self.step_size: Any = step_size[0] if len(step_size) == 1 else step_size

    def pick(self, value: Any, js: list[int]) -> Any:
        return [value[j] for j in js] if isinstance(value, list) else value


def _adam_math(hp: _AdamGroup, grads: list[torch.Tensor], pooled: list[torch.Tensor | None],
               targets: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Adam directions of one prepared group (no host reads: this runs inside the compiled
    step), with the arithmetic of :func:`ddc.functional.adam_update`: the moments advanced
    in place, ``pooled[k]`` (the rotation-pooled grad², or None) in place of grad². Where
    ``targets[k]`` is a tensor the direction is added to it in place (one ``addcdiv_``, no
    update tensor) and ``None`` is returned for that item."""
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


def _adam(opt: DDC, items: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor | None]],
          targets: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor | None]:
    """Adam directions (to add) for ``(param, group, grad, pooled grad² or None)`` items,
    batched per param group (:class:`_AdamGroup` then :func:`_adam_math`)."""
    targets = targets if targets is not None else [None] * len(items)
    out: list[torch.Tensor | None] = [None] * len(items)
    for ks in _by_group([group for _, group, _, _ in items]):
        hp = _AdamGroup(opt, items[ks[0]][1], [(items[k][0], items[k][2]) for k in ks])
        for k, d in zip(ks, _adam_math(hp, [items[k][2] for k in ks], [items[k][3] for k in ks],
                                       [targets[k] for k in ks])):
            out[k] = d
    return out


def _by_group(groups: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Positions of ``groups`` batched per param group (by identity), in first-seen order."""
    by: dict[int, list[int]] = {}
    for k, group in enumerate(groups):
        by.setdefault(id(group), []).append(k)
    return list(by.values())


def _muon(opt: DDC, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor) -> torch.Tensor:
    return F.muon_update(grad, *_muon_args(opt, p, group, grad))


def _muon_args(opt: DDC, p: torch.Tensor, group: dict[str, Any], grad: torch.Tensor,
               dtype: torch.dtype | None = None) -> tuple[Any, ...]:
    """:func:`ddc.functional.muon_update`'s arguments after the gradient (the momentum
    buffer created lazily, like ``grad`` in ``dtype`` if given)."""
    state = opt.state[p]
    F.init_muon_state(state, grad, dtype)
    return (state["momentum_buffer"], group["lr"], opt._muon_momentum(group), group["nesterov"],
            opt.orthogonalizer, group["ns_coefficients"], group["ns_steps"], group["ns_eps"],
            group["adjust_lr_fn"])


def plain_step(opt: DDC, items: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
    """The base step of parameters no gauge touches (``(param, group)`` with a gradient),
    batched: one foreach AdamW per group, Muon per matrix."""
    adam, muon = [], []
    for p, group in items:
        if p.grad.is_sparse:
            raise RuntimeError("DDC does not support sparse gradients")
        grad = p.grad.float() if p.grad.dtype in _LOW_PRECISION else p.grad
        (muon if opt._uses_muon(group, p) else adam).append((p, group, grad, None))
    updates = _adam(opt, adam) + [_muon(opt, p, g, grad) for p, g, grad, _ in muon]
    _apply_plain([(p, g) for p, g, _, _ in adam + muon], updates)


def _apply_plain(items: list[tuple[torch.Tensor, dict[str, Any]]], updates: list[torch.Tensor]) -> None:
    for ks in _by_group([group for _, group in items]):
        group = items[ks[0]][1]
        if group["lr"] == 0:
            continue
        params = [items[k][0] for k in ks]
        torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_add_(params, [updates[k].to(params[j].dtype) for j, k in enumerate(ks)])


def fast_supported(opt: DDC, group_of: dict[int, dict[str, Any]]) -> bool:
    """The fast gauged step covers the usual case: every gauged parameter is owned, has a
    gradient and a group with ``lr > 0``. Otherwise (frozen members, lr 0) the reference
    path runs; it handles those cases with the same result."""
    params = opt._frame.params
    return all(i in group_of and params[i].grad is not None and group_of[i]["lr"] != 0
               for i in range(len(params)))


class _Spec:
    """What the middle of a gauged step needs from the host, prepared before it: per
    gauged parameter the weight-decay factor; the Adam parameters per group
    (:class:`_AdamGroup`, with their frame indices) and the Muon ones with their options."""

    def __init__(self, opt: DDC, group_of: dict[int, dict[str, Any]], grads: list[torch.Tensor],
                 work: torch.dtype, compiled: bool = False) -> None:
        params = opt._frame.params
        device = params[0].device
        # The numbers that change from step to step (the schedule's lr) reach the compiled
        # step as 0-d tensors: as Python numbers they would be compiled in as constants.
        decay = [1 - group_of[i]["lr"] * group_of[i]["weight_decay"] for i in range(len(params))]
        self.no_decay = [d == 1.0 for d in decay]
        self.decay: list[Any] = decay
        if compiled:  # one tensor made, its entries handed out as 0-d views
            self.decay = list(torch.tensor(decay, dtype=torch.float64, device=device).unbind())
        self.muon: list[tuple[int, tuple[Any, ...]]] = []
        adam: list[int] = []
        for i, p in enumerate(params):
            if opt._uses_muon(group_of[i], p):
                self.muon.append((i, _muon_args(opt, p, group_of[i], grads[i], work)))
            else:
                adam.append(i)
        self.adam: list[tuple[list[int], _AdamGroup]] = []
        for ks in _by_group([group_of[i] for i in adam]):
            index = [adam[k] for k in ks]
            self.adam.append((index, _AdamGroup(opt, group_of[index[0]], [(params[i], grads[i]) for i in index],
                                                work, device if compiled else None)))


def _prepare(plan: FastPlan, params: list[torch.Tensor], grads: list[torch.Tensor], work: torch.dtype,
             warm: torch.Tensor, level: float, zero_level: float
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None], Any, Any]:
    """Step 1's start: the points and gradients in the working precision, the readouts
    centred (``means``: the vocabulary means taken out, None elsewhere), and the squared
    norms the balancing solve reads (:meth:`FastPlan.reduce`) with the solve's start at
    the stored frame ``warm`` (:meth:`FastPlan.first_system`); both None without scale
    gauges. Fresh tensors throughout except where ``.to`` keeps a tensor (never written)."""
    points = [p.to(work) for p in params]
    grads = [g.to(work) for g in grads]
    means: list[torch.Tensor | None] = [None] * len(points)
    for i in plan.centred:
        means[i] = points[i].mean(dim=0, keepdim=True)
        points[i] = points[i] - means[i]
        grads[i] = grads[i] - grads[i].mean(dim=0, keepdim=True)
    if not plan.n:
        return points, grads, means, None, None
    reduced = plan.reduce(points)
    return points, grads, means, reduced, plan.first_system(*reduced, warm, level, zero_level)


def _middle(plan: FastPlan, spec: _Spec, points: list[torch.Tensor], grads: list[torch.Tensor],
            log_scales: torch.Tensor, work: torch.dtype, freeze: bool, level: float, zero_level: float,
            rotations_inside: bool = True) -> tuple[list[torch.Tensor], Any, Any]:
    """Steps 1 to 4 after the frame is known: the canonical point ``θ* = S·θ`` with the
    weight decay folded into the same multiply and the canonical gradient ``g* = g/S``,
    the base step there, its dead components removed (``freeze``), and the new canonical
    points; returns them (fresh tensors) and, for the re-balancing, their squared norms and
    the solve's start from 0 (None when there is none to do)."""
    n = len(points)
    points, grads = list(points), list(grads)
    scaled: list[int] = []
    if plan.n:
        up, up_decayed = plan.factors(log_scales, work, points, times=spec.decay, ones=spec.no_decay)
        scaled = [i for i in range(n) if up[i] is not None]
        new_points = torch._foreach_mul([points[i] for i in scaled], [up_decayed[i] for i in scaled])
        new_grads = torch._foreach_div([grads[i] for i in scaled], [up[i] for i in scaled])  # as the reference
        for k, i in enumerate(scaled):
            points[i], grads[i] = new_points[k], new_grads[k]
    rest = [i for i in range(n) if i not in scaled]
    if rest:  # unscaled: a decayed copy (the centred ones are copies already)
        for i in rest:
            points[i] = points[i] * spec.decay[i]

    # 3. The base step, in canonical coordinates.
    deltas: list[torch.Tensor | None] = [None] * n
    for i, args in spec.muon:
        deltas[i] = F.muon_update(grads[i], *args)
    for index, hp in spec.adam:
        pooled = []
        for i in index:
            sq = None
            if i in plan.pool_members:
                sq = grads[i] * grads[i]
                for blocks in plan.pool_members[i]:
                    b = blocks.get(sq)
                    sq = blocks.set(sq, b.mean(dim=1, keepdim=True).expand_as(b))
            pooled.append(sq)
        # Parameters whose step is not projected afterwards (no rotation, no centring, or
        # dead_mode "free") take it straight into their canonical point.
        direct = [None if freeze and (i in plan.pool_members or i in plan.centred) else points[i] for i in index]
        for i, d in zip(index, _adam_math(hp, [grads[i] for i in index], pooled, direct)):
            deltas[i] = d

    # 4. Dead directions: no translation, no rotation, no rescaling.
    if freeze:
        for i in plan.centred:
            deltas[i].sub_(deltas[i].mean(dim=0, keepdim=True))
        if plan.rotations and not rotations_inside:
            return points, deltas, None  # the CG so(d) projections read the host: gauged_step runs them
        _remove_rotations(plan, deltas, points)
    return _finish(plan, points, deltas, freeze, level, zero_level)


def _finish(plan: FastPlan, points: list[torch.Tensor], deltas: list[torch.Tensor | None], freeze: bool,
            level: float, zero_level: float) -> tuple[list[torch.Tensor], Any, Any]:
    """Step 4's end: the new canonical points ``θ* + Δ`` and, for the re-balancing, their
    squared norms and the solve's start from 0 (None when there is none to do)."""
    n = len(points)
    moved = [i for i in range(n) if deltas[i] is not None]
    if moved:  # the new canonical points
        torch._foreach_add_([points[i] for i in moved], [deltas[i] for i in moved])
    if not (freeze and plan.n):
        return points, None, None
    reduced = plan.reduce(points)
    return points, reduced, plan.first_system(*reduced, None, level, zero_level)


def _write_back(plan: FastPlan, params: list[torch.Tensor], points: list[torch.Tensor],
                means: list[torch.Tensor | None], log_scales: torch.Tensor | None, work: torch.dtype) -> None:
    """Step 5: ``θ_new = θ*_new · exp(log_scales)`` (the new frame over the old: ``S_back/S``)
    plus the readout means, written into the parameters."""
    factor = plan.factors(log_scales, work, points)[0] if log_scales is not None else [None] * len(params)
    for i, target in enumerate(params):
        mean = means[i]
        if factor[i] is None and mean is None:
            target.copy_(points[i])
        elif mean is not None or target.dtype != work:
            x = points[i] if factor[i] is None else points[i].mul_(factor[i])
            target.copy_(x.add_(mean) if mean is not None else x)
        else:
            torch.mul(points[i], factor[i], out=target)


@torch.compiler.disable
def gauged_step(opt: DDC, group_of: dict[int, dict[str, Any]]) -> None:
    """One DDC step on every gauged parameter (see :meth:`DDC._gauged_step`, the
    reference, for the meaning of each stage). The tensor work runs in the plan's kernels
    (:meth:`FastPlan.kernel`: compiled with ``DDC(compile=True)``); between them the host
    reads only the balancing solve's stopping numbers.

    An outer ``torch.compile`` (of ``opt.step`` or of a training step that calls it) does
    not trace into this function: traced whole, it graph-breaks at the solve's host reads,
    ran slower than eager, and (torch 2.14) computed a wrong step from the second step on
    for the centred readout of a small transformer (``test_compiled_step_runs_and_matches_eager``;
    cause not found). ``compile=True`` compiles the kernels instead."""
    frame = opt._frame
    params = [p.detach() for p in frame.params]
    device = params[0].device
    plan = opt._fast_plan
    if plan is None or plan.device != device or plan.compiled != opt.compile:
        plan = opt._fast_plan = FastPlan(opt, device)
    work = opt._work_dtype()
    freeze = opt.dead_mode == "freeze"
    tol, max_iter = opt._balance_tol(), opt.balance_max_iter
    zero_level = opt._zero_level()
    grads = [p.grad.detach() for p in frame.params]
    spec = _Spec(opt, group_of, grads, work, plan.compiled)

    # 1. Canonical frame (the solve warm-starts from the stored frame).
    level = opt.reference_norm ** 2
    log_scales = torch.cat(opt._log_scales).to(device) if plan.n else torch.zeros(0, dtype=torch.float64, device=device)
    points, grads, means, reduced, first = plan.kernel("prepare")(params, grads, work, log_scales, level, zero_level)
    sweeps_before = 0
    schedule = (opt.balance_steps or (4 if work == torch.float64 else 2),
                opt.balance_cg_steps or plan.cg_steps.get(work, plan.cg_steps_low))
    if plan.n:
        if opt._frame_initialised():
            # The stored frame moves equivariantly with the trajectory: a fixed number of
            # Newton steps from it keeps the step exact, and needs no host read.
            # With dead_mode "freeze" the last step left that frame canonical for the
            # parameters as they are now (to its re-balancing's residual), so one round
            # confirms it; "free" moves the frame every step and takes the full schedule.
            kappa, active, system = first
            before = (opt.balance_steps_before if freeze else schedule[0], schedule[1])
            log_scales = plan.kernel("balance")(log_scales, *reduced, kappa, active, system, *before)
            sweeps_before = before[0]
        else:
            # State init (the first step, or the first after the frame was reset): the
            # frame of the starting point by the adaptive solve (host reads), once; 0 is
            # no equivariant start.
            log_scales, sweeps_before, unsettled = plan.solve(*reduced, log_scales, tol, max_iter, first)
            frame.warn_unsettled(unsettled, tol, max_iter)
        opt._log_scales = [x.clone() for x in log_scales.split(plan.sizes)]
    # 2-4. Weight decay, the base step, the dead directions removed.
    inside = opt.rotation_solve == "eigh"
    points, reduced, first = plan.kernel("middle")(spec, points, grads, log_scales, work, freeze, level,
                                                   zero_level, inside)
    if freeze and plan.rotations and not inside:  # ``reduced`` holds the deltas: project, then finish
        _remove_rotations(plan, reduced, points, opt)
        points, reduced, first = plan.kernel("finish")(points, reduced, freeze, level, zero_level)
    sweeps_after = 0
    if reduced is not None:
        # The new canonical point is invariant, so the solve from 0 on it is too.
        kappa, active, system = first
        back = plan.kernel("balance")(torch.zeros_like(log_scales), *reduced, kappa, active, system, *schedule)
        sweeps_after = schedule[0]
        log_scales = back - log_scales
    elif plan.n:
        log_scales = -log_scales
    # 5. Back to the model's coordinates: θ_new = θ*_new · S_back / S (+ the mean).
    plan.kernel("write_back")(params, points, means, log_scales if plan.n else None, work)
    opt.last_balance_sweeps = (sweeps_before, sweeps_after)


def _remove_rotations(plan: FastPlan, deltas: list[torch.Tensor], points: list[torch.Tensor],
                      opt: DDC | None = None) -> None:
    """:func:`ddc.functional.remove_rotation_component` for every rotation gauge, writing
    the projected deltas in place: RoPE pairs (block 2) by the closed form, elementwise;
    larger blocks batched over all gauges of that block size (:func:`_lyapunov`; ``opt``
    given: its ``rotation_solve``, else ``eigh``)."""
    for block, gauges in plan.rotation_by_block.items():
        if block == 2:
            _remove_pair_rotations([plan.rotations[r] for r in gauges], deltas, points)
            continue
        # Member k of every gauge of this block size, stacked (one bmm per member position
        # instead of one per gauge) where the gauges have the same member shapes.
        views = [[(m, m.get(points[m.index]), m.get(deltas[m.index])) for m in plan.rotations[r]] for r in gauges]
        shapes = {tuple((x.shape, x.dtype) for _, x, _ in gauge) for gauge in views}
        if len(shapes) == 1:
            xs = [torch.cat([gauge[k][1] for gauge in views]) for k in range(len(views[0]))]
            ds = [torch.cat([gauge[k][2] for gauge in views]) for k in range(len(views[0]))]
        else:
            xs, ds = None, None
        if xs is not None:
            gram = sum(torch.bmm(x, x.transpose(1, 2)) for x in xs)
            cross = sum(torch.bmm(d, x.transpose(1, 2)) for d, x in zip(ds, xs))
        else:
            gram = torch.cat([sum(x @ x.transpose(1, 2) for _, x, _ in gauge) for gauge in views])
            cross = torch.cat([sum(d @ x.transpose(1, 2) for _, x, d in gauge) for gauge in views])
        generator = _lyapunov(plan, block, gram, cross - cross.transpose(1, 2), opt)
        if xs is not None:
            projected = [d - torch.bmm(generator, x) for d, x in zip(ds, xs)]
        start = 0
        for g, gauge in enumerate(views):
            n = gauge[0][1].shape[0]
            for k, (m, x, d) in enumerate(gauge):
                new = projected[k][start:start + n] if xs is not None else d - generator[start:start + n] @ x
                deltas[m.index] = m.set(deltas[m.index], new)
            start += n


def _remove_pair_rotations(gauges: list[list[_Blocks]], deltas: list[torch.Tensor],
                           points: list[torch.Tensor]) -> None:
    """The so(2) projection of gauges of 2-blocks (RoPE pairs): with ``x = (x0, x1)`` per
    pair, the generator is ``a·J``, ``a = Σ (d0·x1 − d1·x0) / Σ |x|²`` (the reference's
    ``rhs / trace``, floored per gauge as there), and ``d ← d − a J x = (d0 − a x1, d1 + a x0)``.
    Gauges whose members have the same shapes (a model's layers) are stacked and projected
    together: one pass of these few ops instead of one per layer."""
    views = [[(m, m.get(points[m.index]), m.get(deltas[m.index])) for m in members] for members in gauges]
    if len({tuple((x.shape, x.dtype) for _, x, _ in gauge) for gauge in views}) != 1:
        for members in gauges:  # unequal shapes: one gauge at a time
            _remove_pair_rotations([members], deltas, points)
        return
    xs = [torch.stack([gauge[k][1] for gauge in views]) for k in range(len(views[0]))]   # (G, n, 2, rest)
    ds = [torch.stack([gauge[k][2] for gauge in views]) for k in range(len(views[0]))]
    trace = sum(x.square().sum((2, 3)) for x in xs)                       # (G, n)
    cross = sum((d * x.flip(2)).sum(3) for d, x in zip(ds, xs))           # (G, n, 2): d0·x1, d1·x0
    rhs = cross[..., 0] - cross[..., 1]
    floor = trace.abs().amax(dim=1, keepdim=True) * 1e-12 + torch.finfo(trace.dtype).tiny
    a = torch.where(trace > floor, rhs / trace.clamp_min(floor), torch.zeros_like(rhs))[..., None, None]
    signs = torch.tensor([1.0, -1.0], dtype=trace.dtype, device=trace.device).view(1, 1, 2, 1)
    for k, (x, d) in enumerate(zip(xs, ds)):
        new = d - a * signs * x.flip(2)
        for g, gauge in enumerate(views):
            m = gauge[k][0]
            deltas[m.index] = m.set(deltas[m.index], new[g])


def _lyapunov(plan: FastPlan, block: int, gram: torch.Tensor, rhs: torch.Tensor, opt: DDC | None = None
              ) -> torch.Tensor:
    """The skew ``A`` with ``A M + M A = rhs`` per matrix (``M = gram``, symmetric PSD), as
    :func:`ddc.functional.remove_rotation_component` solves it: by ``eigh`` (the
    reference's way; also without ``opt``), or with ``DDC(rotation_solve="cg")`` by
    preconditioned CG in the eigenbasis of an earlier step's ``M`` (:func:`_lyapunov_cg`)
    when there is one and CG converges, else by ``eigh``, whose eigenvectors become the
    basis for the next steps. ``gram`` stacks the gauges ``plan.rotation_by_block[block]``
    in order; the basis is kept per gauge in the optimizer's state (:func:`_store_basis`)."""
    cg = opt is not None and opt.rotation_solve == "cg"
    basis = plan.rotation_basis.get(block) if cg else None
    if cg and basis is None:
        basis = plan.rotation_basis[block] = _load_basis(opt, plan, block)
    if basis is not None and basis.shape == gram.shape and basis.dtype == gram.dtype:
        solved = _lyapunov_cg(plan, basis, gram, rhs)
        if solved is not None:
            generator, stale = solved
            if stale:
                del plan.rotation_basis[block]
                _store_basis(opt, plan, block, None)
            return generator
    generator, eigvecs = F.lyapunov_skew(gram, rhs)
    if cg:
        # Row-major, as the basis loaded from a checkpoint is (``_load_basis`` concatenates):
        # eigh's column-major eigenvectors would give the CG's products other round-off in
        # the run than after a resume, and the resumed run would not continue bitwise.
        basis = plan.rotation_basis[block] = eigvecs.contiguous()
        _store_basis(opt, plan, block, basis)
    plan.rotation_solves["eigh"] += 1
    return generator


def _lyapunov_cg(plan: FastPlan, basis: torch.Tensor, gram: torch.Tensor, rhs: torch.Tensor
                 ) -> tuple[torch.Tensor, bool] | None:
    """:func:`_lyapunov` by conjugate gradients (and whether the basis has gone stale:
    :data:`ROTATION_REFRESH_AFTER`), or None if they do not converge in
    :data:`ROTATION_MAX_ITER` iterations (or a matrix is near-singular, where the
    reference floors eigenvalue pairs).

    Why: a batched ``eigh`` is the costliest op of the step where heads are large (CUDA,
    144 matrices 64×64: 122 ms, against 2 ms for a fused AdamW step of the whole model),
    while ``M`` moves little per step. In the eigenbasis ``V`` of an earlier ``M``, the
    operator ``A ↦ M̂A + AM̂`` (``M̂ = VᵀMV``) is nearly diagonal on skew matrices, with
    diagonal ``M̂_ii + M̂_jj``; CG preconditioned by it converges in a few iterations, each
    one batched matrix product (``AM̂ = -(M̂A)ᵀ`` for skew ``A``). Stops at a relative
    residual of :data:`ROTATION_TOL_EPS` eps of the working precision (float64: 1.8e-15), as
    accurate as the reference's eigh solve."""
    vt = basis.transpose(1, 2)
    m = vt @ gram @ basis
    m = 0.5 * (m + m.transpose(1, 2))
    r = vt @ rhs @ basis
    r = 0.5 * (r - r.transpose(1, 2))   # skew to the last bit: CG cannot reduce a symmetric part
    d = m.diagonal(dim1=1, dim2=2)
    inv = 1.0 / (d.unsqueeze(-1) + d.unsqueeze(-2)).clamp_min(torch.finfo(m.dtype).tiny)
    # Near-singular (smallest diagonal below 1e-8 of the largest): the reference floors
    # pairs of tiny eigenvalues there, which CG does not; eigh does it.
    singular = (d.amin(dim=1) <= 1e-8 * d.amax(dim=1)).any()
    target = (ROTATION_TOL_EPS * torch.finfo(m.dtype).eps) ** 2 * r.square().sum((1, 2))

    def apply(a: torch.Tensor) -> torch.Tensor:
        ma = m @ a
        return ma - ma.transpose(1, 2)

    x = r * inv                     # exact if M has not moved since the basis was taken
    r = r - apply(x)
    z = r * inv
    p = z
    rz = (r * z).sum((1, 2))
    iterations = 0
    while True:
        done, bad = torch.stack([((r.square().sum((1, 2)) <= target).all()), singular]).tolist()
        if bad:
            return None
        if done:
            break
        if iterations >= ROTATION_MAX_ITER:
            return None
        for _ in range(ROTATION_CHECK_EVERY):
            q = apply(p)
            curvature = (p * q).sum((1, 2))
            alpha = torch.where(curvature > 0, rz / curvature.clamp_min(torch.finfo(m.dtype).tiny), 0.0)
            x = x + alpha[:, None, None] * p
            r = r - alpha[:, None, None] * q
            z = r * inv
            rz_new = (r * z).sum((1, 2))
            p = z + (rz_new / torch.where(rz != 0, rz, 1.0))[:, None, None] * p
            rz = rz_new
        iterations += ROTATION_CHECK_EVERY
    plan.rotation_solves["cg"] += 1
    plan.rotation_solves["cg_iterations"] += iterations
    return basis @ x @ vt, iterations > ROTATION_REFRESH_AFTER


def _basis_slices(plan: FastPlan, block: int) -> list[tuple[int, int, int]]:
    """(gauge, start, stop) of each rotation gauge of ``block`` in the stacked matrices of
    :func:`_remove_rotations`."""
    out, start = [], 0
    for r in plan.rotation_by_block[block]:
        member = plan.rotations[r][0].member
        n = member.perm.numel() // member.block
        out.append((r, start, start + n))
        start += n
    return out


def _load_basis(opt: DDC, plan: FastPlan, block: int) -> torch.Tensor | None:
    """The stacked basis of ``block`` from the optimizer's state (None unless every gauge
    of that block size has one: a fresh or reference-path optimizer)."""
    parts = []
    for r, start, stop in _basis_slices(plan, block):
        param, key = opt._rotation_anchors[r]
        value = opt.state[param].get(key) if param is not None and param in opt.state else None
        if value is None or value.shape[0] != stop - start:
            return None
        parts.append(value)
    return torch.cat(parts) if parts else None


def _store_basis(opt: DDC, plan: FastPlan, block: int, basis: torch.Tensor | None) -> None:
    """Each gauge's slice of ``basis`` into the state of its anchor (own copies: a saved view
    would save the whole stacked tensor); ``None`` removes them."""
    for r, start, stop in _basis_slices(plan, block):
        param, key = opt._rotation_anchors[r]
        if param is None:
            continue
        if basis is None:
            opt.state[param].pop(key, None)
        else:
            opt.state[param][key] = basis[start:stop].clone()
