"""The balancing rule: the scale frame that moves a point to the canonical point of its
orbit under every scale gauge together, written once and used by both steps.

* :func:`canonical_levels` — the canonical-point rule (κ and the active set);
* :func:`closed_form_step` — one coordinate's own equation solved exactly;
* :class:`ScaleSystem` — the flat layout of all scale gauges of a model (index tensors
  built once) and the solves on it: :meth:`ScaleSystem.solve`, adaptive (damped Newton,
  inexact CG, host reads: the reference step every step, the batched step at state
  init) and :meth:`ScaleSystem.balance`, a fixed schedule without host reads (the
  batched step after its first step; exactly equivariant for any counts, ``docs/ddc.md``,
  "Fixed schedules"), and :meth:`ScaleSystem.residual`, its certificate;
* :func:`min_norm_log_scales` — the same solve for a point given by its reduced squared
  norms (tests, :meth:`ddc.frame.Frame.solve_scales`).

Imports nothing of the package: the rules sit at the bottom of the import graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["canonical_levels", "closed_form_step", "ScaleSystem", "min_norm_log_scales",
           "CG_CHECK_EVERY", "MAX_NEWTON_STEP"]

#: Conjugate-gradient iterations between two reads of the residual by the host (the
#: adaptive solve only). Measured on GPT small (30 training steps): 5.1 iterations a step
#: when checking after every one, 6.2 every 2, 8.0 every 4 (each Newton step needs about 2.5).
CG_CHECK_EVERY = 2
#: Largest Newton step (log-scale units, per coordinate) of the fixed-schedule balancing
#: (:meth:`ScaleSystem.balance`): a factor e^0.5 at most, a trust region that keeps a full
#: Newton step from overshooting far from the solution (which the adaptive solve's line
#: search does on the host). Clipping an invariant step is invariant: equivariance stays.
MAX_NEWTON_STEP = 0.5


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
    invariants at an equivariant start, so equivariant.

    Where the equation has no root (the side that ``κ`` needs is exactly zero: the
    objective decreases forever along the coordinate) or the sides are not finite, the
    coordinate does not move either: never an infinite or NaN step, and no host read.
    (Without this rule a zero grow side with ``κ = 0`` gave ``x = 0`` and a step of
    ``½·log(tiny) ≈ −354``, after which the sides overflow.)"""
    tiny = torch.finfo(grow.dtype).tiny
    grow2, shrink2 = 2 * grow, 2 * shrink   # (4AB as 2A·2B: powers of two, the same bits)
    disc = torch.sqrt(kappa * kappa + grow2 * shrink2)
    grows = kappa >= 0
    # Each branch's numerator and denominator picked first: one division, the same numbers.
    x = torch.where(grows, kappa + disc, shrink2) / torch.where(grows, grow2, disc - kappa).clamp_min(tiny)
    # x > 0 and below inf: a positive finite root (NaN fails both comparisons); the log of
    # any other x is computed but not taken.
    solvable = active & (torch.where(grows, grow, shrink) > 0) & (x > 0) & (x < float("inf"))
    return torch.where(solvable, 0.5 * torch.log(x), 0.0)


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


