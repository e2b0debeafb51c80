"""torch.optim.Muon's kernels, vendored: Newton–Schulz orthogonalisation, the learning-rate
adjustment, the default constants and the per-tensor update.

Source: PyTorch 2.14.1, ``torch/optim/_muon.py`` (``EPS``, ``DEFAULT_A``/``B``/``C``,
``DEFAULT_NS_STEPS``, ``_zeropower_via_newtonschulz``, ``_adjust_lr``,
``_single_tensor_muon``; the constants come from Keller Jordan's Muon,
https://github.com/KellerJordan/Muon). PyTorch is distributed under the BSD-3-Clause
license: "Copyright (c) 2016- Facebook, Inc (Adam Paszke) [...] Redistribution and use in
source and binary forms, with or without modification, are permitted provided that [...]
retain the above copyright notice, this list of conditions and the following disclaimer."
The full notice is torch's ``LICENSE`` file (in the installed ``torch-*.dist-info``).

**Why vendored rather than pinned.** DDC and the Muon baseline used to import these as
private names from ``torch.optim._muon``, whose signatures have already changed in
torch's development tree, while ``pyproject.toml`` accepts any torch >= 2.9. Pinning torch
to one minor version would fix that, but would also force every user of the ``ddc``
library onto that version (and onto its CUDA builds). The kernels are about 40 lines of
plain tensor arithmetic, so a copy costs little, keeps the torch range open, and
``tests/test_muon_kernels.py`` checks on every run that the copy still reproduces the
installed ``torch.optim.Muon`` bit for bit (float32), so a drift in torch is noticed.

The code below is torch's, with the names made public and type hints added; the
arithmetic is unchanged operation by operation (that is what makes it bit-exact).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "DEFAULT_A",
    "DEFAULT_B",
    "DEFAULT_C",
    "DEFAULT_NS_STEPS",
    "zeropower_via_newtonschulz",
    "adjust_lr",
    "muon",
]

#: Floor of the Frobenius norm that Newton–Schulz divides by (torch's ``EPS``).
EPS = 1e-7
#: Quintic Newton–Schulz coefficients (a, b, c), from Keller Jordan's Muon.
DEFAULT_A = 3.4445
DEFAULT_B = -4.7750
DEFAULT_C = 2.0315
#: Newton–Schulz iterations per step.
DEFAULT_NS_STEPS = 5


def zeropower_via_newtonschulz(
    grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> Tensor:
    """Approximately orthogonalise the 2-D ``grad`` (``U S Vᵀ`` -> about ``U S' Vᵀ``,
    ``S'`` within roughly [0.5, 1.5]) by ``ns_steps`` quintic Newton–Schulz iterations in
    bfloat16; returns a bfloat16 tensor of ``grad``'s shape. torch's
    ``_zeropower_via_newtonschulz``.
    """
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.bfloat16()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    # Ensure spectral norm is at most 1
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad


def adjust_lr(lr: float, adjust_lr_fn: str | None, param_shape: torch.Size | tuple[int, ...]) -> float:
    """Muon's learning rate for an ``A x B`` matrix (torch's ``_adjust_lr``).

    ``None``/``"original"``: ``lr * sqrt(max(1, A/B))`` (Keller Jordan);
    ``"match_rms_adamw"``: ``lr * 0.2 * sqrt(max(A, B))`` (Moonshot, arXiv 2502.16982);
    ``"spectral_unclamped"``: ``lr * sqrt(A/B)`` (Bernstein); any other value: ``lr``.
    """
    A, B = param_shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        adjusted_ratio = math.sqrt(max(1, A / B))
    elif adjust_lr_fn == "match_rms_adamw":
        adjusted_ratio = 0.2 * math.sqrt(max(A, B))
    elif adjust_lr_fn == "spectral_unclamped":
        adjusted_ratio = math.sqrt(A / B)
    else:
        adjusted_ratio = 1.0
    return lr * adjusted_ratio


def muon(
    params: list[Tensor],
    grads: list[Tensor],
    muon_momentum_bufs: list[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients: tuple[float, float, float],
    ns_steps: int,
    eps: float,
    adjust_lr_fn: str | None,
) -> None:
    """``torch.optim.Muon``'s update, in place, on 2-D ``params`` (torch's
    ``_single_tensor_muon``, the only path its functional ``muon`` has)::

        B <- B.lerp(G, 1 - momentum);  U <- G.lerp(B, momentum) if nesterov else B
        W <- W * (1 - lr * weight_decay);  W <- W - adjust_lr(lr) * NewtonSchulz(U)

    ``lr`` is a Python float (torch also accepts a 1-element tensor; nothing here uses one).
    """
    for param, grad, buf in zip(params, grads, muon_momentum_bufs, strict=True):
        if torch.is_complex(param):
            raise ValueError("Complex parameters are not supported")
        if grad.ndim != 2:
            raise ValueError("Param gradient must be a 2D matrix")
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if nesterov else buf
        update = zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)
        adjusted_lr = adjust_lr(lr, adjust_lr_fn, param.shape)
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-adjusted_lr)
