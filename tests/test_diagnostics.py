"""Dead-direction diagnostics (ddc/diagnostics.py): known answers and gauge invariance.

* Rate fits return the exponent of an exact power law, and refuse a curve that is not one.
* Hand-built channels scaled by t read their predicted orders: ReLU unit k = 2, SwiGLU unit
  k = 3, attention head k = 2 (all three observables).
* Spare capacity of a hand-built layer with known unit masses.
* Every reading is unchanged (float64) when a random element of every declared gauge is
  applied (each gauge's own ``random_element`` / ``act``), on transformers and a ReLU MLP.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ddc.diagnostics import (
    PREDICTED_ORDER, ReadCriteria, channel_layers, dead_direction_rates, diagnostics, fit_rate,
    spare_capacity, unit_masses,
)
from ddc.gauges import NormGain, UnitRescale
from tasks.gpt_lm import GPT
from tasks.transformer import Block

SMALL_T = tuple(10.0 ** (-4 + 0.25 * i) for i in range(9))  # deep in the asymptotic regime


class ReluMLP(nn.Module):
    """LayerNorm → Linear → ReLU → Linear classifier with its two exact gauges."""

    def __init__(self, d: int = 6, hidden: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.norm(x))))

    def gauges(self) -> list:
        return [NormGain(self.norm, [self.up]), UnitRescale([self.up], self.down)]


class TinyViTLike(nn.Module):
    """Bidirectional blocks on continuous tokens (biases, LayerNorm with bias, no RoPE)."""

    def __init__(self, mlp: str) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 16)
        self.blocks = nn.ModuleList(Block(16, 2, norm="layernorm", mlp=mlp, bias=True) for _ in range(2))
        self.final_norm = nn.LayerNorm(16)
        self.readout = nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.final_norm(h[:, 0]))

    def gauges(self) -> list:
        from ddc.gauges import LogitShift
        gauges = [g for b in self.blocks for g in b.gauges()]
        return gauges + [NormGain(self.final_norm, [self.readout]), LogitShift(self.readout)]


def _gpt(mlp: str) -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=64, context=12, depth=2, width=16, heads=2, mlp=mlp).double()


def _lm_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (3, 12), generator=g), torch.randint(0, 64, (3, 12), generator=g)


def _perturb(model: nn.Module, scale: float = 0.3) -> None:
    """Move away from the symmetric initialisation (non-trivial gains, biases, attention)."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * p.abs().mean().clamp_min(0.05) * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _apply_random_gauges(model: nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    for gauge in model.gauges():
        gauge.act(gauge.random_element(g))


# --------------------------------------------------------------------------- rate fits

@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_fit_rate_recovers_the_exponent_of_a_power_law(k):
    t = [10.0 ** (-3 + 0.5 * i) for i in range(7)]
    fit = fit_rate(t, [3.7 * s ** (2 * (k - 1)) for s in t])
    assert fit.k_hat == pytest.approx(k, abs=1e-10)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    assert fit.k_ci < 1e-8


def test_fit_rate_confidence_interval_and_invalid_values():
    t = [10.0 ** (-2 + 0.25 * i) for i in range(9)]
    # A curve that bends (order 2 below t≈0.1, order 1 above) is not a clean power law.
    bent = [s ** 2 / (1 + 10 * s) for s in t]
    fit = fit_rate(t, bent)
    assert fit.r2 < ReadCriteria().min_r2 and not ReadCriteria().accepts(fit, 2)
    assert ReadCriteria().accepts(fit_rate(t, [s ** 2 for s in t]), 2)
    # The CI uses Student t: with 3 points (1 dof) the 95% quantile is 12.706.
    x = [1.0, 2.0, 3.0]
    y = [math.exp(v) for v in (0.0, 1.1, 1.9)]
    f3 = fit_rate(x, y)
    logx = [math.log(v) for v in x]
    mx = sum(logx) / 3
    sxx = sum((v - mx) ** 2 for v in logx)
    ly = [0.0, 1.1, 1.9]
    my = sum(ly) / 3
    slope = sum((a - mx) * (b - my) for a, b in zip(logx, ly)) / sxx
    res = sum((b - my - slope * (a - mx)) ** 2 for a, b in zip(logx, ly))
    assert f3.slope_ci == pytest.approx(12.7062 * math.sqrt(res / 1 / sxx), rel=1e-4)
    bad = fit_rate(t, [0.0] + [1.0] * 8)
    assert math.isnan(bad.k_hat) and bad.r2 == 0.0
    with pytest.raises(ValueError, match="at least 3"):
        fit_rate([1.0, 2.0], [1.0, 2.0])


# --------------------------------------------------------------------------- known orders

@pytest.mark.parametrize("mlp,ffn_kind", [("relu", "ffn_relu"), ("swiglu", "ffn_gated")])
def test_channels_scaled_by_t_read_their_predicted_order(mlp, ffn_kind):
    model = _gpt(mlp)
    _perturb(model)
    x, y = _lm_batch()
    layers = channel_layers(model, x)
    assert [layer.kind for layer in layers] == ["attn", ffn_kind, "attn", ffn_kind]
    report = dead_direction_rates(model, x, y, scales=SMALL_T)
    assert report.total == 12 and report.read == 12
    for cell in report.cells:
        assert cell.predicted_k == PREDICTED_ORDER[cell.kind]
        assert cell.fit.k_hat == pytest.approx(cell.predicted_k, abs=0.01), cell


