"""The balancing rule where a coordinate's mass on one side is exactly zero: no infinite
or NaN log-scale, no move where the canonical-point equation has no root, the exact root
where it has one (written by the issue-17 helper; its two-gauge Newton solve was not
merged, so its comparison with CG is not here)."""

import torch

from ddc.balancing import ScaleSystem, closed_form_step


def test_closed_form_step_is_finite_and_exact_with_zero_sides():
    grow = torch.tensor([0.0, 0.0, 2.0, 2.0, 0.0, 3.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    shrink = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, float("inf"), 5.0, 4.0, 4.0], dtype=torch.float64)
    kappa = torch.tensor([0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, -2.0], dtype=torch.float64)
    active = grow.ne(0) | shrink.ne(0)
    step = closed_form_step(grow, shrink, kappa, active)
    assert torch.isfinite(step).all(), step
    # No root (the side κ needs is zero, or a side is not finite): no move.
    assert step[[0, 2, 4, 5, 6]].eq(0).all(), step
    # A root: A e^{2δ} − B e^{−2δ} = κ holds.
    for k in (1, 3, 7, 8):
        residual = grow[k] * torch.exp(2 * step[k]) - shrink[k] * torch.exp(-2 * step[k]) - kappa[k]
        assert abs(float(residual)) < 1e-12, (k, float(residual))


def test_the_fixed_schedule_stays_finite_and_canonical_with_dead_rows():
    """Two gauges (4 and 3 coordinates) coupled by one 4 x 3 parameter, each with its own
    one-axis member; ``zero_rows`` rows of everything of the large gauge are zero."""
    for zero_rows in (0, 1):
        torch.manual_seed(0)
        scale_axes = {0: [(0, 0, 1), (1, 1, -1)], 1: [(0, 0, -1)], 2: [(0, 1, 1)]}
        shapes = [(4, 3), (4, 5), (3,)]
        system = ScaleSystem(scale_axes, shapes, [4, 3], [0.0, 1.0], torch.device("cpu"))
        points = [torch.randn(s, dtype=torch.float64) for s in shapes]
        points[0][:zero_rows] = 0
        points[1][:zero_rows] = 0
        reduced = system.reduce(points)
        kappa, active, start = system.first_system(*reduced, None, 1.0, 1e-8)
        s = system.balance(torch.zeros(system.n, dtype=torch.float64), *reduced, kappa, active, start, 4, 8)
        assert torch.isfinite(s).all()
        assert s[:zero_rows].eq(0).all()    # dead coordinates do not move
        assert float(system.residual(*reduced, s, 1.0, 1e-8)) < 1e-12
