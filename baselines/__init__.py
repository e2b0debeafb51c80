"""Baseline optimizers of the benchmark.

:data:`BASELINES` maps an optimizer name (``optimizer=NAME`` on the command line, the
``name`` field of ``configs/optimizer/NAME.yaml``) to its builder
``build(model, **options) -> torch.optim.Optimizer``, where ``options`` are the other
fields of that YAML file. Every builder groups parameters with the project's single rule,
:func:`ddc.param_groups.param_groups`. An unknown option raises ``TypeError``; a value of
the wrong kind or out of range raises ``TypeError`` / ``ValueError``; both name the option.

* ``adamw``: ``torch.optim.AdamW``.
* ``adamp``: the authors' ``adamp.AdamP`` (Heo et al., 2021).
* ``muon``:  :class:`~baselines.muon.MuonWithAdamW`: torch's Muon kernel on hidden
  matrices, torch's AdamW kernel on embeddings, the input layer
  (:func:`~baselines.muon.input_layer`), readout and vectors, one optimizer.
* ``scale``: :class:`~baselines.scale.SCALE` (Glentis et al., arXiv 2506.16659).
* ``sgd``:   ``torch.optim.SGD`` with momentum.

Library optimizers (pytorch-optimizer, heavyball, torch.optim, schedulefree) by name, and
the recipes of :data:`baselines.zoo.RECIPES` (``lion``, ``soap``, ...), are built by
:mod:`baselines.zoo`; ``ddc_bench.optimizers.registry`` adds them beside these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._options import option_defaults
from .library import build_adamp, build_adamw, build_sgd
from .muon import MuonWithAdamW, build_muon, input_layer, muon_param_groups
from .scale import SCALE, build_scale

BASELINES: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": build_adamw,
    "adamp": build_adamp,
    "muon": build_muon,
    "scale": build_scale,
    "sgd": build_sgd,
}

__all__ = ["BASELINES", "SCALE", "MuonWithAdamW", "input_layer", "muon_param_groups",
           "option_defaults"]
