"""Baselines that are library optimizers used as they come: AdamW, AdamP and SGD.

Each builder groups the model's parameters with the project's single rule,
:func:`ddc.param_groups.param_groups` (weight decay on parameters with two or more
dimensions only), and hands the groups to the library optimizer unchanged.
"""

from __future__ import annotations

import torch
from adamp import AdamP
from torch import nn

from ddc.param_groups import param_groups

from ._options import as_betas, as_bool, as_float, builder


@builder("adamw")
def build_adamw(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` (decoupled weight decay, Loshchilov & Hutter 2019).

    Defaults: the GPT recipe (betas (0.9, 0.95), weight decay 0.1; Brown et al. 2020,
    App. B, and nanoGPT) at nanoGPT's small-model lr 1e-3; ``configs/optimizer/adamw.yaml``
    gives the source of each value.

    Multi-tensor (``foreach``) implementation; the fused kernel when every parameter
    lives on a CUDA device.
    """
    lr = as_float("adamw", "lr", lr)
    betas = as_betas("adamw", "betas", betas)
    eps = as_float("adamw", "eps", eps)
    weight_decay = as_float("adamw", "weight_decay", weight_decay)
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        foreach=not fused,
        fused=fused or None,
    )


@builder("adamp")
def build_adamp(
    model: nn.Module,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    delta: float = 0.1,
    wd_ratio: float = 0.1,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """AdamP (Heo et al., ICLR 2021, arXiv 2006.08217): the authors' ``adamp.AdamP``.

    Adam whose update, on a weight the gradient finds scale-invariant (cosine similarity
    of gradient and weight below ``delta / sqrt(fan)`` per output channel or for the
    whole tensor), has its radial component removed and its decoupled weight decay scaled
    by ``wd_ratio``. AdamP is AdamW plus that projection, so ``lr``, ``betas``, ``eps`` and
    ``weight_decay`` default to :func:`build_adamw`'s (a weight decay of 0 would also switch
    the ``wd_ratio`` mechanism off); ``delta``, ``wd_ratio`` and ``nesterov`` are the
    package's own signature defaults (``adamp`` 0.3.0).
    """
    lr = as_float("adamp", "lr", lr)
    betas = as_betas("adamp", "betas", betas)
    eps = as_float("adamp", "eps", eps)
    weight_decay = as_float("adamp", "weight_decay", weight_decay)
    delta = as_float("adamp", "delta", delta)
    wd_ratio = as_float("adamp", "wd_ratio", wd_ratio)
    nesterov = as_bool("adamp", "nesterov", nesterov)
    return AdamP(
        param_groups(model, weight_decay),
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        delta=delta,
        wd_ratio=wd_ratio,
        nesterov=nesterov,
    )


@builder("sgd")
def build_sgd(
    model: nn.Module,
    *,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """``torch.optim.SGD`` with heavy-ball momentum (sanity baseline).

    Defaults: the transformer tasks' values of ``configs/optimizer/sgd.yaml`` (ResNets get
    He et al.'s recipe from ``configs/recipe/sgd_resnet_cifar.yaml``).

    ``weight_decay`` is torch's coupled L2 term (added to the gradient), on parameters
    with two or more dimensions only.
    """
    lr = as_float("sgd", "lr", lr)
    momentum = as_float("sgd", "momentum", momentum, high=1.0, high_open=True)
    nesterov = as_bool("sgd", "nesterov", nesterov)
    weight_decay = as_float("sgd", "weight_decay", weight_decay)
    if nesterov and momentum == 0.0:
        raise ValueError("optimizer 'sgd': option 'nesterov' needs option 'momentum' > 0")
    return torch.optim.SGD(
        param_groups(model, weight_decay),
        lr=lr,
        momentum=momentum,
        nesterov=nesterov,
        weight_decay=weight_decay,
    )
