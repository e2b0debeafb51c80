"""Diagnostics of FFN units (ddc/diagnostics.py) on planted cases with known answers, and
their gauge invariance.

* Spare capacity of a hand-built layer with known unit masses.
* Ablation: switching off a unit the model does not use changes the held-out loss by 0;
  switching off one it uses changes it.
* Dead-direction rates along a trajectory (the read rule's calibration): a unit planted to
  die along its direction while the rest trains is read (k̂ = 2); a live unit is not a cell;
  a unit whose mass falls while its direction is re-drawn at every checkpoint is not read.
* Every reading is unchanged (float64) when a random element of every declared gauge is
  applied (each gauge's own ``random_element`` / ``act``), on transformers and a ReLU MLP.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddc.diagnostics import (
    PREDICTED_ORDER, ReadRule, TrajectoryRates, ablation, diagnostics, spare_capacity,
    unit_activity, unit_masses,
)
from ddc.gauges import NormGain, UnitRescale
from tasks.gpt_lm import GPT
from tasks.transformer import Block


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


# --------------------------------------------------------------------------- spare capacity

def _known_masses_mlp() -> tuple[ReluMLP, torch.Tensor]:
    model = ReluMLP(d=4, hidden=10, classes=3).double()
    masses = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 0.2, 0.1, 0.05], dtype=torch.float64)
    with torch.no_grad():
        model.norm.weight.fill_(1.0)
        model.norm.bias.zero_()
        model.up.weight.zero_()
        model.up.bias.zero_()
        model.down.weight.zero_()
        model.down.bias.zero_()
        for i, m in enumerate(masses):
            model.up.weight[i, i % 4] = 2.0  # ‖w_in,i‖ = 2
            model.down.weight[i % 3, i] = m / 2  # ‖w_out,i‖ = m/2
    return model, masses


def test_spare_capacity_of_known_masses():
    model, masses = _known_masses_mlp()
    assert torch.allclose(unit_masses(model, model.gauges()[1]), masses)
    (cap,) = spare_capacity(model, threshold=0.1)
    assert cap.layer == "down"
    # mean of the masses = 28.35 / 10 → threshold 0.2835: units 0.2, 0.1, 0.05 are low-mass
    assert cap.units == 10 and cap.mean_mass == pytest.approx(2.835)
    assert cap.spare_fraction == pytest.approx(0.3)
    assert cap.participation_ratio == pytest.approx(float(masses.sum() ** 2 / (masses ** 2).sum()))
    with pytest.raises(ValueError, match="threshold"):
        spare_capacity(model, threshold=2.0)


# --------------------------------------------------------------------------- ablation

def test_ablation_of_an_unused_and_a_used_unit():
    """Switching off low-mass units that are never active costs exactly 0; once one of them
    is active (same mass), switching it off changes the held-out loss."""
    model, _ = _known_masses_mlp()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (64,), generator=g)
    # The three low-mass units (7, 8, 9) read nothing but their bias: -1 (never active,
    # ReLU(-1) = 0) with the same masses |b| ‖w_out‖ = 0.2, 0.1, 0.05.
    with torch.no_grad():
        model.down.weight[:, 7:] = 0.0
        model.up.weight[7:] = 0.0
        model.up.bias[7:] = -1.0
        model.down.weight[0, 7:] = torch.tensor([0.2, 0.1, 0.05], dtype=torch.float64)
    unused = ablation(model, x, y, threshold=0.1)
    assert unused.low_fraction == pytest.approx(0.3)
    assert unused.low_delta == 0.0
    # Now unit 7 is used: active on every input (bias +1), with the same mass.
    with torch.no_grad():
        model.up.bias[7] = 1.0
    used = ablation(model, x, y, threshold=0.1)
    assert used.low_fraction == pytest.approx(0.3)
    assert abs(used.low_delta) > 1e-3
    assert used.loss != unused.loss
    # The tail (units beyond the participation ratio, lowest mass first) includes them.
    assert used.tail_fraction >= used.low_fraction and abs(used.tail_delta) > 1e-3


# --------------------------------------------------------------------------- trajectory rates

def _trajectory(model: ReluMLP, plant, checkpoints: int = 8, seed: int = 0) -> TrajectoryRates:
    """Train ``model`` a few SGD steps between checkpoints on a fixed task; after each
    segment ``plant(model, c)`` edits the weights; the probe is observed at each checkpoint."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, model.up.in_features, generator=g, dtype=torch.float64)
    y = torch.randint(0, model.down.out_features, (256,), generator=g)
    probe = x[:16]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rates = TrajectoryRates()
    for c in range(checkpoints):
        for _ in range(5):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        plant(model, c)
        rates.observe(model, probe, step=5 * (c + 1))
    return rates


def _relu_mlp(seed: int = 0) -> ReluMLP:
    torch.manual_seed(seed)
    model = ReluMLP(d=6, hidden=16, classes=5).double()
    with torch.no_grad():
        model.up.bias.fill_(0.5)  # every unit active on most inputs
    return model


def _cell(report, unit: int):
    return next((c for c in report.cells if c.unit == unit), None)


