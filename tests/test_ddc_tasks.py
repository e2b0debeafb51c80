"""DDC contract on the benchmark's own task models (tiny size, float64): every declared
gauge passes verify_gauges, and each model's full gauge set gives exact equivariance on
both bases (AdamW, in the same harness, does not)."""

import pytest
import torch
import torch.nn.functional as F

from ddc import DDC, verify_gauges
from ddc_models import equivariance_deviation
from task_models import CASES, float64_case

STEPS = 10


def build(case, cifar_root):
    return float64_case(case, cifar_root, STEPS)


def float64_loss(model, batch):
    """Cross-entropy and the logits (verify_gauges compares both)."""
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
