"""Optimizer registry: ``optimizer.name`` in the config → a builder.

Every builder has the signature ``build(model, **options)`` where ``options`` are the
fields of ``configs/optimizer/<name>.yaml`` other than ``name``, and returns a
``torch.optim.Optimizer`` or a :class:`~ddc_bench.training_optimizer.TrainingOptimizer`
(what the training loop needs besides the optimizer: its own clipping, a start-up check,
...). A builder that declares a keyword ``loss_fn`` also receives the task's loss,
``loss_fn(model, batch) -> loss`` (DDC checks its gauge declarations with it).

The baselines come from ``baselines.BASELINES``; ``ddc`` and ``ddc_muon`` build
``ddc.DDC(model, **options)`` (the two YAMLs differ only in their options). The baselines
share the parameter-grouping rule and the Muon kernels with DDC (``ddc.param_groups``,
``ddc.muon_kernels``); the DDC optimizer itself is imported only when a DDC variant is
built. Both are imported when the registry is first read, not when this module is.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from ddc_bench.config import ConfigError
from ddc_bench.training_optimizer import TrainingOptimizer

Builder = Callable[..., "torch.optim.Optimizer | TrainingOptimizer"]
#: ``loss_fn(model, batch)``: the task's mean loss on ``batch``.
LossFn = Callable[[nn.Module, tuple], torch.Tensor]

#: Optimizers implemented by ``ddc.DDC``; the YAML options select the variant.
DDC_NAMES = ("ddc", "ddc_muon")


def _build_ddc(model: nn.Module, *, loss_fn: LossFn | None = None,
               **options: Any) -> TrainingOptimizer:
    """``ddc.DDC``: clipping measured in DDC's canonical frame, and (given the task's
    loss) a start-up check that the model's declared gauges are exact symmetries, which
    DDC relies on."""
    from ddc import DDC  # lazy: only DDC runs import the optimizer

    with _unverified_warning_muted(loss_fn is not None):
        optimizer = DDC(model, **options)

    def check_gauges(checked: nn.Module, batch: tuple) -> None:
        from ddc import verify_gauges
        from ddc.verify import GaugeDeclarationError

        try:
            verify_gauges(checked, loss_fn, batch)
        except GaugeDeclarationError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "GaugeDeclarationError"
            raise ConfigError(f"the model declares a gauge that is not an exact symmetry: "
                              f"{first}") from None

    return TrainingOptimizer(optimizer, clip_grad_norm=optimizer.clip_grad_norm_,
                             startup_check=None if loss_fn is None else check_gauges)


@contextlib.contextmanager
def _unverified_warning_muted(verified_later: bool) -> Iterator[None]:
    """Mutes DDC's "declared gauge(s) not verified" warning while it is built, when the
    harness proves the gauges itself on the first training batch (``check_gauges``, the
    loop's start-up check): DDC is built before any batch exists, so it cannot."""
    if not verified_later:
        yield
        return
    ddc_logger = logging.getLogger("ddc")
    mute = lambda record: "not verified" not in record.getMessage()  # noqa: E731
    ddc_logger.addFilter(mute)
    try:
        yield
    finally:
        ddc_logger.removeFilter(mute)


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


def build_optimizer(model: nn.Module, optimizer_cfg: Mapping[str, Any],
                    loss_fn: LossFn | None = None) -> TrainingOptimizer:
    """Build the optimizer described by ``optimizer_cfg`` (``name`` plus options) for
    ``model``; a plain ``torch.optim.Optimizer`` comes back wrapped with the loop's defaults.
    ``loss_fn`` reaches the builders that declare it (without it, they skip what needs it).
    """
    options = dict(optimizer_cfg)
    name = options.pop("name")
    builders = registry()
    if name not in builders:
        raise KeyError(
            f"unknown optimizer {name!r}; known: {', '.join(sorted(builders))}"
        )
    builder = builders[name]
    if loss_fn is not None and _accepts_loss_fn(builder):
        options["loss_fn"] = loss_fn
    built = builder(model, **options)
    return built if isinstance(built, TrainingOptimizer) else TrainingOptimizer(built)


def _accepts_loss_fn(builder: Builder) -> bool:
    try:
        return "loss_fn" in inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin or a class without a readable signature
        return False