def test_a_unit_dying_along_its_direction_is_read():
    def shrink(model, c):  # unit 3's input row and bias shrink by 0.6 each checkpoint
        with torch.no_grad():
            model.up.weight[3] *= 0.6
            model.up.bias[3] *= 0.6

    report = _trajectory(_relu_mlp(), shrink).report()
    cell = _cell(report, 3)
    assert cell is not None and cell.fall > 30
    assert cell.read and cell.k_hat == pytest.approx(PREDICTED_ORDER, abs=0.05)
    assert cell.low <= cell.k_hat <= cell.high
    # Live units (trained, not shrunk) are not cells, so they are not read.
    assert all(c.unit == 3 for c in report.cells) and report.read == 1 and report.total == 1
    assert report.units == 16 and report.checkpoints == 8
    metrics = report.as_metrics()
    assert metrics["diag/cells_read"] == 1.0 and metrics["diag/read_frac"] == 1.0
    # One cell: its fitted order is every quartile.
    assert metrics["diag/k_q25"] == metrics["diag/k_median"] == metrics["diag/k_q75"] == pytest.approx(cell.k_hat)


def test_a_unit_whose_mass_falls_while_its_direction_turns_is_not_read():
    g = torch.Generator().manual_seed(5)

    def turn(model, c):  # unit 3's mass falls by 0.6 per checkpoint, its direction re-drawn
        with torch.no_grad():
            norm = model.up.weight[3].norm() * 0.6
            row = torch.randn(6, generator=g, dtype=torch.float64)
            model.up.weight[3] = row / row.norm() * norm
            model.up.bias[3] = 0.0

    cell = _cell(_trajectory(_relu_mlp(), turn).report(), 3)
    assert cell is not None and cell.fall > 30  # a cell: its mass falls ...
    assert not cell.read  # ... but not along a dead direction


def test_too_few_checkpoints_read_nothing_and_bad_rules_are_errors():
    rates = _trajectory(_relu_mlp(), lambda model, c: None, checkpoints=2)
    assert rates.report().total == 0 and rates.report().units == 16
    with pytest.raises(ValueError, match="fall"):
        ReadRule(fall=1.0)
    with pytest.raises(ValueError, match="min_points"):
        ReadRule(min_points=2)


# --------------------------------------------------------------------------- invariance

def _readings(model, x, y):
    layers_activity = unit_activity(model, x)
    activity = torch.cat([a.flatten() for a in layers_activity.values()])
    masses = torch.cat([unit_masses(model, g) for g in model.gauges() if isinstance(g, UnitRescale)])
    return activity, masses, ablation(model, x, y)


def _invariance_case(case: str):
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
    return model, x, y


@pytest.mark.parametrize("case", ["gpt_swiglu", "gpt_relu", "vit_relu", "vit_swiglu", "relu_mlp"])
def test_readings_are_gauge_invariant(case):
    model, x, y = _invariance_case(case)
    activity, masses, abl = _readings(model, x, y)
    raw_rows = model.gauges()[1].members[0].param.detach().clone() if case == "relu_mlp" else None
    _apply_random_gauges(model)
    activity2, masses2, abl2 = _readings(model, x, y)
    assert torch.allclose(activity2, activity, rtol=1e-8, atol=1e-300)
    assert torch.allclose(masses2, masses, rtol=1e-10, atol=0)
    assert abl2.loss == pytest.approx(abl.loss, rel=1e-10)
    assert abl2.low_delta == pytest.approx(abl.low_delta, rel=1e-6, abs=1e-12)
    assert abl2.tail_delta == pytest.approx(abl.tail_delta, rel=1e-6, abs=1e-12)
    if raw_rows is not None:  # the gauge really moved the weights (the test can fail)
        assert not torch.allclose(model.up.weight, raw_rows, rtol=1e-3)


def test_trajectory_readings_are_gauge_invariant():
    """The same trajectory observed in two gauges (a random gauge element applied at each
    checkpoint to a copy) gives the same cells and readings."""
    def shrink(model, c):
        with torch.no_grad():
            model.up.weight[3] *= 0.6
            model.up.bias[3] *= 0.6

    plain, moved = TrajectoryRates(), TrajectoryRates()
    model = _relu_mlp()
    probe = torch.randn(16, 6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for c in range(6):
        _perturb(model, 0.02)
        shrink(model, c)
        plain.observe(model, probe, step=c)
        twin = _relu_mlp()
        twin.load_state_dict(model.state_dict())
        _apply_random_gauges(twin, seed=c)
        assert not torch.allclose(twin.up.weight, model.up.weight, rtol=1e-3)
        moved.observe(twin, probe, step=c)
    a, b = plain.report(), moved.report()
    assert [(c.unit, c.read) for c in a.cells] == [(c.unit, c.read) for c in b.cells]
    for ca, cb in zip(a.cells, b.cells):
        assert ca.k_hat == pytest.approx(cb.k_hat, abs=1e-8)


# --------------------------------------------------------------------------- API

def test_diagnostics_returns_flat_floats_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = GPT(vocab=64, context=12, depth=2, width=16, heads=2)  # float32, as in training
    x, y = _lm_batch()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trajectory = TrajectoryRates()
    for step in (1, 2, 3):
        metrics = diagnostics(model, (x, y), step=step, trajectory=trajectory, held_out=(x, y))
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["diag/units"] == 2 * model.blocks[0].mlp.down.in_features
    assert metrics["diag/checkpoints"] == 3.0
    assert metrics["diag/cells_total"] == 0.0  # nothing moved: no mass fell
    assert {"diag/spare_frac/blocks.0.mlp", "diag/eff_units/blocks.1.mlp", "diag/eff_units_frac",
            "diag/ablate/low_dloss", "diag/ablate/tail_frac", "diag/cells_read"} <= set(metrics)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_model_without_gauges_is_a_clear_error():
    with pytest.raises(ValueError, match="no gauges"):
        diagnostics(nn.Linear(3, 4), (torch.randn(2, 3), torch.tensor([0, 1])))
