"""Contract 7 and the optimizer manners of issue 10: clipping in the canonical frame,
balancing that converges or warns, bf16/fp16 parameters, frozen / grad-None / lr-0
parameters, structural declaration checks, wrapped models, Muon roles and momentum
schedules, and torch.distributed.checkpoint round trips."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddc import DDC, GaugeDeclarationError, parameter_roles
from ddc.gauges import LogitShift, UnitRescale
from ddc_models import (ReluChain, ReluMLP, TinyTransformer, classification_loss, equivariance_deviation,
                        make_batches, train_steps)

BASES = [("adam", {}), ("muon", {"orthogonalizer": "svd"})]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------- clipping

@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
def test_clipping_in_the_canonical_frame_keeps_equivariance(base, options):
    model = TinyTransformer(rope="interleaved", mlp="swiglu").double()
    batches = make_batches(model, 10)
    totals = []

    def clip(m, opt):
        totals.append(float(opt.clip_grad_norm_(0.05)))

    make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
    assert equivariance_deviation(model, make, classification_loss, batches, clip=clip) <= 1e-8
    assert min(totals) > 0.05, "the clip must fire on every step for the test to mean something"
    # the same loop clipping the raw norm is not equivariant: that is what raw clipping costs
    raw = lambda m, opt: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
    assert equivariance_deviation(model, make, classification_loss, batches, clip=raw) >= 1e-4


def test_clip_norm_is_the_same_along_an_orbit_and_scales_like_torch():
    model = TinyTransformer(rope="half", mlp="relu").double()
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    for gauge in moved.gauges():
        gauge.act(gauge.random_element(generator))
    batch = make_batches(model, 1)[0]
    totals, raw = [], []
    for m in (model, moved):
        opt = DDC(m, lr=1e-2)
        classification_loss(m, batch)[0].backward()
        raw.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))))
        before = [p.grad.clone() for p in m.parameters()]
        total = opt.clip_grad_norm_(1e-3)
        assert isinstance(total, torch.Tensor)
        totals.append(float(total))
        for p, g in zip(m.parameters(), before):   # every gradient scaled by one number
            torch.testing.assert_close(p.grad, g * (1e-3 / (total + 1e-6)), rtol=1e-12, atol=0)
    assert totals[0] == pytest.approx(totals[1], rel=1e-10)
    assert abs(raw[0] - raw[1]) > 1e-3 * raw[0], "the raw norm varies along the orbit"


def test_clip_without_firing_leaves_gradients():
    model = ReluMLP().double()
    opt = DDC(model)
    classification_loss(model, make_batches(model, 1)[0])[0].backward()
    before = [p.grad.clone() for p in model.parameters()]
    total = opt.clip_grad_norm_(1e6)
    assert float(total) > 0
    for p, g in zip(model.parameters(), before):
        torch.testing.assert_close(p.grad, g, rtol=1e-15, atol=0)


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("where", ["readout.weight", "fc_in.weight"])
def test_clip_returns_what_torch_returns_for_a_non_finite_gradient(value, where):
    """An inf gradient gives an inf total, as torch's (the canonical readout gradient alone
    would read inf − inf = nan), a nan one nan; the gradients are scaled as torch scales them."""
    model = ReluMLP().double()
    opt = DDC(model)
    classification_loss(model, make_batches(model, 1)[0])[0].backward()
    dict(model.named_parameters())[where].grad[0, 0] = value
    grads = [p.grad.clone() for p in model.parameters()]
    reference = [g.clone().requires_grad_() for g in grads]
    for r, g in zip(reference, grads):
        r.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(reference, 1.0)
    total = opt.clip_grad_norm_(1.0)
    torch.testing.assert_close(total, expected, equal_nan=True)
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r.grad, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)


# --------------------------------------------------------------------------- balancing

@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
def test_depth_24_chain_converges_without_warning(base, options):
    model = ReluChain(depth=24).double()
    batches = make_batches(model, 10)
    make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        deviation = equivariance_deviation(model, make, classification_loss, batches)
    assert deviation <= 1e-8


def test_a_capped_balancing_solve_warns_once_naming_the_gauges():
    model = ReluChain(depth=12).double()
    generator = torch.Generator().manual_seed(0)
    for gauge in model.gauges():
        gauge.act(gauge.random_element(generator) ** 4)   # far from balanced
    opt = DDC(model, lr=1e-2, balance_max_iter=1)
    with pytest.warns(RuntimeWarning, match=r"balance_max_iter=1 .*UnitRescale") as record:
        train_steps(model, opt, make_batches(model, 3))
    assert sum("balance_max_iter" in str(w.message) for w in record) == 1


# ---------------------------------------------------------------------- low precision

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("base", ["adam", "muon"])
def test_low_precision_parameters_with_every_gauge(dtype, base):
    """bf16/fp16 parameters with rotation (incl. RoPE pairs), scale and shift gauges: the
    step runs, and at lr 0 (weight decay 0) nothing moves, bit for bit."""
    for kwargs in (dict(rope="interleaved", mlp="swiglu"), dict(rope=None, mlp="relu", norm="rmsnorm")):
        model = TinyTransformer(**kwargs).to(dtype)
        batches = make_batches(model, 3)
        still_model = copy.deepcopy(model)
        still = DDC(still_model, base=base, lr=0.0, weight_decay=0.0)
        before = snapshot(still_model)
        train_steps(still_model, still, batches)
        assert all(torch.equal(a, b) for a, b in zip(before, still_model.parameters()))
        opt = DDC(model, base=base, lr=1e-2, weight_decay=0.1)
        start = snapshot(model)
        train_steps(model, opt, batches)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(start, model.parameters()))


# ---------------------------------------------------------------------------- manners

def test_frozen_and_grad_none_parameters_are_untouched():
    model = TinyTransformer(rope="interleaved").double()
    model.norm_f.weight.requires_grad_(False)
    all_params = list(model.parameters())
    for make in (lambda: DDC(all_params, gauges=model.gauges(), lr=1e-2, weight_decay=0.1),
                 lambda: DDC(model, lr=1e-2, weight_decay=0.1)):
        opt = make()
        gain = model.norm_f.weight.detach().clone()
        q_bias = model.q.bias.detach().clone()
        for batch in make_batches(model, 3):
            opt.zero_grad()
            classification_loss(model, batch)[0].backward()
            model.q.bias.grad = None               # no gradient this step
            opt.step()
        assert torch.equal(model.norm_f.weight, gain)
        assert torch.equal(model.q.bias, q_bias)
        assert model.q.bias not in opt.state or "exp_avg" not in opt.state[model.q.bias]


def test_lr_zero_group_is_untouched():
    model = TinyTransformer().double()
    norms = [p for n, p in model.named_parameters() if n.startswith("norm")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("norm")]
    opt = DDC([{"params": norms, "lr": 0.0}, {"params": rest}], gauges=model.gauges(), lr=1e-2, weight_decay=0.1)
    before = [p.detach().clone() for p in norms]
    rest_before = [p.detach().clone() for p in rest]
    train_steps(model, opt, make_batches(model, 3))
    assert all(torch.equal(a, b) for a, b in zip(before, norms))
    assert any(not torch.equal(a, b) for a, b in zip(rest_before, rest))


class SharedHidden(nn.Module):
    """The same hidden layer applied twice: no unit gauge exists on it."""

    def __init__(self):
        super().__init__()
        self.fc_in = nn.Linear(6, 8)
        self.block = nn.Linear(8, 8)
        self.again = self.block
        self.readout = nn.Linear(8, 5)

    def forward(self, x):
        h = F.relu(self.fc_in(x))
        return self.readout(F.relu(self.again(F.relu(self.block(h)))))


def test_wrong_declarations_are_refused_at_construction():
    tied = TinyTransformer()
    tied.readout.weight = tied.embed.weight
    with pytest.raises(GaugeDeclarationError, match=r"LogitShift.*embed\.weight.*readout\.weight \(tied or shared\)"):
        DDC(tied, gauges=[LogitShift(tied.readout)])
    shared = SharedHidden()
    with pytest.raises(GaugeDeclarationError, match="shared"):
        DDC(shared, gauges=[UnitRescale([shared.block], shared.readout)])


def test_no_gauges_warns():
    with pytest.warns(UserWarning, match="no gauges"):
        DDC(nn.Linear(3, 2))


def test_trainable_gauge_parameter_missing_is_named():
    model = ReluMLP()
    with pytest.raises(ValueError, match=r"\(12, 6\) is trainable but not among the optimizer's parameters"):
        DDC([p for n, p in model.named_parameters() if n != "fc_in.weight"], gauges=model.gauges())


# ----------------------------------------------------------------- wrapped models, roles

@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group through a file store (no network)."""
    import torch.distributed as dist
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_and_compiled_models_keep_their_gauges(process_group):
    model = TinyTransformer().double()
    expected = len(model.gauges())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert len(DDC(ddp).gauges) == expected
    assert len(DDC(torch.compile(model)).gauges) == expected


