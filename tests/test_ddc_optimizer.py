"""Contracts 2-5 for DDC: no drift, reduction to the base optimizers, torch.optim behaviour,
memory; plus gauge verification."""

import copy
import math

import pytest
import torch
from torch import nn

from ddc import DDC, GaugeDeclarationError, verify_gauges
from ddc.gauges import LogitShift, NormGain, UnitRescale
from ddc_models import ReluMLP, TinyTransformer, classification_loss, make_batches


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def train(model, optimizer, batches):
    for batch in batches:
        optimizer.zero_grad()
        classification_loss(model, batch)[0].backward()
        optimizer.step()


def max_rel_diff(model_a, model_b):
    return max(float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-300))
               for a, b in zip(model_a.parameters(), model_b.parameters()))


# ------------------------------------------------------------------- contract 3: reduction

def test_no_gauges_reproduces_adamw():
    model = TinyTransformer().double()
    twin = copy.deepcopy(model)
    groups = lambda m: [
        {"params": [p for p in m.parameters() if p.ndim >= 2], "weight_decay": 0.1},
        {"params": [p for p in m.parameters() if p.ndim < 2], "weight_decay": 0.0, "lr": 3e-3},
    ]
    ddc = DDC(groups(model), gauges=[], lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    adamw = torch.optim.AdamW(groups(twin), lr=1e-2, betas=(0.8, 0.99), eps=1e-7)
    batches = make_batches(model, 12)
    train(model, ddc, batches)
    train(twin, adamw, batches)
    assert max_rel_diff(model, twin) <= 1e-12


def test_no_gauges_reproduces_muon_baseline():
    import baselines
    model = TinyTransformer().double()
    twin = copy.deepcopy(model)
    options = dict(lr=1e-2, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5,
                   adjust_lr_fn="match_rms_adamw")
    # the baseline's orthogonaliser (DDC's default is the exact polar factor)
    ddc = DDC(model, gauges=[], base="muon", betas=(0.9, 0.95), eps=1e-8, orthogonalizer="newton_schulz",
              **options)
    muon = baselines.BASELINES["muon"](twin, adam_betas=(0.9, 0.95), adam_eps=1e-8, **options)
    batches = make_batches(model, 12)
    train(model, ddc, batches)
    train(twin, muon, batches)
    assert max_rel_diff(model, twin) <= 1e-12


# --------------------------------------------------------------------- contract 2: no drift

def unit_coordinates(model: ReluMLP) -> torch.Tensor:
    """The gauge coordinate of each hidden unit of a one-hidden-layer MLP:
    log‖(w_in,i, b_i)‖ − log‖w_out,i‖ (moves by log c under the unit gauge, and by nothing
    else)."""
    w_in = torch.cat([model.fc_in.weight, model.fc_in.bias[:, None]], dim=1)
    return w_in.norm(dim=1).log() - model.readout.weight.norm(dim=0).log()


def frame_coordinates(optimizer: DDC) -> torch.Tensor:
    """The joint gauge coordinates of every scale gauge of ``optimizer``'s model: the
    log-scales that move the (readout-centred) parameters to the balanced point of their
    orbit, solved from scratch. Exact coordinates even for chained, overlapping gauges."""
    frame = optimizer._frame
    points = [p.detach().clone() for p in frame.params]
    for i in frame.centred:
        points[i] -= points[i].mean(0, keepdim=True)
    zeros = [torch.zeros(g.size, dtype=torch.float64) for g in frame.scale_gauges]
    scales, _ = frame.solve_scales(points, zeros, 1e-13, 10_000)
    return torch.cat(scales)


def run_drift(make_optimizer, measure, depth, steps=300):
    torch.manual_seed(1)
    model = ReluMLP(d_in=8, hidden=32, n_classes=4, depth=depth).double()
    optimizer = make_optimizer(model)
    probe = DDC(model)   # only used to measure the joint frame, never stepped
    start = measure(model, probe).detach().clone()
    train(model, optimizer, make_batches(model, steps, seed=3))
    return float((measure(model, probe).detach() - start).abs().max())


def test_unit_coordinates_do_not_drift():
    """One hidden layer, the unit gauge declared: log‖w_in,i‖ − log‖w_out,i‖ stays put."""
    lr = 3e-3
    only_units = lambda m: [UnitRescale([m.fc_in], m.readout)]
    measure = lambda m, probe: unit_coordinates(m)
    adamw = run_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), measure, 1)
    ddc = run_drift(lambda m: DDC(m, gauges=only_units(m), lr=lr, weight_decay=0.0), measure, 1)
    ddc_muon = run_drift(lambda m: DDC(m, gauges=only_units(m), base="muon", lr=lr, weight_decay=0.0), measure, 1)
    assert adamw > 1e-2, f"AdamW should drift visibly ({adamw:.2e})"
    assert ddc * 100 <= adamw, f"DDC-Adam drift {ddc:.2e} vs AdamW {adamw:.2e}"
    assert ddc_muon * 100 <= adamw, f"DDC-Muon drift {ddc_muon:.2e} vs AdamW {adamw:.2e}"


