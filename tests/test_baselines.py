"""Tests of the baseline optimizers (``baselines``) and their configs (``configs/optimizer``)."""

from __future__ import annotations

import copy
import inspect
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from adamp import AdamP
from omegaconf import OmegaConf
from torch import nn

from baselines import BASELINES, SCALE, MuonWithAdamW, option_defaults
from baselines.scale import normalize_per_output
from ddc.param_groups import param_groups

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "optimizer"
NAMES = ["adamw", "adamp", "muon", "scale", "sgd"]


# --------------------------------------------------------------------------- models/data


class TinyLM(nn.Module):
    """Every role: embedding table, two hidden matrices, LayerNorm/biases, untied readout."""

    vocab, classes = 11, 5

    def __init__(self, dim: int = 8, hidden: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(self.vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.readout = nn.Linear(hidden, self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).mean(dim=1)
        h = torch.tanh(self.norm(self.fc1(h)))
        h = torch.tanh(self.fc2(h))
        return self.readout(h)


class TinyConvNet(nn.Module):
    """4-D conv weights; conv1 precedes a BatchNorm, so it is scale-invariant (AdamP)."""

    classes = 5

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.readout = nn.Linear(6, self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv1(x)))
        h = torch.relu(self.conv2(h)).mean(dim=(2, 3))
        return self.readout(h)


def make_model(cls: type[nn.Module], dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(dtype)


def make_batches(cls: type[nn.Module], n: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        if cls is TinyLM:
            x = torch.randint(0, TinyLM.vocab, (16, 6), generator=g)
        else:
            x = torch.randn(8, 3, 6, 6, generator=g, dtype=dtype)
        y = torch.randint(0, cls.classes, (x.shape[0],), generator=g)
        out.append((x, y))
    return out


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def backward(model: nn.Module, batch, *optimizers) -> torch.Tensor:
    for opt in optimizers:
        opt.zero_grad()
    loss = loss_of(model, batch)
    loss.backward()
    return loss.detach()


def train(model: nn.Module, opt: torch.optim.Optimizer, batches, scheduler=None) -> None:
    for batch in batches:
        backward(model, batch, opt)
        opt.step()
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), f"{name} differs: max |diff| {(pa - pb).abs().max():.3e}"


def yaml_options(name: str) -> dict:
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    return {k: v for k, v in cfg.items() if k != "name"}


def by_role(opt: torch.optim.Optimizer, role: str) -> dict:
    (group,) = [g for g in opt.param_groups if g["role"] == role]
    return group


# ------------------------------------------------------------------- registry and configs


def test_registry_names() -> None:
    assert sorted(BASELINES) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_writes_every_option_with_the_builders_default(name: str) -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / f"{name}.yaml"))
    assert cfg.pop("name") == name
    written = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    assert written == option_defaults(BASELINES[name])


@pytest.mark.parametrize("name", NAMES)
def test_yaml_options_verbatim_train_a_tiny_model(name: str) -> None:
    model = make_model(TinyLM, torch.float32)
    opt = BASELINES[name](model, **yaml_options(name))  # OmegaConf values as they come
    (batch,) = make_batches(TinyLM, 1, torch.float32)
    with torch.no_grad():
        before = loss_of(model, batch).item()
    train(model, opt, [batch] * 10)
    with torch.no_grad():
        after = loss_of(model, batch).item()
    assert after < before, (name, before, after)


@pytest.mark.parametrize("name", NAMES)
def test_every_baseline_uses_the_grouping_rule(name: str) -> None:
    model = make_model(TinyLM)
    opt = BASELINES[name](model, weight_decay=0.3)
    expected = param_groups(model, 0.3)
    got = [(g["role"], g["weight_decay"], g["params"]) for g in opt.param_groups]
    assert len(got) == len(expected) == 4
    for (role, wd, params), exp in zip(got, expected, strict=True):
        assert role == exp["role"] and wd == exp["weight_decay"]
        assert all(p is q for p, q in zip(params, exp["params"], strict=True))
    assert by_role(opt, "vector")["weight_decay"] == 0.0


