"""DDC contract on the benchmark's own task models (tiny size, float64): every declared
gauge passes verify_gauges, and each model's full gauge set gives exact equivariance on
both bases (AdamW, in the same harness, does not)."""

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from cifar_fixture import write_fake_cifar
from ddc import DDC, verify_gauges
from ddc_models import equivariance_deviation
from tasks import build_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "task"
CASES = {
    "gpt-swiglu-rope-layernorm": ("gpt_lm", {}),
    "gpt-relu-norope-rmsnorm": ("gpt_lm", {"model": {"mlp": "relu", "norm": "rmsnorm", "rope": False}}),
    "gpt-gelu-bias": ("gpt_lm", {"model": {"mlp": "gelu", "bias": True}}),
    "gpt-tied": ("gpt_lm", {"model": {"tied": True}}),
    "vit": ("vit_cifar", {}),
    "vit-swiglu-rmsnorm": ("vit_cifar", {"model": {"mlp": "swiglu", "norm": "rmsnorm"}}),
    "resnet": ("resnet_cifar", {}),
    "grok": ("grok_modadd", {}),
}
STEPS = 10


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=40, n_test=20)
    return root


def build(case, cifar_root):
    name, overrides = CASES[case]
    cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), {"size": "tiny"}, overrides)
    if "root" in cfg.get("data", {}):
        cfg.data.root = str(cifar_root)
    task = build_task(cfg)
    torch.manual_seed(0)
    model = task.build_model().double()
    batches = [tuple(t.double() if t.is_floating_point() else t for t in b)
               for b in itertools.islice(task.train_batches(0), STEPS)]
    return model, batches


def float64_loss(model, batch):
    """Cross-entropy in float64 (the tasks' own losses compute it in float32)."""
    inputs, targets = batch[0], batch[1]
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)), logits


@pytest.mark.parametrize("case", CASES)
def test_declared_gauges_are_symmetries(case, cifar_root):
    model, batches = build(case, cifar_root)
    report = verify_gauges(model, float64_loss, batches[0])
    assert len(report) == len(model.gauges()) > 0
    assert max(v["loss"] for v in report.values()) <= 1e-8


@pytest.mark.parametrize("base,options", [("adam", {}), ("muon", {"orthogonalizer": "svd"})], ids=["adam", "muon"])
@pytest.mark.parametrize("case", CASES)
def test_task_model_equivariance(case, base, options, cifar_root):
    model, batches = build(case, cifar_root)
    make = lambda m, gauges: DDC(m, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1, **options)
    deviation = equivariance_deviation(model, make, float64_loss, batches)
    assert deviation <= 1e-8, f"{case}: DDC-{base} deviates by {deviation:.2e}"
    if base == "adam":
        adamw = lambda m, gauges: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
        assert equivariance_deviation(model, adamw, float64_loss, batches) >= 1e-4


def test_tied_readout_declares_no_shift(cifar_root):
    from ddc.gauges import LogitShift
    model, _ = build("gpt-tied", cifar_root)
    assert not any(isinstance(g, LogitShift) for g in model.gauges())
