"""Contract 6: degenerate orbits. From zero-initialised readouts, attention output or MLP
down projections, and from dead units, a scale orbit has no minimum-norm point; DDC's
documented canonical point (docs/ddc.md, "Degenerate orbits") keeps the step exactly
equivariant (float64, 10 steps, both bases) and no gain or scale runs away."""

import copy

import pytest
import torch

from ddc import DDC
from ddc.gauges import LogitShift
from ddc.functional import min_norm_log_scales
from ddc_models import ReluMLP, TinyTransformer, classification_loss, equivariance_deviation, make_batches

STEPS = 10
TOLERANCE = 1e-8
BASES = [("adam", {}), ("muon", {"orthogonalizer": "svd"})]


def zeroed(model, names):
    with torch.no_grad():
        for name in names:
            layer = getattr(model, name)
            layer.weight.zero_()
            if layer.bias is not None:
                layer.bias.zero_()
    return model


def dead_units_mlp():
    """Unit 2 of the first layer has an all-zero incoming row (and bias): it is dead; unit
    5 of the second layer's input has an all-zero outgoing column."""
    model = ReluMLP().double()
    with torch.no_grad():
        model.fc_in.weight[2].zero_()
        model.fc_in.bias[2].zero_()
        model.fc_hidden.weight[:, 5].zero_()
    return model


CASES = {
    "zero-readout-swiglu": lambda: zeroed(TinyTransformer(mlp="swiglu").double(), ["readout"]),
    "zero-readout-relu": lambda: zeroed(TinyTransformer(mlp="relu", rope=None).double(), ["readout"]),
    "zero-o-down-swiglu": lambda: zeroed(TinyTransformer(mlp="swiglu").double(), ["o", "down"]),
    "zero-o-down-relu": lambda: zeroed(TinyTransformer(mlp="relu", norm="rmsnorm").double(), ["o", "down"]),
    "dead-units": dead_units_mlp,
}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def without_shift(model):
    return [g for g in model.gauges() if not isinstance(g, LogitShift)]


@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
@pytest.mark.parametrize("case", CASES)
def test_degenerate_orbits_are_exactly_equivariant(case, base, options):
    """Every gauge of the model; for a zero readout every gauge but the logit shift (see
    the next test for why)."""
    model = CASES[case]()
    batches = make_batches(model, STEPS)
    make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
    select = without_shift if case.startswith("zero-readout") else None
    deviation = equivariance_deviation(model, make, classification_loss, batches, select)
    assert deviation <= TOLERANCE, f"{case}: DDC-{base} deviates by {deviation:.2e}"


@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
def test_zero_readout_with_a_logit_shift(base, options):
    """A shifted zero readout ``W = 1aᵀ`` gives every parameter upstream of it a gradient
    that is analytically zero but computed as round-off (``Wᵀ(p − y) = a·Σ(p − y)``, ~1e-17),
    while the unshifted run gets exact zeros. The first step turns that round-off into
    moves of ~lr·1e-9 (Adam divides by ``√v + eps``), which later steps carry along: a
    property of floating point at that point, not of the frame. Measured 1e-8 to 3e-8
    (both bases, ReLU and SwiGLU); bounded here at 1e-6, far below the O(1) failure of a
    frame without the degenerate rule."""
    for model in (CASES["zero-readout-swiglu"](), CASES["zero-readout-relu"]()):
        make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
        deviation = equivariance_deviation(model, make, classification_loss, make_batches(model, STEPS))
        assert deviation <= 1e-6


def test_zero_readout_gain_stays_bounded():
    """Zero readout: the final norm's orbit has no minimum-norm point at the start. Over 100
    steps the gains stay of order one (the issue's failure mode was gain ≈ 4.5e6)."""
    model = zeroed(TinyTransformer(mlp="swiglu").double(), ["readout", "o", "down"])
    optimizer = DDC(model, lr=1e-2, weight_decay=0.1)
    for batch in make_batches(model, 100, seed=4):
        optimizer.zero_grad()
        classification_loss(model, batch)[0].backward()
        optimizer.step()
    for norm in (model.norm1, model.norm2, model.norm_f):
        assert float(norm.weight.detach().abs().max()) < 10.0
    assert max(float(s.abs().max()) for s in optimizer._log_scales) < 10.0