@pytest.mark.parametrize("name", NAMES)
def test_unknown_option_is_named(name: str) -> None:
    with pytest.raises(TypeError, match="bogus_option"):
        BASELINES[name](make_model(TinyLM), bogus_option=1)


@pytest.mark.parametrize(
    ("name", "options", "error", "option"),
    [
        ("adamw", {"lr": -1.0}, ValueError, "'lr'"),
        ("adamw", {"lr": "fast"}, TypeError, "'lr'"),
        ("adamw", {"betas": [0.9]}, ValueError, "'betas'"),
        ("adamw", {"betas": [0.9, 1.0]}, ValueError, "betas"),
        ("adamp", {"nesterov": "yes"}, TypeError, "'nesterov'"),
        ("adamp", {"wd_ratio": -0.1}, ValueError, "'wd_ratio'"),
        ("muon", {"adjust_lr_fn": "nope"}, ValueError, "'adjust_lr_fn'"),
        ("muon", {"ns_steps": 2.5}, TypeError, "'ns_steps'"),
        ("muon", {"momentum": 1.0}, ValueError, "'momentum'"),
        ("muon", {"ns_coefficients": [1.0, 2.0]}, ValueError, "'ns_coefficients'"),
        ("scale", {"normalization": "max"}, ValueError, "'normalization'"),
        ("scale", {"eps": 0.0}, ValueError, "'eps'"),
        ("scale", {"adam_betas": "0.9"}, TypeError, "'adam_betas'"),
        ("sgd", {"weight_decay": -1e-4}, ValueError, "'weight_decay'"),
        ("sgd", {"momentum": 0.0, "nesterov": True}, ValueError, "'nesterov'"),
    ],
)
def test_bad_option_values_are_named(name, options, error, option) -> None:
    with pytest.raises(error, match=option):
        BASELINES[name](make_model(TinyLM), **options)


# ------------------------------------------------------------------------------- adamw


def test_adamw_is_torch_adamw_foreach_on_cpu() -> None:
    opt = BASELINES["adamw"](make_model(TinyLM))
    assert isinstance(opt, torch.optim.AdamW)
    assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups)


# ------------------------------------------------------------------------------- adamp


def test_adamp_steps_equal_the_authors_package() -> None:
    hyper = {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 1e-2,
             "delta": 0.1, "wd_ratio": 0.1, "nesterov": True}
    ours_model = make_model(TinyConvNet)
    ref_model = copy.deepcopy(ours_model)
    ours = BASELINES["adamp"](ours_model, **{**hyper, "betas": list(hyper["betas"])})
    ref = AdamP(param_groups(ref_model, hyper["weight_decay"]), **hyper)

    projected = []  # make sure the projection branch (scale-invariant weights) runs
    inner = ref._projection

    def recording_projection(*args, **kwargs):
        perturb, wd = inner(*args, **kwargs)
        projected.append(wd != 1)
        return perturb, wd

    ref._projection = recording_projection
    for batch in make_batches(TinyConvNet, 4):
        backward(ours_model, batch, ours)
        ours.step()
        backward(ref_model, batch, ref)
        ref.step()
        assert_same_params(ours_model, ref_model)
    assert any(projected)


def test_adamp_yaml_is_adamw_plus_the_package_defaults() -> None:
    """AdamP's own options (delta, wd_ratio, nesterov) are the package's defaults; the Adam
    ones (lr, betas, eps, weight_decay) are adamw.yaml's, so that only the method differs."""
    signature = inspect.signature(AdamP.__init__).parameters
    options = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "adamp.yaml"))
    adamw = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "adamw.yaml"))
    del options["name"]
    assert set(options) == set(signature) - {"self", "params"}
    for key, value in options.items():
        expected = adamw[key] if key in adamw else signature[key].default
        assert (tuple(value) if isinstance(value, list) else value) == \
            (tuple(expected) if isinstance(expected, list) else expected), key
    assert options["weight_decay"] > 0  # else AdamP's wd_ratio mechanism is switched off


