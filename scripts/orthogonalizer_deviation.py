"""Measure how far DDC-Muon's orthogonalisers are from exact equivariance.

For each orthogonaliser (``svd``, the default; ``newton_schulz``, torch's bfloat16
iteration) and each gauge kind of the test models (and each full gauge set), run K = 10
steps from θ and from g·θ on the same batches (float64 parameters) and print the max
relative deviation of g·(first trajectory) from the second, as the equivariance tests
measure it (``tests/ddc_models.py``). Usage::

    PYTHONPATH=.:tests python scripts/orthogonalizer_deviation.py
"""

from __future__ import annotations

import warnings

import torch

from ddc import DDC
from ddc.gauges import HeadRotation, HeadRotationVO, LogitShift, NormGain, UnitRescale
from ddc_models import TinyTransformer, classification_loss, equivariance_deviation, gauges_by_kind, make_batches

CASES = [
    ("LogitShift", LogitShift, dict(rope=None, mlp="relu")),
    ("UnitRescale (relu)", UnitRescale, dict(rope=None, mlp="relu")),
    ("UnitRescale (swiglu)", UnitRescale, dict(rope=None, mlp="swiglu")),
    ("NormGain (layernorm)", NormGain, dict(rope=None, mlp="gelu", norm="layernorm")),
    ("HeadRotation (no rope)", HeadRotation, dict(rope=None, mlp="gelu")),
    ("HeadRotation (rope interleaved)", HeadRotation, dict(rope="interleaved", mlp="gelu")),
    ("HeadRotationVO", HeadRotationVO, dict(rope=None, mlp="gelu")),
    ("all gauges (rope interleaved, swiglu, layernorm)", None, dict(rope="interleaved", mlp="swiglu")),
    ("all gauges (rope half, relu, rmsnorm)", None, dict(rope="half", mlp="relu", norm="rmsnorm", bias=False)),
]


def main() -> None:
    torch.manual_seed(0)
    print(f"{'gauges':50s} {'svd':>10s} {'newton_schulz':>14s}")
    for label, kind, kwargs in CASES:
        model = TinyTransformer(**kwargs).double()
        batches = make_batches(model, 10)
        select = (lambda m: m.gauges()) if kind is None else (lambda m, k=kind: gauges_by_kind(m, k))
        row = []
        for orthogonalizer in ("svd", "newton_schulz"):
            make = lambda m, gauges, o=orthogonalizer: DDC(m, gauges=gauges, base="muon", lr=1e-2,
                                                          weight_decay=0.1, orthogonalizer=o)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row.append(equivariance_deviation(model, make, classification_loss, batches, select))
        print(f"{label:50s} {row[0]:10.1e} {row[1]:14.1e}")


if __name__ == "__main__":
    main()