def test_chained_gauge_frame_does_not_drift():
    """Two chained unit gauges and the logit shift: the joint frame stays put."""
    lr = 3e-3
    measure = lambda m, probe: frame_coordinates(probe)
    adamw = run_drift(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0), measure, 2)
    ddc = run_drift(lambda m: DDC(m, lr=lr, weight_decay=0.0), measure, 2)
    assert adamw > 1e-2, f"AdamW should drift visibly ({adamw:.2e})"
    assert ddc * 100 <= adamw, f"DDC-Adam drift {ddc:.2e} vs AdamW {adamw:.2e}"


def test_a_step_has_no_dead_component():
    """The unit gauge coordinate is unchanged by a step (so its first-order component is
    zero, and every higher order too), while the weights themselves move."""
    model = ReluMLP(depth=1).double()
    optimizer = DDC(model, gauges=[UnitRescale([model.fc_in], model.readout)], lr=1e-2, weight_decay=0.1)
    before_coords = unit_coordinates(model).detach().clone()
    before = model.fc_in.weight.detach().clone()
    for batch in make_batches(model, 3):
        optimizer.zero_grad()
        classification_loss(model, batch)[0].backward()
        optimizer.step()
    moved = float((model.fc_in.weight.detach() - before).abs().max() / before.abs().max())
    assert moved > 1e-3
    assert float((unit_coordinates(model).detach() - before_coords).abs().max()) <= 1e-10


# ------------------------------------------------------- contract 4: a torch.optim.Optimizer