# -------------------------------------------------------------------------------- muon


def reference_muon_adamw(model: nn.Module, lr: float, wd: float = 0.1):
    """torch.optim.Muon on the matrices plus torch.optim.AdamW on the rest."""
    groups = param_groups(model, wd)
    matrices = [p for g in groups if g["role"] == "matrix" for p in g["params"]]
    rest = [{"params": g["params"], "weight_decay": g["weight_decay"]}
            for g in groups if g["role"] != "matrix"]
    muon = torch.optim.Muon(matrices, lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=lr, betas=(0.9, 0.95), eps=1e-8)
    return muon, adamw


def test_muon_steps_equal_torch_muon_plus_adamw() -> None:
    ours_model = make_model(TinyLM)
    ref_model = copy.deepcopy(ours_model)
    ours = BASELINES["muon"](ours_model, lr=2e-2)
    assert isinstance(ours, MuonWithAdamW)
    ref = reference_muon_adamw(ref_model, lr=2e-2)
    for batch in make_batches(TinyLM, 5):
        backward(ours_model, batch, ours)
        ours.step()
        backward(ref_model, batch, *ref)
        for opt in ref:
            opt.step()
        assert_same_params(ours_model, ref_model)
    # state under torch's key names
    for p in by_role(ours, "matrix")["params"]:
        assert set(ours.state[p]) == {"momentum_buffer"}
    for role in ("embedding", "readout", "vector"):
        for p in by_role(ours, role)["params"]:
            assert set(ours.state[p]) == {"step", "exp_avg", "exp_avg_sq"}


def test_muon_conv_weights_are_flattened_matrices() -> None:
    """A hidden conv weight gets exactly torch.optim.Muon's step on its (out, in*k*k)
    matrix; the first conv (the input layer) gets torch.optim.AdamW's step."""
    ours_model = make_model(TinyConvNet)
    ref_model = copy.deepcopy(ours_model)
    ours = BASELINES["muon"](ours_model, lr=2e-2)
    convs = [ref_model.conv2.weight]
    twins = [w.detach().reshape(w.shape[0], -1).clone().requires_grad_() for w in convs]
    muon = torch.optim.Muon(twins, lr=2e-2, weight_decay=0.1, momentum=0.95,
                            nesterov=True, adjust_lr_fn="match_rms_adamw")
    rest = [{"params": [ref_model.conv1.weight], "weight_decay": 0.1}]
    rest += [{"params": g["params"], "weight_decay": g["weight_decay"]}
             for g in param_groups(ref_model, 0.1) if g["role"] != "matrix"]
    adamw = torch.optim.AdamW(rest, lr=2e-2, betas=(0.9, 0.95), eps=1e-8)
    assert [g["role"] for g in ours.param_groups][0] == "matrix"
    assert by_role(ours, "matrix")["params"] == [ours_model.conv2.weight]
    assert by_role(ours, "embedding")["params"] == [ours_model.conv1.weight]
    for batch in make_batches(TinyConvNet, 4):
        backward(ours_model, batch, ours)
        ours.step()
        ref_model.zero_grad()
        loss_of(ref_model, batch).backward()
        for w, twin in zip(convs, twins, strict=True):
            twin.grad = w.grad.reshape(twin.shape).clone()
        muon.step()
        adamw.step()
        with torch.no_grad():
            for w, twin in zip(convs, twins, strict=True):
                w.copy_(twin.view(w.shape))
        assert_same_params(ours_model, ref_model)
    assert ours.state[ours_model.conv2.weight]["momentum_buffer"].shape == (6, 4, 3, 3)
    assert set(ours.state[ours_model.conv1.weight]) == {"step", "exp_avg", "exp_avg_sq"}


