"""Optimizer registry: ``optimizer.name`` in the config → a builder.

Every builder has the signature ``build(model, **options) -> torch.optim.Optimizer`` where
``options`` are the fields of ``configs/optimizer/<name>.yaml`` other than ``name``. The
baselines come from ``baselines.BASELINES``; ``ddc`` and ``ddc_muon`` build
``ddc.DDC(model, **options)`` (the two YAMLs differ only in their options). Both packages
are imported lazily, when an optimizer is built, so the harness works (and fails with a
clear message) while one of them is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Builder = Callable[..., torch.optim.Optimizer]

#: Optimizers implemented by ``ddc.DDC``; the YAML options select the variant.
DDC_NAMES = ("ddc", "ddc_muon")


def _build_ddc(model: nn.Module, **options: Any) -> torch.optim.Optimizer:
    from ddc import DDC  # lazy: the baselines must not depend on DDC being importable

    return DDC(model, **options)


def registry() -> dict[str, Builder]:
    """All known optimizers: the baselines, the DDC variants, the library recipes of
    ``baselines.zoo.RECIPES``, ``zoo`` and (looked up on demand) every class name of the
    optimizer libraries (``baselines.zoo``)."""
    from baselines import BASELINES
    from baselines.zoo import zoo_registry

    builders: dict[str, Builder] = dict(BASELINES)
    for name in DDC_NAMES:
        builders[name] = _build_ddc
    return zoo_registry(builders)


def build_optimizer(model: nn.Module, optimizer_cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """Build the optimizer described by ``optimizer_cfg`` (``name`` plus options) for ``model``."""
    options = dict(optimizer_cfg)
    name = options.pop("name")
    builders = registry()
    if name not in builders:
        raise KeyError(
            f"unknown optimizer {name!r}; known: {', '.join(sorted(builders))}"
        )
    return builders[name](model, **options)