def test_degenerate_rule_puts_the_live_side_at_the_reference_norm():
    """One coordinate with only its growing side (a norm gain over a zero readout column)
    and one with only its shrinking side: each live side ends at reference_norm²."""
    reduced = [torch.tensor([4.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 9.0], dtype=torch.float64)]
    axes = [[(0, +1)], [(0, -1)]]
    for rho in (1.0, 0.5):
        scales, _, unsettled = min_norm_log_scales(reduced, axes, [2], [torch.zeros(2, dtype=torch.float64)],
                                                   1e-13, 50, reference_norm=rho)
        assert not unsettled
        s = scales[0]
        torch.testing.assert_close(4.0 * torch.exp(2 * s[0]), torch.tensor(rho ** 2, dtype=torch.float64))
        torch.testing.assert_close(9.0 * torch.exp(-2 * s[1]), torch.tensor(rho ** 2, dtype=torch.float64))
    # and the canonical point is the same from any point of the orbit
    shifted = [reduced[0] * torch.exp(torch.tensor([2 * 0.7, 0.0], dtype=torch.float64)),
               reduced[1] * torch.exp(torch.tensor([0.0, 2 * 0.3], dtype=torch.float64))]
    s2 = min_norm_log_scales(shifted, axes, [2], [torch.zeros(2, dtype=torch.float64)], 1e-13, 50)[0][0]
    s1 = min_norm_log_scales(reduced, axes, [2], [torch.zeros(2, dtype=torch.float64)], 1e-13, 50)[0][0]
    torch.testing.assert_close(s2, s1 - torch.tensor([0.7, -0.3], dtype=torch.float64), rtol=0, atol=1e-12)


def test_level_set_of_a_norm_gain():
    """A coordinate with ``level`` 1 (a norm gain) ends with A − B = ρ² and is continuous as
    the consumer side B goes to zero (where it meets the degenerate rule A = ρ²)."""
    axes = [[(0, +1)], [(0, -1)]]
    zeros = [torch.zeros(3, dtype=torch.float64)]
    gains = torch.tensor([1.0, 0.3, 2.0], dtype=torch.float64)
    for consumer in (torch.tensor([0.2, 5.0, 1e-3], dtype=torch.float64), torch.tensor([1e-12, 1e-12, 1e-12], dtype=torch.float64)):
        s, _, unsettled = min_norm_log_scales([gains, consumer], axes, [3], zeros, 1e-13, 50, levels=[1.0])
        assert not unsettled
        a, b = gains * torch.exp(2 * s[0]), consumer * torch.exp(-2 * s[0])
        torch.testing.assert_close(a - b, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    degenerate, _, _ = min_norm_log_scales([gains, torch.zeros(3, dtype=torch.float64)], axes, [3], zeros,
                                           1e-13, 50, levels=[1.0])
    torch.testing.assert_close(degenerate[0], s[0], rtol=0, atol=1e-9)


def test_degenerate_set_is_read_at_the_frame_where_gauges_couple():
    """A chain W1 (3×4), W2 (3×3), W3 (4×3) with unit gauges g0 (rows of W1, columns of W2)
    and g1 (rows of W2, columns of W3): W2 couples them. Unit 0 of g0 has a tiny incoming
    row, so whether it is degenerate (√(A·B) against the zero level) depends on where g1's
    scales stand. Solving from a warm frame ``s`` must give the same canonical point as
    solving from 0 on the point already moved to that frame: the rule reads the degenerate
    set at the frame. (Read in the model's own coordinates, the unit was degenerate to one
    solve and live to the other, and the frame ratcheted by ~4 log-units a step: DDC-Muon
    diverged at step 2510 of a depth-24 run.)"""
    gen = torch.Generator().manual_seed(0)
    w1 = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    w1[0] = 1e-8                                   # unit 0's incoming squared norm
    w2 = torch.rand(3, 3, generator=gen, dtype=torch.float64) + 0.5
    w2[:, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)  # its outgoing column
    w3 = torch.rand(3, generator=gen, dtype=torch.float64) + 0.5
    axes = [[(0, 1)], [(1, 1), (0, -1)], [(1, -1)]]
    zero_level = torch.finfo(torch.float32).eps ** 0.5
    warm = [torch.zeros(3, dtype=torch.float64), torch.tensor([5.0, 0.0, 0.0], dtype=torch.float64)]
    # At the raw point unit 0's √(A·B) = 1e-4 is below the zero level (3.5e-4); in the
    # frame (g1's unit 0 scaled by e^5) it is 1.5e-2, alive.
    moved = [w1 * torch.exp(2 * warm[0]),
             torch.exp(2 * warm[1])[:, None] * w2 * torch.exp(-2 * warm[0])[None, :],
             w3 * torch.exp(-2 * warm[1])]
    zeros = [torch.zeros(3, dtype=torch.float64)] * 2
    from_warm, _, unsettled = min_norm_log_scales([w1, w2, w3], axes, [3, 3], warm, 1e-13, 100,
                                                  zero_level=zero_level)
    from_frame, _, unsettled_frame = min_norm_log_scales(moved, axes, [3, 3], zeros, 1e-13, 100,
                                                         zero_level=zero_level)
    assert not unsettled and not unsettled_frame
    for s, w, f in zip(from_warm, warm, from_frame):
        assert torch.allclose(s - w, f, atol=1e-9), (s - w, f)