def test_muon_channels_last_conv_weights_match_contiguous() -> None:
    model = make_model(TinyConvNet)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert not cl_model.conv2.weight.is_contiguous()
    ours, cl = BASELINES["muon"](model, lr=2e-2), BASELINES["muon"](cl_model, lr=2e-2)
    for batch in make_batches(TinyConvNet, 3):
        for m, opt in ((model, ours), (cl_model, cl)):
            backward(m, batch, opt)
            opt.step()
        for p, q in zip(model.parameters(), cl_model.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_muon_scheduler_scales_both_parts() -> None:
    ours_model = make_model(TinyLM)
    ref_model = copy.deepcopy(ours_model)
    ours = BASELINES["muon"](ours_model, lr=2e-2)
    ref = reference_muon_adamw(ref_model, lr=2e-2)
    decay = lambda step: 0.5 ** step  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(ours, decay)
    ref_scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in ref]
    for batch in make_batches(TinyLM, 3):
        backward(ours_model, batch, ours)
        ours.step()
        sched.step()
        backward(ref_model, batch, *ref)
        for opt, s in zip(ref, ref_scheds, strict=True):
            opt.step()
            s.step()
        assert_same_params(ours_model, ref_model)
    assert [g["lr"] for g in ours.param_groups] == [2e-2 * 0.5**3] * 4
    assert {g["role"] for g in ours.param_groups} == {"matrix", "embedding", "readout", "vector"}


def test_muon_closure_returns_the_loss() -> None:
    model = make_model(TinyLM)
    opt = BASELINES["muon"](model)
    (batch,) = make_batches(TinyLM, 1)

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    before = copy.deepcopy(model)
    loss = opt.step(closure)
    with torch.no_grad():
        assert torch.equal(loss.detach(), loss_of(before, batch))
    assert all(len(opt.state[p]) > 0 for g in opt.param_groups for p in g["params"])
    pairs = zip(model.parameters(), before.parameters(), strict=True)
    assert all(not torch.equal(p, q) for p, q in pairs)


def test_muon_and_scale_refuse_groups_without_role() -> None:
    model = make_model(TinyLM)
    with pytest.raises(ValueError, match="role"):
        MuonWithAdamW(model.parameters())
    with pytest.raises(ValueError, match="role"):
        SCALE([{"params": list(model.parameters())}])


def round_trip(name: str, cls: type[nn.Module], **options) -> None:
    """Train 3 steps, checkpoint (torch.save, weights_only load), resume in a fresh
    optimizer, and check 3 more steps equal those of the uninterrupted optimizer."""
    model = make_model(cls)
    opt = BASELINES[name](model, **options)
    batches = make_batches(cls, 6)
    train(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    resumed_model = copy.deepcopy(model)
    resumed = BASELINES[name](resumed_model, **options)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert set(opt.state[p]) == set(resumed.state[q])
        for key, value in opt.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key
    train(model, opt, batches[3:])
    train(resumed_model, resumed, batches[3:])
    assert_same_params(model, resumed_model)


def test_muon_state_dict_round_trip() -> None:
    round_trip("muon", TinyLM, lr=2e-2)
    round_trip("muon", TinyConvNet, lr=2e-2)


# ------------------------------------------------------------------------------- scale


def full(n: int, value: float) -> torch.Tensor:
    return torch.full((n,), value, dtype=torch.float64)


def snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in model.named_parameters()}


@pytest.mark.parametrize("normalization", ["l2", "rms"])
def test_scale_first_step_normalises_each_output_unit(normalization: str) -> None:
    lr = 1e-2
    model = make_model(TinyLM)
    opt = BASELINES["scale"](model, lr=lr, normalization=normalization, adam_lr_ratio=1.0)
    (batch,) = make_batches(TinyLM, 1)
    backward(model, batch, opt)
    before = snapshot(model)
    opt.step()
    steps = {n: before[n][0] - p.detach() for n, p in model.named_parameters()}

    def size(rows: torch.Tensor, dim: int) -> torch.Tensor:
        if normalization == "l2":
            return torch.linalg.vector_norm(rows, dim=dim)
        return rows.square().mean(dim=dim).sqrt()

    # hidden matrices and readout (EMA of one gradient = a multiple of it): rows
    for name in ("fc1.weight", "fc2.weight", "readout.weight"):
        torch.testing.assert_close(size(steps[name], 1), full(steps[name].shape[0], lr))
        grad = before[name][1]
        expected = lr * grad / size(grad, 1)[:, None]
        torch.testing.assert_close(steps[name], expected, rtol=1e-12, atol=0)
    # embedding table (vocab x dim): columns, i.e. per embedding coordinate over the vocab
    table = steps["embed.weight"]
    torch.testing.assert_close(size(table, 0), full(table.shape[1], lr))
    # vectors: AdamW's first step is lr * sign(grad) up to eps / |grad|
    torch.testing.assert_close(steps["fc1.bias"], lr * before["fc1.bias"][1].sign(),
                               rtol=1e-4, atol=0)