class Conv1D(nn.Module):
    """Hugging Face GPT-2's layer: ``y = x @ W + b`` with ``W`` stored in × out."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def test_muon_roles_follow_what_a_weight_does():
    model = nn.Sequential(nn.Embedding(10, 8), Conv1D(8, 16), nn.ReLU(), nn.Linear(16, 8))
    mha = nn.MultiheadAttention(8, 2)
    roles = parameter_roles(model)
    assert roles[model[0].weight] == "embedding"
    assert roles[model[1].weight] == "matrix" and roles[model[3].weight] == "readout"   # the output layer
    assert parameter_roles(mha)[mha.in_proj_weight] == "matrix"
    opt = DDC(model, gauges=[], base="muon", lr=1e-2)
    model(torch.randint(0, 10, (4,))).square().sum().backward()
    opt.step()
    assert "momentum_buffer" in opt.state[model[1].weight]


def test_muon_momentum_follows_a_cycling_scheduler():
    model = ReluMLP().double()
    opt = DDC(model, base="muon", lr=1e-2, momentum=0.95, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20, base_momentum=0.85,
                                                max_momentum=0.95)
    seen = set()
    for batch in make_batches(model, 6):
        opt.zero_grad()
        classification_loss(model, batch)[0].backward()
        opt.step()
        sched.step()
        group = opt.param_groups[0]
        beta1 = group["betas"][0]
        momentum = opt._muon_momentum(group)
        assert 1 - momentum == pytest.approx((1 - 0.95) * (1 - beta1) / (1 - 0.9))
        seen.add(round(momentum, 6))
    assert len(seen) > 1, "the scheduler must move Muon's momentum"


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
def test_distributed_checkpoint_round_trip_resumes_exactly(base, options):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    model = TinyTransformer(rope="interleaved").float()
    batches = make_batches(model, 8)
    make = lambda m: DDC(m, base=base, lr=1e-2, weight_decay=0.1, **options)
    opt = make(model)
    train_steps(model, opt, batches[:4])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(get_optimizer_state_dict(model, opt))
    assert any(k.startswith("ddc_log_scales") for st in saved_opt["state"].values() for k in st)
    train_steps(model, opt, batches[4:])

    resumed = TinyTransformer(rope="interleaved").float()
    resumed.load_state_dict(saved_model)
    resumed_opt = make(resumed)
    set_optimizer_state_dict(resumed, resumed_opt, saved_opt)
    train_steps(resumed, resumed_opt, batches[4:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
