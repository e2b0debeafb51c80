"""Contract 1: exact equivariance (float64), for each gauge kind alone and for full gauge
sets, on both bases; the same harness shows AdamW is not equivariant."""

import pytest
import torch

from ddc import DDC
from ddc.gauges import HeadRotation, HeadRotationVO, LogitShift, NormGain, UnitRescale
from ddc_models import (ReluMLP, TinyTransformer, classification_loss, equivariance_deviation,
                        gauges_by_kind, make_batches)

STEPS = 10
TOLERANCE = 1e-8
BASES = [("adam", {}), ("muon", {"orthogonalizer": "svd"})]


def ddc_factory(base, options, dead_mode="freeze"):
    return lambda model, gauges: DDC(model, gauges=gauges, base=base, lr=1e-2, weight_decay=0.1,
                                     dead_mode=dead_mode, **options)


def adamw_factory(model, gauges):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


KIND_MODELS = [
    (LogitShift, dict(rope=None, mlp="relu")),
    (UnitRescale, dict(rope=None, mlp="relu")),
    (UnitRescale, dict(rope=None, mlp="swiglu")),
    (NormGain, dict(rope=None, mlp="gelu", norm="layernorm")),
    (NormGain, dict(rope=None, mlp="gelu", norm="rmsnorm")),
    (HeadRotation, dict(rope=None, mlp="gelu")),
    (HeadRotation, dict(rope="interleaved", mlp="gelu")),
    (HeadRotation, dict(rope="half", mlp="gelu")),
    (HeadRotationVO, dict(rope=None, mlp="gelu")),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
@pytest.mark.parametrize("kind,model_kwargs", KIND_MODELS,
                         ids=[f"{k.__name__}-{'-'.join(map(str, m.values()))}" for k, m in KIND_MODELS])
def test_each_gauge_kind_alone(kind, model_kwargs, base, options):
    model = TinyTransformer(**model_kwargs).double()
    batches = make_batches(model, STEPS)
    select = lambda m: gauges_by_kind(m, kind)
    assert select(model), "the model must declare this gauge kind"
    ddc_dev = equivariance_deviation(model, ddc_factory(base, options), classification_loss, batches, select)
    adamw_dev = equivariance_deviation(model, adamw_factory, classification_loss, batches, select)
    assert ddc_dev <= TOLERANCE, f"DDC-{base} deviates by {ddc_dev:.2e} under {kind.__name__}"
    assert adamw_dev >= 1e-4, f"the harness must be able to fail: AdamW deviates only {adamw_dev:.2e}"


FULL_MODELS = [
    dict(rope="interleaved", mlp="swiglu", norm="layernorm"),
    dict(rope="half", mlp="relu", norm="rmsnorm", bias=False),
    dict(rope=None, mlp="gelu", norm="layernorm"),
]


@pytest.mark.parametrize("base,options", BASES, ids=[b for b, _ in BASES])
@pytest.mark.parametrize("model_kwargs", FULL_MODELS, ids=lambda m: "-".join(map(str, m.values())))
def test_full_gauge_set(model_kwargs, base, options):
    """All gauges at once: overlapping scale gauges (W_up rows and columns), rotations,
    translation."""
    model = TinyTransformer(**model_kwargs).double()
    batches = make_batches(model, STEPS)
    dev = equivariance_deviation(model, ddc_factory(base, options), classification_loss, batches)
    assert dev <= TOLERANCE
    assert equivariance_deviation(model, adamw_factory, classification_loss, batches) >= 1e-4


def test_relu_mlp_chain():
    """Two unit gauges in a chain share fc_hidden (its rows in one, columns in the other)."""
    model = ReluMLP().double()
    batches = make_batches(model, STEPS)
    for base, options in BASES:
        assert equivariance_deviation(model, ddc_factory(base, options), classification_loss, batches) <= TOLERANCE


def test_free_dead_mode_is_still_equivariant():
    model = TinyTransformer(rope="interleaved").double()
    batches = make_batches(model, STEPS)
    dev = equivariance_deviation(model, ddc_factory("adam", {}, dead_mode="free"), classification_loss, batches)
    assert dev <= TOLERANCE


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_defaults_are_exact(base):
    """Contract 9: ``DDC(model)`` with nothing but the base chosen is exactly equivariant
    (for Muon the default orthogonaliser is the exact polar factor), under every gauge of
    a model with rotations, RoPE pairs, overlapping scales and a logit shift."""
    model = TinyTransformer(rope="interleaved", mlp="swiglu").double()
    batches = make_batches(model, STEPS)
    make = lambda m, gauges: DDC(m, gauges=gauges, base=base)
    assert equivariance_deviation(model, make, classification_loss, batches) <= TOLERANCE