def test_scale_momentum_only_on_the_readout() -> None:
    lr, beta = 1e-2, 0.9
    model = make_model(TinyLM)
    opt = BASELINES["scale"](model, lr=lr, momentum=beta, normalization="l2")
    grads = []
    for batch in make_batches(TinyLM, 2):
        backward(model, batch, opt)
        grads.append(snapshot(model))
        opt.step()
    # state: a momentum buffer for the readout only, AdamW state for vectors, none else
    for role, keys in [("matrix", set()), ("embedding", set()), ("readout", {"momentum_buffer"}),
                       ("vector", {"step", "exp_avg", "exp_avg_sq"})]:
        for p in by_role(opt, role)["params"]:
            assert set(opt.state.get(p, {})) == keys, role
    # second step: the readout follows the EMA, the hidden matrix the raw gradient
    after = dict(model.named_parameters())
    (_, g1), (w2, g2) = grads[0]["readout.weight"], grads[1]["readout.weight"]
    ema = beta * (1 - beta) * g1 + (1 - beta) * g2
    torch.testing.assert_close(opt.state[model.readout.weight]["momentum_buffer"], ema,
                               rtol=1e-14, atol=0)
    torch.testing.assert_close(w2 - after["readout.weight"].detach(),
                               lr * normalize_per_output(ema, "readout", "l2", 1e-8),
                               rtol=1e-12, atol=0)
    w, g = grads[1]["fc2.weight"]
    torch.testing.assert_close(w - after["fc2.weight"].detach(),
                               lr * normalize_per_output(g, "matrix", "l2", 1e-8),
                               rtol=1e-12, atol=0)
    # ... which is not what the EMA would give
    ema_fc2 = beta * (1 - beta) * grads[0]["fc2.weight"][1] + (1 - beta) * g
    assert not torch.allclose(normalize_per_output(ema_fc2, "matrix", "l2", 1e-8),
                              normalize_per_output(g, "matrix", "l2", 1e-8))


def test_scale_vectors_take_torch_adamw_steps() -> None:
    ours_model = make_model(TinyLM)
    ref_model = copy.deepcopy(ours_model)
    ours = BASELINES["scale"](ours_model, lr=1e-2, adam_lr_ratio=0.3, adam_betas=[0.8, 0.99],
                              adam_eps=1e-7, weight_decay=0.05)
    assert by_role(ours, "vector")["lr"] == pytest.approx(3e-3, rel=1e-15)
    assert by_role(ours, "matrix")["lr"] == 1e-2
    vectors = [p for g in param_groups(ref_model, 0.0) if g["role"] == "vector"
               for p in g["params"]]
    ref = torch.optim.AdamW(vectors, lr=by_role(ours, "vector")["lr"], betas=(0.8, 0.99),
                            eps=1e-7, weight_decay=0.0)
    for batch in make_batches(TinyLM, 4):
        backward(ours_model, batch, ours)
        ours.step()
        backward(ref_model, batch, ref)
        ref.step()
        with torch.no_grad():  # the non-vector parameters follow SCALE's
            for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
                if p.ndim >= 2:
                    q.copy_(p)
        assert_same_params(ours_model, ref_model)