def test_relu_mlp_classifier_reads_order_two():
    torch.manual_seed(0)
    model = ReluMLP().double()
    _perturb(model)
    x = torch.randn(32, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (32,))
    report = dead_direction_rates(model, x, y, scales=SMALL_T)
    assert [(c.layer, c.kind, c.observable) for c in report.cells] == [
        ("down", "ffn_relu", "fwd"), ("down", "ffn_relu", "bwd"), ("down", "ffn_relu", "fisher")]
    for cell in report.cells:  # fwd is exactly t²; bwd/fisher carry the O(t) change downstream
        assert cell.read and cell.fit.k_hat == pytest.approx(2.0, abs=1e-3)
    assert report.cells[0].fit.k_hat == pytest.approx(2.0, abs=1e-12)


def test_a_wrong_prediction_is_not_read():
    """The read criterion can fail: demanding the SwiGLU order of a ReLU layer."""
    model = _gpt("relu")
    x, y = _lm_batch()
    report = dead_direction_rates(model, x, y, scales=SMALL_T,
                                  criteria=ReadCriteria(tolerance=0.25))
    relu_cells = [c for c in report.cells if c.kind == "ffn_relu"]
    assert all(abs(c.fit.k_hat - PREDICTED_ORDER["ffn_gated"]) > 0.25 for c in relu_cells)


# --------------------------------------------------------------------------- spare capacity

def test_spare_capacity_of_known_masses():
    model = ReluMLP(d=4, hidden=10, classes=3).double()
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
        model.norm.bias.zero_()
        model.up.weight.zero_()
        model.up.bias.zero_()
        model.down.weight.zero_()
        masses = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 0.2, 0.1, 0.05], dtype=torch.float64)
        for i, m in enumerate(masses):
            model.up.weight[i, i % 4] = 2.0  # ‖w_in,i‖ = 2
            model.down.weight[0, i] = m / 2  # ‖w_out,i‖ = m/2
    assert torch.allclose(unit_masses(model, model.gauges()[1]), masses)
    (cap,) = spare_capacity(model, threshold=0.1)
    assert cap.layer == "down"
    # median of the masses = (2 + 3)/2 = 2.5 → threshold 0.25: units 0.2, 0.1, 0.05 are spare
    assert cap.units == 10 and cap.median_mass == pytest.approx(2.5)
    assert cap.spare_fraction == pytest.approx(0.3)
    assert cap.participation_ratio == pytest.approx(float(masses.sum() ** 2 / (masses ** 2).sum()))
    with pytest.raises(ValueError, match="threshold"):
        spare_capacity(model, threshold=2.0)


# --------------------------------------------------------------------------- invariance

def _readings(model, x, y):
    report = dead_direction_rates(model, x, y)
    values = torch.tensor([v for c in report.cells for v in c.values], dtype=torch.float64)
    masses = torch.cat([unit_masses(model, g) for g in model.gauges() if isinstance(g, UnitRescale)])
    return report, values, masses


@pytest.mark.parametrize("case", ["gpt_swiglu", "gpt_relu", "vit_relu", "vit_swiglu", "relu_mlp"])
def test_readings_are_gauge_invariant(case):
    if case.startswith("gpt"):
        model = _gpt(case.split("_")[1])
        x, y = _lm_batch()
    elif case.startswith("vit"):
        torch.manual_seed(0)
        model = TinyViTLike(case.split("_")[1]).double()
        x, y = torch.randn(4, 5, 5, dtype=torch.float64), torch.randint(0, 7, (4,))
    else:
        torch.manual_seed(0)
        model = ReluMLP().double()
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 5, (16,))
    _perturb(model)
    before, values, masses = _readings(model, x, y)
    raw_rows = model.gauges()[1].members[0].param.detach().clone() if case == "relu_mlp" else None
    _apply_random_gauges(model)
    after, values2, masses2 = _readings(model, x, y)
    assert torch.allclose(values2, values, rtol=1e-8, atol=0)
    assert torch.allclose(masses2, masses, rtol=1e-10, atol=0)
    for a, b in zip(before.cells, after.cells):
        assert a.read == b.read and a.fit.k_hat == pytest.approx(b.fit.k_hat, abs=1e-8)
    if raw_rows is not None:  # the gauge really moved the weights (the test can fail)
        assert not torch.allclose(model.up.weight, raw_rows, rtol=1e-3)


# --------------------------------------------------------------------------- API

def test_diagnostics_returns_flat_floats_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = GPT(vocab=64, context=12, depth=2, width=16, heads=2)  # float32, as in training
    x, y = _lm_batch()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = diagnostics(model, (x, y))
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["diag/cells_total"] == 12.0
    assert 0.0 <= metrics["diag/cells_read"] <= 12.0
    assert {"diag/spare_frac/blocks.0.mlp", "diag/eff_units/blocks.1.mlp",
            "diag/k/blocks.0.attn/fisher", "diag/k/blocks.1.mlp/bwd/read"} <= set(metrics)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_model_without_gauges_is_a_clear_error():
    with pytest.raises(ValueError, match="no gauges"):
        diagnostics(nn.Linear(3, 4), (torch.randn(2, 3), torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="scales"):
        dead_direction_rates(_gpt("relu"), *_lm_batch(), scales=[1.0, 0.1])