@pytest.mark.parametrize("rotation_solve", ["eigh", "cg"])
def test_state_dict_round_trip_continues_identically(rotation_solve):
    model = TinyTransformer().double()
    batches = make_batches(model, 8)
    optimizer = DDC(model, lr=1e-2, weight_decay=0.1, rotation_solve=rotation_solve)
    train(model, optimizer, batches[:4])
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, batches[4:])

    resumed = TinyTransformer().double()
    resumed.load_state_dict(saved_model)
    resumed_opt = DDC(resumed, lr=123.0, weight_decay=0.1, rotation_solve=rotation_solve)   # lr comes back
    resumed_opt.load_state_dict(saved_state)
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    train(resumed, resumed_opt, batches[4:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_cg_basis_has_the_same_layout_in_the_run_and_after_a_resume():
    """``rotation_solve="cg"`` keeps an eigenbasis per head; a resumed run must hold it in the
    same memory layout as the uninterrupted one (a batched matmul's round-off depends on the
    strides: eigh's column-major eigenvectors against the row-major tensors a checkpoint
    gives back), else the two runs part in the last bits."""
    model = TinyTransformer().double()
    batches = make_batches(model, 6)
    optimizer = DDC(model, lr=1e-2, weight_decay=0.1, rotation_solve="cg")
    train(model, optimizer, batches[:3])
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed = TinyTransformer().double()
    resumed.load_state_dict(saved_model)
    resumed_opt = DDC(resumed, lr=1e-2, weight_decay=0.1, rotation_solve="cg")
    resumed_opt.load_state_dict(saved_state)
    train(model, optimizer, batches[3:4])
    train(resumed, resumed_opt, batches[3:4])
    run, after = optimizer._rotation_bases(), resumed_opt._rotation_bases()
    assert any(b is not None for b in run) and len(run) == len(after)
    for a, b in zip(run, after):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.stride() == b.stride()
            assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_lr_scheduler_scales_the_step():
    model = TinyTransformer().double()
    batch = make_batches(model, 1)[0]

    def first_step(lr_factor):
        m = copy.deepcopy(model)
        opt = DDC(m, lr=1e-2, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor)
        classification_loss(m, batch)[0].backward()
        opt.step()
        sched.step()
        return [(a - b).detach() for a, b in zip(m.parameters(), model.parameters())], opt

    full, _ = first_step(1.0)
    zero, _ = first_step(0.0)
    # lr = 0: nothing moves (gauged tensors pass through the frame and back: round-off only)
    assert all(float(d.abs().max()) <= 1e-13 * float(p.detach().abs().max())
               for d, p in zip(zero, model.parameters()))
    half, opt = first_step(0.5)
    emb = 0  # the embedding has no gauge: its Adam step is exactly linear in lr
    torch.testing.assert_close(half[emb], 0.5 * full[emb], rtol=1e-12, atol=0)
    assert all(g["lr"] == pytest.approx(5e-3) for g in opt.param_groups)


def test_closure_and_zero_grad():
    model = ReluMLP().double()
    optimizer = DDC(model, lr=1e-2)
    batch = make_batches(model, 1)[0]

    def closure():
        optimizer.zero_grad()
        loss = classification_loss(model, batch)[0]
        loss.backward()
        return loss

    first = optimizer.step(closure)
    second = optimizer.step(closure)
    assert float(second.detach()) < float(first.detach())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_param_groups_and_explicit_gauges():
    model = ReluMLP().double()
    gauges = [UnitRescale([model.fc_in], model.fc_hidden), LogitShift(model.readout)]
    optimizer = DDC([{"params": [model.fc_in.weight, model.fc_in.bias], "lr": 1e-3},
                     {"params": [p for n, p in model.named_parameters() if not n.startswith("fc_in")]}],
                    gauges=gauges, lr=1e-2)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
    train(model, optimizer, make_batches(model, 3))
    with pytest.raises(ValueError, match="not among the optimizer's parameters"):
        DDC([model.readout.weight], gauges=gauges)


@pytest.mark.parametrize("kwargs,match", [
    (dict(base="sgd"), "base must be one of"),
    (dict(balance_steps=0), "balance_steps and balance_cg_steps must be at least 1"),
    (dict(balance_cg_steps=0), "balance_steps and balance_cg_steps must be at least 1"),
    (dict(lr=-1.0), "invalid learning rate"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(dead_mode="sometimes"), "dead_mode"),
    (dict(orthogonalizer="qr"), "orthogonalizer"),
    (dict(rotation_solve="lu"), "rotation_solve must be one of"),
])
def test_constructor_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDC(ReluMLP(), **kwargs)


def test_overlapping_gauges_on_one_axis_are_refused():
    model = ReluMLP()
    with pytest.raises(ValueError, match="already scales"):
        DDC(model, gauges=[UnitRescale([model.fc_in], model.fc_hidden),
                           UnitRescale([model.fc_in], model.fc_hidden)])


# ------------------------------------------------------------------- contract 5: memory

def state_bytes(optimizer, keys=None):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values()
               for k, t in s.items() if isinstance(t, torch.Tensor) and t.ndim > 0
               and (keys is None or keys(k)))


def test_state_is_no_larger_than_adamw_plus_vectors():
    """Moments no larger than AdamW's; beyond them only one float64 vector per scale gauge
    (its log-scales, kept in the per-parameter state of one of its members)."""
    model = TinyTransformer(width=16).double()
    batches = make_batches(model, 2)
    adamw_model, ddc_model = copy.deepcopy(model), copy.deepcopy(model)
    adamw = torch.optim.AdamW(adamw_model.parameters())
    ddc = DDC(ddc_model)
    train(adamw_model, adamw, batches)
    train(ddc_model, ddc, batches)
    is_scale = lambda k: k.startswith("ddc_log_scales")
    assert state_bytes(ddc, lambda k: not is_scale(k)) <= state_bytes(adamw)
    assert state_bytes(ddc, is_scale) == 8 * sum(g.size for g in ddc._frame.scale_gauges)


def test_cg_rotation_solve_keeps_one_basis_per_head_in_the_state():
    """``rotation_solve="cg"`` keeps, beyond the default's state, exactly one d×d basis per
    head block of each rotation gauge and one CPU counter per basis, its age (the
    documented cost of that option)."""
    model = TinyTransformer(width=16).double()
    batches = make_batches(model, 2)
    default_model, cg_model = copy.deepcopy(model), copy.deepcopy(model)
    default, cg = DDC(default_model), DDC(cg_model, rotation_solve="cg")
    train(default_model, default, batches)
    train(cg_model, cg, batches)
    is_basis = lambda k: k.startswith("ddc_rotation_basis")
    is_age = lambda k: k.startswith("ddc_rotation_age")
    assert state_bytes(cg, lambda k: not is_basis(k) and not is_age(k)) == state_bytes(default)
    blocks = [(m.perm.numel() // m.block, m.block) for g in cg._frame.rotation_gauges for m in g.members[:1]
              if m.block > 2]   # RoPE pairs: closed form, no basis
    assert blocks and state_bytes(cg, is_basis) == 8 * sum(n * d * d for n, d in blocks)


# ---------------------------------------------------------------- gauge verification

def test_verify_gauges_accepts_true_symmetries():
    for kwargs in (dict(rope="interleaved"), dict(rope="half", mlp="relu"), dict(rope=None, norm="rmsnorm")):
        model = TinyTransformer(**kwargs)
        report = verify_gauges(model, classification_loss, make_batches(model, 1)[0])
        assert len(report) == len(model.gauges())
        assert all(v["loss"] <= 1e-8 and v["logits"] <= 1e-8 for v in report.values())


def test_verify_gauges_catches_wrong_declarations():
    model = TinyTransformer(mlp="gelu")
    batch = make_batches(model, 1)[0]
    with pytest.raises(GaugeDeclarationError, match="UnitRescale"):   # GELU is not homogeneous
        verify_gauges(model, classification_loss, batch, gauges=[UnitRescale([model.up], model.down)])
    with pytest.raises(GaugeDeclarationError, match="HeadRotation"):  # RoPE breaks full rotations
        from ddc.gauges import HeadRotation
        rope_model = TinyTransformer(rope="interleaved")
        verify_gauges(rope_model, classification_loss, batch,
                      gauges=[HeadRotation(rope_model.q, rope_model.k, 2, rope=None)])
    tied = TinyTransformer()
    tied.readout.weight = tied.embed.weight   # a tied readout is not shift-invariant
    with pytest.raises(GaugeDeclarationError, match="LogitShift"):
        verify_gauges(tied, classification_loss, batch, gauges=[LogitShift(tied.readout)])
    with pytest.raises(GaugeDeclarationError, match="NormGain"):      # v also reads norm1's output
        verify_gauges(model, classification_loss, batch, gauges=[NormGain(model.norm1, [model.q, model.k])])
    with pytest.raises(ValueError, match="reads 16 features but the norm has 8"):
        NormGain(model.norm2, [model.down])