def test_scale_conv_rows_are_output_channels() -> None:
    lr = 1e-2
    model = make_model(TinyConvNet)
    opt = BASELINES["scale"](model, lr=lr, normalization="l2")
    (batch,) = make_batches(TinyConvNet, 1)
    backward(model, batch, opt)
    before = model.conv2.weight.detach().clone()
    opt.step()
    step = (before - model.conv2.weight.detach()).reshape(6, -1)
    torch.testing.assert_close(step.norm(dim=1), full(6, lr))


def test_scale_state_dict_round_trip() -> None:
    round_trip("scale", TinyLM, lr=1e-2)
    round_trip("scale", TinyConvNet, lr=1e-2, normalization="rms", adam_lr_ratio=0.3)


def test_scale_scheduler_scales_every_group() -> None:
    model = make_model(TinyLM)
    opt = BASELINES["scale"](model, lr=1e-2, adam_lr_ratio=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train(model, opt, make_batches(TinyLM, 2), sched)
    assert [g["lr"] for g in opt.param_groups] == [1e-2 / 4] * 3 + [5e-3 / 4]


# ----------------------------------------------------------------- recipes' role routing


class TiedLM(nn.Module):
    """Readout tied to the embedding: no untied readout layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.fc = nn.Linear(8, 8)
        self.readout = nn.Linear(8, 11, bias=False)
        self.readout.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(torch.tanh(self.fc(self.embed(x).mean(dim=1))))


def test_scale_refuses_a_model_without_untied_readout() -> None:
    with pytest.raises(ValueError, match="untied readout"):
        BASELINES["scale"](make_model(TiedLM))


def _task_models() -> dict[str, tuple[nn.Module, str]]:
    from tasks.gpt_lm import GPT
    from tasks.grok_modadd import GrokTransformer
    from tasks.resnet_cifar import ResNet
    from tasks.vit_cifar import ViT

    tf = {"depth": 1, "width": 16, "heads": 2}
    return {
        "gpt_lm": (GPT(vocab=11, context=8, **tf), "embed"),
        "grok_modadd": (GrokTransformer(vocab=13, num_classes=11, **tf), "embed"),
        "vit_cifar": (ViT(num_classes=10, **tf), "patch_embed"),
        "resnet_cifar": (ResNet(num_classes=10, blocks=[1], width=4), "stem_conv"),
    }


@pytest.mark.parametrize("task", ["gpt_lm", "grok_modadd", "vit_cifar", "resnet_cifar"])
def test_muon_input_layer_goes_to_adamw_for_every_task_model(task: str) -> None:
    """The ViT patch embedding and the ResNet stem are AdamW's (role embedding); the GPT and
    grokking inputs are embedding tables already; every other hidden matrix stays Muon's."""
    from baselines import input_layer

    model, name = _task_models()[task]
    assert input_layer(model) is getattr(model, name)
    opt = BASELINES["muon"](model)
    muon = {id(p) for p in by_role(opt, "matrix")["params"]}
    adamw = {id(p) for g in opt.param_groups if g["role"] != "matrix" for p in g["params"]}
    first = getattr(model, name).weight
    assert id(first) in adamw and id(first) not in muon
    hidden = [p for g in param_groups(model, 0.1) if g["role"] == "matrix"
              for p in g["params"] if p is not first]
    assert hidden and {id(p) for p in hidden} == muon
    assert id(model.readout.weight) in adamw


def test_muon_adam_lr_ratio_sets_the_adamw_part() -> None:
    """Keller Jordan's convention: Muon lr 0.02, AdamW part at 0.015 x lr = 3e-4."""
    opt = BASELINES["muon"](make_model(TinyLM), lr=0.02, adjust_lr_fn="original",
                            adam_lr_ratio=0.015)
    assert by_role(opt, "matrix")["lr"] == 0.02
    for role in ("embedding", "readout", "vector"):
        assert by_role(opt, role)["lr"] == pytest.approx(3e-4, rel=1e-12)
    with pytest.raises(ValueError, match="adam_lr_ratio"):
        BASELINES["muon"](make_model(TinyLM), adam_lr_ratio=0.0)