@torch.library.custom_op("ddc::row_vector_bmm", mutates_args=())
def _row_vector_bmm(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(v, x)`` for a stack of row vectors ``v`` (L, 1, n), as one opaque
    operator for ``torch.compile``: inductor would otherwise decompose the product into a
    loop that recomputes ``v``'s gather from the flat log-scales for every output entry
    (measured on GPT small's stack, CPU: the Hessian product 0.45 ms compiled against
    0.07 ms eager; with this operator 0.11 ms)."""
    return torch.bmm(v, x)


@_row_vector_bmm.register_fake
def _(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.new_empty((v.shape[0], v.shape[1], x.shape[2]))


def _bmm(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Row vectors times a stack: ``torch.bmm`` eagerly, :func:`_row_vector_bmm` traced."""
    return _row_vector_bmm(v, x) if torch.compiler.is_compiling() else torch.bmm(v, x)


def _checks(system: dict[str, Any]) -> torch.Tensor:
    """The two numbers the adaptive solve reads per Newton step: max |Jacobi step| and
    max |gradient|."""
    return torch.stack([system["z"].abs().max(), system["grad"].abs().max()])


class ScaleSystem:
    """The scale gauges of a model on one flat vector of log-scales: index tensors built
    once, and the balancing solves on them (pure tensor functions of their arguments).

    ``scale_axes[i]``: for parameter ``i`` (of shape ``shapes[i]``), its scaled axes as
    ``(axis, gauge, sign)`` in increasing axis order (one or two); gauge ``g`` has
    ``sizes[g]`` coordinates and level ``levels[g]`` (``ScaleGauge.level``)."""

    def __init__(self, scale_axes: dict[int, list[tuple[int, int, int]]], shapes: Sequence[Sequence[int]],
                 sizes: list[int], levels: list[float], device: torch.device) -> None:
        self.device = device
        self.sizes = sizes
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.n = self.offsets[-1]
        lv = torch.cat([torch.full((n,), float(x), dtype=torch.float64) for n, x in zip(sizes, levels)]) \
            if sizes else torch.zeros(0, dtype=torch.float64)
        self.levels = lv.to(device)
        self.gauge_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long)) \
            if sizes else torch.zeros(0, dtype=torch.long)
        self.factor_axes = {i: list(axes) for i, axes in sorted(scale_axes.items())}

        # Parameters scaled along one axis: their squared norms summed over the other axes
        # land in one flat vector (term t -> coordinate coord1[t], growing or shrinking side).
        self.one: list[tuple[int, int, list[int]]] = []    # (param, axis, other dims)
        two: dict[tuple[int, int], list[int]] = {}         # (n_a, n_b) -> params
        coord1, sign1 = [], []
        for i, axes in self.factor_axes.items():
            ndim = len(shapes[i])
            if len(axes) == 1:
                axis, g, sign = axes[0]
                self.one.append((i, axis, [d for d in range(ndim) if d != axis]))
                coord1.append(torch.arange(self.offsets[g], self.offsets[g + 1]))
                sign1.append(torch.full((sizes[g],), float(sign), dtype=torch.float64))
            else:
                (a, _, _), (b, _, _) = axes
                two.setdefault((shapes[i][a], shapes[i][b]), []).append(i)
        self.coord1 = torch.cat(coord1).to(device) if coord1 else torch.zeros(0, dtype=torch.long, device=device)
        self.sign1 = torch.cat(sign1).to(device) if sign1 else torch.zeros(0, dtype=torch.float64, device=device)
        self.side1 = self.coord1 + self.n * (self.sign1 < 0).long()
        # Parameters scaled along two axes, stacked per shape.
        self.stacks = []
        for (na, nb), members in two.items():
            ca, cb, sa, sb, other = [], [], [], [], []
            for i in members:
                (a, ga, sga), (b, gb, sgb) = self.factor_axes[i]
                ca.append(torch.arange(self.offsets[ga], self.offsets[ga + 1]))
                cb.append(torch.arange(self.offsets[gb], self.offsets[gb + 1]))
                sa.append(float(sga))
                sb.append(float(sgb))
                other.append([d for d in range(len(shapes[i])) if d not in (a, b)])
            ca_t, cb_t = torch.stack(ca).to(device), torch.stack(cb).to(device)
            sa_t = torch.tensor(sa, dtype=torch.float64, device=device)[:, None]
            sb_t = torch.tensor(sb, dtype=torch.float64, device=device)[:, None]
            # Where each entry's side sits in the 2N sides (and its e^{±2s} in _sides's
            # table), as (L, 1, n) index shapes: gathered, they are bmm's row vectors.
            side_a = (ca_t + self.n * (sa_t < 0).long()).unsqueeze(1)
            side_b = (cb_t + self.n * (sb_t < 0).long()).unsqueeze(1)
            self.stacks.append({
                "params": members, "other": other, "shape": (na, nb),
                "gather_a": side_a, "gather_b": side_b, "side_a": side_a.reshape(-1), "side_b": side_b.reshape(-1),
                "ca3": ca_t.unsqueeze(1), "cb3": cb_t.unsqueeze(1),
                "flat_a": ca_t.reshape(-1), "flat_b": cb_t.reshape(-1),
                # (L, 1, 1): the sign of the off-diagonal Hessian block, ±4
                "coupling3": (4 * sa_t * sb_t).unsqueeze(1),
            })
        # The fixed schedule's CG iterations (DDC(balance_cg_steps=None)): CG reaches a
        # coordinate only after as many products as gauges lie between it and the residual,
        # so twice the longest shortest path of the gauges' coupling graph (edges: parameters
        # scaled along two axes), at least 8. Measured (float64, ReLU chain of depth 24,
        # diameter 23): 16 iterations leave 1e-8 to 3e-7 in the frame, 32 leave round-off.
        edges: dict[int, set[int]] = {}
        for axes in self.factor_axes.values():
            if len(axes) == 2:
                (_, ga, _), (_, gb, _) = axes
                edges.setdefault(ga, set()).add(gb)
                edges.setdefault(gb, set()).add(ga)
        diameter = _diameter(edges)
        self.cg_steps = {torch.float64: max(8, 2 * diameter)}
        # float32 (and bf16/fp16 parameters, balanced in float32) needs the frame to about
        # 1e-6 only: measured on GPT small (float32, lr 1e-3), 2 rounds of 4 CG iterations
        # leave the round-off floor (1.2e-7), as 4 rounds of 8 do. Where no chain of
        # couplings is longer than one (each coupled gauge pair apart: an MLP's unit gauge
        # and the norm gain before it), 2 iterations a round leave the same floor
        # (GPT small, 60 steps at lr 1e-3, 3e-3 and 1e-2: balance_residual 0.9e-7 to
        # 1.1e-7, as with 4), and the Newton step is followed by a closed-form step anyway.
        self.cg_steps_low = 2 if diameter <= 1 else max(4, diameter)
        #: Conjugate-gradient iterations the adaptive solve ran so far (a diagnostic).
        self.cg_iterations = 0
        self._plan_factors({i: [(axis, self._dense_index(g, sign)) for axis, g, sign in axes]
                            for i, axes in self.factor_axes.items()},
                           {i: len(shapes[i]) for i in self.factor_axes})

    def _dense_index(self, g: int, sign: int) -> torch.Tensor:
        """Where gauge ``g``'s factors ``e^{sign·s}`` sit in :meth:`factors`'s table."""
        return torch.arange(self.offsets[g], self.offsets[g + 1]) + (self.n if sign < 0 else 0)

    def schedule(self, work: torch.dtype, newton_steps: int | None, cg_steps: int | None) -> tuple[int, int]:
        """The fixed schedule's (rounds, CG iterations) for the working precision ``work``,
        the given counts where not None (``DDC(balance_steps=..., balance_cg_steps=...)``)."""
        return (newton_steps or (4 if work == torch.float64 else 2),
                cg_steps or self.cg_steps.get(work, self.cg_steps_low))

    # ---------------------------------------------------------------------- scale factors

    def _plan_factors(self, pieces: dict[int, list[tuple[int, torch.Tensor]]], ndims: dict[int, int]) -> None:
        """Precompute :meth:`factors`'s gathers. ``pieces[i]``: parameter ``i``'s factor
        pieces as (axis, index into the table ``[e^s, e^{-s}, 1]``), multiplied in that
        order. Pieces broadcast along the same number of trailing axes share one gather (a
        *bank*), viewed once with those singleton axes and split into the pieces: a few
        operators for every parameter together instead of several per parameter."""
        banks: dict[int, list[torch.Tensor]] = {}
        self._factor_pieces: dict[int, list[tuple[int, int]]] = {}
        for i, param_pieces in sorted(pieces.items()):
            self._factor_pieces[i] = []
            for axis, index in param_pieces:
                trailing = ndims[i] - 1 - axis
                bank = banks.setdefault(trailing, [])
                self._factor_pieces[i].append((trailing, len(bank)))
                bank.append(index)
        self._factor_banks = [(trailing, torch.cat(bank).to(self.device), [int(x.numel()) for x in bank])
                              for trailing, bank in sorted(banks.items())]
        self._table_one = torch.zeros(1, dtype=torch.float64, device=self.device)

    def factors(self, log_scales: torch.Tensor, dtype: torch.dtype, like: Sequence[torch.Tensor],
                times: Sequence[float | torch.Tensor] | None = None, ones: Sequence[bool] | None = None
                ) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """The scale factor ``S`` of every parameter for the flat float64 ``log_scales``,
        broadcastable to it (``None`` for unscaled parameters; ``like``: the parameters,
        for their count), and the same times ``times[i]`` (weight decay folded into one
        multiply of the first, small, piece; ``S`` again where ``times`` is None or
        ``ones[i]``)."""
        table = torch.exp(torch.cat([log_scales, -log_scales, self._table_one])).to(dtype)
        split: dict[int, tuple[torch.Tensor, ...]] = {}
        for trailing, index, sizes in self._factor_banks:
            bank = table[index]
            if trailing:
                bank = bank.view(-1, *([1] * trailing))
            split[trailing] = bank.split(sizes)
        pieces = {i: [split[t][k] for t, k in where] for i, where in self._factor_pieces.items()}
        out: list[torch.Tensor | None] = [None] * len(like)
        out_times: list[torch.Tensor | None] = [None] * len(like)
        for i, (first, *rest) in pieces.items():
            out[i] = first if not rest else first * rest[0]
            out_times[i] = out[i]
        decayed = [] if times is None else \
            [i for i in pieces if not (ones[i] if ones is not None else times[i] == 1.0)]
        if decayed:
            firsts = [pieces[i][0] for i in decayed]
            if isinstance(times[decayed[0]], torch.Tensor):  # 0-d tensors (the compiled step)
                scaled = [f * times[i] for f, i in zip(firsts, decayed)]
            else:  # one operator for all: each piece times its own number
                scaled = torch._foreach_mul(firsts, [times[i] for i in decayed])
            for i, f in zip(decayed, scaled):
                out_times[i] = f if len(pieces[i]) == 1 else f * pieces[i][1]
        return out, out_times

    # ------------------------------------------------------------------------- balancing

    def pack(self, reduced_sq: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`reduce`'s layout from squared norms already summed over the unscaled axes
        (``reduced_sq[i]``: one dimension per scaled axis of parameter ``i``)."""
        flat = [reduced_sq[i].double() for i, _, _ in self.one]
        r1 = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64, device=self.device)
        return r1, [torch.stack([reduced_sq[i].double() for i in st["params"]]) for st in self.stacks]

    def reduce(self, points: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The squared entries of the scaled parameters, summed over their unscaled axes
        (float64): one flat vector for the one-axis terms, one stack per two-axis shape
        (written straight into a float64 buffer)."""
        # One parameter at a time: each square is summed while it is in cache (measured on
        # GPT small, CPU: 0.19 ms against 0.36 ms for one foreach square of them all, whose
        # fresh squares are written out and read back).
        flat = [(points[i] * points[i]).sum(other) if other else points[i] * points[i] for i, _, other in self.one]
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
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]], torch.Tensor]:
        """Grow and shrink sums (flat, 2N) at log-scales ``s``, each stack's scalings
        ``(X, Xᵀ, e_a, e_b, c·e_a, c·e_b)`` as (L, 1, n) row vectors (the scaled matrix is
        ``e_a X e_b``, never formed: every use is a matrix-vector product; ``c`` the
        coupling sign ±4, a power of two, so folding it in changes no bit) and the total
        squared norm."""
        # exp(±2s) once for every coordinate, then gathered: e^{2·sign·s_i} sits at
        # i + N·(sign < 0), the same index as coordinate i's side. Products with a stack are
        # row vector times matrix (on the CPU several times faster than a column vector).
        table = torch.exp(torch.cat([2 * s, -2 * s]))
        sides = torch.zeros(2 * self.n, dtype=torch.float64, device=self.device)
        scaled1 = table[self.side1] * r1
        sides.index_add_(0, self.side1, scaled1)
        total = scaled1.sum()
        scaled = []
        for st, x in zip(self.stacks, xs):
            ea, eb, xt = table[st["gather_a"]], table[st["gather_b"]], x.transpose(1, 2)
            rows = ea * _bmm(eb, xt)
            cols = eb * _bmm(ea, x)
            sides.index_add_(0, st["side_a"], rows.view(-1))
            sides.index_add_(0, st["side_b"], cols.view(-1))
            total = total + rows.sum()
            scaled.append((x, xt, ea, eb, st["coupling3"] * ea, st["coupling3"] * eb))
        return sides, scaled, total

    def _hessian(self, diag: torch.Tensor, scaled: list[tuple[torch.Tensor, ...]], v: torch.Tensor) -> torch.Tensor:
        out = diag * v
        for st, (x, xt, ea, eb, ea_c, eb_c) in zip(self.stacks, scaled):
            to_a = ea_c * _bmm(eb * v[st["cb3"]], xt)
            to_b = eb_c * _bmm(ea * v[st["ca3"]], x)
            out.index_add_(0, st["flat_a"], to_a.view(-1))
            out.index_add_(0, st["flat_b"], to_b.view(-1))
        return out

    def _levels(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], level: float,
                zero_level: float
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, list[Any], torch.Tensor]]:
        """κ and the active coordinates (the canonical-point rule) read at log-scales ``s``,
        and the sides there (the solve's first Newton evaluation).

        Where to read matters where parameters couple gauges: a coordinate's ``√(AB)`` is
        invariant under its own scaling but not under its neighbours'. A warm solve reads
        at the stored frame, which moves with the trajectory (so the reading is as
        equivariant as the frame) and is where the last solve left the point canonical, so
        every solve of a step reads its degenerate set at the same, canonical, point. Read
        at the model's own coordinates instead, a unit near the degenerate threshold was
        degenerate to one solve and live to the next, each pulling the frame its way: the
        frame ratcheted by ~4 log-units a step until the model's coordinates under- and
        overflowed (DDC-Muon, grok_depth lr_mult 8, step 2510)."""
        sides = self._sides(s, r1, xs)
        grow0, shrink0 = sides[0][:self.n], sides[0][self.n:]
        kappa, active = canonical_levels(grow0, shrink0, self.levels * level, level, zero_level)
        return kappa, active, sides

    def _system(self, s: torch.Tensor, kappa: torch.Tensor, active: torch.Tensor,
                sides: tuple[torch.Tensor, list[Any], torch.Tensor]) -> dict[str, Any]:
        """The Newton system at ``s`` from its sides: gradient, Hessian diagonal, Jacobi
        preconditioner and step, the sides, and the total squared norm (the adaptive
        solve's objective and host checks are formed there: :func:`_checks`)."""
        grow, shrink = sides[0][:self.n], sides[0][self.n:]
        grad = torch.where(active, 2 * (grow - shrink - kappa), 0.0)
        diag = 4 * (grow + shrink)
        precond = torch.where(active & (diag > 0), 1 / diag.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
        z = precond * -grad
        return {"grad": grad, "diag": diag, "scaled": sides[1], "precond": precond, "z": z,
                "grow": grow, "shrink": shrink, "total": sides[2]}

    def evaluate(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor,
                  active: torch.Tensor) -> dict[str, Any]:
        """:meth:`_system` at ``s`` (the adaptive solve's evaluation)."""
        return self._system(s, kappa, active, self._sides(s, r1, xs))

    def _evaluate_zero(self, r1: torch.Tensor, xs: list[torch.Tensor], level: float, zero_level: float
                       ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """κ, the active coordinates and the Newton system at log-scales 0."""
        return self._evaluate_warm(torch.zeros(self.n, dtype=torch.float64, device=self.device), r1, xs,
                                   level, zero_level)

    def _evaluate_warm(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], level: float,
                       zero_level: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """κ, the active coordinates and the Newton system at the warm start ``s``."""
        kappa, active, at_warm = self._levels(s, r1, xs, level, zero_level)
        return kappa, active, self._system(s, kappa, active, at_warm)

    def objective(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor
                   ) -> torch.Tensor:
        """``F(s) = ‖S(s)·θ‖² − 2 κ·s`` (the line search's function)."""
        return self._sides(s, r1, xs)[2] - 2 * (kappa * s).sum()

    def first_system(self, r1: torch.Tensor, xs: list[torch.Tensor], warm: torch.Tensor | None, level: float,
                     zero_level: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The start of :meth:`solve` (κ, the active coordinates, the Newton system at the
        warm start, or at 0 for ``warm=None``): the step's kernels that compute the squared
        norms run it too, which saves the solve a kernel call."""
        if warm is None:
            return self._evaluate_zero(r1, xs, level, zero_level)
        return self._evaluate_warm(warm, r1, xs, level, zero_level)

    def start(self, r1: torch.Tensor, xs: list[torch.Tensor], warm: torch.Tensor | None, level: float,
              zero_level: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The start of :meth:`balance`: κ, the active coordinates and the sides (``grow``,
        ``shrink``) at the warm start (0 for ``warm=None``), all that its first closed-form
        step reads (:meth:`first_system` also forms the Newton system, which only the
        adaptive solve uses there)."""
        s = torch.zeros(self.n, dtype=torch.float64, device=self.device) if warm is None else warm
        kappa, active, sides = self._levels(s, r1, xs, level, zero_level)
        return kappa, active, {"grow": sides[0][:self.n], "shrink": sides[0][self.n:]}

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
        :data:`CG_CHECK_EVERY` iterations."""
        s = torch.zeros(self.n, dtype=torch.float64, device=self.device) if warm is None else warm.clone()
        if self.n == 0:
            return s, 0, []
        kappa, active, system = first
        step, t = torch.zeros_like(s), 1.0
        for newton in range(1, max_iter + 1):
            if system is None:
                system = self.evaluate(s, r1, xs, kappa, active)
            estimate, rmax = _checks(system).tolist()
            step, largest, atol = self._cg(system, estimate, rmax, tol)
            if estimate <= 0.5 * tol:
                # The Jacobi estimate of the Newton step is below tol/2 (the step itself is
                # within about twice its Jacobi estimate): the point is canonical to tol, as
                # when the reference stops; the Jacobi step is still taken.
                return s + step, newton, []
            t = 1.0
            if largest > 0.1:  # damped, as the reference: far from the solution only
                f0 = float(system["total"] - 2 * (kappa * s).sum())
                slope = float(system["grad"] @ step)
                objective = self.objective
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
        block = self._cg_block
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
        for _ in range(CG_CHECK_EVERY):
            state, curvature = self._cg_iteration(diag, scaled, precond, state)
        r = state[1]
        return state, torch.stack([(precond * r).abs().max(), r.abs().max(), curvature])

    def _cg_iteration(self, diag: torch.Tensor, scaled: list[Any], precond: torch.Tensor,
                      state: tuple[torch.Tensor, ...]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """One Jacobi-preconditioned CG iteration for ``H x = b`` from ``state`` = (x, r, p,
        rᵀz); returns the new state and the curvature pᵀHp. No step where the curvature is
        not positive (p = 0: converged); rᵀz ≥ 0 (the preconditioner is ≥ 0), so a zero one
        (converged) gives β = 0."""
        x, r, p, rz = state
        tiny = torch.finfo(torch.float64).tiny
        ap = self._hessian(diag, scaled, p)
        curvature = p @ ap
        alpha = torch.where(curvature > 0, rz / curvature.clamp_min(tiny), 0.0)
        x = torch.addcmul(x, alpha, p)
        r = torch.addcmul(r, alpha, ap, value=-1)
        z = precond * r
        rz_new = r @ z
        p = torch.addcmul(z, rz_new / rz.clamp_min(tiny), p)
        return (x, r, p, rz_new), curvature

    def balance(self, s: torch.Tensor, r1: torch.Tensor, xs: list[torch.Tensor], kappa: torch.Tensor,
                 active: torch.Tensor, system: dict[str, Any], newton_steps: int, cg_steps: int) -> torch.Tensor:
        """The balancing solve on a fixed schedule, without host reads (one kernel): from
        ``s`` (``system``: its sides there, ``grow`` and ``shrink``: :meth:`start`), every coordinate jumps to the exact
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
        s = s + closed_form_step(system["grow"], system["shrink"], kappa, active)
        if not self.stacks:
            return s  # no coupling: the closed form is the solution
        for _ in range(newton_steps):
            # A Newton step for the coupling, then the closed form again for what it left
            # of the large per-coordinate moves (a unit whose zero side came alive moves
            # by log-scales of several units in one step). Measured (float64, zero-initialised
            # attention output and MLP down projections, lr 1e-2): the frame's residual after
            # 3 / 4 / 5 such rounds 1.5e-7 / 4e-15 / 3e-16, against 6e-4 / 3e-7 / 9e-14
            # with Newton steps alone.
            system = self.evaluate(s, r1, xs, kappa, active)
            step = self._cg_fixed(system, cg_steps)
            # A non-finite entry (overflowed sides) does not move its coordinate.
            s = s + torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0).clamp(-MAX_NEWTON_STEP, MAX_NEWTON_STEP)
            sides = self._sides(s, r1, xs)[0]   # (the closed form reads the sides alone)
            s = s + closed_form_step(sides[:self.n], sides[self.n:], kappa, active)
        return s

    def _cg_fixed(self, system: dict[str, Any], cg_steps: int) -> torch.Tensor:
        """``cg_steps`` iterations of :meth:`_cg_iteration` for ``H x = -grad`` from 0."""
        r = -system["grad"]
        z = system["z"]
        state = (torch.zeros_like(r), r, z, r @ z)
        for _ in range(cg_steps):
            state = self._cg_iteration(system["diag"], system["scaled"], system["precond"], state)[0]
        return state[0]

    def residual(self, r1: torch.Tensor, xs: list[torch.Tensor], s: torch.Tensor, level: float,
                 zero_level: float) -> torch.Tensor:
        """How far ``s`` is from the canonical point: the largest Jacobi estimate of the Newton
        step there (log-scale units; a 0-d tensor)."""
        kappa, active, system = self._evaluate_warm(s, r1, xs, level, zero_level)
        return system["z"].abs().max() if system["z"].numel() else torch.zeros((), dtype=torch.float64)


# ------------------------------------------------------------------------------ the step


def min_norm_log_scales(reduced_sq: list[torch.Tensor], axes: list[list[tuple[int, int]]],
                        sizes: list[int], log_scales: list[torch.Tensor], tol: float,
                        max_iter: int, reference_norm: float = 1.0,
                        zero_level: float = 0.0,
                        levels: list[float] | None = None) -> tuple[list[torch.Tensor], int, list[int]]:
    """Kempf–Ness: the log-scales moving a point to the canonical point of its orbit under
    a torus of scale gauges (:meth:`ScaleSystem.solve`, the one adaptive solve).

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
      coordinate's own scaling) at most ``zero_level · ρ²``, read at the warm start
      ``log_scales`` (where a parameter couples two gauges the product also depends on the
      neighbours' scales; the warm start is the frame that moves with the trajectory): a
      readout centred after a logit shift is zero only up to round-off;
    * both sides exactly zero: nothing to scale; the coordinate keeps its value.

    Starts from ``log_scales`` (warm start, not modified); returns the new log-scales, the
    number of Newton steps taken and the gauges still moving by more than ``tol`` when
    ``max_iter`` ran out (empty when the solve converged). Everything is float64.
    """
    if not sizes:
        return [x.clone() for x in log_scales], 0, []
    device = log_scales[0].device
    scale_axes = {i: [(d, g, sign) for d, (g, sign) in enumerate(param_axes)] for i, param_axes in enumerate(axes)}
    system = ScaleSystem(scale_axes, [x.shape for x in reduced_sq], sizes,
                         [0.0] * len(sizes) if levels is None else list(levels), device)
    r1, xs = system.pack(reduced_sq)
    warm = torch.cat([x.to(torch.float64) for x in log_scales])
    level = reference_norm ** 2
    s, steps, unsettled = system.solve(r1, xs, warm, tol, max_iter,
                                       system.first_system(r1, xs, warm, level, zero_level))
    return list(s.split(sizes)), steps, unsettled

